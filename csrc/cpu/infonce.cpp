// Fused InfoNCE terms on CPU: the row and column log-sum-exp of S = scale * norm(a) @ norm(b)^T
// and their gradients, without ever materialising the [N, M] logits (forward or backward).
//
// Contract (csrc/ops.cpp, vljepa_fast/reference.py::infonce_terms): the positive of row i is
// column i + offset; the positive of column j is row clamp(j - offset, 0, N - 1). The backward
// differentiates loss = sum_i g_row[i] (row_lse[i] - pos_row[i]) + sum_j g_col[j] (col_lse[j] -
// pos_col[j]), whose logit gradient is
//   dS = g_row (softmax_row(S) - onehot_row) + g_col (softmax_col(S) - onehot_col).
//
// Memory idea: a is cut into blocks of C rows, and a reused [C, M] fp32 buffer (C * M * 4 <=
// kBlockBytes, so it stays in L3) holds G = Â_blk @ b^T for one block at a time. Forward: row
// LSEs of the block are exact (its rows are complete), and every column keeps a running (max,
// sum-exp) updated block after block. Backward: G is recomputed and turned into dS in place from
// the saved LSEs, then two more GEMMs of the same size give dÂ_blk = dS_blk @ B̂ and dB̂ +=
// dS_blk^T @ Â_blk. Extra memory is the buffer, one [C, D] block of normalised a and O(N + M)
// vectors: about 9 MB at N = M = 16384, D = 1536 (4.4% of the fp32 inputs), against 1 GB per
// [N, N] matrix in eager; fp16/bf16 inputs add an fp32 copy of b and, in the backward, an fp32
// accumulator for db.
//
// Threads: the columns (rows of b) are cut into fixed slices, a few per thread, that threads pull
// from a shared counter. A slice runs single-threaded MKL GEMMs on its part of the block: G[:,
// cols] = Â_blk @ b[cols]^T, then the epilogue while that part is warm, then (backward) dB'[cols]
// += dS'[:, cols]^T @ Â_blk, its own rows of the accumulator. Only dÂ_blk = dS'_blk @ b, which
// needs every column, runs after a barrier, in feature-column parts pulled the same way. On a
// shared machine this beats one multi-threaded GEMM: a thread that loses its core takes fewer
// items instead of stalling a barrier inside every GEMM. Row statistics are merged from
// per-slice partials in slice order, column statistics and dB' rows belong to one slice each,
// and every sum runs in a fixed order: results are deterministic for a given thread count (which
// fixes the slices), without atomics on data.
//
// Normalisation is folded in: Â_blk = a_blk / max(||a_i||, eps) is built per block, while b is
// never normalised in memory: its inverse norms scale G's columns in the epilogue (S = scale *
// G * inv_b), and the backward stores dS' = dS * inv_b, so that dÂ = scale * dS' @ b and
// dB' = scale * dS'^T @ Â equals inv_b * dB̂, which turns the normalisation backward of b
// (dB̂ - B̂ (B̂ . dB̂)) / ||b|| into dB' - b (b . dB') / ||b||^2. dscale = sum(dS * S) / scale
// is accumulated as sum(dS' * G), without the division. Rows whose norm is below eps (zero
// rows) keep their eps-clamped values in S but get a zero gradient (reference.normalize_rows).
//
// Huge logits (|S| up to 1e4 and beyond) are safe: every exponent is relative to a maximum or an
// LSE, so exp never sees a positive argument above rounding. The LSEs leave the forward in
// float64 (max + log(sum) rounded once to double) and the backward splits them into float hi +
// lo (struct Lse), so that exp(S - lse) keeps float accuracy where a float LSE would be off by
// half an ulp of |S| (5e-4 at 1e4) and bias every probability of its row by that factor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "infonce_check.h"
#include "vljepa_common.h"

namespace vljepa_fast {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// The [C, M] fp32 block: small enough for L3 and for the 10%-of-inputs memory budget at N = 16k.
constexpr int64_t kBlockBytes = int64_t{8} << 20;
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 512;
// Independent accumulators per reduction (four SSE or two AVX vectors): they let the compiler
// vectorise max/sum reductions without -ffast-math, in a summation order fixed by the code.
constexpr int64_t kLanes = 16;
// Float lane sums are flushed into a double every kFlush columns to bound rounding growth.
constexpr int64_t kFlush = 256;
// Columns per column-statistics step: a [C, kStrip] strip stays in L2 between its two passes.
constexpr int64_t kStrip = 64;
// Column slices start on multiples of 16 floats (64-byte cache lines): no false sharing.
constexpr int64_t kSliceAlign = 16;
// Work items (column slices, feature-column parts) per thread, pulled from a shared counter: a
// thread slowed down by another process takes fewer of them instead of holding up the barrier.
constexpr int64_t kItemsPerThread = 4;
// Columns per slice at least (up to the 16-column alignment): keeps the slice GEMMs efficient.
constexpr int64_t kMinSliceCols = 64;

// exp(x) in fp32 for x <= 88 (Cephes expf: range reduction by ln 2 in two parts, degree-6
// polynomial, about 1 ulp). Written without float compares, which -ftrapping-math (the default)
// keeps from being if-converted: the exponent is clamped as an integer, and results below the
// normal range (x < -87.3, where the true value is under 1.2e-38) are flushed to +0 by a bit
// mask, so loops over it vectorise. -inf gives 0, NaN stays NaN.
inline float fast_exp(float x) {
  // Round to nearest through the fp32 mantissa (exact for |t| < 2^22).
  const float kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t x_bits;
  std::memcpy(&x_bits, &x, sizeof(x));
  int32_t k = static_cast<int32_t>(kf);
  const int32_t keep =
      -static_cast<int32_t>((k >= -126) | ((x_bits & 0x7fffffff) > 0x7f800000));
  k = k < -126 ? -126 : k;
  k = k > 128 ? 128 : k;
  const int32_t two_k_bits = (k + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &two_k_bits, sizeof(two_k));
  const float y = p * two_k;
  int32_t y_bits;
  std::memcpy(&y_bits, &y, sizeof(y));
  y_bits &= keep;
  float out;
  std::memcpy(&out, &y_bits, sizeof(out));
  return out;
}

inline float lane_max(const float* lanes) {
  float m = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) {
    m = lanes[l] > m ? lanes[l] : m;
  }
  return m;
}

inline double lane_sum(const float* lanes) {
  double s = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) {
    s += lanes[l];
  }
  return s;
}

// sum of term(j) over j in [j0, j1): kLanes float accumulators per run of kFlush columns, each run
// flushed into a double. The order is fixed by the code, and the lanes let the loop vectorise.
template <typename Term>
inline double flushed_sum(int64_t j0, int64_t j1, const Term& term) {
  double total = 0.0;
  for (int64_t c0 = j0; c0 < j1; c0 += kFlush) {
    const int64_t c1 = std::min(j1, c0 + kFlush);
    float acc[kLanes] = {};
    int64_t j = c0;
    for (; j + kLanes <= c1; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        acc[l] += term(j + l);
      }
    }
    for (; j < c1; ++j) {
      acc[0] += term(j);
    }
    total += lane_sum(acc);
  }
  return total;
}

// inv[r] = 1 / max(||x_r||, eps) for rows [begin, end) of a [rows, dim] fp32 matrix (squares
// summed in double).
void inverse_norms_range(const float* x, int64_t dim, float* inv, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * dim;
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
      for (int64_t l = 0; l < 8; ++l) {
        acc[l] += static_cast<double>(xr[d + l]) * xr[d + l];
      }
    }
    for (; d < dim; ++d) {
      acc[0] += static_cast<double>(xr[d]) * xr[d];
    }
    double sq = 0.0;
    for (double v : acc) {
      sq += v;
    }
    inv[r] = 1.0f / std::max(static_cast<float>(std::sqrt(sq)), kNormEps);
  }
}

int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, 16384 / dim); }

// Everything both passes need about b and the blocking, computed once per call.
struct Plan {
  int64_t n, m, dim, offset, block_rows;
  float scale;
  bool normalize;
  at::Tensor b32;               // [M, D] fp32: b itself, or an fp32 copy of fp16/bf16 b
  std::vector<float> inv_b;     // [M] 1 / max(||b_j||, eps), ones without normalize
  std::vector<float> col_mul;   // [M] scale * inv_b: turns a row of G into a row of S
  std::vector<int64_t> slices;  // [P + 1] column slice bounds, one slice per thread
  at::Tensor block;             // [C, M] fp32 buffer for G, S or dS'
  at::Tensor a_hat;             // [C, D] fp32 buffer for Â_blk (when a is not usable as is)
  std::vector<float> inv_a;     // [C] inverse norms of the current block's rows

  int64_t num_slices() const { return static_cast<int64_t>(slices.size()) - 1; }
};

Plan make_plan(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
               bool normalize) {
  check_infonce_devices(a, b, scale, at::kCPU);
  check_infonce_inputs(a, b, scale, offset);
  Plan p;
  p.n = a.size(0);
  p.m = b.size(0);
  p.dim = a.size(1);
  p.offset = offset;
  p.normalize = normalize;
  p.scale = scale.item<float>();
  TORCH_CHECK(std::isfinite(p.scale), "scale must be finite, got ", p.scale);

  p.b32 = b.scalar_type() == at::kFloat ? b : b.to(at::kFloat);
  p.inv_b.assign(p.m, 1.0f);
  if (normalize) {
    const float* x = p.b32.data_ptr<float>();
    at::parallel_for(0, p.m, row_grain(p.dim), [&](int64_t begin, int64_t end) {
      inverse_norms_range(x, p.dim, p.inv_b.data(), begin, end);
    });
  }
  p.col_mul.resize(p.m);
  for (int64_t j = 0; j < p.m; ++j) {
    p.col_mul[j] = p.scale * p.inv_b[j];
  }
  const int64_t num_slices = std::clamp<int64_t>(at::get_num_threads() * kItemsPerThread, 1,
                                                  std::max<int64_t>(1, p.m / kMinSliceCols));
  p.slices.resize(num_slices + 1);
  for (int64_t t = 0; t < num_slices; ++t) {
    p.slices[t] = t * p.m / num_slices / kSliceAlign * kSliceAlign;
  }
  p.slices[num_slices] = p.m;
  // Equal blocks (300 rows -> 150 + 150) keep every GEMM the same, efficient shape.
  const int64_t target = std::clamp(kBlockBytes / (4 * p.m), kMinBlockRows, kMaxBlockRows);
  const int64_t num_blocks = (p.n + target - 1) / target;
  p.block_rows = (p.n + num_blocks - 1) / num_blocks;
  p.block = at::empty({p.block_rows, p.m}, at::kFloat);
  if (normalize || a.scalar_type() != at::kFloat) {
    p.a_hat = at::empty({p.block_rows, p.dim}, at::kFloat);
  }
  p.inv_a.assign(p.block_rows, 1.0f);
  return p;
}

// Rows [r0, r0 + rows) of a as fp32, normalised when asked (inverse norms into p.inv_a); a view
// of a itself when that is already the answer.
at::Tensor a_block(const at::Tensor& a, int64_t r0, int64_t rows, Plan& p) {
  at::Tensor src = a.narrow(0, r0, rows);
  if (!p.a_hat.defined()) {
    return src;
  }
  at::Tensor dst = p.a_hat.narrow(0, 0, rows);
  if (a.scalar_type() != at::kFloat) {
    dst.copy_(src);
    src = dst;
  }
  if (!p.normalize) {
    return dst;
  }
  const float* x = src.data_ptr<float>();
  float* y = dst.data_ptr<float>();
  float* inv = p.inv_a.data();
  const int64_t dim = p.dim;
  at::parallel_for(0, rows, row_grain(dim), [&](int64_t begin, int64_t end) {
    inverse_norms_range(x, dim, inv, begin, end);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t d = 0; d < dim; ++d) {
        y[r * dim + d] = x[r * dim + d] * inv[r];
      }
    }
  });
  return dst;
}

// Runs fn(item) for item in [0, num_items) on all threads, each pulling the next item from a
// shared counter. Items own disjoint outputs, so which thread runs one does not change a result.
template <typename Fn>
void for_each_item(int64_t num_items, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t item = next.fetch_add(1); item < num_items; item = next.fetch_add(1)) {
      fn(item);
    }
  });
}

// Runs fn(slice, j0, j1) for every column slice.
template <typename Fn>
void for_each_slice(const Plan& p, const Fn& fn) {
  for_each_item(p.num_slices(), [&](int64_t t) { fn(t, p.slices[t], p.slices[t + 1]); });
}

// G[:, j0:j1) = Â_blk @ b[j0:j1)^T into the block buffer: one single-threaded GEMM per slice.
at::Tensor slice_gemm(const Plan& p, const at::Tensor& a_hat, int64_t rows, int64_t j0,
                      int64_t j1) {
  at::Tensor g = p.block.narrow(0, 0, rows).narrow(1, j0, j1 - j0);  // [rows, w], row stride M
  at::mm_out(g, a_hat, p.b32.narrow(0, j0, j1 - j0).t());
  return g;
}

// Forward epilogue of one slice: G -> S in place, each row's (max, sum-exp) over the slice into
// part_max / part_sum, and the positive logits that fall in the slice.
void row_stats_slice(float* s, int64_t first_row, int64_t rows, int64_t j0, int64_t j1,
                     const Plan& p, float* part_max, double* part_sum, float* pos_row) {
  const int64_t m = p.m;
  const float* col_mul = p.col_mul.data();
  for (int64_t i = 0; i < rows; ++i) {
    float* si = s + i * m;
    float mx[kLanes];
    std::fill(mx, mx + kLanes, kNegInf);
    int64_t j = j0;
    for (; j + kLanes <= j1; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const float v = si[j + l] * col_mul[j + l];
        si[j + l] = v;
        mx[l] = v > mx[l] ? v : mx[l];
      }
    }
    for (; j < j1; ++j) {
      si[j] *= col_mul[j];
      mx[0] = si[j] > mx[0] ? si[j] : mx[0];
    }
    const float row_max = lane_max(mx);
    part_max[i] = row_max;
    part_sum[i] = flushed_sum(j0, j1, [&](int64_t jj) { return fast_exp(si[jj] - row_max); });
    const int64_t pos = first_row + i + p.offset;
    if (pos >= j0 && pos < j1) {
      pos_row[first_row + i] = si[pos];
    }
  }
}

// Folds the rows of the block's S[:, j0:j1) into every column's running (max, sum-exp) and picks
// up the positives of the columns whose positive row lies in the block.
void col_stats_slice(const float* s, int64_t first_row, int64_t rows, int64_t j0, int64_t j1,
                     const Plan& p, float* col_max, double* col_sum, float* pos_col) {
  const int64_t m = p.m;
  for (int64_t c0 = j0; c0 < j1; c0 += kStrip) {
    const int64_t w = std::min(kStrip, j1 - c0);
    float new_max[kStrip];
    float acc[kStrip] = {};
    std::copy(col_max + c0, col_max + c0 + w, new_max);
    for (int64_t i = 0; i < rows; ++i) {
      const float* si = s + i * m + c0;
      for (int64_t l = 0; l < w; ++l) {
        new_max[l] = si[l] > new_max[l] ? si[l] : new_max[l];
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      const float* si = s + i * m + c0;
      for (int64_t l = 0; l < w; ++l) {
        acc[l] += fast_exp(si[l] - new_max[l]);
      }
    }
    for (int64_t l = 0; l < w; ++l) {
      const int64_t j = c0 + l;
      col_sum[j] = col_sum[j] * std::exp(static_cast<double>(col_max[j]) - new_max[l]) + acc[l];
      col_max[j] = new_max[l];
      const int64_t r = std::clamp<int64_t>(j - p.offset, 0, p.n - 1) - first_row;
      if (r >= 0 && r < rows) {
        pos_col[j] = s[r * m + j];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, bool col_stats, int64_t chunk) {
  check_infonce_chunk(chunk);  // the CPU kernels tile for the cache: chunk is not used
  Plan p = make_plan(a, b, scale, offset, normalize);
  const int64_t mc = col_stats ? p.m : 0;
  at::Tensor row_lse = at::empty({p.n}, at::kDouble);
  at::Tensor pos_row = at::empty({p.n}, at::kFloat);
  at::Tensor col_lse = at::empty({mc}, at::kDouble);
  at::Tensor pos_col = at::empty({mc}, at::kFloat);
  std::vector<float> col_max(mc, kNegInf);
  std::vector<double> col_sum(mc, 0.0);
  const int64_t num_slices = p.num_slices();
  std::vector<float> part_max(num_slices * p.block_rows);  // [P, C]
  std::vector<double> part_sum(num_slices * p.block_rows);
  double* row_lse_ptr = row_lse.data_ptr<double>();
  float* pos_row_ptr = pos_row.data_ptr<float>();
  float* pos_col_ptr = pos_col.data_ptr<float>();
  float* s = p.block.data_ptr<float>();

  for (int64_t r0 = 0; r0 < p.n; r0 += p.block_rows) {
    const int64_t rows = std::min(p.block_rows, p.n - r0);
    const at::Tensor a_hat = a_block(a, r0, rows, p);
    for_each_slice(p, [&](int64_t t, int64_t j0, int64_t j1) {
      slice_gemm(p, a_hat, rows, j0, j1);
      row_stats_slice(s, r0, rows, j0, j1, p, part_max.data() + t * p.block_rows,
                      part_sum.data() + t * p.block_rows, pos_row_ptr);
      if (col_stats) {
        col_stats_slice(s, r0, rows, j0, j1, p, col_max.data(), col_sum.data(), pos_col_ptr);
      }
    });
    // Slices merged in slice order: deterministic.
    for (int64_t i = 0; i < rows; ++i) {
      float mx = kNegInf;
      for (int64_t t = 0; t < num_slices; ++t) {
        mx = std::max(mx, part_max[t * p.block_rows + i]);
      }
      double total = 0.0;
      for (int64_t t = 0; t < num_slices; ++t) {
        total += part_sum[t * p.block_rows + i] *
                 std::exp(static_cast<double>(part_max[t * p.block_rows + i]) - mx);
      }
      row_lse_ptr[r0 + i] = mx + std::log(total);
    }
  }
  double* col_lse_ptr = col_lse.data_ptr<double>();
  for (int64_t j = 0; j < mc; ++j) {
    col_lse_ptr[j] = col_max[j] + std::log(col_sum[j]);
  }
  return {row_lse, col_lse, pos_row, pos_col};
}

// The per-row constants of the logit gradient: the row LSE as hi + lo (see Lse).
struct RowGrad {
  float hi, lo, weight;
};

// LSEs [len] (float64 from the forward) split as hi + lo with hi = float(lse): exp(s - lse) is
// formed as exp((s - hi) - lo). s - hi is exact near the maximum (Sterbenz), so the probability
// keeps float accuracy at |S| ~ 1e4, where float(lse) alone is off by up to half an ulp (5e-4).
struct Lse {
  std::vector<float> hi, lo;
  explicit Lse(const at::Tensor& lse) : hi(lse.size(0)), lo(lse.size(0)) {
    const double* x = lse.data_ptr<double>();
    for (int64_t i = 0; i < lse.size(0); ++i) {
      hi[i] = static_cast<float>(x[i]);
      lo[i] = static_cast<float>(x[i] - hi[i]);
    }
  }
};

// Columns [j0, j1) of one row: G -> dS' = dS * inv_b in place, with constant one-hot values
// (d_row for the row softmax, d_col for the column softmax) over the range. Returns sum(dS' * G).
template <bool kCol>
double grad_segment(float* gi, int64_t j0, int64_t j1, const Plan& p, RowGrad row, float d_row,
                    float d_col, const float* col_hi, const float* col_lo, const float* g_col) {
  const float* col_mul = p.col_mul.data();
  const float* inv_b = p.inv_b.data();
  const auto one = [&](int64_t j) {
    const float g = gi[j];
    const float s = g * col_mul[j];
    float e = row.weight * (fast_exp((s - row.hi) - row.lo) - d_row);
    if (kCol) {
      e += g_col[j] * (fast_exp((s - col_hi[j]) - col_lo[j]) - d_col);
    }
    e *= inv_b[j];
    gi[j] = e;
    return e * g;
  };
  return flushed_sum(j0, j1, one);
}

// Backward epilogue of one slice: G[:, j0:j1) -> dS' in place; returns sum(dS' * G) over it.
template <bool kCol>
double grad_slice(float* g, int64_t first_row, int64_t rows, int64_t j0, int64_t j1,
                  const Plan& p, const Lse& row_lse, const float* g_row, const Lse* col_lse,
                  const float* g_col) {
  const float* col_hi = kCol ? col_lse->hi.data() : nullptr;
  const float* col_lo = kCol ? col_lse->lo.data() : nullptr;
  const auto clip = [&](int64_t j) { return std::clamp(j, j0, j1); };
  double total = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t gr = first_row + i;
    const RowGrad row{row_lse.hi[gr], row_lse.lo[gr], g_row[gr]};
    float* gi = g + i * p.m;
    // Row gr is the positive of column gr + offset in both directions; the clamp in the column
    // contract also makes row 0 the positive of columns [0, offset) and row N - 1 that of
    // columns (N - 1 + offset, M).
    const int64_t pos = gr + p.offset;
    const int64_t lo = kCol && gr == 0 ? 0 : pos;
    const int64_t hi = kCol && gr == p.n - 1 ? p.m : pos + 1;
    const auto segment = [&](int64_t s0, int64_t s1, float d_row, float d_col) {
      return grad_segment<kCol>(gi, s0, s1, p, row, d_row, d_col, col_hi, col_lo, g_col);
    };
    total += segment(j0, clip(lo), 0.0f, 0.0f);
    total += segment(clip(lo), clip(pos), 0.0f, 1.0f);
    total += segment(clip(pos), clip(pos + 1), 1.0f, 1.0f);
    total += segment(clip(pos + 1), clip(hi), 0.0f, 1.0f);
    total += segment(clip(hi), j1, 0.0f, 0.0f);
  }
  return total;
}

// Rows [begin, end) in place: grad_r <- factor_r * (grad_r - x_r (x_r . grad_r) / ||x_r||^2),
// the backward of y = x / max(||x||, eps) (projection off the direction of x) times the chain
// factor. Dot products, the squared norm and the projection run in double, so that the
// component along x cancels to double precision (at D = 1 the whole gradient is that
// component). Without normalize every row only gets the factor. Rows whose norm was clamped
// (norm < eps, i.e. inv_norm[r] >= 1 / eps) get a zero gradient: the zero-row rule of
// reference.normalize_rows (a zero row has no direction, and the 1 / eps slope of the clamp
// would reach 1e12 and overflow fp16).
void normalize_backward(float* grad, const float* x, const float* inv_norm, const float* factor,
                        float scalar_factor, int64_t dim, bool normalize, int64_t begin,
                        int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float* gr = grad + r * dim;
    const float f = scalar_factor * (factor != nullptr ? factor[r] : 1.0f);
    if (normalize && inv_norm[r] >= kInvNormEps) {
      std::fill(gr, gr + dim, 0.0f);
      continue;
    }
    if (!normalize) {
      for (int64_t d = 0; d < dim; ++d) {
        gr[d] *= f;
      }
      continue;
    }
    const float* xr = x + r * dim;
    double dot[4] = {0, 0, 0, 0};
    double sq[4] = {0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 4 <= dim; d += 4) {
      for (int64_t l = 0; l < 4; ++l) {
        dot[l] += static_cast<double>(xr[d + l]) * gr[d + l];
        sq[l] += static_cast<double>(xr[d + l]) * xr[d + l];
      }
    }
    for (; d < dim; ++d) {
      dot[0] += static_cast<double>(xr[d]) * gr[d];
      sq[0] += static_cast<double>(xr[d]) * xr[d];
    }
    const double coef = (dot[0] + dot[1] + dot[2] + dot[3]) / (sq[0] + sq[1] + sq[2] + sq[3]);
    for (int64_t e = 0; e < dim; ++e) {
      gr[e] = static_cast<float>(f * (gr[e] - xr[e] * coef));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, const at::Tensor& row_lse, const std::optional<at::Tensor>& col_lse,
    const at::Tensor& g_row, const std::optional<at::Tensor>& g_col, int64_t chunk) {
  check_infonce_chunk(chunk);  // the CPU kernels tile for the cache: chunk is not used
  Plan p = make_plan(a, b, scale, offset, normalize);
  const bool with_col = check_infonce_bwd_vectors(a, b, row_lse, col_lse, g_row, g_col);
  check_infonce_bwd_devices(a, row_lse, col_lse, g_row, g_col, with_col);
  const auto vec = [](const at::Tensor& t, at::ScalarType as) { return t.to(as).contiguous(); };
  const Lse row_lse_split(vec(row_lse, at::kDouble));
  const at::Tensor g_row32 = vec(g_row, at::kFloat);
  const std::optional<Lse> col_lse_split =
      with_col ? std::optional<Lse>(std::in_place, vec(*col_lse, at::kDouble))
               : std::nullopt;
  const at::Tensor g_col32 = with_col ? vec(*g_col, at::kFloat) : at::Tensor();
  const float* g_row_ptr = g_row32.data_ptr<float>();
  const Lse* col_lse_ptr = with_col ? &*col_lse_split : nullptr;
  const float* g_col_ptr = with_col ? g_col32.data_ptr<float>() : nullptr;

  at::Tensor da = at::empty_like(a);
  at::Tensor db = at::empty_like(b);
  const bool f32 = a.scalar_type() == at::kFloat;
  // dÂ and dB' in fp32: in da and db themselves for fp32 inputs.
  at::Tensor da_acc = f32 ? da : at::empty({p.block_rows, p.dim}, at::kFloat);
  at::Tensor db_acc = f32 ? db : at::empty({p.m, p.dim}, at::kFloat);
  std::vector<double> dscale_part(p.num_slices(), 0.0);
  float* g_ptr = p.block.data_ptr<float>();
  const int64_t dim_parts = std::clamp<int64_t>(at::get_num_threads() * kItemsPerThread, 1,
                                                 std::max<int64_t>(1, p.dim / kMinSliceCols));

  for (int64_t r0 = 0; r0 < p.n; r0 += p.block_rows) {
    const int64_t rows = std::min(p.block_rows, p.n - r0);
    const at::Tensor a_hat = a_block(a, r0, rows, p);  // [rows, D]
    for_each_slice(p, [&](int64_t t, int64_t j0, int64_t j1) {
      const at::Tensor g = slice_gemm(p, a_hat, rows, j0, j1);
      dscale_part[t] += with_col ? grad_slice<true>(g_ptr, r0, rows, j0, j1, p, row_lse_split,
                                                    g_row_ptr, col_lse_ptr, g_col_ptr)
                                 : grad_slice<false>(g_ptr, r0, rows, j0, j1, p, row_lse_split,
                                                     g_row_ptr, nullptr, nullptr);
      // This slice's rows of dB' [w, D], blocks added in order.
      at::Tensor db_rows = db_acc.narrow(0, j0, j1 - j0);
      if (r0 == 0) {
        at::mm_out(db_rows, g.t(), a_hat);
      } else {
        db_rows.addmm_(g.t(), a_hat);
      }
    });
    // dÂ_blk / scale = dS'_blk @ b needs every column: after the slices, split by feature
    // columns, so that each item packs the [C, M] dS' block (smaller than b) and its part of b.
    at::Tensor da_blk = da_acc.narrow(0, f32 ? r0 : 0, rows);  // [rows, D]
    const at::Tensor ds_blk = p.block.narrow(0, 0, rows);      // [rows, M]
    for_each_item(dim_parts, [&](int64_t t) {
      const int64_t d0 = t * p.dim / dim_parts / kSliceAlign * kSliceAlign;
      const int64_t d1 =
          t + 1 == dim_parts ? p.dim : (t + 1) * p.dim / dim_parts / kSliceAlign * kSliceAlign;
      at::Tensor out = da_blk.narrow(1, d0, d1 - d0);  // [rows, d1 - d0], row stride D
      at::mm_out(out, ds_blk, p.b32.narrow(1, d0, d1 - d0));
    });
    float* da_ptr = da_blk.data_ptr<float>();
    const float* a_hat_ptr = a_hat.data_ptr<float>();
    at::parallel_for(0, rows, row_grain(p.dim), [&](int64_t begin, int64_t end) {
      normalize_backward(da_ptr, a_hat_ptr, p.inv_a.data(), p.inv_a.data(), p.scale, p.dim,
                         normalize, begin, end);
    });
    if (!f32) {
      da.narrow(0, r0, rows).copy_(da_blk);
    }
  }
  // dB' -> db: the factor inv_b was already applied through dS'.
  const float* b_ptr = p.b32.data_ptr<float>();
  float* db_ptr = db_acc.data_ptr<float>();
  at::parallel_for(0, p.m, row_grain(p.dim), [&](int64_t begin, int64_t end) {
    normalize_backward(db_ptr, b_ptr, p.inv_b.data(), nullptr, p.scale, p.dim, normalize, begin,
                       end);
  });
  if (!f32) {
    db.copy_(db_acc);
  }
  double dscale = 0.0;
  for (double v : dscale_part) {
    dscale += v;
  }
  at::Tensor dscale_t = at::empty({}, at::kFloat);
  dscale_t.fill_(dscale);
  return {da, db, dscale_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(vljepa_fast, CPU, m) {
  m.impl("infonce_fwd", &infonce_fwd_cpu);
  m.impl("infonce_bwd", &infonce_bwd_cpu);
}

}  // namespace vljepa_fast
