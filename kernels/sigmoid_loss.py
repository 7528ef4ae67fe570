"""Chunked sigmoid (SigLIP) loss: for 16-bit inputs ONE fused Triton GEMM-plus-epilogue kernel
for the logits and vendor GEMMs for the two gradient products; for fp32 inputs vendor GEMMs for
all three products and Triton epilogues around them.

Math. A [N, D], B [M, D]; with ``normalize`` ia_i = 1 / max(||A_i||, eps), ib_j likewise (1
without), Â_i = A_i ia_i, B̂_j = B_j ib_j; raw = A B^T, cos_ij = raw_ij ia_i ib_j; logits
x_ij = s cos_ij + b (s = logit_scale, b = logit_bias); z_ij = +1 when j == i + offset, else -1.

    row_loss_i = sum_j softplus(-z_ij x_ij)              (= -log sigmoid(z_ij x_ij))
    dS_ij      = g_i (-z_ij) sigmoid(-z_ij x_ij)          (the gradient of sum_i g_i row_loss_i
                                                           with respect to x_ij)
    d bias = sum_ij dS_ij        d scale = sum_ij dS_ij cos_ij
    dÂ_i = s sum_j dS_ij B̂_j      dB̂_j = s sum_i dS_ij Â_i
    dA_i = ia_i (dÂ_i - Â_i (Â_i . dÂ_i))      dB_j = ib_j (dB̂_j - B̂_j (B̂_j . dB̂_j))
    dA_i = 0 where ||A_i|| < eps (zero rows: vljepa_fast.reference.normalize_rows), likewise dB_j

(In exact arithmetic Â_i . dÂ_i = s sum_j dS_ij cos_ij; the finalize kernel takes the projection
coefficient from the computed dÂ_i itself, so dA_i is orthogonal to Â_i up to fp32 rounding
whatever the rounding of H and of the GEMM operands: with the 16-bit H and the coefficient from
the unrounded dS, a D = 1 row, whose exact gradient is 0, got 2^-9 s |dS|. Without
``normalize`` dA = dÂ.)

Chunks. A is cut into chunks of ``chunk`` rows (the op layer's rule, vljepa_fast/ops/_chunks.py,
fed with :func:`pair_bytes`; boundaries need not divide N). Per chunk A_c:

1-2, 16-bit inputs (fp16/bf16; CUDA, or CPU tensors through the interpreter): the fused
   ``_fused_kernel``. Program per (BM rows of the chunk, BN columns) tile: a K-loop over D with
   ``tl.dot`` on the RAW rows of A_c and B in their own dtype (fp32 accumulation, as the vendor
   GEMM), then the epilogue in registers: cos = raw ia_i ib_j in fp32 (the inverse norms applied
   there, exactly as the unfused design does, so the numerics are the same up to the order of
   the fp32 accumulation), the logits, the loss terms' row sums (one slot per column block), dS,
   the tile's sums of dS cos and of dS (one slot per tile), and with gradients H_c = 2^k s dS_c
   written in the GEMM dtype. Columns past M get the logit -inf, which makes their loss term
   and dS exactly 0 without a 2D mask (registers: see "Tiles" below). The forward alone writes
   no H: nothing of size c x M reaches memory.
1-2, fp32 inputs: raw_c = A_c B^T by a vendor GEMM (``torch.mm``, which follows torch's TF32
   setting; CPU tensors: fp32 mm) into a preallocated [c, M] fp32 buffer, and
   ``_epilogue_kernel`` reads it once (program: a row block of BR rows x a column split) into
   the same sums and H_c. Why not fused: a Triton fp32 ``tl.dot`` runs as TF32 (or 3xTF32 /
   IEEE FMA for full fp32) and would not use the tensor cores at the vendor GEMM's rate, and
   fp32 inputs are not the training shape.
   Either way ``_sum_parts_kernel`` adds the slots in a fixed order (no atomics: repeats are
   bit-identical).
3. With gradients: 2^k dÂ_c = H_c @ B̂ (vendor GEMM, ``torch.mm(..., out_dtype=torch.float32)``
   for 16-bit inputs, fp32 out, [c, D]); ``_finalize_kernel`` writes dA_c in A's dtype (Â_c
   recomputed in fp32 from A_c); and 2^k dB̂ = E += H_c^T Â_c (vendor addmm into an fp32
   [M, D] accumulator, in chunk order). After the last chunk ``_finalize_kernel`` writes dB from
   E in B's dtype.

Tiles of the fused kernel (``fused_config``). sm_90 (and, untested, later): 128 x 128 x 64, 8
warps (two warpgroups of m64n128k16 wgmma), 3 stages, 96 KiB shared memory; ptxas keeps every
variant in 114-249 registers with no spill (forward alone 114-147, with gradients 193-249; the
compile tier asserts it, tests/test_sigmoid_loss_triton.py). sm_80/86/89: 128 x 64 x 64, 8
warps, 3 stages (mma.sync m16n8k16, 100-175 registers, no spill): the 128-wide tile needs more
than 255 registers there and spills. The interpreter: 32 x 32 x 16 (small test shapes span
several tiles and K steps). Under the interpreter the dot operands are upcast to fp32 (its bf16
dot is wrong); on the GPU they stay 16-bit. Only Triton 3.6-era APIs (pointer loads, tl.dot,
tl.trans; no tensor descriptors); the register counts are Triton 3.8's. Programs run row block
fastest, so the programs in flight share one block of B (read from HBM once per chunk) and sweep
A_c (c D s bytes: 12.6 MB at the paper shape, resident in the 50 MB L2).

Why B̂ and not H_c ib_j. H_c holds 2^k s dS only: |dS_ij| <= |g_i|, so 2^k = 2^(14 - e) with
2^(e-1) <= |s| max|g| < 2^e (computed on the device, no host sync) bounds |H| below 2^14 and
keeps the small terms of a large batch (g ~ 1/N, sigmoid ~ e^-20) out of fp16's underflow.
Folding ib_j (up to 1/eps = 1e12 for a near-zero row) into H would make that bound unknowable;
B̂ (rows of norm <= 1) is materialised once per call in the GEMM dtype instead.

Extra memory of one call (c = chunk rows, s = itemsize, T = ceil(M / BN) column blocks).
16-bit inputs: forward alone: the loss's row slots (4 c T; ``pair_bytes`` 1 bounds them for
BN >= 4); with gradients (``pair_bytes`` s): H_c (s c M) and the row slots, plus B̂ (s M D;
none without normalize), E (4 M D), 2^k dÂ_c (4 c D), Â_c (s c D; none without normalize) and
two fp32 slots per tile. fp32 inputs: the [c, M] fp32 buffer (``pair_bytes`` 4, with gradients
4 + 4 for H_c), the same [M, D] / [c, D] buffers, 3 x splits x c fp32 partial sums (splits <=
ceil(528 / ceil(c / 16))). Always the O(N + M) vectors (norms, row sums).

Paper shape: B = N = M = 65,536, D = 768, bf16 (s = 2; bench/presets.py), default budget 1 GiB
(vljepa_fast/ops/_chunks.py): training pass c = 8192 rows (H: 2 bytes per pair), C = 8 chunks,
T = 512. The op layer runs the training path (reduction "mean" or "sum" with gradients) as ONE
forward pass of steps 1-3 (the upstream gradient of a scalar is a constant factor, applied in
the backward: no recompute):

    FLOPs: 3 GEMMs x 2 N^2 D = 6 N^2 D = 19.8 TFLOP            -> 25.1 ms at 790 TFLOP/s
    HBM:   6 N^2 (H written 2, read by the two gradient GEMMs 2 + 2)   = 25.8 GB
           + the loss's row slots, written and read (8 N T)           =  0.3 GB
           + B per chunk (fused kernel) and B̂ per chunk (H_c B̂), A once
             (2 M D s C + N D s)                                      =  1.7 GB
           + E read and written once per chunk (8 M D C)               =  3.2 GB
           + dA, dB, B̂ written (3 N D s)                               =  0.3 GB
           = 31.3 GB                                                  ->  7.3 ms at 4.3 TB/s
    model (bench/_harness.model_seconds: the two added, no overlap): 32.3 ms (the unfused
    design, 14 bytes per pair, C = 25: 75.6 GB, 42.6 ms). Per kernel, max(flops, bytes): each
    GEMM overlaps its own traffic (per chunk 1.04 ms of FLOPs against 0.25 ms for H), so ~26 ms.
    Not in the model: the epilogue's ALU work, ~30 FP32 and 4 MUFU (exp, log, two reciprocals)
    instructions per pair, about 5 ms over the N^2 pairs on an H200 if none of it overlaps the
    tensor cores (one 256-thread program per SM at ~250 registers: no second program to hide
    it), and a Triton GEMM's rate below cuBLAS's (at 600 TFLOP/s the fused kernel's 6.6 TFLOP
    take 11 ms, not 8.4). With both: ~34 ms with each kernel overlapping its own traffic, ~40 ms
    with nothing overlapping: the issue's 40 ms is within reach, not guaranteed, until a GPU
    measures it. (The unfused design's epilogue hid the same ALU work under its 8 bytes per pair
    of fp32 traffic.)
    Forward alone (reduction "none", or no gradient; 1 byte per pair in the chunk rule:
    c = 16384, C = 4): 2 N^2 D = 6.6 TFLOP (8.4 ms) and N D s (1 + C) + 8 N T = 0.8 GB (0.2 ms):
    8.5 ms. The backward of "none" recomputes steps 1-3: 6 N^2 D and the training pass's bytes.

Numerics. Logits, loss terms and every reduction are fp32; softplus(u) = max(u, 0) +
log1p(exp(-|u|)) with log1p by the exact w = 1 + e correction (log(w) e / (w - 1)), so the
terms of far negatives (x ~ -20: softplus ~ 2e-9) keep fp32's relative accuracy, as
torch.nn.functional.logsigmoid does. H is rounded once to the GEMM dtype; d scale and d bias
use the unrounded fp32 dS. Non-finite inputs: the fused kernel's padding columns (past M, b's
rows loaded as 0) are neutralised by the logit -inf, not by a mask, so a row of a holding ±Inf
(normalize off) meets Inf x 0 there and its row sum (and the tile's sums) become NaN, where the
pairs alone may give ±Inf; other rows are untouched. A 2D mask would cost the registers the
128 x 128 tile does not have (the loss-and-gradient variant spills with one).

Limits. Row offsets are int64; c, M, D < 2^31.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpreting, launch

__all__ = [
    "EPILOGUE_BLOCK",
    "FUSED_DTYPES",
    "FusedConfig",
    "fused_config",
    "pair_bytes",
    "sigmoid_backward",
    "sigmoid_forward",
    "two_pow_k",
]

#: (rows, columns) of one epilogue block and the warps of its program (fp32 inputs).
EPILOGUE_BLOCK = (16, 64)
_EPILOGUE_WARPS = 4
#: programs the epilogue aims at per chunk (splits of the columns x row blocks): a few waves
#: of an H200's 132 SMs.
_TARGET_PROGRAMS = 528
_ROW_BLOCK = (32, 64)  # rows x D-slice of the norm, scale and finalize kernels
_SUM_BLOCK = 512
#: |H| < 2^_H_EXP after the power-of-two scaling (fp16's largest finite value is 65504)
_H_EXP = 14

#: input dtypes that take the fused GEMM-plus-epilogue kernel (the others: vendor GEMM + epilogue)
FUSED_DTYPES = (torch.float16, torch.bfloat16)


class FusedConfig(NamedTuple):
    """Tile (BM rows x BN columns, BK of D per step) and launch options of ``_fused_kernel``."""

    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int


#: sm_90 and later: two warpgroups of m64n128k16 wgmma, no spill (module doc)
FUSED_HOPPER = FusedConfig(128, 128, 64, 8, 3)
#: sm_80/86/89 (mma.sync): the 128-wide tile spills there, this one does not
FUSED_AMPERE = FusedConfig(128, 64, 64, 8, 3)
#: the interpreter: small test shapes span several tiles and K steps
FUSED_INTERPRET = FusedConfig(32, 32, 16, 4, 1)


@triton.jit
def _inv_norm_kernel(
    x_ptr, inv_ptr, keep_ptr, R, D, EPS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr
):
    """inv[r] = 1 / max(||x[r]||, eps), keep[r] = (||x[r]|| >= eps) for BR rows of x [R, D]."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    ss = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        p = x_ptr + o_r.to(tl.int64)[:, None] * D + o_d[None, :]
        x = tl.load(p, mask=m_r[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
    norm = tl.sqrt_rn(ss)
    tl.store(inv_ptr + o_r, tl.div_rn(1.0, tl.maximum(norm, EPS)), mask=m_r)
    tl.store(keep_ptr + o_r, tl.where(norm >= EPS, 1.0, 0.0), mask=m_r)


@triton.jit
def _scale_rows_kernel(x_ptr, inv_ptr, out_ptr, R, D, BR: tl.constexpr, BD: tl.constexpr):
    """out[r] = x[r] * inv[r] (fp32 product, stored in out's dtype): Â_c and B̂ for the GEMMs."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    off = o_r.to(tl.int64)[:, None] * D + o_d[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + o_r, mask=o_r < R, other=0.0)
    tl.store(out_ptr + off, (x * inv[:, None]).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _softplus_neg(u, e, w):
    """softplus(-u) = max(-u, 0) + log1p(e), for e = exp(-|u|) and w = 1 + e: log1p exact
    through the w correction (log(w) e / (w - 1); e itself where w rounds to 1)."""
    tiny = w == 1.0
    lp = tl.where(tiny, e, tl.log(w) * (e / tl.where(tiny, 1.0, w - 1.0)))
    return tl.maximum(-u, 0.0) + lp


@triton.jit
def _sigmoid_neg(u, e, w):
    """sigmoid(-u), for e = exp(-|u|) and w = 1 + e: e / w where u >= 0, else 1 / w."""
    return tl.where(u >= 0.0, e, 1.0) / w


@triton.jit
def _epilogue_kernel(
    raw_ptr,
    ia_ptr,
    ib_ptr,
    params_ptr,
    pow2_ptr,
    g_ptr,
    h_ptr,
    loss_part_ptr,
    r_part_ptr,
    ds_part_ptr,
    c,
    M,
    diag,
    cols_per_split,
    NORMALIZE: tl.constexpr,
    LOSS: tl.constexpr,
    GRAD: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """One (row block, column split) of a chunk's [c, M] fp32 raw products.

    Row i of the chunk has its positive at column i + diag. LOSS: partial row sums of the loss
    terms into loss_part[split, i]. GRAD: H[i, j] = 2^k s dS_ij (h's dtype) and partial row
    sums of dS cos and dS into r_part / ds_part[split, i] (the scale's and the bias's
    gradients).
    """
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    o_r = pid_r * BR + tl.arange(0, BR)
    m_r = o_r < c
    s = tl.load(params_ptr)
    bias = tl.load(params_ptr + 1)
    if NORMALIZE:
        ia = tl.load(ia_ptr + o_r, mask=m_r, other=0.0)
    if GRAD:
        pow2 = tl.load(pow2_ptr)
        g = tl.load(g_ptr + o_r, mask=m_r, other=0.0)
    loss_acc = tl.zeros([BR], dtype=tl.float32)
    r_acc = tl.zeros([BR], dtype=tl.float32)
    ds_acc = tl.zeros([BR], dtype=tl.float32)
    row_off = o_r.to(tl.int64) * M
    col0 = pid_s * cols_per_split
    col1 = tl.minimum(col0 + cols_per_split, M)
    for j0 in range(col0, col1, BC):
        o_c = j0 + tl.arange(0, BC)
        m_c = o_c < col1
        m = m_r[:, None] & m_c[None, :]
        raw = tl.load(raw_ptr + row_off[:, None] + o_c[None, :], mask=m, other=0.0)
        if NORMALIZE:
            ib = tl.load(ib_ptr + o_c, mask=m_c, other=0.0)
            cos = raw * ia[:, None] * ib[None, :]
        else:
            cos = raw
        x = s * cos + bias
        pos = o_c[None, :] == (o_r + diag)[:, None]
        u = tl.where(pos, x, -x)  # z x
        e = tl.exp(-tl.abs(u))
        w = 1.0 + e
        if LOSS:
            loss_acc += tl.sum(tl.where(m, _softplus_neg(u, e, w), 0.0), 1)
        if GRAD:
            sig = _sigmoid_neg(u, e, w)
            ds = tl.where(m, g[:, None] * tl.where(pos, -sig, sig), 0.0)
            r_acc += tl.sum(ds * cos, 1)
            ds_acc += tl.sum(ds, 1)
            h = (ds * (s * pow2)).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row_off[:, None] + o_c[None, :], h, mask=m)
    slot = pid_s.to(tl.int64) * c + o_r
    if LOSS:
        tl.store(loss_part_ptr + slot, loss_acc, mask=m_r)
    if GRAD:
        tl.store(r_part_ptr + slot, r_acc, mask=m_r)
        tl.store(ds_part_ptr + slot, ds_acc, mask=m_r)


@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, S, L, BL: tl.constexpr):
    """out[l] = part[0, l] + part[1, l] + ... + part[S-1, l], in that order."""
    o = tl.program_id(0) * BL + tl.arange(0, BL)
    m = o < L
    acc = tl.zeros([BL], dtype=tl.float32)
    for k in range(0, S):
        acc += tl.load(part_ptr + k * L + o, mask=m, other=0.0)
    tl.store(out_ptr + o, acc, mask=m)


@triton.jit
def _finalize_kernel(
    grad_ptr,
    x_ptr,
    inv_ptr,
    keep_ptr,
    pow2_ptr,
    out_ptr,
    R,
    D,
    NORMALIZE: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    """BR rows of the normalisation backward, in out's dtype.

    grad [R, D] fp32 is 2^k times the gradient of the normalised rows, dX̂ = grad / 2^k; x
    [R, D] the input rows, X̂ = x inv. NORMALIZE: out = keep inv (dX̂ - X̂ (X̂ . dX̂)), the
    projection coefficient taken from dX̂ itself (a first sweep over D), so that out is
    orthogonal to X̂ up to fp32 rounding whatever the rounding of H and of the GEMM operands
    (it equals s r_i in exact arithmetic); else out = dX̂.
    """
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    row = o_r.to(tl.int64)[:, None] * D
    inv2k = 1.0 / tl.load(pow2_ptr)  # a power of two: exact
    if NORMALIZE:
        inv = tl.load(inv_ptr + o_r, mask=m_r, other=0.0)
        keep = tl.load(keep_ptr + o_r, mask=m_r, other=0.0)
        dot = tl.zeros([BR], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m = m_r[:, None] & (o_d < D)[None, :]
            gr = tl.load(grad_ptr + row + o_d[None, :], mask=m, other=0.0) * inv2k
            x = tl.load(x_ptr + row + o_d[None, :], mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(gr * (x * inv[:, None]), 1)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m = m_r[:, None] & (o_d < D)[None, :]
        gr = tl.load(grad_ptr + row + o_d[None, :], mask=m, other=0.0) * inv2k
        if NORMALIZE:
            x = tl.load(x_ptr + row + o_d[None, :], mask=m, other=0.0).to(tl.float32)
            out = inv[:, None] * (gr - (x * inv[:, None]) * dot[:, None])
            out = tl.where(keep[:, None] > 0.0, out, 0.0)  # rows below eps: zero gradient
        else:
            out = gr
        tl.store(out_ptr + row + o_d[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fused_kernel(
    a_ptr,
    b_ptr,
    ia_ptr,
    ib_ptr,
    params_ptr,
    pow2_ptr,
    g_ptr,
    h_ptr,
    loss_part_ptr,
    r_part_ptr,
    ds_part_ptr,
    c,
    M,
    D,
    diag,
    NORMALIZE: tl.constexpr,
    LOSS: tl.constexpr,
    GRAD: tl.constexpr,
    INTERPRET: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """One (BM rows, BN columns) tile of a chunk: raw = a b^T by tl.dot (fp32 accumulation),
    then the epilogue in registers (module doc, steps 1-2).

    a [c, D] (the chunk's raw rows) and b [M, D] in the GEMM dtype; row i of the chunk has its
    positive at column i + diag. Program p: row block p % ceil(c / BM), column block
    p // ceil(c / BM) (row blocks fastest: the programs in flight share a block of b). LOSS:
    the tile's row sums of the loss terms into loss_part[column block, i]. GRAD: H[i, j] =
    2^k s dS_ij (h's dtype), and the tile's sums of dS cos and of dS into r_part / ds_part
    [column block, row block] (the scale's and the bias's gradients).
    """
    pid = tl.program_id(0)
    n_rb = tl.cdiv(c, BM)
    pid_m = pid % n_rb
    pid_n = pid // n_rb
    o_m = pid_m * BM + tl.arange(0, BM)
    o_n = pid_n * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    m_m = o_m < c
    m_n = o_n < M
    p_a = a_ptr + o_m.to(tl.int64)[:, None] * D + o_k[None, :]
    p_b = b_ptr + o_n.to(tl.int64)[:, None] * D + o_k[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        m_k = (k0 + o_k) < D
        # zeros where masked: garbage past the rows (even NaN) never reaches the dot
        xa = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)
        xb = tl.load(p_b, mask=m_n[:, None] & m_k[None, :], other=0.0)
        if INTERPRET:  # the interpreter's bf16 dot is wrong: fp32 there only
            xa = xa.to(tl.float32)
            xb = xb.to(tl.float32)
        acc = tl.dot(xa, tl.trans(xb), acc)
        p_a += BK
        p_b += BK
    s = tl.load(params_ptr)
    bias = tl.load(params_ptr + 1)
    # columns past M: logit -inf, so that their loss term and dS are exactly 0 (no 2D mask:
    # the 128 x 128 tile's epilogue is at the register limit)
    b_col = tl.where(m_n, bias, float("-inf"))
    if NORMALIZE:
        ia = tl.load(ia_ptr + o_m, mask=m_m, other=0.0)
        ib = tl.load(ib_ptr + o_n, mask=m_n, other=0.0)
        cos = acc * ia[:, None] * ib[None, :]
    else:
        cos = acc
    x = s * cos + b_col[None, :]
    # the positive's column within this tile (-1: none; none past M)
    p_col = o_m + diag
    p_col = tl.where((p_col >= 0) & (p_col < M), p_col - pid_n * BN, -1)
    pos = tl.arange(0, BN)[None, :] == p_col[:, None]
    u = tl.where(pos, x, -x)  # z x
    e = tl.exp(-tl.abs(u))
    w = 1.0 + e
    if LOSS:
        term = _softplus_neg(u, e, w)
        tl.store(loss_part_ptr + pid_n.to(tl.int64) * c + o_m, tl.sum(term, 1), mask=m_m)
    if GRAD:
        pow2 = tl.load(pow2_ptr)
        g = tl.load(g_ptr + o_m, mask=m_m, other=0.0)  # rows past c: g = 0, so dS = 0
        sig = _sigmoid_neg(u, e, w)
        ds = g[:, None] * tl.where(pos, -sig, sig)
        tile = pid_n.to(tl.int64) * n_rb + pid_m
        tl.store(r_part_ptr + tile, tl.sum(tl.sum(ds * cos, 1), 0))
        tl.store(ds_part_ptr + tile, tl.sum(tl.sum(ds, 1), 0))
        h = (ds * (s * pow2)).to(h_ptr.dtype.element_ty)
        p_h = h_ptr + o_m.to(tl.int64)[:, None] * M + o_n[None, :]
        tl.store(p_h, h, mask=m_m[:, None] & m_n[None, :])


# ------------------------------------------------------------------------------ launchers


def pair_bytes(itemsize: int, grad: bool) -> int:
    """Bytes per (row, column) pair of the [c, M]-sized buffers one chunk allocates, for the op
    layer's chunk rule (module doc, "Extra memory"): 16-bit inputs (the fused kernel): H with
    gradients (itemsize), else 1 (a bound on the loss's row slots, 4 per BN columns); fp32: the
    fp32 score block (4), plus H (4) with gradients."""
    if itemsize == 2:
        return itemsize if grad else 1
    return 4 + (itemsize if grad else 0)


def fused_config(x: Tensor) -> FusedConfig:
    """The fused kernel's tile for tensors like ``x`` (module doc, "Tiles")."""
    if interpreting(x):
        return FUSED_INTERPRET
    major, _ = torch.cuda.get_device_capability(x.device)
    return FUSED_HOPPER if major >= 9 else FUSED_AMPERE


def two_pow_k(g: Tensor, params: Tensor) -> Tensor:
    """The power of two 2^k (0-dim fp32, on the device, no host sync) with |s| max|g| 2^k in
    [2^13, 2^14): the scale of H = 2^k s dS (|dS_ij| <= |g_i|). 2^14 when that product is 0 or
    not finite (then H is 0, or non-finite anyway)."""
    m = (params[0].abs() * g.abs().max()).to(torch.float32)
    _, e = torch.frexp(m)
    k = (_H_EXP - e.to(torch.int32)).clamp(-100, 100)
    return ((k + 127) << 23).view(torch.float32)  # the IEEE bits of 2^k: exact


def _gemm_nt(x: Tensor, y: Tensor, out: Tensor) -> Tensor:
    """out = x @ y^T in fp32 (vendor GEMM; CPU tensors: fp32 upcast)."""
    if x.device.type == "cpu":
        return torch.mm(x.float(), y.float().T, out=out)
    if x.dtype == torch.float32:
        return torch.mm(x, y.T, out=out)
    return torch.mm(x, y.T, out_dtype=torch.float32, out=out)


def _gemm_nn(x: Tensor, y: Tensor, out: Tensor) -> Tensor:
    """out = x @ y in fp32."""
    if x.device.type == "cpu":
        return torch.mm(x.float(), y.float(), out=out)
    if x.dtype == torch.float32:
        return torch.mm(x, y, out=out)
    return torch.mm(x, y, out_dtype=torch.float32, out=out)


def _addmm_tn(acc: Tensor, x: Tensor, y: Tensor) -> None:
    """acc += x^T @ y, acc fp32 (vendor addmm in place; CPU tensors: fp32 upcast)."""
    if x.device.type == "cpu":
        acc.addmm_(x.float().T, y.float())
    elif x.dtype == torch.float32:
        acc.addmm_(x.T, y)
    else:
        torch.addmm(acc, x.T, y, out_dtype=torch.float32, out=acc)


def _norms(x: Tensor, normalize: bool, eps: float) -> tuple[Tensor, Tensor]:
    R, D = x.shape
    inv = torch.empty(R, device=x.device, dtype=torch.float32)
    keep = torch.empty(R, device=x.device, dtype=torch.float32)
    if not normalize:
        return inv.fill_(1.0), keep.fill_(1.0)
    BR, BD = _ROW_BLOCK
    launch(_inv_norm_kernel, (triton.cdiv(R, BR),), x, inv, keep, R, D, EPS=eps, BR=BR, BD=BD)
    return inv, keep


def _scaled(x: Tensor, inv: Tensor, out: Tensor) -> Tensor:
    R, D = x.shape
    BR, BD = _ROW_BLOCK
    launch(
        _scale_rows_kernel,
        (triton.cdiv(R, BR), triton.cdiv(D, BD)),
        x,
        inv,
        out,
        R,
        D,
        BR=BR,
        BD=BD,
    )
    return out


def _sum_parts(part: Tensor, out: Tensor) -> None:
    S, L = part.shape
    launch(_sum_parts_kernel, (triton.cdiv(L, _SUM_BLOCK),), part, out, S, L, BL=_SUM_BLOCK)


def _finalize(grad, x, inv, keep, pow2, out, normalize: bool) -> None:
    R, D = x.shape
    BR, BD = _ROW_BLOCK
    launch(_finalize_kernel, (triton.cdiv(R, BR),), grad, x, inv, keep, pow2, out, R, D,
           NORMALIZE=normalize, BR=BR, BD=BD)  # fmt: skip


def _splits(c: int, M: int) -> tuple[int, int]:
    """(splits, columns per split) of a chunk of c rows: about _TARGET_PROGRAMS programs."""
    BR, BC = EPILOGUE_BLOCK
    col_blocks = triton.cdiv(M, BC)
    want = max(1, min(col_blocks, triton.cdiv(_TARGET_PROGRAMS, triton.cdiv(c, BR))))
    per = triton.cdiv(col_blocks, want) * BC
    return triton.cdiv(M, per), per


class _Sums:
    """Where one call's partial sums go: the loss's row slots, and the gradient's dS cos / dS
    slots (per row on the vendor path, per tile row block on the fused one), summed per chunk
    by ``_sum_parts_kernel`` in a fixed order into ``row_loss``, ``r_all``, ``ds_all``."""

    def __init__(self, N, M, chunk, fused, cfg, loss, grad, f32):
        self.fused, self.cfg = fused, cfg
        if fused:
            self.cols = triton.cdiv(M, cfg.BN)  # slots per row: one per column block
            self.loss_part = torch.empty(self.cols * chunk, **f32) if loss else None
            blocks = sum(triton.cdiv(min(chunk, N - s), cfg.BM) for s in range(0, N, chunk))
            tiles = self.cols * triton.cdiv(chunk, cfg.BM)
            self.tile_part = torch.empty(2, tiles, **f32) if grad else None
            vec = blocks
        else:
            splits_max, _ = _splits(chunk, M)
            self.part = torch.empty(3, splits_max * chunk, **f32)
            vec = N
        self.row_loss = torch.empty(N, **f32) if loss else None
        self.r_all = torch.empty(vec, **f32) if grad else None
        self.ds_all = torch.empty(vec, **f32) if grad else None
        self.vec_at = 0  # where the next chunk's gradient sums go in r_all / ds_all


def _fused_chunk(a_c, b, ia_c, ib, params, pow2, g_c, h, sums, diag, normalize, loss, grad):
    """Steps 1-2 of one chunk by ``_fused_kernel``; the slots summed into ``sums``' vectors."""
    c, D = a_c.shape
    M = b.shape[0]
    cfg, cols = sums.cfg, sums.cols
    rows = triton.cdiv(c, cfg.BM)
    loss_part = sums.loss_part[: cols * c] if loss else ia_c
    tile_part = sums.tile_part[:, : cols * rows] if grad else None
    unused = ia_c  # the pointers of constexpr-disabled paths
    launch(
        _fused_kernel,
        (rows * cols,),
        a_c,
        b,
        ia_c,
        ib,
        params,
        pow2 if grad else unused,
        g_c if grad else unused,
        h if grad else unused,
        loss_part,
        tile_part[0] if grad else unused,
        tile_part[1] if grad else unused,
        c,
        M,
        D,
        diag,
        NORMALIZE=normalize,
        LOSS=loss,
        GRAD=grad,
        INTERPRET=interpreting(a_c),
        BM=cfg.BM,
        BN=cfg.BN,
        BK=cfg.BK,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if grad:
        at = slice(sums.vec_at, sums.vec_at + rows)
        _sum_parts(tile_part[0].view(cols, rows), sums.r_all[at])
        _sum_parts(tile_part[1].view(cols, rows), sums.ds_all[at])
        sums.vec_at += rows
    return loss_part


def _vendor_chunk(a_c, b, raw, ia_c, ib, params, pow2, g_c, h, sums, diag, start, normalize,
                  loss, grad):  # fmt: skip
    """Steps 1-2 of one chunk by a vendor GEMM into ``raw`` and ``_epilogue_kernel``."""
    c = a_c.shape[0]
    M = b.shape[0]
    BR, BC = EPILOGUE_BLOCK
    _gemm_nt(a_c, b, raw)
    splits, per = _splits(c, M)
    parts = sums.part[:, : splits * c]
    launch(
        _epilogue_kernel,
        (triton.cdiv(c, BR), splits),
        raw,
        ia_c,
        ib,
        params,
        pow2 if grad else raw,
        g_c if grad else raw,
        h if grad else raw,  # unused pointers (constexpr-disabled paths): raw
        parts[0],
        parts[1],
        parts[2],
        c,
        M,
        diag,
        per,
        NORMALIZE=normalize,
        LOSS=loss,
        GRAD=grad,
        BR=BR,
        BC=BC,
        num_warps=_EPILOGUE_WARPS,
    )
    if grad:
        _sum_parts(parts[1].view(splits, c), sums.r_all[start : start + c])
        _sum_parts(parts[2].view(splits, c), sums.ds_all[start : start + c])
    return parts[0].view(splits, c)


def _run(a, b, params, offset, normalize, g, *, eps, chunk, loss, grad):
    """The chunk loop (module doc): (row_loss [N] or None, dA, dB, dparams [2]) as asked."""
    N, D = a.shape
    M = b.shape[0]
    dev = a.device
    f32 = dict(device=dev, dtype=torch.float32)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected an int >= 1 (rows of A per chunk), got {chunk!r}")
    chunk = min(chunk, N)  # a chunk larger than the batch is the whole batch
    fused = a.dtype in FUSED_DTYPES
    cfg = fused_config(a) if fused else None
    ia, keep_a = _norms(a, normalize, eps)
    ib, keep_b = _norms(b, normalize, eps)
    sums = _Sums(N, M, chunk, fused, cfg, loss, grad, f32)
    raw_buf = None if fused else torch.empty(chunk, M, **f32)
    pow2 = h_buf = None
    if grad:
        pow2 = two_pow_k(g, params).reshape(1)
        h_buf = torch.empty(chunk, M, device=dev, dtype=a.dtype)
        b_hat = _scaled(b, ib, torch.empty_like(b)) if normalize else b
        a_hat_buf = torch.empty(chunk, D, device=dev, dtype=a.dtype) if normalize else None
        grad_buf = torch.empty(chunk, D, **f32)
        e_acc = torch.zeros(M, D, **f32)
        da = torch.empty_like(a)
    for start in range(0, N, chunk):
        c = min(chunk, N - start)
        a_c = a[start : start + c]
        ia_c = ia[start : start + c]
        g_c = g[start : start + c] if grad else None
        h = h_buf[:c] if grad else None
        if fused:
            slots = _fused_chunk(
                a_c, b, ia_c, ib, params, pow2, g_c, h, sums, start + offset, normalize, loss, grad
            )
            slots = slots.view(sums.cols, c) if loss else None
        else:
            slots = _vendor_chunk(a_c, b, raw_buf[:c], ia_c, ib, params, pow2, g_c, h, sums,
                                  start + offset, start, normalize, loss, grad)  # fmt: skip
        if loss:
            _sum_parts(slots, sums.row_loss[start : start + c])
        if not grad:
            continue
        a_hat = _scaled(a_c, ia_c, a_hat_buf[:c]) if normalize else a_c
        g_buf = grad_buf[:c]
        _gemm_nn(h, b_hat, g_buf)
        _finalize(
            g_buf,
            a_c,
            ia_c,
            keep_a[start : start + c],
            pow2,
            da[start : start + c],
            normalize,
        )
        _addmm_tn(e_acc, h, a_hat)
    if not grad:
        return sums.row_loss, None, None, None
    db = torch.empty_like(b)
    _finalize(e_acc, b, ib, keep_b, pow2, db, normalize)
    dparams = torch.stack([sums.r_all.sum(), sums.ds_all.sum()])
    return sums.row_loss, da, db, dparams


def sigmoid_forward(
    a: Tensor, b: Tensor, params: Tensor, offset: int, normalize: bool, *, eps: float, chunk: int
) -> Tensor:
    """Per-row loss sums [N] fp32 of the sigmoid loss (module doc).

    Args:
        a: [N, D] contiguous, float32/float16/bfloat16 (16-bit: the fused kernel); b: [M, D],
            same dtype and device.
        params: [2] fp32 contiguous on the device: (logit_scale, logit_bias).
        offset: row i's positive is column i + offset (none when outside [0, M)).
        normalize: divide rows by max(norm, eps).
        eps: the norm floor; chunk: rows per chunk (the op layer's rule with
            :func:`pair_bytes` (itemsize, False)), >= 1.
    """
    return _run(a, b, params, offset, normalize, None, eps=eps, chunk=chunk, loss=True, grad=False)[
        0
    ]


def sigmoid_backward(
    a: Tensor,
    b: Tensor,
    params: Tensor,
    offset: int,
    normalize: bool,
    g_row: Tensor,
    *,
    eps: float,
    chunk: int,
    with_loss: bool = False,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """Gradients of sum_i g_row[i] row_loss[i] (module doc), in one pass over the chunks.

    Args: as :func:`sigmoid_forward` (chunk: the rule with :func:`pair_bytes` (itemsize,
    True)); g_row [N] fp32 contiguous; with_loss: also the row loss sums (the training path's
    one-pass forward, g_row = 1).

    Returns:
        (row_loss [N] fp32 or None, dA [N, D] in a's dtype, dB [M, D] in b's dtype,
        dparams [2] fp32: (d logit_scale, d logit_bias)).
    """
    return _run(
        a, b, params, offset, normalize, g_row, eps=eps, chunk=chunk, loss=with_loss, grad=True
    )
