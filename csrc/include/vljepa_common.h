// Constants shared by every native kernel (CPU and CUDA, host and device code). Each is the C++
// copy of a Python owner; tests/test_native_contract.py parses this file and checks that the two
// agree, so the languages cannot drift apart.
#pragma once

namespace vljepa_fast {

// Normalisation epsilon: a row x is divided by max(||x||, kNormEps), so a zero row stays zero.
// Python owner: vljepa_fast.reference.NORM_EPS.
constexpr float kNormEps = 1e-12f;
// A row whose inverse norm reaches this had its norm clamped to kNormEps: the normalisation
// backward gives it a zero gradient (the zero-row rule of vljepa_fast.reference.normalize_rows).
constexpr float kInvNormEps = 1.0f / kNormEps;

}  // namespace vljepa_fast
