// Argument checks of infonce_fwd / infonce_bwd, shared by the CPU and CUDA kernels and by the Meta
// (shape) functions in ops.cpp, so that a call traced with fake tensors is refused exactly where
// the eager call would be. The device-independent checks come first; each kernel then adds its
// device rules through check_infonce_devices and check_infonce_bwd_devices (and the CUDA one its
// size limits). Every index a kernel derives from these arguments (row i, its positive column
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
  check_row_matrices(a, "a", b, "b");
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

// chunk (rows of a per chunk of the chunked CUDA kernels; 0 = the library's default): >= 0.
inline void check_infonce_chunk(int64_t chunk) {
  TORCH_CHECK(chunk >= 0, "chunk must be >= 0 (0: the default chunk), got ", chunk);
}

// a and b on one device of this type; scale on the cpu, or (CUDA kernels, which read it on the
// device) on a's device too.
inline void check_infonce_devices(const at::Tensor& a, const at::Tensor& b,
                                  const at::Tensor& scale, c10::DeviceType type) {
  check_pair_device(a, "a", b, "b", type);
  if (type == c10::DeviceType::CPU) {
    check_device_type(scale, "scale", type);
  } else {
    TORCH_CHECK(scale.is_cpu() || scale.device() == a.device(), "scale must be on the cpu or on ",
                a.device(), ", got ", scale.device());
  }
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

// The vectors of infonce_bwd that the kernel reads (with_col from check_infonce_bwd_vectors)
// live on a's device.
inline void check_infonce_bwd_devices(const at::Tensor& a, const at::Tensor& row_lse,
                                      const std::optional<at::Tensor>& col_lse,
                                      const at::Tensor& g_row,
                                      const std::optional<at::Tensor>& g_col, bool with_col) {
  check_on_device(row_lse, "row_lse", a.device());
  check_on_device(g_row, "g_row", a.device());
  if (with_col) {
    check_on_device(*col_lse, "col_lse", a.device());
    check_on_device(*g_col, "g_col", a.device());
  }
}

}  // namespace vljepa_fast
