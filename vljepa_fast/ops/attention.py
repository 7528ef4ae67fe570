"""attention and attention_varlen: backend records (Triton flash attention, torch SDPA, eager
reference; flash_attn and xformers register in ops/attention_peers.py).

SDPA is the CPU default: torch's fused CPU kernel with GQA (enable_gqa) and a boolean mask
broadcast over heads, never a dense additive [B, 1, T, S] float mask per head.

NaN rule (vf.attention's docstring) on SDPA: padded keys are zeroed before the call (a masked
pair still computes 0 * v, NaN for a NaN v; varlen padding slots likewise, which otherwise copy
row 0 of the pack, a real row of another sequence), and the rows that torch's fused kernels turn
finite although plain softmax gives NaN (a NaN query, or no finite key: a -inf running max read
as "no key") are set to NaN afterwards (:func:`nan_rows`, a few elementwise passes, no sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import _backends, reference
from vljepa_fast.ops import _common


def _allowed(
    B: int,
    T: int,
    S: int,
    device: torch.device,
    key_padding_mask: Tensor | None,
    causal: bool,
    lengths_q: Tensor | None = None,
    lengths_k: Tensor | None = None,
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


def nan_rows(
    q_bad: Tensor,
    k_finite: Tensor,
    real_k: Tensor | None,
    shift: Tensor | int | None,
) -> Tensor:
    """[B, T, Hq] bool: the rows the NaN rule of vf.attention makes NaN that a fused softmax may
    not (one that treats a row whose running max stays -inf as having no key, as torch SDPA's
    CPU kernel and flash-style kernels do).

    A row that attends to at least one key is NaN when its query holds a NaN or Inf
    (``q_bad``), or when none of the keys it attends to is finite (then every one of its scores
    is NaN or +-inf: plain softmax gives NaN). Rows with a finite key are left to the kernel,
    whose arithmetic then follows the plain one.

    Args:
        q_bad: [B, T, Hq] bool, some entry of the query row is NaN or +-inf.
        k_finite: [B, S, Hkv] bool, the key row is real and all finite.
        real_k: [B, S] bool, real keys (None: all).
        shift: causal only, S - T per sequence ([B] tensor or an int): query i sees keys
            j <= i + shift. None: not causal.
    """
    B, T, Hq = q_bad.shape
    S, Hkv = k_finite.shape[1], k_finite.shape[2]
    pos = torch.arange(S, device=q_bad.device)
    # the first real key and the first finite key of every (sequence, KV head); S when none
    first_finite = torch.where(k_finite, pos[None, :, None], S).amin(dim=1)  # [B, Hkv]
    if real_k is None:
        first_real = torch.zeros(B, 1, dtype=torch.long, device=q_bad.device)
    else:
        first_real = torch.where(real_k, pos[None, :], S).amin(dim=1, keepdim=True)  # [B, 1]
    if shift is None:
        last = torch.full((B, T, 1), S - 1, dtype=torch.long, device=q_bad.device)
    else:
        if isinstance(shift, Tensor):
            shift = shift.to(torch.long)[:, None, None]
        last = torch.arange(T, device=q_bad.device)[None, :, None] + shift  # [B or 1, T, 1]
    has_key = first_real[:, None, :] <= last  # [B, T, 1]
    no_finite = (first_finite[:, None, :] > last).repeat_interleave(Hq // Hkv, dim=2)
    return has_key & (q_bad | no_finite)


def _nonfinite_rows(t: Tensor) -> Tensor:
    """[..., H] bool: some entry of the head row is NaN or +-inf."""
    return ~torch.isfinite(t).all(dim=-1)


def dense_nan_rows(q: Tensor, k: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
    """:func:`nan_rows` of vf.attention's inputs: [B, T, Hq] bool."""
    k_finite = _nonfinite_rows(k).logical_not_()
    if key_padding_mask is not None:
        k_finite = k_finite & key_padding_mask[:, :, None]
    shift = k.shape[1] - q.shape[1] if causal else None
    return nan_rows(_nonfinite_rows(q), k_finite, key_padding_mask, shift)


def varlen_nan_rows(
    q: Tensor,
    k: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
) -> Tensor:
    """:func:`nan_rows` of vf.attention_varlen's inputs: [total_q, Hq] bool."""
    iq, vq, lq = _pad_index(cu_seqlens_q, max_seqlen_q)
    ik, vk, lk = _pad_index(cu_seqlens_k, max_seqlen_k)
    k_finite = _nonfinite_rows(k).logical_not_()[ik] & vk[:, :, None]
    nan = nan_rows(_nonfinite_rows(q)[iq], k_finite, vk, (lk - lq) if causal else None)
    return nan[vq]


def _zero_padded(k: Tensor, v: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """k and v with the rows where ``real`` [B, S] is False replaced by zeros (so that NaN or
    Inf there never meets a 0 probability; their gradient is zero)."""
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    mask = real[:, :, None, None]
    return torch.where(mask, k, zero), torch.where(mask, v, zero)


def _sdpa_masked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float | None,
    nan: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """SDPA on [B, T, H, D] tensors with a bool mask; rows with no allowed key give zeros.

    Rows with no allowed key are given every key (so SDPA stays finite, forward and backward)
    and then zeroed, which also zeroes their gradient. ``nan`` [B, T, Hq]: rows set to NaN
    afterwards (the NaN rule, see :func:`nan_rows`).
    """
    Hq, Hkv = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    empty = None
    if mask is not None:  # unconditional (no host sync), so torch.compile keeps one graph
        empty = ~mask.any(dim=-1, keepdim=True)  # [B', 1, T', 1]
        mask = mask | empty
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, scale=scale, is_causal=is_causal, enable_gqa=Hq != Hkv
    ).transpose(1, 2)
    if nan is not None:
        out = out.masked_fill(nan[..., None], float("nan"))
    if empty is not None:
        out = out.masked_fill(empty.permute(0, 2, 1, 3), 0.0)
    return out


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask=None, causal=False, scale=None):
    B, T, _, _ = q.shape
    S = k.shape[1]
    nan = dense_nan_rows(q, k, key_padding_mask, causal)
    if key_padding_mask is not None:
        k, v = _zero_padded(k, v, key_padding_mask)
    if causal and key_padding_mask is None and T == S:
        return _sdpa_masked(q, k, v, None, scale, nan, is_causal=True)
    mask = _allowed(B, T, S, q.device, key_padding_mask, causal)
    return _sdpa_masked(q, k, v, mask, scale, nan)


def _pad_index(cu: Tensor, max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gather index [B, max_len] into the packed rows, its validity mask, and the lengths."""
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(max_len, device=cu.device)[None, :]
    valid = pos < lengths[:, None]
    index = (cu[:-1, None].long() + pos).masked_fill(~valid, 0)
    return index, valid, lengths


def _sdpa_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None
):
    iq, vq, lq = _pad_index(cu_seqlens_q, max_seqlen_q)
    ik, vk, lk = _pad_index(cu_seqlens_k, max_seqlen_k)
    mask = vk[:, None, None, :]
    if causal:
        mask = mask & _allowed(
            iq.shape[0], max_seqlen_q, max_seqlen_k, q.device, None, True, lq, lk
        )
    # The padding slots gather row 0 of the pack (a real row of another sequence, maybe NaN):
    # zeroed, key and query slots alike, so that nothing of it reaches this sequence and no
    # gradient of a padding query (which may meet this sequence's NaN) flows back into row 0.
    kp, vp = _zero_padded(k[ik], v[ik], vk)
    qp = torch.where(vq[:, :, None, None], q[iq], torch.zeros((), dtype=q.dtype, device=q.device))
    k_finite = _nonfinite_rows(k).logical_not_()[ik] & vk[:, :, None]
    nan = nan_rows(_nonfinite_rows(q)[iq], k_finite, vk, (lk - lq) if causal else None)
    out = _sdpa_masked(qp, kp, vp, mask, scale, nan)  # [B, max_q, Hq, D]
    return out[vq]


# ------------------------------------------------------------------------- triton backend
# Custom ops (with fake functions) so torch.compile traces through the Triton launches; the
# autograd formula saves q, k, v, out and the fp32 log-sum-exp only.

_Opt = Tensor | None


@torch.library.custom_op("vljepa_fast::attention_fwd_triton", mutates_args=())
def _tri_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seqlens_k: _Opt,
    cu_seqlens_q: _Opt,
    cu_seqlens_k: _Opt,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    from vljepa_fast._kernels import attention as kernel

    varlen = cu_seqlens_q is not None
    return kernel.attention_forward(
        q,
        k,
        v,
        seqlens_k=seqlens_k,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q if varlen else None,
        max_seqlen_k=max_seqlen_k if varlen else None,
        causal=causal,
        scale=scale,
    )


@_tri_fwd.register_fake
def _(q, k, v, seqlens_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    if cu_seqlens_q is not None:
        lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    else:
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("vljepa_fast::attention_bwd_triton", mutates_args=())
def _tri_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    seqlens_k: _Opt,
    cu_seqlens_q: _Opt,
    cu_seqlens_k: _Opt,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from vljepa_fast._kernels import attention as kernel

    varlen = cu_seqlens_q is not None
    return kernel.attention_backward(
        do,
        q,
        k,
        v,
        out,
        lse,
        seqlens_k=seqlens_k,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q if varlen else None,
        max_seqlen_k=max_seqlen_k if varlen else None,
        causal=causal,
        scale=scale,
    )


@_tri_bwd.register_fake
def _(do, q, k, v, out, lse, *args):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _tri_setup(ctx, inputs, output):
    q, k, v, *rest = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.rest = rest


def _tri_backward(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _tri_bwd(d_out.contiguous(), q, k, v, out, lse, *ctx.rest)
    return (dq, dk, dv) + (None,) * len(ctx.rest)


_tri_fwd.register_autograd(_tri_backward, setup_context=_tri_setup)


def _right_padded_lengths(mask: Tensor) -> Tensor | None:
    """int32 [B] lengths when every row of ``mask`` is True then False (right padding), else None.

    Reads one bool on the host (a device sync on GPU).
    """
    lengths = mask.sum(dim=1, dtype=torch.int32)
    ok = torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None])
    return lengths if ok else None


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _triton(q, k, v, *, key_padding_mask=None, causal=False, scale=None):
    lengths = None if key_padding_mask is None else _right_padded_lengths(key_padding_mask)
    out, _ = _tri_fwd(q, k, v, lengths, None, None, 0, 0, causal, _scale(q, scale))
    return out


def _triton_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None
):
    out, _ = _tri_fwd(
        q,
        k,
        v,
        None,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        _scale(q, scale),
    )
    return out


def _triton_supports(
    q: Tensor, k: Tensor, v: Tensor, *args, key_padding_mask=None, **kw
) -> list[str]:
    from vljepa_fast._kernels.attention import HEAD_DIMS

    why = _common.triton_device(q) + _common.dtype_in("q", q)
    if q.shape[-1] not in HEAD_DIMS:
        why.append(f"head dim {q.shape[-1]} not in {HEAD_DIMS}")
    elif q.dtype == torch.float32 and q.shape[-1] > 128:
        why.append("float32 at head dim > 128 (its backward spills registers; use bf16/fp16)")
    if key_padding_mask is not None:
        if torch.compiler.is_compiling():
            why.append(
                "a key_padding_mask under torch.compile (its right padding cannot be checked)"
            )
        elif _right_padded_lengths(key_padding_mask) is None:
            why.append("key_padding_mask is not right padding (True... then False... per row)")
    return why


def _sdpa_supports(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> list[str]:
    return _common.dtype_in("q", q, (torch.float32, torch.float16, torch.bfloat16, torch.float64))


def _reference(q, k, v, **kwargs):
    return reference.attention(q, k, v, **kwargs)


def _reference_varlen(*args, **kwargs):
    return reference.attention_varlen(*args, **kwargs)


for _op, _sd, _tri, _ref in (
    ("attention", _sdpa, _triton, _reference),
    ("attention_varlen", _sdpa_varlen, _triton_varlen, _reference_varlen),
):
    _backends.register(
        _backends.Backend(
            "triton",
            _op,
            _tri,
            available=_common.triton_import,
            supports=_triton_supports,
            devices=("cuda", "cpu"),
            auto_devices=("cuda",),
            priority=20,
        )
    )
    _backends.register(
        _backends.Backend(
            "sdpa",
            _op,
            _sd,
            available=list,
            supports=_sdpa_supports,
            priority=40,
        )
    )
    _backends.register(_backends.Backend("reference", _op, _ref, available=list, priority=100))
