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
// Order. Right after its GEMM a score block is rewritten in place as int32 order keys: the fp32
// bits mapped to an int32 of the same order (negative floats get their magnitude bits flipped),
// every NaN mapped to INT32_MIN (below -inf) and -0.0 to +0.0's key. Candidates are compared by
// (key descending, bank index ascending): a strict total order on distinct rows, so the top k of
// a query is one well-defined set, whatever thread saw which block and in what order: NaN scores
// rank last, equal scores go to the lowest index, and results do not depend on the thread count
// (the order documented by vljepa_fast.topk_similarity, the same as every other backend's).
// Keys decode back to the scores (a NaN comes back as the NaN with all bits set).
//
// Selection: a candidate list holds up to cap = 2k + 32 unordered (key, index) pairs and a
// threshold pair, the k-th best kept so far. Random-like data rejects nearly every score with one
// compare; a 16-wide "any key >= threshold key" SSE2 test lets the scan skip whole chunks. When
// the list fills up, nth_element cuts it back to k: O(1) amortised per accepted score even on
// adversarial (sorted) banks. Each thread also publishes the key of its lists' k-th best per
// query (an atomic max); a score whose key is below a published one is beaten by k others and
// is dropped by every thread. That roughly halves the scores taken on two threads when k is
// large.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "topk_similarity_check.h"
#include "vljepa_common.h"

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#endif

namespace vljepa_fast {
namespace {

// GEMM shape: single-threaded MKL sgemm reached about 80 GFLOP/s per core at 256 x 512 x 768 on
// an AVX2 EPYC (about 60 at 128 x 128), and the [256, 512] fp32 score block (512 KiB) fits in L2.
constexpr int64_t kQueryTile = 256;
constexpr int64_t kBankBlock = 512;
// Keys compared per "any at or above threshold" test: four SSE vectors.
constexpr int64_t kChunk = 16;
constexpr int64_t kMinParallelWork = int64_t{1} << 20;
// The key of every NaN score, below -inf's (INT32_MIN + 2^23 - 1).
constexpr int32_t kKeyNaN = std::numeric_limits<int32_t>::min();

// fp32 score -> int32 key of the same order (see the header). Branch-free, so the loop over a
// block vectorises.
inline int32_t score_key(float score) {
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  const uint32_t mag = bits & 0x7fffffffu;
  const int32_t signed_bits = static_cast<int32_t>(bits);
  int32_t key = signed_bits ^ ((signed_bits >> 31) & 0x7fffffff);
  key = mag > 0x7f800000u ? kKeyNaN : key;
  return mag == 0 ? 0 : key;
}

inline float key_score(int32_t key) {
  const int32_t bits = key ^ ((key >> 31) & 0x7fffffff);
  float score;
  std::memcpy(&score, &bits, sizeof(score));
  return score;
}

// Rewrites n fp32 scores in place as their int32 keys.
void scores_to_keys(float* scores, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int32_t key = score_key(scores[i]);
    std::memcpy(scores + i, &key, sizeof(key));
  }
}

// Compilers keep `any |= k >= t` scalar, so x86 gets SSE2 by hand (part of x86-64, no -m flag
// needed): about 0.3 cycles per key.
inline bool any_at_least(const int32_t* keys, int32_t threshold) {
#if defined(__SSE2__) || defined(_M_X64)
  const __m128i t = _mm_set1_epi32(threshold);
  __m128i hit = _mm_setzero_si128();
  for (int v = 0; v < 4; ++v) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + 4 * v));
    hit = _mm_or_si128(hit, _mm_or_si128(_mm_cmpgt_epi32(x, t), _mm_cmpeq_epi32(x, t)));
  }
  return _mm_movemask_epi8(hit) != 0;
#else
  int any = 0;
  for (int64_t j = 0; j < kChunk; ++j) {
    any |= keys[j] >= threshold;
  }
  return any != 0;
#endif
}

// One candidate: a score's key and its bank row. index_t is int32_t whenever the bank allows.
template <typename index_t>
struct Candidate {
  int32_t key;
  index_t index;
};

// The strict total order of results: larger key first, then the lower bank index.
template <typename index_t>
inline bool better(const Candidate<index_t>& a, const Candidate<index_t>& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

// Unordered candidates of one query: up to `cap` of them. Once it holds k, `threshold` is at or
// below its k-th best (in the order above) and only candidates better than it are taken.
template <typename index_t>
struct CandidateList {
  Candidate<index_t>* item;
  int64_t& count;
  Candidate<index_t>& threshold;
};

// Threshold from a published key: admits exactly the keys >= `key` (no row has the largest
// index), a superset of what the publishing list still needs.
template <typename index_t>
inline Candidate<index_t> key_threshold(int32_t key) {
  return {key, std::numeric_limits<index_t>::max()};
}

// Raises `shared` to `value` if that is larger (a relaxed atomic max).
void raise_to(std::atomic<int32_t>& shared, int32_t value) {
  int32_t current = shared.load(std::memory_order_relaxed);
  while (current < value &&
         !shared.compare_exchange_weak(current, value, std::memory_order_relaxed)) {
  }
}

// Publishes the key of the list's threshold (its k-th best) and keeps the tighter of that
// threshold and the best published key.
template <typename index_t>
void update_threshold(const CandidateList<index_t>& list, std::atomic<int32_t>& shared) {
  raise_to(shared, list.threshold.key);
  const int32_t published = shared.load(std::memory_order_relaxed);
  if (published > list.threshold.key) {
    list.threshold = key_threshold<index_t>(published);
  }
}

// Cuts a list holding `count` > k candidates back to its k best (in any order); the k-th best
// becomes the threshold. Distinct rows make the order strict, so the k kept are unique.
template <typename index_t>
void keep_best_k(const CandidateList<index_t>& list, int64_t k) {
  std::nth_element(list.item, list.item + (k - 1), list.item + list.count, better<index_t>);
  list.threshold = list.item[k - 1];
  list.count = k;
}

// Offers the keys row[0, n) of bank rows first_index + j to one query's list. `shared` is the
// largest k-th-best key any thread has published for this query: the publisher keeps k
// candidates with keys at or above it, so a key below it cannot be in the top k.
template <typename index_t>
void offer_row(const int32_t* row, int64_t n, int64_t first_index, int64_t k, int64_t cap,
               const CandidateList<index_t>& list, std::atomic<int32_t>& shared) {
  int64_t j = 0;
  if (list.count < k) {
    // Filling up: every key is taken, so the list holds k whenever its share of the bank does,
    // and the lists together always hold at least k.
    for (; j < n && list.count < k; ++j) {
      list.item[list.count] = {row[j], static_cast<index_t>(first_index + j)};
      ++list.count;
    }
    if (list.count < k) {
      return;
    }
    Candidate<index_t> worst = list.item[0];
    for (int64_t i = 1; i < k; ++i) {
      worst = better(worst, list.item[i]) ? list.item[i] : worst;
    }
    list.threshold = worst;
    update_threshold(list, shared);
  } else {
    const int32_t published = shared.load(std::memory_order_relaxed);
    if (published > list.threshold.key) {
      list.threshold = key_threshold<index_t>(published);
    }
  }
  // Appends the candidates row[from, to) (at most kChunk) better than the threshold.
  // Branch-free: in chunks that pass the any-at-least test about half the keys do, so a branch
  // would mispredict.
  const auto append_better = [&](int64_t from, int64_t to) {
    if (list.count + kChunk > cap) {
      keep_best_k(list, k);
      update_threshold(list, shared);
    }
    const Candidate<index_t> threshold = list.threshold;
    int64_t count = list.count;
    for (int64_t jj = from; jj < to; ++jj) {
      const Candidate<index_t> c{row[jj], static_cast<index_t>(first_index + jj)};
      list.item[count] = c;
      count += better(c, threshold);
    }
    list.count = count;
  };
  for (; j + kChunk <= n; j += kChunk) {
    if (any_at_least(row + j, list.threshold.key)) {
      append_better(j, j + kChunk);
    }
  }
  if (j < n) {
    append_better(j, n);
  }
}

// Everything one thread owns: its buffers and the candidate lists of the current query tile.
template <typename index_t>
struct Slot {
  Slot(int64_t tile, int64_t block, int64_t dim, int64_t cap, bool convert)
      : item(new Candidate<index_t>[tile * cap]),
        count(tile),
        threshold(tile),
        block_scores(at::empty({tile * block}, at::kFloat)),
        block_f32(convert ? at::empty({block, dim}, at::kFloat) : at::Tensor()) {}

  void reset() {
    std::fill(count.begin(), count.end(), 0);
    std::fill(threshold.begin(), threshold.end(), key_threshold<index_t>(kKeyNaN));
    used = false;
  }

  CandidateList<index_t> list(int64_t query, int64_t cap) {
    return {item.get() + query * cap, count[query], threshold[query]};
  }

  std::unique_ptr<Candidate<index_t>[]> item;     // [QT, cap], written before read
  std::vector<int64_t> count;                     // [QT]
  std::vector<Candidate<index_t>> threshold;      // [QT]
  at::Tensor block_scores;  // [QT * NB] fp32 scores, then their int32 keys in place
  at::Tensor block_f32;     // [NB, D] fp32, for fp16/bf16 banks
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
  std::unique_ptr<std::atomic<int32_t>[]> shared(new std::atomic<int32_t>[tile]);  // [QT]
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
      shared[i].store(kKeyNaN, std::memory_order_relaxed);
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
        float* block_ptr = scores.data_ptr<float>();
        scores_to_keys(block_ptr, rows * cols);
        const int32_t* row = reinterpret_cast<const int32_t*>(block_ptr);
        for (int64_t i = 0; i < rows; ++i, row += cols) {
          offer_row(row, cols, b0, k, cap, slot.list(i, cap), shared[i]);
        }
      }
    };
    if (num_slots == 1) {
      work(0, 1);
    } else {
      at::parallel_for(0, num_slots, 1, work);
    }

    at::parallel_for(0, rows, tiny ? rows : 16, [&](int64_t begin, int64_t end) {
      std::vector<Candidate<index_t>> merged;
      merged.reserve(num_slots * cap);
      for (int64_t i = begin; i < end; ++i) {
        merged.clear();
        for (auto& slot : slots) {
          if (slot && slot->used) {
            const CandidateList<index_t> list = slot->list(i, cap);
            merged.insert(merged.end(), list.item, list.item + list.count);
          }
        }
        // Slots together saw the whole bank, and each kept its k best (or all it saw).
        TORCH_INTERNAL_ASSERT(static_cast<int64_t>(merged.size()) >= k);
        std::nth_element(merged.begin(), merged.begin() + (k - 1), merged.end(), better<index_t>);
        std::sort(merged.begin(), merged.begin() + k, better<index_t>);
        float* out_s = scores_ptr + (q0 + i) * k;
        int64_t* out_i = index_ptr + (q0 + i) * k;
        for (int64_t c = 0; c < k; ++c) {
          out_s[c] = key_score(merged[c].key);
          out_i[c] = merged[c].index;
        }
      }
    });
  }
}

// path and chunk (the GPU kernels' plan) are checked and ignored: this kernel tiles for the cache.
std::tuple<at::Tensor, at::Tensor> topk_similarity_cpu(const at::Tensor& queries,
                                                       const at::Tensor& bank, int64_t k,
                                                       bool cosine, int64_t path, int64_t chunk) {
  // The ATen calls below (mm_out into a buffer) must not record autograd history even when an
  // input requires grad: vljepa_fast/ops/topk_similarity.py attaches the scores' gradient.
  const at::NoGradGuard no_grad;
  check_topk_similarity_call(queries, bank, k, path, chunk, at::kCPU);
  const int64_t num_bank = bank.size(0);

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
