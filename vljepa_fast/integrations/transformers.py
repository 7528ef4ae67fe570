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
padding (+ causal) when it is one. What vf.attention cannot express, a mask that is not key
padding (+ causal), attention dropout in training, ``position_bias``, ``softcap``, sinks, runs
on transformers' SDPA function instead, with a warning once per reason.
"""

from __future__ import annotations

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

from vljepa_fast import functional

__all__ = ["NAME", "VLJEPAFastSwitch", "attention_forward", "mask", "register", "use_vljepa_fast"]

NAME = "vljepa_fast"

# keyword arguments of the attention interface that vf.attention has no equivalent for
_UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sliding_window")
_warned: set[str] = set()


def _fallback(reason: str, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"vljepa_fast attention: {reason}; running transformers' SDPA attention for it "
            "(warned once)", RuntimeWarning, stacklevel=3,
        )
    return sdpa_attention_forward(*args, **kwargs)


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


def _from_dense(m: Tensor, T: int, S: int) -> tuple[Tensor, bool] | None:
    """(key_padding_mask [B, S], causal) equal to a 4-D mask, or None when it is neither."""
    if m.shape[1] != 1 or m.shape[-2:] != (T, S):
        return None
    if m.dtype != torch.bool:
        lowest = torch.finfo(m.dtype).min
        allowed = m == 0
        # an additive mask holds only 0 and "minus infinity"; anything else is a bias
        if not bool((allowed | (m <= lowest / 2)).all()):
            return None
        m = allowed
    m = m[:, 0]  # [B, T, S]
    keys = m.any(dim=1)  # a key is real when some query sees it
    if bool((m == keys[:, None, :]).all()):
        return keys, False
    o_s = torch.arange(S, device=m.device)
    tri = o_s[None, :] <= torch.arange(T, device=m.device)[:, None] + (S - T)
    if bool((m == (keys[:, None, :] & tri)).all()):
        return keys, True
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
            ``is_causal`` argument is given).
        query: [B, Hq, T, D] (transformers' layout).
        key: [B, Hkv, S, D].
        value: [B, Hkv, S, D].
        attention_mask: what :func:`mask` built ([B, S] bool or None), or any 4-D mask.
        dropout: attention dropout probability (served by the SDPA fallback when > 0).
        scaling: multiplier of q.k (None: 1/sqrt(D)).
        is_causal: overrides ``module.is_causal``.
        **kwargs: the interface's other arguments; those vf.attention has no equivalent for
            go to the SDPA fallback when set.

    Returns:
        ([B, T, Hq, D] output, None): attention weights are never materialised.
    """
    args = (module, query, key, value, attention_mask)
    kw = dict(dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    extra = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if extra:
        return _fallback(f"{', '.join(extra)} is not supported", *args, **kw)
    if dropout > 0.0:
        return _fallback("attention dropout is not supported (use model.eval())", *args, **kw)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    T, S = query.shape[2], key.shape[2]
    key_padding_mask = attention_mask
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.shape[1] != S:
            return _fallback("a 2-D mask not covering the keys", *args, **kw)
        key_padding_mask = attention_mask.bool()
    elif attention_mask is not None:
        converted = _from_dense(attention_mask, T, S)
        if converted is None:
            return _fallback("a mask that is not key padding (+ causal)", *args, **kw)
        key_padding_mask, causal = converted
    out = functional.attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        key_padding_mask=key_padding_mask, causal=bool(causal), scale=scaling,
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


class VLJEPAFastSwitch:
    """What :func:`use_vljepa_fast` returns: undoes the switch (``undo()`` or a ``with`` block)."""

    def __init__(self, model: PreTrainedModel, previous: list[tuple[Any, Any]]) -> None:
        self.model = model
        self._previous = previous

    def undo(self) -> None:
        """Give every config back the implementation it had before the switch (idempotent)."""
        for config, impl in self._previous:
            config._attn_implementation = impl
        self._previous = []

    def __enter__(self) -> PreTrainedModel:
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.undo()


def use_vljepa_fast(model: PreTrainedModel) -> VLJEPAFastSwitch:
    """Switch an existing model (this instance only) to "vljepa_fast" attention.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface`` (Llama, BERT and most current architectures).

    Returns:
        a :class:`VLJEPAFastSwitch`: call ``undo()`` or use it as a context manager to restore
        the implementations the model had (per sub-model).

    Raises:
        ValueError: the model cannot switch its attention implementation at run time.
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model: expected a transformers PreTrainedModel, got "
                         f"{type(model).__name__}")
    register()
    previous = [(c, c._attn_implementation) for c in _configs(model)]
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        VLJEPAFastSwitch(model, previous).undo()
        raise ValueError(
            f"model: {type(model).__name__} does not route its attention through "
            "transformers' AttentionInterface, so its implementation cannot be switched"
        )
    return VLJEPAFastSwitch(model, previous)


register()
