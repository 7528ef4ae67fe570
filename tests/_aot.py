"""Ahead-of-time compile checks of the Triton kernels (the ``compile`` tier's tooling; no GPU).

:func:`aot_compile` compiles a kernel for a given NVIDIA arch and reports what ptxas did
(registers, spills), the shared memory Triton asks for, the PTX and the SASS. It needs compiled
``JITFunction``\\ s, so it cannot run in a process started with ``TRITON_INTERPRET=1`` (there
``@triton.jit`` gives interpreted functions); tests/conftest.py keeps the compile tier out of
that process. Test tooling only: it is not part of the installed package.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from vljepa_fast._kernels._common import pointer_type

__all__ = ["SHARED_MEMORY_LIMIT", "CompileReport", "aot_compile", "pointer_type"]

#: Largest dynamic shared memory one block may opt into, in bytes, per compute capability
#: (CUDA programming guide, "Technical Specifications per Compute Capability").
SHARED_MEMORY_LIMIT: dict[int, int] = {
    80: 163 * 1024,
    86: 99 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,
}


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
        kernel: a ``@triton.jit`` kernel, compiled mode (a ``JITFunction``).
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

    Raises:
        TypeError: ``kernel`` is not a ``JITFunction`` (the process runs Triton's interpreter).
    """
    if not isinstance(kernel, JITFunction):
        raise TypeError(
            f"aot_compile: expected a compiled-mode JITFunction, got {type(kernel).__name__} "
            "(TRITON_INTERPRET=1 makes @triton.jit interpret; the compile tier runs without it)"
        )
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
