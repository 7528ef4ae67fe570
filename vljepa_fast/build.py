"""Build the native libraries ahead of time: ``python -m vljepa_fast.build [--require cpu,cuda]``.

``--only cpu`` limits the build to the named libraries. Without ``--require`` every library that
can be built on this machine is built, and the ones that cannot are reported (exit 0). With
``--require`` the named libraries must build and load, or the command exits 1 with the
compiler's message (CI uses ``--require cpu,cuda``).

``--stage-cutlass`` copies the CUTLASS (CuTe) headers the cuda library includes from the
installed ``nvidia-cutlass`` package into ``third_party/cutlass/include`` (git-ignored), so that a
machine without a package registry (the GPU run's) builds from the working tree it receives; then
exits (combine with a build by running the command twice).
"""

from __future__ import annotations

import argparse
import sys
import time

from vljepa_fast import _ext


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vljepa_fast.build", description=__doc__)
    ap.add_argument("--require", default="", help="comma-separated libraries that must build")
    ap.add_argument("--only", default="", help="comma-separated libraries to build (default all)")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's output")
    ap.add_argument(
        "--stage-cutlass",
        action="store_true",
        help=f"copy the CUTLASS headers the cuda library needs into {_ext.STAGED_CUTLASS}",
    )
    args = ap.parse_args(argv)
    if args.stage_cutlass:
        try:
            dest, n, size = _ext.stage_cutlass()
        except RuntimeError as e:
            print(f"[FAIL] stage-cutlass: {e}")
            return 1
        print(f"[ok]   staged {n} CUTLASS headers ({size / 2**20:.1f} MiB) in {dest}")
        return 0
    required = {x for x in args.require.split(",") if x}
    only = {x for x in args.only.split(",") if x} or set(_ext.LIBS)
    unknown = (required | only) - set(_ext.LIBS)
    if unknown:
        ap.error(f"unknown libraries {sorted(unknown)}; expected some of {_ext.LIBS}")
    failed = False
    for lib in (x for x in _ext.LIBS if x in only | required):
        start = time.time()
        so = _ext.build_dir(lib) / f"{_ext.library_name(lib)}.so"
        try:
            if not so.is_file():
                so = _ext.build(lib, verbose=args.verbose)
            st = _ext.load(lib, allow_build=False)
            if not st.loaded:
                raise RuntimeError("; ".join(st.reasons))
            print(f"[ok]   {lib}: {so} ({time.time() - start:.0f} s)")
        except RuntimeError as e:
            failed |= lib in required
            tag = "FAIL" if lib in required else "skip"
            print(f"[{tag}] {lib}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
