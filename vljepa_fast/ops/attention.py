"""attention and attention_varlen: backend records (torch SDPA, eager reference; the fused
kernels register here as they land).

SDPA is the CPU default: torch's fused CPU kernel with GQA (enable_gqa) and a boolean mask
broadcast over heads, never a dense additive [B, 1, T, S] float mask per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import _backends, reference
from vljepa_fast.ops import _common


def _allowed(
    B: int, T: int, S: int, device: torch.device, key_padding_mask: Tensor | None,
    causal: bool, lengths_q: Tensor | None = None, lengths_k: Tensor | None = None,
) -> Tensor | None:
    """The boolean [B or 1, 1, T or 1, S] mask of allowed (query, key) pairs, or None for all."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if causal:
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        if lengths_q is None:
            tri = (j <= i + (S - T))[None, None]
        else:  # per-sequence bottom-right alignment for packed sequences
            shift = (lengths_k - lengths_q).to(torch.long)[:, None, None, None]
            tri = j[None, None] <= i[None, None] + shift
        mask = tri if mask is None else mask & tri
    return mask


def _sdpa_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """SDPA on [B, T, H, D] tensors with a bool mask; rows with no allowed key give zeros.

    Rows with no allowed key are given every key (so SDPA stays finite, forward and backward)
    and then zeroed, which also zeroes their gradient.
    """
    Hq, Hkv = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    empty = None
    if mask is not None:
        has_key = mask.any(dim=-1, keepdim=True)  # [B', 1, T', 1]
        if not bool(has_key.all()):
            empty = ~has_key
            mask = mask | empty
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv
    ).transpose(1, 2)
    if empty is not None:
        out = out.masked_fill(empty.permute(0, 2, 1, 3), 0.0)
    return out


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask=None, causal=False, scale=None):
    B, T, _, _ = q.shape
    S = k.shape[1]
    if causal and key_padding_mask is None and T == S:
        Hq, Hkv = q.shape[2], k.shape[2]
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            scale=scale, enable_gqa=Hq != Hkv,
        ).transpose(1, 2)
    mask = _allowed(B, T, S, q.device, key_padding_mask, causal)
    return _sdpa_masked(q, k, v, mask, scale)


def _pad_index(cu: Tensor, max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gather index [B, max_len] into the packed rows, its validity mask, and the lengths."""
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(max_len, device=cu.device)[None, :]
    valid = pos < lengths[:, None]
    index = (cu[:-1, None].long() + pos).masked_fill(~valid, 0)
    return index, valid, lengths


def _sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                 scale=None):
    iq, vq, lq = _pad_index(cu_seqlens_q, max_seqlen_q)
    ik, vk, lk = _pad_index(cu_seqlens_k, max_seqlen_k)
    mask = vk[:, None, None, :]
    if causal:
        mask = mask & _allowed(iq.shape[0], max_seqlen_q, max_seqlen_k, q.device, None, True, lq, lk)
    out = _sdpa_masked(q[iq], k[ik], v[ik], mask, scale)  # [B, max_q, Hq, D]
    return out[vq]


def _sdpa_supports(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> list[str]:
    return _common.dtype_in("q", q, (torch.float32, torch.float16, torch.bfloat16, torch.float64))


def _reference(q, k, v, **kwargs):
    return reference.attention(q, k, v, **kwargs)


def _reference_varlen(*args, **kwargs):
    return reference.attention_varlen(*args, **kwargs)


for _op, _sd, _ref in (("attention", _sdpa, _reference), ("attention_varlen", _sdpa_varlen, _reference_varlen)):
    _backends.register(_backends.Backend(
        "sdpa", _op, _sd, available=list, supports=_sdpa_supports, priority=40,
    ))
    _backends.register(_backends.Backend("reference", _op, _ref, available=list, priority=100))
