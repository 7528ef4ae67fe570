// Host side of the `cuda` backend of vf.attention / vf.attention_varlen: argument checks
// (attention_check.h, shared with the Meta functions), output allocation, parameters and the
// dispatch to the kernels' launchers (attention_launch.h) by dtype and head dim. The kernels,
// their algorithm, tiles and cost are in csrc/include/attention_kernels.h; they are compiled one
// (dtype, head dim) per file in csrc/cuda/attention_<dtype>_hd<D>.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cutlass/numeric_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "attention_check.h"
#include "attention_launch.h"

namespace vljepa_fast {
namespace {

using attention::AttnParams;
using attention::bwd_launch;
using attention::fwd_launch;
using attention::kLog2e;

// Strides (batch, row, head) of a q/k/v-like tensor; varlen: batch stride 0.
void strides(const at::Tensor& t, bool varlen, int64_t& sb, int64_t& sr, int64_t& sh) {
  sb = varlen ? 0 : t.stride(0);
  sr = t.stride(varlen ? 0 : 1);
  sh = t.stride(varlen ? 1 : 2);
}

const int* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<int>() : nullptr;
}

AttnParams make_params(const AttentionShape& s, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const std::optional<at::Tensor>& seqlens_k,
                       const std::optional<at::Tensor>& seqlens_q,
                       const std::optional<at::Tensor>& cu_q,
                       const std::optional<at::Tensor>& cu_k, bool causal, int64_t window_left,
                       int64_t window_right, double scale) {
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  strides(q, s.varlen, p.q_b, p.q_r, p.q_h);
  strides(k, s.varlen, p.k_b, p.k_r, p.k_h);
  strides(v, s.varlen, p.v_b, p.v_r, p.v_h);
  p.seqlens_k = opt_ptr(seqlens_k);
  p.seqlens_q = opt_ptr(seqlens_q);
  p.cu_q = opt_ptr(cu_q);
  p.cu_k = opt_ptr(cu_k);
  p.varlen = s.varlen;
  p.n_seq = int(s.n_seq);
  p.hq = int(s.hq);
  p.hkv = int(s.hkv);
  p.group = int(s.hq / s.hkv);
  p.rows_q = int(s.rows_q);
  p.rows_k = int(s.rows_k);
  p.scale = float(scale);
  p.scale_log2 = float(scale) * kLog2e;
  const int64_t right = causal ? 0 : window_right;
  p.left = window_left >= 0;
  p.right = right >= 0;
  // bounds past the longest sequence hide nothing; clamped so that i + S - T +- bound fits int
  p.win_left = p.left ? int(std::min(window_left, s.rows_k)) : 0;
  p.win_right = p.right ? int(std::min(right, s.rows_q)) : 0;
  return p;
}

void set_lse_strides(AttnParams& p, const at::Tensor& lse, bool varlen) {
  p.lse_b = varlen ? 0 : lse.stride(0);
  p.lse_h = lse.stride(varlen ? 0 : 1);
}
template <template <class, int> class Fn, class... Args>
void dispatch(at::ScalarType dtype, int64_t d, Args&&... args) {
  if (dtype == at::kHalf) {
    d == 64 ? Fn<cutlass::half_t, 64>::run(args...) : Fn<cutlass::half_t, 128>::run(args...);
  } else {
    d == 64 ? Fn<cutlass::bfloat16_t, 64>::run(args...)
            : Fn<cutlass::bfloat16_t, 128>::run(args...);
  }
}

template <class Elem, int D>
struct FwdRun {
  static void run(AttnParams& p, int64_t max_q, cudaStream_t stream) {
    fwd_launch<Elem, D>(p, max_q, stream);
  }
};
template <class Elem, int D>
struct BwdRun {
  static void run(AttnParams& p, int64_t n_rows_q, int64_t max_q, int64_t max_k, bool det,
                  cudaStream_t stream) {
    bwd_launch<Elem, D>(p, n_rows_q, max_q, max_k, det, stream);
  }
};

at::Tensor lse_like(const AttentionShape& s, const at::Tensor& q) {
  const auto f32 = q.options().dtype(at::kFloat);
  return s.varlen ? at::empty({s.hq, s.rows_q}, f32) : at::empty({s.n_seq, s.hq, s.rows_q}, f32);
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& seqlens_k, const std::optional<at::Tensor>& seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, int64_t window_left,
    int64_t window_right, double scale) {
  check_device_type(q, "q", c10::DeviceType::CUDA);
  const AttentionShape s =
      check_attention_inputs(q, k, v, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, window_left, window_right);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = lse_like(s, q);
  if (q.numel() == 0) {
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  AttnParams p = make_params(s, q, k, v, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k, causal,
                             window_left, window_right, scale);
  p.o = out.data_ptr();
  strides(out, s.varlen, p.o_b, p.o_r, p.o_h);
  p.lse = lse.data_ptr<float>();
  set_lse_strides(p, lse, s.varlen);
  dispatch<FwdRun>(q.scalar_type(), s.d, p, s.varlen ? max_seqlen_q : s.rows_q, stream);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& seqlens_k,
    const std::optional<at::Tensor>& seqlens_q, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    bool causal, int64_t window_left, int64_t window_right, double scale, bool deterministic) {
  check_device_type(q, "q", c10::DeviceType::CUDA);
  const AttentionShape s =
      check_attention_inputs(q, k, v, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, window_left, window_right);
  check_attention_bwd_inputs(dout, q, out, lse, s);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dk.zero_();
    dv.zero_();
    return {at::zeros(q.sizes(), q.options()), dk, dv};
  }
  AttnParams p = make_params(s, q, k, v, seqlens_k, seqlens_q, cu_seqlens_q, cu_seqlens_k, causal,
                             window_left, window_right, scale);
  p.o = out.data_ptr();
  strides(out, s.varlen, p.o_b, p.o_r, p.o_h);
  p.dout = dout.data_ptr();
  strides(dout, s.varlen, p.do_b, p.do_r, p.do_h);
  p.lse = lse.data_ptr<float>();  // read only
  at::Tensor lse_c = lse;
  if (!lse.is_contiguous()) {
    lse_c = lse.contiguous();
    p.lse = lse_c.data_ptr<float>();
  }
  set_lse_strides(p, lse_c, s.varlen);
  at::Tensor delta = at::empty_like(lse_c);
  p.delta = delta.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides(dk, s.varlen, p.dk_b, p.dk_r, p.dk_h);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dq_acc;
  if (deterministic) {
    p.dq = dq.data_ptr();
    strides(dq, s.varlen, p.dq_b, p.dq_r, p.dq_h);
  } else {
    dq_acc = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    p.dq_acc = dq_acc.data_ptr<float>();
    strides(dq_acc, s.varlen, p.dq_b, p.dq_r, p.dq_h);
  }
  const int64_t n_rows_q = s.varlen ? s.rows_q : s.n_seq * s.rows_q;
  dispatch<BwdRun>(q.scalar_type(), s.d, p, n_rows_q, s.varlen ? max_seqlen_q : s.rows_q,
                   s.varlen ? max_seqlen_k : s.rows_k, deterministic, stream);
  if (!deterministic) {
    dq.copy_(dq_acc.mul_(scale));
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace vljepa_fast

TORCH_LIBRARY_IMPL(vljepa_fast, CUDA, m) {
  m.impl("flash_attention_fwd", &vljepa_fast::flash_attention_fwd_cuda);
  m.impl("flash_attention_bwd", &vljepa_fast::flash_attention_bwd_cuda);
}
