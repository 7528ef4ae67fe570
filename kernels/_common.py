"""What the Triton kernels' launchers share: how a launch goes, and whether it is interpreted.

Triton's interpreter is a per-process choice: with ``TRITON_INTERPRET=1`` in the environment
when the kernel modules are imported, ``@triton.jit`` returns interpreted functions, and
``kernel[grid](...)`` runs the kernel in Python on CPU tensors (Triton's own ``@triton.jit``
helpers, ``tl.sort``, ``tl.topk``, ..., are interpreted alike). Without it they are compiled
``JITFunction``\\ s that take CUDA tensors only. Nothing here patches Triton: the test suite runs
its ``interpret`` tier in a process of its own (tests/conftest.py, scripts/test.sh).

Launchers pass ``INTERPRET=interpreting(x)`` as a ``tl.constexpr``: under the interpreter
``tl.dot`` on bf16 operands is wrong, so kernels upcast dot operands to fp32 only then and keep
bf16/fp16 tensor-core dots on the GPU.

Ahead-of-time compile reports (ptxas registers, spills, shared memory) are test tooling and live
in ``tests/_aot.py``, outside the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from triton import knobs
from triton.runtime.jit import JITFunction

__all__ = ["PEAK_BANDWIDTH", "PEAK_FLOPS", "interpreting", "launch", "pointer_type"]

# The H200 design model of every kernel file's cost functions (issue 12; docs/DESIGN.md "GPU
# design rules"): one owner of the two rates, read by kernels/infonce.py, sigmoid_loss.py and
# topk_similarity.py and through them by the benchmarks' "H200 model" column.
#: Dense GEMM rate: 790 TFLOP/s for bf16 / fp16 (what a large cuBLAS GEMM reaches on an H200),
#: 67 TFLOP/s for fp32 (the FP32 non-tensor peak; fp32 GEMMs run without TF32).
PEAK_FLOPS = {torch.bfloat16: 790e12, torch.float16: 790e12, torch.float32: 67e12}
#: HBM bandwidth, bytes/s.
PEAK_BANDWIDTH = 4.3e12

Grid = tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]]


def interpreting(t: Tensor) -> bool:
    """Whether a kernel launched on ``t`` runs in Triton's interpreter.

    CPU tensors only ever run there. Under ``TRITON_INTERPRET=1`` every launch is interpreted,
    CUDA tensors included (the interpreter copies them to the host), so that counts too.
    """
    return t.device.type == "cpu" or bool(knobs.runtime.interpret)


def launch(kernel: Any, grid: Grid, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``: compiled, or interpreted when the process is.

    Args:
        kernel: a ``@triton.jit`` kernel (a ``JITFunction``, or an interpreted function when
            ``TRITON_INTERPRET=1`` was set before the kernel module was imported).
        grid: launch grid, a tuple or a callable of the bound arguments (as for ``kernel[grid]``).
        *args: kernel arguments; tensor arguments must all be on one device.
        **kwargs: keyword kernel arguments, constexprs and launch options (``num_warps``, ...;
            the interpreter ignores launch options).

    Raises:
        RuntimeError: CPU tensors given to a compiled kernel (``TRITON_INTERPRET`` was not 1
            when the kernel module was imported; setting it later changes nothing).
    """
    if isinstance(kernel, JITFunction):
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is not None and first.device.type == "cpu":
            raise RuntimeError(
                f"{kernel.fn.__name__}: CPU tensors run only through Triton's interpreter, and "
                "this kernel was compiled: set TRITON_INTERPRET=1 in the environment before "
                "the process imports triton (setting it later has no effect)"
            )
    kernel[grid](*args, **kwargs)


_TRITON_TYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
}


def pointer_type(dtype: torch.dtype) -> str:
    """Triton signature type of a pointer to ``dtype`` elements (``torch.float16``: ``"*fp16"``).

    The kernels' signature specs use it (``kernels/topk_similarity.py``'s ``kernel_spec``), and so
    does the AOT tooling of the tests.
    """
    return "*" + _TRITON_TYPE[dtype]
