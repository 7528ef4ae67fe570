// Argument checks of topk_similarity that do not depend on the device: shared by the CPU and
// CUDA kernels and by the Meta (shape) function in ops.cpp, so that a call traced with fake
// tensors is refused exactly where the eager call would be. Each kernel adds its own device
// checks (and the CUDA kernel its k and size limits).
#pragma once
#include <torch/types.h>

#include "vljepa_check.h"

namespace vljepa_fast {

// queries [Q, D], bank [N, D]: same floating dtype, contiguous, D >= 1, N >= 1, 1 <= k <= N.
// Q = 0 is served (empty results).
inline void check_topk_similarity_inputs(const at::Tensor& queries, const at::Tensor& bank,
                                         int64_t k) {
  VF_CHECK_DIM(queries, 2);
  VF_CHECK_DIM(bank, 2);
  VF_CHECK_FLOATING(queries);
  TORCH_CHECK(bank.scalar_type() == queries.scalar_type(), "bank dtype ", bank.scalar_type(),
              " must match queries dtype ", queries.scalar_type());
  VF_CHECK_CONTIGUOUS(queries);
  VF_CHECK_CONTIGUOUS(bank);
  TORCH_CHECK(bank.size(1) == queries.size(1),
              "queries and bank must have the same feature size, got ", queries.sizes(), " and ",
              bank.sizes());
  TORCH_CHECK(queries.size(1) >= 1, "queries and bank need at least one feature column, got ",
              queries.sizes());
  const int64_t num_bank = bank.size(0);
  TORCH_CHECK(k >= 1 && k <= num_bank, "k must be in [1, N=", num_bank, "], got ", k);
}

}  // namespace vljepa_fast
