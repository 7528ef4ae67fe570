"""Run transformers models on vljepa_fast attention: ``attn_implementation="vljepa_fast"``.

Importing this module registers the name "vljepa_fast" through transformers' own extension
points, ``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask
builder); no transformers module global is patched, and nothing changes for models that do not ask
for the name. Then::

    import vljepa_fast.integrations.transformers as vft
    model = AutoModel.from_pretrained(path, attn_implementation="vljepa_fast")
    # or switch an existing model, and back:
    with vft.use_vljepa_fast(model):
        model(**batch)

Masks. transformers builds a dense [B, 1, T, S] mask for "sdpa" and "eager", which keeps SDPA
off its fused paths. For the two plain patterns, a causal mask (kv <= q, bottom-right aligned as
with a KV cache) and a bidirectional one, each intersected with the 2-D padding mask, the
"vljepa_fast" mask builder returns only the [B, S] key padding mask (None without padding),
as transformers does for flash-attention, and the attention function takes causality from the
layer (``is_causal``), so vf.attention gets ``key_padding_mask`` and ``causal`` and no dense mask
exists. Other patterns (sliding windows, packed sequences, overlays, static caches) get the
dense boolean mask, and a 4-D mask (built so, or passed by the user) is converted back to key
padding (+ causal) when it is one. Sliding-window layers (``sliding_window=w`` from the layer)
run on vf.attention's ``window_size`` when their 4-D mask is exactly key padding & a
bottom-right aligned band of one of the windows transformers' masks give w: (w - 1, 0) for
causal models (q - w < kv <= q), (w - 1, w - 1) for Gemma-3 bidirectional (|q - kv| < w) and
(w, w) for ``sliding_window_bidirectional_overlay`` (|q - kv| <= w); the check compares every
allowed pair (one host sync). What vf.attention cannot express runs on a transformers
function instead, with a warning once per reason: a mask that is not key padding (+ causal),
a sliding_window whose mask is not such a band (or that comes without a 4-D mask), attention
dropout in training, ``position_bias`` on transformers' SDPA function; ``softcap`` and sinks
(``s_aux``), which that SDPA function refuses or ignores, on the model's own
``eager_attention_forward``. Every fallback gets the mask its function expects, the
one transformers' own mask builder would have made for it: SDPA a 4-D [B, 1, T, S] bool mask
(or None where its ``is_causal`` path is exact), eager a 4-D additive float mask in the query
dtype (or None where nothing is masked), causality included.

Switching. :func:`use_vljepa_fast` switches one model instance: the model gets private copies of
its configs for the duration of the switch, so another model built from the same config object
keeps its implementation; ``undo`` puts the original configs back.

Backends. ``use_vljepa_fast(model, backend=...)`` takes the ops' vocabulary
(:data:`vljepa_fast._backends.BackendSpec`): "auto" (the default; ``VLJEPA_FAST_BACKEND`` and
``VLJEPA_FAST_BACKEND_ATTENTION`` apply), a backend name, or a per-op mapping such as
``{"attention": "sdpa"}``, checked at the call (ValueError naming ``backend``) and passed
unchanged to every vf.attention call of the model's layers while switched (a name attention does
not have is refused at the call too). A model loaded with
``attn_implementation="vljepa_fast"`` runs "auto" until switched with a backend. The fallbacks
above run transformers' functions whatever the backend.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from vljepa_fast import _backends, functional
from vljepa_fast._backends import BackendSpec

__all__ = [
    "BACKEND_ATTRIBUTE",
    "NAME",
    "VLJEPAFastSwitch",
    "attention_forward",
    "mask",
    "register",
    "use_vljepa_fast",
]

NAME = "vljepa_fast"
#: the module attribute :func:`use_vljepa_fast` sets to the model's backend spec
BACKEND_ATTRIBUTE = "vljepa_fast_backend"
_MISSING = object()

# keyword arguments of the attention interface that vf.attention has no equivalent for: those
# transformers' SDPA function serves, and those only the model's eager function does (SDPA
# raises on softcap and ignores s_aux)
_SDPA_KWARGS = ("position_bias", "sliding_window")
_EAGER_KWARGS = ("softcap", "s_aux")
_warned: set[str] = set()


def _causal_pairs(T: int, S: int, device: torch.device) -> Tensor:
    """[T, S] bool, bottom-right aligned causal mask (vf.attention's ``causal``)."""
    return torch.arange(S, device=device)[None, :] <= torch.arange(T, device=device)[:, None] + (
        S - T
    )


def _allowed(mask: Tensor | None, query: Tensor, key: Tensor, causal: bool) -> Tensor | None:
    """[B or 1, 1, T, S] bool of allowed pairs from a [B, S] key padding mask or None (None:
    every pair allowed)."""
    B, T, S = query.shape[0], query.shape[2], key.shape[2]
    allowed = None if mask is None else mask.bool()[:, None, None, :].expand(B, 1, T, S)
    if causal and T > 1:
        tri = _causal_pairs(T, S, query.device)[None, None]
        allowed = tri if allowed is None else allowed & tri
    return allowed


def _sdpa_mask(mask: Tensor | None, query: Tensor, key: Tensor, causal: bool) -> Tensor | None:
    """What transformers' SDPA function expects: a 4-D mask as given, a [B, S] key padding mask
    as the [B, 1, T, S] bool mask (causal included), None where its own is_causal is exact."""
    if mask is not None and mask.dim() == 4:
        return mask
    T, S = query.shape[2], key.shape[2]
    if mask is None and (not causal or T == 1 or T == S):
        # is_causal (top-left aligned) equals bottom-right alignment when T == S; T == 1 sees
        # every key either way
        return None
    return _allowed(mask, query, key, causal)


def _eager_mask(mask: Tensor | None, query: Tensor, key: Tensor, causal: bool) -> Tensor | None:
    """What a model's eager_attention_forward expects: an additive float mask (0 allowed, the
    dtype's lowest value masked) that carries causality too, or None when nothing is masked."""
    if mask is not None and mask.dim() == 4:
        allowed = mask
        if mask.dtype != torch.bool:
            return mask
    else:
        allowed = _allowed(mask, query, key, causal)
        if allowed is None:
            return None
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(allowed, zero, torch.finfo(query.dtype).min)


def _eager_function(module: torch.nn.Module) -> Callable[..., Any]:
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"module: {type(module).__name__} needs its eager attention (softcap or sinks), but "
            f"{type(module).__module__} defines no eager_attention_forward"
        )
    return fn


def _fallback(
    reason: str,
    target: str,
    args: tuple[Any, ...],
    attention_mask: Tensor | None,
    causal: bool,
    kwargs: dict[str, Any],
) -> tuple[Tensor, Any]:
    """Run ``target`` ("sdpa" or "eager") with the mask it expects, warning once per reason."""
    if reason not in _warned:
        _warned.add(reason)
        name = "SDPA" if target == "sdpa" else "the model's eager"
        warnings.warn(
            f"vljepa_fast attention: {reason}; running {name} attention for it (warned once)",
            RuntimeWarning, stacklevel=3,
        )
    module, query, key, value = args
    if target == "sdpa":
        mask = _sdpa_mask(attention_mask, query, key, causal)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    mask = _eager_mask(attention_mask, query, key, causal)
    return _eager_function(module)(module, query, key, value, mask, **kwargs)


def _is_plain(mask_function: Callable, q_length: int, kv_length: int, q_offset: Any,
              kv_offset: Any) -> bool:
    """Whether the mask is key padding (+ causal aligned as vf.attention's causal flag)."""
    if mask_function is bidirectional_mask_function:
        return True
    if mask_function is not causal_mask_function:
        return False
    # kv_idx <= q_idx over absolute positions equals vf's j <= i + S - T on local indices
    # exactly when the query block ends where the keys end (prefill, or a dynamic cache).
    if not isinstance(q_offset, int) or not isinstance(kv_offset, int):
        return False
    return q_offset - kv_offset == kv_length - q_length


def mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """The "vljepa_fast" entry of transformers' AttentionMaskInterface (same arguments).

    Returns:
        [B, kv_length] bool key padding (True = real) or None for the plain causal and
        bidirectional patterns; otherwise the dense [B, 1, q_length, kv_length] bool mask of
        transformers' SDPA builder.
    """
    if _is_plain(mask_function, q_length, kv_length, q_offset, kv_offset):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None
        padding = padding[:, kv_offset : kv_offset + kv_length].bool()
        if not torch.compiler.is_compiling() and bool(padding.all()):
            return None  # no padding: the unmasked kernels
        return padding
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(
        batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs,
    )


def _allowed_pairs(m: Tensor, T: int, S: int) -> Tensor | None:
    """[B, T, S] bool of the pairs a 4-D [B, 1, T, S] mask allows (bool, or additive with only
    0 and "minus infinity"), None for any other mask (per-head, a bias)."""
    if m.shape[1] != 1 or m.shape[-2:] != (T, S):
        return None
    if m.dtype != torch.bool:
        lowest = torch.finfo(m.dtype).min
        allowed = m == 0
        # an additive mask holds only 0 and "minus infinity"; anything else is a bias
        if not bool((allowed | (m <= lowest / 2)).all()):
            return None
        m = allowed
    return m[:, 0]


def _from_dense(m: Tensor, T: int, S: int) -> tuple[Tensor, bool] | None:
    """(key_padding_mask [B, S], causal) equal to a 4-D mask, or None when it is neither."""
    m = _allowed_pairs(m, T, S)
    if m is None:
        return None
    keys = m.any(dim=1)  # a key is real when some query sees it
    if bool((m == keys[:, None, :]).all()):
        return keys, False
    o_s = torch.arange(S, device=m.device)
    tri = o_s[None, :] <= torch.arange(T, device=m.device)[:, None] + (S - T)
    if bool((m == (keys[:, None, :] & tri)).all()):
        return keys, True
    return None


def _window_candidates(sliding_window: int) -> tuple[tuple[int, int], ...]:
    """The (left, right) windows transformers' masks give a ``sliding_window`` of w: causal
    models (``sliding_window_overlay``: q - w < kv <= q), Gemma-3 bidirectional
    (|q - kv| < w) and ``sliding_window_bidirectional_overlay`` (|q - kv| <= w)."""
    w = sliding_window
    return ((w - 1, 0), (w - 1, w - 1), (w, w))


def _from_dense_window(
    m: Tensor, T: int, S: int, sliding_window: int
) -> tuple[Tensor, tuple[int, int]] | None:
    """(key_padding_mask [B, S], window_size) whose allowed pairs (vf.attention's rule,
    bottom-right aligned) equal those of the 4-D mask ``m`` exactly, for one of the windows a
    ``sliding_window`` gives (:func:`_window_candidates`); None when none does."""
    m = _allowed_pairs(m, T, S)
    if m is None:
        return None
    keys = m.any(dim=1)  # a real key no query sees is padding to every query alike
    diag = torch.arange(T, device=m.device)[:, None] + (S - T)
    j = torch.arange(S, device=m.device)[None, :]
    for left, right in _window_candidates(sliding_window):
        band = (j >= diag - left) & (j <= diag + right)
        if bool((m == (keys[:, None, :] & band)).all()):
            return keys, (left, right)
    return None


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The "vljepa_fast" entry of transformers' AttentionInterface.

    Args:
        module: the calling attention layer (its ``is_causal`` decides causality unless the
            ``is_causal`` argument is given; its ``vljepa_fast_backend`` attribute, set by
            :func:`use_vljepa_fast`, is the backend spec of vf.attention, "auto" when unset).
        query: [B, Hq, T, D] (transformers' layout).
        key: [B, Hkv, S, D].
        value: [B, Hkv, S, D].
        attention_mask: what :func:`mask` built ([B, S] bool or None), or any 4-D mask.
        dropout: attention dropout probability (served by a fallback when > 0).
        scaling: multiplier of q.k (None: 1/sqrt(D)).
        is_causal: overrides ``module.is_causal``.
        **kwargs: the interface's other arguments; ``sliding_window`` (an int w) runs as
            vf.attention's window_size when the 4-D mask is exactly that window (see the module
            docstring); those vf.attention has no equivalent for go to a fallback when set.

    Returns:
        ([B, T, Hq, D] output, None): attention weights are never materialised (a fallback
        returns what its function returns).

    Raises:
        ValueError: a 2-D ``attention_mask`` that is not [B, S].
    """
    args = (module, query, key, value)
    kw = dict(dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    B, T, S = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(
                f"attention_mask: a 2-D mask must be key padding [B, S] = {(B, S)}, got "
                f"{tuple(attention_mask.shape)}"
            )
    elif attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask: expected [B, S] or [B, 1, T, S], got {tuple(attention_mask.shape)}"
        )
    eager = [k for k in _EAGER_KWARGS if kwargs.get(k) is not None]
    if eager:
        reason = f"{', '.join(eager)} is not supported"
        return _fallback(reason, "eager", args, attention_mask, causal, kw)
    extra = [k for k in _SDPA_KWARGS if k != "sliding_window" and kwargs.get(k) is not None]
    if extra:
        reason = f"{', '.join(extra)} is not supported"
        return _fallback(reason, "sdpa", args, attention_mask, causal, kw)
    if dropout > 0.0:
        reason = "attention dropout is not supported (use model.eval())"
        return _fallback(reason, "sdpa", args, attention_mask, causal, kw)
    window_size = (-1, -1)
    sliding = kwargs.get("sliding_window")
    key_padding_mask = attention_mask
    if sliding is not None:
        # the layer's mask says which window it means (causal or one of the bidirectional
        # ones); served when it is exactly key padding & a bottom-right aligned band
        converted = None
        if attention_mask is not None and attention_mask.dim() == 4:
            converted = _from_dense_window(attention_mask, T, S, int(sliding))
        if converted is None:
            reason = "sliding_window with a mask that is not key padding & a sliding window"
            return _fallback(reason, "sdpa", args, attention_mask, causal, kw)
        key_padding_mask, window_size = converted
        causal = False  # the window carries it (right bound 0)
    elif attention_mask is not None and attention_mask.dim() == 2:
        key_padding_mask = attention_mask.bool()
    elif attention_mask is not None:
        converted = _from_dense(attention_mask, T, S)
        if converted is None:
            reason = "a mask that is not key padding (+ causal)"
            return _fallback(reason, "sdpa", args, attention_mask, causal, kw)
        key_padding_mask, causal = converted
    out = functional.attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        key_padding_mask=key_padding_mask, causal=bool(causal), window_size=window_size,
        scale=scaling, backend=getattr(module, BACKEND_ATTRIBUTE, "auto"),
    )
    return out, None


def register() -> None:
    """Register "vljepa_fast" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask)


def _configs(model: PreTrainedModel) -> list[Any]:
    """Every config whose attention implementation a switch can change."""
    seen: dict[int, Any] = {}
    todo = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while todo:
        config = todo.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        todo.extend(
            sub for name in getattr(config, "sub_configs", {})
            if (sub := getattr(config, name, None)) is not None
        )
    return list(seen.values())


def _private_configs(model: PreTrainedModel) -> list[tuple[Any, str, Any]]:
    """Rebind every module attribute of ``model`` that holds one of its configs to a private
    deep copy (one copy per config: sharing inside the model is kept), so that switching the
    copies changes no other model built from the same config objects.

    Returns:
        (module, attribute, original config) for every rebinding, to put back.
    """
    configs = _configs(model)
    memo: dict[int, Any] = {}
    copies = {id(c): copy.deepcopy(c, memo) for c in configs}
    rebound = []
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if id(value) in copies:
                object.__setattr__(module, name, copies[id(value)])
                rebound.append((module, name, value))
    return rebound


class VLJEPAFastSwitch:
    """What :func:`use_vljepa_fast` returns: undoes the switch (``undo()`` or a ``with`` block)."""

    def __init__(
        self,
        model: PreTrainedModel,
        rebound: list[tuple[Any, str, Any]],
        backends: list[tuple[torch.nn.Module, Any]] = (),
    ) -> None:
        self.model = model
        self._rebound = rebound
        self._backends = list(backends)

    def undo(self) -> None:
        """Give the model back its original configs, with the implementations they had before
        the switch, and its modules the backends they had (idempotent). Changes made to
        ``model.config`` during the switch are lost."""
        for module, name, original in self._rebound:
            object.__setattr__(module, name, original)
        for module, previous in self._backends:
            if previous is _MISSING:
                module.__dict__.pop(BACKEND_ATTRIBUTE, None)
            else:
                module.__dict__[BACKEND_ATTRIBUTE] = previous
        self._rebound, self._backends = [], []

    def __enter__(self) -> PreTrainedModel:
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.undo()


def _set_backend(model: PreTrainedModel, spec: BackendSpec) -> list[tuple[torch.nn.Module, Any]]:
    """Give every module of ``model`` the backend spec; returns (module, previous value)."""
    previous = []
    for module in model.modules():
        previous.append((module, module.__dict__.get(BACKEND_ATTRIBUTE, _MISSING)))
        module.__dict__[BACKEND_ATTRIBUTE] = spec
    return previous


def use_vljepa_fast(model: PreTrainedModel, backend: BackendSpec = "auto") -> VLJEPAFastSwitch:
    """Switch an existing model (this instance only) to "vljepa_fast" attention.

    The model runs on private copies of its configs while switched: other models sharing a
    config object with it keep their implementation.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface`` (Llama, BERT and most current architectures).
        backend: the :data:`~vljepa_fast._backends.BackendSpec` of every vf.attention call
            while switched ("auto", a backend name, or {op name: name}); see the module doc.

    Returns:
        a :class:`VLJEPAFastSwitch`: call ``undo()`` or use it as a context manager to restore
        the configs (and so the implementations) the model had, per sub-model.

    Raises:
        ValueError: the model cannot switch its attention implementation at run time, or
            ``backend`` is not a backend spec.
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model: expected a transformers PreTrainedModel, got "
                         f"{type(model).__name__}")
    spec = _backends.check_spec(backend, ops=("attention",))
    register()
    switch = VLJEPAFastSwitch(model, _private_configs(model), _set_backend(model, spec))
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        switch.undo()
        raise ValueError(
            f"model: {type(model).__name__} does not route its attention through "
            "transformers' AttentionInterface, so its implementation cannot be switched"
        )
    return switch


register()
