// Argument checks of topk_similarity, shared by the CPU and CUDA kernels and by the Meta (shape)
// function in ops.cpp, so that a call traced with fake tensors is refused exactly where the eager
// call would be. Each kernel adds its device rule (check_pair_device) and the CUDA kernel its k and
// size limits.
#pragma once
#include <torch/types.h>

#include "vljepa_check.h"

namespace vljepa_fast {

// queries [Q, D], bank [N, D]: same floating dtype, contiguous, D >= 1, N >= 1, 1 <= k <= N.
// Q = 0 is served (empty results).
inline void check_topk_similarity_inputs(const at::Tensor& queries, const at::Tensor& bank,
                                         int64_t k) {
  check_row_matrices(queries, "queries", bank, "bank");
  const int64_t num_bank = bank.size(0);
  TORCH_CHECK(k >= 1 && k <= num_bank, "k must be in [1, N=", num_bank, "], got ", k);
}

}  // namespace vljepa_fast
