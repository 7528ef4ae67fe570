// Argument checks shared by the native kernels. The Python layer (vljepa_fast/functional.py)
// validates user input with friendly ValueErrors first; these checks guard direct calls through
// torch.ops.vljepa_fast so that a bad call fails with a message instead of reading out of bounds.
#pragma once
#include <torch/types.h>

#define VF_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define VF_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define VF_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must be ", (n), "-D, got shape ", (x).sizes())
#define VF_CHECK_FLOATING(x)                                                          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||    \
                  (x).scalar_type() == at::kBFloat16,                                 \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())
