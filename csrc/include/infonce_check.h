// Argument checks of infonce_fwd / infonce_bwd that do not depend on the device: shared by the
// CPU and CUDA kernels and by the Meta (shape) functions in ops.cpp, so that a call traced with
// fake tensors is refused exactly where the eager call would be. Each kernel adds its own device
// checks. Every index a kernel derives from these arguments (row i, its positive column
// i + offset, the clamped positive row of a column) then lies inside its tensor.
#pragma once
#include <torch/types.h>

#include <optional>

#include "vljepa_check.h"

namespace vljepa_fast {

// a [N, D], b [M, D]: same floating dtype, contiguous, N >= 1, D >= 1; scale: one floating
// element; offset in [0, M - N], so that every row i has its positive column i + offset < M.
inline void check_infonce_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                                 int64_t offset) {
  VF_CHECK_DIM(a, 2);
  VF_CHECK_DIM(b, 2);
  VF_CHECK_FLOATING(a);
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "b dtype ", b.scalar_type(),
              " must match a dtype ", a.scalar_type());
  VF_CHECK_CONTIGUOUS(a);
  VF_CHECK_CONTIGUOUS(b);
  TORCH_CHECK(a.size(1) == b.size(1), "a and b must have the same feature size, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.size(1) >= 1, "a and b need at least one feature column, got ", a.sizes());
  TORCH_CHECK(scale.numel() == 1 && scale.is_floating_point(),
              "scale must be a one-element floating tensor, got ", scale.scalar_type(),
              " of shape ", scale.sizes());
  const int64_t n = a.size(0);
  const int64_t m = b.size(0);
  TORCH_CHECK(n >= 1, "a must have at least one row, got ", a.sizes());
  // Written as offset <= m - n (both sizes are >= 0, so m - n cannot overflow): n + offset would
  // wrap around for an offset near 2^63 and pass.
  TORCH_CHECK(offset >= 0 && offset <= m - n, "offset must be in [0, M - N] = [0, ", m - n,
              "] so that every row has its positive column, got ", offset);
}

// One [len] floating vector argument of infonce_bwd (row_lse, g_row, col_lse, g_col).
inline void check_infonce_vector(const at::Tensor& t, int64_t len, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len && t.is_floating_point(), name,
              " must be a floating [", len, "] vector, got ", t.scalar_type(), " of shape ",
              t.sizes());
}

// The vectors of infonce_bwd: row_lse and g_row [N]; g_col [M] with col_lse [M] (col_lse is
// ignored without g_col). Returns whether the column term is present.
inline bool check_infonce_bwd_vectors(const at::Tensor& a, const at::Tensor& b,
                                      const at::Tensor& row_lse,
                                      const std::optional<at::Tensor>& col_lse,
                                      const at::Tensor& g_row,
                                      const std::optional<at::Tensor>& g_col) {
  const bool with_col = g_col.has_value() && g_col->defined();
  TORCH_CHECK(!with_col || (col_lse.has_value() && col_lse->defined()),
              "col_lse is required when g_col is given");
  check_infonce_vector(row_lse, a.size(0), "row_lse");
  check_infonce_vector(g_row, a.size(0), "g_row");
  if (with_col) {
    check_infonce_vector(*col_lse, b.size(0), "col_lse");
    check_infonce_vector(*g_col, b.size(0), "g_col");
  }
  return with_col;
}

}  // namespace vljepa_fast
