"""``python -m vljepa_fast.info``: versions, devices, native builds and every op x backend."""

from __future__ import annotations

import platform
import sys

import torch

import vljepa_fast
from vljepa_fast import _ext


def report() -> str:
    """The text that ``python -m vljepa_fast.info`` prints."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"vljepa_fast {vljepa_fast.__version__}",
        f"python      {sys.version.split()[0]} ({platform.machine()})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda})",
        f"triton      {triton_version}",
        f"cuda device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        f"CUDA_HOME   {_ext.find_cuda_home()}",
        f"build dir   {_ext.build_dir('cpu').parent}",
    ]
    for lib in _ext.LIBS:
        st = _ext.load(lib)
        state = f"loaded from {st.path}" if st.loaded else "not available: " + "; ".join(st.reasons)
        lines.append(f"native {lib:<4} {state}")
    lines += [
        "",
        f"{'op':<18} {'backend':<11} {'available':<10} reasons",
    ]
    for row in vljepa_fast.backends():
        why = "; ".join(row.reasons)
        lines.append(f"{row.op:<18} {row.backend:<11} {'yes' if row.available else 'no':<10} {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
