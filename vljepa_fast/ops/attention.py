"""attention and attention_varlen: typed inputs, their validation, and the backend records
(Triton flash attention, torch SDPA, eager reference; flash_attn and xformers register in
ops/attention_peers.py).

Every backend takes the validated inputs (:class:`AttentionInputs`, :class:`VarlenInputs`, built
by :func:`attention_inputs` / :func:`varlen_inputs`) and the plan its ``supports`` returned:
Triton's plan is the key lengths it read from a right-padded ``key_padding_mask`` (one host read
per call); with ``mask_queries`` they are its query lengths too (``seqlens_q``: the kernels skip
the padded query blocks), while sdpa and the reference compute the padded query rows and zero
them (:func:`zero_padded_queries`).

SDPA is the CPU default: torch's fused CPU kernel with GQA (enable_gqa) and a boolean mask
broadcast over heads, never a dense additive [B, 1, T, S] float mask per head. A sliding window
(``window_size``; :func:`effective_window` folds causal in) is the band of that boolean mask,
[B or 1, 1, T, S], per sequence for varlen: exact, as every bound is.

NaN rule (vf.attention's docstring) on SDPA: padded keys are zeroed before the call (a masked
pair still computes 0 * v, NaN for a NaN v; varlen padding slots likewise, which otherwise copy
row 0 of the pack, a real row of another sequence), and the rows that torch's fused kernels turn
finite although plain softmax gives NaN (a NaN query, or no finite key: a -inf running max read
as "no key") are set to NaN afterwards (:func:`nan_rows`, a few elementwise passes, no sync;
with a window, key counts inside each query's window from prefix sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import _backends, _validate, reference
from vljepa_fast.ops import _common

__all__ = [
    "AttentionInputs",
    "VarlenInputs",
    "Window",
    "attention_inputs",
    "check_window",
    "effective_window",
    "dense_nan_rows",
    "zero_padded_queries",
    "nan_rows",
    "varlen_inputs",
    "varlen_nan_rows",
]

# ----------------------------------------------------------------------- inputs, validation


class Window(NamedTuple):
    """A local attention window in flash-attn's convention, causal folded in: query i (of T)
    attends key j (of S) iff ``i + S - T - left <= j <= i + S - T + right``, a bound of -1
    being unbounded (:func:`effective_window`)."""

    left: int
    right: int


def effective_window(window_size: tuple[int, int], causal: bool) -> Window | None:
    """The window of ``window_size`` with causal folded in (right bound 0), or None when it hides
    no key beyond what ``causal`` alone hides (then backends serve ``causal`` as before)."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and (right < 0 or causal):
        return None
    return Window(left, right)


def check_window(window_size: object) -> tuple[int, int]:
    """``window_size`` as a pair of plain ints >= -1 (numpy integers accepted).

    Raises:
        ValueError: not a tuple or list of two ints >= -1 (bools refused), naming it.
    """
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(
            "window_size: expected a (left, right) tuple or list of two ints >= -1 (-1 = "
            f"unbounded), got {window_size!r}"
        )
    out = []
    for side, w in zip(("left", "right"), window_size):
        w = _validate.plain_number(w)
        if isinstance(w, bool) or not isinstance(w, int) or w < -1:
            raise ValueError(
                f"window_size: expected ints >= -1 (-1 = unbounded), got {w!r} as the {side} "
                f"bound of {window_size!r}"
            )
        out.append(w)
    return out[0], out[1]


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """vf.attention's arguments, validated (:func:`attention_inputs`); shapes as documented
    there: q [B, T, Hq, D], k and v [B, S, Hkv, D], key_padding_mask [B, S] bool or None.
    ``mask_queries`` (only with a key_padding_mask and T == S): query i of batch b is padding
    where key i is; its output row is zero and it passes no gradient."""

    q: Tensor
    k: Tensor
    v: Tensor
    key_padding_mask: Tensor | None
    causal: bool
    scale: float | None
    window_size: tuple[int, int] = (-1, -1)
    mask_queries: bool = False

    @property
    def real_queries(self) -> Tensor | None:
        """[B, T] bool, True = a real query (the key padding mask) with ``mask_queries``; None
        without it (every query row is computed)."""
        return self.key_padding_mask if self.mask_queries else None

    @property
    def window(self) -> Window | None:
        """The effective window (causal folded in), None when it hides no key beyond what
        ``causal`` alone hides (:func:`effective_window`)."""
        return effective_window(self.window_size, self.causal)

    @property
    def device(self) -> torch.device:
        return self.q.device

    def key_counts(self) -> KeyCounts:
        """The mask's real keys per batch entry, read on the host once per inputs object (one
        device sync on GPU, however many backends ask under ``auto``). Needs a mask."""
        counts = self.__dict__.get("_key_counts")
        if counts is None:
            counts = _key_counts(self.key_padding_mask)
            object.__setattr__(self, "_key_counts", counts)  # a cache, not a field
        return counts


class KeyCounts(NamedTuple):
    """:meth:`AttentionInputs.key_counts`: int32 [B] ``lengths`` on the inputs' device, the same
    on the host (``host``), and whether every mask row is True... then False... (``right``)."""

    lengths: Tensor
    host: tuple[int, ...]
    right: bool


@dataclass(frozen=True, eq=False)
class VarlenInputs:
    """vf.attention_varlen's arguments, validated (:func:`varlen_inputs`): q [total_q, Hq, D],
    k and v [total_k, Hkv, D], int32 cu_seqlens [B + 1]. ``lengths_q`` and ``lengths_k`` are the
    B sequence lengths, read on the host once by the validation (backends that need them on the
    host take them from here instead of reading cu_seqlens again)."""

    q: Tensor
    k: Tensor
    v: Tensor
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    scale: float | None
    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...]
    window_size: tuple[int, int] = (-1, -1)

    @property
    def window(self) -> Window | None:
        """The effective window (causal folded in), None when it hides no key beyond what
        ``causal`` alone hides (:func:`effective_window`)."""
        return effective_window(self.window_size, self.causal)

    @property
    def device(self) -> torch.device:
        return self.q.device


def _check_flags(causal: object, scale: object) -> float | None:
    """``scale`` as a plain float or None (numpy scalars too), after checking both flags."""
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    scale = _validate.plain_number(scale)
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    return scale


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, ndim: int, layout_q: str, layout_kv: str) -> None:
    _validate.tensor("q", q, ndim=ndim, layout=layout_q)
    _validate.tensor("k", k, ndim=ndim, layout=layout_kv)
    _validate.tensor("v", v, ndim=ndim, layout=layout_kv)
    _validate.same(("q", "k", "v"), (q, k, v), "dtype")
    _validate.same(("q", "k", "v"), (q, k, v), "device")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _validate.last_dim_contiguous(name, x)
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"k: the number of KV heads ({hkv}) must divide the number of query heads ({hq})"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k: expected head dim {q.shape[-1]} (q's), got {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("q: expected a head dim of at least 1, got 0")


def attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    scale: float | None = None,
    mask_queries: bool = False,
) -> AttentionInputs:
    """vf.attention's arguments checked (its docstring states the contract) and packed.

    Raises:
        ValueError: a malformed argument (named in the message).
    """
    _check_qkv(q, k, v, 4, "[B, T, Hq, D]", "[B, S, Hkv, D]")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch size {q.shape[0]} (q's), got {k.shape[0]}")
    for name, x, dim, what in (
        ("q", q, 0, "batch entry"),
        ("q", q, 1, "query"),
        ("k", k, 1, "key"),
    ):
        _validate.nonempty(name, x, dim, what)
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"key_padding_mask: expected a bool tensor, got {got}")
        if tuple(m.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(
                f"key_padding_mask: expected shape [B, S] = {(k.shape[0], k.shape[1])}, got "
                f"{tuple(m.shape)}"
            )
        if m.device != q.device:
            raise ValueError(f"key_padding_mask: expected device {q.device}, got {m.device}")
    scale = _check_flags(causal, scale)
    window_size = check_window(window_size)
    _check_mask_queries(mask_queries, key_padding_mask, q.shape[1], k.shape[1])
    return AttentionInputs(q, k, v, key_padding_mask, causal, scale, window_size, mask_queries)


def _check_mask_queries(mask_queries: object, mask: Tensor | None, T: int, S: int) -> None:
    """mask_queries=True needs the key padding mask (it marks the queries too) and T == S."""
    if not isinstance(mask_queries, bool):
        raise ValueError(f"mask_queries: expected a bool, got {mask_queries!r}")
    if not mask_queries:
        return
    if mask is None:
        raise ValueError(
            "mask_queries: True needs key_padding_mask (query i is padding where key i is), got "
            "key_padding_mask=None"
        )
    if T != S:
        raise ValueError(
            f"mask_queries: True needs as many queries as keys (T == S: query i is padding "
            f"where key i is), got T={T}, S={S}"
        )


def _check_offsets(
    name: str, cu: object, total: int, mx: object, device: torch.device
) -> tuple[int, ...]:
    """The sequence lengths of ``cu`` (read on the host), after checking it and its max."""
    if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
        got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        raise ValueError(f"{name}: expected a 1-D int32 tensor, got {got}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device}, got {cu.device}")
    if cu.numel() < 2:
        raise ValueError(f"{name}: expected at least 2 entries (B + 1), got {cu.numel()}")
    vals = cu.tolist()
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])) or vals[-1] != total:
        raise ValueError(
            f"{name}: expected 0, non-decreasing, ending at {total}, got {vals[:8]}"
            + ("..." if len(vals) > 8 else "")
        )
    lengths = tuple(b - a for a, b in zip(vals, vals[1:]))
    mname = "max_seqlen_q" if name.endswith("q") else "max_seqlen_k"
    _validate.int_in(mname, mx, max(lengths), hint=f" (the longest sequence in {name})")
    return lengths


def varlen_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    scale: float | None = None,
) -> VarlenInputs:
    """vf.attention_varlen's arguments checked (its docstring states the contract) and packed.
    Reads cu_seqlens on the host (one device sync each on GPU).

    Raises:
        ValueError: a malformed argument (named in the message).
    """
    _check_qkv(q, k, v, 3, "[total_q, Hq, D]", "[total_k, Hkv, D]")
    max_seqlen_q, max_seqlen_k = map(_validate.plain_number, (max_seqlen_q, max_seqlen_k))
    lengths_q = _check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    lengths_k = _check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_k: expected {cu_seqlens_q.numel()} entries (as cu_seqlens_q), got "
            f"{cu_seqlens_k.numel()}"
        )
    scale = _check_flags(causal, scale)
    window_size = check_window(window_size)
    return VarlenInputs(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        lengths_q,
        lengths_k,
        window_size,
    )


# -------------------------------------------------------------------------------- NaN rule


def nan_rows(
    q_bad: Tensor,
    k_finite: Tensor,
    real_k: Tensor | None,
    shift: Tensor | int | None,
    window: Window | None = None,
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
            j <= i + shift. None: not causal. With a window: S - T always.
        window: the effective window (:func:`effective_window`, causal folded in): query i
            sees keys i + shift - left <= j <= i + shift + right.
    """
    if window is not None:
        return _window_nan_rows(q_bad, k_finite, real_k, shift, window)
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


def window_bounds(
    T: int, S: int, shift: Tensor | int, window: Window, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(lo, hi) [B or 1, T] long: query i sees keys lo <= j < hi of the window (clamped to
    [0, S], hi >= lo); ``shift`` is S - T ([B] tensor per sequence, or an int)."""
    if isinstance(shift, Tensor):
        shift = shift.to(torch.long)[:, None]
    diag = torch.arange(T, device=device)[None, :] + shift  # [B or 1, T]
    lo = (diag - window.left).clamp(0, S) if window.left >= 0 else torch.zeros_like(diag)
    hi = (diag + window.right + 1).clamp(0, S) if window.right >= 0 else torch.full_like(diag, S)
    return lo, torch.maximum(hi, lo)


def _window_nan_rows(
    q_bad: Tensor, k_finite: Tensor, real_k: Tensor | None, shift: Tensor | int, window: Window
) -> Tensor:
    """:func:`nan_rows` with a window: key counts in [lo, hi) from prefix sums over the keys."""
    B, T, Hq = q_bad.shape
    S, Hkv = k_finite.shape[1], k_finite.shape[2]
    dev = q_bad.device
    lo, hi = (b.expand(B, T) for b in window_bounds(T, S, shift, window, dev))
    if real_k is None:
        n_real = hi - lo
    else:
        c_real = F.pad(real_k.to(torch.int32).cumsum(1), (1, 0))  # [B, S + 1]
        n_real = c_real.gather(1, hi) - c_real.gather(1, lo)
    c_fin = F.pad(k_finite.to(torch.int32).cumsum(1), (0, 0, 1, 0))  # [B, S + 1, Hkv]
    n_fin = c_fin.gather(1, hi[..., None].expand(B, T, Hkv)) - c_fin.gather(
        1, lo[..., None].expand(B, T, Hkv)
    )
    no_finite = (n_fin == 0).repeat_interleave(Hq // Hkv, dim=2)
    return (n_real > 0)[..., None] & (q_bad | no_finite)


def _nonfinite_rows(t: Tensor) -> Tensor:
    """[..., H] bool: some entry of the head row is NaN or +-inf."""
    return ~torch.isfinite(t).all(dim=-1)


def dense_nan_rows(x: AttentionInputs) -> Tensor:
    """:func:`nan_rows` of vf.attention's inputs: [B, T, Hq] bool."""
    k_finite = _nonfinite_rows(x.k).logical_not_()
    if x.key_padding_mask is not None:
        k_finite = k_finite & x.key_padding_mask[:, :, None]
    w = x.window
    shift = x.k.shape[1] - x.q.shape[1] if x.causal or w is not None else None
    rows = nan_rows(_nonfinite_rows(x.q), k_finite, x.key_padding_mask, shift, w)
    if x.mask_queries:  # a padded query's row is zero whatever it holds
        rows = rows & x.key_padding_mask[:, :, None]
    return rows


def zero_padded_queries(out: Tensor, x: AttentionInputs) -> Tensor:
    """``out`` [B, T, Hq, D] with the padded query rows of ``mask_queries`` set to zero (a
    masked_fill: elementwise, no sync; its backward passes those rows no gradient); ``out``
    itself without ``mask_queries``."""
    real = x.real_queries
    return out if real is None else out.masked_fill(~real[:, :, None, None], 0.0)


class _Padded(NamedTuple):
    """Packed varlen rows laid out as [B, max_len] slots: gather index, validity, lengths."""

    index_q: Tensor
    valid_q: Tensor
    lengths_q: Tensor
    index_k: Tensor
    valid_k: Tensor
    lengths_k: Tensor


def _pad_index(cu: Tensor, max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gather index [B, max_len] into the packed rows, its validity mask, and the lengths."""
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(max_len, device=cu.device)[None, :]
    valid = pos < lengths[:, None]
    index = (cu[:-1, None].long() + pos).masked_fill(~valid, 0)
    return index, valid, lengths


def _padded(x: VarlenInputs) -> _Padded:
    return _Padded(
        *_pad_index(x.cu_seqlens_q, x.max_seqlen_q), *_pad_index(x.cu_seqlens_k, x.max_seqlen_k)
    )


def _padded_nan_rows(x: VarlenInputs, p: _Padded) -> Tensor:
    """:func:`nan_rows` of vf.attention_varlen's inputs in the padded layout: [B, max_q, Hq]."""
    k_finite = _nonfinite_rows(x.k).logical_not_()[p.index_k] & p.valid_k[:, :, None]
    w = x.window
    shift = (p.lengths_k - p.lengths_q) if x.causal or w is not None else None
    return nan_rows(_nonfinite_rows(x.q)[p.index_q], k_finite, p.valid_k, shift, w)


def varlen_nan_rows(x: VarlenInputs) -> Tensor:
    """:func:`nan_rows` of vf.attention_varlen's inputs: [total_q, Hq] bool."""
    p = _padded(x)
    return _padded_nan_rows(x, p)[p.valid_q]


# ---------------------------------------------------------------------------------- sdpa


def _allowed(
    B: int,
    T: int,
    S: int,
    device: torch.device,
    key_padding_mask: Tensor | None,
    causal: bool,
    lengths_q: Tensor | None = None,
    lengths_k: Tensor | None = None,
    window: Window | None = None,
) -> Tensor | None:
    """The boolean [B or 1, 1, T or 1, S] mask of allowed (query, key) pairs, or None for all.
    ``window``: the effective window (causal folded in), which then replaces ``causal``."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if window is not None:
        shift = S - T if lengths_q is None else lengths_k - lengths_q
        lo, hi = window_bounds(T, S, shift, window, device)  # [B or 1, T]
        j = torch.arange(S, device=device)[None, None, None, :]
        band = (j >= lo[:, None, :, None]) & (j < hi[:, None, :, None])
        return band if mask is None else mask & band
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
    # on CPU, asking whether any row is empty costs no device sync; when none is, SDPA's own
    # output goes on (the fill would copy it, and autograd would keep both copies)
    if empty is not None and (
        out.device.type != "cpu" or torch.compiler.is_compiling() or bool(empty.any())
    ):
        out = out.masked_fill(empty.permute(0, 2, 1, 3), 0.0)
    return out


def _sdpa(x: AttentionInputs, plan: None) -> Tensor:
    q, k, v, key_padding_mask = x.q, x.k, x.v, x.key_padding_mask
    B, T, _, _ = q.shape
    S = k.shape[1]
    nan = dense_nan_rows(x)
    if key_padding_mask is not None:
        k, v = _zero_padded(k, v, key_padding_mask)
    w = x.window
    if x.causal and w is None and key_padding_mask is None and T == S:
        return _sdpa_masked(q, k, v, None, x.scale, nan, is_causal=True)
    mask = _allowed(B, T, S, q.device, key_padding_mask, x.causal, window=w)
    # mask_queries: torch's kernel computes the padded query rows too; they are zeroed after
    return zero_padded_queries(_sdpa_masked(q, k, v, mask, x.scale, nan), x)


def _sdpa_varlen(x: VarlenInputs, plan: None) -> Tensor:
    q = x.q
    p = _padded(x)
    mask = p.valid_k[:, None, None, :]
    if x.causal or x.window is not None:
        mask = mask & _allowed(
            p.index_q.shape[0],
            x.max_seqlen_q,
            x.max_seqlen_k,
            q.device,
            None,
            x.causal,
            p.lengths_q,
            p.lengths_k,
            window=x.window,
        )
    # The padding slots gather row 0 of the pack (a real row of another sequence, maybe NaN):
    # zeroed, key and query slots alike, so that nothing of it reaches this sequence and no
    # gradient of a padding query (which may meet this sequence's NaN) flows back into row 0.
    kp, vp = _zero_padded(x.k[p.index_k], x.v[p.index_k], p.valid_k)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    qp = torch.where(p.valid_q[:, :, None, None], q[p.index_q], zero)
    out = _sdpa_masked(qp, kp, vp, mask, x.scale, _padded_nan_rows(x, p))  # [B, max_q, Hq, D]
    return out[p.valid_q]


def _sdpa_supports(x: AttentionInputs | VarlenInputs) -> None | _backends.Refusal:
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    return _backends.plan_or_refusal(_common.dtype_in("q", x.q, dtypes))


# ------------------------------------------------------------------------- triton backend
# Custom ops (with fake functions) so torch.compile traces through the Triton launches; the
# autograd formula saves q, k, v, out and the fp32 log-sum-exp only. Both ops end in the same
# masking arguments (_MASKING), which the kernel launchers take as keywords (_masking).

_MASKING = (
    "Tensor? seqlens_k, Tensor? seqlens_q, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, int window_left, int window_right, "
    "float scale"
)


def _masking(
    seqlens_k,
    seqlens_q,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    window_left,
    window_right,
    scale,
):
    """The custom ops' masking arguments as the launchers' keywords (max_seqlen: varlen only)."""
    varlen = cu_seqlens_q is not None
    kw = dict(
        seqlens_k=seqlens_k,
        seqlens_q=seqlens_q,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q if varlen else None,
        max_seqlen_k=max_seqlen_k if varlen else None,
        causal=causal,
        window_size=(window_left, window_right),
        scale=scale,
    )
    return kw


@torch.library.custom_op(
    "vljepa_fast::attention_fwd_triton",
    mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, {_MASKING}) -> (Tensor, Tensor)",
)
def _tri_fwd(q: Tensor, k: Tensor, v: Tensor, *masking) -> tuple[Tensor, Tensor]:
    from vljepa_fast._kernels import attention as kernel

    return kernel.attention_forward(q, k, v, **_masking(*masking))


def fwd_fake(q, k, v, seqlens_k, seqlens_q, cu_seqlens_q, *rest) -> tuple[Tensor, Tensor]:
    """The fake function of every forward custom op with the ``_MASKING`` schema (triton,
    cuda): out like q, the fp32 LSE [B, Hq, T] (varlen [Hq, total_q])."""
    if cu_seqlens_q is not None:
        lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    else:
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


_tri_fwd.register_fake(fwd_fake)


@torch.library.custom_op(
    "vljepa_fast::attention_bwd_triton",
    mutates_args=(),
    schema=(
        f"(Tensor do, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_MASKING}) -> "
        "(Tensor, Tensor, Tensor)"
    ),
)
def _tri_bwd(do: Tensor, *tensors_and_masking) -> tuple[Tensor, Tensor, Tensor]:
    from vljepa_fast._kernels import attention as kernel

    tensors, masking = tensors_and_masking[:5], tensors_and_masking[5:]
    # the deterministic (no atomics, bit-identical) path only when asked for: the fast path
    # accumulates dQ by fp32 atomics across key blocks
    det = torch.are_deterministic_algorithms_enabled()
    return kernel.attention_backward(do, *tensors, **_masking(*masking), deterministic=det)


def bwd_fake(do, q, k, v, *rest) -> tuple[Tensor, Tensor, Tensor]:
    """The fake function of every backward custom op (triton, cuda): dq, dk, dv like q, k, v."""
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def fwd_setup(ctx, inputs, output) -> None:
    """setup_context of every forward custom op: saves q, k, v, out and the LSE; the masking
    arguments stay on ctx.rest."""
    q, k, v, *rest = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.rest = rest


_tri_bwd.register_fake(bwd_fake)


def _tri_backward(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _tri_bwd(d_out.contiguous(), q, k, v, out, lse, *ctx.rest)
    return (dq, dk, dv) + (None,) * len(ctx.rest)


_tri_fwd.register_autograd(_tri_backward, setup_context=fwd_setup)


def _key_counts(mask: Tensor) -> KeyCounts:
    """:class:`KeyCounts` of a [B, S] bool mask: one host read (a device sync on GPU)."""
    lengths = mask.sum(dim=1, dtype=torch.int32)
    right = mask == (torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None])
    host = torch.cat([lengths, right.all().to(torch.int32)[None]]).tolist()
    return KeyCounts(lengths, tuple(host[:-1]), bool(host[-1]))


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _triton(x: AttentionInputs, lengths: Tensor | None) -> Tensor:
    """``lengths``: the plan, int32 [B] key counts of the right-padded mask (None: no mask).
    With ``mask_queries`` they are the query counts too (seqlens_q: the kernels skip the padded
    query blocks and write zeros there, with no gradient)."""
    seqlens_q = lengths if x.mask_queries else None
    out, _ = _tri_fwd(
        x.q, x.k, x.v, lengths, seqlens_q, None, None, 0, 0, x.causal, *x.window_size,
        _scale(x.q, x.scale),
    )  # fmt: skip
    return out


def _triton_varlen(x: VarlenInputs, plan: None) -> Tensor:
    out, _ = _tri_fwd(
        x.q,
        x.k,
        x.v,
        None,
        None,
        x.cu_seqlens_q,
        x.cu_seqlens_k,
        x.max_seqlen_q,
        x.max_seqlen_k,
        x.causal,
        *x.window_size,
        _scale(x.q, x.scale),
    )
    return out


def _triton_reasons(q: Tensor) -> list[str]:
    from vljepa_fast._kernels.attention import HEAD_DIMS

    why = _common.dtype_in("q", q)
    if q.shape[-1] not in HEAD_DIMS:
        why.append(f"head dim {q.shape[-1]} not in {HEAD_DIMS}")
    elif q.dtype == torch.float32 and q.shape[-1] > 128:
        why.append("float32 at head dim > 128 (its backward spills registers; use bf16/fp16)")
    return why


def _triton_supports(x: AttentionInputs) -> Tensor | None | _backends.Refusal:
    """The plan: the key lengths of a right-padded key_padding_mask (None without a mask), read
    here once per call (one host sync on GPU) and handed to :func:`_triton`."""
    why = _triton_reasons(x.q)
    lengths = None
    if x.key_padding_mask is not None:
        if torch.compiler.is_compiling():
            why.append(
                "a key_padding_mask under torch.compile (its right padding cannot be checked)"
            )
        elif not why:  # read the mask only when nothing else refuses
            counts = x.key_counts()
            lengths = counts.lengths if counts.right else None
            if lengths is None:
                why.append("key_padding_mask is not right padding (True... then False... per row)")
    return _backends.plan_or_refusal(why, lengths)


def _triton_varlen_supports(x: VarlenInputs) -> None | _backends.Refusal:
    return _backends.plan_or_refusal(_triton_reasons(x.q))


def _reference(x: AttentionInputs, plan: None) -> Tensor:
    return reference.attention(
        x.q,
        x.k,
        x.v,
        key_padding_mask=x.key_padding_mask,
        causal=x.causal,
        window_size=x.window_size,
        scale=x.scale,
        mask_queries=x.mask_queries,
    )


def _reference_varlen(x: VarlenInputs, plan: None) -> Tensor:
    return reference.attention_varlen(
        x.q,
        x.k,
        x.v,
        x.cu_seqlens_q,
        x.cu_seqlens_k,
        x.max_seqlen_q,
        x.max_seqlen_k,
        causal=x.causal,
        window_size=x.window_size,
        scale=x.scale,
    )


for _op, _tri, _tri_sup, _sd, _ref in (
    ("attention", _triton, _triton_supports, _sdpa, _reference),
    ("attention_varlen", _triton_varlen, _triton_varlen_supports, _sdpa_varlen, _reference_varlen),
):
    _common.triton_record(_op, _tri, _tri_sup, priority=20)
    _backends.register(
        _backends.Backend("sdpa", _op, _sd, available=list, supports=_sdpa_supports, priority=40)
    )
    _common.reference_record(_op, _ref)
