"""Parameter counts of a VL-JEPA configuration, per module and part, without allocating weights.

:func:`parameter_breakdown` builds the model on PyTorch's ``meta`` device (shapes only, no
memory, no initialisation), so the paper configuration counts in seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from vljepa_fast.models.config import VLJEPAConfig

__all__ = ["parameter_breakdown"]


def _count(module: nn.Module, seen: set[int]) -> tuple[int, int]:
    total = trainable = 0
    for p in module.parameters():
        if id(p) in seen:  # a tied parameter counts once, where first met
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def parameter_breakdown(config: VLJEPAConfig) -> dict:
    """Parameters that ``VLJEPA(config)`` builds, per module and per part.

    Args:
        config: a :class:`~vljepa_fast.models.VLJEPAConfig` (e.g. ``VLJEPAConfig.paper()``).

    Returns:
        ``{"modules": {name: {"total": int, "trainable": int, "parts": {part: int}}},
        "total": int, "trainable": int}``. ``name`` is each child module of the model in
        construction order (x_encoder, predictor, y_encoder, y_decoder when the model owns
        one, ...), plus ``"logit_scale"`` when the temperature is learnable; ``parts`` are the
        module's own children (e.g. the predictor's ``visual_proj``, ``embed_tokens``,
        ``layers``, ``norm``, ``head``). ``trainable`` counts parameters with
        ``requires_grad`` as built (a frozen X-encoder counts 0). If the model does not own a
        Y-decoder, one built from ``config.y_decoder`` is listed as ``"y_decoder"`` with
        ``"owned": False`` and is left out of the totals. A parameter shared by two modules
        counts once.

    Raises:
        ValueError: ``config`` is not a VLJEPAConfig.
    """
    from vljepa_fast.models.vljepa import VLJEPA
    from vljepa_fast.models.y_decoder import YDecoder

    if not isinstance(config, VLJEPAConfig):
        raise ValueError(f"config: expected a VLJEPAConfig, got {type(config).__name__}")
    with torch.device("meta"):
        model = VLJEPA(config, backend="reference")
    seen: set[int] = set()
    modules: dict[str, dict] = {}
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        parts = {}
        inner: set[int] = set(seen)
        for part, sub in child.named_children():
            n, _ = _count(sub, inner)
            if n:
                parts[part] = n
        total, trainable = _count(child, seen)
        own = total - sum(parts.values())
        if own:  # parameters held by the module itself, outside any child
            parts["(own)"] = own
        modules[name] = {"total": total, "trainable": trainable, "parts": parts}
    for name, p in model.named_parameters(recurse=False):
        if id(p) not in seen:
            seen.add(id(p))
            modules[name] = {
                "total": p.numel(),
                "trainable": p.numel() if p.requires_grad else 0,
                "parts": {},
            }
    result = {
        "modules": modules,
        "total": sum(m["total"] for m in modules.values()),
        "trainable": sum(m["trainable"] for m in modules.values()),
    }
    if "y_decoder" not in modules:
        with torch.device("meta"):
            decoder = YDecoder(config.y_decoder, config.embed_dim, backend="reference")
        parts = {n: sum(p.numel() for p in c.parameters()) for n, c in decoder.named_children()}
        total = sum(p.numel() for p in decoder.parameters())
        modules["y_decoder"] = {
            "total": total,
            "trainable": total,
            "parts": {k: v for k, v in parts.items() if v},
            "owned": False,
        }
    return result
