// CUDA device helpers shared by the kernels of csrc/cuda/*.cu: dtype conversions, warp
// reductions, the operand loads and the per-step products of the tile GEMMs, and the inverse row
// norms of the cosine normalisation. Include from .cu files only (it is a .h so that the build
// fingerprint of vljepa_fast/_ext.py, which hashes csrc/include/*.h, covers it).
//
// Everything here has internal linkage (an unnamed namespace), as when each .cu file defined its
// own copy: nvcc's whole-program compilation registers the kernels of a translation unit with
// that unit's module, so every .cu file keeps its own instance of inv_norm_kernel.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vljepa_common.h"

namespace vljepa_fast {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Operand staging of the tile GEMMs: one k-step loads 64 bytes of every operand row as
// kPacksPerRow 16-byte packs; rows are kOperandPitch = 80 bytes apart in shared memory, which
// keeps 16-byte accesses of 8 consecutive rows on distinct banks and WMMA pointers 32-byte
// aligned.
constexpr int kPackBytes = 16;
constexpr int kPacksPerRow = 4;
constexpr int kOperandPitch = 80;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// float -> T, rounding to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Butterfly reductions over a full warp: every lane ends with the same value, summed in the
// same order on every run (a + b == b + a in IEEE).
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, o);
  }
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, o);
  }
  return v;
}

// Elements [d, d + kPack) of one row as a 16-byte pack (kPack = kPackBytes / sizeof(T)), zero
// past `dim`. vec: dim is a multiple of kPack and the tensor 16-byte aligned, so a pack lies
// wholly inside or outside the row; otherwise the pack is read element by element.
template <typename T>
__device__ __forceinline__ uint4 load_pack(const T* row, int d, int dim, bool vec) {
  using Bits = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;
  constexpr int kPack = kPackBytes / int(sizeof(T));
  static_assert(kPack == 4 || kPack == 8, "4-byte or 2-byte elements");
  uint4 out = make_uint4(0u, 0u, 0u, 0u);
  if (vec) {
    if (d < dim) {
      out = __ldg(reinterpret_cast<const uint4*>(row + d));
    }
  } else {
    // Element by element, element e at byte e * sizeof(T) (the layout of the vector load).
    // 2-byte elements are paired into 32-bit words with shifts (no local array whose address is
    // taken); 4-byte ones are copied as they are. Each form is the one that kept its kernels'
    // register counts (topk_chunk_kernel<float, 16> takes 188 registers instead of 128 with the
    // word form).
    const Bits* src = reinterpret_cast<const Bits*>(row);
    if constexpr (kPack == 4) {
      Bits b[kPack];
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        b[e] = d + e < dim ? src[d + e] : Bits(0);
      }
      memcpy(&out, b, sizeof(out));
    } else {
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t lo = d + 2 * i < dim ? uint32_t(src[d + 2 * i]) : 0u;
        const uint32_t hi = d + 2 * i + 1 < dim ? uint32_t(src[d + 2 * i + 1]) : 0u;
        w[i] = lo | (hi << 16);
      }
      out = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  return out;
}

// The products of the tile GEMMs, one staged k-step at a time. Both kernels stage a step as
// [kRowsX + kRowsY, kLd] elements of shared memory (kRowsX rows of x, then kRowsY rows of y, kBK
// elements of each) and accumulate the fp32 tile G[r][c] = <x[r], y[c]> in registers.
//
// fp32 inputs: plain FMA in a fixed order over d (no tensor cores, no TF32, so fp32 keeps sgemm
// rounding). Thread (ty, tx) = (threadIdx.x / 16, threadIdx.x % 16) owns the entries
// acc[i][j] = G[ty + 16 i][tx + 16 j].
template <int kRowsX, int kLd, int kBK, int kI, int kJ>
__device__ __forceinline__ void fma_step(const float* s_ops, int ty, int tx,
                                         float (&acc)[kI][kJ]) {
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 4) {
    float4 x[kI];
    float4 y[kJ];
#pragma unroll
    for (int i = 0; i < kI; ++i) {
      x[i] = *reinterpret_cast<const float4*>(s_ops + (ty + 16 * i) * kLd + kk);
    }
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      y[j] = *reinterpret_cast<const float4*>(s_ops + (kRowsX + tx + 16 * j) * kLd + kk);
    }
#pragma unroll
    for (int i = 0; i < kI; ++i) {
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
        acc[i][j] = fmaf(x[i].x, y[j].x, acc[i][j]);
        acc[i][j] = fmaf(x[i].y, y[j].y, acc[i][j]);
        acc[i][j] = fmaf(x[i].z, y[j].z, acc[i][j]);
        acc[i][j] = fmaf(x[i].w, y[j].w, acc[i][j]);
      }
    }
  }
}

// Writes the thread's entries of fma_step into the fp32 tile out (row pitch kLdOut).
template <int kLdOut, int kI, int kJ>
__device__ __forceinline__ void fma_store(float* out, int ty, int tx, const float (&acc)[kI][kJ]) {
#pragma unroll
  for (int i = 0; i < kI; ++i) {
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      out[(ty + 16 * i) * kLdOut + tx + 16 * j] = acc[i][j];
    }
  }
}

// fp16 / bf16 inputs: WMMA tensor cores (16x16x16, fp32 accumulators), two 16x16 fragments per
// warp: fragment f of warp w is number w + f * kWarps of the tile, at rows 16 (number / (kRowsY /
// 16)) and columns 16 (number % (kRowsY / 16)).
using AccFragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

template <int kRowsX, int kRowsY, int kLd, int kBK, int kWarps, typename T>
__device__ __forceinline__ void wmma_step(const T* s_ops, int warp, AccFragment (&acc)[2]) {
  using namespace nvcuda;
  constexpr int kFragsN = kRowsY / 16;
  static_assert((kRowsX / 16) * kFragsN == 2 * kWarps, "two fragments per warp");
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    const int frag = warp + f * kWarps;
    const T* p_x = s_ops + (frag / kFragsN) * 16 * kLd;
    const T* p_y = s_ops + (kRowsX + (frag % kFragsN) * 16) * kLd;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> b_x;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_y;
      wmma::load_matrix_sync(b_x, p_x + kk, kLd);
      wmma::load_matrix_sync(b_y, p_y + kk, kLd);  // rows of y = columns of B
      wmma::mma_sync(acc[f], b_x, b_y, acc[f]);
    }
  }
}

// Writes the warp's fragments of wmma_step into the fp32 tile out (row pitch kLdOut).
template <int kRowsY, int kLdOut, int kWarps>
__device__ __forceinline__ void wmma_store(float* out, int warp, const AccFragment (&acc)[2]) {
  using namespace nvcuda;
  constexpr int kFragsN = kRowsY / 16;
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    const int frag = warp + f * kWarps;
    wmma::store_matrix_sync(out + (frag / kFragsN) * 16 * kLdOut + (frag % kFragsN) * 16, acc[f],
                            kLdOut, wmma::mem_row_major);
  }
}

constexpr int kNormThreads = 256;
constexpr int kNormWarps = kNormThreads / 32;

// inv[r] = 1 / max(||x[r]||, kNormEps) in fp32, one warp per row (lane sums of squares in fp32,
// then warp_sum).
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    inv_norm_kernel(const T* __restrict__ x, int rows, int dim, float* __restrict__ inv) {
  const int64_t r = int64_t(blockIdx.x) * kNormWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) {
    return;
  }
  const T* row = x + r * dim;
  float ss = 0.0f;
  for (int d = lane; d < dim; d += 32) {
    const float v = to_float(row[d]);
    ss = fmaf(v, v, ss);
  }
  ss = warp_sum(ss);
  if (lane == 0) {
    inv[r] = 1.0f / fmaxf(sqrtf(ss), kNormEps);
  }
}

// [rows] fp32 inverse norms of the rows of x [rows, D] (T = x's element type), on x's device.
template <typename T>
at::Tensor inverse_norms(const at::Tensor& x, cudaStream_t stream) {
  const int rows = int(x.size(0));
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kFloat));
  inv_norm_kernel<T><<<(rows + kNormWarps - 1) / kNormWarps, kNormThreads, 0, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()), rows, int(x.size(1)), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace vljepa_fast
