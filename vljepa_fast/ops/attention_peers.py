"""attention and attention_varlen on the outside peers: flash-attn (2, and FlashAttention-3
where installed) and xformers.

All are optional: a record is available only when its package imports, and says why not
otherwise. The ``flash_attn`` record runs FlashAttention-3 (``flash_attn_interface``, the hopper
build of flash-attention) where it serves the inputs (:func:`fa3_serves`: Hopper, 16-bit, head
dim a multiple of 8 up to 256, not in deterministic mode while flash-attn 2 is there), else
flash-attn 2; both take the same keywords, so the calls below are shared.

Neither library has a key padding mask in its dense API, so key padding is served by
unpadding: the real keys of every batch entry are gathered into one packed sequence and the
queries attend within their own entry (flash-attn's varlen kernel; xformers' BlockDiagonalMask).
That is exact for bidirectional attention, whatever the pattern of the mask. It is not for
causal attention: both libraries align a causal mask to each sequence's own key count (bottom
right), not to the padded key positions of vf.attention's contract, so causal + key padding is
refused with that reason; so is a window with key padding (the window would follow the packed
positions). Sliding windows: flash-attn >= 2.3 takes window_size with vf.attention's exact rule
(bounds i + S - T - left <= j <= i + S - T + right, bottom-right aligned per sequence, a row
with no key gets zeros), dense without key padding and varlen; xformers refuses windows.
GQA: flash-attn takes Hq % Hkv == 0 natively; xformers gets the [B, M, G, H, D] layout with
K/V broadcast over the query heads of a group (a stride-0 view, no copy).

Plans: with a key_padding_mask, ``supports`` takes the real keys of every batch entry from
``AttentionInputs.key_counts`` (read on the host once per call, shared with the Triton record
that ``auto`` asks first); the run unpads with them (no second read).
Varlen inputs carry their sequence lengths from validation (VarlenInputs.lengths_q/_k), so the
varlen records read nothing on the host. ``mask_queries``: the padded queries are unpadded too
(T == S, the same positions as the keys), so the kernels see only real tokens and the packed
output is scattered back into zeros (``index_copy``: padded rows get zeros and no gradient).

NaN rule (vf.attention's docstring): unpadding keeps padded keys out of the kernels entirely;
the rows the rule makes NaN that a fused softmax may leave finite (a non-finite query, no
finite key: see ops.attention.nan_rows) are set to NaN afterwards. cu_seqlens are passed
contiguous (the kernels read them as plain arrays).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import _backends
from vljepa_fast.ops import _common
from vljepa_fast.ops.attention import (
    AttentionInputs,
    KeyCounts,
    VarlenInputs,
    dense_nan_rows,
    varlen_nan_rows,
)

__all__ = [
    "FA3",
    "KeyCounts",
    "fa3_limits",
    "fa3_serves",
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
_WINDOW_PADDING = (
    "window_size with key_padding_mask: unpadding packs the real keys, so the window would "
    "follow packed positions, not the padded key positions of vf.attention's contract"
)
_XFORMERS_WINDOW = (
    "window_size: xformers' local-attention biases are not checked exact against vf.attention's "
    "rule (bottom-right aligned (left, right) bounds, GQA, varlen) here; not served"
)


class _Peer(NamedTuple):
    """What one peer library serves."""

    module: str
    dtypes: tuple[torch.dtype, ...]
    min_major: int  # compute capability
    empty_queries: bool  # whether a varlen sequence may have no query
    priority: int
    deterministic: bool


_FLASH = _Peer("flash_attn", FLASH_DTYPES, 8, True, priority=25, deterministic=True)
# xformers' backward may accumulate with atomics
_XFORMERS = _Peer("xformers", XFORMERS_DTYPES, 5, False, priority=35, deterministic=False)


#: FlashAttention-3's module (flash-attention's hopper/ build: ``flash_attn_interface``)
FA3 = "flash_attn_interface"


@functools.cache
def _probe(module: str) -> tuple[str, ...]:
    what = module
    if module == FA3:
        what += " (FlashAttention-3, flash-attention's hopper build)"
    if importlib.util.find_spec(module) is None:
        return (f"{what} is not installed",)
    try:
        mod = importlib.import_module("xformers.ops" if module == "xformers" else module)
    except Exception as e:  # a broken build raises anything from ImportError to OSError
        return (f"{what} is installed but does not import: {type(e).__name__}: {e}",)
    if module == "flash_attn" and not hasattr(mod, "flash_attn_varlen_func"):
        version = getattr(mod, "__version__", "?")
        return (f"flash_attn {version} has no flash_attn_varlen_func (flash-attn 2 is needed)",)
    if module == FA3:
        for fn in ("flash_attn_func", "flash_attn_varlen_func"):
            params = _params(getattr(mod, fn, None))
            if params is None or not {"window_size", "deterministic"} <= set(params):
                return (f"{FA3} has no {fn} with window_size and deterministic (an old build)",)
    return ()


def _params(fn: object) -> tuple[str, ...] | None:
    """The parameter names of ``fn`` (None: not a function, or no signature to read)."""
    if not callable(fn):
        return None
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a compiled wrapper without a signature
        return None


def _import_reasons(module: str) -> list[str]:
    """Why ``module`` cannot be used here (empty when it imports); probed once per process."""
    return list(_probe(module))


def _flash_available() -> list[str]:
    """The flash_attn record runs flash-attn 2 (``flash_attn``) or FlashAttention-3
    (``flash_attn_interface``): unavailable only when neither imports."""
    fa2 = _import_reasons("flash_attn")
    fa3 = _import_reasons(FA3) if fa2 else []
    return fa2 + fa3 if fa3 else []


def fa3_serves(x: AttentionInputs | VarlenInputs) -> list[str]:
    """Why FlashAttention-3 does not take these inputs (empty: the flash_attn record runs them
    on FA3): it must import, the device must be Hopper (compute capability 9.x), the dtype 16-bit
    and the head dim a multiple of 8 up to 256; under deterministic mode FA2 is preferred (FA3's
    deterministic backward is not bit-identical in every configuration), FA3 then only serves
    where FA2 is missing."""
    why = _import_reasons(FA3)
    if why:
        return why
    q = x.q
    if q.device.type != "cuda":
        return [f"{FA3} runs CUDA tensors"]
    return fa3_limits(torch.cuda.get_device_capability(q.device), q.dtype, q.shape[-1])


def fa3_limits(capability: tuple[int, int], dtype: torch.dtype, head_dim: int) -> list[str]:
    """:func:`fa3_serves` past the import and the device type: what FA3 takes here."""
    why = []
    major, minor = capability
    if major != 9:
        why.append(f"{FA3} runs on Hopper (compute capability 9.x), got {major}.{minor}")
    if dtype not in FLASH_DTYPES:
        why.append(f"{FA3} here runs float16/bfloat16, got {str(dtype).removeprefix('torch.')}")
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        why.append(
            f"{FA3} takes head dims that are multiples of 8 up to {MAX_HEAD_DIM}, got {head_dim}"
        )
    if torch.are_deterministic_algorithms_enabled() and not _import_reasons("flash_attn"):
        why.append("deterministic mode: flash-attn 2's deterministic backward is used instead")
    return why


def _flash_impl_reasons(x: AttentionInputs | VarlenInputs) -> list[str]:
    """Why the only flash-attn installed, FA3, cannot run these inputs (empty: it can, or
    flash-attn 2 is installed and runs what FA3 does not; with neither, ``available()`` says
    so before anything is asked)."""
    if not _import_reasons("flash_attn") or _import_reasons(FA3):
        return []
    return [f"flash-attn 2 is not installed, and {why}" for why in fa3_serves(x)]


def _flash_module(x: AttentionInputs | VarlenInputs):
    """The module that runs these inputs: FA3 where it serves them (:func:`fa3_serves`), else
    flash-attn 2. Both take the same keywords; FA3's functions may return (out, lse)."""
    return importlib.import_module(FA3 if not fa3_serves(x) else "flash_attn")


def _out(result: Tensor | tuple) -> Tensor:
    """The output of a flash-attn call (FA3 builds return (out, lse) from some versions)."""
    return result[0] if isinstance(result, tuple) else result


@functools.cache
def _flash_window_reasons() -> tuple[str, ...]:
    """Why the installed flash_attn cannot take window_size (it came with flash-attn 2.3)."""
    import flash_attn

    for fn in (flash_attn.flash_attn_func, flash_attn.flash_attn_varlen_func):
        if "window_size" not in (_params(fn) or ()):
            version = getattr(flash_attn, "__version__", "?")
            return (f"window_size: flash_attn {version} has no window_size (flash-attn >= 2.3)",)
    return ()


def _window_reasons(peer: _Peer, x: AttentionInputs | VarlenInputs) -> list[str]:
    """Why ``peer`` cannot serve the window of these inputs exactly (empty: no window, or it
    can). flash-attn's window_size is vf.attention's rule (same bounds, bottom-right aligned
    per sequence, a row with no key gets zeros); xformers is refused."""
    if x.window is None:
        return []
    if peer is _XFORMERS:
        return [_XFORMERS_WINDOW]
    # FA3 always has window_size (its probe checks it); flash-attn 2 from 2.3
    fa2_runs = not _import_reasons(peer.module) and bool(fa3_serves(x))
    why = list(_flash_window_reasons()) if fa2_runs else []
    if isinstance(x, AttentionInputs) and x.key_padding_mask is not None:
        why.append(_WINDOW_PADDING)
    return why


def _common_reasons(peer: _Peer, q: Tensor) -> list[str]:
    why = _common.dtype_in("q", q, peer.dtypes)
    if q.shape[-1] > MAX_HEAD_DIM:
        why.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < peer.min_major:
            why.append(f"needs compute capability >= {peer.min_major}.0, got {major}.{minor}")
    return why


def _peer_reasons(peer: _Peer, x: AttentionInputs | VarlenInputs) -> list[str]:
    why = _common_reasons(peer, x.q)
    if peer is _FLASH:
        why += _flash_impl_reasons(x)
    return why + _window_reasons(peer, x)


def _dense_supports(peer: _Peer, x: AttentionInputs) -> KeyCounts | None | _backends.Refusal:
    """Reasons ``peer`` cannot serve these vf.attention inputs, or its plan (:class:`KeyCounts`
    with a key_padding_mask, else None). With ``mask_queries`` the queries are unpadded like the
    keys (the same positions, T == S), so a batch entry with no real token has no query either:
    flash-attn takes such an empty sequence, xformers' BlockDiagonalMask does not."""
    why = _peer_reasons(peer, x)
    plan = None
    if x.key_padding_mask is not None:
        if x.causal:
            why.append(_CAUSAL_PADDING)
        elif torch.compiler.is_compiling():
            why.append(
                "a key_padding_mask under torch.compile (its key counts are read on the host)"
            )
        elif not why:  # read the mask only when nothing else refuses
            # one host read per inputs object, shared with every record auto asks
            plan = x.key_counts()
            if min(plan.host) == 0 and not x.mask_queries:
                why.append(
                    "a batch entry has no key (every key padded); its output is not defined there"
                )
            elif min(plan.host) == 0 and not peer.empty_queries:
                why.append(
                    "a batch entry has no real token (mask_queries; BlockDiagonalMask takes no "
                    "empty block)"
                )
    return _backends.plan_or_refusal(why, plan)


def _varlen_supports(peer: _Peer, x: VarlenInputs) -> None | _backends.Refusal:
    """Reasons ``peer`` cannot serve these vf.attention_varlen inputs (None: it can)."""
    why = _peer_reasons(peer, x)
    if any(a > 0 and b == 0 for a, b in zip(x.lengths_q, x.lengths_k)):
        why.append("a sequence has queries but no key; its output is not defined there")
    elif not peer.empty_queries and any(a == 0 for a in x.lengths_q):
        why.append("a sequence has no query (BlockDiagonalMask takes no empty block)")
    return _backends.plan_or_refusal(why)


flash_attn_supports = functools.partial(_dense_supports, _FLASH)
flash_attn_varlen_supports = functools.partial(_varlen_supports, _FLASH)
xformers_supports = functools.partial(_dense_supports, _XFORMERS)
xformers_varlen_supports = functools.partial(_varlen_supports, _XFORMERS)


class _Unpadded(NamedTuple):
    """The real tokens of a key-padded call packed: k and v [N, Hkv, D]; with mask_queries the
    real queries too (``q`` [N, Hq, D], ``index`` [N] their rows of the [B * T] queries), else
    every query row (``q`` [B * T, Hq, D], ``index`` None)."""

    q: Tensor
    k: Tensor
    v: Tensor
    index: Tensor | None


def _unpad(x: AttentionInputs) -> _Unpadded:
    B, S, Hkv, D = x.k.shape
    index = x.key_padding_mask.reshape(-1).nonzero().squeeze(1)
    q = x.q.reshape(B * x.q.shape[1], *x.q.shape[2:])
    return _Unpadded(
        q.index_select(0, index) if x.mask_queries else q,
        x.k.reshape(B * S, Hkv, D).index_select(0, index),
        x.v.reshape(B * S, Hkv, D).index_select(0, index),
        index if x.mask_queries else None,
    )


def _repad(out: Tensor, u: _Unpadded, x: AttentionInputs) -> Tensor:
    """[B, T, Hq, D] from the packed output rows: padded query rows zero (mask_queries), so
    they pass no gradient back."""
    B, T, Hq, D = x.q.shape
    if u.index is not None:
        out = out.new_zeros(B * T, Hq, D).index_copy(0, u.index, out)
    return out.reshape(B, T, Hq, D)


# ------------------------------------------------------------------------------- flash-attn


def _flash_window(x: AttentionInputs | VarlenInputs) -> dict:
    """flash-attn's window_size keyword: the effective window (causal folded in), none without
    one (so that flash-attn < 2.3 keeps serving everything else)."""
    return {} if x.window is None else {"window_size": tuple(x.window)}


def _flash(x: AttentionInputs, plan: KeyCounts | None) -> Tensor:
    flash_attn = _flash_module(x)
    q = x.q
    deterministic = torch.are_deterministic_algorithms_enabled()
    nan = dense_nan_rows(x)[..., None]
    if plan is None:
        out = flash_attn.flash_attn_func(
            q,
            x.k,
            x.v,
            softmax_scale=x.scale,
            causal=x.causal,
            deterministic=deterministic,
            **_flash_window(x),
        )
        return _out(out).masked_fill(nan, float("nan"))
    B, T = q.shape[:2]
    u = _unpad(x)
    cu_k = F.pad(plan.lengths.cumsum(0, dtype=torch.int32), (1, 0))
    if x.mask_queries:  # the queries sit where the keys do: the same offsets
        cu_q, max_q = cu_k, max(plan.host)
    else:
        cu_q = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
        max_q = T
    out = flash_attn.flash_attn_varlen_func(
        u.q,
        u.k,
        u.v,
        cu_q,
        cu_k,
        max_q,
        max(plan.host),
        softmax_scale=x.scale,
        causal=False,
        deterministic=deterministic,
    )
    return _repad(_out(out), u, x).masked_fill(nan, float("nan"))


def _flash_varlen(x: VarlenInputs, plan: None) -> Tensor:
    flash_attn = _flash_module(x)
    out = flash_attn.flash_attn_varlen_func(
        x.q,
        x.k,
        x.v,
        x.cu_seqlens_q.contiguous(),
        x.cu_seqlens_k.contiguous(),
        x.max_seqlen_q,
        x.max_seqlen_k,
        softmax_scale=x.scale,
        causal=x.causal,
        deterministic=torch.are_deterministic_algorithms_enabled(),
        **_flash_window(x),
    )
    return _out(out).masked_fill(varlen_nan_rows(x)[..., None], float("nan"))


# --------------------------------------------------------------------------------- xformers


def _grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[.., M, H, D] -> xformers' [.., M, Hkv, H / Hkv, D]; K/V broadcast (stride 0) over groups."""
    Hq, Hkv, D = q.shape[-2], k.shape[-2], q.shape[-1]
    g = Hq // Hkv
    q5 = q.reshape(*q.shape[:-2], Hkv, g, D)
    k5 = k.unsqueeze(-2).expand(*k.shape[:-1], g, D)
    v5 = v.unsqueeze(-2).expand(*v.shape[:-1], g, D)
    return q5, k5, v5


def _xformers(x: AttentionInputs, plan: KeyCounts | None) -> Tensor:
    from xformers.ops import fmha

    B, T, Hq, D = x.q.shape
    nan = dense_nan_rows(x)[..., None]
    if plan is None:
        bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if x.causal else None
        q5, k5, v5 = _grouped(x.q, x.k, x.v)
        out = fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=x.scale)
        return out.reshape(B, T, Hq, D).masked_fill(nan, float("nan"))
    u = _unpad(x)
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(
        q_seqlen=list(plan.host) if x.mask_queries else [T] * B, kv_seqlen=list(plan.host)
    )
    q5, k5, v5 = _grouped(u.q[None], u.k[None], u.v[None])
    out = fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=x.scale)
    return _repad(out.reshape(-1, Hq, D), u, x).masked_fill(nan, float("nan"))


def _xformers_varlen(x: VarlenInputs, plan: None) -> Tensor:
    from xformers.ops import fmha

    mask = (
        fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask
        if x.causal
        else fmha.attn_bias.BlockDiagonalMask
    )
    bias = mask.from_seqlens(q_seqlen=list(x.lengths_q), kv_seqlen=list(x.lengths_k))
    q5, k5, v5 = _grouped(x.q[None], x.k[None], x.v[None])
    out = fmha.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=x.scale)
    return out.reshape(x.q.shape).masked_fill(varlen_nan_rows(x)[..., None], float("nan"))


def _records() -> list[_backends.Backend]:
    """The four records (flash_attn and xformers, for attention and attention_varlen)."""
    return [
        _backends.Backend(
            peer.module,
            op,
            run,
            available=_flash_available if peer is _FLASH else lambda: _import_reasons("xformers"),
            supports=functools.partial(supports, peer),
            devices=("cuda",),
            priority=peer.priority,
            deterministic=peer.deterministic,
        )
        for peer, dense, varlen in (
            (_FLASH, _flash, _flash_varlen),
            (_XFORMERS, _xformers, _xformers_varlen),
        )
        for op, run, supports in (
            ("attention", dense, _dense_supports),
            ("attention_varlen", varlen, _varlen_supports),
        )
    ]


for _record in _records():
    _backends.register(_record)
