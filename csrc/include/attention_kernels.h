// Flash attention (forward and backward) on CUTLASS's CuTe, the `cuda` backend of
// vf.attention / vf.attention_varlen: GQA, right key padding (per-batch key lengths), padded
// queries (per-batch query lengths), packed varlen sequences, bottom-right causal and sliding
// windows, fp16 and bf16, head dims 64 and 128. Semantics are those of kernels/attention.py (the
// Triton backend): read its header for the math, the window convention and the NaN rules.
//
// Algorithm (FlashAttention-2). Tensor-core products are CuTe MMA atoms SM80_16x8x16 (mma.sync,
// 16-bit operands, fp32 accumulators); the same code runs on sm_80 and sm_90a (mma.sync is native
// on Hopper too, at about 2/3 of wgmma's peak). Global tiles go to shared memory with cp.async
// (16-byte packs, rows past a sequence's length zero-filled, never read), two stages, into
// swizzled K-major layouts (Swizzle<3,3,3> over 8 x 64 atoms: ldmatrix of 8 rows hits 8 distinct
// bank groups); shared -> registers with ldmatrix (ldmatrix.trans for the operands that are read
// transposed: V in P V, K in dS K, Q and dO in the dK and dV products).
//  * Forward: one CTA per (query block of 128 rows, query head, sequence), 4 warps of 32 rows
//    (D = 64) or 8 warps of 16 rows (D = 128). It walks the key blocks of 64 that meet the rows'
//    window (blocks outside it are never loaded), S = Q K^T in registers, online softmax in
//    base 2:
//    p = exp2(s * scale * log2e - m) is one FMA and one MUFU.EX2 per score (m is the running max
//    in scaled units, starting at the lowest finite float, so the softmax is the plain one for
//    scores of any size), P is converted to 16 bits in registers and is directly the A operand
//    of O += P V (the C fragment of 16x8x16 equals its A fragment). Masks are evaluated only on
//    the blocks that need them (last partial key block, causal diagonal, window edges).
//  * Backward: delta = rowsum(do * o) (attention_delta_kernel), then one CTA of 4 warps per (key
//    block of 64, KV head, sequence) loops over the G query heads of its group and the query
//    blocks of 32 (D = 128: 16) that see the block; it computes S^T = K Q^T and dP^T = V dO^T
//    with the keys as rows, so that P^T and dS^T = P^T (dP^T - delta) are, in registers, the A
//    operands of dV += P^T dO and dK += dS^T Q: dK and dV stay in fp32 registers for the whole
//    loop and are written once (no atomics on them; GQA K/V never expanded). dQ: fast path, dS
//    goes to shared memory and dQ_block = dS K is added to an fp32 buffer with atomics (5
//    products per block pair); deterministic path
//    (torch.are_deterministic_algorithms_enabled(), passed down as `deterministic`), a separate
//    kernel per (query block, query head) recomputes S and dP
//    and accumulates dQ in registers over the key blocks in a fixed order (7 products), so every
//    gradient is bitwise reproducible.
//
// Tiles and why (each thread's fp32 accumulators must stay in its 255 registers). Forward
// 128 x 64 x D: S is 64 (D = 64, 4 warps) or 32 (D = 128, 8 warps) floats per thread and O 64
// either way (4 warps at D = 128 held 128 floats of O and spilled); two K/V stages overlap the
// next block's loads with the current products; shared memory 48 KiB (D = 64: two CTAs per SM)
// or 96 KiB. dK/dV: 64 keys per CTA (4 warps, 16 key rows each), 32 (D = 64) or 16 (D = 128)
// queries per step: dK and dV take 32 + 32 (D = 64) or 64 + 64 (D = 128) floats per thread, S^T
// and dP^T 16 or 8 each (wider steps spilled); dQ of a step is formed 64 columns at a time (16
// floats), at D = 128 the dK/dV products load one k-slice of their 128-wide B operand at a time
// (two spilled), and the query head and block of a step are running counters, not it / n_m and
// it % n_m (the divisions' temporaries cost the register that spilled at D = 128 on sm_80).
// Deterministic dQ kernel: 64 queries x 64 keys, dQ 32 or 64 floats per thread. ptxas's reports
// are checked by tests/test_attention_cuda.py (compile tier: no spills on sm_80 and sm_90a).
//
// Cost per call (non-causal, no window, T = S = L per sequence, Hq query heads, head dim D, 16-bit
// element of 2 bytes):
//  * FLOPs: forward 4 L^2 D Hq per sequence (two products); backward fast path 10 L^2 D Hq (five
//    products), deterministic 14 L^2 D Hq (seven). exp2 per score: 1 forward, 1 (fast) or 2
//    (deterministic) backward.
//  * HBM bytes: forward Q and O once (2 L Hq D x 2 B) plus K/V once per query block and head
//    (2 L Hkv D x 2 B x L/128 x G: mostly L2 hits, as the 4 heads of a group run side by side);
//    backward Q, dO once per key block (L2) and dK, dV, dQ once, plus the fp32 dQ atomics
//    (L Hq D x 4 B per key block, absorbed by L2's reduction units).
//  * Predicted H200 time at B = 8, T = S = 4608, Hq = 32, Hkv = 8, D = 64 (a prediction from the
//    code, never a measurement): forward 4 x 4608^2 x 64 x 32 x 8 = 1.39 TFLOP. mma.sync peaks
//    near 660 TFLOP/s dense 16-bit on H200 (2/3 of wgmma's 989) and an FA2-style kernel reaches
//    about half of it on Hopper; the exponentials (8 x 32 x 4608^2 = 5.4e9 at ~3.9e12/s of
//    MUFU) take 1.4 ms alone and overlap the MMAs only partly at D = 64. Forward ~ 1.39 / 330e12
//    = 4.2 ms, likely 4.5 - 5 ms; backward (fast path, 3.48 TFLOP at ~ 250 TFLOP/s) ~ 14 ms,
//    deterministic (4.87 TFLOP) ~ 20 ms. HBM traffic is small against that: ~ 0.3 GB forward
//    (0.1 ms at 4.8 TB/s).
//
// Non-finite inputs (the NaN rule of docs/attention.md): as Triton. A row that attends to no key
// gets out 0 and lse -inf; a row with a NaN or +inf score, or whose every score is -inf, gets NaN.
// Padded keys (rows >= the key length) and padded queries (rows >= the query length) are never
// loaded: their shared memory rows are zero. Gradients of non-finite inputs are unspecified.
//
// Memory safety: the host checks (csrc/include/attention_check.h) fix every tensor's shape,
// dtype, strides and alignment; the kernels clamp each sequence's rows (seqlens, cu_seqlens)
// into the tensors, compute element offsets in int64, and guard every global load and store with
// the row bounds, so no argument can make them touch memory outside a tensor.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention_launch.h"
#include "vljepa_cuda.h"

namespace vljepa_fast {
namespace {

using namespace cute;
using attention::AttnParams;
using attention::kLog2e;
using attention::kLn2;
using attention::kLowest;

// Rows of one sequence: starts (rows of the packed tensors), lengths used for the bottom-right
// alignment (t, s) and the real rows (q_len <= t, k_len <= s), all clamped into the tensors.
struct SeqRows {
  int64_t bos_q, bos_k;
  int t, s, q_len, k_len;
};

__device__ __forceinline__ int clampi(int x, int lo, int hi) { return min(max(x, lo), hi); }

__device__ __forceinline__ SeqRows seq_rows(const AttnParams& p, int b) {
  SeqRows r;
  if (p.varlen) {
    const int bq = clampi(p.cu_q[b], 0, p.rows_q);
    const int bk = clampi(p.cu_k[b], 0, p.rows_k);
    r.bos_q = bq;
    r.bos_k = bk;
    r.t = clampi(p.cu_q[b + 1], bq, p.rows_q) - bq;
    r.s = clampi(p.cu_k[b + 1], bk, p.rows_k) - bk;
    r.q_len = r.t;
    r.k_len = r.s;
  } else {
    r.bos_q = 0;
    r.bos_k = 0;
    r.t = p.rows_q;
    r.s = p.rows_k;
    r.q_len = p.seqlens_q != nullptr ? clampi(p.seqlens_q[b], 0, r.t) : r.t;
    r.k_len = p.seqlens_k != nullptr ? clampi(p.seqlens_k[b], 0, r.s) : r.s;
  }
  return r;
}

// The window of one sequence: query i sees key j iff j < k_len, (right) j <= i + hi_off and
// (left) j >= i + lo_off; rows >= q_len see nothing.
struct Window {
  int lo_off, hi_off, q_len, k_len;
  bool left, right;

  __device__ __forceinline__ bool visible(int i, int j) const {
    return i < q_len && j < k_len && (!right || j <= i + hi_off) && (!left || j >= i + lo_off);
  }
  // whether row i sees at least one key
  __device__ __forceinline__ bool has_key(int i) const {
    int end = k_len;
    if (right) end = min(end, i + hi_off + 1);
    const int lo = left ? max(i + lo_off, 0) : 0;
    return i < q_len && lo < end;
  }
  // whether the (rows [m0, m0 + bm), keys [n0, n0 + bn)) tile needs the elementwise mask
  __device__ __forceinline__ bool needs_mask(int m0, int bm, int n0, int bn) const {
    return m0 + bm > q_len || n0 + bn > k_len || (right && n0 + bn - 1 > m0 + hi_off) ||
           (left && n0 < m0 + bm - 1 + lo_off);
  }
  // keys [lo, hi) that rows [m0, m_end) may see (m0 < m_end)
  __device__ __forceinline__ void key_range(int m0, int m_end, int& lo, int& hi) const {
    hi = k_len;
    if (right) hi = min(hi, max(0, m_end - 1 + hi_off + 1));
    lo = left ? min(max(0, m0 + lo_off), hi) : 0;
  }
  // queries [lo, hi) that may see keys [n0, n_end) (n0 < n_end)
  __device__ __forceinline__ void query_range(int n0, int n_end, int& lo, int& hi) const {
    hi = q_len;
    if (left) hi = min(hi, max(0, n_end - 1 - lo_off + 1));
    lo = right ? min(max(0, n0 - hi_off), hi) : 0;
  }
  // The key blocks of bn that rows [m0, m0 + bm) visit: the first at lo (a multiple of bn),
  // returns how many (0 for rows past q_len).
  __device__ __forceinline__ int key_blocks(int m0, int bm, int bn, int& lo) const {
    lo = 0;
    if (m0 >= q_len) return 0;
    int hi;
    key_range(m0, min(m0 + bm, q_len), lo, hi);
    lo = lo / bn * bn;
    return hi > lo ? (hi - lo + bn - 1) / bn : 0;
  }
  // The query blocks of bm that see keys [n0, n0 + bn): the first at lo, returns how many.
  __device__ __forceinline__ int query_blocks(int n0, int bn, int bm, int& lo) const {
    lo = 0;
    if (n0 >= k_len) return 0;
    int hi;
    query_range(n0, min(n0 + bn, k_len), lo, hi);
    lo = lo / bm * bm;
    return hi > lo ? (hi - lo + bm - 1) / bm : 0;
  }
};

__device__ __forceinline__ Window seq_window(const AttnParams& p, const SeqRows& r) {
  Window w;
  w.lo_off = r.s - r.t - p.win_left;
  w.hi_off = r.s - r.t + p.win_right;
  w.q_len = r.q_len;
  w.k_len = r.k_len;
  w.left = p.left;
  w.right = p.right;
  return w;
}

// ------------------------------------------------------------------------- device helpers

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 2);
  return x + __shfl_xor_sync(kFullMask, x, 1);
}

// The accumulator layout of SM80 16x8 MMAs ((2, 2), MMA_M, MMA_N) viewed as (rows, cols):
// ((2, MMA_M), (2, MMA_N)).
template <class L>
__device__ __forceinline__ constexpr auto rowcol(L const& l) {
  static_assert(decltype(rank(l))::value == 3, "an MMA accumulator layout");
  auto d = logical_divide(l, Shape<_2>{});
  return make_layout(make_layout(get<0, 1>(d), get<1>(d)), make_layout(get<0, 0>(d), get<2>(d)));
}

// The same accumulator as the A operand of a 16x8x16 MMA whose K is the accumulator's N:
// ((2, 2, 2), MMA_M, MMA_N / 2).
template <class L>
__device__ __forceinline__ constexpr auto acc_as_a(L const& l) {
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// dst = src converted element by element (same static layout, register tensors).
template <class Dst, class Src>
__device__ __forceinline__ void convert_into(Dst& dst, Src const& src) {
  using To = typename Dst::value_type;
  using From = typename Src::value_type;
  constexpr int kN = decltype(size(src))::value;
  static_assert(decltype(size(dst))::value == kN, "same size");
  cutlass::NumericArrayConverter<To, From, kN> conv;
  *reinterpret_cast<cutlass::Array<To, kN>*>(dst.data()) =
      conv(*reinterpret_cast<const cutlass::Array<From, kN>*>(src.data()));
}

// One step of the two-stage cp.async pipeline: issue the next stage's loads (when there is one),
// then wait for the current stage's and make them visible to the whole CTA.
template <class Load>
__device__ __forceinline__ void next_stage(bool has_next, Load&& load_next) {
  if (has_next) {
    load_next();
    cp_async_fence();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// acc += A B^T with both operands read from shared memory, the next k-slice loaded while the
// current one multiplies.
template <class Mma, class Acc, class RA, class RB, class SA, class SB, class CA, class TA,
          class CB, class TB>
__device__ __forceinline__ void gemm_ss(Mma& mma, Acc& acc, RA& ra, RB& rb, SA const& sa,
                                        SB const& sb, CA const& cpa, TA const& tha,
                                        CB const& cpb, TB const& thb) {
  Tensor ra_v = tha.retile_D(ra);
  Tensor rb_v = thb.retile_D(rb);
  copy(cpa, sa(_, _, 0), ra_v(_, _, 0));
  copy(cpb, sb(_, _, 0), rb_v(_, _, 0));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(ra); ++i) {
    if (i + 1 < size<2>(ra)) {
      copy(cpa, sa(_, _, i + 1), ra_v(_, _, i + 1));
      copy(cpb, sb(_, _, i + 1), rb_v(_, _, i + 1));
    }
    gemm(mma, ra(_, _, i), rb(_, _, i), acc);
  }
}

// acc += A B^T with A in registers (an accumulator turned operand) and B from shared memory.
// kPrefetch: load the next k-slice of B while the current one multiplies (off where B's slices
// are so wide that two of them cost spills: the D = 128 dK and dV products, 32 registers each).
template <bool kPrefetch = true, class Mma, class Acc, class RA, class RB, class SB, class CB,
          class TB>
__device__ __forceinline__ void gemm_rs(Mma& mma, Acc& acc, RA const& ra, RB& rb, SB const& sb,
                                        CB const& cpb, TB const& thb) {
  Tensor rb_v = thb.retile_D(rb);
  if (kPrefetch) copy(cpb, sb(_, _, 0), rb_v(_, _, 0));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(ra); ++i) {
    if (!kPrefetch) {
      copy(cpb, sb(_, _, i), rb_v(_, _, i));
    } else if (i + 1 < size<2>(ra)) {
      copy(cpb, sb(_, _, i + 1), rb_v(_, _, i + 1));
    }
    gemm(mma, ra(_, _, i), rb(_, _, i), acc);
  }
}

// ---------------------------------------------------------------------------- tile types

template <class Elem_, int kD, int kBM, int kBN, int kWarps_ = 4>
struct Tiles {
  using Elem = Elem_;
  static constexpr int D = kD;
  static constexpr int BM = kBM;
  static constexpr int BN = kBN;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  using Atom = std::conditional_t<std::is_same<Elem, cutlass::half_t>::value,
                                  SM80_16x8x16_F32F16F16F32_TN, SM80_16x8x16_F32BF16BF16F32_TN>;
  // warps stacked along M (16 rows each), N tiled by 16 so that one ldmatrix.x4 feeds two atoms
  using Mma = TiledMMA<MMA_Atom<Atom>, Layout<Shape<Int<kWarps>, _1, _1>>,
                       Tile<Int<16 * kWarps>, _16, _16>>;
  // products with BM rows (dQ = dS K in the dK/dV kernel): BM / 16 warps along M, the rest along N
  static constexpr int kWarpsM = BM / 16 < kWarps ? BM / 16 : kWarps;
  using MmaRows = TiledMMA<MMA_Atom<Atom>, Layout<Shape<Int<kWarpsM>, Int<kWarps / kWarpsM>, _1>>,
                           Tile<Int<16 * kWarpsM>, Int<16 * (kWarps / kWarpsM)>, _16>>;
  // 8 rows x 64 elements (128 bytes a row), XOR-swizzled in 16-byte units
  using SmemAtom =
      decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  // 16-byte cp.async packs, 8 threads per 64 columns
  using GmemCopy = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Elem>{},
      Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>{}, Layout<Shape<_1, _8>>{}));
  using LdsmN = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using LdsmT = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;

  // [R, D] tiles (K-major), one or two stages, and their transposed views [D, R]
  template <int R>
  using Rows = decltype(tile_to_shape(SmemAtom{}, Shape<Int<R>, Int<D>>{}));
  template <int R>
  using Rows2 = decltype(tile_to_shape(SmemAtom{}, Shape<Int<R>, Int<D>, _2>{}));
  template <int R>
  using RowsT =
      decltype(composition(Rows<R>{}, Layout<Shape<Int<D>, Int<R>>, Stride<Int<R>, _1>>{}));
  template <int R>
  using Rows2T = decltype(composition(
      Rows2<R>{}, Layout<Shape<Int<D>, Int<R>, _2>, Stride<Int<R>, _1, Int<R * D>>>{}));
  template <class L>
  static constexpr int elems() {
    return decltype(size(L{}))::value;
  }
};

// Global row tile [R, D] at `base` (row stride rs) -> shared `dst`; rows >= n_rows are zero
// (never read).
template <class Tr, int R, class Dst>
__device__ __forceinline__ void load_rows(const typename Tr::Elem* base, int64_t rs, int n_rows,
                                          Dst dst, int tid) {
  typename Tr::GmemCopy gcopy;
  auto thr = gcopy.get_thread_slice(tid);
  Tensor g = make_tensor(make_gmem_ptr(base), Shape<Int<R>, Int<Tr::D>>{}, make_stride(rs, _1{}));
  Tensor ts = thr.partition_S(g);
  Tensor td = thr.partition_D(dst);
  Tensor tc = thr.partition_S(make_identity_tensor(Shape<Int<R>, Int<Tr::D>>{}));
  CUTE_UNROLL
  for (int m = 0; m < size<1>(ts); ++m) {
    if (get<0>(tc(0, m, 0)) < n_rows) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(ts); ++k) {
        copy(gcopy, ts(_, m, k), td(_, m, k));
      }
    } else {
      clear(td(_, m, _));
    }
  }
}

// Stores a [R, C] fp32 accumulator (rows from row0, rows >= n_rows skipped) as Elem, times mul.
template <class Elem, class Acc, class Coord>
__device__ __forceinline__ void store_acc(Elem* base, int64_t rs, int row0, int n_rows,
                                          Acc const& acc, Coord const& coord, float mul) {
  Tensor a = make_tensor(acc.data(), rowcol(acc.layout()));
  Tensor c = make_tensor(coord.data(), rowcol(coord.layout()));
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(a); ++mi) {
    const int row = row0 + get<0>(c(mi, 0));
    if (row < n_rows) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(a); ++ni) {
        base[int64_t(row) * rs + get<1>(c(mi, ni))] = Elem(a(mi, ni) * mul);
      }
    }
  }
}

// ------------------------------------------------------------------------------- forward

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) attention_fwd_kernel(const AttnParams p) {
  using Elem = typename Tr::Elem;
  constexpr int BM = Tr::BM, BN = Tr::BN, D = Tr::D;
  using LQ = typename Tr::template Rows<BM>;
  using LKV = typename Tr::template Rows2<BN>;
  using LVt = typename Tr::template Rows2T<BN>;
  extern __shared__ __align__(1024) unsigned char smem[];
  const int tid = threadIdx.x;
  const int blk = blockIdx.x % p.n_blocks;
  const int bh = blockIdx.x / p.n_blocks;
  const int b = bh / p.hq;
  const int h = bh % p.hq;
  const SeqRows sr = seq_rows(p, b);
  const Window w = seq_window(p, sr);
  const int m0 = blk * BM;
  if (m0 >= sr.t) return;

  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_b + (sr.bos_q + m0) * p.q_r + h * p.q_h;
  const int hk = h / p.group;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_b + sr.bos_k * p.k_r + hk * p.k_h;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_b + sr.bos_k * p.v_r + hk * p.v_h;

  Elem* sq_ptr = reinterpret_cast<Elem*>(smem);
  Elem* sk_ptr = sq_ptr + Tr::template elems<LQ>();
  Elem* sv_ptr = sk_ptr + Tr::template elems<LKV>();
  Tensor sQ = make_tensor(make_smem_ptr(sq_ptr), LQ{});
  Tensor sK = make_tensor(make_smem_ptr(sk_ptr), LKV{});
  Tensor sV = make_tensor(make_smem_ptr(sv_ptr), LKV{});
  Tensor sVt = make_tensor(make_smem_ptr(sv_ptr), LVt{});

  typename Tr::Mma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor rQ = thr_mma.partition_fragment_A(sQ);
  Tensor rK = thr_mma.partition_fragment_B(sK(_, _, 0));
  Tensor rVt = thr_mma.partition_fragment_B(sVt(_, _, 0));
  auto cp_q = make_tiled_copy_A(typename Tr::LdsmN{}, mma);
  auto th_q = cp_q.get_thread_slice(tid);
  auto cp_k = make_tiled_copy_B(typename Tr::LdsmN{}, mma);
  auto th_k = cp_k.get_thread_slice(tid);
  auto cp_v = make_tiled_copy_B(typename Tr::LdsmT{}, mma);
  auto th_v = cp_v.get_thread_slice(tid);
  Tensor tsQ = th_q.partition_S(sQ);
  Tensor tsK = th_k.partition_S(sK);
  Tensor tsVt = th_v.partition_S(sVt);

  Tensor acc_o = partition_fragment_C(mma, Shape<Int<BM>, Int<D>>{});
  clear(acc_o);
  Tensor o_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  Tensor c_s = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor cs_rc = make_tensor(c_s.data(), rowcol(c_s.layout()));
  constexpr int kRows = decltype(size<0>(o_rc))::value;
  float m_run[kRows];
  float l_run[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    m_run[i] = kLowest;
    l_run[i] = 0.0f;
  }

  int lo;
  const int n_iter = w.key_blocks(m0, BM, BN, lo);
  auto load_kv = [&](int n0, int st) {
    load_rows<Tr, BN>(k + int64_t(n0) * p.k_r, p.k_r, w.k_len - n0, sK(_, _, st), tid);
    load_rows<Tr, BN>(v + int64_t(n0) * p.v_r, p.v_r, w.k_len - n0, sV(_, _, st), tid);
  };
  if (n_iter > 0) {
    load_rows<Tr, BM>(q, p.q_r, w.q_len - m0, sQ, tid);
    load_kv(lo, 0);
    cp_async_fence();
  }
  const float sc = p.scale_log2;
  for (int it = 0; it < n_iter; ++it) {
    const int n0 = lo + it * BN;
    const int st = it & 1;
    next_stage(it + 1 < n_iter, [&] { load_kv(n0 + BN, st ^ 1); });
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
    clear(acc_s);
    gemm_ss(mma, acc_s, rQ, rK, tsQ, tsK(_, _, _, st), cp_q, th_q, cp_k, th_k);
    Tensor s = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    if (w.needs_mask(m0, BM, n0, BN)) {
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(s); ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < size<1>(s); ++ni) {
          const auto c = cs_rc(mi, ni);
          if (!w.visible(m0 + get<0>(c), n0 + get<1>(c))) s(mi, ni) = -INFINITY;
        }
      }
    }
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(s); ++mi) {
      float mx = s(mi, 0);
      CUTE_UNROLL
      for (int ni = 1; ni < size<1>(s); ++ni) mx = fmaxf(mx, s(mi, ni));
      // scaled running max: never below the lowest finite float (a row with only -inf scores
      // so far keeps it, and exp2(-inf - finite) = 0, never -inf - -inf = NaN)
      const float m_new = fmaxf(m_run[mi], quad_max(mx) * sc);
      const float alpha = ex2(m_run[mi] - m_new);
      m_run[mi] = m_new;
      float sum = 0.0f;
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        const float pv = ex2(fmaf(s(mi, ni), sc, -m_new));
        s(mi, ni) = pv;
        sum += pv;
      }
      l_run[mi] = l_run[mi] * alpha + sum;
      CUTE_UNROLL
      for (int di = 0; di < size<1>(o_rc); ++di) o_rc(mi, di) *= alpha;
    }
    Tensor p16 = make_tensor<Elem>(acc_s.layout());
    convert_into(p16, acc_s);
    Tensor pa = make_tensor(p16.data(), acc_as_a(p16.layout()));
    gemm_rs(mma, acc_o, pa, rVt, tsVt(_, _, _, st), cp_v, th_v);
    __syncthreads();  // stage st is refilled by the next iteration's load
  }

  // out = acc / l; rows without a key: 0 and lse -inf; a row with keys but l = 0 or NaN: NaN
  Elem* o = static_cast<Elem*>(p.o) + b * p.o_b + (sr.bos_q + m0) * p.o_r + h * p.o_h;
  float* lse = p.lse + b * p.lse_b + h * p.lse_h + sr.bos_q + m0;
  const float nan = __int_as_float(0x7fc00000);
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int r = get<0>(cs_rc(mi, 0));
    const float l = quad_sum(l_run[mi]);
    const bool has = w.has_key(m0 + r);
    const bool seen = l > 0.0f;
    const float inv = seen ? 1.0f / l : 1.0f;
    CUTE_UNROLL
    for (int di = 0; di < size<1>(o_rc); ++di) {
      o_rc(mi, di) = has && seen ? o_rc(mi, di) * inv : (has ? nan : 0.0f);
    }
    if (tid % 4 == 0 && m0 + r < sr.t) {
      const float val = seen ? (m_run[mi] + log2f(l)) * kLn2 : nan;
      lse[r] = has ? val : -INFINITY;
    }
  }
  Tensor c_o = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  store_acc(o, p.o_r, 0, sr.t - m0, acc_o, c_o, 1.0f);
}

// --------------------------------------------------------------------------- backward: delta

// delta[row, h] = sum_d do * out in fp32; one warp per (row, head) of the packed rows.
template <class Elem, int D>
__global__ void __launch_bounds__(256) attention_delta_kernel(const AttnParams p, int64_t n_rows) {
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (wid >= n_rows * p.hq) return;
  const int h = int(wid % p.hq);
  const int64_t row = wid / p.hq;  // dense: b * T + t; varlen: the packed row
  const int64_t b = p.varlen ? 0 : row / p.rows_q;
  const int64_t t = p.varlen ? row : row % p.rows_q;
  const Elem* dout = static_cast<const Elem*>(p.dout) + b * p.do_b + t * p.do_r + h * p.do_h;
  const Elem* o = static_cast<const Elem*>(p.o) + b * p.o_b + t * p.o_r + h * p.o_h;
  float acc = 0.0f;
  CUTE_UNROLL
  for (int e = 0; e < D / 32; ++e) {
    acc += float(dout[lane + 32 * e]) * float(o[lane + 32 * e]);
  }
  acc = warp_sum(acc);
  if (lane == 0) p.delta[b * p.lse_b + h * p.lse_h + t] = acc;
}

// ----------------------------------------------------------------------- backward: dK, dV

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) attention_dkdv_kernel(const AttnParams p) {
  using Elem = typename Tr::Elem;
  constexpr int BM = Tr::BM, BN = Tr::BN, D = Tr::D;
  using LK = typename Tr::template Rows<BN>;
  using LKt = typename Tr::template RowsT<BN>;
  using LQ = typename Tr::template Rows2<BM>;
  using LQt = typename Tr::template Rows2T<BM>;
  // dS [BM, BN] (BN = 64 columns: one swizzle atom wide) and its transposed view [BN, BM]
  using LdS = decltype(tile_to_shape(typename Tr::SmemAtom{}, Shape<Int<BM>, Int<BN>>{}));
  using LdSt = decltype(composition(LdS{}, Layout<Shape<Int<BN>, Int<BM>>, Stride<Int<BM>, _1>>{}));
  static_assert(BN == 64, "dS tiles are one swizzle atom wide");
  extern __shared__ __align__(1024) unsigned char smem[];
  const int tid = threadIdx.x;
  const int blk = blockIdx.x % p.n_blocks;
  const int bh = blockIdx.x / p.n_blocks;
  const int b = bh / p.hkv;
  const int hk = bh % p.hkv;
  const SeqRows sr = seq_rows(p, b);
  const Window w = seq_window(p, sr);
  const int n0 = blk * BN;
  if (n0 >= sr.s) return;

  Elem* sk_ptr = reinterpret_cast<Elem*>(smem);
  Elem* sv_ptr = sk_ptr + Tr::template elems<LK>();
  Elem* sq_ptr = sv_ptr + Tr::template elems<LK>();
  Elem* sdo_ptr = sq_ptr + Tr::template elems<LQ>();
  Elem* sds_ptr = sdo_ptr + Tr::template elems<LQ>();
  float* s_lse = reinterpret_cast<float*>(sds_ptr + Tr::template elems<LdS>());  // [2][BM]
  float* s_delta = s_lse + 2 * BM;  // [2][BM]
  Tensor sK = make_tensor(make_smem_ptr(sk_ptr), LK{});
  Tensor sKt = make_tensor(make_smem_ptr(sk_ptr), LKt{});
  Tensor sV = make_tensor(make_smem_ptr(sv_ptr), LK{});
  Tensor sQ = make_tensor(make_smem_ptr(sq_ptr), LQ{});
  Tensor sQt = make_tensor(make_smem_ptr(sq_ptr), LQt{});
  Tensor sdO = make_tensor(make_smem_ptr(sdo_ptr), LQ{});
  Tensor sdOt = make_tensor(make_smem_ptr(sdo_ptr), LQt{});
  Tensor sdS = make_tensor(make_smem_ptr(sds_ptr), LdS{});
  Tensor sdSt = make_tensor(make_smem_ptr(sds_ptr), LdSt{});

  typename Tr::Mma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  auto cp_an = make_tiled_copy_A(typename Tr::LdsmN{}, mma);
  auto th_an = cp_an.get_thread_slice(tid);
  auto cp_bn = make_tiled_copy_B(typename Tr::LdsmN{}, mma);
  auto th_bn = cp_bn.get_thread_slice(tid);
  auto cp_bt = make_tiled_copy_B(typename Tr::LdsmT{}, mma);
  auto th_bt = cp_bt.get_thread_slice(tid);
  // S^T = K Q^T, dP^T = V dO^T: A = K, V; B = Q, dO
  Tensor rK = thr_mma.partition_fragment_A(sK);
  Tensor rV = thr_mma.partition_fragment_A(sV);
  Tensor rQ = thr_mma.partition_fragment_B(sQ(_, _, 0));
  Tensor rdO = thr_mma.partition_fragment_B(sdO(_, _, 0));
  Tensor tsK = th_an.partition_S(sK);
  Tensor tsV = th_an.partition_S(sV);
  Tensor tsQ = th_bn.partition_S(sQ);
  Tensor tsdO = th_bn.partition_S(sdO);
  // dV += P^T dO, dK += dS^T Q: B = dO^T, Q^T (read transposed)
  Tensor rdOt = thr_mma.partition_fragment_B(sdOt(_, _, 0));
  Tensor rQt = thr_mma.partition_fragment_B(sQt(_, _, 0));
  Tensor tsdOt = th_bt.partition_S(sdOt);
  Tensor tsQt = th_bt.partition_S(sQt);
  // dQ = dS K (fast path): A = dS, B = K^T (read transposed), in the loop with Tr::MmaRows
  Tensor tdS_st = thr_mma.partition_C(sdSt);

  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<BN>, Int<D>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<BN>, Int<D>>{});
  clear(acc_dk);
  clear(acc_dv);
  Tensor c_st = thr_mma.partition_C(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
  Tensor cst_rc = make_tensor(c_st.data(), rowcol(c_st.layout()));

  int q_lo;
  const int n_m = w.query_blocks(n0, BN, BM, q_lo);
  const int n_iter = n_m * p.group;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_b + (sr.bos_k + n0) * p.k_r + hk * p.k_h;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_b + (sr.bos_k + n0) * p.v_r + hk * p.v_h;
  // iteration it: query head hk * G + it / n_m, query block q_lo + (it % n_m) * BM, kept as
  // running counters (a division by the runtime n_m per iteration costs registers at the peak)
  auto load_q = [&](int h, int m0, int st) {
    const int64_t row0 = sr.bos_q + m0;
    const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_b + row0 * p.q_r + h * p.q_h;
    const Elem* dout = static_cast<const Elem*>(p.dout) + b * p.do_b + row0 * p.do_r + h * p.do_h;
    load_rows<Tr, BM>(q, p.q_r, w.q_len - m0, sQ(_, _, st), tid);
    load_rows<Tr, BM>(dout, p.do_r, w.q_len - m0, sdO(_, _, st), tid);
    if (tid < BM) {
      float l2 = 0.0f, dl = 0.0f;
      if (m0 + tid < w.q_len) {
        const int64_t off = b * p.lse_b + h * p.lse_h + row0 + tid;
        const float l = p.lse[off];
        // a row without keys has lse -inf: read as 0 so that its (masked) p stays finite
        l2 = l == -INFINITY ? 0.0f : l * kLog2e;
        dl = p.delta[off];
      }
      s_lse[st * BM + tid] = l2;
      s_delta[st * BM + tid] = dl;
    }
  };
  if (n_iter > 0) {
    load_rows<Tr, BN>(k, p.k_r, w.k_len - n0, sK, tid);
    load_rows<Tr, BN>(v, p.v_r, w.k_len - n0, sV, tid);
    load_q(hk * p.group, q_lo, 0);
    cp_async_fence();
  }
  const float sc = p.scale_log2;
  const int q_end = q_lo + n_m * BM;
  int h = hk * p.group, m0 = q_lo;
  for (int it = 0; it < n_iter; ++it) {
    const int st = it & 1;
    int h_next = h, m_next = m0 + BM;
    if (m_next == q_end) {
      m_next = q_lo;
      ++h_next;
    }
    next_stage(it + 1 < n_iter, [&] { load_q(h_next, m_next, st ^ 1); });
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<BN>, Int<BM>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<BN>, Int<BM>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(mma, acc_s, rK, rQ, tsK, tsQ(_, _, _, st), cp_an, th_an, cp_bn, th_bn);
    gemm_ss(mma, acc_dp, rV, rdO, tsV, tsdO(_, _, _, st), cp_an, th_an, cp_bn, th_bn);
    Tensor s = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    const bool mask = w.needs_mask(m0, BM, n0, BN);
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(s); ++ni) {
      const int c = get<1>(cst_rc(0, ni));  // query column (the same for every row mi)
      const float l2 = s_lse[st * BM + c];
      const float dl = s_delta[st * BM + c];
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(s); ++mi) {
        float pv = ex2(fmaf(s(mi, ni), sc, -l2));
        if (mask && !w.visible(m0 + c, n0 + get<0>(cst_rc(mi, ni)))) pv = 0.0f;
        s(mi, ni) = pv;
        dp(mi, ni) = pv * (dp(mi, ni) - dl);
      }
    }
    Tensor p16 = make_tensor<Elem>(acc_s.layout());
    convert_into(p16, acc_s);
    constexpr bool kPrefetch = D <= 64;
    gemm_rs<kPrefetch>(mma, acc_dv, make_tensor(p16.data(), acc_as_a(p16.layout())), rdOt,
            tsdOt(_, _, _, st), cp_bt, th_bt);
    Tensor ds16 = make_tensor<Elem>(acc_dp.layout());
    convert_into(ds16, acc_dp);
    gemm_rs<kPrefetch>(mma, acc_dk, make_tensor(ds16.data(), acc_as_a(ds16.layout())), rQt,
            tsQt(_, _, _, st), cp_bt, th_bt);
    if (p.atomic_dq) {
      copy(ds16, tdS_st);
      __syncthreads();
      typename Tr::MmaRows mma_q;
      auto thr_q = mma_q.get_thread_slice(tid);
      auto cp_qa = make_tiled_copy_A(typename Tr::LdsmN{}, mma_q);
      auto th_qa = cp_qa.get_thread_slice(tid);
      auto cp_qb = make_tiled_copy_B(typename Tr::LdsmT{}, mma_q);
      auto th_qb = cp_qb.get_thread_slice(tid);
      Tensor rdS = thr_q.partition_fragment_A(sdS);
      Tensor tsdS = th_qa.partition_S(sdS);
      float* dq = p.dq_acc + b * p.dq_b + (sr.bos_q + m0) * p.dq_r + h * p.dq_h;
      // 64 columns of dQ at a time: a [BM, D] fp32 tile would spill at D = 128
      CUTE_UNROLL
      for (int dc = 0; dc < D / 64; ++dc) {
        Tensor sKt_c = local_tile(sKt, Shape<_64, Int<BN>>{}, make_coord(dc, 0));
        Tensor rKt = thr_q.partition_fragment_B(sKt_c);
        Tensor acc_dq = partition_fragment_C(mma_q, Shape<Int<BM>, _64>{});
        clear(acc_dq);
        gemm_ss(mma_q, acc_dq, rdS, rKt, tsdS, th_qb.partition_S(sKt_c), cp_qa, th_qa, cp_qb,
                th_qb);
        Tensor c_q = thr_q.partition_C(make_identity_tensor(Shape<Int<BM>, _64>{}));
        Tensor a = make_tensor(acc_dq.data(), rowcol(acc_dq.layout()));
        Tensor cq = make_tensor(c_q.data(), rowcol(c_q.layout()));
        CUTE_UNROLL
        for (int mi = 0; mi < size<0>(a); ++mi) {
          const int r = get<0>(cq(mi, 0));
          if (m0 + r < w.q_len) {
            CUTE_UNROLL
            for (int ni = 0; ni < size<1>(a); ++ni) {
              atomicAdd(dq + int64_t(r) * p.dq_r + dc * 64 + get<1>(cq(mi, ni)), a(mi, ni));
            }
          }
        }
      }
    }
    __syncthreads();  // stage st and dS are rewritten by the next iteration
    h = h_next;
    m0 = m_next;
  }
  Tensor c_k = thr_mma.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
  Elem* dk = static_cast<Elem*>(p.dk) + b * p.dk_b + (sr.bos_k + n0) * p.dk_r + hk * p.dk_h;
  Elem* dv = static_cast<Elem*>(p.dv) + b * p.dk_b + (sr.bos_k + n0) * p.dk_r + hk * p.dk_h;
  store_acc(dk, p.dk_r, 0, sr.s - n0, acc_dk, c_k, p.scale);
  store_acc(dv, p.dk_r, 0, sr.s - n0, acc_dv, c_k, 1.0f);
}

// --------------------------------------------------------------- backward: deterministic dQ

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1) attention_dq_kernel(const AttnParams p) {
  using Elem = typename Tr::Elem;
  constexpr int BM = Tr::BM, BN = Tr::BN, D = Tr::D;
  using LQ = typename Tr::template Rows<BM>;
  using LKV = typename Tr::template Rows2<BN>;
  using LKt = typename Tr::template Rows2T<BN>;
  extern __shared__ __align__(1024) unsigned char smem[];
  const int tid = threadIdx.x;
  const int blk = blockIdx.x % p.n_blocks;
  const int bh = blockIdx.x / p.n_blocks;
  const int b = bh / p.hq;
  const int h = bh % p.hq;
  const SeqRows sr = seq_rows(p, b);
  const Window w = seq_window(p, sr);
  const int m0 = blk * BM;
  if (m0 >= sr.t) return;
  const int hk = h / p.group;
  const int64_t row0 = sr.bos_q + m0;
  const Elem* q = static_cast<const Elem*>(p.q) + b * p.q_b + row0 * p.q_r + h * p.q_h;
  const Elem* dout = static_cast<const Elem*>(p.dout) + b * p.do_b + row0 * p.do_r + h * p.do_h;
  const Elem* k = static_cast<const Elem*>(p.k) + b * p.k_b + sr.bos_k * p.k_r + hk * p.k_h;
  const Elem* v = static_cast<const Elem*>(p.v) + b * p.v_b + sr.bos_k * p.v_r + hk * p.v_h;

  Elem* sq_ptr = reinterpret_cast<Elem*>(smem);
  Elem* sdo_ptr = sq_ptr + Tr::template elems<LQ>();
  Elem* sk_ptr = sdo_ptr + Tr::template elems<LQ>();
  Elem* sv_ptr = sk_ptr + Tr::template elems<LKV>();
  Tensor sQ = make_tensor(make_smem_ptr(sq_ptr), LQ{});
  Tensor sdO = make_tensor(make_smem_ptr(sdo_ptr), LQ{});
  Tensor sK = make_tensor(make_smem_ptr(sk_ptr), LKV{});
  Tensor sKt = make_tensor(make_smem_ptr(sk_ptr), LKt{});
  Tensor sV = make_tensor(make_smem_ptr(sv_ptr), LKV{});

  typename Tr::Mma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  auto cp_an = make_tiled_copy_A(typename Tr::LdsmN{}, mma);
  auto th_an = cp_an.get_thread_slice(tid);
  auto cp_bn = make_tiled_copy_B(typename Tr::LdsmN{}, mma);
  auto th_bn = cp_bn.get_thread_slice(tid);
  auto cp_bt = make_tiled_copy_B(typename Tr::LdsmT{}, mma);
  auto th_bt = cp_bt.get_thread_slice(tid);
  Tensor rQ = thr_mma.partition_fragment_A(sQ);
  Tensor rdO = thr_mma.partition_fragment_A(sdO);
  Tensor rK = thr_mma.partition_fragment_B(sK(_, _, 0));
  Tensor rV = thr_mma.partition_fragment_B(sV(_, _, 0));
  Tensor rKt = thr_mma.partition_fragment_B(sKt(_, _, 0));
  Tensor tsQ = th_an.partition_S(sQ);
  Tensor tsdO = th_an.partition_S(sdO);
  Tensor tsK = th_bn.partition_S(sK);
  Tensor tsV = th_bn.partition_S(sV);
  Tensor tsKt = th_bt.partition_S(sKt);

  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<BM>, Int<D>>{});
  clear(acc_dq);
  Tensor c_s = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor cs_rc = make_tensor(c_s.data(), rowcol(c_s.layout()));
  constexpr int kRows = decltype(size<0>(cs_rc))::value;
  // this thread's rows: lse in log2 units (-inf read as 0) and delta; padded rows are masked
  float l2[kRows];
  float dl[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int r = m0 + get<0>(cs_rc(mi, 0));
    l2[mi] = 0.0f;
    dl[mi] = 0.0f;
    if (r < w.q_len) {
      const int64_t off = b * p.lse_b + h * p.lse_h + sr.bos_q + r;
      const float l = p.lse[off];
      l2[mi] = l == -INFINITY ? 0.0f : l * kLog2e;
      dl[mi] = p.delta[off];
    }
  }

  int lo;
  const int n_iter = w.key_blocks(m0, BM, BN, lo);
  auto load_kv = [&](int n0, int st) {
    load_rows<Tr, BN>(k + int64_t(n0) * p.k_r, p.k_r, w.k_len - n0, sK(_, _, st), tid);
    load_rows<Tr, BN>(v + int64_t(n0) * p.v_r, p.v_r, w.k_len - n0, sV(_, _, st), tid);
  };
  if (n_iter > 0) {
    load_rows<Tr, BM>(q, p.q_r, w.q_len - m0, sQ, tid);
    load_rows<Tr, BM>(dout, p.do_r, w.q_len - m0, sdO, tid);
    load_kv(lo, 0);
    cp_async_fence();
  }
  const float sc = p.scale_log2;
  for (int it = 0; it < n_iter; ++it) {
    const int n0 = lo + it * BN;
    const int st = it & 1;
    next_stage(it + 1 < n_iter, [&] { load_kv(n0 + BN, st ^ 1); });
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(mma, acc_s, rQ, rK, tsQ, tsK(_, _, _, st), cp_an, th_an, cp_bn, th_bn);
    gemm_ss(mma, acc_dp, rdO, rV, tsdO, tsV(_, _, _, st), cp_an, th_an, cp_bn, th_bn);
    Tensor s = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    const bool mask = w.needs_mask(m0, BM, n0, BN);
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(s); ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        float pv = ex2(fmaf(s(mi, ni), sc, -l2[mi]));
        const auto c = cs_rc(mi, ni);
        if (mask && !w.visible(m0 + get<0>(c), n0 + get<1>(c))) pv = 0.0f;
        dp(mi, ni) = pv * (dp(mi, ni) - dl[mi]);
      }
    }
    Tensor ds16 = make_tensor<Elem>(acc_dp.layout());
    convert_into(ds16, acc_dp);
    gemm_rs(mma, acc_dq, make_tensor(ds16.data(), acc_as_a(ds16.layout())), rKt,
            tsKt(_, _, _, st), cp_bt, th_bt);
    __syncthreads();  // stage st is refilled by the next iteration's load
  }
  Tensor c_q = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  Elem* dq = static_cast<Elem*>(p.dq) + b * p.dq_b + row0 * p.dq_r + h * p.dq_h;
  store_acc(dq, p.dq_r, 0, sr.t - m0, acc_dq, c_q, p.scale);
}

// ----------------------------------------------------------------------- tiles and launchers

// Forward: 128 queries x 64 keys; 4 warps (32 rows each) at D = 64, 8 warps (16 rows each) at
// D = 128, where 4 warps spilled (O alone is 128 floats per thread there).
template <class Elem, int D>
using FwdTiles = Tiles<Elem, D, 128, 64, D == 128 ? 8 : 4>;
// dK/dV: 64 keys per CTA, 32 (D = 64) or 16 (D = 128) queries per step (more spilled: S^T and
// dP^T take BM / 2 floats each per thread); dQ (deterministic): 64 queries x 64 keys per step.
template <class Elem, int D>
using DkdvTiles = Tiles<Elem, D, D == 128 ? 16 : 32, 64>;
template <class Elem, int D>
using DqTiles = Tiles<Elem, D, 64, 64>;

template <class Tr>
constexpr int fwd_smem() {
  return sizeof(typename Tr::Elem) * (Tr::BM * Tr::D + 4 * Tr::BN * Tr::D);
}
template <class Tr>
constexpr int dkdv_smem() {
  return sizeof(typename Tr::Elem) * (2 * Tr::BN * Tr::D + 4 * Tr::BM * Tr::D + Tr::BM * Tr::BN) +
         4 * 4 * Tr::BM;
}
template <class Tr>
constexpr int dq_smem() {
  return sizeof(typename Tr::Elem) * (2 * Tr::BM * Tr::D + 4 * Tr::BN * Tr::D);
}

template <class Kernel>
void launch(Kernel kernel, int64_t grid, int threads, int smem, const AttnParams& p,
            cudaStream_t stream) {
  if (grid == 0) return;
  TORCH_CHECK(grid < (int64_t(1) << 31), "flash_attention: grid of ", grid, " blocks too large");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  kernel<<<unsigned(grid), threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
// rows each grid axis must cover: dense T / S; varlen the longest sequence (at most the rows)
int64_t grid_rows(bool varlen, int64_t max_seqlen, int64_t rows) {
  return varlen ? std::min(max_seqlen, rows) : rows;
}

}  // namespace

namespace attention {

template <class Elem, int D>
void fwd_launch(AttnParams& p, int64_t max_q, cudaStream_t stream) {
  using Tr = FwdTiles<Elem, D>;
  const int64_t nb = (grid_rows(p.varlen, max_q, p.rows_q) + Tr::BM - 1) / Tr::BM;
  p.n_blocks = int(std::max<int64_t>(nb, 1));
  launch(attention_fwd_kernel<Tr>, nb * p.n_seq * p.hq, Tr::kThreads, fwd_smem<Tr>(), p,
         stream);
}

template <class Elem, int D>
void bwd_launch(AttnParams& p, int64_t n_rows_q, int64_t max_q, int64_t max_k, bool det,
                cudaStream_t stream) {
  const int64_t warps = n_rows_q * p.hq;  // one warp per (row, head)
  const int64_t delta_blocks = (warps * 32 + 255) / 256;
  TORCH_CHECK(delta_blocks < (int64_t(1) << 31), "flash_attention: too many rows");
  attention_delta_kernel<Elem, D><<<unsigned(delta_blocks), 256, 0, stream>>>(p, n_rows_q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.atomic_dq = !det;
  if (det) {
    using Tq = DqTiles<Elem, D>;
    const int64_t nq = (grid_rows(p.varlen, max_q, p.rows_q) + Tq::BM - 1) / Tq::BM;
    p.n_blocks = int(std::max<int64_t>(nq, 1));
    launch(attention_dq_kernel<Tq>, nq * p.n_seq * p.hq, Tq::kThreads, dq_smem<Tq>(), p, stream);
  }
  using Tr = DkdvTiles<Elem, D>;
  const int64_t nk = (grid_rows(p.varlen, max_k, p.rows_k) + Tr::BN - 1) / Tr::BN;
  p.n_blocks = int(std::max<int64_t>(nk, 1));
  launch(attention_dkdv_kernel<Tr>, nk * p.n_seq * p.hkv, Tr::kThreads, dkdv_smem<Tr>(), p,
         stream);
}

}  // namespace attention
}  // namespace vljepa_fast

// The explicit instantiations of one translation unit (csrc/cuda/attention_<dtype>_hd<D>.cu).
#define VLJEPA_ATTENTION_INSTANTIATE(Elem, D)                                                  \
  template void vljepa_fast::attention::fwd_launch<Elem, D>(vljepa_fast::attention::AttnParams&, \
                                                             int64_t, cudaStream_t);           \
  template void vljepa_fast::attention::bwd_launch<Elem, D>(                                    \
      vljepa_fast::attention::AttnParams&, int64_t, int64_t, int64_t, bool, cudaStream_t);
