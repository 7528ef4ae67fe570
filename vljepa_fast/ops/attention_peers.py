"""attention and attention_varlen on the outside peers: flash-attn 2 and xformers.

Both are optional: a record is available only when its package imports, and says why not
otherwise. Neither library has a key padding mask in its dense API, so key padding is served by
unpadding: the real keys of every batch entry are gathered into one packed sequence and the
queries attend within their own entry (flash-attn's varlen kernel; xformers' BlockDiagonalMask).
That is exact for bidirectional attention, whatever the pattern of the mask. It is not for
causal attention: both libraries align a causal mask to each sequence's own key count (bottom
right), not to the padded key positions of vf.attention's contract, so causal + key padding is
refused with that reason. GQA: flash-attn takes Hq % Hkv == 0 natively; xformers gets the
[B, M, G, H, D] layout with K/V broadcast over the query heads of a group (a stride-0 view, no
copy).

NaN rule (vf.attention's docstring): unpadding keeps padded keys out of the kernels entirely;
the rows the rule makes NaN that a fused softmax may leave finite (a non-finite query, no
finite key: see ops.attention.nan_rows) are set to NaN afterwards. cu_seqlens are passed
contiguous (the kernels read them as plain arrays).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import _backends
from vljepa_fast.ops import _common
from vljepa_fast.ops.attention import dense_nan_rows, varlen_nan_rows

__all__ = [
    "flash_attn_supports",
    "flash_attn_varlen_supports",
    "xformers_supports",
    "xformers_varlen_supports",
]

FLASH_DTYPES = (torch.float16, torch.bfloat16)
XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

_CAUSAL_PADDING = (
    "causal with key_padding_mask: the library aligns its causal mask to each sequence's own key "
    "count, not to the padded key positions"
)


@functools.cache
def _probe(module: str) -> tuple[str, ...]:
    if importlib.util.find_spec(module) is None:
        return (f"{module} is not installed",)
    try:
        mod = importlib.import_module("xformers.ops" if module == "xformers" else module)
    except Exception as e:  # a broken build raises anything from ImportError to OSError
        return (f"{module} is installed but does not import: {type(e).__name__}: {e}",)
    if module == "flash_attn" and not hasattr(mod, "flash_attn_varlen_func"):
        version = getattr(mod, "__version__", "?")
        return (f"flash_attn {version} has no flash_attn_varlen_func (flash-attn 2 is needed)",)
    return ()


def _import_reasons(module: str) -> list[str]:
    """Why ``module`` cannot be used here (empty when it imports); probed once per process."""
    return list(_probe(module))


def _common_reasons(q: Tensor, dtypes: tuple[torch.dtype, ...], min_major: int) -> list[str]:
    why = _common.dtype_in("q", q, dtypes)
    if q.shape[-1] > MAX_HEAD_DIM:
        why.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < min_major:
            why.append(f"needs compute capability >= {min_major}.0, got {major}.{minor}")
    return why


def _padding_reasons(key_padding_mask: Tensor | None, causal: bool) -> list[str]:
    if key_padding_mask is None:
        return []
    if causal:
        return [_CAUSAL_PADDING]
    # reads the mask on the host; the run needs the lengths there anyway
    if not bool(key_padding_mask.any(dim=1).all()):
        return ["a batch entry has no key (every key padded); its output is not defined there"]
    return []


def _varlen_reasons(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *, empty_ok: bool) -> list[str]:
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    if any(a > 0 and b == 0 for a, b in zip(lq, lk)):
        return ["a sequence has queries but no key; its output is not defined there"]
    if not empty_ok and any(a == 0 for a in lq):
        return ["a sequence has no query (BlockDiagonalMask takes no empty block)"]
    return []


def flash_attn_supports(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> list[str]:
    """Reasons flash-attn 2 cannot serve these vf.attention inputs (empty: it can)."""
    return _common_reasons(q, FLASH_DTYPES, 8) + _padding_reasons(key_padding_mask, causal)


def flash_attn_varlen_supports(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> list[str]:
    """Reasons flash-attn 2 cannot serve these vf.attention_varlen inputs."""
    return _common_reasons(q, FLASH_DTYPES, 8) + _varlen_reasons(
        cu_seqlens_q, cu_seqlens_k, empty_ok=True
    )


def xformers_supports(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> list[str]:
    """Reasons xformers' memory_efficient_attention cannot serve these vf.attention inputs."""
    return _common_reasons(q, XFORMERS_DTYPES, 5) + _padding_reasons(key_padding_mask, causal)


def xformers_varlen_supports(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> list[str]:
    """Reasons xformers cannot serve these vf.attention_varlen inputs."""
    return _common_reasons(q, XFORMERS_DTYPES, 5) + _varlen_reasons(
        cu_seqlens_q, cu_seqlens_k, empty_ok=False
    )


def _unpad_keys(k: Tensor, v: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Real keys and values packed [N, Hkv, D], and the [B] int32 key counts."""
    B, S, Hkv, D = k.shape
    index = key_padding_mask.reshape(-1).nonzero().squeeze(1)
    lengths = key_padding_mask.sum(dim=1, dtype=torch.int32)
    return (
        k.reshape(B * S, Hkv, D).index_select(0, index),
        v.reshape(B * S, Hkv, D).index_select(0, index),
        lengths,
    )


# ------------------------------------------------------------------------------- flash-attn


def _flash(q, k, v, *, key_padding_mask=None, causal=False, scale=None):
    import flash_attn

    deterministic = torch.are_deterministic_algorithms_enabled()
    nan = dense_nan_rows(q, k, key_padding_mask, causal)[..., None]
    if key_padding_mask is None:
        out = flash_attn.flash_attn_func(
            q, k, v, softmax_scale=scale, causal=causal, deterministic=deterministic
        )
        return out.masked_fill(nan, float("nan"))
    B, T, Hq, D = q.shape
    k_real, v_real, lengths = _unpad_keys(k, v, key_padding_mask)
    cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(B * T, Hq, D),
        k_real,
        v_real,
        cu_q,
        cu_k,
        T,
        int(lengths.max()),
        softmax_scale=scale,
        causal=False,
        deterministic=deterministic,
    )
    return out.view(B, T, Hq, D).masked_fill(nan, float("nan"))


def _flash_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None
):
    import flash_attn

    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    out = flash_attn.flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=scale,
        causal=causal,
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    nan = varlen_nan_rows(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    return out.masked_fill(nan[..., None], float("nan"))


# --------------------------------------------------------------------------------- xformers


def _grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[.., M, H, D] -> xformers' [.., M, Hkv, H / Hkv, D]; K/V broadcast (stride 0) over groups."""
    Hq, Hkv, D = q.shape[-2], k.shape[-2], q.shape[-1]
    g = Hq // Hkv
    q5 = q.reshape(*q.shape[:-2], Hkv, g, D)
    k5 = k.unsqueeze(-2).expand(*k.shape[:-1], g, D)
    v5 = v.unsqueeze(-2).expand(*v.shape[:-1], g, D)
    return q5, k5, v5


def _xformers(q, k, v, *, key_padding_mask=None, causal=False, scale=None):
    from xformers.ops import fmha

    B, T, Hq, D = q.shape
    nan = dense_nan_rows(q, k, key_padding_mask, causal)[..., None]
    if key_padding_mask is None:
        bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
        out = fmha.memory_efficient_attention(*_grouped(q, k, v), attn_bias=bias, scale=scale)
        return out.reshape(B, T, Hq, D).masked_fill(nan, float("nan"))
    k_real, v_real, lengths = _unpad_keys(k, v, key_padding_mask)
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(
        q_seqlen=[T] * B, kv_seqlen=lengths.tolist()
    )
    q5, k5, v5 = _grouped(q.reshape(1, B * T, Hq, D), k_real[None], v_real[None])
    out = fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=scale)
    return out.reshape(B, T, Hq, D).masked_fill(nan, float("nan"))


def _xformers_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None
):
    from xformers.ops import fmha

    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    mask = (
        fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask
        if causal
        else fmha.attn_bias.BlockDiagonalMask
    )
    bias = mask.from_seqlens(q_seqlen=lq, kv_seqlen=lk)
    q5, k5, v5 = _grouped(q[None], k[None], v[None])
    out = fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=scale)
    nan = varlen_nan_rows(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    return out.reshape(q.shape).masked_fill(nan[..., None], float("nan"))


def _records() -> list[_backends.Backend]:
    """The four records (flash_attn and xformers, for attention and attention_varlen)."""
    B = _backends.Backend
    return [
        B(
            "flash_attn",
            "attention",
            _flash,
            available=lambda: _import_reasons("flash_attn"),
            supports=flash_attn_supports,
            devices=("cuda",),
            priority=25,
        ),
        B(
            "flash_attn",
            "attention_varlen",
            _flash_varlen,
            available=lambda: _import_reasons("flash_attn"),
            supports=flash_attn_varlen_supports,
            devices=("cuda",),
            priority=25,
        ),
        # its backward may accumulate with atomics
        B(
            "xformers",
            "attention",
            _xformers,
            available=lambda: _import_reasons("xformers"),
            supports=xformers_supports,
            devices=("cuda",),
            priority=35,
            deterministic=False,
        ),
        B(
            "xformers",
            "attention_varlen",
            _xformers_varlen,
            available=lambda: _import_reasons("xformers"),
            supports=xformers_varlen_supports,
            devices=("cuda",),
            priority=35,
            deterministic=False,
        ),
    ]


for _record in _records():
    _backends.register(_record)
