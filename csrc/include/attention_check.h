// Argument checks of flash_attention_fwd / flash_attention_bwd (csrc/ops.cpp), shared by the CUDA
// kernels (csrc/cuda/attention.cu) and the Meta functions, so that a call traced with fake tensors
// is refused exactly where the eager call would be. After these checks every row, head and column
// a kernel derives from the arguments lies inside its tensor: the kernels clamp every sequence
// (seqlens, cu_seqlens values) into the rows of q and k, so no value of those offsets tensors can
// make them read or write outside a tensor.
#pragma once
#include <torch/types.h>

#include <optional>

#include "vljepa_check.h"

namespace vljepa_fast {

// Head dims the CUDA attention kernels are compiled for.
inline bool attention_head_dim_ok(int64_t d) { return d == 64 || d == 128; }

// The layout of one call: dense q [B, T, Hq, D], k/v [B, S, Hkv, D]; varlen q [total_q, Hq, D],
// k/v [total_k, Hkv, D] with cu_seqlens [B + 1].
struct AttentionShape {
  bool varlen;
  int64_t n_seq;  // B
  int64_t rows_q;  // dense T; varlen total_q
  int64_t rows_k;  // dense S; varlen total_k
  int64_t hq;
  int64_t hkv;
  int64_t d;
};

inline void check_attention_offsets(const std::optional<at::Tensor>& t, const char* name,
                                    int64_t numel, const at::Tensor& q) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->numel() == numel, name,
              ": expected a 1-D int32 tensor of ", numel, " entries, got ", t->scalar_type(),
              " of shape ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), name, ": expected a contiguous tensor");
  check_on_device(*t, name, q.device());
}

// A q/k/v-like tensor: ndim dims, q's dtype and device, unit stride on the head dim, and every
// other stride a multiple of 8 elements with a 16-byte aligned start (the kernels load 16-byte
// packs with cp.async).
inline void check_attention_operand(const at::Tensor& t, const char* name, int64_t ndim,
                                    const at::Tensor& q) {
  TORCH_CHECK(t.dim() == ndim, name, ": expected ", ndim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(),
              " (q's), got ", t.scalar_type());
  check_on_device(t, name, q.device());
  TORCH_CHECK(t.stride(ndim - 1) == 1, name, ": expected a contiguous last (head) dim, strides ",
              t.strides());
  for (int64_t i = 0; i + 1 < ndim; ++i) {
    TORCH_CHECK(t.stride(i) % 8 == 0 || t.size(i) <= 1, name,
                ": expected strides that are multiples of 8 elements (16 bytes), got ",
                t.strides());
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 || t.numel() == 0, name,
              ": expected a 16-byte aligned start");
}

// Every check of the forward's inputs; returns the layout. window bounds >= -1.
inline AttentionShape check_attention_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& seqlens_k, const std::optional<at::Tensor>& seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left, int64_t window_right) {
  const bool varlen = cu_seqlens_q.has_value() && cu_seqlens_q->defined();
  const bool has_cu_k = cu_seqlens_k.has_value() && cu_seqlens_k->defined();
  TORCH_CHECK(varlen == has_cu_k, "cu_seqlens_q and cu_seqlens_k: give both (varlen) or neither");
  const int64_t ndim = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == ndim, "q: expected ", ndim, " dims (", varlen ? "varlen" : "dense",
              "), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q: expected float16 or bfloat16, got ", q.scalar_type());
  check_attention_operand(q, "q", ndim, q);
  check_attention_operand(k, "k", ndim, q);
  check_attention_operand(v, "v", ndim, q);
  TORCH_CHECK(k.sizes() == v.sizes(), "v: expected k's shape ", k.sizes(), ", got ", v.sizes());
  AttentionShape s{};
  s.varlen = varlen;
  s.hq = q.size(ndim - 2);
  s.hkv = k.size(ndim - 2);
  s.d = q.size(ndim - 1);
  TORCH_CHECK(k.size(ndim - 1) == s.d, "k: expected head dim ", s.d, " (q's), got ",
              k.size(ndim - 1));
  TORCH_CHECK(attention_head_dim_ok(s.d), "q: head dim ", s.d,
              " not compiled (the CUDA attention serves 64 and 128)");
  TORCH_CHECK(s.hkv >= 1 && s.hq % s.hkv == 0, "k: the number of KV heads (", s.hkv,
              ") must divide the number of query heads (", s.hq, ")");
  TORCH_CHECK(window_left >= -1 && window_right >= -1,
              "window_left, window_right: expected ints >= -1, got ", window_left, ", ",
              window_right);
  if (varlen) {
    TORCH_CHECK(!(seqlens_k.has_value() && seqlens_k->defined()) &&
                    !(seqlens_q.has_value() && seqlens_q->defined()),
                "seqlens_k, seqlens_q: dense only (varlen lengths come from cu_seqlens)");
    s.n_seq = cu_seqlens_q->numel() - 1;
    TORCH_CHECK(s.n_seq >= 1, "cu_seqlens_q: expected at least 2 entries, got ",
                cu_seqlens_q->numel());
    check_attention_offsets(cu_seqlens_q, "cu_seqlens_q", s.n_seq + 1, q);
    check_attention_offsets(cu_seqlens_k, "cu_seqlens_k", s.n_seq + 1, q);
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0,
                "max_seqlen_q, max_seqlen_k: expected >= 0, got ", max_seqlen_q, ", ",
                max_seqlen_k);
    s.rows_q = q.size(0);
    s.rows_k = k.size(0);
  } else {
    s.n_seq = q.size(0);
    TORCH_CHECK(k.size(0) == s.n_seq, "k: expected batch ", s.n_seq, " (q's), got ", k.size(0));
    s.rows_q = q.size(1);
    s.rows_k = k.size(1);
    check_attention_offsets(seqlens_k, "seqlens_k", s.n_seq, q);
    check_attention_offsets(seqlens_q, "seqlens_q", s.n_seq, q);
  }
  // the kernels index rows, window offsets (i + S - T +- bound) and blocks with int
  TORCH_CHECK(s.rows_q < (int64_t(1) << 29) && s.rows_k < (int64_t(1) << 29) &&
                  s.n_seq * s.hq < (int64_t(1) << 29),
              "q, k: rows and batch x heads must be below 2^29, got q ", q.sizes(), ", k ",
              k.sizes());
  return s;
}

// The backward's extra tensors: do and out like q (any aligned strides), lse fp32 dense
// [B, Hq, T] / varlen [Hq, total_q] with unit row stride.
inline void check_attention_bwd_inputs(const at::Tensor& dout, const at::Tensor& q,
                                       const at::Tensor& out, const at::Tensor& lse,
                                       const AttentionShape& s) {
  const int64_t ndim = s.varlen ? 3 : 4;
  check_attention_operand(dout, "do", ndim, q);
  check_attention_operand(out, "out", ndim, q);
  TORCH_CHECK(dout.sizes() == q.sizes(), "do: expected q's shape ", q.sizes(), ", got ",
              dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out: expected q's shape ", q.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse: expected float32, got ", lse.scalar_type());
  check_on_device(lse, "lse", q.device());
  if (s.varlen) {
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == s.hq && lse.size(1) == s.rows_q,
                "lse: expected [Hq, total_q] = [", s.hq, ", ", s.rows_q, "], got ", lse.sizes());
  } else {
    TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.n_seq && lse.size(1) == s.hq &&
                    lse.size(2) == s.rows_q,
                "lse: expected [B, Hq, T] = [", s.n_seq, ", ", s.hq, ", ", s.rows_q, "], got ",
                lse.sizes());
  }
  TORCH_CHECK(lse.stride(-1) == 1 || lse.size(-1) <= 1, "lse: expected a unit stride on rows");
}

}  // namespace vljepa_fast
