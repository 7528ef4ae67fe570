#!/usr/bin/env bash
# The prepared GPU run (docs/DESIGN.md, "The GPU machine"; the steps: scripts/gpu_run.py).
#
#   bash scripts/gpu_run.sh [--dry-run] [--out DIR] [--keep-work]
#
# On a box with a CUDA GPU and torch already installed (no package registry): installs this
# checkout against that torch (pip --no-deps --no-build-isolation --no-index, else PYTHONPATH),
# builds the CUDA library for this device's arch only (9.0a on an H200), runs the gpu test tier
# with several pytest workers (one, and says so, without pytest-xdist), benchmarks every op and
# the model at the paper shapes, each bench file under its own time budget, and packs it all into
# at most 8 files in DIR (default $OUT, else bench/out/gpu-<UTC time>): summary.md, bench.json,
# report.md, gpu_run.tar.gz. The step limits add up to under 8 minutes.
#   --dry-run   the same flow on a CPU-only machine (CI runs it): cpu library only, the gpu tests
#               collect and skip, the benchmarks run the "smoke" preset, limits doubled.
# Exit status: 0 when every step passed and the output folder is within its limits, else 1.
# The interpreter is python3 (the GPU machine's); PYTHON=... overrides it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

# The CUDA library's attention (csrc/include/attention_kernels.h) includes CUTLASS's CuTe headers, and the
# GPU machine has no package registry: they must come with the working tree (vljepa_fast/_ext.py,
# cutlass_include: VLJEPA_FAST_CUTLASS_INCLUDE, else third_party/cutlass/include, else an
# installed nvidia-cutlass). Checked before anything runs; the dry run builds no CUDA library.
cutlass_found() {
  local env=${VLJEPA_FAST_CUTLASS_INCLUDE:-}
  if [[ -n "$env" ]]; then
    [[ -f "$env/cute/tensor.hpp" && -f "$env/cutlass/cutlass.h" ]]
    return
  fi
  [[ -f third_party/cutlass/include/cute/tensor.hpp &&
    -f third_party/cutlass/include/cutlass/cutlass.h ]] && return 0
  "${PYTHON:-python3}" -c '
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("cutlass_library")
loc = spec and spec.submodule_search_locations
inc = pathlib.Path(next(iter(loc))) / "source" / "include" if loc else None
sys.exit(0 if inc and (inc / "cute" / "tensor.hpp").is_file() else 1)' 2>/dev/null
}
if [[ " $* " != *" --dry-run "* ]] && ! cutlass_found; then
  echo "gpu_run.sh: no CUTLASS headers for the CUDA attention (nvidia-cutlass==4.2.0.0)." >&2
  echo "  Stage them where the checkout is sent from: python -m vljepa_fast.build --stage-cutlass" >&2
  echo "  and carry third_party/cutlass (git-ignored, about 6 MB) with the working tree," >&2
  echo "  or set VLJEPA_FAST_CUTLASS_INCLUDE to a folder holding cute/ and cutlass/." >&2
  exit 2
fi
exec "${PYTHON:-python3}" scripts/gpu_run.py "$@"
