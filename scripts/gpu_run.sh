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
exec "${PYTHON:-python3}" scripts/gpu_run.py "$@"
