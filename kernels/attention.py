"""Flash attention for the VL-JEPA predictor: GQA, key padding, packed varlen, causal or not,
sliding (local) windows.

Math. For one (sequence, query head h) with KV head h // G (G = Hq / Hkv query heads per KV head):
    s = scale * q k^T,  p = softmax(s) over the valid keys,  o = p v,  lse = log sum_j exp(s_j).
Forward (online softmax): walk the KV blocks keeping, per query row, the running max m, the
running sum l of exp(s - m) and the unnormalised output acc; a new block with max m' rescales l
and acc by exp(m - m'). All of it in base 2: exp(x) = exp2(x * log2(e)), and log2(e) is folded
into the score scale; the row max is taken on the unscaled scores (scale > 0) so that each score
costs one fused multiply-add, s * scale - m, and one exp2 (MUFU is the ceiling at head dim 64).
out = acc / l, lse = (m + log2 l) * ln 2 (natural log, like flash-attn).
Backward, with delta = rowsum(do * o) (= rowsum(p * dp)):
    p = exp2(s * log2e - lse * log2e),  dv = p^T do,  dp = do v^T,  ds = p (dp - delta),
    dq = scale * ds k,  dk = scale * ds^T q.

Memory. Nothing of size T x S is ever stored: the forward keeps one [BM, BN] score tile in
registers and saves only lse ([B, Hq, T] fp32); the backward recomputes p from lse. GQA indexes the
KV head (h // G) instead of repeating K and V. Key padding is a per-sequence length: KV blocks
past it are skipped, not computed and masked. Masks are evaluated only on the blocks
that need them (the last partial block, the causal diagonal, the window's two edges): every loop
runs over the fully visible blocks without masks and the few blocks at its ends with them.

Forward on the GPU (what FA3 does, as far as Triton allows).
* GQA packing: one program serves GP query heads of a KV group (GP = 4 for the predictor's
  32:8): tile row r is query token start + r // GP of head h0 + r % GP, so a K/V block is read
  once for GP heads and the products keep BM = 128 rows.
* Query padding (``seqlens_q``, the predictor's padded queries, T = S): a block of padded
  queries stores zeros and returns, a partial block computes its real rows; a padded batch
  costs its real tokens.
* Tiles: a per-arch table. Hopper, 16-bit, head dim 64: 128 x 128 in two warpgroups (every
  product a 64-row wgmma, 128 or 64 wide), 3 stages, K/V of the unmasked blocks read by TMA
  descriptors; sm_80: 128 x 64, 4 warps (mma.sync). Compile checks (tests, compile tier): no
  spills on sm_80 and sm_90a under Triton 3.6 and 3.8.
* Not reachable from Triton 3.6/3.8 on Hopper: FA3's intra-warpgroup overlap (the next q k^T
  in flight during the softmax, wgmma.wait_group 1). Triton makes a wgmma asynchronous only when
  its result feeds back solely as the same product's accumulator; here the softmax reads s at
  once and rescales acc, so every wait is wait_group 0 (a hand-pipelined loop was tried: still 0,
  and 30 more registers). Triton's warp specialisation is Blackwell-only. The overlap left is
  the warp schedulers': the two warpgroups of a CTA interleave one's softmax with the other's
  products. The CUDA C++ backend (csrc/include/attention_kernels.h) is where FA3's pipelining
  belongs.
Cost (the predictor at B = 8, T = S = 4608, 32:8 heads, D = 64; a prediction from the code, no
GPU measured): 4 B Hq T S D = 1.39 TFLOP of products, B Hq T S = 5.4 G exp2; on an H200 (132
SMs, 16 exp2 / clock / SM at 1.83 GHz, about 790 TFLOP/s bf16 dense) the products alone take
1.8 ms and the exp2s 1.4 ms, the other per-score work (max, FMA, sum, casts, about 5 fp32 ops)
0.9 ms: 1.8 ms if the schedulers hid all the softmax behind the products, 4.1 ms if nothing
overlapped, so 340-770 TFLOP/s, likely near the low end of that range without FA3's explicit
overlap. HBM traffic, q + o + k + v = 0.38 GB, is 0.08 ms at 4.8 TB/s: compute bound.

Sliding window (flash-attn's window_size = (left, right), -1 unbounded): query i sees key j
only if i + S - T - left <= j <= i + S - T + right; causal is the right bound 0. Runtime
bounds with constexpr flags (LEFT, RIGHT), so one compiled variant serves every window size.
Every loop's range is clipped to the window: a query block [m, m + BM) visits only the key
blocks that meet [m + S - T - left, m + BM - 1 + S - T + right], and a key block only the query
blocks that see it, in both passes of the backward. Blocks wholly outside the window are never
loaded, so with both bounds finite time and traffic are O(T * (left + right + BM + BN)) per
head, not O(T * S): the masked edge blocks (two per block at most) are the only cost beyond the
window itself; with one bound -1 the clipping still skips the blocks past the other one.

Backward: kernels/attention_bwd.py (its header: the fast path with dQ by atomics and the
deterministic one).

Conventions. Dense: q [B, T, Hq, D], k/v [B, S, Hkv, D]; varlen: q [total_q, Hq, D], k/v
[total_k, Hkv, D] with int32 cu_seqlens. Causal masks and windows are bottom-right aligned as in
flash-attn >= 2.1: query i sees key j iff j <= i + (S - T); dense uses the tensor lengths T and S
(key padding is a mask applied on top), varlen the lengths of each sequence. A query row that
sees no key (zero keys, causal with T > S, a window holding only padding) gets out = 0 and
lse = -inf, and zero gradients.

Non-finite inputs. The running max starts at the lowest finite fp32, so the softmax is the plain
one for scores of any size: a NaN or +inf score, or a row whose every score is -inf, makes that
row NaN (out and lse), as eager softmax does. Padded keys (past seqlens_k, outside a varlen
sequence) are loaded as zeros and never reach a dot. With causal or a window, a non-finite value
in a real key's v row can reach rows of the same tile that the mask hides it from (0 * NaN in
p v); blocks outside every row's window are never loaded, so it reaches no farther.

Memory safety. Launchers copy strided offsets (cu_seqlens, seqlens_k) contiguous and check their
sizes; the kernels clamp every varlen sequence to [0, total_q) x [0, total_k) and compute row
offsets in int64 when an offset inside one batch entry can pass int32 (ROW64), so no input
reaches memory outside its tensor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpreting, launch

try:  # Triton >= 3.4 (the GPU machine's 3.6 and this repo's 3.8 both have it)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

__all__ = ["HEAD_DIMS", "attention_backward", "attention_forward"]

#: Supported head dims; 96 runs in a 128-wide block with masked columns.
HEAD_DIMS = (32, 64, 96, 128, 256)

_LOG2E = math.log2(math.e)


class _Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Per padded head dim, the forward on every GPU but Hopper at 16 bits (block_m = query rows per
# program, block_n = keys per inner step; the backward's tables are in attention_bwd.py). Every
# entry compiles for sm_80 without ptxas spills (tests, compile tier).
_FWD = {
    32: _Config(128, 64, 4, 3),
    # 8 warps: at 4 the packed rows' index arithmetic left the varlen-window variant at 255
    # registers and 8-24 bytes of spills on sm_80
    64: _Config(128, 64, 8, 3),
    128: _Config(128, 64, 8, 3),
    256: _Config(64, 64, 8, 2),
}
# Hopper, 16-bit: FA3's tile at head dim 64 (128 x 128, two warpgroups of 64 query rows each,
# so every product is a 64-row wgmma at least 64 wide); head dim 128 keeps BN = 64 (128 x 128
# uses 242 registers). Head dim 256 fits only 64 x 64 over two warpgroups, which split q k^T into
# 64 x 32 products (every 128-row or one-warpgroup tile spilled 16-248 bytes or passed the
# 227 KB of shared memory); head dim 32's p v is 32 wide by definition.
_FWD_SM90 = {
    32: _Config(128, 128, 8, 3),
    64: _Config(128, 128, 8, 3),
    128: _Config(128, 64, 8, 3),
    256: _Config(64, 64, 8, 2),
}
# The interpreter runs every program in numpy: small blocks keep several blocks per sequence in
# the tests (boundaries, skipping) at tiny shapes, and BM != BN catches swapped block roles.
_INTERPRET_CONFIG = _Config(32, 64, 1, 1)


# Kernel arguments are grouped by role on a line: one per line would triple the file.
# fmt: off
@triton.jit
def _seq_bounds(i_b, T, S, seqlens_k, cu_seqlens_q, cu_seqlens_k, IS_VARLEN: tl.constexpr,
                HAS_SEQLENS: tl.constexpr):
    """(first q row, first k row, query rows, key rows, valid keys) of sequence i_b.

    Dense: T, S are the tensor lengths. Varlen: T, S are the row counts of the packed q and k
    (total_q, total_k), and every sequence is clamped into [0, total): whatever cu_seqlens hold,
    no row outside the tensors is ever read or written.
    """
    if IS_VARLEN:
        bos_q = tl.minimum(tl.maximum(tl.load(cu_seqlens_q + i_b), 0), T)
        bos_k = tl.minimum(tl.maximum(tl.load(cu_seqlens_k + i_b), 0), S)
        T = tl.minimum(tl.maximum(tl.load(cu_seqlens_q + i_b + 1), bos_q), T) - bos_q
        S = tl.minimum(tl.maximum(tl.load(cu_seqlens_k + i_b + 1), bos_k), S) - bos_k
        n_valid = S
    else:
        bos_q = i_b * 0
        bos_k = i_b * 0
        if HAS_SEQLENS:
            n_valid = tl.minimum(tl.maximum(tl.load(seqlens_k + i_b), 0), S)
        else:
            n_valid = S
    return bos_q.to(tl.int64), bos_k.to(tl.int64), T, S, n_valid


@triton.jit
def _rows(start, r, stride, ROW64: tl.constexpr):
    """[len(r), 1] offsets of rows start + r; int64 when rows x stride may pass 2**31 - 1."""
    if ROW64:
        return tl.cast(start, tl.int64) * stride + r[:, None] * stride
    else:
        return (start + r)[:, None] * stride


@triton.jit
def _head(i_h, stride, ROW64: tl.constexpr):
    """Offset of head i_h (a tensor's head stride, or lse's); int64 when it may pass 2**31 - 1."""
    if ROW64:
        return i_h.to(tl.int64) * stride
    else:
        return i_h * stride


@triton.jit
def _at(x, i_b64, bos, i_h, stride_b, stride_t, stride_h, ROW64: tl.constexpr):
    """Pointer to row ``bos`` of head ``i_h`` of batch entry ``i_b64`` of ``x``."""
    return x + i_b64 * stride_b + bos * stride_t + _head(i_h, stride_h, ROW64)


@triton.jit
def _program(T, S, seqlens_k, cu_seqlens_q, cu_seqlens_k, H: tl.constexpr,
             IS_VARLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr):
    """(block index, sequence, head, then :func:`_seq_bounds`) of this program: axis 0 walks
    the blocks of a sequence, axis 1 the (sequence, head) pairs, H heads per sequence."""
    i_blk, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    bos_q, bos_k, T, S, n_valid = _seq_bounds(
        i_b, T, S, seqlens_k, cu_seqlens_q, cu_seqlens_k, IS_VARLEN, HAS_SEQLENS
    )
    return i_blk, i_b, i_h, bos_q, bos_k, T, S, n_valid


@triton.jit
def _load(p, mask, INTERPRET: tl.constexpr):
    """A tile, zeros where masked (so that garbage past the rows, even NaN, never reaches a
    dot); fp32 under the interpreter, whose bf16 dot is wrong."""
    b = tl.load(p, mask=mask, other=0.0)
    if INTERPRET:
        b = b.to(tl.float32)
    return b


@triton.jit
def _kv_block(p_k, p_v, start_n, r_n, stride_kt, stride_vt, n_valid, m_d, MASK: tl.constexpr,
              INTERPRET: tl.constexpr, ROW64: tl.constexpr):
    """Keys and values [BN, BD] of the block at start_n (``p_k``/``p_v`` point at the
    sequence's first row, columns included); MASK: rows past n_valid load zeros."""
    if MASK:
        m_kv = (start_n + r_n < n_valid)[:, None] & m_d[None, :]
    else:
        m_kv = (start_n + r_n >= 0)[:, None] & m_d[None, :]
    b_k = _load(p_k + _rows(start_n, r_n, stride_kt, ROW64), m_kv, INTERPRET)
    b_v = _load(p_v + _rows(start_n, r_n, stride_vt, ROW64), m_kv, INTERPRET)
    return b_k, b_v


@triton.jit
def _visible(o_q, o_k, n_valid, lo_off, hi_off, LEFT: tl.constexpr, RIGHT: tl.constexpr):
    """Which (query o_q, key o_k) pairs attend (o_q, o_k broadcast to the tile): real keys,
    with RIGHT key <= query + hi_off, with LEFT key >= query + lo_off (bottom-right aligned:
    hi_off = S - T + right, lo_off = S - T - left)."""
    m = o_k < n_valid
    if RIGHT:
        m = m & (o_k <= o_q + hi_off)
    if LEFT:
        m = m & (o_k >= o_q + lo_off)
    return m


@triton.jit
def _key_range(start_m, T, n_valid, lo_off, hi_off, BM: tl.constexpr, BN: tl.constexpr,
               LEFT: tl.constexpr, RIGHT: tl.constexpr):
    """(lo, a, b, hi), multiples of BN but hi: keys [lo, hi) hold every key visible to some
    query row of the block at start_m, and the whole blocks [a, b) are visible to every row of
    it (no mask needed); [lo, a) (LEFT only) and [b, hi) need the mask. lo <= a <= b."""
    hi = n_valid
    b = n_valid // BN * BN
    if RIGHT:
        hi = tl.maximum(tl.minimum(hi, tl.minimum(start_m + BM, T) + hi_off), 0)
        b = tl.minimum(b, tl.maximum(start_m + 1 + hi_off, 0) // BN * BN)
    lo = b * 0
    a = b * 0
    if LEFT:
        lo = tl.minimum(tl.maximum(start_m + lo_off, 0), hi) // BN * BN
        # the first whole block at or past the last row's first key, at most hi's block
        a = (tl.maximum(tl.minimum(start_m + BM, T) - 1 + lo_off, 0) + BN - 1) // BN * BN
        a = tl.maximum(tl.minimum(a, (hi + BN - 1) // BN * BN), lo)
        b = tl.maximum(b, a)
    return lo, a, b, hi


@triton.jit
def _skip(i, skip_at, skip, SPLIT: tl.constexpr):
    """Block start of loop step ``i``; SPLIT: one loop walks two ranges, [lo, skip_at) then
    [skip_at + skip, hi) (a window's two masked edges in the dK/dV kernel: one inlined loop
    body, not two, which kept its fp32 variant free of spills on sm_80)."""
    if SPLIT:
        return i + (i >= skip_at).to(tl.int32) * skip
    else:
        return i


@triton.jit
def _lse_log2(p, mask):
    """Log-sum-exp rows in log2 units; a row without keys (-inf) reads 0, so that its (masked)
    p stays finite."""
    b_lse = tl.load(p, mask=mask, other=0.0)
    return tl.where(b_lse == float("-inf"), 0.0, b_lse * 1.4426950408889634)


@triton.jit
def _softmax_step(b_acc, b_l, b_m, b_s, b_v, qk_scale, RAW_MAX: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax: b_s [BM, BN] holds the scores (unscaled when
    RAW_MAX, else already scaled to log2 units, masked entries -inf either way), b_m the running
    max in log2 units.

    RAW_MAX (scale > 0, every real call): the row max is taken on the unscaled scores and scaled
    once per row (scaling by a positive number commutes with max, rounding included), so each
    score costs one fused multiply-add, s * scale - m, and one exp2 (FA3's trick). Other scales
    (zero, negative) scale first, as a plain softmax does.
    The running max starts at the lowest finite fp32, below or at every finite score, so the
    softmax is the plain one for scores of any size, and a row whose scores are all -inf so far
    gives exp2(-inf - finite) = 0, never -inf - -inf = NaN. NaN and +inf scores make l NaN, as
    in plain math."""
    if RAW_MAX:
        sc = qk_scale
    else:
        sc = 1.0
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * sc)
    b_p = tl.exp2(b_s * sc - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    # [BM, BD]
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v,
                                              input_precision=DOT_PRECISION)
    return b_acc, b_l, b_m_new


@triton.jit
def _scores(b_q, b_k, qk_scale, RAW_MAX: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """[BM, BN] q k^T, scaled to log2 units unless RAW_MAX (see :func:`_softmax_step`)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    if not RAW_MAX:
        b_s = b_s * qk_scale
    return b_s


@triton.jit
def _attn_fwd_masked(b_acc, b_l, b_m, b_q, p_k, p_v, stride_kt, stride_vt, o_m, o_d, lo, hi,
                     n_valid, lo_off, hi_off, qk_scale, D: tl.constexpr, BN: tl.constexpr,
                     LEFT: tl.constexpr, RIGHT: tl.constexpr, RAW_MAX: tl.constexpr,
                     INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW64: tl.constexpr):
    """The key blocks [lo, hi) that need the mask (a partial last block, the causal diagonal, a
    window's edges): few per query block, so a plain loop."""
    m_d = o_d < D
    r_n = tl.arange(0, BN)
    for start_n in range(lo, hi, BN):
        o_n = start_n + r_n
        # [BN, BD]
        b_k, b_v = _kv_block(p_k, p_v, start_n, r_n, stride_kt, stride_vt, n_valid, m_d, True,
                             INTERPRET, ROW64)
        b_s = _scores(b_q, b_k, qk_scale, RAW_MAX, DOT_PRECISION)
        m_s = _visible(o_m[:, None], o_n[None, :], n_valid, lo_off, hi_off, LEFT, RIGHT)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_acc, b_l, b_m = _softmax_step(b_acc, b_l, b_m, b_s, b_v, qk_scale, RAW_MAX,
                                        DOT_PRECISION)
    return b_acc, b_l, b_m


@triton.jit
def _kv_tma(k_desc, v_desc, i_b, row, i_hk, BN: tl.constexpr, BD: tl.constexpr,
            IS_VARLEN: tl.constexpr, INTERPRET: tl.constexpr):
    """Keys and values [BN, BD] at key row ``row`` of KV head i_hk through TMA descriptors
    (dense: [B, S, Hkv, D] blocks [1, BN, 1, BD]; varlen: [total_k, Hkv, D] blocks [BN, 1, BD]):
    one bulk copy per tile, no address arithmetic in the threads. Only whole blocks of real
    keys are read this way (the full loop), so nothing of another sequence or of padding is."""
    if IS_VARLEN:
        b_k = k_desc.load([row, i_hk, 0]).reshape(BN, BD)
        b_v = v_desc.load([row, i_hk, 0]).reshape(BN, BD)
    else:
        b_k = k_desc.load([i_b, row, i_hk, 0]).reshape(BN, BD)
        b_v = v_desc.load([i_b, row, i_hk, 0]).reshape(BN, BD)
    if INTERPRET:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    return b_k, b_v


@triton.jit
def _attn_fwd_full(b_acc, b_l, b_m, b_q, p_k, p_v, k_desc, v_desc, stride_kt, stride_vt, o_d,
                   lo, hi, qk_scale, i_b, bos_k, i_hk, D: tl.constexpr, BD: tl.constexpr,
                   BN: tl.constexpr, RAW_MAX: tl.constexpr, TMA: tl.constexpr,
                   IS_VARLEN: tl.constexpr, INTERPRET: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, ROW64: tl.constexpr):
    """The whole, unmasked key blocks [lo, hi): no mask, no bounds checks on the loads (TMA on
    Hopper)."""
    m_d = o_d < D
    r_n = tl.arange(0, BN)
    for start_n in range(lo, hi, BN):
        if TMA:
            b_k, b_v = _kv_tma(k_desc, v_desc, i_b, (bos_k + start_n).to(tl.int32), i_hk, BN, BD,
                               IS_VARLEN, INTERPRET)
        else:
            b_k, b_v = _kv_block(p_k, p_v, start_n, r_n, stride_kt, stride_vt, hi, m_d, False,
                                 INTERPRET, ROW64)
        b_s = _scores(b_q, b_k, qk_scale, RAW_MAX, DOT_PRECISION)
        b_acc, b_l, b_m = _softmax_step(b_acc, b_l, b_m, b_s, b_v, qk_scale, RAW_MAX,
                                        DOT_PRECISION)
    return b_acc, b_l, b_m


@triton.jit
def _store_rows(o, lse, b_o, b_lse, i_b64, bos_q, h0, start_t, stride_ob, stride_ot, stride_oh,
                stride_lb, stride_lh, T, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
                GP: tl.constexpr, ROW64: tl.constexpr):
    """Store a packed tile's out [BM, BD] and lse [BM] rows (row r: token start_t + r // GP of
    head h0 + r % GP); pointers formed here so that none stays live across the key loop."""
    r_m = tl.arange(0, BM)
    o_m = start_t + r_m // GP
    o_g = r_m % GP
    o_d = tl.arange(0, BD)
    m_m = o_m < T
    p_o = (_at(o, i_b64, bos_q, h0, stride_ob, stride_ot, stride_oh, ROW64)
           + _rows(start_t, r_m // GP, stride_ot, ROW64) + (o_g * stride_oh)[:, None]
           + o_d[None, :])
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None] & (o_d < D)[None, :])
    p_lse = (_at(lse, i_b64, bos_q, h0, stride_lb, 1, stride_lh, ROW64) + o_m
             + _head(o_g, stride_lh, ROW64))
    tl.store(p_lse, b_lse, mask=m_m)


@triton.jit
def _attn_fwd_kernel(
    q, k, v, o, lse, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k, k_desc, v_desc,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
    T, S, qk_scale, win_left, win_right,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_QLENS: tl.constexpr,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, RAW_MAX: tl.constexpr, TMA: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW64: tl.constexpr,
):
    # GQA packing: a program serves GP query heads of one KV group (GP divides G) for TB = BM /
    # GP query tokens; tile row r is token start_t + r // GP of head h0 + r % GP, so each K/V
    # block is loaded once for GP heads and the products stay BM rows tall.
    TB: tl.constexpr = BM // GP
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, h0 = i_bh // (H // GP), i_bh % (H // GP) * GP
    bos_q, bos_k, T, S, n_valid = _seq_bounds(
        i_b, T, S, seqlens_k, cu_seqlens_q, cu_seqlens_k, IS_VARLEN, HAS_SEQLENS
    )
    start_t = i_m * TB
    if start_t >= T:
        return
    r_m = tl.arange(0, BM)
    o_m = start_t + r_m // GP  # each row's query token
    o_g = r_m % GP  # each row's head, relative to h0
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    i_b64 = i_b.to(tl.int64)
    # Query padding (seqlens_q): rows at or past the sequence's query length are not computed;
    # a block made only of them stores out 0, lse -inf and returns (it costs its stores).
    n_q = T
    if HAS_QLENS:
        n_q = tl.minimum(tl.maximum(tl.load(seqlens_q + i_b), 0), T)
    if start_t >= n_q:
        _store_rows(o, lse, tl.zeros([BM, BD], dtype=tl.float32),
                    tl.full([BM], float("-inf"), tl.float32), i_b64, bos_q, h0, start_t,
                    stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, T, D, BD, BM, GP,
                    ROW64)
        return
    lo_off = S - T - win_left
    hi_off = S - T + win_right

    p_q = _at(q, i_b64, bos_q, h0, stride_qb, stride_qt, stride_qh, ROW64)
    p_k = _at(k, i_b64, bos_k, h0 // G, stride_kb, stride_kt, stride_kh, ROW64) + o_d[None, :]
    p_v = _at(v, i_b64, bos_k, h0 // G, stride_vb, stride_vt, stride_vh, ROW64) + o_d[None, :]
    # [BM, BD]
    b_q = _load(p_q + _rows(start_t, r_m // GP, stride_qt, ROW64) + (o_g * stride_qh)[:, None]
                + o_d[None, :], (o_m < n_q)[:, None] & m_d[None, :], INTERPRET)

    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_m = tl.full([BM], -3.4028234663852886e38, dtype=tl.float32)

    # [lo, a) masked (LEFT only; else lo = a = 0), [a, b) unmasked, [b, hi) masked
    lo, a, b, hi = _key_range(start_t, T, n_valid, lo_off, hi_off, TB, BN, LEFT, RIGHT)
    if LEFT:
        b_acc, b_l, b_m = _attn_fwd_masked(b_acc, b_l, b_m, b_q, p_k, p_v, stride_kt, stride_vt,
                                           o_m, o_d, lo, a, n_valid, lo_off, hi_off, qk_scale, D,
                                           BN, LEFT, RIGHT, RAW_MAX, INTERPRET, DOT_PRECISION,
                                           ROW64)
    b_acc, b_l, b_m = _attn_fwd_full(b_acc, b_l, b_m, b_q, p_k, p_v, k_desc, v_desc, stride_kt,
                                     stride_vt, o_d, a, b, qk_scale, i_b, bos_k, h0 // G, D, BD,
                                     BN, RAW_MAX, TMA, IS_VARLEN, INTERPRET, DOT_PRECISION,
                                     ROW64)
    b_acc, b_l, b_m = _attn_fwd_masked(b_acc, b_l, b_m, b_q, p_k, p_v, stride_kt, stride_vt,
                                       o_m, o_d, b, hi, n_valid, lo_off, hi_off, qk_scale, D, BN,
                                       LEFT, RIGHT, RAW_MAX, INTERPRET, DOT_PRECISION, ROW64)

    # A row that attends to no key (key padding, causal with T > S, a window past the keys, a
    # padded query) gets out 0 and lse -inf, whatever q holds. A row that attends to some key
    # but has l = 0 (all its scores -inf) or l = NaN (a NaN or +inf score: non-finite q or k)
    # gets NaN, as plain softmax does.
    k_end = r_m * 0 + n_valid
    if RIGHT:
        k_end = tl.minimum(o_m + hi_off + 1, k_end)
    if LEFT:
        m_keys = tl.maximum(o_m + lo_off, 0) < k_end
    else:
        m_keys = k_end > 0
    m_keys = m_keys & (o_m < n_q)
    m_seen = b_l > 0.0
    b_l_safe = tl.where(m_seen, b_l, 1.0)
    b_o = tl.where((m_keys & m_seen)[:, None], b_acc / b_l_safe[:, None],
                   tl.where(m_keys, float("nan"), 0.0)[:, None])
    b_lse = tl.where(m_seen, (b_m + tl.log2(b_l_safe)) * 0.6931471805599453, float("nan"))
    b_lse = tl.where(m_keys, b_lse, float("-inf"))
    _store_rows(o, lse, b_o, b_lse, i_b64, bos_q, h0, start_t, stride_ob, stride_ot, stride_oh,
                stride_lb, stride_lh, T, D, BD, BM, GP, ROW64)


# fmt: on


class _Layout(NamedTuple):
    """How the launchers see dense and varlen inputs alike: (batch, rows, heads) strides."""

    varlen: bool
    n_seq: int
    T: int  # dense: query rows; varlen: max_seqlen_q (grid size only)
    S: int  # dense: key rows; varlen: max_seqlen_k (grid size only)
    Hq: int
    Hkv: int
    D: int
    # What the kernels get as T and S: dense, the lengths; varlen, the packed row counts
    # (total_q, total_k), the bounds every sequence is clamped to.
    rows_q: int
    rows_k: int


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(varlen: bool, *tensors: Tensor) -> tuple[int, ...]:
    """(batch, row, head) strides of each tensor in turn; varlen tensors are one packed batch
    row (batch stride 0)."""
    out: tuple[int, ...] = ()
    for t in tensors:
        out += (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))
    return out


def _offsets(name: str, t: Tensor | None, numel: int, device: torch.device) -> Tensor | None:
    """An int32 offsets tensor the kernels read as a contiguous array of ``numel`` entries.

    The kernels index it with plain pointer arithmetic, so a strided view (e.g. a column of a
    2-D tensor) is copied to a contiguous one here; a wrong size or dtype is refused.
    """
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != 1 or t.numel() != numel:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a 1-D int32 tensor of {numel} entries, got {got}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    return t.contiguous()


def _layout(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seqlens_k: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
) -> tuple[_Layout, Tensor | None, Tensor | None, Tensor | None]:
    """The layout, and (seqlens_k, cu_seqlens_q, cu_seqlens_k) made contiguous and checked."""
    varlen = cu_seqlens_q is not None
    if varlen:
        if cu_seqlens_k is None or max_seqlen_q is None or max_seqlen_k is None:
            raise ValueError("varlen attention needs cu_seqlens_q/k and max_seqlen_q/k")
        if seqlens_k is not None:
            raise ValueError("seqlens_k: dense only (varlen lengths come from cu_seqlens_k)")
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            raise ValueError("varlen q, k, v must be [total_tokens, heads, head_dim]")
        n_seq, T, S = cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k)
        rows_q, rows_k = q.shape[0], k.shape[0]
        cu_seqlens_q = _offsets("cu_seqlens_q", cu_seqlens_q, n_seq + 1, q.device)
        cu_seqlens_k = _offsets("cu_seqlens_k", cu_seqlens_k, n_seq + 1, q.device)
    else:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k: given without cu_seqlens_q")
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError("q, k, v must be [batch, seq, heads, head_dim]")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k: batch {k.shape[0]} differs from q's {q.shape[0]}")
        n_seq, T, S = q.shape[0], q.shape[1], k.shape[1]
        rows_q, rows_k = T, S
        seqlens_k = _offsets("seqlens_k", seqlens_k, n_seq, q.device)
    Hq, D, Hkv = q.shape[-2], q.shape[-1], k.shape[-2]
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    if k.shape[-1] != D:
        raise ValueError(f"k: head dim {k.shape[-1]} differs from q's {D}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported by the Triton kernel ({HEAD_DIMS})")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} not a multiple of key/value heads {Hkv}")
    lay = _Layout(varlen, n_seq, T, S, Hq, Hkv, D, rows_q, rows_k)
    return lay, seqlens_k, cu_seqlens_q, cu_seqlens_k


def _row64(varlen: bool, lse: Tensor, *tensors: Tensor) -> bool:
    """Whether an offset inside one batch entry (row x row stride, a block past the last row
    included, or head x head stride) can pass int32.

    Such inputs (about 2**31 elements in one batch entry of a tensor; varlen: in the packed
    tensor) get kernels that compute these offsets in int64; all others keep the cheaper int32
    inner loops. Batch and sequence-start offsets are int64 always.
    """
    dim = 0 if varlen else 1
    limit = 2**31 - 1
    for t in tensors:
        # the largest offset inside one batch entry (varlen: inside the packed tensor), plus a
        # block of rows past the end
        inner = [(n - 1) * st for i, (n, st) in enumerate(zip(t.shape, t.stride())) if i >= dim]
        if sum(inner) + 256 * t.stride(dim) > limit:
            return True
    return (lse.numel() if varlen else lse[0].numel()) + 256 > limit


def _lse_strides(lse: Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of lse/delta: dense [B, Hq, T], varlen [Hq, total_q]."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _config(table: dict[int, _Config], bd: int, dtype: torch.dtype, interpret: bool) -> _Config:
    if interpret:
        return _INTERPRET_CONFIG
    cfg = table[bd]
    if dtype == torch.float32:
        # fp32 tiles take twice the registers and shared memory of 16-bit ones (tl.dot: >= 16).
        # and 8 warps / a single stage keep the 3xTF32 split (hi/lo operands) within 255
        # registers on sm_80 too (4 warps or 2 stages spilled 40-104 bytes at head dim 64).
        # Wider heads halve the query block once more per doubling beyond 64.
        shrink = 2 * max(1, bd // 64)
        return cfg._replace(
            block_m=max(cfg.block_m // shrink, 16),
            block_n=max(cfg.block_n // 2, 16),
            num_warps=8,
            num_stages=1,
        )
    return cfg


def _fwd_config(bd: int, dtype: torch.dtype, interpret: bool, arch: int | None) -> _Config:
    """The forward's config for compute capability ``arch`` (90 for 9.0; None off CUDA):
    Hopper takes :data:`_FWD_SM90` for 16-bit inputs, every other GPU (and fp32, whose 3xTF32
    products run on mma.sync) :data:`_FWD`."""
    if interpret:
        return _INTERPRET_CONFIG
    hopper = arch is not None and arch // 10 == 9
    if dtype != torch.float32 and hopper:
        return _FWD_SM90[bd]
    cfg = _config(_FWD, bd, dtype, interpret)
    if hopper and bd >= 128:
        # fp32 on sm_90a: 32 query rows spilled 236 bytes at head dim 128 under Triton 3.6
        # (230 registers under 3.8); 16 rows keep both at 166-180 registers
        cfg = cfg._replace(block_m=16)
    return cfg


def _arch(device: torch.device) -> int | None:
    """Compute capability as 10 * major + minor (None off CUDA)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _tma_ok(k: Tensor, v: Tensor, interpret: bool) -> bool:
    """Whether the forward reads K/V blocks through TMA descriptors: Hopper (9.x), 16-bit, and
    what TMA needs (16-byte aligned base and strides, the last dim contiguous; torch
    allocations and their usual views satisfy it). Otherwise the same loads go through pointers
    (both paths are tested; which one runs changes no result)."""
    if interpret or TensorDescriptor is None or k.dtype == torch.float32:
        return False
    arch = _arch(k.device)
    if arch is None or arch // 10 != 9:
        return False
    return all(
        t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
        for t in (k, v)
    )


def _kv_descriptors(k: Tensor, v: Tensor, block_n: int, bd: int) -> tuple:
    """TMA descriptors of k and v for :func:`_kv_tma`: dense [B, S, Hkv, D] in blocks
    [1, BN, 1, BD], varlen [total_k, Hkv, D] in blocks [BN, 1, BD] (BD > D reads zeros)."""
    block = [block_n, 1, bd] if k.dim() == 3 else [1, block_n, 1, bd]
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), block) for t in (k, v))


def _heads_per_program(g: int, block_m: int) -> int:
    """GP, the query heads of one KV group that one forward program serves (GQA packing): the
    largest power of two dividing G with GP <= block_m / 16 (each head keeps at least 16 rows
    of the tile, the MMA's row granule). G = 4, the predictor's: 4."""
    gp = 1
    while g % (2 * gp) == 0 and 2 * gp <= block_m // 16:
        gp *= 2
    return gp


def _window(
    causal: bool, window_size: tuple[int, int], lay: _Layout
) -> tuple[int, int, bool, bool]:
    """(win_left, win_right, LEFT, RIGHT): the kernels' window, causal folded in (right bound 0).

    A bound of -1 is unbounded (its flag off, its value 0); the others are clamped to the
    longest key (left) or query (right) sequence, past which they hide nothing, so that
    ``i + S - T +- bound`` stays within int32 for any sequence the kernels take."""
    left, right = window_size
    if isinstance(left, bool) or isinstance(right, bool) or min(left, right) < -1:
        raise ValueError(f"window_size: expected two ints >= -1, got {window_size!r}")
    if causal:
        right = 0
    return (
        min(left, lay.S) if left >= 0 else 0,
        min(right, lay.T) if right >= 0 else 0,
        left >= 0,
        right >= 0,
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three TF32 MMAs per product (split hi/lo) give near-fp32 accuracy, as eager
    # fp32 matmul (no TF32 by default) does, while staying on tensor cores; a plain fp32 FMA dot
    # spills at these block sizes. 16-bit inputs ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
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
) -> tuple[Tensor, Tensor]:
    """Attention forward: softmax(scale * q k^T) v per query head, with its log-sum-exp.

    Args:
        q: dense [B, T, Hq, D] or varlen [total_q, Hq, D]; fp16, bf16 or fp32. D in
            :data:`HEAD_DIMS`. Any strides with a contiguous last dim (others are copied).
        k: dense [B, S, Hkv, D] or varlen [total_k, Hkv, D], q's dtype; Hq % Hkv == 0 (GQA:
            query head h reads KV head h // (Hq // Hkv)).
        v: like k.
        seqlens_k: dense only, optional int32 [B]: keys at positions >= seqlens_k[b] are padding
            (right padding); 0 is allowed (values are clamped to [0, S]).
        seqlens_q: dense only, optional int32 [B]: query rows t >= seqlens_q[b] are padding
            (values clamped to [0, T]): out 0 and lse -inf there, and their blocks are not
            computed (a padded batch costs its real queries). The predictor passes its key
            lengths (vf.attention's ``mask_queries``).
        cu_seqlens_q: varlen only, int32 [N + 1] cumulative query lengths (starts at 0). Any
            strides (a strided view is copied contiguous). The kernels clamp every sequence to
            the rows of q and k, so even offsets that are not cumulative lengths never reach
            memory outside the tensors (they give meaningless values; the public op checks them).
        cu_seqlens_k: varlen only, int32 [N + 1] cumulative key lengths, likewise.
        max_seqlen_q: varlen only, the longest query sequence (sizes the grid: rows of a longer
            sequence are not computed).
        max_seqlen_k: varlen only, the longest key sequence.
        causal: bottom-right aligned causal mask (query i sees key j iff j <= i + S - T; dense
            uses the tensor lengths, varlen each sequence's lengths).
        window_size: (left, right) sliding window, flash-attn's convention: query i sees key j
            only if i + S - T - left <= j <= i + S - T + right (aligned as causal), -1 =
            unbounded; with causal the right bound is 0. Key blocks outside every row's window
            of a query block are skipped, so the cost follows the window, not S.
        scale: softmax scale, usually D ** -0.5.

    Returns:
        (out, lse): out with q's shape (contiguous) and dtype; lse fp32 natural-log log-sum-exp,
        dense [B, Hq, T], varlen [Hq, total_q]. Rows that see no key: out 0, lse -inf, whatever
        q holds. Non-finite inputs follow plain softmax: a row with a NaN or +inf score, or
        with every score -inf (NaN/Inf in its q row or in a key it sees), gets out NaN and
        lse NaN; padded keys are never loaded.
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    lay, seqlens_k, cu_seqlens_q, cu_seqlens_k = _layout(
        q, k, v, seqlens_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    if seqlens_q is not None and lay.varlen:
        raise ValueError("seqlens_q: dense only (varlen query lengths come from cu_seqlens_q)")
    seqlens_q = _offsets("seqlens_q", seqlens_q, lay.n_seq, q.device)
    interpret = interpreting(q)
    bd = triton.next_power_of_2(lay.D)
    cfg = _fwd_config(bd, q.dtype, interpret, _arch(q.device))
    # fp32 (3xTF32 split operands, small tiles near the register limit) keeps one head per
    # program: packing's row arithmetic costs registers it does not have
    gp = 1 if q.dtype == torch.float32 else _heads_per_program(lay.Hq // lay.Hkv, cfg.block_m)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lay.varlen:
        lse = torch.empty(lay.Hq, q.shape[0], dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty(lay.n_seq, lay.Hq, lay.T, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    win_left, win_right, left, right = _window(causal, window_size, lay)
    row64 = _row64(lay.varlen, lse, q, k, v, out)
    if row64 and not interpret:
        # int64 row offsets take registers (huge inputs only): at head dim >= 128 half the query
        # rows (128 x 64 spilled 32-172 bytes on sm_80 at 1-3 stages), and one head per program
        if bd >= 128:
            cfg = cfg._replace(block_m=min(cfg.block_m, 64))
        gp = 1
    tma = _tma_ok(k, v, interpret)
    descs = _kv_descriptors(k, v, cfg.block_n, bd) if tma else (None, None)
    grid = (triton.cdiv(lay.T, cfg.block_m // gp), lay.n_seq * lay.Hq // gp)
    launch(
        _attn_fwd_kernel, grid,
        q, k, v, out, lse, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k, *descs,
        *_strides(lay.varlen, q, k, v, out), *_lse_strides(lse, lay.varlen),
        lay.rows_q, lay.rows_k, scale * _LOG2E, win_left, win_right,
        H=lay.Hq, G=lay.Hq // lay.Hkv, GP=gp, D=lay.D, BD=bd, BM=cfg.block_m, BN=cfg.block_n,
        IS_VARLEN=lay.varlen, HAS_SEQLENS=seqlens_k is not None,
        HAS_QLENS=seqlens_q is not None, LEFT=left, RIGHT=right, RAW_MAX=scale > 0, TMA=tma,
        INTERPRET=interpret, DOT_PRECISION=_dot_precision(q.dtype),
        ROW64=row64,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


# The backward lives in attention_bwd.py (it imports this module's helpers); re-exported here so
# that callers use one module.
from .attention_bwd import attention_backward  # noqa: E402
