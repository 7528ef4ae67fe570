// The f16, head dim 128 kernels of the CUDA attention (csrc/include/attention_kernels.h): one
// (dtype, head dim) per translation unit, so that the four compile in parallel.
#include "attention_kernels.h"

VLJEPA_ATTENTION_INSTANTIATE(cutlass::half_t, 128)
