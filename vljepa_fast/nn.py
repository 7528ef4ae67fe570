"""Drop-in modules built on the fused ops."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from vljepa_fast import _backends, _validate, functional
from vljepa_fast.embedding_index import EmbeddingIndex
from vljepa_fast.ops.attention import check_window
from vljepa_fast.ops.infonce import MIN_TEMPERATURE
from vljepa_fast.ops.rotary import (
    LLAMA3_ROPE_SCALING,
    apply_rotary,
    check_rope_scaling,
    rotary_cos_sin,
)

__all__ = ["EmbeddingIndex", "InfoNCELoss", "PredictorAttention", "SigmoidLoss"]


# ----------------------------------------------------------------------------- argument checks
# Shared with vljepa_fast.integrations. Each returns the normalised value or raises a ValueError
# naming the argument. Numbers may be numpy scalars (numbers.Integral / numbers.Real); bools are
# refused where a number is expected (Python would silently read True as 1).


def _flag(name: str, v: object) -> bool:
    if not _validate.is_bool(v):
        raise ValueError(f"{name}: expected a bool, got {v!r}")
    return bool(v)


_integer = _validate.integer
_device = _validate.device


def _choice(name: str, v: object, options: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in options:
        raise ValueError(f"{name}: expected one of {options}, got {v!r}")
    return v


class PredictorAttention(_backends.HoldsBackend, torch.nn.Module):
    """Llama-compatible grouped-query attention with RoPE and key padding, bidirectional by default.

    The VL-JEPA predictor's attention: a Llama-3.2 layer with the causal mask turned off. The
    parameters are named and shaped as transformers' ``LlamaAttention`` (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``, no biases), so a Llama layer's ``self_attn`` state dict loads with
    ``strict=True``; the rotary frequencies are recomputed, never stored. Queries and keys are
    rotated by :func:`vljepa_fast.apply_rotary` (``"llama"`` layout) and attended by
    :func:`vljepa_fast.attention` in the [B, L, H, D] layout the projections produce (no
    transposes), with the key padding mask passed as is (no dense [B, 1, L, L] additive mask).

    Args:
        hidden_size: model width (2048 for Llama-3.2-1B).
        num_heads: query heads Hq (32).
        num_kv_heads: key/value heads Hkv, dividing num_heads (8).
        head_dim: D, even (64).
        rope_theta: RoPE frequency base, a finite number > 1 (500000).
        rope_scaling: transformers' ``rope_scaling`` dict (default Llama 3.2's "llama3" scaling:
            factor 32, low 1, high 4, original 8192) or None for plain RoPE.
        max_position_embeddings: positions must be below this (131072).
        causal: lower-triangular mask on top of the key padding (the VL-JEPA predictor: False).
        window_size: (left, right) sliding window of :func:`vljepa_fast.attention` (keyword
            only): token i attends token j only if i - left <= j <= i + right, -1 = unbounded
            (causal=True makes the right bound 0); (-1, -1), the default, is full attention.
            Checked here (ValueError naming it).
        backend: a :data:`~vljepa_fast._backends.BackendSpec` ("auto", a backend name, or
            {op name: name}) passed unchanged to both ops the module calls,
            :func:`vljepa_fast.apply_rotary` (op "rotary") and :func:`vljepa_fast.attention`. A
            name one of them does not have (e.g. "sdpa", which rotary lacks) is refused here
            (ValueError naming the op); pick per op with a mapping such as
            ``{"attention": "sdpa"}`` (rotary then runs "auto").
        device: parameter device.
        dtype: parameter dtype (float32, float16, bfloat16 or float64).

    Ints accept numpy integers; bools are refused where numbers are expected.

    Raises:
        ValueError: a malformed argument (named in the message).
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 32,
        num_kv_heads: int = 8,
        head_dim: int = 64,
        rope_theta: float = 500000.0,
        rope_scaling: Mapping[str, float | str] | None = LLAMA3_ROPE_SCALING,
        max_position_embeddings: int = 131072,
        causal: bool = False,
        backend: _backends.BackendSpec = "auto",
        *,
        window_size: tuple[int, int] = (-1, -1),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden_size = _integer("hidden_size", hidden_size, 1)
        num_heads = _integer("num_heads", num_heads, 1)
        num_kv_heads = _integer("num_kv_heads", num_kv_heads, 1)
        head_dim = _integer("head_dim", head_dim, 1)
        max_position_embeddings = _integer("max_position_embeddings", max_position_embeddings, 1)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: must divide num_heads ({num_heads}), got {num_kv_heads}"
            )
        if head_dim % 2:
            raise ValueError(f"head_dim: expected an even head dim (RoPE pairs), got {head_dim}")
        if dtype is not None and dtype not in _validate.FLOAT_DTYPES:
            raise ValueError(
                f"dtype: expected float32, float16, bfloat16 or float64 (or None), got {dtype!r}"
            )
        if device is not None:
            device = _device("device", device)
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = _validate.number("rope_theta", rope_theta, above=1.0)
        self.rope_scaling = check_rope_scaling(rope_scaling)
        self.max_position_embeddings = max_position_embeddings
        self.causal = _flag("causal", causal)
        self.window_size = check_window(window_size)
        self.backend = _backends.check_spec(backend, ops=("attention", "rotary"))
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.q_proj = torch.nn.Linear(hidden_size, num_heads * head_dim, **kw)
        self.k_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.v_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.o_proj = torch.nn.Linear(num_heads * head_dim, hidden_size, **kw)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"causal={self.causal}, window_size={self.window_size}, backend={self.backend!r}"
        )

    def _check_positions(self, position_ids: object, hidden: Tensor) -> Tensor:
        B, L, _ = hidden.shape
        if not isinstance(position_ids, Tensor):
            raise ValueError(
                f"position_ids: expected an integer tensor, got {type(position_ids).__name__}"
            )
        if position_ids.dtype not in _validate.INT_DTYPES:
            raise ValueError(f"position_ids: expected an integer tensor, got {position_ids.dtype}")
        if position_ids.shape not in ((L,), (B, L)):
            raise ValueError(
                f"position_ids: expected [B, L] or [L] = {(B, L)}, got {tuple(position_ids.shape)}"
            )
        if position_ids.device != hidden.device:
            raise ValueError(
                f"position_ids: expected device {hidden.device} (hidden's), got "
                f"{position_ids.device}"
            )
        if not torch.compiler.is_compiling():  # one host sync; not inside a compiled graph
            lo, hi = torch.aminmax(position_ids.to(torch.int64))
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.max_position_embeddings:
                raise ValueError(
                    f"position_ids: expected values in [0, {self.max_position_embeddings}) "
                    f"(max_position_embeddings), got values in [{lo}, {hi}]"
                )
        return position_ids

    #: multiplier of q.k; None = 1 / sqrt(head_dim) (subclasses such as Gemma-3's set theirs)
    scaling: float | None = None

    def rotary_tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(cos, sin) [*positions.shape, head_dim] of the module's RoPE (base ``rope_theta``,
        ``rope_scaling``); float64 tables for float64 hidden states (fp32 tables cost them 1e-8
        of accuracy), float32 otherwise."""
        return rotary_cos_sin(
            positions,
            self.head_dim,
            theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        )

    def norm_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Hook between the projections and RoPE on q [B, L, Hq, D], k [B, L, Hkv, D]: identity
        here (Llama); Gemma-3 normalises each head."""
        return q, k

    def forward(
        self,
        hidden: Tensor,
        key_padding_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        rotary: tuple[Tensor, Tensor] | None = None,
        mask_queries: bool = False,
    ) -> Tensor:
        """Attend over the sequence.

        Args:
            hidden: [B, L, hidden_size], B, L >= 1, on the parameters' device and in their
                dtype (any float dtype under torch.autocast).
            key_padding_mask: [B, L] bool, True = a real token; PAD keys take no part (a PAD
                query still gets an output, from the real keys, unless ``mask_queries``).
                None: every token is real.
            position_ids: [B, L] or [L] integer positions for RoPE on hidden's device, each in
                [0, max_position_embeddings) (checked eagerly, one host sync; not checked inside
                torch.compile); default 0..L-1. Ignored when ``rotary`` is given.
            rotary: precomputed (cos, sin) of :meth:`rotary_tables` for these positions (a
                model computes them once for its layers), as [L, head_dim] or
                [B, L, head_dim] tables.
            mask_queries: the PAD tokens of ``key_padding_mask`` are padded queries too
                (:func:`vljepa_fast.attention`'s ``mask_queries``; needs the mask): their
                attention rows are zero, so their output is ``o_proj`` of zeros (zeros: no
                bias) and they pass no gradient back; the fused backends skip their work. For
                callers whose PAD positions reach no real output (a mean over real tokens).

        Returns:
            [B, L, hidden_size].

        Raises:
            ValueError: a malformed argument (named in the message).
        """
        H = self.hidden_size
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[-1] != H:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"hidden: expected [B, L, {self.hidden_size}], got {got}")
        weight = self.q_proj.weight
        if hidden.dtype != weight.dtype or hidden.device != weight.device:
            try:  # under autocast the projections cast; its absence on meta & co. is an error
                autocast = torch.is_autocast_enabled(hidden.device.type)
            except RuntimeError:
                autocast = False
            if hidden.device != weight.device or not autocast:
                raise ValueError(
                    f"hidden: expected {weight.dtype} on {weight.device} (the parameters'), got "
                    f"{hidden.dtype} on {hidden.device}"
                )
        B, L, _ = hidden.shape
        if B == 0 or L == 0:
            raise ValueError(f"hidden: expected B, L >= 1, got shape {tuple(hidden.shape)}")
        if rotary is None:
            if position_ids is None:
                if L > self.max_position_embeddings:
                    raise ValueError(
                        f"hidden: {L} tokens exceed max_position_embeddings "
                        f"({self.max_position_embeddings})"
                    )
                position_ids = torch.arange(L, device=hidden.device)
            else:
                position_ids = self._check_positions(position_ids, hidden)
            rotary = self.rotary_tables(position_ids, hidden.dtype)
        cos, sin = rotary
        q = self.q_proj(hidden).view(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(B, L, self.num_kv_heads, self.head_dim)
        q, k = self.norm_qk(q, k)
        q, k = apply_rotary(q, k, cos, sin, layout="llama", backend=self.backend)
        out = functional.attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=self.causal,
            window_size=self.window_size,
            scale=self.scaling,
            mask_queries=mask_queries,
            backend=self.backend,
        )
        return self.o_proj(out.reshape(B, L, self.num_heads * self.head_dim))


class InfoNCELoss(_backends.HoldsBackend, torch.nn.Module):
    """Bidirectional InfoNCE on the fused kernels (:func:`vljepa_fast.infonce_loss`) as a module.

    Args:
        temperature: the fixed temperature, or the initial one when learnable: a positive finite
            number (numpy scalars too; not a bool). When learnable it must be at least
            ``1 / max_logit_scale`` (the clamp would otherwise change it at once).
        learnable_temperature: learn ``logit_scale = log(1 / temperature)`` (CLIP convention);
            the scale used is ``exp(logit_scale)`` clamped at ``max_logit_scale``.
        max_logit_scale: the clamp of the learned scale, a number > 0 (CLIP: 100; inf: none).
        symmetric: both directions (bool).
        reduction: "mean", "sum" or "none".
        group: as :func:`vljepa_fast.infonce_loss`.
        backend: a :data:`~vljepa_fast._backends.BackendSpec` ("auto", a backend name, or
            {op name: name}) passed unchanged to :func:`vljepa_fast.infonce_loss`; a name that
            op does not have is refused here (ValueError).

    Shapes:
        forward(pred [N, D], target [N, D]) -> scalar float32 (or [N] with reduction "none").

    Raises:
        ValueError: a malformed argument (named in the message).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        max_logit_scale: float = 100.0,
        symmetric: bool = True,
        reduction: str = "mean",
        group: object | None = None,
        backend: _backends.BackendSpec = "auto",
    ) -> None:
        super().__init__()
        self.temperature = _validate.number("temperature", temperature, above=0.0)
        if not self.temperature >= MIN_TEMPERATURE:  # the range vf.infonce_loss serves
            raise ValueError(
                f"temperature: expected a value >= 2**-60 (about 8.7e-19, the smallest that "
                f"vf.infonce_loss serves), got {self.temperature:g}"
            )
        learnable = _flag("learnable_temperature", learnable_temperature)
        self.max_logit_scale = _validate.number(
            "max_logit_scale", max_logit_scale, above=0.0, allow_inf=True
        )
        self.symmetric = _flag("symmetric", symmetric)
        self.reduction = _choice("reduction", reduction, ("mean", "sum", "none"))
        self.group = group
        self.backend = _backends.check_spec(backend, ops=("infonce_loss",))
        if learnable:
            scale = 1.0 / self.temperature
            if not scale <= self.max_logit_scale:
                raise ValueError(
                    f"temperature: a learnable temperature starts at or above 1 / max_logit_scale "
                    f"= {1.0 / self.max_logit_scale:g} (the clamp), got {self.temperature:g}"
                )
            self.logit_scale = torch.nn.Parameter(torch.tensor(scale).log())
        else:
            self.register_parameter("logit_scale", None)

    def current_temperature(self) -> float | Tensor:
        """The temperature the next forward uses (a 0-dim tensor when learnable)."""
        if self.logit_scale is None:
            return self.temperature
        return 1.0 / self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        temperature = self.current_temperature()
        if isinstance(temperature, Tensor) and isinstance(pred, Tensor):
            temperature = temperature.to(pred.device)
        return functional.infonce_loss(
            pred,
            target,
            temperature=temperature,
            symmetric=self.symmetric,
            reduction=self.reduction,
            group=self.group,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        learn = self.logit_scale is not None
        return (
            f"temperature={self.temperature}, learnable={learn}, symmetric={self.symmetric}, "
            f"backend={self.backend!r}"
        )


class SigmoidLoss(_backends.HoldsBackend, torch.nn.Module):
    """The sigmoid (SigLIP) loss on the fused kernels (:func:`vljepa_fast.sigmoid_loss`) as a
    module, with SigLIP's learnable temperature and bias.

    Args:
        init_logit_scale: t', the log of the multiplier (SigLIP: log 10); the loss uses
            ``logit_scale = exp(t')``. A finite number with exp(t') <= 2**60.
        init_logit_bias: b (SigLIP: -10), a finite number with |b| <= 2**60.
        learnable: learn t' and b (parameters ``logit_scale`` and ``logit_bias``, 0-dim
            float32); False keeps them fixed (buffers of the same names, in the state dict).
        normalize: L2-normalise rows first (bool; as :func:`vljepa_fast.sigmoid_loss`).
        reduction: "mean" (the N x N sum divided by N), "sum" or "none".
        group: as :func:`vljepa_fast.sigmoid_loss`.
        backend: a :data:`~vljepa_fast._backends.BackendSpec` passed unchanged to
            :func:`vljepa_fast.sigmoid_loss`; a name that op does not have is refused here.

    Shapes:
        forward(pred [N, D], target [N, D]) -> scalar float32 (or [N] with reduction "none").

    Raises:
        ValueError: a malformed argument (named in the message).
    """

    def __init__(
        self,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        learnable: bool = True,
        normalize: bool = True,
        reduction: str = "mean",
        group: object | None = None,
        backend: _backends.BackendSpec = "auto",
    ) -> None:
        super().__init__()
        t = _validate.number("init_logit_scale", init_logit_scale, above=-math.inf)
        if not t <= 60 * math.log(2.0):
            raise ValueError(
                f"init_logit_scale: expected exp(init_logit_scale) <= 2**60, got {t:g}"
            )
        bias = _validate.number("init_logit_bias", init_logit_bias, above=-math.inf)
        if not abs(bias) <= 2.0**60:
            raise ValueError(f"init_logit_bias: expected |init_logit_bias| <= 2**60, got {bias:g}")
        learn = _flag("learnable", learnable)
        self.normalize = _flag("normalize", normalize)
        self.reduction = _choice("reduction", reduction, ("mean", "sum", "none"))
        self.group = group
        self.backend = _backends.check_spec(backend, ops=("sigmoid_loss",))
        values = torch.tensor(t), torch.tensor(bias)
        for name, v in zip(("logit_scale", "logit_bias"), values):
            if learn:
                self.register_parameter(name, torch.nn.Parameter(v))
            else:
                self.register_buffer(name, v)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        scale, bias = self.logit_scale.exp(), self.logit_bias
        if isinstance(pred, Tensor):
            scale, bias = scale.to(pred.device), bias.to(pred.device)
        return functional.sigmoid_loss(
            pred,
            target,
            logit_scale=scale,
            logit_bias=bias,
            normalize=self.normalize,
            reduction=self.reduction,
            group=self.group,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        learn = isinstance(self.logit_scale, torch.nn.Parameter)
        return (
            f"learnable={learn}, normalize={self.normalize}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}"
        )
