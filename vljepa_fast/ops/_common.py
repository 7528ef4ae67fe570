"""Availability checks and record constructors shared by the backend records of every op.

The constructors (:func:`triton_record`, :func:`native_records`, :func:`reference_record`) hold
what every op's records of one kind share (devices, priorities of the device checks, the
availability probe), so an op module states only its run and supports functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vljepa_fast import _backends, _ext

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def native(lib: str) -> list[str]:
    """Reasons the native library ``lib`` ("cpu" or "cuda") is not usable (builds it if allowed)."""
    st = _ext.load(lib)
    return [] if st.loaded else [f"native {lib} library: {r}" for r in st.reasons]


def native_cuda() -> list[str]:
    """Reasons the CUDA kernels cannot run: no GPU, or the cuda library is missing."""
    if not torch.cuda.is_available():
        return ["no CUDA device (torch.cuda.is_available() is False)"]
    return native("cuda")


def _probe_triton() -> list[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return [f"triton is not importable: {e}"]
    return []


# probed once at import: a plain value, which torch.compile reads without tracing a cache
_TRITON_REASONS = _probe_triton()


def triton_import() -> list[str]:
    """Reasons triton cannot be used (empty when it imports)."""
    return list(_TRITON_REASONS)


def interpreter_on() -> bool:
    """Whether this process runs Triton's interpreter, the only way Triton takes CPU tensors:
    TRITON_INTERPRET read as Triton 3.8 reads its boolean knobs (getenv_bool: "1", "true",
    "on", "yes" or "y", any case). Plain Python, so that torch.compile traces it (Triton's knob
    is a C call Dynamo cannot)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def triton_device(device: torch.device) -> list[str]:
    """Reasons the Triton kernels cannot take tensors on ``device``."""
    if device.type == "cpu":
        if not interpreter_on():
            return [
                "CPU tensors run through Triton only in its interpreter "
                "(TRITON_INTERPRET=1; slow, for tests)"
            ]
        return []
    if device.type != "cuda":
        return [f"does not run on {device.type} tensors"]
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return [f"needs compute capability >= 8.0, got {major}.{minor}"]
    return []


def dtype_in(name: str, x: Tensor, allowed=LOW_PRECISION) -> list[str]:
    if x.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        return [
            f"{name} dtype {str(x.dtype).removeprefix('torch.')} not supported (serves {names})"
        ]
    return []


def native_kernel(op: str, device: str) -> list[str]:
    """Reasons there is no native ``device`` ("cpu"/"cuda") kernel for ``vljepa_fast::op``."""
    why = native(device) if device == "cpu" else native_cuda()
    if why:
        return why
    key = device.upper()
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vljepa_fast::{op}", key):
        return [f"the native {device} library has no {key} kernel for {op}"]
    return []


def _no_plan(inputs: Any) -> Any:
    return None


def triton_record(
    op: str,
    run: Callable[[Any, Any], Any],
    supports: Callable[[Any], Any] = _no_plan,
    *,
    priority: int,
) -> _backends.Backend:
    """The ``triton`` record of ``op``: CUDA (compute capability >= 8.0) under ``auto``, CPU
    tensors through Triton's interpreter when asked by name; ``supports`` is asked only after
    the device check passed."""

    def checked(inputs: Any) -> Any:
        why = triton_device(inputs.device)
        if not why:
            return supports(inputs)
        # every reason, not only the device's (the op's own checks are cheap and read no
        # device memory when the device is refused: CPU tensors only get here)
        answer = supports(inputs)
        more = answer.reasons if isinstance(answer, _backends.Refusal) else ()
        return _backends.Refusal(tuple(why) + tuple(more))

    def available() -> list[str]:
        why = triton_import()
        if not why and not torch.cuda.is_available() and not interpreter_on():
            # CPU tensors run only through the interpreter, which this process does not run:
            # the record can serve nothing here (not remembered: the variable can still take
            # effect while the kernel modules are not imported yet)
            why = [
                "no CUDA device, and CPU tensors run through Triton only in its interpreter "
                "(a process started with TRITON_INTERPRET=1; slow, for tests)"
            ]
        return why

    return _backends.register(
        _backends.Backend(
            "triton",
            op,
            run,
            available=available,
            supports=checked,
            devices=("cuda", "cpu"),
            auto_devices=("cuda",),
            priority=priority,
        )
    )


def native_records(
    op: str,
    kernel: str,
    run: Callable[[Any, Any], Any],
    supports: dict[str, Callable[[Any], Any]],
    priority: dict[str, int],
) -> None:
    """Register the ``cuda`` and ``cpu`` records of ``op`` on the native library's ``kernel``
    (``vljepa_fast::<kernel>``); ``supports`` and ``priority`` are keyed by "cuda" and "cpu"."""
    for device in ("cuda", "cpu"):
        _backends.register(
            _backends.Backend(
                device,
                op,
                run,
                available=lambda device=device: native_kernel(kernel, device),
                supports=supports[device],
                devices=(device,),
                priority=priority[device],
            )
        )


def reference_record(op: str, run: Callable[[Any, Any], Any]) -> _backends.Backend:
    """The ``reference`` record of ``op``: eager PyTorch, every device, last under ``auto``."""
    return _backends.register(_backends.Backend("reference", op, run, available=list, priority=100))
