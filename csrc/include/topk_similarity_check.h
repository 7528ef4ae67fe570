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

// The plan the Python op layer hands down (vljepa_fast/ops/topk_similarity.py): path 0 = the
// kernel's own documented rule, 1 = stream, 2 = GEMM + k-select; chunk = bank rows per GEMM of
// the GEMM path (0 = the whole bank). The CPU kernel checks and ignores both (it tiles for the
// cache).
inline void check_topk_similarity_plan(int64_t path, int64_t chunk) {
  TORCH_CHECK(path >= 0 && path <= 2, "path must be 0 (the rule), 1 (stream) or 2 (gemm), got ",
              path);
  TORCH_CHECK(chunk >= 0, "chunk must be >= 0 (0: the whole bank), got ", chunk);
}

// Every check of one kernel call: both tensors on `device` (the kernel's), the inputs and the plan.
inline void check_topk_similarity_call(const at::Tensor& queries, const at::Tensor& bank,
                                       int64_t k, int64_t path, int64_t chunk,
                                       c10::DeviceType device) {
  check_pair_device(queries, "queries", bank, "bank", device);
  check_topk_similarity_inputs(queries, bank, k);
  check_topk_similarity_plan(path, chunk);
}

}  // namespace vljepa_fast
