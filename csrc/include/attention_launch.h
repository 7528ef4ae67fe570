// Parameters and launchers of the CUDA flash attention, shared by its host code
// (csrc/cuda/attention.cu: checks, allocation, dispatch) and its kernels
// (csrc/include/attention_kernels.h: the algorithm, tiles and cost), which are instantiated one
// (dtype, head dim) per translation unit (csrc/cuda/attention_<dtype>_hd<D>.cu) so that the four
// compile in parallel: one unit held every kernel and took about 4 minutes per arch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace vljepa_fast {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLowest = -3.4028234663852886e38f;

// ------------------------------------------------------------------------------ parameters

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // dense [B, Hq, T], varlen [Hq, total_q]
  const void* dout;
  float* delta;  // like lse
  float* dq_acc;  // fp32, dq's layout (fast backward path)
  void* dq;
  void* dk;
  void* dv;
  // element strides (batch, row, head); varlen tensors have batch stride 0
  int64_t q_b, q_r, q_h, k_b, k_r, k_h, v_b, v_r, v_h, o_b, o_r, o_h;
  int64_t do_b, do_r, do_h, dq_b, dq_r, dq_h, dk_b, dk_r, dk_h;
  int64_t lse_b, lse_h;
  const int* seqlens_k;
  const int* seqlens_q;
  const int* cu_q;
  const int* cu_k;
  int n_seq, hq, hkv, group;
  int rows_q, rows_k;  // dense T, S; varlen total_q, total_k
  int n_blocks;  // row blocks per (sequence, head) in the grid
  float scale, scale_log2;
  int win_left, win_right;  // clamped bounds (0 when unbounded)
  bool left, right, varlen, atomic_dq;
};

// The forward (attention_fwd_kernel) and the backward (delta, then dQ when deterministic, then
// dK/dV with dQ by atomics otherwise) on `stream`; Elem is cutlass::half_t or
// cutlass::bfloat16_t, D 64 or 128 (the instantiations of csrc/cuda/attention_*_hd*.cu).
template <class Elem, int D>
void fwd_launch(AttnParams& p, int64_t max_q, cudaStream_t stream);
template <class Elem, int D>
void bwd_launch(AttnParams& p, int64_t n_rows_q, int64_t max_q, int64_t max_k, bool det,
                cudaStream_t stream);

}  // namespace attention
}  // namespace vljepa_fast
