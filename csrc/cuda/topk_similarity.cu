// Batched top-k similarity search on CUDA: for every query row, the k bank rows of largest inner
// product (or cosine similarity), without ever holding the [Q, N] score matrix.
//
// scores[q, n] = <queries[q], bank[n]>                                        (ip)
//              = <queries[q], bank[n]> * rq[q] * rb[n],  r = 1 / max(||row||, kNormEps)  (cosine)
// with rq, rb computed once per call (inverse_norms of vljepa_cuda.h).
//
// Two paths, chosen by the caller's plan (vljepa_fast/ops/topk_similarity.py, `path`; 0 takes the
// same documented rule here): path 1 "stream" when Q <= kStreamMaxQueries (64) and k <=
// kStreamMaxK (64), else path 2 "gemm". With Q <= 64 every query fits ONE 64-query tile, so the
// bank is read once and no score is written (memory-bound: at most 64 FLOP/byte for 16-bit inputs,
// below the H200's 184); more queries would re-read the bank per tile, while the GEMM path reads it
// once per chunk plus 8 Q bytes of fp32 scores per bank row, and k > 64 needs lists longer than the
// stream tile's shared memory holds beside 64 queries.
//
// Path "stream", topk_chunk_kernel<T> (64 queries, 64 bank rows per tile): block (0, i_c) owns the
// queries and chunk i_c of the bank (whole tiles). For each [64, 64] tile it
//   1. computes the scores with fp32 accumulation: WMMA tensor cores (16x16x16, fp32 accumulators)
//      for fp16/bf16; for fp32 inputs plain fp32 FMA in a fixed sequential order over D (no TF32,
//      so fp32 results carry the same rounding as a BLAS sgemm; wmma_step and fma_step of
//      vljepa_cuda.h);
//   2. stores them into shared memory (aliasing the operand tiles, which are dead by then);
//   3. lets every warp fold the scores of its queries into their running top-k lists (warp select,
//      below): a key is offered only when it beats ITS query's current k-th best key.
// It then writes each query's k best keys of the chunk, [Q, n_chunks, k]; the grid is one wave of
// resident blocks. (The 16- and 32-query tiles of earlier versions spilled registers on sm_90a and
// are gone: few queries are padded to the 64-query tile, whose tensor-core work stays below the
// bank's read time.)
//
// Path "gemm", for many queries or large k (faiss's GEMM + k-select design): per bank chunk of
// `chunk` rows (the chunk rule of vljepa_fast/ops/_chunks.py, computed by the Python op layer; 0 =
// all of N), a vendor GEMM writes the raw fp32 scores [Q, chunk] (at::mm_out with out_dtype
// float32 for fp16/bf16, cuBLAS with fp32 accumulation; plain at::mm_out for fp32, which follows
// torch's matmul precision setting, full fp32 by default), then topk_select_kernel: one warp per
// (query, column split) offers the chunk's keys to its warp select, whose list (kp keys, sorted
// descending) lives in global memory between chunks and in shared memory while a chunk is scanned.
// Survivors (keys above the list's k-th best) are appended to a 64-key buffer by ballot and merged
// only when it is full. topk_merge_kernel finally takes each query's top k over its splits.
//
// Keys. A score and its index travel as one uint64: high 32 bits are the fp32 score mapped to a
// uint32 of the same order (sign bit set for positives, all bits flipped for negatives; every NaN
// maps to 0, so NaN ranks below -inf and is reported as NaN; -0.0 maps to +0.0's 0x80000000),
// low 32 bits are ~index (index < 2^31), so equal scores prefer the smaller index. Real keys are
// therefore unique and > 0; the padding key 0 is smaller than every real key. This is the order
// documented by vljepa_fast.topk_similarity for every backend: descending, NaN last, ties lowest
// index.
//
// Warp select (per query; list and buffer in shared memory, owned by exactly one warp):
//   list[kp]   sorted descending, kp = max(32, next_pow2(k)) <= 2048; starts all padding.
//   buffer[cap] unsorted keys not yet merged, cap = min(kp, 64) >= 32 (one ballot adds <= 32).
//   threshold = list[k - 1], the k-th best merged key. A key <= threshold can never be in the top
//   k (the list only ever grows element-wise), so only keys > threshold are appended, with a ballot.
//   Merge (buffer full, or at the end): sort the buffer ascending (bitonic, size cap); replace the
//   list tail t = list[kp - cap, kp) by max(t[i], buffer[i]) (a bitonic half-cleaner: the top cap of
//   tail u buffer, as the tail is descending and the buffer ascending); head (descending) followed
//   by that new tail is V-shaped, hence bitonic, so one bitonic merge sorts the list again. The
//   result is the top kp of list u buffer because every head key beats all cap tail keys.
// Padding is never returned: a chunk (or split) of R rows yields min(k, R) real keys among its k,
// and sum min(k, R_c) >= k because sum R_c = N >= k; the final top k are therefore all real.
//
// Cost at the paper shapes (H200: 790 TFLOP/s bf16 dense, 4.3 TB/s; predictions, not measurements;
// D = 1536, bf16, N = 2^20):
// * 1024 x 1M, k = 10 or 100 ("gemm"): GEMM 2 Q N D = 3.30 TFLOP -> 4.18 ms (cuBLAS, compute-
//   bound); the select reads the 4.29 GB of scores once -> 1.00 ms; lists (Q x kp x 8 bytes, read
//   and written per chunk: 14 chunks at the default budget) under 30 MB. ~5.2 ms predicted.
// * 16 x 1M ("stream", k <= 64): 51.5 GFLOP useful (206 GFLOP issued on the 64-query tile); HBM:
//   the bank once, 3.22 GB -> 0.75 ms predicted if the WMMA tile keeps up with HBM (mma.sync, not
//   wgmma: this file has no wgmma path yet). k > 64 ("gemm"): 3.22 + 0.13 GB -> 0.78 ms.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "topk_similarity_check.h"
#include "vljepa_cuda.h"

namespace vljepa_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxK = 2048;
// The path rule (path 0): the stream tile holds 64 queries and lists of up to 64 keys.
constexpr int kStreamQueries = 64;
constexpr int kStreamMaxK = 64;
constexpr int kPathRule = 0;
constexpr int kPathStream = 1;
constexpr int kPathGemm = 2;
// The smallest list: one ballot appends up to 32 keys, so the buffer (<= list) holds >= 32.
constexpr int kMinList = 32;
constexpr int kMaxBuffer = 64;
// BQ * BN: every configuration keeps a 16 KiB fp32 score tile and two 16x16 fragments per warp.
constexpr int kTileScores = 4096;
// Operand rows are staged as in vljepa_cuda.h (kPackBytes, kPacksPerRow, kOperandPitch): one
// k-step is BK = 32 halves or 16 floats of every row.
// Candidate keys written by stage 1 at most (256 MiB); more would rather use fewer chunks.
constexpr int64_t kMaxCandidates = int64_t(1) << 25;

template <typename T, int BQ>
struct Config {
  static constexpr int BN = kTileScores / BQ;
  static constexpr int kPack = kPackBytes / int(sizeof(T));  // elements per 16-byte pack
  static constexpr int BK = kPack * kPacksPerRow;
  static constexpr int kLd = kOperandPitch / int(sizeof(T));  // operand row pitch (elements)
  static constexpr int kLdScores = BN + 4;                     // score row pitch (floats)
  static constexpr int kPacks = (BQ + BN) * kPacksPerRow;
  static constexpr int kPacksPerThread = (kPacks + kThreads - 1) / kThreads;
  static constexpr int kOperandBytes = (BQ + BN) * kOperandPitch;
  static constexpr int kScoreBytes = BQ * kLdScores * 4;
  static constexpr int kUnionBytes =
      ((kOperandBytes > kScoreBytes ? kOperandBytes : kScoreBytes) + 15) / 16 * 16;
  static_assert(BN % 32 == 0 && BQ % 16 == 0, "tiles must hold whole warps and fragments");
  static_assert((BQ / 16) * (BN / 16) == 2 * kWarps, "two score fragments per warp");

  // [union(operands, scores) | lists BQ x kp | buffers BQ x cap | counts BQ]
  static size_t smem_bytes(int kp, int cap) {
    return size_t(kUnionBytes) + size_t(BQ) * (kp + cap) * sizeof(uint64_t) + BQ * sizeof(int);
  }
};

// NaN and zero are recognised on the bits, so no compiler assumption about NaN can drop the
// tests; -0.0 takes +0.0's key (equal scores tie, and ties go to the lowest index).
__device__ __forceinline__ uint64_t make_key(float score, int index) {
  const uint32_t bits = __float_as_uint(score);
  const uint32_t mag = bits & 0x7fffffffu;
  uint32_t ord = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  ord = mag > 0x7f800000u ? 0u : ord;
  ord = mag == 0u ? 0x80000000u : ord;
  return (uint64_t(ord) << 32) | uint64_t(~uint32_t(index));
}

__device__ __forceinline__ float key_score(uint64_t key) {
  const uint32_t ord = uint32_t(key >> 32);
  return __uint_as_float((ord & 0x80000000u) ? (ord & 0x7fffffffu) : ~ord);
}

__device__ __forceinline__ int64_t key_index(uint64_t key) {
  return int64_t(~uint32_t(key & 0xffffffffu));
}

// Sorts v[0, n) ascending; n is a power of two. Every stage ends with __syncwarp so that the next
// one (and the caller) sees all lanes' writes.
__device__ void bitonic_sort_ascending(uint64_t* v, int n, int lane) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = lane; t < (n >> 1); t += 32) {
        const int i = 2 * t - (t & (stride - 1));  // i has bit `stride` clear
        const int j = i + stride;
        const bool ascending = (i & size) == 0;  // alternate blocks; the last stage is ascending
        const uint64_t a = v[i];
        const uint64_t b = v[j];
        if ((a > b) == ascending) {
          v[i] = b;
          v[j] = a;
        }
      }
      __syncwarp();
    }
  }
}

// Sorts the bitonic sequence v[0, n) descending; n is a power of two.
__device__ void bitonic_merge_descending(uint64_t* v, int n, int lane) {
  for (int stride = n >> 1; stride > 0; stride >>= 1) {
    for (int t = lane; t < (n >> 1); t += 32) {
      const int i = 2 * t - (t & (stride - 1));
      const int j = i + stride;
      const uint64_t a = v[i];
      const uint64_t b = v[j];
      if (a < b) {
        v[i] = b;
        v[j] = a;
      }
    }
    __syncwarp();
  }
}

// The running top-k of one query, owned by one warp (see the header).
struct WarpSelect {
  uint64_t* list;    // [kp], sorted descending
  uint64_t* buffer;  // [cap]
  int k;
  int kp;
  int cap;

  // Merges buffer[0, count) into the list. All lanes call it; count is warp-uniform.
  __device__ void merge(int count, int lane) const {
    for (int i = count + lane; i < cap; i += 32) {
      buffer[i] = 0;
    }
    __syncwarp();
    bitonic_sort_ascending(buffer, cap, lane);
    uint64_t* tail = list + (kp - cap);
    for (int i = lane; i < cap; i += 32) {
      const uint64_t a = tail[i];
      const uint64_t b = buffer[i];
      tail[i] = a > b ? a : b;
    }
    __syncwarp();
    bitonic_merge_descending(list, kp, lane);
  }

  // Offers one key per lane (0 = nothing). count and threshold are warp-uniform copies of the
  // buffer fill and of list[k - 1].
  __device__ void offer(uint64_t key, int& count, uint64_t& threshold, int lane) const {
    bool take = key > threshold;
    unsigned mask = __ballot_sync(kFullMask, take);
    if (mask == 0) {
      return;
    }
    if (count + __popc(mask) > cap) {
      merge(count, lane);
      count = 0;
      threshold = list[k - 1];
      take = key > threshold;
      mask = __ballot_sync(kFullMask, take);
    }
    if (take) {
      buffer[count + __popc(mask & ((1u << lane) - 1u))] = key;
    }
    count += __popc(mask);
  }
};

template <typename T, int BQ>
__global__ void __launch_bounds__(kThreads)
    topk_chunk_kernel(const T* __restrict__ queries, const T* __restrict__ bank,
                      const float* __restrict__ q_rnorm, const float* __restrict__ b_rnorm,
                      int num_queries, int num_bank, int dim, int k, int kp, int cap,
                      int tiles_per_chunk, bool vec, uint64_t* __restrict__ candidates,
                      float* __restrict__ out_scores, int64_t* __restrict__ out_index) {
  using C = Config<T, BQ>;
  constexpr int BN = C::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* s_ops = reinterpret_cast<T*>(smem);            // [BQ + BN, kLd]: query rows, then bank rows
  float* s_scores = reinterpret_cast<float*>(smem);  // [BQ, kLdScores], aliases s_ops
  uint64_t* s_list = reinterpret_cast<uint64_t*>(smem + C::kUnionBytes);  // [BQ, kp]
  uint64_t* s_buffer = s_list + BQ * kp;                                  // [BQ, cap]
  int* s_count = reinterpret_cast<int*>(s_buffer + BQ * cap);             // [BQ]

  const int i_q = blockIdx.x;
  const int i_c = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int q0 = i_q * BQ;
  // Sizes are below 2^30 (checked on the host), so these int sums cannot overflow.
  const int n_begin = i_c * tiles_per_chunk * BN;
  const int n_end = min(num_bank, n_begin + tiles_per_chunk * BN);
  const int k_steps = (dim + C::BK - 1) / C::BK;
  const bool cosine = q_rnorm != nullptr;

  // Each warp owns queries warp, warp + kWarps, ...: their lists, buffers and counts.
  for (int qi = warp; qi < BQ; qi += kWarps) {
    for (int i = lane; i < kp; i += 32) {
      s_list[qi * kp + i] = 0;
    }
    if (lane == 0) {
      s_count[qi] = 0;
    }
  }

  uint4 regs[C::kPacksPerThread];
  // Stages k-step `step` of the tile at bank row n0 into registers.
  const auto load_step = [&](int n0, int step) {
    const int d0 = step * C::BK;
#pragma unroll
    for (int p = 0; p < C::kPacksPerThread; ++p) {
      const int v = threadIdx.x + p * kThreads;
      uint4 r = make_uint4(0u, 0u, 0u, 0u);
      if (v < C::kPacks) {
        const int row = v / kPacksPerRow;
        const int d = d0 + (v % kPacksPerRow) * C::kPack;
        if (row < BQ) {
          if (q0 + row < num_queries) {
            r = load_pack(queries + int64_t(q0 + row) * dim, d, dim, vec);
          }
        } else if (n0 + row - BQ < n_end) {
          r = load_pack(bank + int64_t(n0 + row - BQ) * dim, d, dim, vec);
        }
      }
      regs[p] = r;
    }
  };
  const auto store_step = [&]() {
#pragma unroll
    for (int p = 0; p < C::kPacksPerThread; ++p) {
      const int v = threadIdx.x + p * kThreads;
      if (v < C::kPacks) {
        *reinterpret_cast<uint4*>(s_ops + (v / kPacksPerRow) * C::kLd +
                                  (v % kPacksPerRow) * C::kPack) = regs[p];
      }
    }
  };

  // Makes k-step `step` of the tile at bank row n0 visible in shared memory, then starts loading
  // the next one (of this tile, or the first of the next tile) into registers: those loads are in
  // flight during this step's products.
  const auto next_step = [&](int n0, int step) {
    __syncthreads();  // the previous step's (or tile's) readers of the union are done
    store_step();
    __syncthreads();
    if (step + 1 < k_steps) {
      load_step(n0, step + 1);
    } else if (n0 + BN < n_end) {
      load_step(n0 + BN, 0);
    }
  };

  if (k_steps > 0) {
    load_step(n_begin, 0);
  }
  for (int n0 = n_begin; n0 < n_end; n0 += BN) {
    if constexpr (std::is_same<T, float>::value) {
      const int ty = threadIdx.x / 16;
      const int tx = threadIdx.x % 16;
      float acc[BQ / 16][BN / 16] = {};
      for (int step = 0; step < k_steps; ++step) {
        next_step(n0, step);
        fma_step<BQ, C::kLd, C::BK>(s_ops, ty, tx, acc);
      }
      __syncthreads();  // operands are dead before the scores overwrite them
      fma_store<C::kLdScores>(s_scores, ty, tx, acc);
    } else {
      AccFragment acc[2];
      nvcuda::wmma::fill_fragment(acc[0], 0.0f);
      nvcuda::wmma::fill_fragment(acc[1], 0.0f);
      for (int step = 0; step < k_steps; ++step) {
        next_step(n0, step);
        wmma_step<BQ, BN, C::kLd, C::BK, kWarps>(s_ops, warp, acc);
      }
      __syncthreads();  // operands are dead before the scores overwrite them
      wmma_store<BN, C::kLdScores, kWarps>(s_scores, warp, acc);
    }
    __syncthreads();

    for (int qi = warp; qi < BQ && q0 + qi < num_queries; qi += kWarps) {
      const WarpSelect ws{s_list + qi * kp, s_buffer + qi * cap, k, kp, cap};
      int count = s_count[qi];
      uint64_t threshold = ws.list[k - 1];
      const float rq = cosine ? q_rnorm[q0 + qi] : 1.0f;
      const float* row = s_scores + qi * C::kLdScores;
      for (int j = lane; j < BN; j += 32) {
        const int n = n0 + j;
        uint64_t key = 0;
        if (n < n_end) {
          const float score = cosine ? row[j] * rq * b_rnorm[n] : row[j];
          key = make_key(score, n);
        }
        ws.offer(key, count, threshold, lane);
      }
      __syncwarp();  // every lane has read s_count[qi] before lane 0 rewrites it
      if (lane == 0) {
        s_count[qi] = count;
      }
    }
  }
  __syncthreads();  // s_count written by lane 0 is visible to the whole warp

  for (int qi = warp; qi < BQ && q0 + qi < num_queries; qi += kWarps) {
    const WarpSelect ws{s_list + qi * kp, s_buffer + qi * cap, k, kp, cap};
    const int count = s_count[qi];
    if (count > 0) {
      ws.merge(count, lane);
    }
    const int64_t q = q0 + qi;
    if (candidates != nullptr) {
      uint64_t* dst = candidates + (q * gridDim.y + i_c) * k;
      for (int i = lane; i < k; i += 32) {
        dst[i] = ws.list[i];
      }
    } else {
      for (int i = lane; i < k; i += 32) {
        out_scores[q * k + i] = key_score(ws.list[i]);
        out_index[q * k + i] = key_index(ws.list[i]);
      }
    }
  }
}

constexpr int kMergeWarps = 4;

// One warp per query: the top k of the first k keys of each of its num_chunks lists (list c at
// candidates + (q * num_chunks + c) * stride), sorted descending.
__global__ void __launch_bounds__(kMergeWarps * 32)
    topk_merge_kernel(const uint64_t* __restrict__ candidates, int num_queries, int num_chunks,
                      int stride, int k, int kp, int cap, float* __restrict__ out_scores,
                      int64_t* __restrict__ out_index) {
  extern __shared__ __align__(16) uint64_t smem_keys[];  // [kMergeWarps, kp + cap]
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t q = int64_t(blockIdx.x) * kMergeWarps + warp;
  if (q >= num_queries) {
    return;  // no block-wide barrier follows
  }
  uint64_t* s_list = smem_keys + warp * (kp + cap);
  const WarpSelect ws{s_list, s_list + kp, k, kp, cap};
  for (int i = lane; i < kp; i += 32) {
    s_list[i] = 0;
  }
  __syncwarp();
  int count = 0;
  uint64_t threshold = 0;
  const int total = num_chunks * k;
  const uint64_t* src = candidates + q * num_chunks * int64_t(stride);
  for (int base = 0; base < total; base += 32) {
    const int i = base + lane;
    ws.offer(i < total ? src[int64_t(i / k) * stride + i % k] : uint64_t(0), count, threshold,
             lane);
  }
  if (count > 0) {
    ws.merge(count, lane);
  }
  for (int i = lane; i < k; i += 32) {
    out_scores[q * k + i] = key_score(s_list[i]);
    out_index[q * k + i] = key_index(s_list[i]);
  }
}

constexpr int kSelectWarps = 4;
// Scores each lane loads before offering them (loads in flight per lane).
constexpr int kSelectUnroll = 4;

// Path "gemm": one warp per item = (query q, split p) folds the columns [p * width, min((p + 1) *
// width, n_cols)) of raw[q] (fp32 [Q, ld]; column c is bank row col0 + c) into its list
// lists[item] (kp keys, sorted descending, kept across chunks; all padding before the first).
// Cosine (rq, rb given): score = raw * rq[q] * rb[col0 + c].
__global__ void __launch_bounds__(kSelectWarps * 32)
    topk_select_kernel(const float* __restrict__ raw, int64_t ld, int n_cols, int col0, int width,
                       const float* __restrict__ q_rnorm, const float* __restrict__ b_rnorm,
                       int num_queries, int splits, int k, int kp, int cap,
                       uint64_t* __restrict__ lists) {
  extern __shared__ __align__(16) uint64_t smem_keys[];  // [kSelectWarps, kp + cap]
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t item = int64_t(blockIdx.x) * kSelectWarps + warp;
  if (item >= int64_t(num_queries) * splits) {
    return;  // no block-wide barrier follows
  }
  const int64_t q = item / splits;
  const int p = int(item % splits);
  uint64_t* s_list = smem_keys + warp * (kp + cap);
  const WarpSelect ws{s_list, s_list + kp, k, kp, cap};
  uint64_t* g_list = lists + item * kp;
  for (int i = lane; i < kp; i += 32) {
    s_list[i] = g_list[i];
  }
  __syncwarp();
  int count = 0;
  uint64_t threshold = s_list[k - 1];
  const float rq = q_rnorm != nullptr ? q_rnorm[q] : 1.0f;
  const int c_begin = min(n_cols, p * width);
  const int c_end = min(n_cols, c_begin + width);
  const float* row = raw + q * ld;
  for (int base = c_begin; base < c_end; base += 32 * kSelectUnroll) {
    float score[kSelectUnroll];
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      const int c = base + u * 32 + lane;
      score[u] = c < c_end ? __ldg(row + c) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      const int c = base + u * 32 + lane;
      uint64_t key = 0;
      if (c < c_end) {
        const float s = b_rnorm != nullptr ? score[u] * rq * b_rnorm[col0 + c] : score[u];
        key = make_key(s, col0 + c);
      }
      ws.offer(key, count, threshold, lane);
    }
  }
  if (count > 0) {
    ws.merge(count, lane);
  }
  for (int i = lane; i < kp; i += 32) {
    g_list[i] = s_list[i];
  }
}

// Smallest list length of the warp select for k: max(32, next_pow2(k)).
int list_length(int k) {
  int kp = kMinList;
  while (kp < k) {
    kp <<= 1;
  }
  return kp;
}

// Opts `kernel` into `smem` bytes of dynamic shared memory; refuses what the device cannot give.
template <typename Kernel>
void set_smem(Kernel kernel, size_t smem, int device, int k) {
  int smem_optin = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem <= size_t(smem_optin), "topk_similarity (cuda): k=", k, " needs ", smem,
              " bytes of shared memory per block, the device allows ", smem_optin);
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

// Path "gemm" (see the header): vendor GEMM per bank chunk, then the warp select.
void launch_gemm(const at::Tensor& queries, const at::Tensor& bank, int k, int64_t chunk,
                 const float* p_rq, const float* p_rb, at::Tensor& out_scores,
                 at::Tensor& out_index, cudaStream_t stream) {
  const int64_t num_queries = queries.size(0);
  const int64_t num_bank = bank.size(0);
  const int kp = list_length(k);
  const int cap = std::min(kp, kMaxBuffer);
  chunk = chunk <= 0 ? num_bank : std::min(chunk, num_bank);
  const int device = queries.get_device();
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  // Splits: enough warps to fill the device (32 per SM), each with >= 1024 columns per chunk.
  const int64_t warps = int64_t(num_sms) * 32;
  const int64_t splits = std::max<int64_t>(
      1, std::min((warps + num_queries - 1) / num_queries, (chunk + 1023) / 1024));
  const size_t smem = size_t(kSelectWarps) * (kp + cap) * sizeof(uint64_t);
  set_smem(topk_select_kernel, smem, device, k);
  at::Tensor lists = at::zeros({num_queries, splits, kp}, queries.options().dtype(at::kLong));
  uint64_t* p_lists = reinterpret_cast<uint64_t*>(lists.data_ptr<int64_t>());
  at::Tensor raw = at::empty({num_queries * chunk}, queries.options().dtype(at::kFloat));
  const bool fp32 = queries.scalar_type() == at::kFloat;
  const int64_t items = num_queries * splits;
  const unsigned blocks = unsigned((items + kSelectWarps - 1) / kSelectWarps);
  for (int64_t n0 = 0; n0 < num_bank; n0 += chunk) {
    const int64_t cols = std::min(chunk, num_bank - n0);
    at::Tensor out = raw.narrow(0, 0, num_queries * cols).view({num_queries, cols});
    const at::Tensor part = bank.narrow(0, n0, cols).t();
    if (fp32) {
      at::mm_out(out, queries, part);
    } else {
      at::mm_out(out, queries, part, at::kFloat);
    }
    const int width = int((cols + splits - 1) / splits);
    topk_select_kernel<<<blocks, kSelectWarps * 32, smem, stream>>>(
        out.data_ptr<float>(), cols, int(cols), int(n0), width, p_rq, p_rb, int(num_queries),
        int(splits), k, kp, cap, p_lists);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const size_t merge_smem = size_t(kMergeWarps) * (kp + cap) * sizeof(uint64_t);
  set_smem(topk_merge_kernel, merge_smem, device, k);
  const int merge_blocks = int((num_queries + kMergeWarps - 1) / kMergeWarps);
  topk_merge_kernel<<<merge_blocks, kMergeWarps * 32, merge_smem, stream>>>(
      p_lists, int(num_queries), int(splits), kp, k, kp, cap, out_scores.data_ptr<float>(),
      out_index.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BQ>
void launch_topk(const at::Tensor& queries, const at::Tensor& bank, int k, int kp, int cap,
                 const float* p_rq, const float* p_rb, at::Tensor& out_scores,
                 at::Tensor& out_index, cudaStream_t stream) {
  using C = Config<T, BQ>;
  const int64_t num_queries = queries.size(0);
  const int64_t num_bank = bank.size(0);
  const int dim = int(queries.size(1));
  const auto kernel = topk_chunk_kernel<T, BQ>;
  const size_t smem = C::smem_bytes(kp, cap);
  // Device attributes straight from the runtime: ATen/cuda/CUDAContext.h would pull in the
  // cuSPARSE/cuBLAS headers, which a bare nvcc toolkit does not ship.
  const int device = queries.get_device();
  int smem_optin = 0;
  int num_sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK(smem <= size_t(smem_optin), "topk_similarity (cuda): k=", k, " needs ", smem,
              " bytes of shared memory per block, the device allows ", smem_optin);
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, smem));
  const int64_t wave = int64_t(std::max(blocks_per_sm, 1)) * num_sms;

  // Chunks: as many as fill one wave of resident blocks (equal chunks finish together), never
  // more than there are tiles, and few enough that the candidates stay below kMaxCandidates.
  const int64_t q_tiles = (num_queries + BQ - 1) / BQ;
  const int64_t tiles = (num_bank + C::BN - 1) / C::BN;
  int64_t n_chunks = q_tiles < wave ? wave / q_tiles : 1;
  n_chunks = std::min(n_chunks, tiles);
  n_chunks = std::min(n_chunks, std::max<int64_t>(1, kMaxCandidates / (num_queries * k)));
  const int64_t tiles_per_chunk = (tiles + n_chunks - 1) / n_chunks;
  n_chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;  // no empty chunk

  const T* p_q = reinterpret_cast<const T*>(queries.data_ptr());
  const T* p_b = reinterpret_cast<const T*>(bank.data_ptr());
  const bool vec = dim % C::kPack == 0 && reinterpret_cast<uintptr_t>(p_q) % kPackBytes == 0 &&
                   reinterpret_cast<uintptr_t>(p_b) % kPackBytes == 0;
  const dim3 grid{unsigned(q_tiles), unsigned(n_chunks)};

  if (n_chunks == 1) {
    kernel<<<grid, kThreads, smem, stream>>>(
        p_q, p_b, p_rq, p_rb, int(num_queries), int(num_bank), dim, k, kp, cap,
        int(tiles_per_chunk), vec, nullptr, out_scores.data_ptr<float>(),
        out_index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor candidates = at::empty({num_queries, n_chunks, k}, queries.options().dtype(at::kLong));
  uint64_t* p_cand = reinterpret_cast<uint64_t*>(candidates.data_ptr<int64_t>());
  kernel<<<grid, kThreads, smem, stream>>>(p_q, p_b, p_rq, p_rb, int(num_queries),
                                           int(num_bank), dim, k, kp, cap,
                                           int(tiles_per_chunk), vec, p_cand, nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int merge_blocks = int((num_queries + kMergeWarps - 1) / kMergeWarps);
  const size_t merge_smem = size_t(kMergeWarps) * (kp + cap) * sizeof(uint64_t);
  topk_merge_kernel<<<merge_blocks, kMergeWarps * 32, merge_smem, stream>>>(
      p_cand, int(num_queries), int(n_chunks), k, k, kp, cap, out_scores.data_ptr<float>(),
      out_index.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Both paths on one dtype: the inverse norms once per call, then the plan's path.
template <typename T>
void dispatch_path(const at::Tensor& queries, const at::Tensor& bank, int k, bool cosine, int path,
                   int64_t chunk, at::Tensor& out_scores, at::Tensor& out_index,
                   cudaStream_t stream) {
  at::Tensor q_rnorm;
  at::Tensor b_rnorm;
  if (cosine) {
    q_rnorm = inverse_norms<T>(queries, stream);
    b_rnorm = inverse_norms<T>(bank, stream);
  }
  const float* p_rq = cosine ? q_rnorm.data_ptr<float>() : nullptr;
  const float* p_rb = cosine ? b_rnorm.data_ptr<float>() : nullptr;
  if (path == kPathRule) {
    path = queries.size(0) <= kStreamQueries && k <= kStreamMaxK ? kPathStream : kPathGemm;
  }
  if (path == kPathStream) {
    const int kp = list_length(k);
    launch_topk<T, kStreamQueries>(queries, bank, k, kp, std::min(kp, kMaxBuffer), p_rq, p_rb,
                                   out_scores, out_index, stream);
  } else {
    launch_gemm(queries, bank, k, chunk, p_rq, p_rb, out_scores, out_index, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_similarity_cuda(const at::Tensor& queries,
                                                        const at::Tensor& bank, int64_t k,
                                                        bool cosine, int64_t path, int64_t chunk) {
  // at::mm_out into a buffer must not record autograd history for direct calls on inputs that
  // require grad: vljepa_fast/ops/topk_similarity.py attaches the scores' gradient.
  const at::NoGradGuard no_grad;
  check_topk_similarity_call(queries, bank, k, path, chunk, at::kCUDA);
  const int64_t num_queries = queries.size(0);
  TORCH_CHECK(k <= kMaxK, "topk_similarity (cuda) supports k <= ", kMaxK, ", got k=", k,
              "; use the cpu or reference backend for larger k");
  TORCH_CHECK(path != kPathStream || k <= kStreamMaxK, "topk_similarity (cuda): path 1 (stream) "
              "supports k <= ", kStreamMaxK, ", got k=", k);
  // Indices also travel as 32-bit ~index in the keys.
  check_kernel_sizes("topk_similarity (cuda)", queries, "queries", bank, "bank");

  const c10::cuda::CUDAGuard guard(queries.device());
  at::Tensor out_scores = at::empty({num_queries, k}, queries.options().dtype(at::kFloat));
  at::Tensor out_index = at::empty({num_queries, k}, queries.options().dtype(at::kLong));
  if (num_queries == 0) {
    return {out_scores, out_index};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int kk = int(k);
  const int pp = int(path);
  switch (queries.scalar_type()) {
    case at::kFloat:
      dispatch_path<float>(queries, bank, kk, cosine, pp, chunk, out_scores, out_index, stream);
      break;
    case at::kHalf:
      dispatch_path<__half>(queries, bank, kk, cosine, pp, chunk, out_scores, out_index, stream);
      break;
    default:
      dispatch_path<__nv_bfloat16>(queries, bank, kk, cosine, pp, chunk, out_scores, out_index,
                                   stream);
      break;
  }
  return {out_scores, out_index};
}

}  // namespace
}  // namespace vljepa_fast

TORCH_LIBRARY_IMPL(vljepa_fast, CUDA, m) {
  m.impl("topk_similarity", &vljepa_fast::topk_similarity_cuda);
}
