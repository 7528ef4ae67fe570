// Operator schemas of the vljepa_fast native library.
//
// Every native kernel registers an implementation of one of these schemas with
// TORCH_LIBRARY_IMPL(vljepa_fast, CPU|CUDA, m) in csrc/cpu/<op>.cpp or csrc/cuda/<op>.cu.
// Schemas live here, once, so that the CPU library (which always builds) defines them and the
// CUDA library (which may not) only adds kernels. Python wraps them in vljepa_fast/ops/<op>.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

TORCH_LIBRARY(vljepa_fast, m) {
  // topk_similarity: queries [Q, D], bank [N, D] (same floating dtype, contiguous), 1 <= k <= N.
  // cosine: score rows divided by max(||q|| * ||b||, eps) products (zero rows score 0).
  // Returns scores [Q, k] float32 sorted descending and indices [Q, k] int64.
  m.def("topk_similarity(Tensor queries, Tensor bank, int k, bool cosine) -> (Tensor, Tensor)");

  // infonce_fwd / infonce_bwd: the InfoNCE kernel contract (vljepa_fast/reference.py,
  // infonce_terms). a [N, D], b [M, D] (same floating dtype, contiguous), scale a 0-dim float32
  // tensor (1 / temperature), S = scale * norm(a) @ norm(b)^T (norm = identity unless normalize),
  // positive of row i = column i + offset. Forward returns row_lse [N] and col_lse [M] (empty
  // [0] when col_stats is false) in float64, pos_row [N] = S[i, i+offset] and pos_col [M]
  // (empty likewise) in float32. The LSEs are float64 because the backward forms exp(S - lse):
  // a float32 LSE is off by up to half an ulp of |S| (5e-4 at |S| = 1e4), which would scale
  // every probability of its row by up to 1 +- 5e-4; kernels split it into float hi + lo, so
  // the hot loops stay in float32. Backward takes the weights of loss = sum_i g_row[i] (row_lse[i] - pos_row[i]) +
  // sum_j g_col[j] (col_lse[j] - pos_col[j]) and returns (da [N, D] in a's dtype, db [M, D],
  // dscale 0-dim float32).
  m.def("infonce_fwd(Tensor a, Tensor b, Tensor scale, int offset, bool normalize, bool col_stats)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("infonce_bwd(Tensor a, Tensor b, Tensor scale, int offset, bool normalize, Tensor row_lse,"
        " Tensor? col_lse, Tensor g_row, Tensor? g_col) -> (Tensor, Tensor, Tensor)");
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_meta(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, bool col_stats) {
  (void)scale;
  (void)offset;
  (void)normalize;
  auto f32 = a.options().dtype(at::kFloat);
  auto f64 = a.options().dtype(at::kDouble);
  const int64_t m = col_stats ? b.size(0) : 0;
  return {at::empty({a.size(0)}, f64), at::empty({m}, f64), at::empty({a.size(0)}, f32),
          at::empty({m}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd_meta(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, const at::Tensor& row_lse, const std::optional<at::Tensor>& col_lse,
    const at::Tensor& g_row, const std::optional<at::Tensor>& g_col) {
  (void)offset;
  (void)normalize;
  (void)row_lse;
  (void)col_lse;
  (void)g_row;
  (void)g_col;
  return {at::empty_like(a), at::empty_like(b), at::empty({}, scale.options().dtype(at::kFloat))};
}
}  // namespace

TORCH_LIBRARY_IMPL(vljepa_fast, Meta, m) {
  m.impl("topk_similarity", &topk_similarity_meta);
  m.impl("infonce_fwd", &infonce_fwd_meta);
  m.impl("infonce_bwd", &infonce_bwd_meta);
}
