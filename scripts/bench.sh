#!/usr/bin/env bash
# The benchmark command of README.md: installs the package with its benchmark extras, builds the
# native libraries, then runs `pytest bench/ --benchmark-only` (fused against eager and the
# installed peers, side by side) and writes the JSON and a markdown report under bench/out/.
# Extra arguments go to pytest (e.g. `bash scripts/bench.sh --preset gpu -k topk`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[bench]"
python -m vljepa_fast.build
mkdir -p bench/out
stamp=$(date -u +%Y%m%dT%H%M%SZ)
python -m pytest bench/ --benchmark-only -p no:cacheprovider \
  --benchmark-json "bench/out/bench-${stamp}.json" "$@"
python bench/report.py "bench/out/bench-${stamp}.json" --out "bench/out/report-${stamp}"
