"""Subprocess that compiles one native library: ``python -m vljepa_fast._build LIB OUT``.

Run by :func:`vljepa_fast._ext.build` with CUDA_HOME, TORCH_CUDA_ARCH_LIST and (cuda)
VLJEPA_FAST_CUTLASS_INCLUDE already set in the environment (torch reads the first two when
torch.utils.cpp_extension is imported, hence the subprocess). Writes OUT/vljepa_fast_LIB.so and,
only after it succeeded, OUT/build_info.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(lib: str, out: str) -> None:
    from torch.utils import cpp_extension

    from vljepa_fast import _ext

    out_dir = Path(out)
    (out_dir / "build_info.json").unlink(missing_ok=True)
    kwargs = {}
    includes = [str(_ext.source_root() / "include")]
    if lib == "cpu":
        kwargs = dict(extra_cflags=_ext.CPU_CFLAGS, extra_ldflags=_ext.CPU_LDFLAGS)
    else:
        kwargs = dict(extra_cflags=["-O3"], extra_cuda_cflags=_ext.CUDA_CFLAGS)
        cutlass, why = _ext.cutlass_include()
        if cutlass is None:
            raise SystemExit(f"cannot build the cuda library: {why}")
        includes.append(str(cutlass))
    start = time.time()
    cpp_extension.load(
        name=_ext.library_name(lib),
        sources=[str(s) for s in _ext.sources(lib)],
        extra_include_paths=includes,
        build_directory=str(out_dir),
        is_python_module=False,
        verbose=True,
        **kwargs,
    )
    info = _ext._fingerprint(lib)
    info.update(
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=round(time.time() - start, 1),
        cuda_home=os.environ.get("CUDA_HOME") if lib == "cuda" else None,
        cutlass_include=os.environ.get(_ext.CUTLASS_ENV) if lib == "cuda" else None,
        sources=[str(s.relative_to(_ext.source_root())) for s in _ext.sources(lib)],
    )
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
