"""Backward kernels of the Triton flash attention (kernels/attention.py holds the math, the
shared helpers, the forward and the launchers' input checks).

Two paths, one pre-pass. delta = rowsum(do * o) (fp32, one read of o and do) first; then
(notation of kernels/attention.py: p = exp2(s log2e - lse log2e), ds = p (dp - delta)):

* Fast (``deterministic=False``, the default unless torch.use_deterministic_algorithms(True)):
  one program per (key block, KV head) loops over the G query heads of its group and over the
  query blocks that see its keys, recomputes s = q k^T and p from lse once, and runs the 5
  GEMMs per tile: s, dv += p^T do, dp = do v^T, dk += ds^T q and dq = ds k; dk and dv stay in
  fp32 registers and are written once, dq is added to an fp32 [.., D] buffer by relaxed
  atomics (red.global.add: fire and forget, no value returned, reduced in L2), then cast to
  q's dtype by torch (fp32 inputs: the buffer is dq). The order of the adds varies, so dq is
  not bit-reproducible (dk and dv are).
* Deterministic (``deterministic=True``): dQ and dK/dV in separate kernels with no atomics:
  dQ (one program per (query block, query head)) recomputes s and p and runs s, dp and dq =
  ds k (3 GEMMs), dK/dV (the fast kernel without its dq product) runs s, dp, dv, dk (4):
  7 GEMMs per tile and p computed twice, bitwise reproducible run to run.

Cost per (sequence, query head) of T queries and S keys at head dim D, both paths (no window,
no padding): fast 5 x 2TSD = 10 TSD FLOPs and T S exp2; deterministic 14 TSD FLOPs and 2 T S
exp2. HBM bytes for element size e (K/V of a group read by its G heads from L2): both read q,
do, k, v (and o, do in the pre-pass) and write dk, dv: (4 T Hq + 4 S Hkv) D e plus 8 T Hq
(lse, delta); the fast path adds the fp32 accumulator: zeroed, reduced into (L2 write-back)
and read by the cast: 3 x 4 T Hq D, plus the cast's write T Hq D e; its atomics move
(S / BN) x 4 T Hq D bytes into L2 (the reductions), not HBM. Why the fast path is faster: it
never recomputes s and p (the deterministic dQ kernel redoes the s and dp GEMMs and the exp2
of every score), so it does 5/7 of the tensor-core work and half the MUFU work; the price is
the fp32 accumulator traffic, small next to the compute at these shapes.

Predicted H200 time for B = 8, T = S = 4608, 32:8 heads, D = 64, bf16 (a model from this
code, never a measurement; rates of kernels/_common.py: 790 TFLOP/s, 4.3 TB/s, and MUFU at 16
exp2 per clock per SM, 132 SMs x 1.98 GHz = 4.2e12/s). Per GEMM 2 T S D B Hq = 0.70 TFLOP.
Fast: 5 GEMMs = 3.48 TFLOP, 4.4 ms at 790; 5.4e9 exp2, 1.3 ms; HBM about 1.8 GB (0.3 GB q, do,
o twice, 0.15 GB k, v, dk, dv, 1.2 GB accumulator and cast), 0.4 ms; L2 reductions 36 key
blocks x 0.30 GB = 10.9 GB (BN = 128). Triton issues every product with wait_group 0, so MMA
and exp2 barely overlap: predicted about 60% of the GEMM rate plus the exp2 time, 3.48 / 474
TFLOP/s = 7.3 ms + 1.3 ms = 8.6 ms (400 TFLOP/s counted as 10 TSD). Deterministic: 7 GEMMs =
4.87 TFLOP, 10.3 ms at the same 60% + 2.6 ms exp2 = 12.9 ms (270 TFLOP/s counted the same).

Configs. On sm_90a every 16-bit product compiles to wgmma at least 64 wide (N >= 64: Triton
gives a dot of M rows 16 rows per warp, M / 16 warps along M and the rest along N, so with 8
warps every product needs M >= 128 or, at M = 64, 4 warps); no spills on sm_80 or sm_90a
(tests/test_attention_triton.py, compile tier, Triton 3.6 and 3.8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpreting, launch
from .attention import (
    _INTERPRET_CONFIG,
    _LOG2E,
    _arch,
    _at,
    _Config,
    _dot_precision,
    _key_range,
    _kv_block,
    _last_dim_contiguous,
    _layout,
    _load,
    _lse_log2,
    _lse_strides,
    _offsets,
    _program,
    _row64,
    _rows,
    _skip,
    _strides,
    _visible,
    _window,
)

__all__ = ["attention_backward"]

# Configs per kernel, arch family and padded head dim, chosen by compiling every variant for
# sm_80 and sm_90a under Triton 3.6 and 3.8 (tests/test_attention_triton.py, compile tier).
# "dkdv" (the deterministic dK/dV kernel) and "fast" (the same kernel with its dq product):
# block_m = queries per inner step, block_n = keys per program; "dq": block_m = queries per
# program, block_n = keys per inner step. sm_90a: every 16-bit product is wgmma at least
# min(64, D) wide; Triton gives a dot of M rows M / 16 warps along M and the rest along N, so
# with 8 warps a product needs M >= 128 (or D >= 128 for the [BM, D] ones), which is why the
# fast kernel runs one warpgroup of 64 x 64 tiles at head dim 64. One stage where two spilled.
# sm_80 (and every other arch): mma.sync, any shape, the widest tiles that do not spill.
_BWD = {
    ("fast", 90): {
        32: _Config(64, 64, 4, 1),
        64: _Config(64, 64, 4, 1),
    },
    ("dkdv", 90): {
        32: _Config(64, 128, 8, 1),
        64: _Config(64, 128, 8, 1),
        128: _Config(64, 128, 8, 1),
        256: _Config(16, 64, 8, 1),
    },
    ("dq", 90): {
        32: _Config(128, 64, 8, 2),
        64: _Config(128, 64, 8, 2),
        128: _Config(128, 64, 8, 1),
        256: _Config(64, 32, 8, 1),
    },
    ("fast", 80): {
        32: _Config(16, 128, 8, 1),
        64: _Config(16, 128, 8, 1),
        128: _Config(16, 64, 8, 1),
    },
    ("dkdv", 80): {
        32: _Config(32, 128, 8, 1),
        64: _Config(32, 128, 8, 1),
        128: _Config(32, 64, 8, 1),
        256: _Config(16, 64, 8, 1),
    },
    ("dq", 80): {
        32: _Config(128, 64, 8, 2),
        64: _Config(128, 64, 8, 2),
        128: _Config(128, 32, 8, 2),
        256: _Config(64, 32, 8, 1),
    },
}
# fp32 inputs (3xTF32 dots, twice the bytes of a 16-bit tile): small query blocks, 8 warps, one
# stage, both arch families (the split hi/lo operands are what fills the registers).
_BWD_F32 = {
    "fast": {32: _Config(16, 32, 8, 1), 64: _Config(16, 32, 8, 1), 128: _Config(16, 16, 8, 1)},
    "dkdv": {32: _Config(16, 64, 8, 1), 64: _Config(16, 64, 8, 1), 128: _Config(16, 16, 8, 1),
             256: _Config(16, 16, 8, 1)},
    "dq": {32: _Config(64, 16, 8, 1), 64: _Config(64, 16, 8, 1), 128: _Config(16, 16, 8, 1),
           256: _Config(16, 16, 8, 1)},
}  # fmt: skip


def _family(device: torch.device) -> int:
    """The config family of a GPU: 90 on Hopper (wgmma), 80 on every other one."""
    arch = _arch(device)
    return 90 if arch is not None and arch // 10 == 9 else 80


def _has_fast(device: torch.device, bd: int, dtype: torch.dtype, interpret: bool) -> bool:
    """Whether the fast kernel serves these inputs: not where every config tried spilled (16-bit
    at head dim 128 on sm_90a: 36 bytes at 64 x 128 / 8 warps, more at the others; head dim
    256 everywhere); those run the deterministic kernels, whatever ``deterministic`` says."""
    if interpret:
        return True
    if dtype == torch.float32:
        return bd in _BWD_F32["fast"]
    return bd in _BWD["fast", _family(device)]


def _bwd_config(
    kernel: str, device: torch.device, bd: int, dtype: torch.dtype, interpret: bool, left: bool
) -> _Config:
    """The launch config of ``kernel`` ("fast", "dkdv" or "dq"); a left window bound caps the
    key-block kernels at 2 stages (a window's key block meets few query blocks, and 3 stages
    spilled on sm_90 under Triton 3.6) and the 16-bit dq kernel on sm_80 at 32 keys per
    step."""
    if interpret:
        return _INTERPRET_CONFIG
    if dtype == torch.float32:
        cfg = _BWD_F32[kernel][bd]
    else:
        cfg = _BWD[kernel, _family(device)][bd]
    if left and kernel != "dq":
        cfg = cfg._replace(num_stages=min(cfg.num_stages, 2))
    if left and kernel == "dq" and dtype != torch.float32 and _family(device) == 80:
        # 16-bit dq with a left bound on sm_80: 64 keys per step spilled 16 bytes at head dim
        # 64 under Triton 3.6 (255 registers; 190 under 3.8); 32 keep it near 180 under both
        cfg = cfg._replace(block_n=min(cfg.block_n, 32))
    return cfg


# fmt: off
@triton.jit
def _q_len(seqlens_q, i_b, T, HAS_SEQLENS_Q: tl.constexpr):
    """Real query rows of dense batch entry i_b: seqlens_q[b] clamped to [0, T] (T without
    seqlens_q). Rows past it are padding: no gradient, never loaded, their blocks skipped."""
    if HAS_SEQLENS_Q:
        return tl.minimum(tl.maximum(tl.load(seqlens_q + i_b), 0), T)
    else:
        return T


@triton.jit
def _attn_bwd_preprocess_kernel(
    o, do, delta, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_lb, stride_lh,
    T, S,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_SEQLENS_Q: tl.constexpr,
    ROW64: tl.constexpr,
):
    """delta = rowsum(do * o) in fp32, rows [0, n_q) of each (sequence, head); padded query
    rows (seqlens_q) are not written (no kernel reads them)."""
    i_m, i_b, i_h, bos_q, bos_k, T, S, n_valid = _program(
        T, S, seqlens_k, cu_seqlens_q, cu_seqlens_k, H, IS_VARLEN, HAS_SEQLENS
    )
    n_q = _q_len(seqlens_q, i_b, T, HAS_SEQLENS_Q)
    start_m = i_m * BM
    if start_m >= n_q:
        return
    r_m = tl.arange(0, BM)
    o_m = start_m + r_m
    o_d = tl.arange(0, BD)
    m_m = o_m < n_q
    m_md = m_m[:, None] & (o_d < D)[None, :]
    i_b64 = i_b.to(tl.int64)
    p_o = _at(o, i_b64, bos_q, i_h, stride_ob, stride_ot, stride_oh, ROW64)
    p_do = _at(do, i_b64, bos_q, i_h, stride_dob, stride_dot, stride_doh, ROW64)
    # [BM, BD]
    b_o = tl.load(p_o + _rows(start_m, r_m, stride_ot, ROW64) + o_d[None, :], mask=m_md,
                  other=0.0)
    b_do = tl.load(p_do + _rows(start_m, r_m, stride_dot, ROW64) + o_d[None, :], mask=m_md,
                   other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(_at(delta, i_b64, bos_q, i_h, stride_lb, 1, stride_lh, ROW64) + o_m, b_delta,
             mask=m_m)


@triton.jit
def _attn_bwd_dkdv_inner(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, p_dqa, stride_qt,
                         stride_dot, stride_dqat, o_n, o_d, lo, hi, skip_at, skip, n_valid, n_q,
                         lo_off, hi_off, qk_scale, sm_scale, D: tl.constexpr, BM: tl.constexpr,
                         MASK: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                         DQ_ATOMIC: tl.constexpr, INTERPRET: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, ROW64: tl.constexpr):
    # Query rows past n_q (the tensor's end, or seqlens_q's padding) load zeros (q, do, lse,
    # delta), so their p is finite and their dp and delta are 0: they add nothing to dk, dv or
    # dq even where no mask is applied; their dq rows are never written.
    m_d = o_d < D
    r_m = tl.arange(0, BM)
    for i_m in range(lo, hi, BM):
        start_m = _skip(i_m, skip_at, skip, MASK and LEFT)
        o_m = start_m + r_m
        m_m = o_m < n_q
        # [BM, BD]
        b_q = _load(p_q + _rows(start_m, r_m, stride_qt, ROW64), m_m[:, None] & m_d[None, :],
                    INTERPRET)
        b_do = _load(p_do + _rows(start_m, r_m, stride_dot, ROW64), m_m[:, None] & m_d[None, :],
                     INTERPRET)
        # [BM]
        b_lse = _lse_log2(p_lse + o_m, m_m)
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
        # [BN, BM]: the transposed scores, so dv and dk need no transpose of p
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * qk_scale
        b_pt = tl.exp2(b_st - b_lse[None, :])
        if MASK:
            m_s = _visible(o_m[None, :], o_n[:, None], n_valid, lo_off, hi_off, LEFT,
                           RIGHT) & m_m[None, :]
            b_pt = tl.where(m_s, b_pt, 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
        # [BN, BM]
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
        b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(b_q.dtype)
        b_dk += tl.dot(b_dst, b_q, input_precision=DOT_PRECISION)
        if DQ_ATOMIC:
            # [BM, BD]: this key block's share of dq, added to the fp32 accumulator in L2
            # (fire-and-forget reductions, no value returned); the order of the adds varies
            # run to run, hence not bit-reproducible
            b_dq = tl.dot(tl.trans(b_dst), b_k, input_precision=DOT_PRECISION) * sm_scale
            tl.atomic_add(p_dqa + _rows(start_m, r_m, stride_dqat, ROW64), b_dq,
                          mask=m_m[:, None] & m_d[None, :], sem="relaxed")
    return b_dk, b_dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, dqa, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    stride_dqab, stride_dqat, stride_dqah, stride_lb, stride_lh,
    T, S, qk_scale, sm_scale, win_left, win_right,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_SEQLENS_Q: tl.constexpr,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW64: tl.constexpr,
):
    """dk, dv of one key block (and, DQ_ATOMIC, its share of dq into the fp32 ``dqa``)."""
    i_n, i_b, i_hk, bos_q, bos_k, T, S, n_valid = _program(
        T, S, seqlens_k, cu_seqlens_q, cu_seqlens_k, HKV, IS_VARLEN, HAS_SEQLENS
    )
    start_n = i_n * BN
    if start_n >= S:
        return
    n_q = _q_len(seqlens_q, i_b, T, HAS_SEQLENS_Q)
    lo_off = S - T - win_left
    hi_off = S - T + win_right
    r_n = tl.arange(0, BN)
    o_n = start_n + r_n
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    i_b64 = i_b.to(tl.int64)
    p_k = _at(k, i_b64, bos_k, i_hk, stride_kb, stride_kt, stride_kh, ROW64) + o_d[None, :]
    p_v = _at(v, i_b64, bos_k, i_hk, stride_vb, stride_vt, stride_vh, ROW64) + o_d[None, :]
    # [BN, BD]
    b_k, b_v = _kv_block(p_k, p_v, start_n, r_n, stride_kt, stride_vt, n_valid, m_d, True,
                         INTERPRET, ROW64)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)

    # Query rows [lo, hi) see some of these keys, rows [m_full, m_end) all of them (whole
    # blocks, no mask); [lo, m_full) and (LEFT only) [m_end, hi) are masked. A block past the
    # valid keys is skipped whole and writes zeros; one that straddles n_valid is masked. The
    # query loops stop at n_q (seqlens_q): padded query blocks are never visited.
    lo = 0
    m_full = 0
    hi = tl.where(start_n < n_valid, n_q, 0)
    if RIGHT:
        lo = tl.maximum(start_n - hi_off, 0) // BM * BM
        m_full = (tl.maximum(start_n + BN - 1 - hi_off, 0) + BM - 1) // BM * BM
    if LEFT:
        hi = tl.minimum(hi, tl.maximum(start_n + BN - lo_off, 0))
    lo = tl.minimum(lo, hi // BM * BM)
    m_full = tl.minimum(tl.where(start_n + BN <= n_valid, m_full, hi), hi)
    m_end = hi
    m_stop = m_full  # where the masked loop stops (LEFT: its steps past m_full jump to m_end)
    if LEFT:
        # rows [m_full, m_end) see the whole block: from the first row that sees its last key
        # (RIGHT) to the last row that sees its first key (LEFT), whole BM blocks, so that the
        # masked steps (lo.. then m_end..) and the unmasked ones never visit a row twice
        m_full = tl.maximum(m_full, lo)
        m_end = tl.where(start_n + BN <= n_valid,
                         tl.maximum(tl.minimum(tl.maximum(start_n + 1 - lo_off, 0) // BM * BM,
                                               hi), m_full), m_full)
        m_stop = hi - (m_end - m_full)
    for i_g in range(G):
        i_h = i_hk * G + i_g
        p_q = _at(q, i_b64, bos_q, i_h, stride_qb, stride_qt, stride_qh, ROW64) + o_d[None, :]
        p_do = (_at(do, i_b64, bos_q, i_h, stride_dob, stride_dot, stride_doh, ROW64)
                + o_d[None, :])
        if DQ_ATOMIC:
            p_dqa = (_at(dqa, i_b64, bos_q, i_h, stride_dqab, stride_dqat, stride_dqah, ROW64)
                     + o_d[None, :])
        else:  # dqa is None (never touched)
            p_dqa = p_q
        p_lse = _at(lse, i_b64, bos_q, i_h, stride_lb, 1, stride_lh, ROW64)
        p_delta = _at(delta, i_b64, bos_q, i_h, stride_lb, 1, stride_lh, ROW64)
        # [m_full, m_end) unmasked first, then [lo, m_full) and (LEFT) [m_end, hi) masked in
        # one loop: the order is ptxas' register budget, not arithmetic (masked first spilled
        # 40 bytes in the causal fast kernel on sm_90a, and 16 bytes at 16-bit head dim 128
        # in the deterministic one on sm_90a under Triton 3.6)
        b_dk, b_dv = _attn_bwd_dkdv_inner(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta,
                                          p_dqa, stride_qt, stride_dot, stride_dqat, o_n, o_d,
                                          m_full, m_end, 0, 0, n_valid, n_q, lo_off, hi_off,
                                          qk_scale, sm_scale, D, BM, False, LEFT, RIGHT,
                                          DQ_ATOMIC, INTERPRET, DOT_PRECISION, ROW64)
        b_dk, b_dv = _attn_bwd_dkdv_inner(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta,
                                          p_dqa, stride_qt, stride_dot, stride_dqat, o_n, o_d,
                                          lo, m_stop, m_full, m_end - m_full, n_valid, n_q,
                                          lo_off, hi_off, qk_scale, sm_scale, D, BM, True, LEFT,
                                          RIGHT, DQ_ATOMIC, INTERPRET, DOT_PRECISION, ROW64)

    m_store = (o_n < S)[:, None] & m_d[None, :]
    p_dk = _at(dk, i_b64, bos_k, i_hk, stride_dkb, stride_dkt, stride_dkh, ROW64)
    p_dv = _at(dv, i_b64, bos_k, i_hk, stride_dvb, stride_dvt, stride_dvh, ROW64)
    tl.store(p_dk + _rows(start_n, r_n, stride_dkt, ROW64) + o_d[None, :],
             (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_store)
    tl.store(p_dv + _rows(start_n, r_n, stride_dvt, ROW64) + o_d[None, :],
             b_dv.to(dv.dtype.element_ty), mask=m_store)


@triton.jit
def _attn_bwd_dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, stride_kt, stride_vt, o_m, o_d,
                       lo, hi, n_valid, lo_off, hi_off, qk_scale, D: tl.constexpr,
                       BN: tl.constexpr, MASK: tl.constexpr, LEFT: tl.constexpr,
                       RIGHT: tl.constexpr, INTERPRET: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, ROW64: tl.constexpr):
    m_d = o_d < D
    r_n = tl.arange(0, BN)
    for start_n in range(lo, hi, BN):
        o_n = start_n + r_n
        # [BN, BD]
        b_k, b_v = _kv_block(p_k, p_v, start_n, r_n, stride_kt, stride_vt, n_valid, m_d, MASK,
                             INTERPRET, ROW64)
        # [BM, BN]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
        b_p = tl.exp2(b_s - b_lse[:, None])
        if MASK:
            m_s = _visible(o_m[:, None], o_n[None, :], n_valid, lo_off, hi_off, LEFT, RIGHT)
            b_p = tl.where(m_s, b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        # [BM, BD]
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
    return b_dq


@triton.jit
def _attn_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lh,
    T, S, qk_scale, sm_scale, win_left, win_right,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_SEQLENS_Q: tl.constexpr,
    LEFT: tl.constexpr, RIGHT: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW64: tl.constexpr,
):
    """dq of one query block (the deterministic path: no atomics)."""
    i_m, i_b, i_h, bos_q, bos_k, T, S, n_valid = _program(
        T, S, seqlens_k, cu_seqlens_q, cu_seqlens_k, H, IS_VARLEN, HAS_SEQLENS
    )
    start_m = i_m * BM
    if start_m >= T:
        return
    n_q = _q_len(seqlens_q, i_b, T, HAS_SEQLENS_Q)
    lo_off = S - T - win_left
    hi_off = S - T + win_right
    r_m = tl.arange(0, BM)
    o_m = start_m + r_m
    o_d = tl.arange(0, BD)
    m_m = o_m < n_q
    m_md = m_m[:, None] & (o_d < D)[None, :]
    i_b64 = i_b.to(tl.int64)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    if start_m < n_q:  # a block of padded query rows (seqlens_q) computes nothing: zeros
        p_q = _at(q, i_b64, bos_q, i_h, stride_qb, stride_qt, stride_qh, ROW64)
        p_do = _at(do, i_b64, bos_q, i_h, stride_dob, stride_dot, stride_doh, ROW64)
        p_k = (_at(k, i_b64, bos_k, i_h // G, stride_kb, stride_kt, stride_kh, ROW64)
               + o_d[None, :])
        p_v = (_at(v, i_b64, bos_k, i_h // G, stride_vb, stride_vt, stride_vh, ROW64)
               + o_d[None, :])
        # [BM, BD]
        b_q = _load(p_q + _rows(start_m, r_m, stride_qt, ROW64) + o_d[None, :], m_md,
                    INTERPRET)
        b_do = _load(p_do + _rows(start_m, r_m, stride_dot, ROW64) + o_d[None, :], m_md,
                     INTERPRET)
        # [BM]
        b_lse = _lse_log2(_at(lse, i_b64, bos_q, i_h, stride_lb, 1, stride_lh, ROW64) + o_m, m_m)
        b_delta = tl.load(_at(delta, i_b64, bos_q, i_h, stride_lb, 1, stride_lh, ROW64) + o_m,
                          mask=m_m, other=0.0)

        # The same key ranges as the forward, clipped to the block's real rows: [lo, a)
        # masked (LEFT), [b, hi) masked, then [a, b) unmasked. The order is ptxas' register
        # budget at 255 on sm_80, not arithmetic: the masked blocks first kept every variant
        # free of spills under Triton 3.6 and 3.8 (unmasked before [b, hi) spilled 24 bytes at
        # fp32 head dim 64 under 3.6).
        lo, a, b, hi = _key_range(start_m, n_q, n_valid, lo_off, hi_off, BM, BN, LEFT, RIGHT)
        if LEFT:
            b_dq = _attn_bwd_dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, stride_kt,
                                      stride_vt, o_m, o_d, lo, a, n_valid, lo_off, hi_off,
                                      qk_scale, D, BN, True, LEFT, RIGHT, INTERPRET,
                                      DOT_PRECISION, ROW64)
        b_dq = _attn_bwd_dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, stride_kt,
                                  stride_vt, o_m, o_d, b, hi, n_valid, lo_off, hi_off, qk_scale,
                                  D, BN, True, LEFT, RIGHT, INTERPRET, DOT_PRECISION, ROW64)
        b_dq = _attn_bwd_dq_inner(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, stride_kt,
                                  stride_vt, o_m, o_d, a, b, n_valid, lo_off, hi_off, qk_scale,
                                  D, BN, False, LEFT, RIGHT, INTERPRET, DOT_PRECISION, ROW64)
        # padded rows of a block that straddles n_q: zeros, whatever v holds
        b_dq = tl.where(m_m[:, None], b_dq * sm_scale, 0.0)

    p_dq = _at(dq, i_b64, bos_q, i_h, stride_dqb, stride_dqt, stride_dqh, ROW64)
    tl.store(p_dq + _rows(start_m, r_m, stride_dqt, ROW64) + o_d[None, :],
             b_dq.to(dq.dtype.element_ty), mask=(o_m < T)[:, None] & (o_d < D)[None, :])
# fmt: on


def attention_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    seqlens_k: Tensor | None = None,
    seqlens_q: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    scale: float,
    deterministic: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_forward`.

    Args:
        do: gradient of out, out's shape (cast to q's dtype if it differs).
        q, k, v, seqlens_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            window_size, scale: exactly as given to :func:`attention_forward`.
        out: the forward output.
        lse: the forward log-sum-exp (fp32, dense [B, Hq, T] or varlen [Hq, total_q]; any
            strides).
        seqlens_q: dense only, optional int32 [B]: query rows t >= seqlens_q[b] are padding
            (values clamped to [0, T]): dq 0 there, they add nothing to dk/dv, and their
            blocks are skipped (never loaded: out, lse and do may hold anything there).
        deterministic: True: separate dQ and dK/dV kernels, no atomics, bit-identical run to
            run (7 GEMMs per tile); False: one kernel per key block, dq accumulated by fp32
            atomics (5 GEMMs, faster); None (default): True exactly when
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        (dq, dk, dv) with the shapes and dtypes of q, k, v (contiguous). Padded keys, padded
        queries and rows that see no key get zero gradients.

    Raises:
        ValueError: inconsistent shapes, dtypes, devices or offsets (naming the argument);
            seqlens_q with varlen inputs.
    """
    do, q, k, v, out = (_last_dim_contiguous(t) for t in (do.to(q.dtype), q, k, v, out))
    lay, seqlens_k, cu_seqlens_q, cu_seqlens_k = _layout(
        q, k, v, seqlens_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    if seqlens_q is not None:
        if lay.varlen:
            raise ValueError("seqlens_q: dense only (varlen lengths come from cu_seqlens_q)")
        seqlens_q = _offsets("seqlens_q", seqlens_q, lay.n_seq, q.device)
    for name, t in (("do", do), ("out", out)):
        if t.shape != q.shape or t.device != q.device:
            raise ValueError(
                f"{name}: expected q's shape {tuple(q.shape)} on {q.device}, got "
                f"{tuple(t.shape)} on {t.device}"
            )
    want = (lay.Hq, lay.rows_q) if lay.varlen else (lay.n_seq, lay.Hq, lay.T)
    if lse.dtype != torch.float32 or tuple(lse.shape) != want or lse.device != q.device:
        raise ValueError(
            f"lse: expected float32 {want} on {q.device}, got {lse.dtype} "
            f"{tuple(lse.shape)} on {lse.device}"
        )
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    elif not isinstance(deterministic, bool):
        raise ValueError(f"deterministic: expected a bool or None, got {deterministic!r}")
    lse = lse.contiguous()  # the kernels index its rows with stride 1
    interpret = interpreting(q)
    bd = triton.next_power_of_2(lay.D)
    deterministic = deterministic or not _has_fast(q.device, bd, q.dtype, interpret)
    G = lay.Hq // lay.Hkv
    masking = dict(
        IS_VARLEN=lay.varlen, HAS_SEQLENS=seqlens_k is not None,
        HAS_SEQLENS_Q=seqlens_q is not None,
    )  # fmt: skip
    win_left, win_right, left, right = _window(causal, window_size, lay)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return dq.zero_(), dk.zero_(), dv.zero_()
    # the fast path's fp32 dq accumulator (contiguous, zeros: padded rows stay 0); the
    # deterministic path writes dq directly
    dqa = None if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    row64 = _row64(lay.varlen, lse, q, k, v, do, *([] if dqa is None else [dqa]))
    kernel_flags = dict(
        **masking, LEFT=left, RIGHT=right, INTERPRET=interpret,
        DOT_PRECISION=_dot_precision(q.dtype), ROW64=row64,
    )  # fmt: skip
    delta = torch.empty_like(lse)
    lse_strides = _lse_strides(lse, lay.varlen)
    scales = (scale * _LOG2E, scale, win_left, win_right)

    cfg_dq = _bwd_config("dq", q.device, bd, q.dtype, interpret, left)
    launch(
        _attn_bwd_preprocess_kernel, (triton.cdiv(lay.T, cfg_dq.block_m), lay.n_seq * lay.Hq),
        out, do, delta, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k,
        *_strides(lay.varlen, out, do), *lse_strides,
        lay.rows_q, lay.rows_k,
        H=lay.Hq, D=lay.D, BD=bd, BM=cfg_dq.block_m, **masking, ROW64=row64,
    )  # fmt: skip
    if deterministic:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        launch(
            _attn_bwd_dq_kernel, (triton.cdiv(lay.T, cfg_dq.block_m), lay.n_seq * lay.Hq),
            q, k, v, do, lse, delta, dq, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k,
            *_strides(lay.varlen, q, k, v, do, dq), *lse_strides,
            lay.rows_q, lay.rows_k, *scales,
            H=lay.Hq, G=G, D=lay.D, BD=bd, BM=cfg_dq.block_m, BN=cfg_dq.block_n,
            **kernel_flags, num_warps=cfg_dq.num_warps, num_stages=cfg_dq.num_stages,
        )  # fmt: skip
    cfg = _bwd_config("dkdv" if deterministic else "fast", q.device, bd, q.dtype, interpret, left)
    launch(
        _attn_bwd_dkdv_kernel, (triton.cdiv(lay.S, cfg.block_n), lay.n_seq * lay.Hkv),
        q, k, v, do, lse, delta, dk, dv, dqa, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k,
        *_strides(lay.varlen, q, k, v, do, dk, dv, q if dqa is None else dqa), *lse_strides,
        lay.rows_q, lay.rows_k, *scales,
        HKV=lay.Hkv, G=G, D=lay.D, BD=bd, BM=cfg.block_m, BN=cfg.block_n,
        DQ_ATOMIC=not deterministic, **kernel_flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not deterministic:
        dq = dqa if q.dtype == torch.float32 else dqa.to(q.dtype)
    return dq, dk, dv
