"""Availability checks shared by the backend records of every op."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from vljepa_fast import _ext

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
    """Triton runs CPU tensors only through its interpreter, opted into with TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device(x: Tensor) -> list[str]:
    """Reasons the Triton kernels cannot take tensors on x's device."""
    if x.device.type == "cpu":
        if not interpreter_on():
            return [
                "CPU tensors run through Triton only in its interpreter "
                "(TRITON_INTERPRET=1; slow, for tests)"
            ]
        return []
    if x.device.type != "cuda":
        return [f"does not run on {x.device.type} tensors"]
    major, minor = torch.cuda.get_device_capability(x.device)
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
