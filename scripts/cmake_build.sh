#!/usr/bin/env bash
# Standalone CMake build of csrc/ and its C++ unit tests, against the installed torch.
# A CUDA build of torch makes its CMake package look for the CUDA toolkit and nvrtc even for CPU
# code: we point it at the toolkit vljepa_fast finds and at the nvrtc that ships with torch's
# pip dependencies. Extra arguments go to cmake's configure step (e.g. -DVLJEPA_FAST_CUDA=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${VLJEPA_FAST_CMAKE_DIR:-build/cmake}
prefix=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
extra=()
cuda_home=$(python -c 'from vljepa_fast._ext import find_cuda_home as f; print(f() or "")')
if [[ -n "$cuda_home" ]]; then
  extra+=("-DCUDA_TOOLKIT_ROOT_DIR=$cuda_home" "-DCMAKE_CUDA_COMPILER=$cuda_home/bin/nvcc")
  nvrtc=$(python - <<'PY'
import glob, os, site
cands = [p for d in site.getsitepackages() for p in glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so*"))]
print(sorted(cands)[0] if cands else "")
PY
)
  [[ -n "$nvrtc" ]] && extra+=("-DCUDA_nvrtc_LIBRARY=$nvrtc")
fi
# the CUTLASS headers of the CUDA attention (VLJEPA_FAST_CUTLASS_INCLUDE, staged or installed)
cutlass=$(python -c 'from vljepa_fast._ext import cutlass_include as f; print(f()[0] or "")')
[[ -n "$cutlass" ]] && extra+=("-DVLJEPA_FAST_CUTLASS_INCLUDE=$cutlass")
export TORCH_CUDA_ARCH_LIST="${VLJEPA_FAST_CUDA_ARCHS:-8.0;9.0a}"  # no GPU probing at configure time
cmake -S . -B "$out" -DCMAKE_PREFIX_PATH="$prefix" "${extra[@]}" "$@"
cmake --build "$out" -j"$(nproc)"
ctest --test-dir "$out" --output-on-failure
