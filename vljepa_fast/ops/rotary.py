"""Rotary position embedding: tables (Llama 3 and V-JEPA 2), the fused op and its eager reference.

``apply_rotary`` rotates queries and keys in the flash-attn layout [B, T, H, D] that
:func:`vljepa_fast.attention` takes, so a layer goes projection -> view -> rotary -> attention
without a transpose. Two layouts:

* ``"llama"``: rotate-half pairs (c, c + D/2), tables cos/sin = [cos(f), cos(f)] over the two
  halves (transformers' ``rotate_half`` convention, so Llama checkpoints load unchanged).
* ``"vjepa2"``: adjacent pairs (2i, 2i + 1), as V-JEPA 2. Its released weights depend on a quirk:
  the per-pair frequencies are *tiled* over each axis group ([f0..f9, f0..f9]) rather than
  repeated per pair ([f0, f0, f1, f1, ..]), so the two channels of a pair may turn by different
  angles. :func:`rotary_cos_sin` builds exactly those tables; the fused backward is the exact
  transpose of that (not quite orthogonal) map.

The op ``"rotary"`` of :mod:`vljepa_fast._backends` (``backend=`` is a BackendSpec; the
``VLJEPA_FAST_BACKEND`` and ``VLJEPA_FAST_BACKEND_ROTARY`` overrides reach it). Backends:
``triton`` (one launch for q and k, forward and backward; CUDA under ``auto``, CPU tensors
through Triton's interpreter when named and TRITON_INTERPRET=1) and ``reference``
(:func:`vljepa_fast.reference.apply_rotary`: eager, fp32 math, float64 kept), which ``auto``
falls back to. Gradients flow to q and k; the tables are constants to the fused op: the
``triton`` backend refuses tables that require a gradient (so ``auto`` takes the reference,
which differentiates them too).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from vljepa_fast import _backends, _validate, reference
from vljepa_fast.ops import _common

__all__ = [
    "LLAMA3_ROPE_SCALING",
    "RotaryInputs",
    "apply_rotary",
    "rotary_cos_sin",
    "rotary_inputs",
]

OP = "rotary"
LAYOUTS = ("llama", "vjepa2")

#: Llama 3.1/3.2 frequency scaling, in transformers' ``rope_scaling`` format.
LLAMA3_ROPE_SCALING: Mapping[str, float | str] = MappingProxyType(
    {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
)

_DEFAULT_THETA = {"llama": 500000.0, "vjepa2": 10000.0}


# ------------------------------------------------------------------------------------ tables


def _inv_freq(dim: int, theta: float, device: torch.device) -> Tensor:
    """[dim // 2] float64 frequencies theta^(-2i / dim)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def _llama3_scale(inv_freq: Tensor, scaling: Mapping[str, float | str]) -> Tensor:
    """Llama 3 scaling: long wavelengths slowed by ``factor``, short kept, a smooth ramp between."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    # smooth = 0 beyond original / low (scaled), 1 below original / high (kept)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def check_rope_scaling(v: object) -> dict | None:
    """transformers' ``rope_scaling`` dict, checked and copied (None stays None).

    The legacy key "type" is read as "rope_type"; rope_type "llama3" needs positive finite
    factor, low_freq_factor, high_freq_factor (> low_freq_factor) and
    original_max_position_embeddings.
    """
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise ValueError(f"rope_scaling: expected a mapping or None, got {type(v).__name__}")
    out = dict(v)
    if "rope_type" not in out and "type" in out:
        out["rope_type"] = out["type"]
    rope_type = out.setdefault("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"rope_scaling: expected rope_type 'llama3' or 'default', got {rope_type!r}"
        )
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"):
            if key not in out:
                raise ValueError(f"rope_scaling: rope_type 'llama3' needs {key!r}")
            out[key] = _validate.number(f"rope_scaling[{key!r}]", out[key], above=0.0)
        if not out["high_freq_factor"] > out["low_freq_factor"]:
            raise ValueError(
                f"rope_scaling: expected high_freq_factor > low_freq_factor, got "
                f"{out['high_freq_factor']} <= {out['low_freq_factor']}"
            )
    return out


def rotary_cos_sin(
    positions: Tensor,
    head_dim: int,
    *,
    layout: str = "llama",
    theta: float | None = None,
    rope_scaling: Mapping[str, float | str] | None = LLAMA3_ROPE_SCALING,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables for :func:`apply_rotary` (angles computed in float64).

    Args:
        positions: token positions on the tables' device. ``"llama"``: [T] or [B, T] (integer
            or float). ``"vjepa2"``: [..., 3] (t, h, w) grid coordinates of each token (frame
            index, patch row, patch column, as V-JEPA 2's ``separate_positions``).
        head_dim: D, even.
        layout: ``"llama"``: angle(c) = position * f[c mod D/2], f[i] = theta^(-2i/D), scaled
            by ``rope_scaling``. ``"vjepa2"``: the D channels are three groups of
            G = 2 * ((D // 3) // 2) channels (20 for D = 64) for t, h, w, each with
            f[i] = theta^(-2i/G), i < G/2, tiled over the group: angle(c) = pos_axis *
            f[c mod G/2]; the last D - 3G channels (4 for D = 64) are not rotated (cos 1, sin 0).
        theta: frequency base; None means 500000 (Llama 3) or 10000 (V-JEPA 2).
        rope_scaling: ``"llama"`` only: transformers' ``rope_scaling`` dict with rope_type
            "llama3" (factor, low_freq_factor, high_freq_factor,
            original_max_position_embeddings) or "default"; None for plain RoPE. Defaults to
            Llama 3.2's (factor 32, low 1, high 4, original 8192). "vjepa2" has no scaling: the
            default is ignored there and any other dict is an error.
        dtype: dtype of the returned tables.

    Returns:
        (cos, sin), each [*positions.shape, D] for "llama", [*positions.shape[:-1], D] for
        "vjepa2".

    Raises:
        ValueError: a malformed argument (named in the message).
    """
    _validate.choice("layout", layout, LAYOUTS)
    _validate.int_in("head_dim", head_dim, 2)
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even head dim, got {head_dim}")
    if not isinstance(positions, Tensor):
        raise ValueError(f"positions: expected a tensor, got {type(positions).__name__}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise ValueError(f"positions: expected integer or real positions, got {positions.dtype}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    if theta is not None and (_validate.is_bool(theta) or not isinstance(theta, numbers.Real)):
        raise ValueError(f"theta: expected a finite base > 1, got {theta!r}")
    theta = _DEFAULT_THETA[layout] if theta is None else float(theta)
    if not math.isfinite(theta) or theta <= 1.0:
        raise ValueError(f"theta: expected a finite base > 1, got {theta}")
    pos = positions.to(torch.float64)
    if layout == "llama":
        if positions.dim() not in (1, 2):
            raise ValueError(
                f"positions: expected [T] or [B, T] for layout 'llama', got "
                f"shape {tuple(positions.shape)}"
            )
        inv_freq = _inv_freq(head_dim, theta, positions.device)
        scaling = check_rope_scaling(rope_scaling)
        if scaling is not None and scaling["rope_type"] == "llama3":
            inv_freq = _llama3_scale(inv_freq, scaling)
        angles = pos[..., None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)
    if rope_scaling is not None and rope_scaling is not LLAMA3_ROPE_SCALING:
        raise ValueError("rope_scaling: layout 'vjepa2' has no frequency scaling (pass None)")
    if positions.dim() < 1 or positions.shape[-1] != 3:
        raise ValueError(
            f"positions: expected [..., 3] (t, h, w) for layout 'vjepa2', got "
            f"shape {tuple(positions.shape)}"
        )
    group = 2 * ((head_dim // 3) // 2)
    inv_freq = _inv_freq(group, theta, positions.device)
    parts = [pos[..., a, None] * inv_freq for a in range(3)]
    angles = torch.cat([torch.cat((p, p), dim=-1) for p in parts], dim=-1)  # tiled per group
    tail = angles.new_zeros(*angles.shape[:-1], head_dim - 3 * group)
    angles = torch.cat((angles, tail), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RotaryInputs:
    """Validated arguments of :func:`apply_rotary`.

    Attributes:
        q: [B, T, Hq, D] queries as given (last dimension contiguous).
        k: [B, T, Hkv, D] keys, same dtype, device, B, T and D.
        cos: [B or 1, T, D] cosines (a [T, D] table gets a leading 1), on q's device.
        sin: sines, same shape as ``cos``.
        layout: "llama" or "vjepa2".
    """

    q: Tensor
    k: Tensor
    cos: Tensor
    sin: Tensor
    layout: str

    @property
    def device(self) -> torch.device:
        return self.q.device


def rotary_inputs(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, layout: str) -> RotaryInputs:
    """The arguments of :func:`apply_rotary`, checked (see its docstring).

    Raises:
        ValueError: a malformed argument (named in the message).
    """
    _validate.choice("layout", layout, LAYOUTS)
    _validate.matching(("q", "k"), (q, k), ndim=4, layouts=("[B, T, Hq, D]", "[B, T, Hkv, D]"))
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(
            f"k: expected [B, T, Hkv, D] with B, T, D = {B}, {T}, {D} (q's), got {tuple(k.shape)}"
        )
    if D % 2:
        raise ValueError(f"q: expected an even head dim, got {D}")
    _validate.last_dim_contiguous("q", q)
    _validate.last_dim_contiguous("k", k)
    tables = []
    for name, t in (("cos", cos), ("sin", sin)):
        _validate.tensor(name, t, ndim=(2, 3), layout="[T, D] or [B, T, D]")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device}, got {t.device}")
        t3 = t[None] if t.dim() == 2 else t
        if t3.shape[0] not in (1, B) or tuple(t3.shape[1:]) != (T, D):
            raise ValueError(
                f"{name}: expected [T, D] or [B, T, D] with B, T, D = {B}, {T}, "
                f"{D}, got {tuple(t.shape)}"
            )
        tables.append(t3)
    if tables[0].shape != tables[1].shape:
        raise ValueError(
            f"sin: expected the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}"
        )
    return RotaryInputs(q, k, tables[0], tables[1], layout)


# ---------------------------------------------------------------------------------- the op


def apply_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    layout: str = "llama",
    backend: _backends.BackendSpec = "auto",
) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of queries and keys, fused: one kernel for both, fwd and bwd.

    out[.., c] = x[.., c] * cos[t, c] + s(c) * x[.., p(c)] * sin[t, c] for every head, where
    the pair partner p(c) and sign s(c) (-1 on the first channel of a pair, +1 on the second)
    follow ``layout``. Differentiable with respect to q and k (and, on the reference backend,
    the tables).

    Args:
        q: [B, T, Hq, D] queries (flash-attn layout, as :func:`vljepa_fast.attention`),
            float32/float16/bfloat16 (float64: reference only); last dimension contiguous,
            D even.
        k: [B, T, Hkv, D] keys, same dtype, device, B, T and D.
        cos: [T, D] or [B, T, D] cosines of each token's angles (any float dtype; the math is
            fp32), from :func:`rotary_cos_sin` or transformers' rotary embedding.
        sin: sines, same shape as ``cos``.
        layout: ``"llama"`` pairs channel c with c + D/2 (transformers' ``rotate_half``);
            ``"vjepa2"`` pairs 2i with 2i + 1 (V-JEPA 2; its tables are tiled per axis group,
            see :func:`rotary_cos_sin`).
        backend: ``"auto"`` (Triton when it can serve: CUDA inputs, tables without a
            gradient; else the eager reference), ``"triton"``, ``"reference"``, or a mapping
            {op name: name} whose ``"rotary"`` entry applies (a BackendSpec, as every op).

    Returns:
        (q_rot [B, T, Hq, D], k_rot [B, T, Hkv, D]), new contiguous tensors in q's dtype.

    Raises:
        ValueError: a malformed argument (named in the message).
        BackendUnavailableError: a named backend cannot serve these inputs (the reasons
            are listed).
    """
    return _backends.dispatch(OP, backend, rotary_inputs(q, k, cos, sin, layout=layout))


@torch.library.custom_op("vljepa_fast::rotary_triton", mutates_args=())
def _rotary_op(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, transpose: bool
) -> tuple[Tensor, Tensor]:
    from vljepa_fast._kernels import rotary as kernel

    return kernel.rotary(q, k, cos, sin, interleaved=interleaved, transpose=transpose)


@_rotary_op.register_fake
def _(q, k, cos, sin, interleaved, transpose):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output) -> None:
    _, _, cos, sin, interleaved, transpose = inputs
    ctx.save_for_backward(cos, sin)
    ctx.flags = (interleaved, transpose)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _backward(ctx, dq: Tensor, dk: Tensor):
    cos, sin = ctx.saved_tensors
    interleaved, transpose = ctx.flags
    gq, gk = _rotary_op(
        _last_dim_contiguous(dq), _last_dim_contiguous(dk), cos, sin, interleaved, not transpose
    )
    return gq, gk, None, None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


def _triton_supports(inputs: RotaryInputs) -> object:
    why = _common.dtype_in("q", inputs.q)
    if inputs.cos.requires_grad or inputs.sin.requires_grad:
        why.append("cos/sin require a gradient (the fused op treats the tables as constants)")
    return _backends.plan_or_refusal(why)


def _triton(inputs: RotaryInputs, plan: object) -> tuple[Tensor, Tensor]:
    return _rotary_op(
        inputs.q,
        inputs.k,
        inputs.cos.contiguous(),
        inputs.sin.contiguous(),
        inputs.layout == "vjepa2",
        False,
    )


def _reference(inputs: RotaryInputs, plan: object) -> tuple[Tensor, Tensor]:
    q_rot, k_rot = reference.apply_rotary(
        inputs.q, inputs.k, inputs.cos, inputs.sin, layout=inputs.layout
    )
    return q_rot.contiguous(), k_rot.contiguous()  # as documented, whatever q's strides


_common.triton_record(OP, _triton, _triton_supports, priority=30)
_common.reference_record(OP, _reference)
