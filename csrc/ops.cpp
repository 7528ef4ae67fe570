// Operator schemas of the vljepa_fast native library.
//
// Every native kernel registers an implementation of one of these schemas with
// TORCH_LIBRARY_IMPL(vljepa_fast, CPU|CUDA, m) in csrc/cpu/<op>.cpp or csrc/cuda/<op>.cu.
// Schemas live here, once, so that the CPU library (which always builds) defines them and the
// CUDA library (which may not) only adds kernels. Python wraps them in vljepa_fast/ops/<op>.py.
// The argument checks of each op (csrc/include/<op>_check.h) are shared by its kernels and by
// the Meta functions below; the normalisation epsilon eps is kNormEps (csrc/include/
// vljepa_common.h, the copy of vljepa_fast.reference.NORM_EPS).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

#include "attention_check.h"
#include "infonce_check.h"
#include "topk_similarity_check.h"

TORCH_LIBRARY(vljepa_fast, m) {
  // topk_similarity: queries [Q, D], bank [N, D] (one dtype of float32, float16 or bfloat16,
  // contiguous, D >= 1), 1 <= k <= N; Q = 0 gives empty results. cosine: every row of queries
  // and bank divided by max(its norm, eps) (zero rows score 0). Returns scores [Q, k] float32
  // sorted descending and indices [Q, k] int64, in one order on every backend: NaN scores last
  // (below -inf), equal scores (-0.0 == +0.0) lowest index first. The CUDA kernel serves k <=
  // 2048 and sizes below 2^30. path / chunk: the plan of the Python op layer (csrc/include/
  // topk_similarity_check.h: 0 = the kernel's rule, 1 = stream, 2 = GEMM + k-select on chunks
  // of `chunk` bank rows, 0 = all); the CPU kernel ignores them. No gradient:
  // vljepa_fast/ops/topk_similarity.py calls it on detached inputs and attaches the scores'
  // gradient itself.
  m.def(
      "topk_similarity(Tensor queries, Tensor bank, int k, bool cosine, int path=0, int chunk=0)"
      " -> (Tensor, Tensor)");

  // infonce_fwd / infonce_bwd: the InfoNCE kernel contract (vljepa_fast/reference.py,
  // infonce_terms). a [N, D], b [M, D] (one dtype of float32, float16 or bfloat16, contiguous,
  // N >= 1, D >= 1), scale a one-element floating tensor (1 / temperature; it must be finite:
  // the CPU kernel checks, the CUDA kernel reads it on the device and relies on the Python
  // layer), S = scale * norm(a) @ norm(b)^T with norm(x) = x / max(||x||, eps) row by row
  // (identity unless normalize). The positive of row i is column i + offset, 0 <= offset <=
  // M - N; the positive of column j is row clamp(j - offset, 0, N - 1). No argument that passes
  // the checks makes a kernel touch memory outside its tensors. Forward returns row_lse [N] and
  // col_lse [M] (empty [0] when col_stats is false) in float64, pos_row [N] = S[i, i + offset]
  // and pos_col [M] = S[clamp(j - offset, 0, N - 1), j] (empty likewise) in float32. The LSEs
  // are float64 because the backward forms exp(S - lse): a float32 LSE is off by up to half an
  // ulp of |S| (5e-4 at |S| = 1e4), which would scale every probability of its row by up to
  // 1 +- 5e-4; kernels split it into float hi + lo, so the hot loops stay in float32. Backward
  // takes the weights of loss = sum_i g_row[i] (row_lse[i] - pos_row[i]) + sum_j g_col[j]
  // (col_lse[j] - pos_col[j]) (row_lse, g_row [N]; col_lse, g_col [M], floating, on a's device;
  // col_lse is required with g_col and ignored without) and returns (da [N, D] in a's dtype,
  // db [M, D] in b's, dscale 0-dim float32 on scale's device). Rows whose norm is below eps (zero
  // rows) get a zero gradient under normalize: the rule of reference.normalize_rows.
  //
  // chunk: rows of a per chunk for the chunked CUDA kernels (vendor GEMM + fused epilogues;
  // vljepa_fast/ops/_chunks.py owns the rule, the Python layer passes its result); 0 takes the
  // rule's 1 GiB floor; more than N rows means N. The CUDA kernels run the products as cuBLAS
  // GEMMs on chunks of that many rows and merge column statistics and db over chunks in row order
  // (no atomics): the chunk changes results only through rounding, and repeats with one chunk
  // are bit-identical. The CPU kernels tile for the cache and ignore it. Negative is refused.
  m.def("infonce_fwd(Tensor a, Tensor b, Tensor scale, int offset, bool normalize, bool col_stats,"
        " int chunk=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("infonce_bwd(Tensor a, Tensor b, Tensor scale, int offset, bool normalize, Tensor row_lse,"
        " Tensor? col_lse, Tensor g_row, Tensor? g_col, int chunk=0) -> (Tensor, Tensor, Tensor)");

  // flash_attention_fwd / flash_attention_bwd: the CUDA flash attention (csrc/cuda/attention.cu;
  // semantics of kernels/attention.py, wrapped by vljepa_fast/ops/attention_cuda.py). Dense q
  // [B, T, Hq, D], k/v [B, S, Hkv, D]; varlen (cu_seqlens_q/k int32 [B + 1]) q [total_q, Hq, D],
  // k/v [total_k, Hkv, D]; fp16/bf16, D in (64, 128), Hq % Hkv == 0, unit stride on D and other
  // strides multiples of 8 elements (csrc/include/attention_check.h). seqlens_k / seqlens_q
  // (dense, int32 [B]): keys / queries at rows >= the length are padding (right padding; padded
  // queries give out 0, lse -inf and no gradient). Causal and windows bottom-right aligned
  // (window_left/right >= -1, -1 unbounded; causal makes the right bound 0). Forward returns out
  // (q's shape, contiguous) and lse fp32 (dense [B, Hq, T], varlen [Hq, total_q]); backward takes
  // do, out, lse and returns (dq, dk, dv), contiguous; deterministic: no atomics (bitwise
  // reproducible), else dq is accumulated with fp32 atomics.
  m.def(
      "flash_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? seqlens_k, Tensor? seqlens_q,"
      " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k,"
      " bool causal, int window_left, int window_right, float scale) -> (Tensor, Tensor)");
  m.def(
      "flash_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
      " Tensor? seqlens_k, Tensor? seqlens_q, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k,"
      " int max_seqlen_q, int max_seqlen_k, bool causal, int window_left, int window_right,"
      " float scale, bool deterministic) -> (Tensor, Tensor, Tensor)");
}

// Shape functions (Meta kernels) so that FakeTensor tracing and torch.compile(fullgraph=True)
// see through the native ops without running them.
namespace {
using Arg = std::pair<const char*, const at::Tensor*>;

const at::Tensor* optional_arg(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

// The dispatcher also picks a Meta kernel when real tensors are mixed with meta ones (a on the
// cpu, b on meta): refuse that instead of handing back uninitialised real tensors. FakeTensor
// tracing runs these functions on meta tensors only. Absent optional arguments are skipped.
void check_meta(const char* op, std::initializer_list<Arg> args) {
  for (const auto& [name, t] : args) {
    if (t != nullptr && t->defined()) {
      TORCH_CHECK(t->is_meta(), op, ": ", name, " is on ", t->device(),
                  " while other arguments are on meta: all tensors must be on one device");
    }
  }
}

std::tuple<at::Tensor, at::Tensor> topk_similarity_meta(const at::Tensor& queries,
                                                        const at::Tensor& bank, int64_t k,
                                                        bool cosine, int64_t path, int64_t chunk) {
  (void)cosine;
  check_meta("topk_similarity", {{"queries", &queries}, {"bank", &bank}});
  vljepa_fast::check_topk_similarity_inputs(queries, bank, k);
  vljepa_fast::check_topk_similarity_plan(path, chunk);
  auto scores = at::empty({queries.size(0), k}, queries.options().dtype(at::kFloat));
  auto indices = at::empty({queries.size(0), k}, queries.options().dtype(at::kLong));
  return {scores, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_meta(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, bool col_stats, int64_t chunk) {
  (void)normalize;
  vljepa_fast::check_infonce_chunk(chunk);
  check_meta("infonce_fwd", {{"a", &a}, {"b", &b}, {"scale", &scale}});
  vljepa_fast::check_infonce_inputs(a, b, scale, offset);
  auto f32 = a.options().dtype(at::kFloat);
  auto f64 = a.options().dtype(at::kDouble);
  const int64_t m = col_stats ? b.size(0) : 0;
  return {at::empty({a.size(0)}, f64), at::empty({m}, f64), at::empty({a.size(0)}, f32),
          at::empty({m}, f32)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd_meta(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, const at::Tensor& row_lse, const std::optional<at::Tensor>& col_lse,
    const at::Tensor& g_row, const std::optional<at::Tensor>& g_col, int64_t chunk) {
  (void)normalize;
  vljepa_fast::check_infonce_chunk(chunk);
  check_meta("infonce_bwd", {{"a", &a}, {"b", &b}, {"scale", &scale}, {"row_lse", &row_lse},
                             {"g_row", &g_row}, {"g_col", optional_arg(g_col)},
                             {"col_lse", optional_arg(col_lse)}});
  vljepa_fast::check_infonce_inputs(a, b, scale, offset);
  vljepa_fast::check_infonce_bwd_vectors(a, b, row_lse, col_lse, g_row, g_col);
  return {at::empty_like(a), at::empty_like(b), at::empty({}, scale.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& seqlens_k, const std::optional<at::Tensor>& seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, int64_t window_left,
    int64_t window_right, double scale) {
  (void)causal;
  (void)scale;
  check_meta("flash_attention_fwd",
             {{"q", &q}, {"k", &k}, {"v", &v}, {"seqlens_k", optional_arg(seqlens_k)},
              {"seqlens_q", optional_arg(seqlens_q)}, {"cu_seqlens_q", optional_arg(cu_seqlens_q)},
              {"cu_seqlens_k", optional_arg(cu_seqlens_k)}});
  const auto s = vljepa_fast::check_attention_inputs(q, k, v, seqlens_k, seqlens_q, cu_seqlens_q,
                                                     cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                     window_left, window_right);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor lse = s.varlen ? at::empty({s.hq, s.rows_q}, f32)
                            : at::empty({s.n_seq, s.hq, s.rows_q}, f32);
  return {at::empty(q.sizes(), q.options()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_meta(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& seqlens_k,
    const std::optional<at::Tensor>& seqlens_q, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    bool causal, int64_t window_left, int64_t window_right, double scale, bool deterministic) {
  (void)causal;
  (void)scale;
  (void)deterministic;
  check_meta("flash_attention_bwd",
             {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse},
              {"seqlens_k", optional_arg(seqlens_k)}, {"seqlens_q", optional_arg(seqlens_q)},
              {"cu_seqlens_q", optional_arg(cu_seqlens_q)},
              {"cu_seqlens_k", optional_arg(cu_seqlens_k)}});
  const auto s = vljepa_fast::check_attention_inputs(q, k, v, seqlens_k, seqlens_q, cu_seqlens_q,
                                                     cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                     window_left, window_right);
  vljepa_fast::check_attention_bwd_inputs(dout, q, out, lse, s);
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()),
          at::empty(v.sizes(), v.options())};
}
}  // namespace

TORCH_LIBRARY_IMPL(vljepa_fast, Meta, m) {
  m.impl("topk_similarity", &topk_similarity_meta);
  m.impl("infonce_fwd", &infonce_fwd_meta);
  m.impl("infonce_bwd", &infonce_bwd_meta);
  m.impl("flash_attention_fwd", &flash_attention_fwd_meta);
  m.impl("flash_attention_bwd", &flash_attention_bwd_meta);
}
