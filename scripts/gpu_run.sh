#!/usr/bin/env bash
# The prepared GPU run (docs: DESIGN.md, "The GPU machine").
#
# On a box with a CUDA GPU and torch already installed (no network): install this checkout
# against that torch, build the native libraries (C++ CPU and CUDA), run the gpu test tier, run
# the benchmarks at paper shapes (preset "gpu") and write their JSON plus a markdown report with
# charts, all within a time budget (default 480 s), every step under its own timeout.
#
#   scripts/gpu_run.sh [--dry-run] [--out DIR] [--budget SECONDS]
#
#   --dry-run   check every step on a CPU-only machine: only the cpu library is built, the gpu
#               tests collect and skip, the benchmarks run the tiny "smoke" preset on the CPU.
#   --out DIR   output folder (default: $OUT when set, else bench/out/gpu-<UTC time>).
#   --budget S  seconds for the whole run (default 480; 900 for --dry-run); the benchmarks
#               get what the earlier steps leave and skip the cases that would start too
#               late, so the JSON is always written.
#
# Output: header.txt (date, GPU, driver, versions, commit), steps.tsv (step, exit status,
# seconds), <step>.log for each step, junit-gpu.xml, bench.json, report/ (report.md, PNGs).
# Copy bench.json and report/ to bench/results/<date>-<gpu>/ to quote them (see its README).
# Exit status: 0 when every step passed, 1 otherwise.

set -uo pipefail

DRY=0
BUDGET=""
OUTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUTDIR="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu_run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# a dry run on a small shared CPU rebuilds the cpu library and runs every smoke case: more time
BUDGET=${BUDGET:-$([ "$DRY" -eq 1 ] && echo 900 || echo 480)}
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUTDIR=${OUTDIR:-${OUT:-$ROOT/bench/out/gpu-$STAMP}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
START=$(date +%s)
FAILED=0
printf "step\texit\tseconds\n" > "$OUTDIR/steps.tsv"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME SECONDS CMD...: run CMD under a timeout, log to NAME.log, record it in steps.tsv;
# exit statuses in $OK_RC (default "0") count as success
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    [ "$limit" -lt 30 ] && limit=30
    t0=$(date +%s)
    echo "[gpu_run] $name (timeout ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    printf "%s\t%d\t%d\n" "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUTDIR/steps.tsv"
    case " ${OK_RC:-0} " in *" $rc "*) rc=0 ;; esac
    if [ "$rc" -ne 0 ]; then
        FAILED=1
        [ "$rc" -eq 124 ] && echo "[gpu_run] $name: timed out after ${limit}s"
        echo "[gpu_run] $name: exit $rc; last lines of $OUTDIR/$name.log:"
        tail -n 15 "$OUTDIR/$name.log" | sed 's/^/    /'
    else
        echo "[gpu_run] $name: ok in $(( $(date +%s) - t0 ))s"
    fi
    return "$rc"
}

# ---------------------------------------------------------------- header: date, GPU, versions
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "mode: $([ "$DRY" -eq 1 ] && echo 'dry run (CPU, smoke preset)' || echo 'GPU run (gpu preset)')"
    echo "budget: ${BUDGET}s"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo none) ($(git status --porcelain 2>/dev/null | wc -l) changed files)"
    if command -v nvidia-smi > /dev/null; then
        echo "gpu:"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv 2>&1 | sed 's/^/  /'
    else
        echo "gpu: none (nvidia-smi not found)"
    fi
    "$PY" - <<'EOF' 2>&1
import importlib.metadata as md
import platform

import torch

print(f"python: {platform.python_version()}")
print(f"torch: {torch.__version__} (cuda {torch.version.cuda}, available {torch.cuda.is_available()})")
for dist in ("triton", "vljepa_fast", "faiss-cpu", "faiss-gpu", "numpy", "pytest-benchmark",
             "nvidia-ml-py", "flash-attn", "xformers", "open-clip-torch"):
    try:
        print(f"{dist}: {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
EOF
} > "$OUTDIR/header.txt"
cat "$OUTDIR/header.txt"

# ---------------------------------------------------------------- 1. install against this torch
installed_here() {
    "$PY" -c "import pathlib, sys, vljepa_fast._kernels as k, vljepa_fast as v
root = pathlib.Path(sys.argv[1]).resolve()
sys.exit(0 if pathlib.Path(v.__file__).resolve().parent.parent == root else 1)" "$ROOT" 2> /dev/null
}
if installed_here; then
    printf "install\t0\t0\n" >> "$OUTDIR/steps.tsv"
    echo "[gpu_run] install: vljepa_fast already imports from $ROOT"
elif ! step install 150 "$PY" -m pip install -e . --no-deps --no-build-isolation --no-index; then
    # no pip or setuptools that can do it: a package tree of links on PYTHONPATH instead
    SHADOW=$(mktemp -d)
    mkdir "$SHADOW/vljepa_fast"
    for f in "$ROOT"/vljepa_fast/*; do ln -s "$f" "$SHADOW/vljepa_fast/"; done
    ln -s "$ROOT/kernels" "$SHADOW/vljepa_fast/_kernels"
    ln -s "$ROOT/csrc" "$SHADOW/vljepa_fast/_csrc"
    export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_run] install: pip failed; using PYTHONPATH=$SHADOW (links into $ROOT)"
    step install_pythonpath 60 "$PY" -c "import vljepa_fast, vljepa_fast._kernels; print(vljepa_fast.__file__)"
fi

# ---------------------------------------------------------------- 2. native build
if [ "$DRY" -eq 1 ]; then
    # compiling the CUDA library takes many minutes on a small CPU: the dry run builds cpu alone
    step build 300 "$PY" -m vljepa_fast.build --only cpu --require cpu
else
    step build 300 "$PY" -m vljepa_fast.build --require cpu,cuda
fi

# ---------------------------------------------------------------- 3. gpu test tier
# exit 5: no test carries the gpu marker yet (nothing to run is not a failure of this script)
OK_RC="0 5" step tests_gpu 150 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider \
    --junitxml="$OUTDIR/junit-gpu.xml"

# ---------------------------------------------------------------- 4. benchmarks
PRESET=gpu
[ "$DRY" -eq 1 ] && PRESET=smoke
BENCH_LEFT=$(( $(left) - 40 ))      # keep time for the report
[ "$BENCH_LEFT" -lt 120 ] && BENCH_LEFT=120
step bench $(( BENCH_LEFT + 30 )) "$PY" -m pytest bench/ --benchmark-only -p no:cacheprovider \
    --preset "$PRESET" --bench-deadline $(( BENCH_LEFT > 150 ? BENCH_LEFT - 90 : 60 )) \
    --benchmark-json="$OUTDIR/bench.json" --benchmark-columns=min,median,max,rounds

# ---------------------------------------------------------------- 5. report
if [ -s "$OUTDIR/bench.json" ]; then
    step report 60 "$PY" bench/report.py "$OUTDIR/bench.json" --out "$OUTDIR/report"
else
    printf "report\t1\t0\n" >> "$OUTDIR/steps.tsv"
    FAILED=1
    echo "[gpu_run] report: no bench.json to report on"
fi

echo
echo "[gpu_run] $(( $(date +%s) - START ))s of ${BUDGET}s; steps:"
column -t -s "$(printf '\t')" "$OUTDIR/steps.tsv" 2> /dev/null | sed 's/^/    /' || cat "$OUTDIR/steps.tsv"
[ -f "$OUTDIR/bench.log" ] && awk '/^=+ vljepa_fast benchmarks/ {on = 1; print; next}
    on && /^(-----|=====)/ {exit} on {print}' "$OUTDIR/bench.log"
echo "[gpu_run] output: $OUTDIR"
exit "$FAILED"
