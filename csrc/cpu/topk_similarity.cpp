// Batched top-k similarity search on CPU: for every query row, the k bank rows of largest inner
// product (or cosine similarity), without ever materialising the [Q, N] score matrix.
//
// Memory idea: queries are cut into tiles of at most kQueryTile rows and the bank into blocks of at
// most kBankBlock rows. A [QT, NB] fp32 score block is one single-threaded BLAS GEMM (MKL through
// at::mm_out) into a reused buffer that stays in L2, and is scanned right away, while it is still
// in cache, into a bounded candidate list per query. Extra memory is O(threads * QT * (NB + k)),
// independent of N: peak RSS grows by about 1 MB at Q=256, N=200k, D=768, k=10 on two threads
// (10 MB at k=1024), against 205 MB for the score matrix that `(queries @ bank.T).topk(k)` writes
// and reads back.
//
// Threads: every thread owns one "slot" (score buffer, converted bank block, candidate lists for
// the tile's queries) and pulls bank blocks from a shared atomic counter, so a core slowed down by
// another process simply takes fewer blocks. Parallelism over bank blocks beats a BLAS-threaded
// GEMM followed by a query-parallel scan: no barrier per block, no cross-core traffic for the
// scores, and on two cores two single-threaded GEMMs over halves of the bank finished about 10%
// sooner than one two-threaded GEMM over the whole. When a tile's blocks are exhausted, the
// per-slot lists are merged per query (query-parallel) and sorted. Build with -fopenmp: ATen's
// at::parallel_for is inlined into this file and runs serially without it.
//
// Selection: a candidate list holds up to cap = 2k + 32 unordered (score, index) pairs and a
// threshold, the k-th best score kept so far (raised to the best threshold any thread has
// published for the query). Random-like data rejects nearly every score with one compare; a
// 16-wide "any above threshold" SSE test lets the scan skip whole chunks. When the list fills up,
// nth_element cuts it back to k: O(1) amortised per accepted score even on adversarial (sorted)
// banks.
//
// NaN scores (only from NaN/inf inputs) rank below -inf so that selection stays a strict weak
// order; they are reported as NaN if they make it into the top k.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "vljepa_check.h"

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#endif

namespace vljepa_fast {
namespace {

// GEMM shape: single-threaded MKL sgemm reached about 80 GFLOP/s per core at 256 x 512 x 768 on
// an AVX2 EPYC (about 60 at 128 x 128), and the [256, 512] fp32 score block (512 KiB) fits in L2.
constexpr int64_t kQueryTile = 256;
constexpr int64_t kBankBlock = 512;
// Scores compared per "any above threshold" test: four SSE vectors.
constexpr int64_t kChunk = 16;
constexpr int64_t kMinParallelWork = int64_t{1} << 20;
constexpr float kNormEps = 1e-12f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float rank_key(float score) { return score != score ? kNegInf : score; }

// Compilers keep `any |= s > t` scalar (one comiss per score), so x86 gets SSE2 by hand (part of
// x86-64, no -m flag needed): about 0.3 cycles per score.
inline bool any_above(const float* scores, float threshold) {
#if defined(__SSE2__) || defined(_M_X64)
  const __m128 t = _mm_set1_ps(threshold);
  const __m128 above = _mm_or_ps(
      _mm_or_ps(_mm_cmpgt_ps(_mm_loadu_ps(scores), t), _mm_cmpgt_ps(_mm_loadu_ps(scores + 4), t)),
      _mm_or_ps(_mm_cmpgt_ps(_mm_loadu_ps(scores + 8), t),
                _mm_cmpgt_ps(_mm_loadu_ps(scores + 12), t)));
  return _mm_movemask_ps(above) != 0;
#else
  int any = 0;
  for (int64_t j = 0; j < kChunk; ++j) {
    any |= scores[j] > threshold;
  }
  return any != 0;
#endif
}

// Unordered candidates of one query: up to `cap` (score, index) pairs. Once it holds k pairs,
// `threshold` is a lower bound of its k-th best score and only scores above it are taken.
// index_t is int32_t whenever the bank allows: 8 instead of 12 bytes per candidate.
template <typename index_t>
struct CandidateList {
  float* score;
  index_t* index;
  int64_t& count;
  float& threshold;
};

// Cuts a list holding `count` > k pairs back to its k best (in any order) and returns the k-th
// best key, the new threshold. `scratch` holds at least `count` floats.
template <typename index_t>
float keep_best_k(const CandidateList<index_t>& list, int64_t k, float* scratch) {
  const int64_t count = list.count;
  for (int64_t i = 0; i < count; ++i) {
    scratch[i] = rank_key(list.score[i]);
  }
  std::nth_element(scratch, scratch + k - 1, scratch + count, std::greater<float>());
  const float kth = scratch[k - 1];
  // nth_element left every key above the k-th best in front of it.
  int64_t above = 0;
  for (int64_t i = 0; i < k - 1; ++i) {
    above += scratch[i] > kth;
  }
  // Scores equal to the k-th best fill the remaining places; which of them stay is arbitrary.
  int64_t ties_left = k - above;
  int64_t kept = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float key = rank_key(list.score[i]);
    const bool tie = key == kth && ties_left > 0;
    if (key > kth || tie) {
      ties_left -= tie;
      list.score[kept] = list.score[i];
      list.index[kept] = list.index[i];
      ++kept;
    }
  }
  list.count = k;
  return kth;
}

// Raises `shared` to `value` if that is larger (a relaxed atomic max).
void raise_to(std::atomic<float>& shared, float value) {
  float current = shared.load(std::memory_order_relaxed);
  while (current < value &&
         !shared.compare_exchange_weak(current, value, std::memory_order_relaxed)) {
  }
}

// Offers the scores row[0, n) of bank rows first_index + j to one query's list. `shared` is the
// largest threshold any thread has published for this query: each is the k-th best of a subset
// of the bank, so a score at or below it cannot beat the global k-th best (ties aside), and every
// thread may drop it. That roughly halves the scores taken on two threads when k is large.
template <typename index_t>
void offer_row(const float* row, int64_t n, int64_t first_index, int64_t k, int64_t cap,
               const CandidateList<index_t>& list, std::atomic<float>& shared, float* scratch) {
  int64_t j = 0;
  if (list.count < k) {
    // Filling up: every score is taken, so the list holds k pairs whenever its share of the bank
    // does, and the lists together always hold at least k.
    for (; j < n && list.count < k; ++j) {
      list.score[list.count] = row[j];
      list.index[list.count] = static_cast<index_t>(first_index + j);
      ++list.count;
    }
    if (list.count < k) {
      return;
    }
    float kth = rank_key(list.score[0]);
    for (int64_t i = 1; i < k; ++i) {
      kth = std::min(kth, rank_key(list.score[i]));
    }
    list.threshold = kth;
    raise_to(shared, kth);
  }
  list.threshold = std::max(list.threshold, shared.load(std::memory_order_relaxed));
  // Appends the scores row[from, to) (at most kChunk) that beat the threshold. Branch-free: in
  // chunks that pass the any-above test about half the scores do, so a branch would mispredict.
  const auto append_above = [&](int64_t from, int64_t to) {
    if (list.count + kChunk > cap) {
      const float kth = keep_best_k(list, k, scratch);
      raise_to(shared, kth);
      list.threshold = std::max(kth, shared.load(std::memory_order_relaxed));
    }
    const float threshold = list.threshold;
    int64_t count = list.count;
    for (int64_t jj = from; jj < to; ++jj) {
      list.score[count] = row[jj];
      list.index[count] = static_cast<index_t>(first_index + jj);
      count += row[jj] > threshold;
    }
    list.count = count;
  };
  for (; j + kChunk <= n; j += kChunk) {
    if (any_above(row + j, list.threshold)) {
      append_above(j, j + kChunk);
    }
  }
  if (j < n) {
    append_above(j, n);
  }
}

// Everything one thread owns: its buffers and the candidate lists of the current query tile.
template <typename index_t>
struct Slot {
  Slot(int64_t tile, int64_t block, int64_t dim, int64_t cap, bool convert)
      : score(new float[tile * cap]),
        index(new index_t[tile * cap]),
        count(tile),
        threshold(tile),
        scratch(cap),
        block_scores(at::empty({tile * block}, at::kFloat)),
        block_f32(convert ? at::empty({block, dim}, at::kFloat) : at::Tensor()) {}

  void reset() {
    std::fill(count.begin(), count.end(), 0);
    std::fill(threshold.begin(), threshold.end(), kNegInf);
    used = false;
  }

  CandidateList<index_t> list(int64_t query, int64_t cap) {
    return {score.get() + query * cap, index.get() + query * cap, count[query], threshold[query]};
  }

  std::unique_ptr<float[]> score;    // [QT, cap], written before read: no zero fill
  std::unique_ptr<index_t[]> index;  // [QT, cap]
  std::vector<int64_t> count;        // [QT]
  std::vector<float> threshold;      // [QT]
  std::vector<float> scratch;        // [cap]
  at::Tensor block_scores;           // [QT * NB] fp32
  at::Tensor block_f32;              // [NB, D] fp32, for fp16/bf16 banks
  bool used = false;
};

// Writes the top k of every query into out_scores [Q, k] and out_index [Q, k].
template <typename index_t>
void search(const at::Tensor& queries, const at::Tensor& bank, int64_t k, bool cosine,
            const at::Tensor& out_scores, const at::Tensor& out_index) {
  const int64_t num_queries = queries.size(0);
  const int64_t num_bank = bank.size(0);
  const int64_t dim = queries.size(1);
  const int64_t num_threads = at::get_num_threads();
  const bool convert = queries.scalar_type() != at::kFloat;
  const int64_t cap = 2 * k + 32;
  // Equal tiles (300 queries -> 150 + 150, not 256 + 44) keep every GEMM near full speed.
  const int64_t num_tiles = (num_queries + kQueryTile - 1) / kQueryTile;
  const int64_t tile = (num_queries + num_tiles - 1) / num_tiles;
  // Below about a million multiply-adds a parallel region (and a GEMM call per block) costs more
  // than it saves: one thread, one block.
  const bool tiny = num_queries * num_bank * dim < kMinParallelWork;
  // Small banks get smaller blocks so that every thread still has a few to pull.
  const int64_t per_thread = tiny ? num_bank : (num_bank + 4 * num_threads - 1) / (4 * num_threads);
  const int64_t block =
      std::min(kBankBlock, std::max<int64_t>(kChunk, (per_thread + kChunk - 1) / kChunk * kChunk));
  const int64_t num_blocks = (num_bank + block - 1) / block;
  const int64_t num_slots = tiny ? 1 : std::min(num_threads, num_blocks);

  std::vector<std::unique_ptr<Slot<index_t>>> slots(num_slots);
  std::unique_ptr<std::atomic<float>[]> shared(new std::atomic<float>[tile]);  // [QT]
  float* scores_ptr = out_scores.data_ptr<float>();
  int64_t* index_ptr = out_index.data_ptr<int64_t>();

  for (int64_t q0 = 0; q0 < num_queries; q0 += tile) {
    const int64_t rows = std::min(tile, num_queries - q0);
    // [rows, D] fp32; cosine folds 1 / max(||q||, eps) into the queries once per tile.
    at::Tensor q_tile = queries.narrow(0, q0, rows).to(at::kFloat);
    if (cosine) {
      q_tile = q_tile *
               at::linalg_vector_norm(q_tile, 2, {1}, true).clamp_min_(kNormEps).reciprocal_();
    }
    for (auto& slot : slots) {
      if (slot) {
        slot->reset();
      }
    }
    std::atomic<int64_t> next_block{0};
    for (int64_t i = 0; i < rows; ++i) {
      shared[i].store(kNegInf, std::memory_order_relaxed);
    }

    const auto work = [&](int64_t slot_id, int64_t /*unused end*/) {
      if (!slots[slot_id]) {
        slots[slot_id] = std::make_unique<Slot<index_t>>(tile, block, dim, cap, convert);
        slots[slot_id]->reset();
      }
      Slot<index_t>& slot = *slots[slot_id];
      for (int64_t b = next_block.fetch_add(1); b < num_blocks; b = next_block.fetch_add(1)) {
        slot.used = true;
        const int64_t b0 = b * block;
        const int64_t cols = std::min(block, num_bank - b0);
        at::Tensor bank_block = bank.narrow(0, b0, cols);  // [cols, D]
        if (convert) {
          bank_block = slot.block_f32.narrow(0, 0, cols).copy_(bank_block);
        }
        at::Tensor scores = slot.block_scores.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(scores, q_tile, bank_block.t());  // [rows, cols]
        if (cosine) {
          at::Tensor inv_norm =
              at::linalg_vector_norm(bank_block, 2, {1}).clamp_min_(kNormEps).reciprocal_();
          scores.mul_(inv_norm.unsqueeze(0));
        }
        const float* row = scores.data_ptr<float>();
        for (int64_t i = 0; i < rows; ++i, row += cols) {
          offer_row(row, cols, b0, k, cap, slot.list(i, cap), shared[i], slot.scratch.data());
        }
      }
    };
    if (num_slots == 1) {
      work(0, 1);
    } else {
      at::parallel_for(0, num_slots, 1, work);
    }

    at::parallel_for(0, rows, tiny ? rows : 16, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<float, int64_t>> merged;
      merged.reserve(num_slots * cap);
      const auto better = [](const std::pair<float, int64_t>& a,
                             const std::pair<float, int64_t>& b) {
        return rank_key(a.first) > rank_key(b.first);
      };
      for (int64_t i = begin; i < end; ++i) {
        merged.clear();
        for (auto& slot : slots) {
          if (slot && slot->used) {
            const CandidateList<index_t> list = slot->list(i, cap);
            for (int64_t c = 0; c < list.count; ++c) {
              merged.emplace_back(list.score[c], list.index[c]);
            }
          }
        }
        // Slots together saw the whole bank, and each kept its k best (or all it saw).
        TORCH_INTERNAL_ASSERT(static_cast<int64_t>(merged.size()) >= k);
        std::nth_element(merged.begin(), merged.begin() + (k - 1), merged.end(), better);
        std::sort(merged.begin(), merged.begin() + k, better);
        float* out_s = scores_ptr + (q0 + i) * k;
        int64_t* out_i = index_ptr + (q0 + i) * k;
        for (int64_t c = 0; c < k; ++c) {
          out_s[c] = merged[c].first;
          out_i[c] = merged[c].second;
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> topk_similarity_cpu(const at::Tensor& queries,
                                                       const at::Tensor& bank, int64_t k,
                                                       bool cosine) {
  VF_CHECK_DEVICE(queries, at::kCPU);
  VF_CHECK_DEVICE(bank, at::kCPU);
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
  const int64_t num_bank = bank.size(0);
  TORCH_CHECK(k >= 1 && k <= num_bank, "k must be in [1, N=", num_bank, "], got ", k);

  at::Tensor out_scores = at::empty({queries.size(0), k}, at::kFloat);
  at::Tensor out_index = at::empty({queries.size(0), k}, at::kLong);
  if (queries.size(0) == 0) {
    return {out_scores, out_index};
  }
  if (num_bank <= std::numeric_limits<int32_t>::max()) {
    search<int32_t>(queries, bank, k, cosine, out_scores, out_index);
  } else {
    search<int64_t>(queries, bank, k, cosine, out_scores, out_index);
  }
  return {out_scores, out_index};
}

}  // namespace

TORCH_LIBRARY_IMPL(vljepa_fast, CPU, m) { m.impl("topk_similarity", &topk_similarity_cpu); }

}  // namespace vljepa_fast
