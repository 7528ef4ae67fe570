"""Backend registry and dispatch, in the manner of xformers' operator dispatch.

Every op has a list of backend records. A record says, cheaply and without running anything,
whether it can serve the given inputs, and if not, why (a list of readable reasons). Dispatch
with ``backend="auto"`` walks the op's priority list for the inputs' device and takes the first
record with no reasons; the list always ends in ``reference`` (eager PyTorch), so ``auto`` never
fails. A named backend that cannot serve raises :class:`BackendUnavailableError` with its reasons:
nothing is substituted silently.

Overrides: ``VLJEPA_FAST_BACKEND=<name>`` replaces ``auto`` for every op,
``VLJEPA_FAST_BACKEND_<OP>=<name>`` (e.g. ``VLJEPA_FAST_BACKEND_TOPK_SIMILARITY=reference``) for
one op; an explicit ``backend=`` argument wins over both.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

OPS = ("attention", "attention_varlen", "infonce_loss", "topk_similarity")
BACKENDS = ("cuda", "triton", "flash_attn", "xformers", "sdpa", "cpu", "reference")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot serve the inputs; the message lists why."""


@dataclass(frozen=True)
class Backend:
    """One way to run one op.

    Attributes:
        name: one of BACKENDS.
        op: one of OPS.
        run: callable taking the op's validated arguments.
        available: () -> reasons this backend cannot run at all on this machine (missing
            package, failed build); cached by the caller's cost, so keep it cheap after the
            first call.
        supports: (*args, **kwargs) -> reasons it cannot serve these particular inputs.
        devices: device types it serves, in ``auto`` order by priority.
        priority: lower runs first under ``auto``.
        deterministic: False when results may vary run to run (refused under
            torch.use_deterministic_algorithms(True)).
        auto_devices: devices on which ``auto`` may choose it (None: all of ``devices``); the
            Triton backends serve CPU tensors only through the interpreter, for tests, and
            only when asked by name.
    """

    name: str
    op: str
    run: Callable[..., Any]
    available: Callable[[], list[str]]
    supports: Callable[..., list[str]] = field(default=lambda *a, **k: [])
    devices: tuple[str, ...] = ("cpu", "cuda")
    priority: int = 50
    deterministic: bool = True
    auto_devices: tuple[str, ...] | None = None


class BackendStatus(NamedTuple):
    """One row of :func:`backends`."""

    op: str
    backend: str
    available: bool
    reasons: tuple[str, ...]


_REGISTRY: dict[str, list[Backend]] = {op: [] for op in OPS}
_warned_reference: set[str] = set()
_available_ok: set[tuple[str, str]] = set()


def register(backend: Backend) -> Backend:
    """Add a backend record (replacing one of the same op and name)."""
    if backend.op not in OPS or backend.name not in BACKENDS:
        raise ValueError(f"unknown op/backend {backend.op!r}/{backend.name!r}")
    recs = [b for b in _REGISTRY[backend.op] if b.name != backend.name]
    recs.append(backend)
    recs.sort(key=lambda b: b.priority)
    _REGISTRY[backend.op] = recs
    return backend


def records(op: str) -> list[Backend]:
    """The op's records in priority order."""
    return list(_REGISTRY[op])


def _device_type(args: Sequence[Any], kwargs: dict) -> str:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def reasons_for(b: Backend, args: Sequence[Any], kwargs: dict) -> list[str]:
    """Every reason ``b`` cannot serve these inputs (empty: it can)."""
    dev = _device_type(args, kwargs)
    if dev not in b.devices:
        return [f"does not run on {dev} tensors (serves {', '.join(b.devices)})"]
    if (b.op, b.name) not in _available_ok:
        reasons = list(b.available())
        if reasons:
            return reasons
        # success never reverts; remembering it keeps locks and native-library probes out of
        # torch.compile's trace (a dict lookup is all it sees once the op has run eagerly)
        _available_ok.add((b.op, b.name))
    if not b.deterministic and torch.are_deterministic_algorithms_enabled():
        return ["not deterministic, and torch.use_deterministic_algorithms(True) is set"]
    return list(b.supports(*args, **kwargs))


def _requested(op: str, backend: str) -> str:
    if backend != "auto":
        return backend
    return os.environ.get(f"VLJEPA_FAST_BACKEND_{op.upper()}") or os.environ.get(
        "VLJEPA_FAST_BACKEND", "auto"
    )


def select(op: str, backend: str, args: Sequence[Any], kwargs: dict) -> Backend:
    """The backend record that will run ``op`` on these inputs.

    Raises:
        ValueError: ``backend`` is not a known name.
        BackendUnavailableError: a named backend cannot serve the inputs.
    """
    name = _requested(op, backend)
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {name!r}")
    recs = records(op)
    if name != "auto":
        rec = next((b for b in recs if b.name == name), None)
        if rec is None:
            offered = ", ".join(b.name for b in recs)
            raise BackendUnavailableError(f"{op}: no backend {name!r} (this op has: {offered})")
        why = reasons_for(rec, args, kwargs)
        if why:
            lines = "\n".join(f"  - {r}" for r in why)
            raise BackendUnavailableError(
                f"{op}: backend {name!r} cannot run these inputs:\n{lines}"
            )
        return rec
    dev = _device_type(args, kwargs)
    for rec in recs:
        if dev not in (rec.auto_devices or rec.devices):
            continue
        if not reasons_for(rec, args, kwargs):
            if rec.name == "reference" and dev != "cpu" and op not in _warned_reference:
                _warned_reference.add(op)
                skipped = explain(op, args, kwargs)
                warnings.warn(
                    f"vljepa_fast.{op}: no fused backend serves these {dev} inputs, running the "
                    f"eager reference (warned once).\n{skipped}",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return rec
    # only inputs on a device no backend serves (e.g. meta tensors) get here: the reference
    # serves every input that passed validation on cpu and cuda
    raise BackendUnavailableError(
        f"{op}: no backend serves these {dev} inputs:\n{explain(op, args, kwargs)}"
    )


def dispatch(op: str, backend: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on the selected backend (see :func:`select`)."""
    return select(op, backend, args, kwargs).run(*args, **kwargs)


def explain(op: str, args: Sequence[Any] = (), kwargs: dict | None = None) -> str:
    """One line per backend of ``op``: 'ok' or its reasons for these inputs."""
    kwargs = kwargs or {}
    lines = []
    for rec in records(op):
        why = reasons_for(rec, args, kwargs) if args or kwargs else list(rec.available())
        lines.append(f"  {rec.name:<10} " + ("ok" if not why else "; ".join(why)))
    return "\n".join(lines)


def backends() -> list[BackendStatus]:
    """Every op x backend on this machine: available or not, and why.

    Availability here is the machine-level answer (package installed, native library built and
    loaded, GPU present); a backend may still refuse particular inputs (dtype, head dim, ...),
    which a named-backend call reports.
    """
    rows = []
    for op in OPS:
        for rec in records(op):
            why = list(rec.available())
            if (
                not why
                and not any(d == "cpu" for d in rec.devices)
                and not torch.cuda.is_available()
            ):
                why = ["needs a CUDA device (torch.cuda.is_available() is False)"]
            rows.append(BackendStatus(op, rec.name, not why, tuple(why)))
    return rows
