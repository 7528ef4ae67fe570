"""Building and loading the native libraries (csrc/) without ever crashing an import.

Two shared libraries are built from ``csrc/sources.txt`` with ninja, against the torch that is
running (no build isolation, so no "undefined symbol" from a mismatched torch):

* ``cpu``:  the operator schemas (csrc/ops.cpp) and the C++ CPU kernels. Builds on any machine
  with a C++ compiler.
* ``cuda``: the CUDA kernels for sm_80 and sm_90a (override: ``VLJEPA_FAST_CUDA_ARCHS``). Needs
  a CUDA build of torch and nvcc; it only adds kernels to the schemas of ``cpu``.

A build runs in a subprocess (``python -m vljepa_fast.build``) so a compiler failure becomes a
message, never an exception at import. Builds are cached under ``VLJEPA_FAST_BUILD_DIR`` (default
``~/.cache/vljepa_fast``) in a folder keyed by the source hash, the flags and the torch version,
with ``build_info.json`` beside the library; the record is checked again at load time, and a
mismatch is reported as a reason by :func:`vljepa_fast.backends`.

The CUDA attention (csrc/include/attention_kernels.h) is built on CUTLASS's CuTe headers, pinned to
``nvidia-cutlass==4.2.0.0`` (:data:`CUTLASS_PIN`; the ``cuda`` extra installs it). They are found
by :func:`cutlass_include`: ``VLJEPA_FAST_CUTLASS_INCLUDE``, else a copy staged in the working
tree at ``third_party/cutlass/include`` (``python -m vljepa_fast.build --stage-cutlass``; what a
machine without a package registry, the GPU run's, builds from), else the installed package.

The first op that needs a library builds it (about a minute for ``cpu``, a few for ``cuda``) and
says so on stderr; ``VLJEPA_FAST_BUILD=0`` turns that off, ``python -m vljepa_fast.build``
builds ahead of time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

LIBS = ("cpu", "cuda")
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
CPU_CFLAGS = ["-O3", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]
# --threads=2: nvcc compiles a source's archs (sm_80, sm_90a) side by side; the attention's CuTe
# kernels take minutes per arch, and this halves the build's wall time on two cores
CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--threads=2"]

#: The CUTLASS release whose CuTe headers csrc/include/attention_kernels.h is written against.
CUTLASS_VERSION = "4.2.0.0"
CUTLASS_PIN = f"nvidia-cutlass=={CUTLASS_VERSION}"
CUTLASS_ENV = "VLJEPA_FAST_CUTLASS_INCLUDE"
#: The staged copy, relative to the repository root (git-ignored).
STAGED_CUTLASS = Path("third_party") / "cutlass" / "include"

_lock = threading.RLock()
_state: dict[str, LibState] = {}


@dataclass
class LibState:
    """What happened when a library was looked for: loaded, or why not."""

    loaded: bool = False
    path: Path | None = None
    reasons: list[str] = field(default_factory=list)


def source_root() -> Path:
    """The csrc/ folder: beside the package in a checkout, or installed as vljepa_fast/_csrc."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "_csrc"):
        if (cand / "sources.txt").is_file():
            return cand
    raise FileNotFoundError("vljepa_fast: csrc/sources.txt not found beside the package")


def sources(lib: str) -> list[Path]:
    """The source files of ``lib`` ("cpu" or "cuda") listed in csrc/sources.txt."""
    root = source_root()
    section, out = None, {name: [] for name in LIBS}
    for raw in (root / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        out[section].append(root / line)
    return out[lib]


def cuda_archs() -> str:
    """The TORCH_CUDA_ARCH_LIST used for the cuda library."""
    return os.environ.get("VLJEPA_FAST_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS  # empty: unset


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root (the folder holding bin/nvcc and include/cuda_runtime.h).

    torch's extension builder takes dirname(dirname(which nvcc)), which is wrong when nvcc on
    PATH is a wrapper script or a symlink farm (/usr/local/bin/nvcc). We look at CUDA_HOME /
    CUDA_PATH, then at the target of the nvcc on PATH (following an ``exec`` in a wrapper), then
    at /usr/local/cuda*.
    """

    def ok(p: Path) -> bool:
        return (p / "bin" / "nvcc").exists() and (p / "include" / "cuda_runtime.h").exists()

    # an empty variable is unset (Path("") would be the working directory)
    cands = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        cands.append(real.parent.parent)
        try:
            text = real.read_text(errors="ignore")[:4096] if real.stat().st_size < 65536 else ""
        except OSError:
            text = ""
        for tok in text.split():
            if tok.endswith("/bin/nvcc"):
                cands.append(Path(tok).parent.parent)
    cands += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    return next((c for c in cands if ok(c)), None)


def _has_cute(folder: Path) -> bool:
    cute, cutlass = folder / "cute" / "tensor.hpp", folder / "cutlass" / "cutlass.h"
    return cute.is_file() and cutlass.is_file()


def repo_root() -> Path:
    """The folder above csrc/ (the repository root in a checkout)."""
    return source_root().parent


def package_cutlass_include() -> Path | None:
    """The include folder of the installed nvidia-cutlass package (not imported), or None."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "source" / "include"
    return folder if _has_cute(folder) else None


def cutlass_include() -> tuple[Path | None, str]:
    """(the folder holding cute/ and cutlass/, where it was found), or (None, what to do).

    Order: ``VLJEPA_FAST_CUTLASS_INCLUDE``, the staged copy (``third_party/cutlass/include``),
    the installed nvidia-cutlass package.
    """
    env = os.environ.get(CUTLASS_ENV)
    if env:  # an empty variable is unset
        folder = Path(env)
        if _has_cute(folder):
            return folder, CUTLASS_ENV
        return None, f"{CUTLASS_ENV}={env} holds no cute/tensor.hpp and cutlass/cutlass.h"
    staged = repo_root() / STAGED_CUTLASS
    if _has_cute(staged):
        return staged, "staged"
    folder = package_cutlass_include()
    if folder is not None:
        return folder, "nvidia-cutlass"
    return None, (
        "CUTLASS headers (CuTe) not found: pip install " + CUTLASS_PIN + " (the vljepa_fast[cuda] "
        "extra), or stage them into the working tree with python -m vljepa_fast.build "
        f"--stage-cutlass (then carry {STAGED_CUTLASS.parent.parent}/ to a machine without a "
        f"registry), or set {CUTLASS_ENV} to a folder holding cute/ and cutlass/"
    )


def _nvcc_deps(source: Path, include: Path) -> set[Path] | None:
    """The headers under ``include`` that ``source`` includes for every arch of
    :func:`cuda_archs` (nvcc -M; empty for a source without CUTLASS), or None when the scan
    fails."""
    from torch.utils import cpp_extension

    home = find_cuda_home()
    if home is None:
        return None
    py_inc = sysconfig.get_paths()["include"]
    incs = [source_root() / "include", include, *cpp_extension.include_paths("cuda"), py_inc]
    found: set[Path] = set()
    for arch in cuda_archs().replace(" ", ";").split(";"):
        if not arch:
            continue
        num = arch.replace(".", "").replace("+PTX", "")
        cmd = [
            str(home / "bin" / "nvcc"),
            "-M",
            str(source),
            "-std=c++20",
            "--expt-relaxed-constexpr",
            f"-gencode=arch=compute_{num},code=sm_{num}",
        ]
        cmd += [f"-I{p}" for p in incs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return None
        for tok in proc.stdout.replace("\\\n", " ").split():
            p = Path(tok)
            if p.suffix in {".h", ".hpp", ".inl", ".cuh"} and include in p.parents:
                found.add(p)
    return found


def stage_cutlass(dest: Path | None = None) -> tuple[Path, int, int]:
    """Copy the CUTLASS headers the CUDA library needs into ``dest`` (default
    ``third_party/cutlass/include`` in the working tree); returns (dest, files, bytes).

    The headers come from the installed package (or ``VLJEPA_FAST_CUTLASS_INCLUDE``); only those
    that csrc/cuda/*.cu include for the configured archs (nvcc -M) are copied, the whole cute/
    and cutlass/ trees when that scan cannot run. The copy is replaced, not merged.

    Raises:
        RuntimeError: no source of CUTLASS headers (the message says what to install).
    """
    env = os.environ.get(CUTLASS_ENV)
    if env and not _has_cute(Path(env)):
        raise RuntimeError(f"cannot stage CUTLASS: {CUTLASS_ENV}={env} holds no cute/tensor.hpp")
    src = Path(env) if env else package_cutlass_include()
    if src is None:
        raise RuntimeError(
            f"cannot stage CUTLASS: pip install {CUTLASS_PIN} first (or set {CUTLASS_ENV})"
        )
    dest = dest or repo_root() / STAGED_CUTLASS
    s_res, d_res = src.resolve(), dest.resolve()
    if s_res == d_res or d_res in s_res.parents or s_res in d_res.parents:
        # the copy replaces dest: staging from (or into) the staged folder would delete the source
        raise RuntimeError(f"cannot stage CUTLASS from {src} into {dest}: the same folder")
    files: set[Path] = set()
    for cu in (p for p in sources("cuda") if p.suffix == ".cu"):
        deps = _nvcc_deps(cu, src)
        if deps is None:
            trees = ((src / sub).rglob("*") for sub in ("cute", "cutlass"))
            files = {p for tree in trees for p in tree if p.is_file()}
            break
        files |= deps
    if dest.exists():
        shutil.rmtree(dest)
    total = 0
    for f in sorted(files):
        out = dest / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out)
        total += f.stat().st_size
    (dest.parent / "STAGED.txt").write_text(
        f"{CUTLASS_PIN} headers from {src}: {len(files)} files, {total} bytes\n"
        "made by python -m vljepa_fast.build --stage-cutlass\n"
    )
    return dest, len(files), total


def _fingerprint(lib: str) -> dict:
    h = hashlib.sha256()
    # every header anywhere under csrc/ (whatever its suffix), so an edit to one a source
    # includes always invalidates the cached build
    headers = sorted(p for p in source_root().rglob("*") if p.suffix in {".h", ".cuh", ".hpp"})
    for src in sources(lib) + headers:
        h.update(str(src.relative_to(source_root())).encode())
        h.update(src.read_bytes())
    info = {
        "lib": lib,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cflags": CPU_CFLAGS if lib == "cpu" else CUDA_CFLAGS,
        "archs": cuda_archs() if lib == "cuda" else None,
        "python": sys.version.split()[0],
    }
    h.update(json.dumps(info, sort_keys=True).encode())
    info["source_hash"] = h.hexdigest()[:16]
    return info


def build_dir(lib: str) -> Path:
    """Where ``lib`` is built and cached for this source tree and torch."""
    # an empty variable is unset (Path("") would build into the working directory)
    base = Path(os.environ.get("VLJEPA_FAST_BUILD_DIR") or Path.home() / ".cache" / "vljepa_fast")
    fp = _fingerprint(lib)
    tag = f"{lib}-torch{fp['torch'].replace('+', '_')}-{fp['source_hash']}"
    return base / tag


def library_name(lib: str) -> str:
    return f"vljepa_fast_{lib}"


def _prebuild_reasons(lib: str, *, building: bool = True) -> list[str]:
    """Why ``lib`` cannot be built (``building``) or located; CUTLASS's headers are needed only
    to build, so a library already built loads without them."""
    if lib == "cuda":
        if torch.version.cuda is None:
            return [f"torch {torch.__version__} is a CPU-only build (no CUDA)"]
        if find_cuda_home() is None:
            return ["nvcc / CUDA toolkit not found (set CUDA_HOME to the toolkit root)"]
        if building and cutlass_include()[0] is None:
            return [cutlass_include()[1]]
    return []


#: peak memory of one nvcc job of the cuda library: an attention unit's cicc takes about 4.2 GB
#: per arch, and --threads=2 runs both archs at once
CUDA_JOB_BYTES = 9 * 2**30


def cuda_build_jobs() -> int:
    """How many nvcc jobs ninja may run for the cuda library (torch's MAX_JOBS; a set MAX_JOBS
    wins): one per CPU, at most one per CUDA_JOB_BYTES of physical memory, at least one. On a
    2-core, 24 GB machine ninja's default of 4 jobs ran eight 4 GB cicc processes and the kernel
    killed one (out of memory)."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = CUDA_JOB_BYTES
    return max(1, min(os.cpu_count() or 1, mem // CUDA_JOB_BYTES))


def build(lib: str, *, verbose: bool = False) -> Path:
    """Build ``lib`` in a subprocess and return the library path.

    Raises:
        RuntimeError: the build failed; the message ends with the compiler's last lines.
    """
    reasons = _prebuild_reasons(lib)
    if reasons:
        raise RuntimeError(f"cannot build the {lib} library: " + "; ".join(reasons))
    out = build_dir(lib)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if lib == "cuda":
        env["CUDA_HOME"] = str(find_cuda_home())
        env["TORCH_CUDA_ARCH_LIST"] = cuda_archs()
        env[CUTLASS_ENV] = str(cutlass_include()[0])
        env.setdefault("MAX_JOBS", str(cuda_build_jobs()))
    cmd = [sys.executable, "-m", "vljepa_fast._build", lib, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=not verbose, text=True)
    if proc.returncode != 0:
        log = (proc.stdout or "") + (proc.stderr or "")
        (out / "build_error.log").write_text(log)
        tail = "\n".join(log.strip().splitlines()[-25:])
        raise RuntimeError(
            f"building the {lib} library failed (log: {out}/build_error.log):\n{tail}"
        )
    return out / f"{library_name(lib)}.so"


def _check_record(lib: str, so: Path) -> list[str]:
    rec_path = so.parent / "build_info.json"
    if not rec_path.is_file():
        return [f"{so} has no build_info.json (incomplete build)"]
    rec = json.loads(rec_path.read_text())
    want = _fingerprint(lib)
    diffs = [
        f"{k}: built for {rec.get(k)!r}, running {want[k]!r}"
        for k in ("torch", "torch_cuda", "source_hash")
        if rec.get(k) != want[k]
    ]
    return (
        [f"stale {lib} build ({'; '.join(diffs)}); rebuild: python -m vljepa_fast.build"]
        if diffs
        else []
    )


def auto_build_enabled() -> bool:
    # "0", "false", "off", "no" (any case) disable it, as the other boolean variables read
    off = ("0", "false", "off", "no")
    return os.environ.get("VLJEPA_FAST_BUILD", "1").strip().lower() not in off


def load(lib: str, *, allow_build: bool | None = None) -> LibState:
    """Load ``lib`` once per process (building it first when allowed); never raises.

    Args:
        lib: "cpu" or "cuda".
        allow_build: build when missing; None means :func:`auto_build_enabled`.

    Returns:
        The LibState: ``loaded`` or the ``reasons`` it could not be.
    """
    with _lock:
        st = _state.get(lib)
        if st is not None and (st.loaded or allow_build is False or st.path is not None):
            return st
        st = LibState()
        if lib == "cuda":
            cpu = load("cpu", allow_build=allow_build)
            if not cpu.loaded:
                st.reasons = ["needs the cpu library (operator schemas): " + "; ".join(cpu.reasons)]
                return st
        st.reasons = _prebuild_reasons(lib, building=False)
        if st.reasons:
            _state[lib] = st
            return st
        try:
            so = build_dir(lib) / f"{library_name(lib)}.so"
        except OSError as e:  # a listed source is missing: a broken checkout, not a crash
            st.reasons = [f"cannot read the {lib} sources: {e}"]
            _state[lib] = st
            return st
        if not so.is_file():
            build_now = auto_build_enabled() if allow_build is None else allow_build
            if not build_now:
                st.reasons = [f"{lib} library not built (python -m vljepa_fast.build)"]
                return st
            print(f"vljepa_fast: building the {lib} native library (one time) ...", file=sys.stderr)
            try:
                so = build(lib)
            except RuntimeError as e:
                st.path = so
                st.reasons = [str(e)]
                _state[lib] = st
                return st
        st.path = so
        st.reasons = _check_record(lib, so)
        if not st.reasons:
            try:
                torch.ops.load_library(str(so))
                st.loaded = True
            except OSError as e:
                st.reasons = [f"loading {so} failed: {e}"]
        _state[lib] = st
        return st
