"""Helpers shared by the Triton kernels: interpreted launches on CPU tensors and AOT reports.

Interpreter. ``triton.jit`` picks at decoration time between a compiled ``JITFunction`` and an
``InterpretedFunction`` (from ``TRITON_INTERPRET``). We want both in one process: JITFunctions
for ahead-of-time compile checks and GPU launches, the interpreter for CPU tensors. :func:`launch`
wraps the kernel's Python function in an ``InterpretedFunction`` when its tensors live on the CPU.
Inside such a launch the library's own ``@triton.jit`` helpers (``tl.sort``, ``tl.topk``, ...)
are still JITFunctions, which refuse to be called from Python, so for the duration of the launch
``JITFunction.__call__`` runs them through the interpreter too, and the language patches they
need are undone when the launch ends (the interpreter's own device-function path leaves
``triton.language.core`` patched, which breaks later compilations); ``knobs.runtime.interpret``
is set so that
``constexpr_function`` results come back unwrapped as the interpreter expects.

Launchers pass ``INTERPRET=interpreting(x)`` as a ``tl.constexpr``: under the interpreter
``tl.dot`` on bf16 operands is wrong, so kernels upcast dot operands to fp32 only then and keep
bf16/fp16 tensor-core dots on the GPU.

AOT. :func:`aot_compile` compiles a kernel for a given NVIDIA arch without a GPU and reports what
ptxas did (registers, spills), the shared memory Triton asks for, the PTX and the SASS.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton
from torch import Tensor
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import interpreter
from triton.runtime.jit import JITFunction

__all__ = [
    "SHARED_MEMORY_LIMIT",
    "CompileReport",
    "aot_compile",
    "interpreting",
    "launch",
    "pointer_type",
]

#: Largest dynamic shared memory one block may opt into, in bytes, per compute capability
#: (CUDA programming guide, "Technical Specifications per Compute Capability").
SHARED_MEMORY_LIMIT: dict[int, int] = {
    80: 163 * 1024,
    86: 99 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,
}

Grid = tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]]

# Keyed by the Python function: hashing a JITFunction computes its cache key, which walks its
# dependencies and fails while the interpreter has triton.language patched.
_interpreted: dict[Callable[..., Any], interpreter.InterpretedFunction] = {}
# The interpreter patches module and class attributes of triton.language process-wide.
_interpreter_lock = threading.RLock()


def interpreting(t: Tensor) -> bool:
    """Whether a kernel launched on ``t`` runs in Triton's interpreter (CPU tensors) or compiled."""
    return t.device.type == "cpu"


def _as_interpreted(kernel: JITFunction) -> interpreter.InterpretedFunction:
    fn = _interpreted.get(kernel.fn)
    if fn is None:
        fn = _interpreted[kernel.fn] = interpreter.InterpretedFunction(kernel.fn)
    return fn


class _LaunchPatches:
    """Language patches made during one interpreted launch, all undone when it ends.

    The interpreter patches attributes of the ``triton.language`` modules and classes a
    function's globals refer to (through ``_LangPatchScope.set_attr``). A device function's
    module is patched once per launch rather than on every call (the patching walks whole
    modules and dominated interpreted run time). Scopes then no longer nest, so instead of
    restoring them in order, every attribute's value from before its first patch is recorded
    and put back at the end.
    """

    def __init__(self) -> None:
        self.originals: dict[tuple[int, str], tuple[object, str, object]] = {}
        self.modules: set[str] = set()

    def record(self, obj: object, name: str) -> None:
        # From the object's own namespace: an inherited attribute is deleted again, not copied in.
        self.originals.setdefault((id(obj), name), (obj, name, vars(obj).get(name, _MISSING)))

    def ensure(self, fn: Callable[..., Any]) -> None:
        if fn.__module__ not in self.modules:
            self.modules.add(fn.__module__)
            interpreter._patch_lang(fn)

    def restore(self) -> None:
        for obj, name, original in self.originals.values():
            if original is _MISSING:
                if name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, original)
        self.originals.clear()
        self.modules.clear()


_MISSING = object()
_patches = _LaunchPatches()
_scope_set_attr = interpreter._LangPatchScope.set_attr


def _recording_set_attr(scope: Any, obj: object, name: str, value: object) -> None:
    _patches.record(obj, name)
    _scope_set_attr(scope, obj, name, value)


def _call_interpreted(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
    """``JITFunction.__call__`` during an interpreted launch: run a device function in Python."""
    # Rewrite first: rewriting inspects the function as a JITFunction, which fails once patched.
    fn = _as_interpreted(self).rewrite()
    _patches.ensure(self.fn)
    return fn(*args, **kwargs)


@contextlib.contextmanager
def _interpreter_scope() -> Iterator[None]:
    with _interpreter_lock:
        saved_call, saved_interpret = JITFunction.__call__, knobs.runtime.interpret
        JITFunction.__call__ = _call_interpreted
        interpreter._LangPatchScope.set_attr = _recording_set_attr
        knobs.runtime.interpret = True
        try:
            yield
        finally:
            _patches.restore()
            interpreter._LangPatchScope.set_attr = _scope_set_attr
            JITFunction.__call__ = saved_call
            knobs.runtime.interpret = saved_interpret


def launch(kernel: JITFunction, grid: Grid, *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``, through the interpreter when tensors are on CPU.

    Args:
        kernel: a ``@triton.jit`` kernel.
        grid: launch grid, a tuple or a callable of the bound arguments (as for ``kernel[grid]``).
        *args: kernel arguments; tensor arguments must all be on one device.
        **kwargs: keyword kernel arguments, constexprs and launch options (``num_warps``, ...;
            the interpreter ignores launch options).
    """
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if tensors and interpreting(tensors[0]):
        with _interpreter_scope():
            _as_interpreted(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@dataclass(frozen=True)
class CompileReport:
    """What compiling one kernel variant for one NVIDIA arch produced.

    Attributes:
        name: kernel name.
        arch: compute capability, e.g. 90.
        num_warps: warps per block.
        n_regs: registers per thread (ptxas).
        n_spills: bytes of register spill stores plus spill loads (ptxas); 0 is the goal.
        shared: dynamic shared memory per block in bytes (what Triton launches with).
        shared_limit: the arch's opt-in limit per block (:data:`SHARED_MEMORY_LIMIT`).
        ptx: the PTX text.
        sass: the SASS listing of the cubin (cuobjdump).
        uses_wgmma: whether the PTX issues Hopper warpgroup MMAs (``wgmma.mma_async``).
    """

    name: str
    arch: int
    num_warps: int
    n_regs: int
    n_spills: int
    shared: int
    shared_limit: int
    ptx: str
    sass: str
    uses_wgmma: bool


def _run_tool(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def aot_compile(
    kernel: JITFunction,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    *,
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible_by_16: Sequence[str] | None = None,
) -> CompileReport:
    """Compile ``kernel`` for an NVIDIA GPU of compute capability ``arch``; no GPU needed.

    Args:
        kernel: a ``@triton.jit`` kernel.
        signature: every argument name to its Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``,
            ``"constexpr"`` for constexprs), in the kernel's argument order.
        constexprs: value of every constexpr argument.
        arch: compute capability (80 = A100, 90 = H100/H200; 90 compiles for sm_90a).
        num_warps: warps per block.
        num_stages: software pipelining depth.
        divisible_by_16: arguments to compile as multiples of 16 (pointers: 16-byte aligned), as
            the JIT specializes them at launch (it is what lets loads vectorise); default every
            pointer argument (torch allocations are aligned), no integer.

    Returns:
        a :class:`CompileReport`. Raises ``triton`` compilation errors (including ptxas failures)
        unchanged.
    """
    if divisible_by_16 is None:
        divisible_by_16 = [name for name, ty in signature.items() if ty.startswith("*")]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx_path.write_text(ptx)
        cubin_path.write_bytes(compiled.asm["cubin"])
        # Re-run ptxas with Triton's own flags only to read its -v log (Triton discards it).
        log = _run_tool(
            [
                knobs.nvidia.ptxas.path,
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={gpu_name}",
                str(ptx_path),
                "-o",
                str(Path(tmp) / "log.cubin"),
            ]
        )
        sass = _run_tool([knobs.nvidia.cuobjdump.path, "-sass", str(cubin_path)])
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return CompileReport(
        name=compiled.metadata.name,
        arch=arch,
        num_warps=num_warps,
        n_regs=int(regs.group(1)),
        n_spills=int(spills.group(1)) + int(spills.group(2)),
        shared=int(compiled.metadata.shared),
        shared_limit=SHARED_MEMORY_LIMIT[arch],
        ptx=ptx,
        sass=sass,
        uses_wgmma="wgmma.mma_async" in ptx,
    )


_TRITON_TYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
}


def pointer_type(dtype: torch.dtype) -> str:
    """Triton signature type of a pointer to ``dtype`` elements (``torch.float16``: ``"*fp16"``)."""
    return "*" + _TRITON_TYPE[dtype]
