// C++ unit tests of the native CPU kernels, called through the dispatcher exactly as Python
// calls them (torch.ops.vljepa_fast.*), against ATen computations in float64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <tuple>

#include "vljepa_common.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

void test_topk_similarity(int64_t Q, int64_t N, int64_t D, int64_t k, bool cosine) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("vljepa_fast::topk_similarity", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                          int64_t, bool, int64_t, int64_t)>();
  auto q = at::randn({Q, D});
  auto b = at::randn({N, D});
  // path 0 (the kernel's rule), chunk 0 (the whole bank): the schema's defaults
  auto [scores, idx] = op.call(q, b, k, cosine, 0, 0);
  auto qd = q.to(at::kDouble), bd = b.to(at::kDouble);
  if (cosine) {
    qd = qd / qd.norm(2, {1}, true).clamp_min(vljepa_fast::kNormEps);
    bd = bd / bd.norm(2, {1}, true).clamp_min(vljepa_fast::kNormEps);
  }
  auto full = at::matmul(qd, bd.t());
  auto want = std::get<0>(at::topk(full, k, 1));
  expect(scores.sizes() == want.sizes(), "topk_similarity: shape");
  expect(at::allclose(scores.to(at::kDouble), want, 0, 1e-4), "topk_similarity: scores");
  expect(at::allclose(full.gather(1, idx), want, 0, 1e-4), "topk_similarity: indices");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_topk_similarity(5, 127, 72, 10, false);
  test_topk_similarity(3, 1000, 16, 1000, true);
  test_topk_similarity(1, 1, 1, 1, false);
  if (failures == 0) std::printf("test_native: all passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
