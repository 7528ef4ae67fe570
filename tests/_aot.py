"""Ahead-of-time compile checks of the Triton kernels (the ``compile`` tier's tooling; no GPU).

:func:`aot_compile` compiles a kernel for a given NVIDIA arch and reports what ptxas did
(registers, spills), the shared memory Triton asks for, the PTX and the SASS. It needs compiled
``JITFunction``\\ s, so it cannot run in a process started with ``TRITON_INTERPRET=1`` (there
``@triton.jit`` gives interpreted functions); tests/conftest.py keeps the compile tier out of
that process. Test tooling only: it is not part of the installed package.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type
from vljepa_fast._kernels._common import pointer_type

__all__ = [
    "SHARED_MEMORY_LIMIT",
    "CompileReport",
    "Launch",
    "aot_compile",
    "compile_launch",
    "pointer_type",
    "recorded_launches",
]

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
        wgmma_shapes: the distinct ``mMnNkK`` shapes of those MMAs with their operand types,
            e.g. ``("m64n64k16.f32.bf16.bf16",)``, sorted (empty without wgmma).
        n_mma_sync: how many warp-level ``mma.sync`` instructions the PTX holds (sm_80's MMA;
            on sm_90a a 16-bit dot that fell back from wgmma shows up here).
        n_dots: how many ``tt.dot`` operations the kernel's Triton IR holds (0: no products).
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
    wgmma_shapes: tuple[str, ...] = field(default=())
    n_mma_sync: int = 0
    n_dots: int = 0

    def wgmma_n(self) -> list[int]:
        """The N (output columns per instruction) of every wgmma shape."""
        return [int(re.match(r"m\d+n(\d+)k", s).group(1)) for s in self.wgmma_shapes]

    def row(self) -> str:
        """One line for a compile table: name, arch, warps, registers, spills, shared, MMAs."""
        mma = ",".join(self.wgmma_shapes) if self.wgmma_shapes else f"mma.sync x{self.n_mma_sync}"
        return (
            f"{self.name} sm_{self.arch} warps={self.num_warps} regs={self.n_regs} "
            f"spills={self.n_spills} shared={self.shared} {mma}"
        )


_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.(\w+)\.(\w+)\.(\w+)")


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
        wgmma_shapes=tuple(sorted({".".join(m.groups()) for m in _WGMMA.finditer(ptx)})),
        n_mma_sync=len(re.findall(r"^\s*mma\.sync\.", ptx, flags=re.M)),
        n_dots=len(re.findall(r"\btt\.dot\b", compiled.asm["ttir"])),
    )


@dataclass(frozen=True)
class Launch:
    """One kernel launch a launcher made: the kernel, its positional and keyword arguments."""

    kernel: Any
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recorded_launches(*modules: Any, arch: int) -> Iterator[list[Launch]]:
    """Within the block, ``launch(kernel, grid, *args, **kwargs)`` of each of ``modules`` (kernel
    files that import :func:`vljepa_fast._kernels._common.launch`) records the launch instead
    of running it, and ``torch.cuda.get_device_capability`` answers ``arch`` (e.g. 90 ->
    (9, 0)), so that launchers with per-arch configs choose those of ``arch``. Call the
    launchers on ``meta`` tensors (nothing is allocated, any size): the records hold exactly
    the constexprs, configs and argument values they would launch on such a GPU."""
    made: list[Launch] = []

    def record(kernel, grid, *args, **kwargs):
        made.append(Launch(kernel, args, kwargs))

    def capability(device=None):
        return divmod(arch, 10)

    saved = [m.launch for m in modules]
    saved_capability = torch.cuda.get_device_capability
    try:
        for m in modules:
            m.launch = record
        torch.cuda.get_device_capability = capability
        yield made
    finally:
        torch.cuda.get_device_capability = saved_capability
        for m, f in zip(modules, saved):
            m.launch = f


def compile_launch(launch: Launch, *, arch: int) -> CompileReport:
    """:func:`aot_compile` of a recorded :class:`Launch` for ``arch``, specialised as the JIT
    would specialise it at that launch: ``None`` arguments and keyword constexprs are
    constexprs, the others take the JIT's type of their value (``mangle_type``: tensors are
    pointers of their dtype, TMA descriptors ``tensordesc<...>``), tensors are 16-byte aligned
    and ints that are multiples of 16 are compiled as such (the JIT's divisibility
    specialisation); ints equal to 1 stay plain ints. Every argument of the kernel must be
    given (no defaults)."""
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    options = {o: kwargs.pop(o) for o in ("num_warps", "num_stages") if o in kwargs}
    names = kernel.arg_names
    values = dict(zip(names, launch.args))
    values.update(kwargs)
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"{kernel.fn.__name__}: no value for {missing}")
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    signature, constexprs, divisible = {}, {}, []
    for name in names:
        value = values[name]
        if name in constexpr_names or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        signature[name] = mangle_type(value)
        if isinstance(value, torch.Tensor) or (
            isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0
        ):
            divisible.append(name)
    return aot_compile(
        kernel, signature, constexprs, arch=arch, divisible_by_16=divisible, **options
    )
