// Batched top-k similarity search on CUDA: for every query row, the k bank rows of largest inner
// product (or cosine similarity), without ever holding the [Q, N] score matrix.
//
// scores[q, n] = <queries[q], bank[n]>                                        (ip)
//              = <queries[q], bank[n]> * rq[q] * rb[n],  r = 1 / max(||row||, kNormEps)  (cosine)
// with rq, rb computed once per call (inverse_norms of vljepa_cuda.h).
//
// One path on this backend: faiss's GEMM + k-select design, for every shape. (An earlier
// streaming tile for few queries computed its scores with WMMA mma.sync / scalar FMA loops; the
// GPU design rule admits a hand-written GEMM loop only as wgmma on sm_90, and the GEMM path costs
// the 16-query paper case 0.78 ms against the streaming model's 0.75 ms, so it was removed. The
// Triton backend keeps a streaming kernel, on wgmma.) The schema's `path` must be 0 (the rule)
// or 2 ("gemm"); 1 ("stream") is refused here.
//
// Path "gemm" (faiss's GEMM + k-select design): per bank chunk of
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
// * 16 x 1M: the bank once, 3.22 GB, plus 0.13 GB of scores written and read -> 0.78 ms
//   (memory-bound: the [16, chunk] GEMM is at 8 FLOP per bank byte).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
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
constexpr int kMaxK = 2048;
// The schema's path codes (vljepa_fast/ops/topk_similarity.py NATIVE_PATHS).
constexpr int kPathStream = 1;
// The smallest list: one ballot appends up to 32 keys, so the buffer (<= list) holds >= 32.
constexpr int kMinList = 32;
constexpr int kMaxBuffer = 64;

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

// One dtype: the inverse norms once per call, then the GEMM path.
template <typename T>
void dispatch_path(const at::Tensor& queries, const at::Tensor& bank, int k, bool cosine,
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
  launch_gemm(queries, bank, k, chunk, p_rq, p_rb, out_scores, out_index, stream);
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
  TORCH_CHECK(path != kPathStream, "topk_similarity (cuda): path 1 (stream) is not served by "
              "the cuda kernels (their one path is the GEMM + k-select, path 2; 0 takes it too)");
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
  switch (queries.scalar_type()) {
    case at::kFloat:
      dispatch_path<float>(queries, bank, kk, cosine, chunk, out_scores, out_index, stream);
      break;
    case at::kHalf:
      dispatch_path<__half>(queries, bank, kk, cosine, chunk, out_scores, out_index, stream);
      break;
    default:
      dispatch_path<__nv_bfloat16>(queries, bank, kk, cosine, chunk, out_scores, out_index,
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
