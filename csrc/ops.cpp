// Operator schemas of the vljepa_fast native library.
//
// Every native kernel registers an implementation of one of these schemas with
// TORCH_LIBRARY_IMPL(vljepa_fast, CPU|CUDA, m) in csrc/cpu/<op>.cpp or csrc/cuda/<op>.cu.
// Schemas live here, once, so that the CPU library (which always builds) defines them and the
// CUDA library (which may not) only adds kernels. Python wraps them in vljepa_fast/ops/<op>.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

TORCH_LIBRARY(vljepa_fast, m) {
  // topk_similarity: queries [Q, D], bank [N, D] (same floating dtype, contiguous), 1 <= k <= N.
  // cosine: score rows divided by max(||q|| * ||b||, eps) products (zero rows score 0).
  // Returns scores [Q, k] float32 sorted descending and indices [Q, k] int64.
  m.def("topk_similarity(Tensor queries, Tensor bank, int k, bool cosine) -> (Tensor, Tensor)");
}

// Shape functions (Meta kernels) so that FakeTensor tracing and torch.compile(fullgraph=True)
// see through the native ops without running them.
namespace {
std::tuple<at::Tensor, at::Tensor> topk_similarity_meta(const at::Tensor& queries,
                                                        const at::Tensor& bank, int64_t k,
                                                        bool cosine) {
  (void)bank;
  (void)cosine;
  auto scores = at::empty({queries.size(0), k}, queries.options().dtype(at::kFloat));
  auto indices = at::empty({queries.size(0), k}, queries.options().dtype(at::kLong));
  return {scores, indices};
}
}  // namespace

TORCH_LIBRARY_IMPL(vljepa_fast, Meta, m) { m.impl("topk_similarity", &topk_similarity_meta); }
