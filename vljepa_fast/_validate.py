"""Input checks shared by the public ops: every failure is a ValueError naming the argument."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: integer dtypes accepted for ids and positions (uint64 is refused: it exceeds int64)
INT_DTYPES = (
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
)


def tensor(name: str, x: object, *, ndim: int | Sequence[int], layout: str = "") -> Tensor:
    """``x`` must be a floating tensor with ``ndim`` dimensions (``layout`` names them)."""
    dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        lay = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected a {want} tensor{lay}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float32, float16, bfloat16 or float64, got {x.dtype}")
    return x


def same(names: Sequence[str], xs: Sequence[Tensor], what: str = "dtype") -> None:
    """All tensors share a dtype (``what="dtype"``) or a device (``what="device"``)."""
    vals = [getattr(x, what) for x in xs]
    bad = next((n for n, v in zip(names, vals) if v != vals[0]), None)
    if bad is not None:
        got = ", ".join(f"{n}={v}" for n, v in zip(names, vals))
        raise ValueError(f"{bad}: expected the same {what} as {names[0]}, got {got}")


def matching(
    names: Sequence[str], xs: Sequence[object], *, ndim: int, layouts: Sequence[str]
) -> None:
    """Each of ``xs`` a floating tensor with ``ndim`` dimensions (``layouts`` name them), in
    order, then all of the first one's dtype and device (:func:`tensor`, :func:`same`)."""
    for name, x, layout in zip(names, xs, layouts):
        tensor(name, x, ndim=ndim, layout=layout)
    same(names, xs, "dtype")
    same(names, xs, "device")


def contiguous(name: str, x: Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor, got strides {tuple(x.stride())} for shape "
            f"{tuple(x.shape)} (call .contiguous())"
        )


def last_dim_contiguous(name: str, x: Tensor) -> None:
    if x.stride(-1) != 1:
        raise ValueError(
            f"{name}: expected the last dimension contiguous (stride 1), got strides "
            f"{tuple(x.stride())}"
        )


def nonempty(name: str, x: Tensor, dim: int, what: str) -> None:
    if x.shape[dim] == 0:
        raise ValueError(f"{name}: expected at least one {what}, got shape {tuple(x.shape)}")


def is_bool(v: object) -> bool:
    """A Python or numpy bool (numbers that checks of numbers must refuse)."""
    t = type(v)
    return isinstance(v, bool) or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"))


def number(name: str, v: object, *, above: float, allow_inf: bool = False) -> float:
    """A real number > ``above`` (numpy reals too, bools never): finite unless ``allow_inf``
    (then +inf passes too)."""
    what = f"a number > {above:g}" + (" (inf allowed)" if allow_inf else ", finite")
    if is_bool(v) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name}: expected {what}, got {v!r}")
    f = float(v)
    if math.isnan(f) or f <= above or (math.isinf(f) and not allow_inf):
        raise ValueError(f"{name}: expected {what}, got {f}")
    return f


def plain_number(v: object) -> object:
    """A numpy (or other registered) integer as int and real as float; anything else, bools
    included, unchanged (for the checks that follow to accept or name it)."""
    if isinstance(v, Tensor) or is_bool(v):
        return v
    if isinstance(v, numbers.Integral):
        return operator.index(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def int_in(name: str, v: object, lo: int, hi: int | None = None, hint: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected {rng}{hint}, got {v}")
    return v


def choice(name: str, v: object, options: Sequence[str]) -> str:
    if v not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {v!r}")
    return v  # type: ignore[return-value]


# ------------------------------------------------------------------ module and index arguments
# (vljepa_fast.nn, vljepa_fast.embedding_index, vljepa_fast.integrations)


def integer(name: str, v: object, lo: int) -> int:
    """An int >= ``lo`` (numpy integers too, bools never), as a Python int."""
    if is_bool(v) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if int(v) < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {int(v)}")
    return int(v)


def device(name: str, v: object, types: tuple[str, ...] | None = None) -> torch.device:
    """A device torch can parse; CUDA ones must exist here; ``types`` restricts the kind."""
    if is_bool(v) or not isinstance(v, (str, int, torch.device)):
        raise ValueError(f"{name}: expected a torch.device or a string like 'cuda:0', got {v!r}")
    try:
        dev = torch.device(v)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: not a device: {v!r} ({e})") from None
    if types is not None and dev.type not in types:
        raise ValueError(f"{name}: expected a {' or '.join(types)} device, got {dev}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(f"{name}: {dev} is not available ({count} CUDA devices)")
    return dev


def embedding_pairs(pred, target, grouped: bool) -> None:
    """pred and target of a pairwise loss: [N, D] floating tensors of one shape, dtype and
    device; N, D >= 1 checked here unless ``grouped`` (distributed: every rank's sizes are
    checked on all ranks at once after they are exchanged, since a rank that raised alone would
    leave the others waiting in a collective)."""
    matching(("pred", "target"), (pred, target), ndim=2, layouts=("[N, D]", "[N, D]"))
    if pred.shape != target.shape:
        raise ValueError(
            f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    if not grouped:
        nonempty("pred", pred, 0, "row (N >= 1)")
        nonempty("pred", pred, 1, "column (D >= 1)")


def scalar_value(name: str, v: object, like: Tensor) -> float | None:
    """The value of a scalar loss argument ``v`` (temperature, logit scale or bias): a real
    number (not a bool), or a 0-dim floating tensor on ``like``'s device, whose value is read
    eagerly; None for a tensor under torch.compile (not read while tracing). The caller checks
    the range. Raises ValueError naming ``name`` for anything else."""
    if isinstance(v, Tensor):
        if v.dim() != 0 or not v.is_floating_point():
            raise ValueError(
                f"{name}: expected a 0-dim floating tensor, got {v.dtype} of shape {tuple(v.shape)}"
            )
        if v.device != like.device:
            raise ValueError(f"{name}: expected device {like.device}, got {v.device}")
        return None if torch.compiler.is_compiling() else float(v.detach())
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise ValueError(f"{name}: expected a float or a 0-dim floating tensor, got {v!r}")
