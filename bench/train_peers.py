"""The peers' recipe of a VL-JEPA training step, built honestly from transformers parts.

What a careful user without this library would write (the baseline of bench/bench_train.py):

* X-encoder: :class:`vljepa_fast.models.XEncoder` with backend "reference" (eager attention and
  rotary), frozen, **recomputed every step** under ``torch.no_grad`` from the video frames (no
  feature cache).
* Predictor (:class:`PeersPredictor`): ``transformers.LlamaDecoderLayer`` x ``layers`` with
  ``attn_implementation="eager"`` and the causal mask replaced by a **dense [B, 1, L, L]
  additive mask** (0 for a real key, ``finfo.min`` for a PAD key), transformers'
  ``LlamaRotaryEmbedding`` and ``LlamaRMSNorm``; around them the same visual projection, token
  embedding, masked mean pooling and head as :class:`vljepa_fast.models.Predictor`, so that our
  Predictor's state dict loads into it key for key (:func:`peers_from_ours`) and the two compute
  the same function (tests/test_bench_train.py checks it).
* Y-encoder (:class:`PeersTextEncoder`): **transformers' ``Gemma3TextModel``** built from the
  preset's :class:`~vljepa_fast.models.YEncoderConfig` (``use_bidirectional_attention=True``,
  eager attention, transformers' own 4-D bidirectional and sliding-window masks), then
  sentence-transformers' mean pooling, the Dense stack, L2 normalisation and the linear head
  to the shared space, as :class:`vljepa_fast.models.TextEncoder` (whose parameter names are
  Gemma3TextModel's, so its state dict loads with a ``backbone.`` prefix). transformers is
  chosen over our TextEncoder on the reference backend because building it is straightforward
  (one config, the library's published model) and it is what a peer would run.
* Loss (:func:`eager_infonce`): normalise, the full N x N logits times CLIP's learnable
  log-scale (clamped as :class:`vljepa_fast.models.VLJEPA` clamps it), cross-entropy both
  ways; under an initialised process group every rank's embeddings are all-gathered with
  ``torch.distributed.nn.functional.all_gather`` (differentiable) and each rank forms the full
  global logits (open_clip's ``gather_with_grad=True, local_loss=False``).
* Optimizer: ``torch.optim.AdamW`` on :func:`param_groups` (the Y-encoder's body at
  ``lr * lr_multiplier``, 0.05 in the paper, everything else trainable at ``lr``), as
  :meth:`vljepa_fast.models.VLJEPA.param_groups`.

Precision: "fp32", or "bf16" = fp32 parameters and optimizer under
``torch.autocast(bfloat16)`` (PyTorch AMP, the peers' usual mixed precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vljepa_fast.models as M
from vljepa_fast.models.config import FULL, SLIDING, PredictorConfig, YEncoderConfig

__all__ = [
    "PRECISIONS",
    "PeersModel",
    "PeersPredictor",
    "PeersStep",
    "PeersTextEncoder",
    "eager_infonce",
    "gemma3_config",
    "llama_config",
    "param_groups",
    "peers_from_ours",
]

PRECISIONS = ("fp32", "bf16")


def _transformers():
    import transformers

    return transformers


def llama_config(cfg: PredictorConfig):
    """transformers.LlamaConfig of the predictor's layers: hidden, heads, kv heads, head_dim,
    mlp, rms eps, RoPE theta (and Llama-3's scaling when the config has one), eager attention."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**dict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
    config = _transformers().LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_eps,
        max_position_embeddings=131072,  # vljepa_fast.nn.PredictorAttention's bound
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=cfg.pad_id,
    )
    config._attn_implementation = "eager"
    return config


def gemma3_config(cfg: YEncoderConfig):
    """transformers.Gemma3TextConfig of the Y-encoder's backbone: bidirectional, eager."""
    scalar = cfg.query_pre_attn_scalar
    if scalar != int(scalar):  # transformers' field is an int
        raise ValueError(f"cfg.query_pre_attn_scalar: transformers takes an int, got {scalar}")
    config = _transformers().Gemma3TextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps,
        query_pre_attn_scalar=int(scalar),
        sliding_window=cfg.sliding_window,
        layer_types=list(cfg.attention_types),
        use_bidirectional_attention=True,
        pad_token_id=cfg.pad_id,
        rope_parameters={
            FULL: {"rope_type": "default", "rope_theta": cfg.rope_theta},
            SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
        },
    )
    config._attn_implementation = "eager"
    return config


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [B, L, D] over mask [B, L] True positions (as the models' pooling)."""
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class PeersPredictor(nn.Module):
    """transformers Llama decoder layers (eager) under a dense [B, 1, L, L] additive PAD mask.

    Parameter names are :class:`vljepa_fast.models.Predictor`'s (``visual_proj``,
    ``embed_tokens``, ``layers.N.*`` = LlamaDecoderLayer's, ``norm``, ``head``).
    """

    def __init__(self, cfg: PredictorConfig, visual_dim: int, embed_dim: int) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        self.cfg, config = cfg, llama_config(cfg)
        self.visual_proj = nn.Linear(visual_dim, cfg.dim)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(cfg.layers))
        self.norm = LlamaRMSNorm(cfg.dim, eps=cfg.rms_eps)
        self.head = nn.Linear(cfg.dim, embed_dim)
        self.rotary_emb = LlamaRotaryEmbedding(config)  # buffers only, not in the state dict

    def forward(self, visual: Tensor, query_ids: Tensor, query_mask: Tensor) -> Tensor:
        """visual [B, N, visual_dim] float, query_ids [B, L] int64, query_mask [B, L] bool
        -> [B, embed_dim] predicted embeddings (in the compute dtype)."""
        B, N, _ = visual.shape
        dtype = self.visual_proj.weight.dtype
        x = torch.cat((self.visual_proj(visual.to(dtype)), self.embed_tokens(query_ids)), dim=1)
        keys = torch.cat((query_mask.new_ones(B, N), query_mask), dim=1)  # [B, L] True = real
        L = keys.shape[1]
        # the dense additive mask transformers' eager path takes: [B, 1, L, L], materialised
        mask = torch.zeros(B, 1, L, L, dtype=x.dtype, device=x.device)
        mask.masked_fill_(~keys[:, None, None, :], torch.finfo(x.dtype).min)
        positions = torch.arange(L, device=x.device)[None].expand(B, -1)
        rotary = self.rotary_emb(x, positions)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return self.head(_masked_mean(self.norm(x), keys))


class PeersTextEncoder(nn.Module):
    """transformers' Gemma3TextModel (bidirectional, eager) + mean pooling, Dense stack, L2
    normalisation and head, as :class:`vljepa_fast.models.TextEncoder` (its keys under
    ``backbone.``, ``dense.N`` and ``head`` as they are)."""

    def __init__(self, cfg: YEncoderConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg, self.lr_multiplier = cfg, cfg.lr_multiplier
        self.backbone = _transformers().Gemma3TextModel(gemma3_config(cfg))
        dims = (cfg.dim, *cfg.dense)
        self.dense = nn.ModuleList(
            nn.Linear(a, b, bias=cfg.dense_bias) for a, b in zip(dims, dims[1:])
        )
        self.head = nn.Linear(cfg.out_dim, embed_dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids [B, L] int64 right-padded, mask [B, L] bool -> [B, embed_dim]."""
        hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        x = _masked_mean(hidden, mask)
        for layer in self.dense:
            x = layer(x)
        if self.cfg.normalize:
            x = F.normalize(x, dim=-1)
        return self.head(x)


def eager_infonce(
    pred: Tensor, target: Tensor, logit_scale: Tensor, max_logit_scale: float, group=None
) -> Tensor:
    """Bidirectional InfoNCE the eager way: the full N x N logits in memory.

    pred, target: [n, D] this rank's rows; under an initialised process group (``group`` or
    the default one) both are all-gathered (differentiable) to the global [N, D] first.
    Returns the float32 scalar mean of cross_entropy(logits) and cross_entropy(logits^T),
    logits = norm(pred) @ norm(target)^T * clamp(exp(logit_scale), max_logit_scale).
    """
    import torch.distributed as dist

    p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.nn.functional import all_gather

        kw = {} if group is None else {"group": group}
        p, t = torch.cat(all_gather(p, **kw)), torch.cat(all_gather(t, **kw))
    scale = logit_scale.exp().clamp(max=max_logit_scale)
    logits = scale * (p @ t.T)
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss.float() if loss.dtype != torch.float64 else loss


class PeersModel(nn.Module):
    """X-encoder (reference, frozen) -> PeersPredictor; PeersTextEncoder; learnable log-scale."""

    def __init__(self, cfg: M.VLJEPAConfig) -> None:
        super().__init__()
        if not cfg.freeze_x_encoder:
            raise ValueError("cfg: the peers' recipe is for a frozen X-encoder (freeze_x_encoder)")
        if not cfg.learnable_temperature:
            raise ValueError("cfg: the peers' recipe uses the learnable log-scale")
        self.config = cfg
        self.x_encoder = M.XEncoder(cfg.x_encoder, "reference").requires_grad_(False).eval()
        self.predictor = PeersPredictor(cfg.predictor, cfg.x_encoder.dim, cfg.embed_dim)
        self.y_encoder = PeersTextEncoder(cfg.y_encoder, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

    def forward(self, video: Tensor, query: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor],
                group=None) -> Tensor:  # fmt: skip
        """video [B, C, T, H, W] float32, query and target (ids [B, L] int64, mask [B, L]
        bool) -> the float32 loss. The X-encoder runs every call, without autograd."""
        with torch.no_grad():
            visual = self.x_encoder(video)
        pred = self.predictor(visual, *query)
        tgt = self.y_encoder(*target).to(pred.dtype)
        return eager_infonce(pred, tgt, self.logit_scale, self.config.max_logit_scale, group)


def param_groups(model: PeersModel, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """The groups of VLJEPA.param_groups: the Y-encoder's body at lr * lr_multiplier, its head
    and every other trainable parameter at lr; frozen parameters left out."""
    y = model.y_encoder
    head = {id(p) for p in y.head.parameters()}
    body = [p for p in y.parameters() if p.requires_grad and id(p) not in head]
    skip = {id(p) for p in body}
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    return [
        {"params": main, "lr": lr, "weight_decay": weight_decay, "name": "main"},
        {"params": body, "lr": lr * y.lr_multiplier, "weight_decay": weight_decay,
         "name": "y_encoder"},
    ]  # fmt: skip


def peers_from_ours(peers: PeersModel, ours: M.VLJEPA) -> PeersModel:
    """Copy ``ours``' weights into ``peers`` (strict: every key on both sides), so the two
    start from the same function. The Y-encoder's backbone keys gain ``backbone.``."""
    state = {}
    for key, value in ours.state_dict().items():
        if key.startswith("y_decoder."):
            continue
        if key.startswith("y_encoder.") and not key.startswith(
            ("y_encoder.dense.", "y_encoder.head.")
        ):
            key = "y_encoder.backbone." + key.removeprefix("y_encoder.")
        state[key] = value
    missing, unexpected = peers.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"ours: the state dicts differ: missing {missing}, unexpected {unexpected}"
        )
    return peers


@dataclass
class PeersStep:
    """One optimizer step of the peers' recipe: zero_grad, forward, backward, AdamW.

    Args:
        model: the PeersModel (on its device, fp32 parameters).
        lr, weight_decay, betas: AdamW's (as our trainer's).
        precision: "fp32", or "bf16" (autocast bfloat16 over fp32 parameters).
        group: the process group of the loss's all-gather (None: the default one if any).
    """

    model: PeersModel
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    precision: str = "fp32"
    group: object = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, self.lr, self.weight_decay), lr=self.lr, betas=self.betas
        )

    def __call__(self, video: Tensor, query: tuple[Tensor, Tensor],
                 target: tuple[Tensor, Tensor]) -> float:  # fmt: skip
        """Run the step on one batch; returns the loss (one host sync, as a trainer logs it)."""
        self.optimizer.zero_grad(set_to_none=True)
        device = video.device.type
        with torch.autocast(device, torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.model(video, query, target, self.group)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
