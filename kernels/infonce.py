"""Fused InfoNCE: row and column log-sum-exp of S = scale * Â B̂^T and its gradients, in Triton.

Math. A [N, D], B [M, D]; Â = A / max(||A_i||, eps) row-wise (identity when ``normalize`` is
off), likewise B̂; S_ij = scale * Â_i . B̂_j. The positive of row i is column i + offset (of column
j, row j - offset); a row or column whose positive falls outside S has none (positive logit 0, no
indicator term). ``eps`` is an argument of the launchers (a compile-time constant of the
kernels); the package passes ``vljepa_fast.reference.NORM_EPS``, the one owner of its value.
With per-row and per-column upstream gradients g_row [N], g_col [M]:

    loss    = sum_i g_row_i (row_lse_i - S_i,i+off) + sum_j g_col_j (col_lse_j - S_j-off,j)
    dS_ij   = g_row_i (exp(S_ij - row_lse_i) - [j = i+off])
            + g_col_j (exp(S_ij - col_lse_j) - [j = i+off])
    dÂ_i    = scale sum_j dS_ij B̂_j                  dB̂_j = scale sum_i dS_ij Â_i
    dscale  = sum_ij dS_ij S_ij / scale = sum_ij dS_ij cos_ij
    dA_i    = (dÂ_i - Â_i (Â_i . dÂ_i)) / ||A_i||,   Â_i . dÂ_i = sum_j dS_ij S_ij
    dA_i    = 0 where ||A_i|| < eps (zero rows: the rule of reference.normalize_rows), likewise dB

The last identity is why the normalisation backward costs no extra pass: the row reduction
r_i = sum_j dS_ij cos_ij that dscale needs is also the projection coefficient, so it is
accumulated beside the gradient and applied in an O(BM * D) epilogue.

Memory. S is never stored. Only the inverse norms [N] and [M] are materialised (no normalised
copy: 1/||A_i|| and 1/||B_j|| scale the fp32 dot products, so Â and B̂ never exist in memory).
Forward: the S tiles are cut into at most max_splits (16) row groups of consecutive row blocks
and as many column splits of consecutive column tiles; the program of (group g, split s) sweeps
its block of tiles with the online max / sum-exp (flash-attention style) for its rows, and for
its columns a (max, sum-exp) pair over the group's rows, merged tile by tile into
col_max/col_sum[g] (only that program touches those entries: no races, no atomics). The rows'
pairs of each split go to row_max/row_sum[s]; a small kernel merges the partials in a fixed
order and rounds each lse once, to float64 (see Numerics). The partials are 2 max_splits x (N +
M) fp32 whatever the batch: 4 MB at N = M = 16k, 4% of the bf16 inputs, versus 1 GB for S in
fp32, and the grid has up to 256 programs for any N >= 16 * BM.
Backward: one kernel launched twice, each program owning a block of rows of the gradient it
writes (DB=False: BM rows of A, sweeping the column tiles; DB=True: BN rows of B, i.e. columns
of S, sweeping the row tiles), so no atomics are needed and the result is deterministic. Each
launch recomputes its S tiles, always as [A rows, B rows] like the forward (four GEMMs of N*M*D
in all instead of three: the price of determinism). dscale comes from per-program partial sums
of the dA launch, added in a fixed order.

Why the gradient accumulator lives in global memory. A program owns BM rows of dA, a [BM, D]
fp32 accumulator: at D = 1536 that is 768 KB for BM = 128, far more than a block's registers or
shared memory, and splitting D across programs would recompute the full-D S tile once per split.
So for each S tile the program sweeps D in chunks of BD, loading its own [BM, BD] fp32
accumulator chunk, adding dS @ B̂[:, chunk] and storing it back; the accumulator is private to
the program (no races) and mostly served from L2. The traffic is 8 * BM * D bytes per S tile
against 4 * BM * BN * D flops, so BN / 2 flops per byte: BN is the lever if it limits speed. The
accumulator is the dA output itself for fp32 inputs and an fp32 workspace of max(N, M) x D
otherwise (shared by the dA and dB launches), the only O(N*D) extra memory of the backward. A
final epilogue turns it into dA in A's dtype.

Numerics. Accumulation is fp32 and maxima are subtracted before every exponential, so logits of
any size (temperature 0.01 with |S| up to 1e4) give no overflow. The lse outputs are float64:
the forward keeps (max, sum-exp) pairs and rounds max + log(sum) once, to double, and the
backward splits each lse into float hi + lo and forms exp((S - hi) - lo), exact near the maximum
(Sterbenz). A float lse would be off by up to half an ulp of |S| (5e-4 at 1e4) and scale every
probability of its row by that factor (dscale errors up to 10x eager's were seen at temperature
0.01 with |S| ~ 1e4). Exponentials are exp2 with log2(e) applied after the subtraction, exp2((S
- m) * log2(e)), rather than folded into the scale: at |S| ~ 1e4 an fp32 logit has an ulp of
1e-3, and keeping S, the lse outputs and their round trip through the backward in natural units
makes a dominant logit's probability exactly exp2(0) = 1 instead of 1 +- 1e-3 (the cost is one
multiply per exponential). For the same reason every kernel forms S with one expression, raw *
(1/||A_i|| * 1/||B_j||) * scale, symmetric in A and B, and the forward and backward default
configs share BK: the backward's recomputed S (either orientation) repeats the forward's
arithmetic. tl.dot runs on bf16/fp16 tensor cores on the GPU (fp32 inputs use 3xTF32, about
fp32-accurate; plain TF32 would put a 1e-3 relative error on every logit); under the interpreter
its operands are upcast to fp32 (the interpreter's bf16 dot is wrong), selected by the
``INTERPRET`` constexpr. dS is multiplied by a power of two 2^-ceil(log2(max |g|)) before it is
cast to the 16-bit dot type, so that the small probabilities of a large batch (g ~ 1/N) do not
underflow fp16; the epilogue divides it out. The normalisation backward's projection coefficient
is taken from that rounded dS, so dA stays orthogonal to Â up to fp32 rounding.

Limits. Offsets are int32: N * D, M * D, 64 * N and 64 * M must stay below 2^31, and the
positive offset must lie in [-N, M] (beyond it no row or column would have a positive). Loads are
vectorised when D is a multiple of 16 (the JIT specialises on it); other D run correctly but
with scalar loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpreting, launch

__all__ = [
    "InfoNCEConfig",
    "backward_config",
    "forward_config",
    "infonce_backward",
    "infonce_forward",
]

_LOG2E = tl.constexpr(1.4426950408889634)
# Rows x D-slice of the inverse-norm kernel, and rows or columns per program of the lse merge.
_NORM_BLOCK = (64, 64)
_MERGE_BLOCK = 256
# Largest InfoNCEConfig.max_splits: bounds the partials' int32 offsets (see _check_inputs).
_MAX_SPLITS_LIMIT = 64


@dataclass(frozen=True)
class InfoNCEConfig:
    """Tile sizes and launch options of the InfoNCE kernels.

    Attributes:
        block_m: rows of S per tile; a forward or dA program owns that many rows of A.
        block_n: columns of S per tile; a dB program owns that many rows of B.
        block_k: slice of D per step of the S GEMM.
        block_d: slice of D per step of the gradient GEMM and epilogue (backward only).
        num_warps: warps per program.
        num_stages: software pipelining depth of the GEMM loops.
        max_splits: forward only: at most this many row groups and as many column splits
            (a grid of up to max_splits^2 programs); the lse partials take
            2 * max_splits * (N + M) fp32, whatever N and M.
    """

    block_m: int
    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int
    max_splits: int = 16


def forward_config(dtype: torch.dtype) -> InfoNCEConfig:
    """Default forward tiles for inputs of ``dtype``.

    Chosen so that ptxas spills nothing on sm_80 and sm_90; fp32 inputs use 3xTF32 dots (three
    MMAs on split operands), which need smaller tiles.
    """
    if dtype == torch.float32:
        return InfoNCEConfig(128, 64, 16, 32, num_warps=8, num_stages=3)
    # BK 32 (shared with the backward): at BK 64 the 128 x 128 tile plus the column-partial
    # merge spills on sm_80 with three stages, and the backward's dA pass spills at BK 64.
    return InfoNCEConfig(128, 128, 32, 32, num_warps=8, num_stages=3)


def backward_config(dtype: torch.dtype) -> InfoNCEConfig:
    """Default backward tiles for inputs of ``dtype`` (no spills on sm_80 and sm_90).

    BK equals the forward's, so the recomputed S tiles sum their products in the same order.
    """
    if dtype == torch.float32:
        return InfoNCEConfig(64, 32, 16, 16, num_warps=8, num_stages=2)
    return InfoNCEConfig(128, 64, 32, 32, num_warps=8, num_stages=2)


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
def _s_tile(
    x_ptr,
    y_ptr,
    o_m,
    o_n,
    m_m,
    m_n,
    D,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Raw dot products x[o_m] . y[o_n] as a [BM, BN] fp32 tile (zero outside the masks)."""
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    o_mx = o_m * D
    o_ny = o_n * D
    for k0 in range(0, D, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < D
        # [BM, BK]
        b_x = tl.load(
            x_ptr + o_mx[:, None] + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0
        )
        # [BN, BK]
        b_y = tl.load(
            y_ptr + o_ny[:, None] + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0
        )
        if INTERPRET:
            b_x = b_x.to(tl.float32)
            b_y = b_y.to(tl.float32)
        # [BM, BN]
        b_acc = tl.dot(b_x, tl.trans(b_y), acc=b_acc, input_precision=DOT_PRECISION)
    return b_acc


@triton.jit
def _infonce_fwd_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    inv_a_ptr,
    inv_b_ptr,
    row_max_ptr,
    row_sum_ptr,
    col_max_ptr,
    col_sum_ptr,
    pos_row_ptr,
    N,
    M,
    D,
    offset,
    blocks_per_group,
    tiles_per_split,
    NORMALIZE: tl.constexpr,
    COL_STATS: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Program (split s, group g): the S block [rows of group g, columns of split s].

    Writes (max, sum of exp(x - max)) of each of its rows over the split's columns to
    row_max/row_sum[s], the same of each of its columns over the group's rows to
    col_max/col_sum[g], and the positives its block holds. Pairs rather than an lse: a float
    lse rounds to half an ulp of |S| (the merge rounds once, to float64).
    """
    i_s = tl.program_id(0)
    i_g = tl.program_id(1)
    b_scale = tl.load(scale_ptr)
    i_lo = i_g * blocks_per_group * BM
    i_hi = tl.minimum(i_lo + blocks_per_group * BM, N)
    j_lo = i_s * tiles_per_split * BN
    j_hi = tl.minimum(j_lo + tiles_per_split * BN, M)
    for i0 in range(i_lo, i_hi, BM):
        o_m = i0 + tl.arange(0, BM)
        m_m = o_m < N
        o_p = o_m + offset
        if NORMALIZE:
            b_ia = tl.load(inv_a_ptr + o_m, mask=m_m, other=0.0)
        b_mx = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        for j0 in range(j_lo, j_hi, BN):
            o_n = j0 + tl.arange(0, BN)
            m_n = o_n < M
            # [BM, BN] logits; rows/columns outside S are 0 here (zero-filled loads). The same
            # expression as in the backward, symmetric in the two inverse norms, so that the
            # backward's recomputed S (of either orientation) is this S to the bit.
            b_s = _s_tile(a_ptr, b_ptr, o_m, o_n, m_m, m_n, D, INTERPRET, DOT_PRECISION, BM, BN, BK)
            if NORMALIZE:
                b_ib = tl.load(inv_b_ptr + o_n, mask=m_n, other=0.0)
                b_s = b_s * (b_ia[:, None] * b_ib[None, :])
            b_s = b_s * b_scale
            # The positive (i, i + offset) lies in exactly one tile of one program: written there.
            b_pos = tl.sum(tl.where(o_n[None, :] == o_p[:, None], b_s, 0.0), 1)
            m_pos = m_m & (o_p >= j0) & (o_p < j0 + BN) & (o_p < M)
            tl.store(pos_row_ptr + o_m, b_pos, mask=m_pos)
            # Only columns outside S are excluded from the row statistics: a row outside S stays
            # finite (all zeros) and is never stored, and no NaN is ever formed.
            b_sr = tl.where(m_n[None, :], b_s, float("-inf"))
            b_mn = tl.maximum(b_mx, tl.max(b_sr, 1))
            b_l = b_l * tl.exp2((b_mx - b_mn) * _LOG2E)
            b_l += tl.sum(tl.exp2((b_sr - b_mn[:, None]) * _LOG2E), 1)
            b_mx = b_mn
            if COL_STATS:
                b_sc = tl.where(m_m[:, None], b_s, float("-inf"))
                # [BN] column max and sum-exp over this row block; every column has a row in
                # S, so the max is finite.
                b_cm = tl.max(b_sc, 0)
                b_cl = tl.sum(tl.exp2((b_sc - b_cm[None, :]) * _LOG2E), 0)
                # Merged with the group's earlier row blocks (-inf and 0 before the first): only
                # this program touches col_*[g, split s], so the read-modify-write is race-free.
                o_c = i_g * M + o_n
                m_old = m_n & (i0 > i_lo)
                b_om = tl.load(col_max_ptr + o_c, mask=m_old, other=float("-inf"))
                b_ol = tl.load(col_sum_ptr + o_c, mask=m_old, other=0.0)
                b_nm = tl.maximum(b_om, b_cm)
                b_nl = b_ol * tl.exp2((b_om - b_nm) * _LOG2E)
                b_nl += b_cl * tl.exp2((b_cm - b_nm) * _LOG2E)
                tl.store(col_max_ptr + o_c, b_nm, mask=m_n)
                tl.store(col_sum_ptr + o_c, b_nl, mask=m_n)
        tl.store(row_max_ptr + i_s * N + o_m, b_mx, mask=m_m)
        tl.store(row_sum_ptr + i_s * N + o_m, b_l, mask=m_m)


@triton.jit
def _infonce_merge_kernel(
    max_ptr,
    sum_ptr,
    lse_ptr,
    pos_row_ptr,
    pos_ptr,
    L,
    R,
    N,
    M,
    offset,
    ROWS: tl.constexpr,
    BC: tl.constexpr,
):
    """float64 lse from the R partials (max, sum-exp) [R, L] of each of BC rows (ROWS) or columns
    of S, in partial order, and the positives the forward did not write: 0 for a row without a
    positive column; for a column, the row positive S[j - offset, j] (0 without one)."""
    i_c = tl.program_id(0)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < L
    b_mx = tl.full([BC], float("-inf"), dtype=tl.float32)
    for r in range(0, R):
        b_mx = tl.maximum(b_mx, tl.load(max_ptr + r * L + o_c, mask=m_c, other=0.0))
    b_l = tl.zeros([BC], dtype=tl.float32)
    for r in range(0, R):
        b_pm = tl.load(max_ptr + r * L + o_c, mask=m_c, other=0.0)
        # other=1: lanes past L stay finite (no log(0) below, even in the interpreter).
        b_l += tl.load(sum_ptr + r * L + o_c, mask=m_c, other=1.0) * tl.exp2((b_pm - b_mx) * _LOG2E)
    # The one rounding of the lse, to float64 (see "Numerics" in the module docstring).
    tl.store(lse_ptr + o_c, b_mx.to(tl.float64) + tl.log(b_l.to(tl.float64)), mask=m_c)
    if ROWS:
        o_p = o_c + offset
        b_zero = tl.zeros([BC], dtype=tl.float32)
        tl.store(pos_ptr + o_c, b_zero, mask=m_c & ((o_p < 0) | (o_p >= M)))
    else:
        o_p = o_c - offset
        m_p = m_c & (o_p >= 0) & (o_p < N)
        tl.store(pos_ptr + o_c, tl.load(pos_row_ptr + o_p, mask=m_p, other=0.0), mask=m_c)


@triton.jit
def _load_terms(hi_ptr, lo_ptr, g_ptr, o, m):
    """(hi, lo, g)[o]: lse[o] as float hi + lo (split on the host from the float64 lse) and the
    upstream gradient g[o] of the same rows or columns. exp((s - hi) - lo) keeps float accuracy
    at |s| ~ 1e4, where float(lse) alone is off by up to half an ulp (5e-4)."""
    return (
        tl.load(hi_ptr + o, mask=m, other=0.0),
        tl.load(lo_ptr + o, mask=m, other=0.0),
        tl.load(g_ptr + o, mask=m, other=0.0),
    )


@triton.jit
def _ds_tile(
    a_ptr,
    b_ptr,
    o_m,
    o_n,
    m_m,
    m_n,
    b_ia,
    b_ib,
    b_lr,
    b_lrl,
    b_gr,
    b_lc,
    b_lcl,
    b_gc,
    b_scale,
    offset,
    D,
    NORMALIZE: tl.constexpr,
    HAS_COL: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Raw dot products, cos and dS of the S tile [rows o_m of A, rows o_n of B], all [BM, BN].

    b_ia/b_ib: inverse norms (NORMALIZE), b_lr + b_lrl / b_gr: row lse as float hi + lo (see
    _load_terms) and g_row, b_lc + b_lcl / b_gc: the same for the columns (HAS_COL), each over the
    tile's rows or columns.
    """
    m_s = m_m[:, None] & m_n[None, :]
    b_raw = _s_tile(a_ptr, b_ptr, o_m, o_n, m_m, m_n, D, INTERPRET, DOT_PRECISION, BM, BN, BK)
    if NORMALIZE:
        b_cos = b_raw * (b_ia[:, None] * b_ib[None, :])
    else:
        b_cos = b_raw
    # The forward's logits to the bit (same expression); -inf outside S so that every
    # exponential below is 0 there.
    b_s = tl.where(m_s, b_cos * b_scale, float("-inf"))
    # [BM, BN] indicator of the positives
    b_pos = (m_s & (o_n[None, :] == (o_m + offset)[:, None])).to(tl.float32)
    b_ds = b_gr[:, None] * (tl.exp2(((b_s - b_lr[:, None]) - b_lrl[:, None]) * _LOG2E) - b_pos)
    if HAS_COL:
        b_pc = tl.exp2(((b_s - b_lc[None, :]) - b_lcl[None, :]) * _LOG2E)
        b_ds += b_gc[None, :] * (b_pc - b_pos)
    return b_raw, b_cos, b_ds


@triton.jit
def _acc_update(
    acc_ptr,
    y_ptr,
    o_p,
    m_p,
    o_q,
    m_q,
    b_w,
    has_prev,
    D,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BD: tl.constexpr,
):
    """acc[o_p] += b_w @ y[o_q], D-slice by D-slice: the program's private fp32 accumulator rows."""
    o_pa = o_p * D
    o_qy = o_q * D
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        p_acc = acc_ptr + o_pa[:, None] + o_d[None, :]
        m_acc = m_p[:, None] & m_d[None, :]
        # [BP, BD]; nothing to read before the first tile (the buffer is uninitialised).
        b_acc = tl.load(p_acc, mask=m_acc & has_prev, other=0.0)
        # [BQ, BD]
        b_y = tl.load(
            y_ptr + o_qy[:, None] + o_d[None, :], mask=m_q[:, None] & m_d[None, :], other=0.0
        )
        if INTERPRET:
            b_y = b_y.to(tl.float32)
        b_acc = tl.dot(b_w, b_y, acc=b_acc, input_precision=DOT_PRECISION)
        tl.store(p_acc, b_acc, mask=m_acc)


@triton.jit
def _fold(b_iy, b_c, y_ptr, EPS: tl.constexpr):
    """b_c / ||y_q|| per row q of the other operand y, folded into dS before its cast to y's
    dtype. fp16 has no non-zero row below eps (its smallest subnormal is 6e-8), so a clamped
    row there is a zero row: it folds with 0 instead of 1 / eps, which would overflow fp16 to
    inf and put inf * 0 = NaN into every gradient row of the GEMM."""
    b_f = b_iy * b_c
    if y_ptr.dtype.element_ty == tl.float16:
        b_f = tl.where(b_iy * EPS < 1.0, b_f, 0.0)
    return b_f


@triton.jit
def _grad_weights(
    b_ds,
    b_raw,
    b_iy,
    b_c,
    y_ptr,
    AXIS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    INTERPRET: tl.constexpr,
    EPS: tl.constexpr,
):
    """The left operand of the gradient GEMM and its projection terms, from a dS tile [BM, BN].

    AXIS is the axis of the tile the program reduces over (1: the dA pass, whose rows are A's;
    0: the dB pass), y the other operand and b_iy its inverse norms (along the other axis).
    Returns (b_w, b_rw): b_w = dS b_c / ||y_q|| (NORMALIZE; else dS b_c), rounded to y's dtype
    in both modes (the interpreter sees the GPU's rounding; upcast to fp32 for its dot), and
    b_rw = sum over AXIS of b_w * raw, this tile's share of the projection coefficient (0
    without NORMALIZE, where the epilogue does not read it)."""
    if NORMALIZE:
        b_f = tl.expand_dims(_fold(b_iy, b_c, y_ptr, EPS), 1 - AXIS)
        b_w = (b_ds * b_f).to(y_ptr.dtype.element_ty)
        b_rw = tl.sum(b_w.to(tl.float32) * b_raw, AXIS)
    else:
        b_w = (b_ds * b_c).to(y_ptr.dtype.element_ty)
        b_rw = 0.0
    if INTERPRET:
        b_w = b_w.to(tl.float32)
    return b_w, b_rw


@triton.jit
def _grad_epilogue(
    acc_ptr,
    x_ptr,
    dx_ptr,
    o_p,
    m_p,
    b_ix,
    b_rw,
    b_scale,
    b_c,
    D,
    NORMALIZE: tl.constexpr,
    EPS: tl.constexpr,
    BD: tl.constexpr,
):
    """dx_p = scale / ||x_p|| (G_p - x̂_p r_p) with G_p = acc_p / b_c, in x's dtype; 0 for rows
    whose norm is below eps (NORMALIZE)."""
    b_f = b_scale * b_ix / b_c
    if NORMALIZE:
        # r_p = b_rw / (||x_p|| b_c). A row clamped to the eps norm (a zero row) gets a zero
        # gradient, the rule of reference.normalize_rows: it has no direction, and its 1 / eps
        # slope would overflow fp16.
        b_big = b_ix * EPS < 1.0
        b_f = tl.where(b_big, b_f, 0.0)
        b_pr = tl.where(b_big, b_scale * b_ix * b_ix * b_ix * b_rw / b_c, 0.0)
    o_px = o_p * D
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_x = m_p[:, None] & (o_d < D)[None, :]
        # [BP, BD]
        b_dx = tl.load(acc_ptr + o_px[:, None] + o_d[None, :], mask=m_x, other=0.0) * b_f[:, None]
        if NORMALIZE:
            b_x = tl.load(x_ptr + o_px[:, None] + o_d[None, :], mask=m_x, other=0.0)
            b_dx -= b_pr[:, None] * b_x.to(tl.float32)
        tl.store(dx_ptr + o_px[:, None] + o_d[None, :], b_dx.to(dx_ptr.dtype.element_ty), mask=m_x)


@triton.jit
def _infonce_bwd_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    gmax_ptr,
    inv_a_ptr,
    inv_b_ptr,
    row_hi_ptr,
    row_lo_ptr,
    col_hi_ptr,
    col_lo_ptr,
    g_row_ptr,
    g_col_ptr,
    acc_ptr,
    d_ptr,
    dscale_part_ptr,
    N,
    M,
    D,
    offset,
    NORMALIZE: tl.constexpr,
    HAS_COL: tl.constexpr,
    DB: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EPS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    """dA (DB False: a program owns BM rows of A, sweeps the column tiles, writes dA and its
    dscale partial) or dB (DB True: a program owns BN rows of B, i.e. columns of S, sweeps the
    row tiles). Both compute their S tiles as [A rows, B rows] like the forward, so the
    recomputed logits are the forward's.
    """
    i_p = tl.program_id(0)
    b_scale = tl.load(scale_ptr)
    # Power of two that brings max |g| to [0.5, 1]: dS fits the 16-bit dot type without
    # underflow, and multiplying by it is exact.
    b_c = tl.exp2(-tl.ceil(tl.log2(tl.maximum(tl.load(gmax_ptr), 1e-30))))
    # r_p = sum_q dS_pq cos_pq, the projection coefficient of the normalisation backward
    # (Â_p . dÂ_p = scale r_p), accumulated as b_rw = sum_q dS'_pq raw_pq from the dS' = dS b_c /
    # ||y_q|| rounded for the gradient GEMM, so that dx stays orthogonal to x̂.
    if not DB:
        o_m = i_p * BM + tl.arange(0, BM)
        m_m = o_m < N
        b_ia = tl.full([BM], 1.0, dtype=tl.float32)
        if NORMALIZE:
            b_ia = tl.load(inv_a_ptr + o_m, mask=m_m, other=0.0)
        b_lr, b_lrl, b_gr = _load_terms(row_hi_ptr, row_lo_ptr, g_row_ptr, o_m, m_m)
        # dscale / scale share of these rows, from the fp32 dS.
        b_r = tl.zeros([BM], dtype=tl.float32)
        b_rw = tl.zeros([BM], dtype=tl.float32)
        for j0 in range(0, M, BN):
            o_n = j0 + tl.arange(0, BN)
            m_n = o_n < M
            # Unused operands (no normalisation, no column term) get the scalar scale.
            b_ib, b_lc, b_lcl, b_gc = b_scale, b_scale, b_scale, b_scale
            if NORMALIZE:
                b_ib = tl.load(inv_b_ptr + o_n, mask=m_n, other=0.0)
            if HAS_COL:
                b_lc, b_lcl, b_gc = _load_terms(col_hi_ptr, col_lo_ptr, g_col_ptr, o_n, m_n)
            b_raw, b_cos, b_ds = _ds_tile(
                a_ptr, b_ptr, o_m, o_n, m_m, m_n, b_ia, b_ib, b_lr, b_lrl, b_gr, b_lc, b_lcl,
                b_gc, b_scale, offset, D, NORMALIZE, HAS_COL, INTERPRET, DOT_PRECISION, BM, BN, BK,
            )  # fmt: skip
            b_r += tl.sum(b_ds * b_cos, 1)
            # [BM, BN] left operand of sum_j dS_ij B̂_j = sum_j (dS_ij / ||B_j||) B_j, times b_c.
            b_w, b_rwt = _grad_weights(b_ds, b_raw, b_ib, b_c, b_ptr, 1, NORMALIZE, INTERPRET, EPS)
            b_rw += b_rwt
            _acc_update(
                acc_ptr, b_ptr, o_m, m_m, o_n, m_n, b_w, j0 > 0, D, INTERPRET, DOT_PRECISION, BD
            )
        tl.store(dscale_part_ptr + i_p, tl.sum(b_r, 0))
        _grad_epilogue(
            acc_ptr, a_ptr, d_ptr, o_m, m_m, b_ia, b_rw, b_scale, b_c, D, NORMALIZE, EPS, BD
        )
    else:
        o_n = i_p * BN + tl.arange(0, BN)
        m_n = o_n < M
        b_ib = tl.full([BN], 1.0, dtype=tl.float32)
        if NORMALIZE:
            b_ib = tl.load(inv_b_ptr + o_n, mask=m_n, other=0.0)
        b_lc, b_lcl, b_gc = b_scale, b_scale, b_scale
        if HAS_COL:
            b_lc, b_lcl, b_gc = _load_terms(col_hi_ptr, col_lo_ptr, g_col_ptr, o_n, m_n)
        b_rw = tl.zeros([BN], dtype=tl.float32)
        for i0 in range(0, N, BM):
            o_m = i0 + tl.arange(0, BM)
            m_m = o_m < N
            b_ia = b_scale
            if NORMALIZE:
                b_ia = tl.load(inv_a_ptr + o_m, mask=m_m, other=0.0)
            b_lr, b_lrl, b_gr = _load_terms(row_hi_ptr, row_lo_ptr, g_row_ptr, o_m, m_m)
            b_raw, b_cos, b_ds = _ds_tile(
                a_ptr, b_ptr, o_m, o_n, m_m, m_n, b_ia, b_ib, b_lr, b_lrl, b_gr, b_lc, b_lcl,
                b_gc, b_scale, offset, D, NORMALIZE, HAS_COL, INTERPRET, DOT_PRECISION, BM, BN, BK,
            )  # fmt: skip
            # [BM, BN] dS_ij / ||A_i|| times b_c; its transpose is the left operand of dB̂.
            b_w, b_rwt = _grad_weights(b_ds, b_raw, b_ia, b_c, a_ptr, 0, NORMALIZE, INTERPRET, EPS)
            b_rw += b_rwt
            _acc_update(
                acc_ptr, a_ptr, o_n, m_n, o_m, m_m, tl.trans(b_w), i0 > 0, D, INTERPRET,
                DOT_PRECISION, BD,
            )  # fmt: skip
        _grad_epilogue(
            acc_ptr, b_ptr, d_ptr, o_n, m_n, b_ib, b_rw, b_scale, b_c, D, NORMALIZE, EPS, BD
        )


def _dot_precision(dtype: torch.dtype) -> str:
    # Plain TF32 would put ~1e-3 relative error on every logit; 3xTF32 is about fp32-exact.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _options(a: Tensor, normalize: bool, cfg: InfoNCEConfig) -> dict:
    """The launch options the forward and both backward passes share."""
    return dict(
        NORMALIZE=normalize,
        INTERPRET=interpreting(a),
        DOT_PRECISION=_dot_precision(a.dtype),
        BM=cfg.block_m,
        BN=cfg.block_n,
        BK=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _check_inputs(a: Tensor, b: Tensor, scale: Tensor, offset: int) -> None:
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
    # Element offsets are int32: rows x D of each input and the lse partials (max_splits rows).
    if max(n, m) * max(d, _MAX_SPLITS_LIMIT) >= 2**31:
        raise ValueError(f"A {tuple(a.shape)}, B {tuple(b.shape)}: offsets overflow int32")
    # Outside [-N, M] no row or column has a positive; bounding it keeps i + offset and
    # j - offset inside int32 in the kernels (every positive index is masked against S).
    if isinstance(offset, bool) or not isinstance(offset, int) or not -n <= offset <= m:
        raise ValueError(f"offset must be an int in [-N, M] = [{-n}, {m}], got {offset!r}")


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


def infonce_forward(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    offset: int = 0,
    normalize: bool = True,
    col_stats: bool = True,
    *,
    eps: float,
    config: InfoNCEConfig | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Row and column log-sum-exp and positive logits of S = scale * Â B̂^T, without storing S.

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
        config: tile sizes; default :func:`forward_config` of the dtype.

    Returns:
        (row_lse [N], col_lse [M] or None, pos_row [N], pos_col [M] or None):
        logsumexp_j S_ij and logsumexp_i S_ij in float64 (one rounding, so that the backward's
        exp(S - lse) keeps fp32 accuracy at any |S|), S[i, i + offset] and S[j - offset, j] in
        fp32.
        Extra memory beyond the outputs: the inverse norms [N] and [M] when ``normalize``, and
        the lse partials: (max, sum-exp) pairs, at most 2 max_splits x N fp32 for the rows and,
        with ``col_stats``, 2 max_splits x M for the columns (the config's max_splits, 16 by
        default): linear in N and M, never N x M.
    """
    _check_inputs(a, b, scale, offset)
    cfg = config or forward_config(a.dtype)
    if not 1 <= cfg.max_splits <= _MAX_SPLITS_LIMIT:
        raise ValueError(
            f"config.max_splits must be in [1, {_MAX_SPLITS_LIMIT}], got {cfg.max_splits}"
        )
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    dev = a.device
    inv_a, inv_b = (_inv_norms(a, eps), _inv_norms(b, eps)) if normalize else (scale, scale)
    blocks_per_group, groups = _split(triton.cdiv(n, cfg.block_m), cfg.max_splits)
    tiles_per_split, splits = _split(triton.cdiv(m, cfg.block_n), cfg.max_splits)
    row_lse = torch.empty(n, device=dev, dtype=torch.float64)
    pos_row = torch.empty(n, device=dev, dtype=torch.float32)
    # (max, sum-exp) partials: [2, splits, N] for the rows, [2, groups, M] for the columns.
    row_part = torch.empty((2, splits, n), device=dev, dtype=torch.float32)
    col_part = torch.empty((2, groups, m) if col_stats else (2, 1), device=dev, dtype=torch.float32)
    launch(
        _infonce_fwd_kernel,
        (splits, groups),
        a,
        b,
        scale,
        inv_a,
        inv_b,
        row_part[0],
        row_part[1],
        col_part[0],
        col_part[1],
        pos_row,
        n,
        m,
        d,
        offset,
        blocks_per_group,
        tiles_per_split,
        COL_STATS=col_stats,
        **_options(a, normalize, cfg),
    )
    _merge(row_part, row_lse, pos_row, pos_row, n, m, offset, rows=True)
    if not col_stats:
        return row_lse, None, pos_row, None
    col_lse = torch.empty(m, device=dev, dtype=torch.float64)
    pos_col = torch.empty(m, device=dev, dtype=torch.float32)
    _merge(col_part, col_lse, pos_row, pos_col, n, m, offset, rows=False)
    return row_lse, col_lse, pos_row, pos_col


def _split(blocks: int, max_parts: int) -> tuple[int, int]:
    """(blocks per part, parts): ``blocks`` cut into at most ``max_parts`` consecutive runs."""
    per = triton.cdiv(blocks, min(blocks, max_parts))
    return per, triton.cdiv(blocks, per)


def _merge(
    part: Tensor, lse: Tensor, pos_row: Tensor, pos: Tensor, n: int, m: int, offset: int, rows: bool
) -> None:
    """lse [L] float64 from the (max, sum-exp) partials part [2, R, L]; see the merge kernel."""
    length = lse.shape[0]
    launch(
        _infonce_merge_kernel,
        (triton.cdiv(length, _MERGE_BLOCK),),
        part[0],
        part[1],
        lse,
        pos_row,
        pos,
        length,
        part.shape[1],
        n,
        m,
        offset,
        ROWS=rows,
        BC=_MERGE_BLOCK,
    )


def _split_lse(lse: Tensor) -> tuple[Tensor, Tensor]:
    """float64 [L] -> float32 (hi, lo), hi = float(lse), hi + lo = lse to about 2^-48 relative."""
    hi = lse.float()
    return hi, (lse - hi.double()).float()


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
    config: InfoNCEConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i g_row_i (row_lse_i - pos_row_i) + sum_j g_col_j (col_lse_j - pos_col_j).

    S is recomputed tile by tile (never stored). Deterministic: dA is written by programs over
    row blocks, dB by programs over column blocks, dscale is a fixed-order sum of per-program
    partials; no atomics.

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
        config: tile sizes; default :func:`backward_config` of the dtype.

    Returns:
        (dA [N, D] in A's dtype, dB [M, D] in B's dtype, dscale 0-dim fp32).
        Extra memory beyond the outputs: the inverse norms when ``normalize``, the lse split
        into fp32 hi + lo ([N] and [M] each) and, for fp16/bf16 inputs, one fp32 accumulator
        of max(N, M) x D shared by the dA and dB passes.
    """
    _check_inputs(a, b, scale, offset)
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
    cfg = config or backward_config(a.dtype)
    dev = a.device
    inv_a, inv_b = (_inv_norms(a, eps), _inv_norms(b, eps)) if normalize else (scale, scale)
    gmax = g_row.abs().amax()
    if g_col is not None:
        gmax = torch.maximum(gmax, g_col.abs().amax())
    da, db = torch.empty_like(a), torch.empty_like(b)
    fp32 = a.dtype == torch.float32
    work = None if fp32 else torch.empty((max(n, m), d), device=dev, dtype=torch.float32)
    dscale_part = torch.empty(triton.cdiv(n, cfg.block_m), device=dev, dtype=torch.float32)
    # Unused pointers (no column term) alias the row ones; the kernel never reads them.
    row_hi, row_lo = _split_lse(row_lse)
    col_hi, col_lo = (row_hi, row_lo) if g_col is None else _split_lse(col_lse)
    g_col_arg = g_row if g_col is None else g_col
    args = (a, b, scale, gmax, inv_a, inv_b, row_hi, row_lo, col_hi, col_lo, g_row, g_col_arg)
    # The dA pass (programs over row blocks of A), then the dB pass (over row blocks of B).
    passes = ((False, triton.cdiv(n, cfg.block_m), da), (True, triton.cdiv(m, cfg.block_n), db))
    for db_pass, programs, out in passes:
        launch(
            _infonce_bwd_kernel,
            (programs,),
            *args,
            out if fp32 else work,
            out,
            dscale_part,
            n,
            m,
            d,
            offset,
            HAS_COL=g_col is not None,
            DB=db_pass,
            EPS=eps,
            BD=cfg.block_d,
            **_options(a, normalize, cfg),
        )
    return da, db, dscale_part.sum()
