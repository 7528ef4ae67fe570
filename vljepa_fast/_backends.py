"""The one dispatch contract of every op, in the manner of xformers' operator dispatch.

Contract (docs/DESIGN.md, "Dispatch contract"):

* An op's public function (``vljepa_fast.functional``, ``vljepa_fast.ops.rotary``) validates its
  arguments once and packs them into the op's typed inputs object (a frozen dataclass defined
  next to the op's backends in ``vljepa_fast/ops/<op>.py``, with a ``device`` attribute). Every
  backend receives that one object: no backend restates the op's signature.
* A backend record (:class:`Backend`) says what it serves: ``available()`` gives the reasons it
  cannot run at all on this machine (missing package, failed build), ``supports(inputs)`` gives
  either a :class:`Refusal` (readable reasons) or a *plan*: whatever the backend worked out while
  checking (lengths read from a mask, a kernel variant) that ``run(inputs, plan)`` then consumes,
  so nothing is validated or synchronised twice.
* ``backend="auto"`` walks the op's priority list for the inputs' device and takes the first
  record that accepts; an op may register an :class:`AutoRule` that puts some backends first
  for given inputs (attention on CUDA: which kernel is fastest depends on the mask, the dtype
  and the GPU), the others following by priority; every list ends in ``reference`` (eager
  PyTorch), so ``auto`` never fails on cpu or cuda inputs. :func:`explain` says which backend
  ``auto`` picks for some inputs and why, :func:`backends` states each op's rule. A named
  backend that refuses raises :class:`BackendUnavailableError` with its reasons: nothing is
  substituted silently.

One vocabulary end to end (:data:`BackendSpec`): every op, module, model and integration takes
``backend`` as "auto", a backend name (for every op it calls), or a mapping from op names to
names (ops it does not list run "auto"; a mapping entry for "attention" also covers
"attention_varlen" unless that has its own). Overrides: ``VLJEPA_FAST_BACKEND=<name>`` replaces
``auto`` for every op, ``VLJEPA_FAST_BACKEND_<OP>=<name>`` (e.g.
``VLJEPA_FAST_BACKEND_TOPK_SIMILARITY=reference``) for one op; an explicit name wins over both.

:func:`trace` records which backend each dispatch used (a test and debugging aid).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

OPS = (
    "attention", "attention_varlen", "infonce_loss", "topk_similarity", "rotary", "sigmoid_loss"
)
BACKENDS = ("cuda", "triton", "flash_attn", "xformers", "sdpa", "cpu", "reference")

#: The ops the VL-JEPA model runs (what its ``backend`` is checked against).
MODEL_OPS = ("attention", "rotary", "infonce_loss", "topk_similarity")

#: An op whose mapping entry and environment variable fall back to another op's.
FAMILY = {"attention_varlen": "attention"}

#: What ``backend=`` accepts everywhere: "auto", a name, or {op name: "auto" or a name}.
BackendSpec = str | Mapping[str, str]


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot serve the inputs; the message lists why."""


@dataclass(frozen=True)
class Refusal:
    """What ``supports`` returns when a backend cannot serve the inputs: readable reasons."""

    reasons: tuple[str, ...]


def plan_or_refusal(reasons: list[str], plan: Any = None) -> Any:
    """``Refusal(reasons)`` when there are any, else ``plan`` (the common end of ``supports``)."""
    return Refusal(tuple(reasons)) if reasons else plan


def _accept(inputs: Any) -> None:
    return None


@dataclass(frozen=True)
class Backend:
    """One way to run one op.

    Attributes:
        name: one of BACKENDS.
        op: one of OPS.
        run: (inputs, plan) -> the op's result; ``plan`` is what ``supports`` returned.
        available: () -> reasons this backend cannot run at all on this machine (missing
            package, failed build); success is remembered, so it may be slow the first time.
        supports: (inputs) -> a :class:`Refusal`, or the plan ``run`` consumes (None when there
            is nothing to hand over). Called only when ``available()`` gave no reasons, on
            inputs the op's validation accepted. It must not run the op.
        devices: device types it serves.
        priority: lower runs first under ``auto``.
        deterministic: False when results may vary run to run (refused under
            torch.use_deterministic_algorithms(True)).
        auto_devices: devices on which ``auto`` may choose it (None: all of ``devices``); the
            Triton backends serve CPU tensors only through the interpreter, for tests, and
            only when asked by name.
    """

    name: str
    op: str
    run: Callable[[Any, Any], Any]
    available: Callable[[], list[str]]
    supports: Callable[[Any], Any] = _accept
    devices: tuple[str, ...] = ("cpu", "cuda")
    priority: int = 50
    deterministic: bool = True
    auto_devices: tuple[str, ...] | None = None


class BackendStatus(NamedTuple):
    """One row of :func:`backends`; ``auto_rule``: how ``auto`` orders the op's backends
    (its :class:`AutoRule`'s text; "priority order" for an op without one)."""

    op: str
    backend: str
    available: bool
    reasons: tuple[str, ...]
    auto_rule: str = "priority order"


class Order(NamedTuple):
    """An :class:`AutoRule`'s answer for some inputs: the backends ``auto`` asks first, in
    this order (the op's other records follow by priority), and the case that chose them."""

    names: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class AutoRule:
    """How ``auto`` orders an op's backends per input, where priorities alone cannot say it
    (e.g. attention: which kernel is fastest depends on the mask, dtype and GPU).

    Attributes:
        text: the rule in words (:func:`backends`, :func:`explain`, docs).
        order: inputs -> an :class:`Order`, or None for the priority order. It reads only what
            needs no device sync (dtypes, devices, which arguments are given, the GPU's compute
            capability, installed packages) and must not run the op; a record it names still
            has to accept the inputs (``auto`` goes on down the list past one that refuses).
    """

    text: str
    order: Callable[[Any], Order | None]


class TraceEvent(NamedTuple):
    """One dispatch seen by :func:`trace`: the op, the backend that ran it, the device type."""

    op: str
    backend: str
    device: str


_REGISTRY: dict[str, list[Backend]] = {op: [] for op in OPS}
_RULES: dict[str, AutoRule] = {}
_warned_reference: set[str] = set()
_available_ok: set[tuple[str, str]] = set()
_traces: list[list[TraceEvent]] = []


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


def register_rule(op: str, rule: AutoRule) -> AutoRule:
    """Give ``op`` an :class:`AutoRule` (replacing its previous one); ops without one run
    ``auto`` in priority order."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    _RULES[op] = rule
    return rule


def auto_rule(op: str) -> AutoRule | None:
    """The op's :class:`AutoRule` (None: priority order)."""
    return _RULES.get(op)


def auto_order(op: str, inputs: Any) -> tuple[list[Backend], str]:
    """The records ``auto`` asks for these inputs, in order, and why that order: the rule's
    names first (those registered and allowed under ``auto`` on the inputs' device), then the
    rest by priority; "priority order" without a rule or when it gives None."""
    dev = inputs.device.type
    recs = [r for r in _REGISTRY[op] if dev in (r.auto_devices or r.devices)]
    rule = _RULES.get(op)
    order = rule.order(inputs) if rule is not None else None
    if order is None:
        return recs, "priority order"
    first = [r for name in order.names for r in recs if r.name == name]
    return first + [r for r in recs if r not in first], order.reason


class FixedBackend:
    """The ``backend`` attribute of a module or model: set once, by its constructor.

    A module hands its spec to its submodules when it is built, so assigning another later
    would change some op calls and not others; it raises instead. (Deep copies and pickles
    keep the value.)
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        d = obj.__dict__
        if self.slot in d:
            return d[self.slot]
        if self.name in d:  # pickled before the attribute was fixed (stored under its name)
            return d[self.name]
        raise AttributeError(f"{type(obj).__name__} has no {self.name} yet")

    def __set__(self, obj: Any, value: Any) -> None:
        if self.slot in obj.__dict__:
            raise AttributeError(
                f"{type(obj).__name__}.{self.name} is fixed at construction (what it built "
                f"holds it too): build it again with the backend you want (for one built with "
                f"'auto', VLJEPA_FAST_BACKEND[_<OP>] are read at each eager call, but a "
                f"torch.compile graph keeps the choice it was traced with)"
            )
        obj.__dict__[self.slot] = value


class HoldsBackend:
    """Base of every module, model and index with a ``backend``: the attribute is a
    :class:`FixedBackend` (set by the constructor, read-only after)."""

    backend = FixedBackend()


def _names() -> tuple[str, ...]:
    return ("auto",) + BACKENDS


class FrozenSpec(dict):
    """A checked per-op mapping (what :func:`check_spec` returns for one): a dict that refuses
    changes, so a module and the submodules it handed its spec to cannot disagree later;
    deep-copies and pickles as a plain value."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a backend spec is fixed once checked: build a new mapping instead")

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return (FrozenSpec, (dict(self),))

    def __deepcopy__(self, memo: dict) -> FrozenSpec:
        return self


def _offered(op: str) -> tuple[str, ...]:
    return tuple(b.name for b in _REGISTRY[op])


def parse_spec(text: object, name: str = "backend") -> BackendSpec:
    """A command line's backend spec checked (:func:`check_spec`): "auto", a backend name, or
    "op=name,op=name" pairs (empty parts skipped); a non-string goes to check_spec as is."""
    spec = text
    if isinstance(text, str) and "=" in text:
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        spec = {op.strip(): backend.strip() for op, backend in pairs}
    return check_spec(spec, name)


def check_spec(
    backend: object, name: str = "backend", ops: tuple[str, ...] | None = None
) -> BackendSpec:
    """``backend`` checked as a :data:`BackendSpec`; a mapping comes back as a
    :class:`FrozenSpec` copy (read-only; deep-copies and pickles: an EMA copy, torch.save).

    Args:
        backend: "auto", a backend name, or {op name: "auto" or a name}.
        name: the argument's name in messages.
        ops: the ops the caller will run with it (a module's or model's); a single name must
            then be a backend of every one of them, so that a module refuses at construction
            what would fail at its first forward. Mapping entries are always checked against
            their op's backends.

    Raises:
        ValueError: none of the above, an unknown name, or a name the ops do not all have.
    """
    if isinstance(backend, str):
        if backend not in _names():
            raise ValueError(f"{name}: expected 'auto' or one of {BACKENDS}, got {backend!r}")
        lacking = [op for op in ops or () if backend != "auto" and backend not in _offered(op)]
        if lacking:
            op = lacking[0]
            msg = f"{name}: {op} has no backend {backend!r} (it has {', '.join(_offered(op))})"
            if len(ops) > 1:
                common = sorted(set.intersection(*(set(_offered(o)) for o in ops)))
                msg += f"; this module runs {', '.join(ops)}: name one all of them have "
                msg += f"({', '.join(common)})"
                having = [o for o in ops if o not in lacking]
                if having:
                    msg += f", or map ops to names, e.g. {{{having[0]!r}: {backend!r}}}"
            raise ValueError(msg)
        return backend
    if isinstance(backend, Mapping):
        out = {}
        for op, value in backend.items():
            if op not in OPS:
                raise ValueError(f"{name}: mapping key {op!r} is not an op (expected one of {OPS})")
            if not isinstance(value, str) or value not in ("auto",) + _offered(op):
                raise ValueError(
                    f"{name}[{op!r}]: expected 'auto' or one of {_offered(op)}, got {value!r}"
                )
            out[op] = value
        return FrozenSpec(out)
    raise ValueError(
        f"{name}: expected 'auto', a backend name or a mapping of op names to backend names, "
        f"got {type(backend).__name__}"
    )


def _env_name(op: str) -> tuple[str, str] | None:
    """(value, variable) of the most specific override variable set for ``op``, checked (None:
    none set; an empty value counts as unset)."""
    for var in (f"VLJEPA_FAST_BACKEND_{op.upper()}",) + (
        (f"VLJEPA_FAST_BACKEND_{FAMILY[op].upper()}",) if op in FAMILY else ()
    ) + ("VLJEPA_FAST_BACKEND",):
        value = os.environ.get(var)
        if value:  # unset or empty: not an override
            if value not in _names():
                raise ValueError(
                    f"environment variable {var}: expected 'auto' or one of {BACKENDS}, got "
                    f"{value!r}"
                )
            return value, var  # the most specific variable set wins, "auto" included
    return None


def _requested(op: str, backend: BackendSpec) -> tuple[str, str]:
    """(name, where it came from: "" for the argument, else the environment variable)."""
    if isinstance(backend, Mapping):
        name = backend.get(op, backend.get(FAMILY.get(op, op), "auto"))
    else:
        name = backend
    if name != "auto":
        return name, ""
    return _env_name(op) or ("auto", "")


def requested(op: str, backend: BackendSpec) -> str:
    """The name ``op`` runs under ``backend`` and the environment ("auto" or a backend name)."""
    return _requested(op, backend)[0]


def _warn_unknown_variables() -> None:
    """A VLJEPA_FAST_BACKEND_<X> whose X names no op (a typo such as ..._INFONCE) would be
    ignored silently: say so once, at import."""
    known = {f"VLJEPA_FAST_BACKEND_{op.upper()}" for op in OPS}
    for var in sorted(os.environ):
        if var.startswith("VLJEPA_FAST_BACKEND_") and var not in known:
            warnings.warn(
                f"environment variable {var} names no op and is ignored (the per-op overrides "
                f"are {', '.join(sorted(known))})",
                RuntimeWarning,
                stacklevel=2,
            )


_warn_unknown_variables()


def constant_result(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch._dynamo.assume_constant_result`` without importing Dynamo at import time (about
    3 s): that decorator only sets this marker, which Dynamo reads when it traces a call.
    tests/test_dispatch_trace.py pins the behaviour (fullgraph first call, no recompiles)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


# The bookkeeping below (availability probes, the once-only warning, trace events) runs through
# torch._dynamo.assume_constant_result: under torch.compile Dynamo calls such a function eagerly
# while it traces and bakes its answer into the graph, so no lock, file probe, warning or
# mutation of module state enters a graph and no guard on that state makes a compiled function
# recompile (or fail with fullgraph=True). Eagerly they are plain calls. The price, documented
# in docs/DESIGN.md: a compiled graph keeps the backend choice (and the environment variables
# read) of the moment it was traced.


@constant_result
def _probe(op: str, name: str) -> tuple[str, ...]:
    """The record's ``available()`` reasons; success is remembered (it never reverts), so later
    calls are a set lookup."""
    if (op, name) in _available_ok:
        return ()
    rec = next(b for b in _REGISTRY[op] if b.name == name)
    reasons = tuple(rec.available())
    if not reasons:
        _available_ok.add((op, name))
    return reasons


@constant_result
def _first_fallback(op: str) -> bool:
    """True the first time ``op`` falls back to the reference on a non-CPU device."""
    first = op not in _warned_reference
    _warned_reference.add(op)
    return first


@constant_result
def _warn(message: str) -> None:
    # 1 here, 2 select, 3 dispatch, 4 the public op, 5 its caller
    warnings.warn(message, RuntimeWarning, stacklevel=5)


@constant_result
def _record(op: str, name: str, device: str) -> None:
    for events in _traces:
        events.append(TraceEvent(op, name, device))


def _answer(b: Backend, inputs: Any) -> Any:
    """``b``'s plan for these inputs, or a :class:`Refusal`."""
    dev = inputs.device.type
    if dev not in b.devices:
        return Refusal((f"does not run on {dev} tensors (serves {', '.join(b.devices)})",))
    reasons = _probe(b.op, b.name)
    if reasons:
        return Refusal(reasons)
    if not b.deterministic and torch.are_deterministic_algorithms_enabled():
        return Refusal(("not deterministic, and torch.use_deterministic_algorithms(True) is set",))
    return b.supports(inputs)


def reasons_for(b: Backend, inputs: Any) -> list[str]:
    """Every reason ``b`` cannot serve these inputs (empty: it can)."""
    answer = _answer(b, inputs)
    return list(answer.reasons) if isinstance(answer, Refusal) else []


def select(op: str, backend: BackendSpec, inputs: Any) -> tuple[Backend, Any]:
    """The backend record that will run ``op`` on these inputs, and its plan.

    Raises:
        ValueError: ``backend`` is not a :data:`BackendSpec`.
        BackendUnavailableError: a named backend cannot serve the inputs.
    """
    spec = check_spec(backend) if not isinstance(backend, str) else backend
    name, source = _requested(op, spec)
    if name not in _names():
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {name!r}")
    recs = _REGISTRY[op]
    if name != "auto":
        named = f"backend {name!r}" + (f" (from environment variable {source})" if source else "")
        rec = next((b for b in recs if b.name == name), None)
        if rec is None:
            offered = ", ".join(b.name for b in recs)
            raise BackendUnavailableError(f"{op}: no {named} (this op has: {offered})")
        answer = _answer(rec, inputs)
        if isinstance(answer, Refusal):
            lines = "\n".join(f"  - {r}" for r in answer.reasons)
            raise BackendUnavailableError(f"{op}: {named} cannot run these inputs:\n{lines}")
        return rec, answer
    dev = inputs.device.type
    for rec in auto_order(op, inputs)[0]:
        answer = _answer(rec, inputs)
        if isinstance(answer, Refusal):
            continue
        if rec.name == "reference" and dev != "cpu" and _first_fallback(op):
            _warn(
                f"vljepa_fast.{op}: no fused backend serves these {dev} inputs, running the "
                f"eager reference (warned once).\n{explain(op, inputs)}"
            )
        return rec, answer
    # only inputs on a device no backend serves (e.g. meta tensors) get here: the reference
    # serves every input that passed validation on cpu and cuda
    raise BackendUnavailableError(
        f"{op}: no backend serves these {dev} inputs:\n{explain(op, inputs)}"
    )


def dispatch(op: str, backend: BackendSpec, inputs: Any) -> Any:
    """Run ``op`` on the selected backend with its plan (see :func:`select`)."""
    rec, plan = select(op, backend, inputs)
    _record(op, rec.name, inputs.device.type)  # no trace open: a loop over nothing
    return rec.run(inputs, plan)


@contextlib.contextmanager
def trace() -> Iterator[list[TraceEvent]]:
    """Record every dispatch made inside the block: ``with trace() as events: ...``.

    ``events`` is a list of :class:`TraceEvent` in call order. Under torch.compile a dispatch is
    recorded when its graph is traced, not on every run of the compiled graph (a graph traced
    outside the block records nothing).
    """
    events: list[TraceEvent] = []
    _traces.append(events)
    try:
        yield events
    finally:
        _traces.remove(events)


def explain(op: str, inputs: Any = None) -> str:
    """What ``auto`` does for ``op``, then one line per backend: 'ok' or its reasons.

    With ``inputs``: the backend ``auto`` picks for them, the order it asks in and why (the
    op's :class:`AutoRule` case, or the priority order); without: the rule's text, and each
    backend's machine-level availability.
    """
    if inputs is None:
        rule = auto_rule(op)
        lines = [f"  auto: {rule.text if rule is not None else 'priority order'}"]
        for rec in records(op):
            why = list(rec.available())
            lines.append(f"  {rec.name:<10} " + ("ok" if not why else "; ".join(why)))
        return "\n".join(lines)
    why = {rec.name: reasons_for(rec, inputs) for rec in records(op)}
    order, reason = auto_order(op, inputs)
    pick = next((r.name for r in order if not why[r.name]), "none")
    lines = [
        f"  auto picks {pick} (asks {', '.join(r.name for r in order)}: {reason})",
        *(f"  {name:<10} " + ("ok" if not w else "; ".join(w)) for name, w in why.items()),
    ]
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
            rule = auto_rule(op)
            text = rule.text if rule is not None else "priority order"
            rows.append(BackendStatus(op, rec.name, not why, tuple(why), text))
    return rows
