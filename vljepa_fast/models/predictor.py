"""Predictor: Llama-3.2 decoder layers with the causal mask off, on vf.nn.PredictorAttention.

Sequence = [linear(visual tokens) ; query token embeddings], right-padded queries after the
visual tokens; PAD keys are masked in every layer and the mean pooling skips PAD positions, so
the output of a sample does not depend on how much padding its batch has; PAD queries are
skipped too (``mask_queries``), as nothing they compute reaches a real output. Layer parameter names
are transformers' ``LlamaDecoderLayer``'s; :func:`load_llama_layers` takes Llama-3.2-1B layers
from a transformers state dict key by key or from Meta's original ``consolidated.pth`` (q/k rows
un-interleaved as transformers' conversion script does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vljepa_fast import _backends
from vljepa_fast._backends import BackendSpec
from vljepa_fast.models._layers import (
    LoadResult,
    RMSNorm,
    Source,
    SwiGLU,
    check_tokens,
    gqa_attention,
    load_mapped,
    masked_mean,
    one_layout,
)
from vljepa_fast.models.config import PredictorConfig

__all__ = ["Predictor", "load_llama_layers"]


class LlamaLayer(nn.Module):
    """One pre-norm Llama decoder layer (RMSNorm, GQA attention with RoPE, SwiGLU)."""

    def __init__(self, cfg: PredictorConfig, backend: BackendSpec, causal: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, eps=cfg.rms_eps)
        self.self_attn = gqa_attention(cfg, backend, rope_scaling=cfg.rope_scaling, causal=causal)
        self.post_attention_layernorm = RMSNorm(cfg.dim, eps=cfg.rms_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_dim)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        positions: Tensor | None = None,
        mask_queries: bool = False,
    ) -> Tensor:
        """x [B, L, dim], mask [B, L] bool (True = real); ``mask_queries``: PAD rows are padded
        queries too (their attention rows zero, their work skipped by the fused backends)."""
        a = self.self_attn(self.input_layernorm(x), mask, positions, mask_queries=mask_queries)
        x = x + a
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
        self.norm = RMSNorm(cfg.dim, eps=cfg.rms_eps)
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
        # A PAD position reaches no real output: it is a masked key in every layer, a token is
        # mixed with others only through attention, and the mean pools real positions only
        # (weight 0, gradient 0). So the PAD queries need no attention at all (mask_queries):
        # their rows are zero, the real outputs and all gradients are unchanged, and the fused
        # backends skip them, so a padded batch costs its real tokens.
        for layer in self.layers:
            x = layer(x, mask, mask_queries=True)
        return self.head(masked_mean(self.norm(x), mask))


LLAMA_LAYOUTS = ("transformers", "meta")

#: our layer keys -> Meta's (consolidated.pth) names inside ``layers.{i}.``
_META_LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_META_TOP = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight"}
_HF_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")
_META_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def meta_rope_rows(weight: Tensor, heads: int) -> Tensor:
    """Meta's q or k projection [heads * D, dim] -> transformers' row order.

    Meta's RoPE rotates interleaved channel pairs (2i, 2i + 1) of each head; transformers'
    (and this library's "llama" layout) rotates the halves (i, i + D/2). Row 2i + s of a head
    (s = 0, 1) becomes row s * D/2 + i, which is transformers' ``permute`` in
    convert_llama_weights_to_hf.py: view(heads, D/2, 2, dim).transpose(1, 2).
    """
    rows, dim = weight.shape
    return weight.view(heads, rows // heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _detect_llama(state: Mapping[str, Tensor]) -> str:
    meta = [
        k
        for k in state
        if k == "tok_embeddings.weight"
        or ((m := _META_LAYER_KEY.fullmatch(k)) and m.group(2) in _META_LAYER.values())
    ]
    hf = [
        k
        for k in state
        if k.removeprefix("model.") == "embed_tokens.weight"
        or ((m := _HF_LAYER.fullmatch(k)) and m.group(2).startswith(("self_attn.", "mlp.")))
    ]
    return one_layout(
        "Llama state dict",
        [("meta", "Meta's consolidated layout", meta), ("transformers", "transformers'", hf)],
        "no Llama keys of either layout (transformers: "
        "'model.layers.{i}.self_attn.q_proj.weight', ...; Meta: "
        "'layers.{i}.attention.wq.weight', ...)",
        state,
    )


def load_llama_layers(
    predictor: Predictor,
    state: Mapping[str, Tensor],
    first_layer: int | None = None,
    *,
    layout: str = "auto",
) -> LoadResult:
    """Load layers ``first_layer ..`` (default ``cfg.first_llama_layer``: 8..15), the token
    embeddings and the final norm of a local Llama-3.2-1B checkpoint into the predictor;
    ``visual_proj`` and ``head`` keep their values.

    Layouts (``layout="auto"`` detects which; name one to insist on it):

    * ``"transformers"``: ``LlamaForCausalLM`` or ``LlamaModel`` keys (``model.`` prefix or
      none), copied key by key.
    * ``"meta"``: Meta's original ``consolidated.pth`` (``tok_embeddings``,
      ``layers.{i}.attention.wq / wk / wv / wo``, ``feed_forward.w1 / w2 / w3`` = gate / down /
      up, ``attention_norm``, ``ffn_norm``, ``norm``, ``output``). ``wq`` and ``wk`` rows are
      reordered by :func:`meta_rope_rows` (Meta's RoPE pairs are interleaved), with
      ``cfg.heads`` and ``cfg.kv_heads`` heads; the rest is copied.

    Ignored (listed in the result): the other layers, the LM head (``lm_head`` / ``output``),
    and RoPE tables (``rope.freqs``, ``*.rotary_emb.inv_freq``). Any other key is unexpected.

    Returns:
        :class:`~vljepa_fast.models.LoadResult`: the layout found and the ignored keys.

    Raises:
        ValueError: the layout cannot be told (no Llama keys, or both mixed), an unknown
            ``layout``, or the checkpoint does not fit: keys the predictor needs missing,
            unexpected keys, shapes that differ (each listed by name, in the checkpoint's
            naming). Nothing is loaded then.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"state: expected a mapping of names to tensors, got {type(state)}")
    if layout not in ("auto", *LLAMA_LAYOUTS):
        raise ValueError(f"layout: expected 'auto', 'transformers' or 'meta', got {layout!r}")
    c = predictor.cfg
    first = c.first_llama_layer if first_layer is None else first_layer
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"first_layer: expected an int >= 0, got {first!r}")
    found = _detect_llama(state)
    if layout != "auto" and layout != found:
        raise ValueError(f"Llama state dict: layout {layout!r} requested, the keys are {found!r}")
    own = predictor.state_dict()
    plan: dict[str, Source] = {}
    if found == "transformers":
        pre = "model." if any(k.startswith("model.") for k in state) else ""
        for key, value in own.items():
            if key.startswith("layers."):
                _, i, rest = key.split(".", 2)
                plan[key] = Source((f"{pre}layers.{first + int(i)}.{rest}",), (value.shape,))
            elif key in _META_TOP:
                plan[key] = Source((pre + key,), (value.shape,))
        layer_key, known = _HF_LAYER, set(predictor.layers[0].state_dict())
        top_ignored = {"lm_head.weight"}
    else:
        heads = {"self_attn.q_proj.weight": c.heads, "self_attn.k_proj.weight": c.kv_heads}
        for key, value in own.items():
            if key.startswith("layers."):
                _, i, rest = key.split(".", 2)
                src = f"layers.{first + int(i)}.{_META_LAYER[rest]}"
                if rest in heads:
                    n = heads[rest]
                    plan[key] = Source(
                        (src,), (value.shape,), lambda t, n=n: meta_rope_rows(t[0], n)
                    )
                else:
                    plan[key] = Source((src,), (value.shape,))
            elif key in _META_TOP:
                plan[key] = Source((_META_TOP[key],), (value.shape,))
        layer_key, known = _META_LAYER_KEY, set(_META_LAYER.values())
        top_ignored = {"output.weight"}

    def ignore(key: str) -> bool:
        if key in top_ignored or key == "rope.freqs" or key.endswith(".rotary_emb.inv_freq"):
            return True
        m = layer_key.fullmatch(key)  # another layer of the same model: not taken
        return m is not None and m.group(2) in known

    last = first + c.layers - 1
    ignored = load_mapped(
        predictor, state, plan, f"Llama state dict ({found} layout, layers {first}..{last})",
        ignore=ignore,
    )  # fmt: skip
    return LoadResult(found, ignored)
