"""Rotary position embedding of queries and keys in one Triton launch, forward and backward.

Math. Per token t and channel c, with a partner channel p(c) and a sign s(c) = -1 for the first
channel of a pair and +1 for the second:

    out[c] = x[c] * cos[t, c] + s(c) * x[p(c)] * sin[t, c]

Two pairings ("layouts"): rotate-half (Llama, GPT-NeoX) pairs c with c + D/2; interleaved
(V-JEPA 2) pairs 2i with 2i + 1. The tables are full width [.., D] so any per-channel angle
works, including V-JEPA 2's, whose sin/cos are tiled over the pairs (the two channels of a pair
may carry different angles) and whose unrotated tail channels have cos 1, sin 0.

Backward. The map is linear in x, so dx is its transpose applied to dout:

    dx[c] = dout[c] * cos[t, c] - s(c) * dout[p(c)] * sin[t, p(c)]

When both channels of every pair share an angle (Llama) that is the inverse rotation; reading
sin at the partner keeps it exact for V-JEPA 2's tiled tables too. One kernel serves both
directions (``TRANSPOSE``).

Memory. A program owns BT tokens of one batch entry: it loads their [BT, D] cos/sin once and
applies them to every query head and then every key head, so the tables are read once per token
instead of once per head. Math in fp32, results in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch

__all__ = ["rotary", "rotary_config", "rotary_kernel"]

# Elements of one [BT, BD] tile: a 64-wide head gets 32 tokens per program.
_TILE = 2048


@triton.jit
def _rotate_heads(
    x, out, b_cos, b_sin, o_t, o_d, o_p, m, i_b, T, H,
    stride_b, stride_t, stride_h, D: tl.constexpr,
):
    """Apply the prepared tables to the H heads of one [BT] token block."""
    for i_h in range(H):
        p_x = x + i_b * stride_b + o_t[:, None] * stride_t + i_h * stride_h
        # [BT, BD]
        b_x = tl.load(p_x + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_xp = tl.load(p_x + o_p[None, :], mask=m, other=0.0).to(tl.float32)
        b_o = b_x * b_cos + b_xp * b_sin
        p_o = out + ((i_b * T + o_t[:, None]) * H + i_h) * D + o_d[None, :]
        tl.store(p_o, b_o.to(out.dtype.element_ty), mask=m)


@triton.jit
def rotary_kernel(
    q,
    k,
    cos,
    sin,
    q_out,
    k_out,
    T,
    HQ,
    HKV,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_cb,
    stride_ct,
    D: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    i_t = tl.program_id(0)
    # int64: batch offsets of large inputs overflow int32
    i_b = tl.program_id(1).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m = (o_t < T)[:, None] & (o_d < D)[None, :]
    if INTERLEAVED:
        o_p = o_d ^ 1
        b_sign = tl.where(o_d % 2 == 0, -1.0, 1.0)
    else:
        o_p = tl.where(o_d < D // 2, o_d + D // 2, o_d - D // 2)
        b_sign = tl.where(o_d < D // 2, -1.0, 1.0)
    p_c = cos + i_b * stride_cb + o_t[:, None] * stride_ct
    p_s = sin + i_b * stride_cb + o_t[:, None] * stride_ct
    # [BT, BD]
    b_cos = tl.load(p_c + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    if TRANSPOSE:
        b_sin = -b_sign[None, :] * tl.load(p_s + o_p[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        b_sin = b_sign[None, :] * tl.load(p_s + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    _rotate_heads(q, q_out, b_cos, b_sin, o_t, o_d, o_p, m, i_b, T, HQ,
                  stride_qb, stride_qt, stride_qh, D)
    _rotate_heads(k, k_out, b_cos, b_sin, o_t, o_d, o_p, m, i_b, T, HKV,
                  stride_kb, stride_kt, stride_kh, D)


def rotary_config(T: int, D: int) -> dict[str, int]:
    """Block sizes and warps for tokens T and head dim D: BD covers D, BT fills a tile."""
    BD = triton.next_power_of_2(D)
    BT = max(1, min(_TILE // BD, triton.next_power_of_2(T)))
    return {"BT": BT, "BD": BD, "num_warps": 4 if BT * BD >= 1024 else 2}


def rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool, transpose: bool
) -> tuple[Tensor, Tensor]:
    """Rotate q and k (or, with ``transpose``, back-propagate through the rotation).

    Args:
        q: [B, T, Hq, D], last dimension contiguous, any float dtype; D even.
        k: [B, T, Hkv, D], same dtype and device, last dimension contiguous.
        cos: [B or 1, T, D] angle cosines (any float dtype, read as fp32), last dim contiguous.
        sin: [B or 1, T, D] sines, same shape and strides as ``cos``.
        interleaved: pair channels (2i, 2i + 1) (V-JEPA 2) instead of (i, i + D/2) (Llama).
        transpose: apply the transposed map (the backward: q, k hold the output gradients).

    Returns:
        (q_out [B, T, Hq, D], k_out [B, T, Hkv, D]), new contiguous tensors in q's dtype.
    """
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q_out.numel() + k_out.numel() == 0:
        return q_out, k_out
    cfg = rotary_config(T, D)
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    grid = (triton.cdiv(T, cfg["BT"]), B)
    launch(
        rotary_kernel, grid, q, k, cos, sin, q_out, k_out, T, HQ, HKV,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        stride_cb, cos.stride(1),
        D=D, INTERLEAVED=interleaved, TRANSPOSE=transpose, **cfg,
    )
    return q_out, k_out
