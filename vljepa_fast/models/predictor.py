"""Predictor: Llama-3.2 decoder layers with the causal mask off, on vf.nn.PredictorAttention.

Sequence = [linear(visual tokens) ; query token embeddings], right-padded queries after the
visual tokens; PAD keys are masked in every layer and the mean pooling skips PAD positions, so
the output of a sample does not depend on how much padding its batch has. Layer parameter names
are transformers' ``LlamaDecoderLayer``'s, which lets :func:`load_llama_layers` map a Llama-3.2-1B
state dict key by key.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vljepa_fast import _backends
from vljepa_fast._backends import BackendSpec
from vljepa_fast.models._layers import (
    SwiGLU,
    check_tokens,
    gqa_attention,
    load_checked,
    masked_mean,
)
from vljepa_fast.models.config import PredictorConfig

__all__ = ["Predictor", "load_llama_layers"]


class LlamaLayer(nn.Module):
    """One pre-norm Llama decoder layer (RMSNorm, GQA attention with RoPE, SwiGLU)."""

    def __init__(self, cfg: PredictorConfig, backend: BackendSpec, causal: bool = False) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.rms_eps)
        self.self_attn = gqa_attention(cfg, backend, rope_scaling=cfg.rope_scaling, causal=causal)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.rms_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_dim)

    def forward(self, x: Tensor, mask: Tensor | None, positions: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Predictor(_backends.HoldsBackend, nn.Module):
    """(visual tokens, query tokens) -> one predicted embedding per sample.

    Args:
        cfg: sizes.
        visual_dim: width of the X-encoder tokens (1024).
        embed_dim: the shared embedding space (1536).
        backend: a :data:`~vljepa_fast._backends.BackendSpec` ("auto", a backend name, or
            {op name: name}) for every op the layers call (attention, rotary); a name one of
            them does not have is refused here (ValueError naming the op).
    """

    def __init__(
        self,
        cfg: PredictorConfig,
        visual_dim: int,
        embed_dim: int,
        backend: BackendSpec = "auto",
    ) -> None:
        super().__init__()
        self.cfg, self.backend = cfg, _backends.check_spec(backend, ops=("attention", "rotary"))
        self.visual_proj = nn.Linear(visual_dim, cfg.dim)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LlamaLayer(cfg, self.backend) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.rms_eps)
        self.head = nn.Linear(cfg.dim, embed_dim)

    def forward(
        self, visual: Tensor, query_ids: Tensor, query_mask: Tensor | None = None
    ) -> Tensor:
        """Predict.

        Args:
            visual: [B, N, visual_dim] X-encoder tokens.
            query_ids: [B, L] int64 query tokens, right-padded, L <= max_query_len.
            query_mask: [B, L] bool, True = a real token; None derives it from ``pad_id``.

        Returns:
            [B, embed_dim] predicted embeddings.
        """
        c = self.cfg
        if (
            not isinstance(visual, Tensor)
            or visual.dim() != 3
            or visual.shape[-1] != self.visual_proj.in_features
        ):
            got = tuple(visual.shape) if isinstance(visual, Tensor) else type(visual).__name__
            raise ValueError(f"visual: expected [B, N, {self.visual_proj.in_features}], got {got}")
        if query_mask is None and isinstance(query_ids, Tensor):
            query_mask = query_ids != c.pad_id
        query_mask = check_tokens("query_ids", query_ids, query_mask, c.vocab_size, c.max_query_len)
        B, N, _ = visual.shape
        if query_ids.shape[0] != B:
            raise ValueError(f"query_ids: batch {query_ids.shape[0]} != visual batch {B}")
        dtype = self.visual_proj.weight.dtype
        x = torch.cat((self.visual_proj(visual.to(dtype)), self.embed_tokens(query_ids)), dim=1)
        mask = torch.cat((query_mask.new_ones(B, N), query_mask.to(visual.device)), dim=1)
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(masked_mean(self.norm(x), mask))


def load_llama_layers(
    predictor: Predictor, state: Mapping[str, Tensor], first_layer: int | None = None
) -> None:
    """Load layers ``first_layer ..`` (default 8..15), the token embeddings and the final norm
    of a local Llama-3.2-1B state dict (transformers' ``LlamaForCausalLM`` or ``LlamaModel``
    keys) into the predictor; ``visual_proj`` and ``head`` keep their values.

    Raises:
        ValueError: Llama keys the predictor needs are missing, or shapes differ (listed by
            name, in the checkpoint's naming).
    """
    first = predictor.cfg.first_llama_layer if first_layer is None else first_layer
    state = {k.removeprefix("model."): v for k, v in state.items()}
    wanted = {}
    for key in predictor.state_dict():
        if key.startswith("layers."):
            i, rest = key.split(".", 2)[1:]
            wanted[key] = f"layers.{first + int(i)}.{rest}"
        elif key.startswith(("embed_tokens.", "norm.")):
            wanted[key] = key
    missing = sorted(f"model.{src}" for src in wanted.values() if src not in state)
    own = predictor.state_dict()
    mismatched = sorted(
        f"model.{src}: checkpoint {tuple(state[src].shape)} vs predictor {tuple(own[dst].shape)}"
        for dst, src in wanted.items()
        if src in state and state[src].shape != own[dst].shape
    )
    if missing or mismatched:
        parts = [f"missing keys: {', '.join(missing)}"] if missing else []
        if mismatched:
            parts.append(f"shape mismatches: {', '.join(mismatched)}")
        raise ValueError(
            "Llama state dict (layers "
            f"{first}..{first + predictor.cfg.layers - 1}): " + "; ".join(parts)
        )
    full = dict(own)
    full.update({dst: state[src] for dst, src in wanted.items()})
    load_checked(predictor, full, "predictor")
