"""Fused InfoNCE, chunked: vendor GEMMs for the products, Triton epilogues for everything else.

Math. A [N, D], B [M, D]; ia_i = 1 / max(||A_i||, eps), ib_j likewise (both 1 when ``normalize``
is off); raw = A B^T, cos_ij = raw_ij ia_i ib_j, S_ij = scale cos_ij. The positive of row i is
column i + offset (of column j, row j - offset); a row or column whose positive falls outside S
has none (positive logit 0, no indicator term). ``eps`` is an argument of the launchers (a
compile-time constant of the kernels); the package passes ``vljepa_fast.reference.NORM_EPS``.
With per-row and per-column upstream gradients g_row [N], g_col [M]:

    loss    = sum_i g_row_i (row_lse_i - S_i,i+off) + sum_j g_col_j (col_lse_j - S_j-off,j)
    dS_ij   = g_row_i (exp(S_ij - row_lse_i) - [j = i+off])
            + g_col_j (exp(S_ij - col_lse_j) - [j = i+off])
    dscale  = sum_ij dS_ij cos_ij
    H_ij    = 2^k dS_ij ia_i ib_j                        (stored in the GEMM dtype)
    dA_i    = scale 2^-k ((H B)_i   - ia_i^2 r_i A_i),   r_i = sum_j H_ij raw_ij
    dB_j    = scale 2^-k ((H^T A)_j - ib_j^2 c_j B_j),   c_j = sum_i H_ij raw_ij
    dA_i    = 0 where ||A_i|| < eps (zero rows: the rule of reference.normalize_rows), likewise dB

(Derivation: dA_i = scale sum_j dS_ij (ia_i ib_j B_j + raw_ij ib_j d ia_i / dA_i) with
d ia_i / dA_i = -ia_i^3 A_i; without normalize ia = ib = 1 and the r, c terms are absent.)
Both inverse norms are folded into H, so both gradient GEMMs take the raw inputs (no normalised
copy of A or B exists), and the projection coefficients r and c come from the rounded H, so that
A_i . dA_i = 0 up to fp32 rounding (the gradient of a normalised row is orthogonal to it).

Algorithm (per call; rows of A in chunks of ``chunk`` rows, the last one shorter when chunk does
not divide N; the op layer computes chunk from the budget rule of vljepa_fast/ops/_chunks.py):

    inverse norms ia [N], ib [M]                               (Triton, once)
    forward, per chunk A_c (c rows):
        raw_c = A_c B^T                 -> fp32 [c, M] buffer  (vendor GEMM, fp32 output)
        fwd epilogue: reads raw_c once; program (p, q) sweeps BN = 64 columns of the q-th of Q
            row groups of the chunk (P = M / BN column blocks, Q chosen so that P Q ~ 4096
            programs): row (max, sum-exp) partials [P, c], the positives, and the group's
            column (max, sum-exp) merged into running column stats [Q, M] (chunk order)
        row merge: the partials in fixed order -> row_lse (float64)
    col finalize: the Q column stats in order -> col_lse (float64), column positives
    backward, per chunk:
        raw_c = A_c B^T                 (the forward's GEMM, same shapes: the same S to the bit)
        bwd epilogue (same grid): raw_c -> H_c (GEMM dtype), r partials [P, c], running c
            [Q, M] (chunk order), dscale partials [Q, P] (from the fp32 dS)
        G_c = H_c B                     -> fp32 [c, D]         (vendor GEMM)
        dA finalize: dA_c from G_c, r, A_c                      (A's dtype; complete per chunk)
        E += H_c^T A_c                  -> fp32 [M, D]         (vendor GEMM, beta = 1 after the
                                                                first chunk: fixed order)
    dB finalize: dB from E, c, B                                (B's dtype)

GEMMs: CUDA tensors run ``torch.mm(x, y, out_dtype=torch.float32, out=...)`` for fp16/bf16
(fp32 accumulation and output; ``torch.addmm(..., out_dtype=torch.float32)`` with the
accumulator as input and output for E) and plain ``torch.mm`` / ``addmm_`` for fp32 (full fp32
unless the process enabled TF32 through torch.backends.cuda.matmul.allow_tf32 /
torch.set_float32_matmul_precision; TF32 would put ~1e-3 relative error on every logit). CPU
tensors (the Triton interpreter, tests) have no fp32-output 16-bit GEMM: there the 16-bit
operands are upcast to fp32 and the GEMMs run in fp32, which gives the same products (a 16-bit
product is exact in fp32) summed in fp32. No GEMM loop is written in Triton: the kernels here
are epilogues (elementwise + reductions), so the wgmma question does not arise for them.

Memory beyond inputs and outputs, with c = min(chunk, N), P = ceil(M / 64), Q <= ceil(4096 / P)
row groups, s = itemsize: forward: the [c, M] fp32 score buffer (4 c M bytes), row partials
8 P c, running column stats 8 Q M (with col_stats), inverse norms 4 (N + M). Backward: the score
buffer and the H buffer ((4 + s) c M bytes: the ``bytes_per_pair`` the op layer budgets), r
partials 4 P c, running c 4 Q M, dscale partials 4 P Q ceil(N / c), the LSEs split into fp32
hi + lo 8 (N + M), inverse norms,
and for fp16/bf16 the fp32 G_c [c, D] (4 c D) and the fp32 accumulator E [M, D] (4 M D bytes:
at N = M = 32768, D = 1536 that is 201 MB, as much as both bf16 inputs; fp32 inputs accumulate
in dA / dB themselves). Under the interpreter also the fp32 copies of the upcast operands.
E lies outside the chunk budget (it is O(M D), not O(c M)). The alternative that needs no
accumulator, a second sweep over chunks of B computing S^T chunk by chunk (dB complete per
chunk), costs 10 instead of 8 N^2 D, and its S^T comes from GEMMs of other shapes than the
forward's, so it is not the forward's S to the bit (the float64-LSE exactness above depends on
that); it is not implemented.

Cost at N = M = 32768, D = 1536, bf16, chunk 5440 (what the chunk rule's default 1 GiB budget
gives at this shape: 7 chunks; :func:`cost` and :func:`predicted_seconds` compute it for any
shape and chunk). FLOPs: 2 N^2 D = 3.30 TFLOP forward, 6 N^2 D = 9.90 TFLOP backward, 8 N^2 D =
13.2 TFLOP in all (the minimum without an N x N buffer: S once, S again, two gradient GEMMs).
HBM bytes: forward 9.9 GB (the GEMM writes S in fp32, 4.3 GB, and reads A once and B once per
chunk, 0.8 GB; the epilogue reads S once, 4.3 GB, plus its partials); backward 20.6 GB (the
recompute GEMM 5.1 GB; the epilogue reads S and writes H, 6.5 GB; G = H B reads H and B, 3.1 GB;
E += H^T A reads H and A and reads and writes E per chunk, 4.9 GB; the finalize kernels and
norms 1.1 GB). H200 time at 790 TFLOP/s and 4.3 TB/s: 16.7 ms of GEMM math; with each GEMM at
max(math, its traffic) and each epilogue at its traffic (the roofline): forward 5.3 ms, backward
14.3 ms, forward + backward 19.6 ms (670 TFLOP/s counting 8 N^2 D); with nothing overlapped (an
upper bound) 6.5 + 17.3 = 23.8 ms. The epilogues' 12.4 GB (2.9 ms) is the price of keeping the
GEMMs vendor ones (S and H go through HBM). Extra memory there: S + H buffers 5440 x 32768 x 6
bytes = 1.07 GB (the budget), E 201 MB, G 33 MB, partials 22 MB.

Numerics. Accumulation is fp32 and maxima are subtracted before every exponential, so logits of
any size (temperature 0.01 with |S| up to 1e4) give no overflow. The lse outputs are float64:
the forward keeps (max, sum-exp) pairs and rounds max + log(sum) once, to double, and the
backward splits each lse into float hi + lo and forms exp((S - hi) - lo), exact near the maximum
(Sterbenz). A float lse would be off by up to half an ulp of |S| (5e-4 at 1e4) and scale every
probability of its row by that factor. That exactness needs the backward's S to be the
forward's to the bit: both come from the same GEMM call on the same chunk (same shapes, same
operands; cuBLAS and MKL are deterministic for a fixed shape and alignment on one device) and
the epilogues form S with one expression, (raw * (ia_i * ib_j)) * scale. Exponentials are exp2
with log2(e) applied after the subtraction, so a dominant logit's probability is exactly 1.
2^k (an exact power of two built from its exponent bits) brings the largest possible |H|,
2 max|g| max(ia) max(ib), to at most 2^15: fp16 keeps the most headroom above its subnormals
for the small probabilities of a large batch (g ~ 1/N), and nothing overflows. In fp16 a row
clamped to eps is a zero row (fp16 has no non-zero row of norm below 6e-8): its 1 / eps fold is
replaced by 0 (it multiplies a zero row; 1e12 would overflow fp16 to inf and inf * 0 = NaN).

Determinism. Fixed chunk order, fixed partial order, no atomics: repeats are bit-identical
(given the vendor GEMMs' run-to-run determinism on one stream).

Limits. N * D, M * D < 2^31 (element offsets of the row kernels are int32; the [c, M] buffers
use int64); the positive offset must lie in [-N, M] (beyond it no row or column would have a
positive); chunk >= 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import PEAK_BANDWIDTH, PEAK_FLOPS, launch

__all__ = [
    "PEAK_BANDWIDTH",
    "PEAK_FLOPS",
    "Step",
    "cost",
    "infonce_backward",
    "infonce_forward",
    "predicted_seconds",
]

_LOG2E = tl.constexpr(1.4426950408889634)
# Rows x D-slice of the inverse-norm kernel.
_NORM_BLOCK = (64, 64)
# Rows x columns per step of the forward / backward epilogues; a program owns BN columns of one
# group of the chunk's rows.
_EPI_BLOCK = (32, 64)
_EPI_WARPS = 4
# Programs the epilogue grids aim at (column blocks x row groups): several waves of resident
# programs on 132 SMs (3 to 6 per SM by registers), so that the last wave's tail is small and
# HBM stays busy; the row groups only split the work (their column partials are O(Q M)).
_EPI_PROGRAMS = 4096
# Partials x rows per load of the reductions over partials (row merge, finalize coefficients).
_PART_BLOCK = (32, 64)
# Columns per program of the column finalize kernel.
_MERGE_BLOCK = 256
# Rows x D-slice of the gradient finalize kernel.
_FINAL_BLOCK = (16, 128)
# The largest |H| is at most 2 * _H_TOP (module doc, Numerics): 2^15, half of fp16's range.
_H_TOP = 16384.0


# ------------------------------------------------------------------------------ kernels


@triton.jit
def _inv_norm_kernel(x_ptr, inv_ptr, R, D, EPS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """inv[r] = 1 / max(||x[r]||, eps) for a block of BR rows of x [R, D]."""
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < R
    b_ss = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        p_x = x_ptr + o_r[:, None] * D + o_d[None, :]
        # [BR, BD]
        b_x = tl.load(p_x, mask=m_r[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
        b_ss += tl.sum(b_x * b_x, 1)
    tl.store(inv_ptr + o_r, 1.0 / tl.maximum(tl.sqrt(b_ss), EPS), mask=m_r)


@triton.jit
def _safe_max(b_m):
    """The reference point of exp(x - m): m, or 0 where m = -inf (every x is -inf there, and
    exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN)."""
    return tl.where(b_m > float("-inf"), b_m, 0.0)


@triton.jit
def _pow2(bound_ptr, TOP: tl.constexpr):
    """(2^k, 2^-k) with k = floor(log2(TOP / bound)) clamped to [-126, 126], both exact (built
    from the exponent bits). A NaN bound (NaN inputs: their gradients are NaN anyway) gives k
    of bound 1."""
    b_x = tl.load(bound_ptr)
    b_x = tl.where(b_x == b_x, b_x, 1.0)
    b_x = tl.minimum(tl.maximum(b_x, 1e-30), 1e30)
    b_k = tl.floor(tl.log2(TOP / b_x))
    b_k = tl.minimum(tl.maximum(b_k, -126.0), 126.0).to(tl.int32)
    c2 = ((b_k + 127) << 23).to(tl.float32, bitcast=True)
    c2_inv = ((127 - b_k) << 23).to(tl.float32, bitcast=True)
    return c2, c2_inv


@triton.jit
def _fold(b_inv, h_ptr, EPS: tl.constexpr):
    """The inverse norms as folded into H: in fp16 a clamped row (a zero row there) folds with 0
    instead of 1 / eps (module doc, Numerics)."""
    if h_ptr.dtype.element_ty == tl.float16:
        b_inv = tl.where(b_inv * EPS < 1.0, b_inv, 0.0)
    return b_inv


@triton.jit
def _fwd_epilogue_kernel(
    s_ptr,
    inv_a_ptr,
    inv_b_ptr,
    scale_ptr,
    row_max_ptr,
    row_sum_ptr,
    col_max_ptr,
    col_sum_ptr,
    pos_row_ptr,
    r0,
    C,
    M,
    offset,
    group_rows,
    has_prev,
    NORMALIZE: tl.constexpr,
    COL_STATS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """Program (p, q): columns [p BN, p BN + BN) of rows [q group_rows, (q + 1) group_rows) of
    the chunk's raw products s [C, M] (fp32; rows r0 .. r0 + C of S), swept BM rows at a time,
    each element read once (a group past C has no rows).

    Writes each row's (max, sum of exp(x - max)) over its BN columns to row_max/row_sum[p, i]
    (merged by _row_merge_kernel), the positives S[i, i + offset] its block holds, and merges
    the group's column (max, sum-exp) into the running col_max/col_sum[q] [Q, M] (read when
    has_prev: the chunks before, in order; only this program touches these entries:
    race-free; _col_final_kernel merges the Q rows).
    """
    i_p = tl.program_id(0)
    i_q = tl.program_id(1)
    o_n = i_p * BN + tl.arange(0, BN)
    m_n = o_n < M
    b_scale = tl.load(scale_ptr)
    if NORMALIZE:
        b_ib = tl.load(inv_b_ptr + o_n, mask=m_n, other=0.0)
    b_cm = tl.full([BN], float("-inf"), dtype=tl.float32)
    b_cl = tl.zeros([BN], dtype=tl.float32)
    i_lo = i_q * group_rows
    i_hi = tl.minimum(i_lo + group_rows, C)
    for i0 in range(i_lo, i_hi, BM):
        o_i = i0 + tl.arange(0, BM)
        m_i = o_i < i_hi
        o_m = r0 + o_i
        # [BM, BN]
        p_s = s_ptr + o_i.to(tl.int64)[:, None] * M + o_n[None, :]
        b_raw = tl.load(p_s, mask=m_i[:, None] & m_n[None, :], other=0.0)
        # The backward's expression to the bit (see Numerics).
        if NORMALIZE:
            b_ia = tl.load(inv_a_ptr + o_m, mask=m_i, other=0.0)
            b_cos = b_raw * (b_ia[:, None] * b_ib[None, :])
        else:
            b_cos = b_raw
        b_s = b_cos * b_scale
        # The positive (i, i + offset) lies in exactly one column block: written there.
        o_pc = o_m + offset
        b_pos = tl.sum(tl.where(o_n[None, :] == o_pc[:, None], b_s, 0.0), 1)
        m_pos = m_i & (o_pc >= i_p * BN) & (o_pc < i_p * BN + BN) & (o_pc < M)
        tl.store(pos_row_ptr + o_m, b_pos, mask=m_pos)
        # Row partials over this program's columns; rows past C stay finite and are not stored.
        b_sr = tl.where(m_n[None, :], b_s, float("-inf"))
        b_rm = tl.max(b_sr, 1)
        b_rl = tl.sum(tl.exp2((b_sr - _safe_max(b_rm)[:, None]) * _LOG2E), 1)
        tl.store(row_max_ptr + i_p * C + o_i, b_rm, mask=m_i)
        tl.store(row_sum_ptr + i_p * C + o_i, b_rl, mask=m_i)
        if COL_STATS:
            b_sc = tl.where(m_i[:, None], b_s, float("-inf"))
            b_nm = tl.maximum(b_cm, tl.max(b_sc, 0))
            b_ref = _safe_max(b_nm)
            b_cl = b_cl * tl.exp2((b_cm - b_ref) * _LOG2E)
            b_cl += tl.sum(tl.exp2((b_sc - b_ref[None, :]) * _LOG2E), 0)
            b_cm = b_nm
    if COL_STATS:
        o_c = i_q * M + o_n
        m_old = m_n & (has_prev != 0)
        b_om = tl.load(col_max_ptr + o_c, mask=m_old, other=float("-inf"))
        b_ol = tl.load(col_sum_ptr + o_c, mask=m_old, other=0.0)
        b_nm = tl.maximum(b_om, b_cm)
        b_ref = _safe_max(b_nm)
        b_nl = b_ol * tl.exp2((b_om - b_ref) * _LOG2E) + b_cl * tl.exp2((b_cm - b_ref) * _LOG2E)
        tl.store(col_max_ptr + o_c, b_nm, mask=m_n)
        tl.store(col_sum_ptr + o_c, b_nl, mask=m_n)


@triton.jit
def _row_merge_kernel(
    row_max_ptr,
    row_sum_ptr,
    row_lse_ptr,
    pos_row_ptr,
    r0,
    C,
    P,
    M,
    offset,
    BP: tl.constexpr,
    BC: tl.constexpr,
):
    """row_lse[r0 + i] in float64 from the P partials (max, sum-exp) [P, C] of the chunk's row
    i (one rounding, see Numerics), read BP partials at a time (a fixed reduction order);
    pos_row = 0 for rows without a positive."""
    o_i = tl.program_id(0) * BC + tl.arange(0, BC)
    m_i = o_i < C
    b_mx = tl.full([BC], float("-inf"), dtype=tl.float32)
    for q0 in range(0, P, BP):
        o_q = q0 + tl.arange(0, BP)
        m_t = (o_q < P)[:, None] & m_i[None, :]
        # [BP, BC]
        b_t = tl.load(row_max_ptr + o_q[:, None] * C + o_i[None, :], mask=m_t, other=float("-inf"))
        b_mx = tl.maximum(b_mx, tl.max(b_t, 0))
    b_ref = _safe_max(b_mx)
    b_l = tl.zeros([BC], dtype=tl.float32)
    for q0 in range(0, P, BP):
        o_q = q0 + tl.arange(0, BP)
        m_t = (o_q < P)[:, None] & m_i[None, :]
        o_t = o_q[:, None] * C + o_i[None, :]
        b_tm = tl.load(row_max_ptr + o_t, mask=m_t, other=float("-inf"))
        b_ts = tl.load(row_sum_ptr + o_t, mask=m_t, other=0.0)
        b_l += tl.sum(b_ts * tl.exp2((b_tm - b_ref[None, :]) * _LOG2E), 0)
    # Lanes past C get log(1) (no log(0), even in the interpreter); they are not stored.
    b_l = tl.where(m_i, b_l, 1.0)
    o_m = r0 + o_i
    tl.store(row_lse_ptr + o_m, b_mx.to(tl.float64) + tl.log(b_l.to(tl.float64)), mask=m_i)
    o_pc = o_m + offset
    m_none = m_i & ((o_pc < 0) | (o_pc >= M))
    tl.store(pos_row_ptr + o_m, tl.zeros([BC], dtype=tl.float32), mask=m_none)


@triton.jit
def _col_final_kernel(
    col_max_ptr,
    col_sum_ptr,
    col_lse_ptr,
    pos_row_ptr,
    pos_col_ptr,
    N,
    M,
    Q,
    offset,
    BC: tl.constexpr,
):
    """col_lse (float64) from the Q running column stats [Q, M] (merged in order q = 0 .. Q - 1),
    and pos_col[j] = S[j - offset, j] (the row positive pos_row[j - offset]; 0 without one)."""
    o_j = tl.program_id(0) * BC + tl.arange(0, BC)
    m_j = o_j < M
    b_mx = tl.full([BC], float("-inf"), dtype=tl.float32)
    for q in range(0, Q):
        b_mx = tl.maximum(b_mx, tl.load(col_max_ptr + q * M + o_j, mask=m_j, other=0.0))
    b_ref = _safe_max(b_mx)
    b_l = tl.zeros([BC], dtype=tl.float32)
    for q in range(0, Q):
        b_qm = tl.load(col_max_ptr + q * M + o_j, mask=m_j, other=0.0)
        b_l += tl.load(col_sum_ptr + q * M + o_j, mask=m_j, other=0.0) * tl.exp2(
            (b_qm - b_ref) * _LOG2E
        )
    b_l = tl.where(m_j, b_l, 1.0)
    tl.store(col_lse_ptr + o_j, b_mx.to(tl.float64) + tl.log(b_l.to(tl.float64)), mask=m_j)
    o_p = o_j - offset
    m_p = m_j & (o_p >= 0) & (o_p < N)
    tl.store(pos_col_ptr + o_j, tl.load(pos_row_ptr + o_p, mask=m_p, other=0.0), mask=m_j)


@triton.jit
def _bwd_epilogue_kernel(
    s_ptr,
    h_ptr,
    inv_a_ptr,
    inv_b_ptr,
    scale_ptr,
    bound_ptr,
    row_hi_ptr,
    row_lo_ptr,
    g_row_ptr,
    col_hi_ptr,
    col_lo_ptr,
    g_col_ptr,
    rw_part_ptr,
    cw_ptr,
    dscale_part_ptr,
    r0,
    C,
    M,
    offset,
    group_rows,
    has_prev,
    NORMALIZE: tl.constexpr,
    HAS_COL: tl.constexpr,
    EPS: tl.constexpr,
    TOP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """Program (p, q): columns [p BN, p BN + BN) of rows [q group_rows, (q + 1) group_rows) of
    the chunk's raw products s [C, M] (rows r0 .. r0 + C of S), each element read once, turned
    into H = 2^k dS ia_i ib_j in h's dtype.

    dS from the float64 LSEs split into hi + lo (the row terms always, the column terms with
    HAS_COL). Writes H [C, M], the row coefficient partials rw_part[p, i] = sum over these
    columns of H_ij raw_ij, adds the group's column coefficients sum_i H_ij raw_ij to the
    running cw[q] [Q, M] (read when has_prev; chunk order, race-free: only this program
    touches these entries) and stores this program's share of dscale, sum dS_ij cos_ij from
    the fp32 dS, to dscale_part[q, p]. Without NORMALIZE the coefficients are neither needed
    nor written.
    """
    i_p = tl.program_id(0)
    i_q = tl.program_id(1)
    o_n = i_p * BN + tl.arange(0, BN)
    m_n = o_n < M
    b_scale = tl.load(scale_ptr)
    c2, _ = _pow2(bound_ptr, TOP)
    if NORMALIZE:
        b_ib = tl.load(inv_b_ptr + o_n, mask=m_n, other=0.0)
        b_fb = _fold(b_ib, h_ptr, EPS)
    if HAS_COL:
        b_lc = tl.load(col_hi_ptr + o_n, mask=m_n, other=0.0)
        b_lcl = tl.load(col_lo_ptr + o_n, mask=m_n, other=0.0)
        b_gc = tl.load(g_col_ptr + o_n, mask=m_n, other=0.0)
    b_r = tl.zeros([BN], dtype=tl.float32)
    b_cw = tl.zeros([BN], dtype=tl.float32)
    i_lo = i_q * group_rows
    i_hi = tl.minimum(i_lo + group_rows, C)
    for i0 in range(i_lo, i_hi, BM):
        o_i = i0 + tl.arange(0, BM)
        m_i = o_i < i_hi
        o_m = r0 + o_i
        m_s = m_i[:, None] & m_n[None, :]
        o_s = o_i.to(tl.int64)[:, None] * M + o_n[None, :]
        # [BM, BN]
        b_raw = tl.load(s_ptr + o_s, mask=m_s, other=0.0)
        b_lr = tl.load(row_hi_ptr + o_m, mask=m_i, other=0.0)
        b_lrl = tl.load(row_lo_ptr + o_m, mask=m_i, other=0.0)
        b_gr = tl.load(g_row_ptr + o_m, mask=m_i, other=0.0)
        if NORMALIZE:
            b_ia = tl.load(inv_a_ptr + o_m, mask=m_i, other=0.0)
            b_cos = b_raw * (b_ia[:, None] * b_ib[None, :])
        else:
            b_cos = b_raw
        # The forward's logits to the bit; -inf outside S so that every exponential is 0 there.
        b_s = tl.where(m_s, b_cos * b_scale, float("-inf"))
        b_pos = (m_s & (o_n[None, :] == (o_m + offset)[:, None])).to(tl.float32)
        b_ds = b_gr[:, None] * (tl.exp2(((b_s - b_lr[:, None]) - b_lrl[:, None]) * _LOG2E) - b_pos)
        if HAS_COL:
            b_pc = tl.exp2(((b_s - b_lc[None, :]) - b_lcl[None, :]) * _LOG2E)
            b_ds += b_gc[None, :] * (b_pc - b_pos)
        b_r += tl.sum(b_ds * b_cos, 0)
        if NORMALIZE:
            b_fa = _fold(b_ia, h_ptr, EPS)
            b_h = ((b_ds * c2) * (b_fa[:, None] * b_fb[None, :])).to(h_ptr.dtype.element_ty)
        else:
            b_h = (b_ds * c2).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + o_s, b_h, mask=m_s)
        if NORMALIZE:
            # Coefficients from the rounded H, so that the gradients stay orthogonal to the rows.
            b_hr = b_h.to(tl.float32) * b_raw
            tl.store(rw_part_ptr + i_p * C + o_i, tl.sum(b_hr, 1), mask=m_i)
            b_cw += tl.sum(b_hr, 0)
    tl.store(dscale_part_ptr + i_q * tl.num_programs(0) + i_p, tl.sum(b_r, 0))
    if NORMALIZE:
        o_c = i_q * M + o_n
        b_old = tl.load(cw_ptr + o_c, mask=m_n & (has_prev != 0), other=0.0)
        tl.store(cw_ptr + o_c, b_old + b_cw, mask=m_n)


@triton.jit
def _grad_final_kernel(
    g_ptr,
    x_ptr,
    dx_ptr,
    inv_ptr,
    coef_ptr,
    scale_ptr,
    bound_ptr,
    R,
    D,
    parts,
    NORMALIZE: tl.constexpr,
    EPS: tl.constexpr,
    TOP: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
    BQ: tl.constexpr,
):
    """dx_r = scale 2^-k (G_r - inv_r^2 coef_r x_r) in x's dtype for a block of BR rows of
    G [R, D] (fp32; may be dx itself for fp32 inputs: each element is read before it is
    written by the same program), coef_r = the sum of coef[q, r] over q < parts, read BQ parts
    at a time (a fixed order); 0 for rows whose norm is below eps (NORMALIZE). Without
    NORMALIZE dx = scale 2^-k G."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    b_scale = tl.load(scale_ptr)
    _, c2_inv = _pow2(bound_ptr, TOP)
    b_f = tl.full([BR], 1.0, dtype=tl.float32) * (b_scale * c2_inv)
    if NORMALIZE:
        b_ix = tl.load(inv_ptr + o_r, mask=m_r, other=0.0)
        b_c = tl.zeros([BR], dtype=tl.float32)
        for q0 in range(0, parts, BQ):
            o_q = q0 + tl.arange(0, BQ)
            m_t = (o_q < parts)[:, None] & m_r[None, :]
            # [BQ, BR]
            b_c += tl.sum(
                tl.load(coef_ptr + o_q[:, None] * R + o_r[None, :], mask=m_t, other=0.0), 0
            )
        b_pr = b_c * (b_ix * b_ix)
        # A row clamped to eps (a zero row) gets a zero gradient: the rule of
        # reference.normalize_rows. A NaN norm compares false and propagates.
        b_small = b_ix * EPS >= 1.0
    o_rx = o_r * D
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_x = m_r[:, None] & (o_d < D)[None, :]
        p_x = o_rx[:, None] + o_d[None, :]
        # [BR, BD]
        b_g = tl.load(g_ptr + p_x, mask=m_x, other=0.0)
        if NORMALIZE:
            b_x = tl.load(x_ptr + p_x, mask=m_x, other=0.0).to(tl.float32)
            b_g = b_g - b_pr[:, None] * b_x
        b_dx = b_g * b_f[:, None]
        if NORMALIZE:
            b_dx = tl.where(b_small[:, None], 0.0, b_dx)
        tl.store(dx_ptr + p_x, b_dx.to(dx_ptr.dtype.element_ty), mask=m_x)


# ------------------------------------------------------------------------------ launchers


def _check_inputs(a: Tensor, b: Tensor, scale: Tensor, offset: int, chunk: int) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or not isinstance(scale, Tensor):
        raise ValueError("A, B and scale must be tensors")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected A [N, D] and B [M, D], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"A and B must share one dtype of fp32/fp16/bf16, got {a.dtype}, {b.dtype}"
        )
    if not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError("A and B must be contiguous")
    if scale.dim() != 0 or scale.dtype != torch.float32:
        raise ValueError(
            f"scale must be a 0-dim float32 tensor, got {scale.dtype} {tuple(scale.shape)}"
        )
    if not (a.device == b.device == scale.device):
        raise ValueError(
            f"A, B and scale on different devices: {a.device}, {b.device}, {scale.device}"
        )
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty input: A {tuple(a.shape)}, B {tuple(b.shape)}")
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    # Element offsets of the row kernels are int32.
    if max(n, m) * d >= 2**31:
        raise ValueError(f"A {tuple(a.shape)}, B {tuple(b.shape)}: offsets overflow int32")
    # Outside [-N, M] no row or column has a positive; bounding it keeps i + offset and
    # j - offset inside int32 in the kernels (every positive index is masked against S).
    if isinstance(offset, bool) or not isinstance(offset, int) or not -n <= offset <= m:
        raise ValueError(f"offset must be an int in [-N, M] = [{-n}, {m}], got {offset!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1 (rows of A per chunk), got {chunk!r}")
    if triton.cdiv(m, _EPI_BLOCK[1]) * min(chunk, n) >= 2**31:
        raise ValueError(f"chunk {chunk}: the row partials' offsets overflow int32 at M = {m}")


def _inv_norms(x: Tensor, eps: float) -> Tensor:
    inv = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    block_r, block_d = _NORM_BLOCK
    launch(
        _inv_norm_kernel,
        (triton.cdiv(x.shape[0], block_r),),
        x,
        inv,
        x.shape[0],
        x.shape[1],
        EPS=eps,
        BR=block_r,
        BD=block_d,
    )
    return inv


def _gemm_operands(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The operands the GEMMs read: the inputs themselves, except 16-bit CPU tensors (the
    interpreter), upcast to fp32 there (CPU has no fp32-output 16-bit GEMM; module doc)."""
    if a.device.type == "cpu" and a.dtype != torch.float32:
        return a.float(), b.float()
    return a, b


def _mm(x: Tensor, y: Tensor, out: Tensor, accumulate: bool = False) -> None:
    """out = x @ y (+ out when ``accumulate``), out fp32; x, y one dtype (fp32, or fp16/bf16 on
    CUDA: fp32 accumulation and output through ``out_dtype``)."""
    if x.dtype != torch.float32:
        if x.device.type == "cpu":  # the callers upcast first: never reached by them
            raise ValueError("16-bit GEMM operands on CPU must be upcast to fp32 first")
        if accumulate:
            torch.addmm(out, x, y, out_dtype=torch.float32, out=out)
        else:
            torch.mm(x, y, out_dtype=torch.float32, out=out)
    elif accumulate:
        out.addmm_(x, y)
    else:
        torch.mm(x, y, out=out)


def _chunks(n: int, rows: int):
    """(index, first row, rows) of each chunk of ``rows`` rows (the last may be shorter)."""
    for index, r0 in enumerate(range(0, n, rows)):
        yield index, r0, min(rows, n - r0)


def _epilogue_grid(rows: int, m: int) -> tuple[int, int]:
    """(P, Q) of the epilogues for chunks of up to ``rows`` rows against M = ``m`` columns:
    P column blocks of BN, and Q row groups so that P Q reaches about _EPI_PROGRAMS (never
    more groups than BM-row steps). Q is fixed for a call: the running column statistics are
    kept per group."""
    block_m, block_n = _EPI_BLOCK
    parts = triton.cdiv(m, block_n)
    return parts, max(1, min(triton.cdiv(rows, block_m), triton.cdiv(_EPI_PROGRAMS, parts)))


def _group_rows(c: int, groups: int) -> int:
    """Rows per group of a chunk of ``c`` rows: a multiple of BM (groups past c are empty)."""
    return triton.cdiv(triton.cdiv(c, groups), _EPI_BLOCK[0]) * _EPI_BLOCK[0]


def infonce_forward(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    offset: int = 0,
    normalize: bool = True,
    col_stats: bool = True,
    *,
    eps: float,
    chunk: int,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Row and column log-sum-exp and positive logits of S = scale * Â B̂^T, by row chunks.

    Args:
        a: [N, D] fp32, fp16 or bf16, contiguous.
        b: [M, D] same dtype and device as ``a``, contiguous.
        scale: 0-dim fp32 tensor, the inverse temperature (read on device: may be learnable).
        offset: the positive of row i is column i + offset, an int in [-N, M]. A row or column
            whose positive is outside S has none: its positive logit is 0.
        normalize: use L2-normalised rows Â = A / max(||A_i||, eps) and likewise B̂.
        col_stats: also compute the column statistics (the target->pred direction).
        eps: the smallest norm a row is divided by (a compile-time constant of the kernels;
            the package passes ``vljepa_fast.reference.NORM_EPS``).
        chunk: rows of A per GEMM + epilogue step, an int >= 1 (clamped to N; need not divide
            it). The op layer computes it (vljepa_fast/ops/_chunks.py); pass the backward the
            same value, so that it recomputes the forward's S to the bit.

    Returns:
        (row_lse [N], col_lse [M] or None, pos_row [N], pos_col [M] or None):
        logsumexp_j S_ij and logsumexp_i S_ij in float64 (one rounding, so that the backward's
        exp(S - lse) keeps fp32 accuracy at any |S|), S[i, i + offset] and S[j - offset, j] in
        fp32. Extra memory: module doc, Memory (forward).
    """
    _check_inputs(a, b, scale, offset, chunk)
    n, m = a.shape[0], b.shape[0]
    dev, f32 = a.device, torch.float32
    rows = min(chunk, n)
    inv_a, inv_b = (_inv_norms(a, eps), _inv_norms(b, eps)) if normalize else (scale, scale)
    op_a, op_b = _gemm_operands(a, b)
    block_m, block_n = _EPI_BLOCK
    parts, groups = _epilogue_grid(rows, m)
    s_buf = torch.empty((rows, m), device=dev, dtype=f32)
    row_part = torch.empty((2, parts, rows), device=dev, dtype=f32)
    col_run = torch.empty((2, groups, m) if col_stats else (2, 1), device=dev, dtype=f32)
    row_lse = torch.empty(n, device=dev, dtype=torch.float64)
    pos_row = torch.empty(n, device=dev, dtype=f32)
    for _, r0, c in _chunks(n, rows):
        s = s_buf[:c]
        _mm(op_a[r0 : r0 + c], op_b.t(), s)
        launch(
            _fwd_epilogue_kernel,
            (parts, groups),
            s,
            inv_a,
            inv_b,
            scale,
            row_part[0],
            row_part[1],
            col_run[0],
            col_run[1],
            pos_row,
            r0,
            c,
            m,
            offset,
            _group_rows(c, groups),
            int(r0 > 0),
            NORMALIZE=normalize,
            COL_STATS=col_stats,
            BM=block_m,
            BN=block_n,
            num_warps=_EPI_WARPS,
        )
        launch(
            _row_merge_kernel,
            (triton.cdiv(c, _PART_BLOCK[1]),),
            row_part[0],
            row_part[1],
            row_lse,
            pos_row,
            r0,
            c,
            parts,
            m,
            offset,
            BP=_PART_BLOCK[0],
            BC=_PART_BLOCK[1],
        )
    if not col_stats:
        return row_lse, None, pos_row, None
    col_lse = torch.empty(m, device=dev, dtype=torch.float64)
    pos_col = torch.empty(m, device=dev, dtype=f32)
    launch(
        _col_final_kernel,
        (triton.cdiv(m, _MERGE_BLOCK),),
        col_run[0],
        col_run[1],
        col_lse,
        pos_row,
        pos_col,
        n,
        m,
        groups,
        offset,
        BC=_MERGE_BLOCK,
    )
    return row_lse, col_lse, pos_row, pos_col


def _split_lse(lse: Tensor) -> tuple[Tensor, Tensor]:
    """float64 [L] -> float32 (hi, lo), hi = float(lse), hi + lo = lse to about 2^-48 relative."""
    hi = lse.float()
    return hi, (lse - hi.double()).float()


def _fold_max(inv: Tensor, dtype: torch.dtype, eps: float) -> Tensor:
    """The largest inverse norm folded into H (_fold: fp16 folds clamped rows with 0)."""
    if dtype == torch.float16:
        inv = torch.where(inv * eps < 1.0, inv, torch.zeros_like(inv))
    return inv.amax()


def infonce_backward(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    offset: int,
    normalize: bool,
    row_lse: Tensor,
    col_lse: Tensor | None,
    g_row: Tensor,
    g_col: Tensor | None,
    *,
    eps: float,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i g_row_i (row_lse_i - pos_row_i) + sum_j g_col_j (col_lse_j - pos_col_j).

    S is recomputed chunk by chunk (never stored whole). Deterministic: chunks in order, partial
    sums in a fixed order, dB accumulated by GEMMs in chunk order; no atomics.

    Args:
        a: [N, D] fp32, fp16 or bf16, contiguous (as given to :func:`infonce_forward`).
        b: [M, D] same dtype and device, contiguous.
        scale: 0-dim fp32 tensor, the inverse temperature.
        offset: the positive of row i is column i + offset (as in the forward).
        normalize: whether S used L2-normalised rows (as in the forward).
        row_lse: [N] float64 from :func:`infonce_forward`.
        col_lse: [M] float64 from :func:`infonce_forward`; required when ``g_col`` is given.
        g_row: [N] fp32 gradient of the loss with respect to each row term.
        g_col: [M] fp32 gradient with respect to each column term, or None (no column term).
        eps: the smallest norm a row is divided by, as in the forward; rows below it get a zero
            gradient.
        chunk: rows of A per chunk, the forward's value (an int >= 1).

    Returns:
        (dA [N, D] in A's dtype, dB [M, D] in B's dtype, dscale 0-dim fp32).
        Extra memory: module doc, Memory (backward); for fp16/bf16 it includes the fp32 dB
        accumulator [M, D].
    """
    _check_inputs(a, b, scale, offset, chunk)
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    for name, t in (("row_lse", row_lse), ("col_lse", col_lse), ("g_row", g_row), ("g_col", g_col)):
        if t is not None and (not isinstance(t, Tensor) or t.device != a.device):
            got = t.device if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor on A's device {a.device}, got {got}")
    if g_row.shape != (n,) or row_lse.shape != (n,):
        raise ValueError(
            f"g_row and row_lse must be [{n}], got {tuple(g_row.shape)}, {tuple(row_lse.shape)}"
        )
    if g_col is not None and (col_lse is None or g_col.shape != (m,) or col_lse.shape != (m,)):
        raise ValueError(f"g_col needs col_lse, both [{m}]")
    for t, dt in (
        (row_lse, torch.float64),
        (col_lse, torch.float64),
        (g_row, torch.float32),
        (g_col, torch.float32),
    ):
        if t is not None and (t.dtype != dt or not t.is_contiguous()):
            raise ValueError(
                "row_lse and col_lse must be contiguous float64, g_row and g_col contiguous "
                f"float32; got {t.dtype}"
            )
    dev, f32 = a.device, torch.float32
    rows = min(chunk, n)
    fp32 = a.dtype == f32
    gmax = g_row.abs().amax()
    if g_col is not None:
        gmax = torch.maximum(gmax, g_col.abs().amax())
    if normalize:
        inv_a, inv_b = _inv_norms(a, eps), _inv_norms(b, eps)
        bound = gmax * _fold_max(inv_a, a.dtype, eps) * _fold_max(inv_b, a.dtype, eps)
    else:
        inv_a = inv_b = scale  # unused pointers
        bound = gmax
    bound = bound.reshape(1).to(f32)
    op_a, op_b = _gemm_operands(a, b)
    block_m, block_n = _EPI_BLOCK
    parts, groups = _epilogue_grid(rows, m)
    s_buf = torch.empty((rows, m), device=dev, dtype=f32)
    h_buf = torch.empty((rows, m), device=dev, dtype=a.dtype)
    g_buf = None if fp32 else torch.empty((rows, d), device=dev, dtype=f32)
    acc = None if fp32 else torch.empty((m, d), device=dev, dtype=f32)
    rw_part = torch.empty((parts, rows), device=dev, dtype=f32)
    cw = torch.empty((groups, m) if normalize else (1,), device=dev, dtype=f32)
    dscale_part = torch.empty((triton.cdiv(n, rows), groups, parts), device=dev, dtype=f32)
    da, db = torch.empty_like(a), torch.empty_like(b)
    e = db if fp32 else acc
    # Unused pointers (no column term) alias the row ones; the kernel never reads them.
    row_hi, row_lo = _split_lse(row_lse)
    col_hi, col_lo = (row_hi, row_lo) if g_col is None else _split_lse(col_lse)
    g_col_arg = g_row if g_col is None else g_col
    final = dict(
        NORMALIZE=normalize,
        EPS=eps,
        TOP=_H_TOP,
        BR=_FINAL_BLOCK[0],
        BD=_FINAL_BLOCK[1],
        BQ=_PART_BLOCK[0],
    )
    for index, r0, c in _chunks(n, rows):
        s, h = s_buf[:c], h_buf[:c]
        _mm(op_a[r0 : r0 + c], op_b.t(), s)
        launch(
            _bwd_epilogue_kernel,
            (parts, groups),
            s,
            h,
            inv_a,
            inv_b,
            scale,
            bound,
            row_hi,
            row_lo,
            g_row,
            col_hi,
            col_lo,
            g_col_arg,
            rw_part,
            cw,
            dscale_part[index],
            r0,
            c,
            m,
            offset,
            _group_rows(c, groups),
            int(r0 > 0),
            NORMALIZE=normalize,
            HAS_COL=g_col is not None,
            EPS=eps,
            TOP=_H_TOP,
            BM=block_m,
            BN=block_n,
            num_warps=_EPI_WARPS,
        )
        h_op = h if h.device.type != "cpu" or fp32 else h.float()
        g = da[r0 : r0 + c] if fp32 else g_buf[:c]
        _mm(h_op, op_b, g)
        launch(
            _grad_final_kernel,
            (triton.cdiv(c, _FINAL_BLOCK[0]),),
            g,
            a[r0 : r0 + c],
            da[r0 : r0 + c],
            inv_a[r0 : r0 + c] if normalize else scale,
            rw_part,
            scale,
            bound,
            c,
            d,
            parts,
            **final,
        )
        _mm(h_op.t(), op_a[r0 : r0 + c], e, accumulate=index > 0)
    launch(
        _grad_final_kernel,
        (triton.cdiv(m, _FINAL_BLOCK[0]),),
        e,
        b,
        db,
        inv_b,
        cw,
        scale,
        bound,
        m,
        d,
        groups,
        **final,
    )
    return da, db, dscale_part.sum()


# ------------------------------------------------------------------------------ cost model

# PEAK_FLOPS / PEAK_BANDWIDTH: the H200 design model's rates (kernels/_common.py, one owner)


@dataclass(frozen=True)
class Step:
    """One launch kind of the chunked design, summed over the chunks of a call.

    Attributes:
        name: what it is ("fwd GEMM S", "bwd epilogue", ...).
        phase: "fwd" or "bwd".
        flops: floating-point operations (GEMMs only; 0 for epilogues).
        bytes: HBM bytes read and written.
        gemm: a vendor GEMM (time max(flops / peak, bytes / bandwidth)) or an epilogue (bytes /
            bandwidth).
    """

    name: str
    phase: str
    flops: int
    bytes: int
    gemm: bool


def cost(n: int, m: int, d: int, dtype: torch.dtype, *, chunk: int, col_stats=True) -> list[Step]:
    """FLOPs and HBM bytes of every step of one forward and one backward (module doc) with
    ``chunk`` rows per chunk (the op layer's value: ``vljepa_fast.ops.infonce.chunk_rows``).

    Counted: every GEMM's operand reads (B and the H chunk once per chunk: at the paper shape
    they are larger than L2), its output writes and, for the accumulating E GEMM, the
    accumulator's read; every epilogue's reads and writes, O(N + M) vectors included. Not
    counted: launch gaps.
    """
    s = torch.empty((), dtype=dtype).element_size()
    c = min(chunk, n)
    k = -(-n // c)  # chunks
    parts, groups = _epilogue_grid(c, m)
    nm, nd, md = n * m, n * d, m * d
    steps = [
        Step("fwd norms", "fwd", 0, (nd + md) * s + 4 * (n + m), False),
        Step("fwd GEMM S = A_c B^T", "fwd", 2 * nm * d, nd * s + k * md * s + 4 * nm, True),
        Step(
            "fwd epilogue",
            "fwd",
            0,
            4 * nm + 8 * parts * n + (16 * m * k * groups if col_stats else 0) + 8 * n,
            False,
        ),
        Step("fwd row merge", "fwd", 0, 8 * parts * n + 12 * n, False),
        Step("bwd norms", "bwd", 0, (nd + md) * s + 4 * (n + m), False),
        Step("bwd GEMM S = A_c B^T", "bwd", 2 * nm * d, nd * s + k * md * s + 4 * nm, True),
        Step(
            "bwd epilogue",
            "bwd",
            0,
            (4 + s) * nm + 4 * parts * n + 8 * m * k * groups + 24 * n,
            False,
        ),
        Step("bwd GEMM G = H_c B", "bwd", 2 * nm * d, s * nm + k * md * s + 4 * nd, True),
        Step("bwd dA finalize", "bwd", 0, 4 * nd + 2 * nd * s + 4 * parts * n, False),
        Step(
            "bwd GEMM E += H_c^T A_c",
            "bwd",
            2 * nm * d,
            # E (fp32; dB itself for fp32 inputs) written by the first chunk, read and written
            # by the others
            s * nm + nd * s + (2 * k - 1) * md * 4,
            True,
        ),
        Step("bwd dB finalize", "bwd", 0, 4 * md + 2 * md * s + 4 * m * groups, False),
    ]
    return steps


def predicted_seconds(
    n: int,
    m: int,
    d: int,
    dtype: torch.dtype,
    mode: str = "fwd+bwd",
    *,
    chunk: int,
    overlap: bool = True,
    peak_flops: float | None = None,
    bandwidth: float = PEAK_BANDWIDTH,
) -> float:
    """The H200 time the design implies for ``mode`` ("fwd", "bwd" or "fwd+bwd") with ``chunk``
    rows per chunk: the sum over :func:`cost`'s steps of, for a GEMM, max(flops / peak, bytes /
    bandwidth) (``overlap``: a GEMM's own operand and output traffic hides under its math, the
    roofline) or flops / peak + bytes / bandwidth (``overlap=False``: nothing overlaps, an upper
    bound), and for an epilogue bytes / bandwidth. Launch gaps are ignored. ``peak_flops``
    defaults to :data:`PEAK_FLOPS` of the dtype."""
    if mode not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd+bwd', got {mode!r}")
    peak = PEAK_FLOPS[dtype] if peak_flops is None else peak_flops
    total = 0.0
    for step in cost(n, m, d, dtype, chunk=chunk):
        if step.phase in mode.split("+"):
            math_s, memory_s = step.flops / peak, step.bytes / bandwidth
            if not step.gemm:
                total += memory_s
            else:
                total += max(math_s, memory_s) if overlap else math_s + memory_s
    return total
