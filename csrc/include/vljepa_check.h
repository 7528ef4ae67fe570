// Argument checks shared by the native kernels and the Meta (shape) functions of csrc/ops.cpp:
// every check and its message is written once, here or in the op's header (infonce_check.h,
// topk_similarity_check.h), which builds on these. The Python layer (vljepa_fast/functional.py)
// validates user input with friendly ValueErrors first; these checks guard direct calls through
// torch.ops.vljepa_fast so that a bad call fails with a message instead of reading out of bounds.
// Every message starts with the argument's name.
#pragma once
#include <torch/types.h>

#include <cstdint>

namespace vljepa_fast {

// t lives on a device of this type (cpu, cuda).
inline void check_device_type(const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, name, " must be on ", type, ", got ", t.device());
}

// t lives on exactly this device (the device of the op's main input).
inline void check_on_device(const at::Tensor& t, const char* name, const c10::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

// x and y both live on one device of this type.
inline void check_pair_device(const at::Tensor& x, const char* x_name, const at::Tensor& y,
                              const char* y_name, c10::DeviceType type) {
  check_device_type(x, x_name, type);
  check_device_type(y, y_name, type);
  TORCH_CHECK(x.device() == y.device(), x_name, " and ", y_name,
              " must be on the same device, got ", x.device(), " and ", y.device());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The floating dtypes every native kernel serves.
inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

// The two row matrices of a similarity op: x [rows_x, D] and y [rows_y, D], 2-D, of one floating
// dtype (float32, float16 or bfloat16), contiguous, with the same feature size D >= 1. The row
// counts are the op's to check.
inline void check_row_matrices(const at::Tensor& x, const char* x_name, const at::Tensor& y,
                               const char* y_name) {
  check_dim(x, x_name, 2);
  check_dim(y, y_name, 2);
  check_floating(x, x_name);
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), y_name, " dtype ", y.scalar_type(),
              " must match ", x_name, " dtype ", x.scalar_type());
  check_contiguous(x, x_name);
  check_contiguous(y, y_name);
  TORCH_CHECK(x.size(1) == y.size(1), x_name, " and ", y_name,
              " must have the same feature size, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(1) >= 1, x_name, " and ", y_name, " need at least one feature column, got ",
              x.sizes());
}

// The CUDA kernels index rows and features with int, with headroom for a tile or chunk end past
// the last row (element offsets are int64): every size of the two row matrices must be below
// this.
constexpr int64_t kMaxKernelSize = int64_t(1) << 30;

inline void check_kernel_sizes(const char* op, const at::Tensor& x, const char* x_name,
                               const at::Tensor& y, const char* y_name) {
  TORCH_CHECK(x.size(0) < kMaxKernelSize && y.size(0) < kMaxKernelSize &&
                  x.size(1) < kMaxKernelSize,
              op, ": sizes must be below 2^30, got ", x_name, " ", x.sizes(), " and ", y_name, " ",
              y.sizes());
}

}  // namespace vljepa_fast
