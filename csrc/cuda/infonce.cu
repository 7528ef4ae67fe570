// Fused InfoNCE terms on CUDA: the row and column log-sum-exp of S = scale * norm(a) @ norm(b)^T
// and their gradients, without ever writing the [N, M] logits to global memory.
//
// Contract (csrc/ops.cpp, vljepa_fast/reference.py::infonce_terms, csrc/cpu/infonce.cpp): the
// positive of row i is column i + offset; the positive of column j is row clamp(j - offset, 0,
// N - 1). The backward differentiates loss = sum_i g_row[i] (row_lse[i] - pos_row[i]) +
// sum_j g_col[j] (col_lse[j] - pos_col[j]), whose logit gradient is
//   dS = g_row (softmax_row(S) - onehot_row) + g_col (softmax_col(S) - onehot_col).
//
// Tiles. Every kernel walks 64 x 64 tiles G[r][c] = <own[r], other[c]> of raw (unnormalised)
// rows, computed by tile_gemm into a shared fp32 tile: WMMA tensor cores (16x16x16, fp32
// accumulators) for fp16/bf16, plain fp32 FMA in a fixed order over D for fp32 (no TF32, so fp32
// keeps sgemm rounding). Normalisation never touches memory: inv_a [N] and inv_b [M] (1 / max(
// ||row||, eps), ones without normalize) scale the tile, S = scale * G * inv_a[i] * inv_b[j].
//
// Forward, infonce_fwd_kernel: the row blocks are cut into at most kMaxSplits groups of
// consecutive blocks and the column tiles into as many splits; program (split s, group g) walks
// its block of tiles, row block by row block. Row statistics are online over the split's tiles
// (running max and rescaled sum-exp per row, one warp per row, butterfly shuffles: the same order
// on every run) and land in row_part_max / row_part_sum [splits, N]. Column statistics are exact
// per tile and merged over the group's row blocks in col_part_max / col_part_sum [groups, M]
// (only program (s, g) touches its entries). lse_merge_kernel merges both kinds of partials in
// part order: deterministic, no atomics, and 8 * kMaxSplits * (N + M) bytes whatever the batch
// (6% of the bf16 inputs at D = 1536; nothing grows with N * M). Positives are read off the tile
// that holds them. Every exponent is relative to a maximum, so |S| of 1e4 and more stays finite.
//
// Backward, infonce_bwd_kernel (launched twice, by_rows then by columns): program p owns 64 rows
// of one input ("own": a by rows, b by columns) and walks tiles of the other. It recomputes the
// tile, turns it in place into W = dS * inv_other (W[r][c] for own row r), and adds W @ other
// (raw rows, fp32 FMA) into acc [own rows, D] fp32. Only program p ever touches its 64 rows of
// acc, so plain read-modify-write is race-free and deterministic. dÂ = scale * acc (by rows) and
// dB̂ = scale * acc (by columns); normalize_bwd_kernel then applies the normalisation backward
// inv * (dX̂ - x (x . dX̂) / ||x||^2) with the dot and norm in double (0 for rows whose norm is
// below eps, the zero-row rule of reference.normalize_rows). dscale = sum(dS * S) / scale
// = sum(dS * G * inv_a * inv_b): per-thread double sums, one partial per row program reduced in
// thread order, then summed in program order by sum_kernel.
//
// Why a global fp32 accumulator rather than registers: a program's [64, D] accumulator is 384 KiB
// at D = 1536, beyond registers and shared memory; chunking D instead would recompute every S tile
// once per chunk (D / chunk times the GEMM work). The accumulator is read and written once per
// 64-column tile (L2-resident: 384 KiB per program): N * M * D / 8 bytes against the 2 * N * M * D
// FLOPs of that GEMM, 16 FLOP per byte. For fp32 inputs da and db themselves are the
// accumulators (no extra memory); fp16/bf16 inputs need one fp32 [max(N, M), D] buffer, reused
// by both passes (as large as both inputs together when N = M). The gradient
// GEMMs run on fp32 FMA for every dtype: dS keeps fp32 precision (g_row = 1 / N makes dS too
// small for fp16), at the price of speed (an open item: WMMA on a rescaled bf16 dS).
//
// LSEs. row_lse and col_lse leave the forward in float64 (max + log(sum) rounded once, to
// double): the backward forms exp(S - lse), and a float LSE would be off by up to half an ulp of
// |S| (5e-4 at |S| = 1e4), scaling every probability of its row by up to 1 +- 5e-4. The host
// splits each into float hi + lo and the kernel computes exp((s - hi) - lo): float arithmetic,
// exact near the maximum (Sterbenz), so gradients keep float accuracy at any logit size.
//
// scale is read on the device (no host sync); the Python layer validates that it is finite.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <type_traits>

#include "infonce_check.h"
#include "vljepa_common.h"
#include "vljepa_cuda.h"

namespace vljepa_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Tile edge for both operands: 64 x 64 scores, 16 per thread, two WMMA fragments per warp.
constexpr int kTile = 64;
constexpr int kRowsPerWarp = kTile / kWarps;
// fp32 tile row pitch: a multiple of 4 floats (WMMA store) whose column walks hit distinct banks.
constexpr int kLdTile = kTile + 4;
// The 128 operand rows (64 of own, 64 of other) are staged as in vljepa_cuda.h (kPackBytes,
// kPacksPerRow, kOperandPitch).
constexpr int kOperandBytes = 2 * kTile * kOperandPitch;
constexpr int kTileBytes = kTile * kLdTile * 4;
// The operand staging area doubles as the [64, 64] fp32 slice of `other` in the backward.
constexpr int kUnionBytes = kOperandBytes > kTileBytes ? kOperandBytes : kTileBytes;
// Forward grid: at most kMaxSplits row groups x kMaxSplits column splits (576 programs, several
// waves on any current GPU); the lse partials take 8 * kMaxSplits * (N + M) bytes.
constexpr int kMaxSplits = 24;
static_assert(kTile == 2 * 32, "row passes give each lane two columns");
static_assert(kTile * kTile == 16 * kThreads, "16 tile elements per thread");

template <typename T>
struct Operand {
  static constexpr int kPack = kPackBytes / int(sizeof(T));  // elements per 16-byte pack
  static constexpr int BK = kPack * kPacksPerRow;             // elements per k-step
  static constexpr int kLd = kOperandPitch / int(sizeof(T));  // staging row pitch (elements)
};

// s_tile[r][c] = <own[r], other[c]> (fp32) for r < own_rows, c < other_rows; rows past those
// are zero-filled, so their entries are 0 (callers mask them). s_ops: [128, kLd] staging; the
// products of each k-step are fma_step (fp32) or wmma_step (fp16 / bf16) of vljepa_cuda.h.
// Ends without a barrier: callers sync before reading s_tile.
template <typename T>
__device__ void tile_gemm(const T* __restrict__ own, int own_rows, const T* __restrict__ other,
                          int other_rows, int dim, bool vec, T* s_ops, float* s_tile) {
  using O = Operand<T>;
  constexpr int kPacks = 2 * kTile * kPacksPerRow;
  constexpr int kPacksPerThread = kPacks / kThreads;
  static_assert(kPacks % kThreads == 0, "whole packs per thread");
  const int k_steps = (dim + O::BK - 1) / O::BK;
  uint4 regs[kPacksPerThread];
  const auto load_step = [&](int step) {
    const int d0 = step * O::BK;
#pragma unroll
    for (int p = 0; p < kPacksPerThread; ++p) {
      const int v = threadIdx.x + p * kThreads;
      const int row = v / kPacksPerRow;
      const int d = d0 + (v % kPacksPerRow) * O::kPack;
      uint4 r = make_uint4(0u, 0u, 0u, 0u);
      if (row < kTile) {
        if (row < own_rows) {
          r = load_pack(own + int64_t(row) * dim, d, dim, vec);
        }
      } else if (row - kTile < other_rows) {
        r = load_pack(other + int64_t(row - kTile) * dim, d, dim, vec);
      }
      regs[p] = r;
    }
  };
  const auto store_step = [&]() {
#pragma unroll
    for (int p = 0; p < kPacksPerThread; ++p) {
      const int v = threadIdx.x + p * kThreads;
      *reinterpret_cast<uint4*>(s_ops + (v / kPacksPerRow) * O::kLd +
                                (v % kPacksPerRow) * O::kPack) = regs[p];
    }
  };

  // Makes k-step `step` visible in shared memory, then starts loading the next one into
  // registers: those loads are in flight during this step's products.
  const auto next_step = [&](int step) {
    __syncthreads();  // readers of the previous step are done
    store_step();
    __syncthreads();
    if (step + 1 < k_steps) {
      load_step(step + 1);
    }
  };

  load_step(0);
  if constexpr (std::is_same<T, float>::value) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
    float acc[4][4] = {};
    for (int step = 0; step < k_steps; ++step) {
      next_step(step);
      fma_step<kTile, O::kLd, O::BK>(s_ops, ty, tx, acc);
    }
    fma_store<kLdTile>(s_tile, ty, tx, acc);
  } else {
    const int warp = threadIdx.x / 32;
    AccFragment acc[2];
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
    for (int step = 0; step < k_steps; ++step) {
      next_step(step);
      wmma_step<kTile, kTile, O::kLd, O::BK, kWarps>(s_ops, warp, acc);
    }
    wmma_store<kTile, kLdTile, kWarps>(s_tile, warp, acc);
  }
}

// Program (s, g) = (blockIdx.x, blockIdx.y): the S block [row blocks of group g, column tiles of
// split s] (see the header). Row partials go to row_part_* [splits, N], column partials to
// col_part_* [groups, M], both as (max, sum of exp(x - max)).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    infonce_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b,
                       const float* __restrict__ inv_a, const float* __restrict__ inv_b,
                       const float* __restrict__ scale_ptr, int n, int m, int dim, int offset,
                       bool vec, bool col_stats, int blocks_per_group, int tiles_per_split,
                       float* __restrict__ row_part_max, float* __restrict__ row_part_sum,
                       float* __restrict__ pos_row, float* __restrict__ col_part_max,
                       float* __restrict__ col_part_sum, float* __restrict__ pos_col) {
  __shared__ __align__(128) unsigned char s_ops_raw[kOperandBytes];
  __shared__ __align__(128) float s_tile[kTile * kLdTile];
  T* s_ops = reinterpret_cast<T*>(s_ops_raw);
  const int split = blockIdx.x;
  const int group = blockIdx.y;
  const int i_lo = group * blocks_per_group * kTile;
  const int i_hi = min(n, i_lo + blocks_per_group * kTile);
  const int j_lo = split * tiles_per_split * kTile;
  const int j_hi = min(m, j_lo + tiles_per_split * kTile);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const float scale = __ldg(scale_ptr);
  const float neg_inf = -CUDART_INF_F;

  // Running max and sum-exp of the row block's rows, in shared memory rather than registers:
  // with the loop over row blocks, register arrays push ptxas past 128 registers into spills.
  // Row r belongs to warp r % kWarps, which alone reads and writes its two entries.
  __shared__ float s_m_run[kTile];
  __shared__ float s_l_run[kTile];

  for (int i0 = i_lo; i0 < i_hi; i0 += kTile) {
    const int rows = min(kTile, n - i0);
    if (threadIdx.x < kTile) {
      s_m_run[threadIdx.x] = neg_inf;
      s_l_run[threadIdx.x] = 0.0f;
    }

    for (int j0 = j_lo; j0 < j_hi; j0 += kTile) {
      const int cols = min(kTile, m - j0);
      __syncthreads();  // the previous tile's readers of s_tile are done
      tile_gemm<T>(a + int64_t(i0) * dim, rows, b + int64_t(j0) * dim, cols, dim, vec, s_ops,
                   s_tile);
      __syncthreads();
      // G -> S; entries outside the matrix become -inf, which every reduction below ignores.
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int r = e / kTile;
        const int c = e % kTile;
        float* p = s_tile + r * kLdTile + c;
        *p = r < rows && c < cols ? scale * (*p * inv_a[i0 + r] * inv_b[j0 + c]) : neg_inf;
      }
      __syncthreads();

#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const int r = warp + k * kWarps;
        if (r < rows) {  // warp-uniform
          const float* s_row = s_tile + r * kLdTile;
          const float v0 = s_row[lane];
          const float v1 = s_row[lane + 32];
          // Column j0 (lane 0) is always inside the matrix, so m_new is finite.
          const float m_old = s_m_run[r];
          const float m_new = fmaxf(m_old, warp_max(fmaxf(v0, v1)));
          const float sum = warp_sum(expf(v0 - m_new) + expf(v1 - m_new));
          const float l_new = s_l_run[r] * expf(m_old - m_new) + sum;
          __syncwarp();  // every lane has read the old values
          if (lane == 0) {
            s_m_run[r] = m_new;
            s_l_run[r] = l_new;
          }
          const int jp = i0 + r + offset;
          if (lane == 0 && jp >= j0 && jp < j0 + cols) {
            pos_row[i0 + r] = s_row[jp - j0];
          }
        }
      }

      if (col_stats && int(threadIdx.x) < cols) {
        // Exact (max, sum-exp) of this row block for column j, merged with the group's earlier
        // row blocks: thread c owns column j0 + c of every row block of this program, and no
        // other program touches col_part[group, j], so the read-modify-write is race-free.
        const int c = threadIdx.x;
        const int j = j0 + c;
        float cmax = neg_inf;
        for (int r = 0; r < rows; ++r) {
          cmax = fmaxf(cmax, s_tile[r * kLdTile + c]);
        }
        float csum = 0.0f;
        for (int r = 0; r < rows; ++r) {
          csum += expf(s_tile[r * kLdTile + c] - cmax);
        }
        const int64_t at = int64_t(group) * m + j;
        if (i0 > i_lo) {
          const float omax = col_part_max[at];
          const float nmax = fmaxf(omax, cmax);
          csum = col_part_sum[at] * expf(omax - nmax) + csum * expf(cmax - nmax);
          cmax = nmax;
        }
        col_part_max[at] = cmax;
        col_part_sum[at] = csum;
        const int pr = min(max(j - offset, 0), n - 1) - i0;
        if (pr >= 0 && pr < rows) {
          pos_col[j] = s_tile[pr * kLdTile + c];
        }
      }
    }

    __syncthreads();  // the last tile's row statistics are in shared memory
    if (int(threadIdx.x) < rows) {
      row_part_max[int64_t(split) * n + i0 + threadIdx.x] = s_m_run[threadIdx.x];
      row_part_sum[int64_t(split) * n + i0 + threadIdx.x] = s_l_run[threadIdx.x];
    }
  }
}

// out[x] = log-sum-exp of the `parts` partials (max, sum) of x in [0, len), merged in part order.
__global__ void __launch_bounds__(kThreads)
    lse_merge_kernel(const float* __restrict__ part_max, const float* __restrict__ part_sum,
                     int parts, int len, double* __restrict__ out) {
  const int x = blockIdx.x * kThreads + threadIdx.x;
  if (x >= len) {
    return;
  }
  float cmax = -CUDART_INF_F;
  for (int p = 0; p < parts; ++p) {
    cmax = fmaxf(cmax, part_max[int64_t(p) * len + x]);
  }
  float csum = 0.0f;
  for (int p = 0; p < parts; ++p) {
    csum += part_sum[int64_t(p) * len + x] * expf(part_max[int64_t(p) * len + x] - cmax);
  }
  // One rounding, to double: see the LSE note in the header.
  out[x] = double(cmax) + log(double(csum));
}

// Program p owns rows [64 p, 64 p + 64) of `own` (a when by_rows, else b) and adds
// sum_c W[r][c] other[c] into its rows of acc [n_own, D] (see the header). dscale_part (by rows
// only) receives the program's share of sum(dS * G * inv_a * inv_b).
// Two resident blocks per SM asked for explicitly: without it ptxas 13 squeezes the fp16 variant
// for sm_90a into 64 registers and spills.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    infonce_bwd_kernel(const T* __restrict__ own, const T* __restrict__ other, int n_own,
                       int n_other, const float* __restrict__ inv_a,
                       const float* __restrict__ inv_b, const float* __restrict__ scale_ptr,
                       int n, int dim, int offset, bool vec, bool by_rows,
                       const float* __restrict__ row_hi, const float* __restrict__ row_lo,
                       const float* __restrict__ g_row, const float* __restrict__ col_hi,
                       const float* __restrict__ col_lo, const float* __restrict__ g_col,
                       float* __restrict__ acc, double* __restrict__ dscale_part) {
  __shared__ __align__(128) unsigned char s_union[kUnionBytes];
  __shared__ __align__(128) float s_tile[kTile * kLdTile];
  __shared__ double s_red[kThreads];
  T* s_ops = reinterpret_cast<T*>(s_union);
  float* s_other = reinterpret_cast<float*>(s_union);  // [64, kLdTile]: other[c][d] slice
  const int own0 = blockIdx.x * kTile;
  const int own_rows = min(kTile, n_own - own0);
  const float scale = __ldg(scale_ptr);
  const bool with_col = g_col != nullptr;
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;
  double dscale_acc = 0.0;

  for (int o0 = 0; o0 < n_other; o0 += kTile) {
    const int other_rows = min(kTile, n_other - o0);
    __syncthreads();  // the previous tile's readers of s_tile and s_other are done
    tile_gemm<T>(own + int64_t(own0) * dim, own_rows, other + int64_t(o0) * dim, other_rows, dim,
                 vec, s_ops, s_tile);
    __syncthreads();
    // G -> W = dS * inv_other, in place; zero outside the matrix.
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile;
      const int c = e % kTile;
      float* p = s_tile + r * kLdTile + c;
      float w = 0.0f;
      if (r < own_rows && c < other_rows) {
        const int i = by_rows ? own0 + r : o0 + c;  // row of a
        const int j = by_rows ? o0 + c : own0 + r;  // row of b
        const float g_hat = *p * inv_a[i] * inv_b[j];
        const float s = scale * g_hat;
        const float pos = j == i + offset ? 1.0f : 0.0f;
        float ds = g_row[i] * (expf((s - row_hi[i]) - row_lo[i]) - pos);
        if (with_col) {
          const int pc = min(max(j - offset, 0), n - 1);
          ds += g_col[j] * (expf((s - col_hi[j]) - col_lo[j]) - (i == pc ? 1.0f : 0.0f));
        }
        dscale_acc += double(ds) * double(g_hat);
        w = ds * (by_rows ? inv_b[j] : inv_a[i]);
      }
      *p = w;
    }
    // acc[own0 + r, dc + d] += sum_c W[r][c] other[o0 + c, dc + d], 64 features at a time.
    for (int dc = 0; dc < dim; dc += kTile) {
      __syncthreads();  // W is complete; the previous chunk's readers of s_other are done
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int c = e / kTile;
        const int d = e % kTile;
        s_other[c * kLdTile + d] = c < other_rows && dc + d < dim
                                       ? to_float(other[int64_t(o0 + c) * dim + dc + d])
                                       : 0.0f;
      }
      __syncthreads();
      // This thread's 4 x 4 entries of acc: (own row ty + 16 i, feature dc + tx + 16 j) as
      // fn(i, j, inside the matrix, element offset in acc).
      const auto for_entries = [&](auto&& fn) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int r = ty + 16 * i;
            const int d = dc + tx + 16 * j;
            fn(i, j, r < own_rows && d < dim, int64_t(own0 + r) * dim + d);
          }
        }
      };
      float sum[4][4];
      for_entries([&](int i, int j, bool inside, int64_t at) {
        sum[i][j] = inside ? acc[at] : 0.0f;
      });
#pragma unroll 4
      for (int c = 0; c < kTile; ++c) {
        float w[4];
        float x[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          w[i] = s_tile[(ty + 16 * i) * kLdTile + c];
          x[i] = s_other[c * kLdTile + tx + 16 * i];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            sum[i][j] = fmaf(w[i], x[j], sum[i][j]);
          }
        }
      }
      for_entries([&](int i, int j, bool inside, int64_t at) {
        if (inside) {
          acc[at] = sum[i][j];
        }
      });
    }
  }

  if (dscale_part != nullptr) {
    s_red[threadIdx.x] = dscale_acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int t = 0; t < kThreads; ++t) {
        total += s_red[t];
      }
      dscale_part[blockIdx.x] = total;
    }
  }
}

// out = sum of parts in order (one thread: a fixed summation order, a few thousand terms).
__global__ void sum_kernel(const double* __restrict__ parts, int count, float* __restrict__ out) {
  double total = 0.0;
  for (int p = 0; p < count; ++p) {
    total += parts[p];
  }
  *out = float(total);
}

// out[r] = inv[r] * (g - x (x . g) / ||x||^2), g = scale * acc[r]: the backward of
// x / max(||x||, eps) (projection in double, so that the component along x cancels to double
// precision); all rows without normalize get inv[r] * g only (inv is 1 then). Rows whose norm
// was clamped (norm < eps: zero rows) get 0, the rule of reference.normalize_rows (no
// direction, and the 1 / eps slope would overflow fp16).
// One warp per row. acc and out may alias (fp32 inputs): each lane reads its elements before it
// writes them.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    normalize_bwd_kernel(const float* acc, const T* __restrict__ x,
                         const float* __restrict__ inv, const float* __restrict__ scale_ptr,
                         int rows, int dim, bool normalize, T* out) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) {
    return;
  }
  const float scale = __ldg(scale_ptr);
  const bool clamped = normalize && inv[r] >= kInvNormEps;  // uniform across the warp
  const double iv = inv[r];
  const bool project = normalize && !clamped;
  const float* g_row = acc + r * dim;
  const T* x_row = x + r * dim;
  double coef = 0.0;
  if (project) {
    double dot = 0.0;
    double sq = 0.0;
    for (int d = lane; d < dim; d += 32) {
      const double xv = to_float(x_row[d]);
      dot += xv * double(scale * g_row[d]);
      sq += xv * xv;
    }
    coef = warp_sum(dot) / warp_sum(sq);  // sq > 0: the norm exceeds eps
  }
  T* o_row = out + r * dim;
  for (int d = lane; d < dim; d += 32) {
    const double g = scale * g_row[d];
    const double xv = to_float(x_row[d]);
    o_row[d] = from_float<T>(clamped ? 0.0f : float(iv * (g - xv * coef)));
  }
}

struct Problem {
  int n, m, dim, offset;
  bool vec;
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
  p.n = int(a.size(0));
  p.m = int(b.size(0));
  p.dim = int(a.size(1));
  p.offset = int(offset);
  constexpr int kPack = Operand<T>::kPack;
  p.vec = p.dim % kPack == 0 && reinterpret_cast<uintptr_t>(a.data_ptr()) % kPackBytes == 0 &&
          reinterpret_cast<uintptr_t>(b.data_ptr()) % kPackBytes == 0;
  p.scale = scale.reshape({1}).to(a.device(), at::kFloat).contiguous();
  p.inv_a = row_scales<T>(a, normalize, stream);
  p.inv_b = row_scales<T>(b, normalize, stream);
  return p;
}

// (runs per part, parts): `runs` consecutive tiles cut into at most kMaxSplits parts.
std::pair<int, int> split_runs(int runs) {
  const int parts = std::min(runs, kMaxSplits);
  const int per = (runs + parts - 1) / parts;
  return {per, (runs + per - 1) / per};
}

void launch_merge(const at::Tensor& part_max, const at::Tensor& part_sum, at::Tensor& out,
                  cudaStream_t stream) {
  const int len = int(out.size(0));
  lse_merge_kernel<<<(len + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      part_max.data_ptr<float>(), part_sum.data_ptr<float>(), int(part_max.size(0)), len,
      out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                int64_t offset, bool normalize, bool col_stats, at::Tensor& row_lse,
                at::Tensor& col_lse, at::Tensor& pos_row, at::Tensor& pos_col,
                cudaStream_t stream) {
  const Problem p = make_problem<T>(a, b, scale, offset, normalize, stream);
  const auto [blocks_per_group, groups] = split_runs((p.n + kTile - 1) / kTile);
  const auto [tiles_per_split, splits] = split_runs((p.m + kTile - 1) / kTile);
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor row_max = at::empty({splits, p.n}, f32);
  at::Tensor row_sum = at::empty({splits, p.n}, f32);
  at::Tensor col_max;
  at::Tensor col_sum;
  if (col_stats) {
    col_max = at::empty({groups, p.m}, f32);
    col_sum = at::empty({groups, p.m}, f32);
  }
  infonce_fwd_kernel<T><<<dim3(splits, groups), kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(a.data_ptr()), reinterpret_cast<const T*>(b.data_ptr()),
      p.inv_a.data_ptr<float>(), p.inv_b.data_ptr<float>(), p.scale.data_ptr<float>(), p.n, p.m,
      p.dim, p.offset, p.vec, col_stats, blocks_per_group, tiles_per_split,
      row_max.data_ptr<float>(), row_sum.data_ptr<float>(), pos_row.data_ptr<float>(),
      col_stats ? col_max.data_ptr<float>() : nullptr,
      col_stats ? col_sum.data_ptr<float>() : nullptr,
      col_stats ? pos_col.data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_merge(row_max, row_sum, row_lse, stream);
  if (col_stats) {
    launch_merge(col_max, col_sum, col_lse, stream);
  }
}

template <typename T>
void launch_bwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                int64_t offset, bool normalize, const at::Tensor& row_lse,
                const at::Tensor& col_lse, const at::Tensor& g_row, const at::Tensor& g_col,
                at::Tensor& da, at::Tensor& db, at::Tensor& dscale, cudaStream_t stream) {
  const Problem p = make_problem<T>(a, b, scale, offset, normalize, stream);
  const bool f32 = std::is_same<T, float>::value;
  const bool with_col = g_col.defined();
  const T* p_a = reinterpret_cast<const T*>(a.data_ptr());
  const T* p_b = reinterpret_cast<const T*>(b.data_ptr());
  // fp32: da / db are the accumulators; otherwise one fp32 buffer serves both passes in turn.
  at::Tensor buffer;
  if (!f32) {
    buffer = at::empty({std::max(p.n, p.m), p.dim}, a.options().dtype(at::kFloat));
  }
  const int row_blocks = (p.n + kTile - 1) / kTile;
  at::Tensor dscale_part = at::empty({row_blocks}, a.options().dtype(at::kDouble));

  for (const bool by_rows : {true, false}) {
    const int n_own = by_rows ? p.n : p.m;
    at::Tensor& grad = by_rows ? da : db;
    at::Tensor acc = f32 ? grad : buffer.narrow(0, 0, n_own);
    acc.zero_();
    infonce_bwd_kernel<T><<<(n_own + kTile - 1) / kTile, kThreads, 0, stream>>>(
        by_rows ? p_a : p_b, by_rows ? p_b : p_a, n_own, by_rows ? p.m : p.n,
        p.inv_a.data_ptr<float>(), p.inv_b.data_ptr<float>(), p.scale.data_ptr<float>(), p.n,
        p.dim, p.offset, p.vec, by_rows, row_lse[0].data_ptr<float>(),
        row_lse[1].data_ptr<float>(), g_row.data_ptr<float>(),
        with_col ? col_lse[0].data_ptr<float>() : nullptr,
        with_col ? col_lse[1].data_ptr<float>() : nullptr,
        with_col ? g_col.data_ptr<float>() : nullptr, acc.data_ptr<float>(),
        by_rows ? dscale_part.data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_bwd_kernel<T><<<(n_own + kWarps - 1) / kWarps, kThreads, 0, stream>>>(
        acc.data_ptr<float>(), by_rows ? p_a : p_b,
        (by_rows ? p.inv_a : p.inv_b).data_ptr<float>(), p.scale.data_ptr<float>(), n_own, p.dim,
        normalize, reinterpret_cast<T*>(grad.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sum_kernel<<<1, 1, 0, stream>>>(dscale_part.data_ptr<double>(), row_blocks,
                                  dscale.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, bool col_stats) {
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
      launch_fwd<float>(a, b, scale, offset, normalize, col_stats, row_lse, col_lse, pos_row,
                        pos_col, stream);
      break;
    case at::kHalf:
      launch_fwd<__half>(a, b, scale, offset, normalize, col_stats, row_lse, col_lse, pos_row,
                         pos_col, stream);
      break;
    default:
      launch_fwd<__nv_bfloat16>(a, b, scale, offset, normalize, col_stats, row_lse, col_lse,
                                pos_row, pos_col, stream);
      break;
  }
  return {row_lse, col_lse, pos_row, pos_col};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd_cuda(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, int64_t offset,
    bool normalize, const at::Tensor& row_lse, const std::optional<at::Tensor>& col_lse,
    const at::Tensor& g_row, const std::optional<at::Tensor>& g_col) {
  check_inputs(a, b, scale, offset);
  const bool with_col = check_infonce_bwd_vectors(a, b, row_lse, col_lse, g_row, g_col);
  check_infonce_bwd_devices(a, row_lse, col_lse, g_row, g_col, with_col);
  const auto vec = [](const at::Tensor& t, at::ScalarType as) { return t.to(as).contiguous(); };
  // LSE [len] (float64) -> [2, len] float (hi, lo), hi + lo = lse to about 2^-48: the kernel
  // forms exp((s - hi) - lo) in float (see the LSE note in the header).
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
                        da, db, dscale, stream);
      break;
    case at::kHalf:
      launch_bwd<__half>(a, b, scale, offset, normalize, row_lse32, col_lse32, g_row32, g_col32,
                         da, db, dscale, stream);
      break;
    default:
      launch_bwd<__nv_bfloat16>(a, b, scale, offset, normalize, row_lse32, col_lse32, g_row32,
                                g_col32, da, db, dscale, stream);
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
