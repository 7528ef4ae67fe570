"""Building blocks shared by the model's modules."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vljepa_fast._backends import BackendSpec
from vljepa_fast.nn import PredictorAttention


def gqa_attention(cfg, backend: BackendSpec, **kwargs) -> PredictorAttention:
    """The :class:`~vljepa_fast.nn.PredictorAttention` sized by a config with ``dim``,
    ``heads``, ``kv_heads``, ``head_dim`` and ``rope_theta`` (predictor, Y-encoder);
    ``kwargs`` (rope_scaling, causal, max_position_embeddings) go to the module."""
    return PredictorAttention(
        cfg.dim,
        cfg.heads,
        cfg.kv_heads,
        cfg.head_dim,
        rope_theta=cfg.rope_theta,
        backend=backend,
        **kwargs,
    )


class PreNormBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x), ...)``, then ``+ mlp(norm2(x))``.

    Submodules are named ``norm1``, ``attn``, ``norm2``, ``mlp`` (V-JEPA 2's block names),
    registered in that order; the norms are ``norm(dim, eps=eps)`` (LayerNorm, RMSNorm).
    Subclasses call the attention in ``forward`` (their arguments differ) and finish with
    :meth:`residual`.
    """

    def __init__(
        self, norm: Callable[..., nn.Module], dim: int, eps: float, attn: nn.Module, mlp: nn.Module
    ) -> None:
        super().__init__()
        self.norm1 = norm(dim, eps=eps)
        self.attn = attn
        self.norm2 = norm(dim, eps=eps)
        self.mlp = mlp

    def residual(self, x: Tensor, attn_out: Tensor) -> Tensor:
        """[B, L, dim] input and attention output -> the block's output."""
        x = x + attn_out
        return x + self.mlp(self.norm2(x))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), no biases (names as transformers' LlamaMLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of x [B, L, D] over the positions where mask [B, L] is True (all when None)."""
    if mask is None:
        return x.mean(dim=1)
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def check_tokens(name: str, ids: Tensor, mask: Tensor | None, vocab: int, max_len: int) -> Tensor:
    """Validate right-padded token ids [B, L] and their mask; return the mask (all True if None)."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name}: expected integer token ids [B, L], got {got}")
    B, L = ids.shape
    if B == 0 or L == 0:
        raise ValueError(f"{name}: expected a non-empty [B, L] batch, got {(B, L)}")
    if L > max_len:
        raise ValueError(f"{name}: {L} tokens, longer than the maximum ({max_len})")
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(
            f"{name}: token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask)
        raise ValueError(f"{name} mask: expected bool [B, L] = {(B, L)}, got {got}")
    if not mask.any(dim=1).all():
        raise ValueError(f"{name} mask: every row needs at least one real token")
    return mask


def load_checked(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """load_state_dict(strict) with an error that lists missing, unexpected and mismatched keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = ", ".join(items[:20]) + (
                    f", ... ({len(items)} in all)" if len(items) > 20 else ""
                )
                parts.append(f"{label}: {shown}")
        raise ValueError(f"{what}: state dict does not match the model; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
