// InfoNCE terms on CUDA, chunked: the row and column log-sum-exp of S = scale * norm(a) @
// norm(b)^T and their gradients. The O(N M D) products are vendor GEMMs (cuBLAS through ATen's
// at::mm_out / at::addmm_out, issued from C++ on the current stream); our kernels do everything
// around them (epilogues, merges, the normalisation backward). The [N, M] logits never exist: at
// most `chunk` rows of them do, in a reused [chunk, M] fp32 buffer.
//
// Contract (csrc/ops.cpp, vljepa_fast/reference.py::infonce_terms, csrc/cpu/infonce.cpp): the
// positive of row i is column i + offset; the positive of column j is row clamp(j - offset, 0,
// N - 1). The backward differentiates loss = sum_i g_row[i] (row_lse[i] - pos_row[i]) +
// sum_j g_col[j] (col_lse[j] - pos_col[j]), whose logit gradient is
//   dS = g_row (softmax_row(S) - onehot_row) + g_col (softmax_col(S) - onehot_col).
//
// Notation: raw = A B^T, ia_i = 1 / max(||A_i||, eps), ib_j likewise (ones without normalize),
// cos_ij = raw_ij * (ia_i * ib_j), S_ij = scale * cos_ij (one expression, `logit`, everywhere, so
// every kernel that forms S from the same raw gets the same bits). Â = diag(ia) A.
//
// Chunks. Rows of A are cut into chunks of c = `chunk` rows (the last one ragged; 0 = the default
// of vljepa_fast/ops/_chunks.py without its 10% term: 1 GiB / (M * bytes per pair), bytes per
// pair 4 forward and 4 + the input's element size backward, rounded down to a multiple of 64; the
// Python layer passes the real value). Chunks run in row order on one
// stream; every reduction over chunks happens in that order, every reduction inside a chunk in a
// fixed order (no atomics): repeats are bit-identical.
//
// Forward, per chunk A_c = rows [i0, i0 + c):
//  1. raw_c = A_c B^T: GEMM in the input dtype, fp32 output (fp16/bf16: mm.dtype_out, fp32
//     accumulate; fp32: sgemm, TF32 only if the user enabled it for torch.mm) into the [c, M]
//     buffer.
//  2. infonce_fwd_epilogue_kernel reads that block once. Block (split x, row block y) owns 64 rows
//     x 1024 columns; each warp 8 rows, each lane 4 consecutive columns of a 128-column strip
//     (one float4 load per row). Per row: (max, sum-exp) over the block's columns (warp
//     butterflies), written as a row partial [splits, c]. Per column: (max, sum-exp) over the
//     block's 64 rows (registers, then the 8 warps merged in warp order through shared memory),
//     written as a column partial [row blocks, M]. Two exponentials per logit.
//  3. infonce_fwd_merge_kernel: one thread per row of the chunk merges its splits in split order
//     (float64) into row_lse = max + log(sum), rounded once to double, and reads pos_row; one
//     thread per column merges the chunk's row blocks in order into the running column stats
//     (float max, float64 sum: chunk order), reads pos_col where its positive row lies in the
//     chunk, and after the last chunk writes col_lse.
// Backward, with 2^k = infonce_pow2_kernel's power of two (below), per chunk:
//  1. raw_c again (the same GEMM).
//  2. infonce_bwd_epilogue_kernel (same tiling) turns raw_c into dS (from the float64 LSEs split
//     into float hi + lo: exp((S - hi) - lo), exact near the maximum) and writes
//     H_ij = dS_ij * (2^k * scale * ib_j) in the GEMM dtype (fp32 inputs: in place over raw_c),
//     and sums dS_ij * cos_ij (float per lane and row, float64 per thread, a fixed tree per
//     block; infonce_sum_kernel adds the block partials in order to a float64 running dscale).
//  3. G_c = H_c B (GEMM, fp32 out; fp32 inputs write it into da's rows). G_i = 2^k dL/dÂ_i.
//  4. infonce_finalize_kernel: dA_i = ia_i 2^-k (G_i - A_i (A_i . G_i) / ||A_i||^2), the
//     projection in float64 from G itself (so dA is orthogonal to A to double precision, whatever
//     the GEMM rounding), 0 for rows whose norm was clamped (norm < eps: the zero-row rule of
//     reference.normalize_rows); without normalize dA_i = 2^-k G_i. Written in a's dtype.
//  5. E += H_c^T Â_c (GEMM, fp32 accumulate in cuBLAS, beta = 0 for the first chunk; Â_c = A_c
//     scaled by ia in the GEMM dtype by infonce_scale_rows_kernel, A_c itself without normalize).
//     E_j = 2^k ib_j dL/dB̂_j.
// After the last chunk: dB_j = 2^-k (E_j - B_j (B_j . E_j) / ||B_j||^2) (the ib_j in H cancels
// the one of the normalisation backward), 0 for clamped rows; 2^-k E_j without normalize; dscale
// = sum_ij dS_ij cos_ij.
//
// The power of two. |dS| <= |g_row| + |g_col|, so with bound = scale * (max |g_row| + max |g_col|)
// * max ib_j (rows whose norm was not clamped), 2^k = 2^(12 - ceil(log2 bound)) keeps |H| <=
// 2^12: no fp16 overflow (65504), and the small probabilities of a large batch (g ~ 1/N, p ~ 1/M)
// stay fp16 normals. Multiplying and dividing by it is exact. fp16 rows whose norm is below eps
// are exactly zero (fp16 has no magnitude below 6e-8), so their H columns are 0 (exact, and no
// 1/eps overflow); bf16 and fp32 keep them (their range holds ib = 1e12).
//
// Cost at the paper shape, N = M = 32768, D = 1536, bf16, with the chunk the public op passes to
// both passes (vljepa_fast/ops/infonce.py: the 1 GiB rule at 6 bytes per pair, 5440 rows, 7
// chunks, the last of 128 rows; chunk = 0 would give the forward 8192 rows, 4 chunks):
//  - FLOPs: forward 2NMD = 3.30 TFLOP (4.2 ms at 790 TFLOP/s); backward 3 x 2NMD = 9.90 TFLOP
//    (12.5 ms); total 8 N M D = 13.2 TFLOP, 16.7 ms. Epilogue arithmetic: 2 exponentials per logit
//    and pass (2.1e9 per pass), about 0.5 ms of MUFU throughput, under its memory time.
//  - HBM bytes, forward: S written by the GEMM and read by the epilogue, 4NM + 4NM = 8.6 GB; B
//    re-read per chunk 0.7 GB; column partials 0.3 GB; A, vectors 0.1 GB: 9.7 GB, 2.3 ms at 4.3
//    TB/s. Only the epilogue's read (4.3 GB, 1.0 ms) is outside a compute-bound GEMM.
//  - HBM bytes, backward: S write + read 8.6 GB, H write 2.1 GB and two GEMM reads 4.3 GB; E read
//    and written by each chunk's dB GEMM (cuBLAS beta = 1; the first chunk only writes) 2.6 GB; B
//    re-read by two GEMMs per chunk 1.4 GB; G, Â, A, B, dA, dB 1.2 GB: 20.3 GB, 4.7 ms, of which
//    the epilogue's 6.4 GB (1.5 ms) and the finalize passes (~0.2 ms) are outside the GEMMs.
//  - Implied H200 time: forward 4.2 + 1.0 = 5.2 ms, backward 12.5 + 1.7 = 14.2 ms, fwd+bwd 19.4 ms
//    (680 TFLOP/s counting 8 N M D) when the GEMMs hide their own traffic; 16.7 + 7.0 = 23.7 ms if
//    no byte overlapped any FLOP (the bound of vljepa_fast/ops/_chunks.py).
//  - Extra memory at that shape: forward 680 MiB S + 23 MiB partials; backward 1020 MiB (S and H)
//    + 192 MiB E + 32 MiB G + 16 MiB Â.
// Extra memory: forward [c, M] fp32 S + [ceil(M / 1024), c] and [ceil(c / 64), M] (max, sum)
// float partials + [M] running column stats (12 B each) + [N], [M] fp32 inverse norms. Backward
// [c, M] fp32 S + [c, M] H in the GEMM dtype (fp32 inputs: none, H overwrites S) + [c, D] fp32 G
// (16-bit only) + [c, D] Â (normalize only) + E [M, D] fp32 (16-bit only; fp32 inputs accumulate
// in db) + LSE hi/lo and the converted g vectors (8 (N + M) B + 4 (N + M) B) + inverse norms.
//
// scale is read on the device (no host sync); the Python layer validates that it is finite.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "infonce_check.h"
#include "vljepa_common.h"
#include "vljepa_cuda.h"

namespace vljepa_fast {
namespace {

// Epilogue tiling: 256 threads = 8 warps; a warp owns 8 rows, a lane 4 consecutive columns (one
// 16-byte load per row) of a 128-column strip; a block 64 rows x 8 strips = 1024 columns. Two
// blocks per SM (at most 128 registers, no spills): one block's loads overlap the other's
// arithmetic.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kLaneCols = 4;
constexpr int kStripCols = 32 * kLaneCols;
constexpr int kStrips = 8;
constexpr int64_t kSplitCols = int64_t(kStrips) * kStripCols;
constexpr int kWarpRows = 8;
constexpr int64_t kBlockRows = int64_t(kWarps) * kWarpRows;
static_assert(kStripCols <= kThreads, "one merging thread per strip column");
// Default chunk budget (chunk = 0): the floor of vljepa_fast/ops/_chunks.py (1 GiB).
constexpr int64_t kDefaultBudgetBytes = int64_t(1) << 30;
constexpr int64_t kChunkMultiple = 64;
// |H| <= 2^kHTopExp (see the header).
constexpr int kHTopExp = 12;

__device__ __forceinline__ float logit(float raw, float ia, float ib, float scale) {
  return scale * (raw * (ia * ib));
}

// v[e] = p[j + e] for j + e < m (0 beyond). vec: m % 4 == 0 (16-byte aligned rows).
__device__ __forceinline__ void load_lane(const float* p, int64_t j, int64_t m, bool vec,
                                          float (&v)[kLaneCols]) {
  static_assert(kLaneCols == 4, "one float4 per lane and row");
  if (vec && j + kLaneCols <= m) {
    const float4 x = *reinterpret_cast<const float4*>(p + j);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  } else {
#pragma unroll
    for (int e = 0; e < kLaneCols; ++e) {
      v[e] = j + e < m ? p[j + e] : 0.0f;
    }
  }
}

__device__ __forceinline__ uint32_t bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// p[j + e] = v[e] in H for j + e < m. vec: m % 4 == 0 (rows 16-byte aligned for fp32, 8-byte
// for 16-bit H). 16-bit values are packed into words with shifts (no local array).
template <typename H>
__device__ __forceinline__ void store_lane(H* p, int64_t j, int64_t m, bool vec,
                                           const float (&v)[kLaneCols]) {
  if (vec && j + kLaneCols <= m) {
    if constexpr (std::is_same<H, float>::value) {
      *reinterpret_cast<float4*>(p + j) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      const uint32_t w0 = bits16(from_float<H>(v[0])) | (bits16(from_float<H>(v[1])) << 16);
      const uint32_t w1 = bits16(from_float<H>(v[2])) | (bits16(from_float<H>(v[3])) << 16);
      *reinterpret_cast<uint2*>(p + j) = make_uint2(w0, w1);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kLaneCols; ++e) {
      if (j + e < m) {
        p[j + e] = from_float<H>(v[e]);
      }
    }
  }
}

// Block (split, row block) = (blockIdx.x % splits, blockIdx.x / splits) of the chunk's [rows, m]
// raw block s (see the header). ia: the chunk's inverse norms (ia[0] is row i0). Row partials go
// to row_pm / row_pl [splits, rows], column partials (col_stats) to col_pm / col_pl
// [row blocks, m], both as (max, sum of exp(x - max)).
__global__ void __launch_bounds__(kThreads, 2)
    infonce_fwd_epilogue_kernel(const float* __restrict__ s, int64_t rows, int64_t m,
                                int64_t splits, const float* __restrict__ ia,
                                const float* __restrict__ ib, const float* __restrict__ scale_ptr,
                                bool vec, bool col_stats, float* __restrict__ row_pm,
                                float* __restrict__ row_pl, float* __restrict__ col_pm,
                                float* __restrict__ col_pl) {
  __shared__ float s_cm[kWarps][kStripCols];
  __shared__ float s_cl[kWarps][kStripCols];
  const int64_t split = int64_t(blockIdx.x) % splits;
  const int64_t rb = int64_t(blockIdx.x) / splits;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t r0 = rb * kBlockRows + warp * kWarpRows;
  const float scale = __ldg(scale_ptr);
  const float neg_inf = -CUDART_INF_F;

  float rm[kWarpRows];
  float rl[kWarpRows];
  float ia_r[kWarpRows];
#pragma unroll
  for (int k = 0; k < kWarpRows; ++k) {
    rm[k] = neg_inf;
    rl[k] = 0.0f;
    ia_r[k] = r0 + k < rows ? ia[r0 + k] : 0.0f;
  }

  for (int st = 0; st < kStrips; ++st) {
    const int64_t c0 = split * kSplitCols + int64_t(st) * kStripCols;
    if (c0 >= m) {  // block-uniform
      break;
    }
    const int64_t j = c0 + lane * kLaneCols;
    float ibv[kLaneCols];
#pragma unroll
    for (int e = 0; e < kLaneCols; ++e) {
      ibv[e] = j + e < m ? ib[j + e] : 0.0f;
    }
    // S of the warp's 8 rows x the lane's 4 columns; -inf outside the block.
    float v[kWarpRows][kLaneCols];
#pragma unroll
    for (int k = 0; k < kWarpRows; ++k) {
      if (r0 + k < rows) {
        load_lane(s + (r0 + k) * m, j, m, vec, v[k]);
#pragma unroll
        for (int e = 0; e < kLaneCols; ++e) {
          v[k][e] = j + e < m ? logit(v[k][e], ia_r[k], ibv[e], scale) : neg_inf;
        }
      } else {
#pragma unroll
        for (int e = 0; e < kLaneCols; ++e) {
          v[k][e] = neg_inf;
        }
      }
    }
    // Rows: column c0 (lane 0, e = 0) lies inside the matrix, so every max is finite.
#pragma unroll
    for (int k = 0; k < kWarpRows; ++k) {
      if (r0 + k < rows) {  // warp-uniform
        float mx = v[k][0];
#pragma unroll
        for (int e = 1; e < kLaneCols; ++e) {
          mx = fmaxf(mx, v[k][e]);
        }
        mx = warp_max(mx);
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < kLaneCols; ++e) {
          sum += expf(v[k][e] - mx);
        }
        sum = warp_sum(sum);
        const float nm = fmaxf(rm[k], mx);
        rl[k] = rl[k] * expf(rm[k] - nm) + sum * expf(mx - nm);
        rm[k] = nm;
      }
    }
    if (col_stats) {  // block-uniform
#pragma unroll
      for (int e = 0; e < kLaneCols; ++e) {
        float cm = v[0][e];
#pragma unroll
        for (int k = 1; k < kWarpRows; ++k) {
          cm = fmaxf(cm, v[k][e]);
        }
        float cl = 0.0f;
        if (cm != neg_inf) {
#pragma unroll
          for (int k = 0; k < kWarpRows; ++k) {
            cl += expf(v[k][e] - cm);
          }
        }
        s_cm[warp][lane * kLaneCols + e] = cm;
        s_cl[warp][lane * kLaneCols + e] = cl;
      }
      __syncthreads();
      const int64_t jc = c0 + threadIdx.x;
      if (int(threadIdx.x) < kStripCols && jc < m) {
        float cm = s_cm[0][threadIdx.x];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) {
          cm = fmaxf(cm, s_cm[w][threadIdx.x]);
        }
        // Row block rb has at least one row, so cm is finite; empty warps give (-inf, 0).
        float cl = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float pm = s_cm[w][threadIdx.x];
          if (pm != neg_inf) {
            cl += s_cl[w][threadIdx.x] * expf(pm - cm);
          }
        }
        col_pm[rb * m + jc] = cm;
        col_pl[rb * m + jc] = cl;
      }
      __syncthreads();  // s_cm / s_cl are reused by the next strip
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kWarpRows; ++k) {
      if (r0 + k < rows) {
        row_pm[split * rows + r0 + k] = rm[k];
        row_pl[split * rows + r0 + k] = rl[k];
      }
    }
  }
}

// One thread per row x < rows of the chunk (global row i0 + x), then (col_stats) one per column
// j = x - rows < m: see step 3 of the forward in the header. s: the chunk's raw block [rows, m];
// ia, ib: full inverse norms.
__global__ void __launch_bounds__(kThreads)
    infonce_fwd_merge_kernel(const float* __restrict__ s, int64_t rows, int64_t m, int64_t i0,
                             int64_t n, int64_t offset, const float* __restrict__ row_pm,
                             const float* __restrict__ row_pl, int64_t splits,
                             const float* __restrict__ col_pm, const float* __restrict__ col_pl,
                             int64_t row_blocks, const float* __restrict__ ia,
                             const float* __restrict__ ib, const float* __restrict__ scale_ptr,
                             bool col_stats, bool first, bool last, float* __restrict__ run_m,
                             double* __restrict__ run_l, double* __restrict__ row_lse,
                             float* __restrict__ pos_row, double* __restrict__ col_lse,
                             float* __restrict__ pos_col) {
  const int64_t x = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const float scale = __ldg(scale_ptr);
  if (x < rows) {
    float mx = row_pm[x];
    for (int64_t p = 1; p < splits; ++p) {
      mx = fmaxf(mx, row_pm[p * rows + x]);
    }
    double sum = 0.0;
    for (int64_t p = 0; p < splits; ++p) {
      sum += double(row_pl[p * rows + x]) * exp(double(row_pm[p * rows + x]) - double(mx));
    }
    const int64_t i = i0 + x;
    // One rounding, to double: see the LSE note in csrc/ops.cpp.
    row_lse[i] = double(mx) + log(sum);
    const int64_t jp = i + offset;
    pos_row[i] = logit(s[x * m + jp], ia[i], ib[jp], scale);
    return;
  }
  const int64_t j = x - rows;
  if (!col_stats || j >= m) {
    return;
  }
  float cm = first ? col_pm[j] : run_m[j];
  for (int64_t p = first ? 1 : 0; p < row_blocks; ++p) {
    cm = fmaxf(cm, col_pm[p * m + j]);
  }
  double cl = first ? 0.0 : run_l[j] * exp(double(run_m[j]) - double(cm));
  for (int64_t p = 0; p < row_blocks; ++p) {
    cl += double(col_pl[p * m + j]) * exp(double(col_pm[p * m + j]) - double(cm));
  }
  run_m[j] = cm;
  run_l[j] = cl;
  const int64_t pr = std::min(std::max(j - offset, int64_t(0)), n - 1);
  if (pr >= i0 && pr < i0 + rows) {
    pos_col[j] = logit(s[(pr - i0) * m + j], ia[pr], ib[j], scale);
  }
  if (last) {
    col_lse[j] = double(cm) + log(cl);
  }
}

// pw[0] = 2^k, pw[1] = 2^-k (see the header): one block, maxima in any order (exact).
constexpr int kPowThreads = 1024;
__global__ void __launch_bounds__(kPowThreads)
    infonce_pow2_kernel(const float* __restrict__ g_row, int64_t n,
                        const float* __restrict__ g_col, int64_t m,
                        const float* __restrict__ ib, bool normalize,
                        const float* __restrict__ scale_ptr, float* __restrict__ pw) {
  __shared__ float s_red[3][kPowThreads];
  float gr = 0.0f;
  float gc = 0.0f;
  float bm = normalize ? 0.0f : 1.0f;
  for (int64_t i = threadIdx.x; i < n; i += kPowThreads) {
    gr = fmaxf(gr, fabsf(g_row[i]));
  }
  for (int64_t j = threadIdx.x; j < m; j += kPowThreads) {
    if (g_col != nullptr) {
      gc = fmaxf(gc, fabsf(g_col[j]));
    }
    if (normalize && ib[j] < kInvNormEps) {
      bm = fmaxf(bm, ib[j]);
    }
  }
  s_red[0][threadIdx.x] = gr;
  s_red[1][threadIdx.x] = gc;
  s_red[2][threadIdx.x] = bm;
  __syncthreads();
  for (int half = kPowThreads / 2; half > 0; half >>= 1) {
    if (int(threadIdx.x) < half) {
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        s_red[q][threadIdx.x] = fmaxf(s_red[q][threadIdx.x], s_red[q][threadIdx.x + half]);
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double bound = fabs(double(__ldg(scale_ptr))) *
                         (double(s_red[0][0]) + double(s_red[1][0])) * double(s_red[2][0]);
    int e = 0;
    if (bound > 0.0 && isfinite(bound)) {
      // ceil(log2(bound)) from the exponent (exact: scaling every g by 2^p moves e by -p).
      int ex = 0;
      const double frac = frexp(bound, &ex);  // bound = frac * 2^ex, frac in [0.5, 1)
      e = kHTopExp - (frac == 0.5 ? ex - 1 : ex);
      e = min(max(e, -120), 120);
    }
    pw[0] = ldexpf(1.0f, e);
    pw[1] = ldexpf(1.0f, -e);
  }
}

// The sum of every thread's v over a kThreads block in one fixed tree order (the same bits on
// every run); s_red is the block's kThreads doubles of shared memory. Every thread gets it.
__device__ __forceinline__ double block_tree_sum(double* s_red, double v) {
  s_red[threadIdx.x] = v;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (int(threadIdx.x) < half) {
      s_red[threadIdx.x] += s_red[threadIdx.x + half];
    }
    __syncthreads();
  }
  const double total = s_red[0];
  __syncthreads();
  return total;
}

// Backward epilogue over the chunk's raw block s [rows, m] (chunk rows start at global row i0),
// tiled as the forward one: h = dS * (2^k * scale * ib_j) in H (h may alias s: fp32), and
// dscale_part[block] = sum over the block of dS * cos (see step 2 of the backward in the header).
// ia, row_hi, row_lo, g_row are [N] (global rows); ib, col_hi, col_lo, g_col [M].
template <typename H, bool kCol>
__global__ void __launch_bounds__(kThreads, 2)
    infonce_bwd_epilogue_kernel(const float* s, H* h, int64_t rows, int64_t m, int64_t splits,
                                int64_t i0, int64_t n, int64_t offset,
                                const float* __restrict__ ia, const float* __restrict__ ib,
                                const float* __restrict__ scale_ptr,
                                const float* __restrict__ pw_ptr,
                                const float* __restrict__ row_hi,
                                const float* __restrict__ row_lo,
                                const float* __restrict__ g_row,
                                const float* __restrict__ col_hi,
                                const float* __restrict__ col_lo,
                                const float* __restrict__ g_col, bool vec, bool zero_clamped,
                                double* __restrict__ dscale_part) {
  __shared__ double s_red[kThreads];
  const int64_t split = int64_t(blockIdx.x) % splits;
  const int64_t rb = int64_t(blockIdx.x) / splits;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t r0 = rb * kBlockRows + warp * kWarpRows;  // chunk-local
  const float scale = __ldg(scale_ptr);
  const float h_scale = __ldg(pw_ptr) * scale;
  double acc = 0.0;

  for (int st = 0; st < kStrips; ++st) {
    const int64_t c0 = split * kSplitCols + int64_t(st) * kStripCols;
    if (c0 >= m) {
      break;
    }
    const int64_t j = c0 + lane * kLaneCols;
    float ibv[kLaneCols];
    float hc[kLaneCols];
    float chi[kLaneCols];
    float clo[kLaneCols];
    float gcv[kLaneCols];
    int pc[kLaneCols];  // positive row of each column (< N < 2^30)
#pragma unroll
    for (int e = 0; e < kLaneCols; ++e) {
      const bool in = j + e < m;
      ibv[e] = in ? ib[j + e] : 0.0f;
      hc[e] = zero_clamped && ibv[e] >= kInvNormEps ? 0.0f : h_scale * ibv[e];
      if constexpr (kCol) {
        chi[e] = in ? col_hi[j + e] : 0.0f;
        clo[e] = in ? col_lo[j + e] : 0.0f;
        gcv[e] = in ? g_col[j + e] : 0.0f;
        pc[e] = int(std::min(std::max(j + e - offset, int64_t(0)), n - 1));
      }
    }
#pragma unroll 2
    for (int k = 0; k < kWarpRows; ++k) {
      const int64_t r = r0 + k;
      if (r >= rows) {
        break;
      }
      const int64_t i = i0 + r;
      const int i32 = int(i);
      const int jp = int(i + offset);  // the row's positive column (< M < 2^30)
      const float ia_i = ia[i];
      const float hi = row_hi[i];
      const float lo = row_lo[i];
      const float gr = g_row[i];
      float v[kLaneCols];
      load_lane(s + r * m, j, m, vec, v);
      float part = 0.0f;
#pragma unroll
      for (int e = 0; e < kLaneCols; ++e) {
        const float cos = v[e] * (ia_i * ibv[e]);
        const float sv = scale * cos;  // == logit(v[e], ia_i, ibv[e], scale)
        float ds = gr * (expf((sv - hi) - lo) - (j + e == jp ? 1.0f : 0.0f));
        if constexpr (kCol) {
          ds += gcv[e] * (expf((sv - chi[e]) - clo[e]) - (i32 == pc[e] ? 1.0f : 0.0f));
        }
        // Columns past m (v = 0, ib = 0) are selected away: their ds may be inf (an lse far
        // below 0), and inf * 0 would be NaN.
        const bool in = j + e < m;
        part += in ? ds * cos : 0.0f;
        v[e] = in ? ds * hc[e] : 0.0f;
      }
      acc += double(part);
      store_lane<H>(h + r * m, j, m, vec, v);
    }
  }
  const double total = block_tree_sum(s_red, acc);
  if (threadIdx.x == 0) {
    dscale_part[blockIdx.x] = total;
  }
}

// *acc += sum of parts[0, count) in a fixed order (strided per thread, then a fixed tree).
__global__ void __launch_bounds__(kThreads)
    infonce_sum_kernel(const double* __restrict__ parts, int64_t count,
                       double* __restrict__ acc) {
  __shared__ double s_red[kThreads];
  double t = 0.0;
  for (int64_t p = threadIdx.x; p < count; p += kThreads) {
    t += parts[p];
  }
  const double total = block_tree_sum(s_red, t);
  if (threadIdx.x == 0) {
    *acc += total;
  }
}

// out[r] = T(x[r] * inv[r]): the chunk's normalised rows in the GEMM dtype, one block per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    infonce_scale_rows_kernel(const T* __restrict__ x, const float* __restrict__ inv,
                              int64_t dim, T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const float iv = inv[r];
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    out[r * dim + d] = from_float<T>(to_float(x[r * dim + d]) * iv);
  }
}

// The normalisation backward (steps 4 and after the loop in the header), one warp per row:
// out[r] = f * (g - x (x . g) / ||x||^2) with f = 2^-k (times inv[r] when times_inv), the
// projection in double so that the component along x cancels to double precision; without
// normalize out[r] = f * g; rows whose norm was clamped get 0 under normalize (no direction, and
// the 1 / eps slope would overflow fp16). g and out may alias (fp32): each lane reads its
// elements before it writes them.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    infonce_finalize_kernel(const float* g, const T* __restrict__ x,
                            const float* __restrict__ inv, const float* __restrict__ pw_ptr,
                            int64_t rows, int64_t dim, bool normalize, bool times_inv, T* out) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) {
    return;
  }
  const float iv = inv[r];
  const bool clamped = normalize && iv >= kInvNormEps;  // uniform across the warp
  const double f = double(__ldg(pw_ptr + 1)) * (times_inv ? double(iv) : 1.0);
  const float* g_row = g + r * dim;
  const T* x_row = x + r * dim;
  double coef = 0.0;
  if (normalize && !clamped) {
    double dot = 0.0;
    double sq = 0.0;
    for (int64_t d = lane; d < dim; d += 32) {
      const double xv = to_float(x_row[d]);
      dot += xv * double(g_row[d]);
      sq += xv * xv;
    }
    coef = warp_sum(dot) / warp_sum(sq);  // sq > 0: the norm exceeds eps
  }
  T* o_row = out + r * dim;
  for (int64_t d = lane; d < dim; d += 32) {
    const double gv = g_row[d];
    const double xv = to_float(x_row[d]);
    o_row[d] = from_float<T>(clamped ? 0.0f : float(f * (gv - xv * coef)));
  }
}

struct Problem {
  int64_t n, m, dim, offset;
  at::Tensor scale;  // [1] fp32 on the device
  at::Tensor inv_a;  // [N] fp32
  at::Tensor inv_b;  // [M] fp32
};

void check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                  int64_t offset) {
  check_infonce_devices(a, b, scale, at::kCUDA);
  check_infonce_inputs(a, b, scale, offset);
  // N <= M once the offset is checked, and the positive column i + offset < M.
  check_kernel_sizes("infonce (cuda)", a, "a", b, "b");
}

// [rows] fp32 inverse row norms of x, or ones without normalize.
template <typename T>
at::Tensor row_scales(const at::Tensor& x, bool normalize, cudaStream_t stream) {
  return normalize ? inverse_norms<T>(x, stream)
                   : at::ones({x.size(0)}, x.options().dtype(at::kFloat));
}

template <typename T>
Problem make_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                     int64_t offset, bool normalize, cudaStream_t stream) {
  Problem p;
  p.n = a.size(0);
  p.m = b.size(0);
  p.dim = a.size(1);
  p.offset = offset;
  p.scale = scale.reshape({1}).to(a.device(), at::kFloat).contiguous();
  p.inv_a = row_scales<T>(a, normalize, stream);
  p.inv_b = row_scales<T>(b, normalize, stream);
  return p;
}

// Rows per chunk: `chunk`, or for 0 the 1 GiB floor of the Python rule, at most N.
int64_t chunk_rows(int64_t chunk, int64_t n, int64_t m, int64_t bytes_per_pair) {
  if (chunk == 0) {
    int64_t fit = kDefaultBudgetBytes / (std::max<int64_t>(m, 1) * bytes_per_pair);
    if (fit > kChunkMultiple) {
      fit -= fit % kChunkMultiple;
    }
    chunk = std::max<int64_t>(1, fit);
  }
  return std::min(chunk, n);
}

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// Epilogue grid for a chunk of `rows` rows: (splits, row blocks) flattened.
int64_t epilogue_blocks(int64_t rows, int64_t splits) {
  const int64_t blocks = splits * ceil_div(rows, kBlockRows);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "infonce (cuda): chunk of ", rows, " rows too large for one launch");
  return blocks;
}

// fp16 / bf16 GEMMs with an fp32 output need aten::mm.dtype_out (torch >= 2.8) and, for the fp32
// accumulator E, aten::addmm.dtype_out accepting an fp32 self (torch >= 2.10).
#define VLJEPA_INFONCE_MM_DTYPE \
  (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10))

// out (fp32) = x @ y, or out += x @ y when accumulate: cuBLAS through ATen, in x's dtype with
// fp32 accumulation and output (fp16 / bf16: the out_dtype overloads).
void gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& y, bool accumulate) {
  if (x.scalar_type() == at::kFloat) {
    if (accumulate) {
      at::addmm_out(out, out, x, y);
    } else {
      at::mm_out(out, x, y);
    }
    return;
  }
#if VLJEPA_INFONCE_MM_DTYPE
  if (accumulate) {
    at::addmm_out(out, out, x, y, at::kFloat, 1, 1);
  } else {
    at::mm_out(out, x, y, at::kFloat);
  }
#else
  TORCH_CHECK(false, "infonce (cuda): float16 / bfloat16 inputs need torch >= 2.10 (fp32-output "
              "GEMMs aten::mm.dtype_out / addmm.dtype_out); this library is built against torch ",
              TORCH_VERSION_MAJOR, ".", TORCH_VERSION_MINOR);
#endif
}

template <typename T>
void launch_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                int64_t offset, bool normalize, bool col_stats, int64_t chunk,
                at::Tensor& row_lse, at::Tensor& col_lse, at::Tensor& pos_row,
                at::Tensor& pos_col, cudaStream_t stream) {
  const Problem p = make_problem<T>(a, b, scale, offset, normalize, stream);
  const int64_t c_max = chunk_rows(chunk, p.n, p.m, 4);
  const int64_t splits = ceil_div(p.m, kSplitCols);
  const int64_t blocks_max = ceil_div(c_max, kBlockRows);
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor sbuf = at::empty({c_max, p.m}, f32);
  at::Tensor row_pm = at::empty({splits * c_max}, f32);
  at::Tensor row_pl = at::empty({splits * c_max}, f32);
  at::Tensor col_pm, col_pl, run_m, run_l;
  if (col_stats) {
    col_pm = at::empty({blocks_max * p.m}, f32);
    col_pl = at::empty({blocks_max * p.m}, f32);
    run_m = at::empty({p.m}, f32);
    run_l = at::empty({p.m}, a.options().dtype(at::kDouble));
  }
  const auto ptr = [&](at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  const bool vec = p.m % 4 == 0;
  const at::Tensor bt = b.t();
  for (int64_t i0 = 0; i0 < p.n; i0 += c_max) {
    const int64_t rows = std::min(c_max, p.n - i0);
    at::Tensor s_c = sbuf.narrow(0, 0, rows);
    gemm(s_c, a.narrow(0, i0, rows), bt, false);
    infonce_fwd_epilogue_kernel<<<epilogue_blocks(rows, splits), kThreads, 0, stream>>>(
        s_c.data_ptr<float>(), rows, p.m, splits, p.inv_a.data_ptr<float>() + i0,
        p.inv_b.data_ptr<float>(), p.scale.data_ptr<float>(), vec, col_stats,
        row_pm.data_ptr<float>(), row_pl.data_ptr<float>(), ptr(col_pm), ptr(col_pl));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t threads = rows + (col_stats ? p.m : 0);
    infonce_fwd_merge_kernel<<<ceil_div(threads, kThreads), kThreads, 0, stream>>>(
        s_c.data_ptr<float>(), rows, p.m, i0, p.n, p.offset, row_pm.data_ptr<float>(),
        row_pl.data_ptr<float>(), splits, ptr(col_pm), ptr(col_pl), ceil_div(rows, kBlockRows),
        p.inv_a.data_ptr<float>(), p.inv_b.data_ptr<float>(), p.scale.data_ptr<float>(),
        col_stats, i0 == 0, i0 + rows == p.n, ptr(run_m),
        col_stats ? run_l.data_ptr<double>() : nullptr, row_lse.data_ptr<double>(),
        pos_row.data_ptr<float>(), col_stats ? col_lse.data_ptr<double>() : nullptr,
        col_stats ? pos_col.data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                int64_t offset, bool normalize, const at::Tensor& row_lse,
                const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col,
                int64_t chunk, at::Tensor& da, at::Tensor& db, at::Tensor& dscale,
                cudaStream_t stream) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  const Problem p = make_problem<T>(a, b, scale, offset, normalize, stream);
  const bool with_col = g_col.defined();
  const int64_t c_max = chunk_rows(chunk, p.n, p.m, 4 + int64_t(sizeof(T)));
  const int64_t splits = ceil_div(p.m, kSplitCols);
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor sbuf = at::empty({c_max, p.m}, f32);
  // fp32: H overwrites S, G is written into da's rows and E is db; 16-bit: buffers.
  at::Tensor hbuf = kF32 ? sbuf : at::empty({c_max, p.m}, a.options());
  at::Tensor gbuf = kF32 ? at::Tensor() : at::empty({c_max, p.dim}, f32);
  at::Tensor ahat = normalize ? at::empty({c_max, p.dim}, a.options()) : at::Tensor();
  at::Tensor e_acc = kF32 ? db : at::empty({p.m, p.dim}, f32);
  at::Tensor pw = at::empty({2}, f32);
  at::Tensor parts = at::empty({epilogue_blocks(c_max, splits)}, a.options().dtype(at::kDouble));
  at::Tensor acc = at::zeros({1}, a.options().dtype(at::kDouble));

  infonce_pow2_kernel<<<1, kPowThreads, 0, stream>>>(
      g_row.data_ptr<float>(), p.n, with_col ? g_col.data_ptr<float>() : nullptr, p.m,
      p.inv_b.data_ptr<float>(), normalize, p.scale.data_ptr<float>(), pw.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const bool vec = p.m % 4 == 0;
  const bool zero_clamped = normalize && std::is_same<T, __half>::value;
  const float* col_hi = with_col ? col_lse[0].data_ptr<float>() : nullptr;
  const float* col_lo = with_col ? col_lse[1].data_ptr<float>() : nullptr;
  const float* g_col_p = with_col ? g_col.data_ptr<float>() : nullptr;
  const at::Tensor bt = b.t();
  for (int64_t i0 = 0; i0 < p.n; i0 += c_max) {
    const int64_t rows = std::min(c_max, p.n - i0);
    const at::Tensor a_c = a.narrow(0, i0, rows);
    at::Tensor s_c = sbuf.narrow(0, 0, rows);
    gemm(s_c, a_c, bt, false);
    const int64_t blocks = epilogue_blocks(rows, splits);
    T* h_ptr = reinterpret_cast<T*>(hbuf.data_ptr());
    const auto epilogue = with_col ? infonce_bwd_epilogue_kernel<T, true>
                                   : infonce_bwd_epilogue_kernel<T, false>;
    epilogue<<<blocks, kThreads, 0, stream>>>(
        s_c.data_ptr<float>(), h_ptr, rows, p.m, splits, i0, p.n, p.offset,
        p.inv_a.data_ptr<float>(), p.inv_b.data_ptr<float>(), p.scale.data_ptr<float>(),
        pw.data_ptr<float>(), row_lse[0].data_ptr<float>(), row_lse[1].data_ptr<float>(),
        g_row.data_ptr<float>(), col_hi, col_lo, g_col_p, vec, zero_clamped,
        parts.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    infonce_sum_kernel<<<1, kThreads, 0, stream>>>(parts.data_ptr<double>(), blocks,
                                                   acc.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const at::Tensor h_c = hbuf.narrow(0, 0, rows);
    at::Tensor da_c = da.narrow(0, i0, rows);
    at::Tensor g_c = kF32 ? da_c : gbuf.narrow(0, 0, rows);
    gemm(g_c, h_c, b, false);
    infonce_finalize_kernel<T><<<ceil_div(rows, kWarps), kThreads, 0, stream>>>(
        g_c.data_ptr<float>(), reinterpret_cast<const T*>(a_c.data_ptr()),
        p.inv_a.data_ptr<float>() + i0, pw.data_ptr<float>(), rows, p.dim, normalize, true,
        reinterpret_cast<T*>(da_c.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    at::Tensor ahat_c = a_c;
    if (normalize) {
      ahat_c = ahat.narrow(0, 0, rows);
      infonce_scale_rows_kernel<T><<<rows, kThreads, 0, stream>>>(
          reinterpret_cast<const T*>(a_c.data_ptr()), p.inv_a.data_ptr<float>() + i0, p.dim,
          reinterpret_cast<T*>(ahat_c.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    gemm(e_acc, h_c.t(), ahat_c, i0 > 0);
  }
  infonce_finalize_kernel<T><<<ceil_div(p.m, kWarps), kThreads, 0, stream>>>(
      e_acc.data_ptr<float>(), reinterpret_cast<const T*>(b.data_ptr()),
      p.inv_b.data_ptr<float>(), pw.data_ptr<float>(), p.m, p.dim, normalize, false,
      reinterpret_cast<T*>(db.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dscale.copy_(acc.reshape({}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, bool col_stats, int64_t chunk) {
  check_infonce_chunk(chunk);
  check_inputs(a, b, scale, offset);
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = a.options().dtype(at::kFloat);
  const auto opts64 = a.options().dtype(at::kDouble);
  const int64_t mc = col_stats ? b.size(0) : 0;
  at::Tensor row_lse = at::empty({a.size(0)}, opts64);
  at::Tensor pos_row = at::empty({a.size(0)}, opts);
  at::Tensor col_lse = at::empty({mc}, opts64);
  at::Tensor pos_col = at::empty({mc}, opts);
  switch (a.scalar_type()) {
    case at::kFloat:
      launch_fwd<float>(a, b, scale, offset, normalize, col_stats, chunk, row_lse, col_lse,
                        pos_row, pos_col, stream);
      break;
    case at::kHalf:
      launch_fwd<__half>(a, b, scale, offset, normalize, col_stats, chunk, row_lse, col_lse,
                         pos_row, pos_col, stream);
      break;
    default:
      launch_fwd<__nv_bfloat16>(a, b, scale, offset, normalize, col_stats, chunk, row_lse,
                                col_lse, pos_row, pos_col, stream);
      break;
  }
  return {row_lse, col_lse, pos_row, pos_col};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, const at::Tensor& row_lse, const std::optional<at::Tensor>& col_lse,
    const at::Tensor& g_row, const std::optional<at::Tensor>& g_col, int64_t chunk) {
  check_infonce_chunk(chunk);
  check_inputs(a, b, scale, offset);
  const bool with_col = check_infonce_bwd_vectors(a, b, row_lse, col_lse, g_row, g_col);
  check_infonce_bwd_devices(a, row_lse, col_lse, g_row, g_col, with_col);
  const auto vec = [](const at::Tensor& t, at::ScalarType as) { return t.to(as).contiguous(); };
  // LSE [len] (float64) -> [2, len] float (hi, lo), hi + lo = lse to about 2^-48: the kernel
  // forms exp((s - hi) - lo) in float (see the LSE note in csrc/ops.cpp).
  const auto split = [](const at::Tensor& lse) {
    const at::Tensor hi = lse.to(at::kFloat);
    return at::stack({hi, (lse - hi.to(at::kDouble)).to(at::kFloat)});
  };
  const c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor row_lse32 = split(vec(row_lse, at::kDouble));
  const at::Tensor g_row32 = vec(g_row, at::kFloat);
  const at::Tensor col_lse32 = with_col ? split(vec(*col_lse, at::kDouble)) : at::Tensor();
  const at::Tensor g_col32 = with_col ? vec(*g_col, at::kFloat) : at::Tensor();
  at::Tensor da = at::empty_like(a);
  at::Tensor db = at::empty_like(b);
  // dscale lives where scale does (the Meta kernel's contract).
  at::Tensor dscale = at::empty({}, a.options().dtype(at::kFloat));
  switch (a.scalar_type()) {
    case at::kFloat:
      launch_bwd<float>(a, b, scale, offset, normalize, row_lse32, col_lse32, g_row32, g_col32,
                        chunk, da, db, dscale, stream);
      break;
    case at::kHalf:
      launch_bwd<__half>(a, b, scale, offset, normalize, row_lse32, col_lse32, g_row32,
                         g_col32, chunk, da, db, dscale, stream);
      break;
    default:
      launch_bwd<__nv_bfloat16>(a, b, scale, offset, normalize, row_lse32, col_lse32, g_row32,
                                g_col32, chunk, da, db, dscale, stream);
      break;
  }
  return {da, db, scale.is_cpu() ? dscale.to(at::kCPU) : dscale};
}

}  // namespace
}  // namespace vljepa_fast

TORCH_LIBRARY_IMPL(vljepa_fast, CUDA, m) {
  m.impl("infonce_fwd", &vljepa_fast::infonce_fwd_cuda);
  m.impl("infonce_bwd", &vljepa_fast::infonce_bwd_cuda);
}
