"""Building blocks shared by the model's modules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

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


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same parameters, value and dtype rule: 16-bit inputs computed in
    float32, the output in the input's dtype) that keeps only its input and the [..., 1]
    reciprocal RMS for the backward: autograd's composite keeps the normalised input too, one
    more [tokens, dim] tensor per norm (the output is kept anyway by the projections it
    feeds)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        needs = x.requires_grad or (w is not None and w.requires_grad)
        if w is None or not torch.is_grad_enabled() or not needs or self.eps is None:
            return super().forward(x)
        if tuple(self.normalized_shape) != (x.shape[-1],):
            return super().forward(x)  # norms over several dims: the composite's path
        return _RMSNormFn.apply(x, w, self.eps)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch computes a norm of ``dtype`` in: float32 for 16-bit floats."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last dim, in float32 for 16-bit inputs;
    keeps x and rstd."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:
        xf = x.to(_opmath(x.dtype))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, w)
        return (xf * rstd * w.to(xf.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, rstd, w = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        dyf = dy.to(rstd.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g = dyf * w.to(rstd.dtype)
            dx = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dyf * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(w.dtype)
        return dx, dw, None


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), no biases, transformers' names (``gate_proj``, ``up_proj``,
    ``down_proj``); subclasses fix ``act``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def act(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return _GatedDown.apply(g, u, self.down_proj.weight, self.act)
        return self.down_proj(self.act(g) * u)


class _GatedDown(torch.autograd.Function):
    """``linear(act(g) * u, w)`` that keeps only g and u for the backward.

    Autograd would keep four [tokens, hidden] tensors per layer (g for act's gradient, act(g)
    and u for the product's, the product for the projection's weight gradient); this keeps two
    and recomputes act(g) and the product in the backward (elementwise, O(tokens x hidden):
    cheap beside the three GEMMs it feeds). The forward is the same arithmetic as the eager
    expression; the GEMMs are the vendor's (``F.linear``, ``mm``). ``w`` is cast to the
    activations' dtype as autocast would (bf16 autocast: bf16 GEMMs, the fp32 master weight's
    gradient cast back).
    """

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor, w: Tensor, act) -> Tensor:
        ctx.act = act
        ctx.save_for_backward(g, u, w)
        return F.linear(act(g) * u, w.to(g.dtype))

    @staticmethod
    def backward(ctx, dy: Tensor):
        if torch.is_grad_enabled():  # create_graph: this backward is not itself differentiable
            raise RuntimeError(
                "the gated MLP's memory-lean backward (_layers._GatedDown) has no second "
                "derivative (create_graph=True): where one is needed, compute the MLP as the "
                "eager expression down_proj(act(gate_proj(x)) * up_proj(x))"
            )
        g, u, w = ctx.saved_tensors
        with torch.enable_grad():
            g_ = g.detach().requires_grad_()
            a = ctx.act(g_)
        h = a.detach() * u
        wc = w.to(dy.dtype)
        dw = dy.reshape(-1, dy.shape[-1]).t().mm(h.reshape(-1, h.shape[-1]))
        dh = dy.matmul(wc)
        dg = du = None
        if ctx.needs_input_grad[0]:
            (dg,) = torch.autograd.grad(a, g_, dh * u)
        if ctx.needs_input_grad[1]:
            du = dh * a.detach()
        return dg, du, dw.to(w.dtype) if ctx.needs_input_grad[2] else None, None


class SwiGLU(GatedMLP):
    """Llama's MLP: down(silu(gate(x)) * up(x)) (transformers' LlamaMLP)."""

    def act(self, x: Tensor) -> Tensor:
        return F.silu(x)


def one_layout(what: str, layouts: list[tuple[str, str, list[str]]], none_found: str, state) -> str:
    """The one layout whose keys a state dict holds: ``layouts`` are (name, label, the keys
    found of it); two found -> ValueError "<what>: mixes <label> (e.g. key) and <label> ...",
    none -> "<what>: <none_found>; first keys: ..."."""
    present = [(label, keys, name) for name, label, keys in layouts if keys]
    if len(present) > 1:
        (a, ka, _), (b, kb, _) = present[:2]
        raise ValueError(f"{what}: mixes {a} (e.g. {ka[0]!r}) and {b} (e.g. {kb[0]!r})")
    if not present:
        first = ", ".join(repr(k) for k in list(state)[:5])
        raise ValueError(f"{what}: {none_found}; first keys: {first}")
    return present[0][2]


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


def raise_bad_keys(
    what: str, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped keys by name (20 shown
    per kind, then a count); nothing when all three are empty."""
    if not (missing or unexpected or mismatched):
        return
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


def load_checked(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """load_state_dict(strict) with an error that lists missing, unexpected and mismatched keys."""
    own = module.state_dict()
    raise_bad_keys(
        what,
        sorted(set(own) - set(state)),
        sorted(set(state) - set(own)),
        sorted(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(state)
            if state[k].shape != own[k].shape
        ),
    )
    module.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class LoadResult:
    """What a checkpoint loader found.

    Attributes:
        layout: the key layout detected (or forced), e.g. "original", "transformers", "meta".
        ignored: checkpoint keys deliberately not loaded (parts of the checkpoint that are not
            this module's, such as another model's predictor, an LM head or unused layers), in
            the checkpoint's naming, sorted.
    """

    layout: str
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """Where one parameter of the module comes from in a checkpoint.

    Attributes:
        keys: the checkpoint keys read (one, or several that ``combine`` joins).
        shapes: the shape each key must have.
        combine: tensors of ``keys`` (in order) -> the parameter; None takes the single key
            as is.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    combine: Callable[[list[Tensor]], Tensor] | None = None


def load_mapped(
    module: nn.Module,
    state: Mapping[str, Tensor],
    plan: Mapping[str, Source],
    what: str,
    *,
    ignore: Callable[[str], bool] = lambda key: False,
    name: Callable[[str], str] = lambda key: key,
) -> tuple[str, ...]:
    """Load ``module`` from ``state`` by ``plan`` (module key -> :class:`Source`); module keys
    the plan leaves out keep their values.

    Every checkpoint key is read by the plan or accepted by ``ignore``; any other is unexpected.
    Before anything is written, one ValueError lists (by ``name(key)``, the checkpoint's naming)
    every source key missing, every unexpected key and every key whose shape differs from the
    plan's; then the module is loaded strictly. Returns the ignored keys present (named, sorted).
    """
    missing, mismatched, used = [], [], set()
    for src in plan.values():
        for key, shape in zip(src.keys, src.shapes, strict=True):
            used.add(key)
            if key not in state:
                missing.append(name(key))
            elif tuple(state[key].shape) != tuple(shape):
                mismatched.append(
                    f"{name(key)}: checkpoint {tuple(state[key].shape)} vs expected {tuple(shape)}"
                )
    rest = [k for k in state if k not in used]
    ignored = sorted(name(k) for k in rest if ignore(k))
    unexpected = sorted(name(k) for k in rest if not ignore(k))
    raise_bad_keys(what, sorted(set(missing)), unexpected, sorted(set(mismatched)))
    full = dict(module.state_dict())
    for dst, src in plan.items():
        parts = [state[k] for k in src.keys]
        full[dst] = parts[0] if src.combine is None else src.combine(parts)
    load_checked(module, full, what)
    return tuple(ignored)
