"""Batched top-k similarity search without the Q x N score matrix: two paths, chosen by shape.

scores[q, n] = <queries[q], bank[n]>                                  (metric "ip")
             = <queries[q], bank[n]> * rq[q] * rb[n]                  ("cosine")
with r = 1 / max(|row|, eps) in fp32, computed once per call (:func:`inverse_norms`), and the
k largest scores of every query row returned with their bank row indices.

Path rule (:func:`choose_path`, decided by the op layer's ``supports`` and handed to the
launcher as a :class:`TopkPlan`): ``"stream"`` when Q <= STREAM_MAX_QUERIES (64) and k <=
STREAM_MAX_K (32), else ``"gemm"`` (and "gemm" for fp32 cosine with rows not a multiple of 16
elements before Hopper, whose stream variant spills on sm_80). Why: with Q <= 64 the whole query
batch is ONE query block of the streaming kernel, so the bank is read exactly once and no score
is written; its arithmetic intensity is at most 2 * 64 * D / (D * s) = 64 FLOP/byte for 16-bit
inputs (s = 2), below the H200's ridge of 790e12 / 4.3e12 = 184 FLOP/byte: memory-bound, where
fusing pays. A second query block would read the bank again, while the GEMM path reads it once
per chunk and adds only 8 Q bytes of fp32 scores per bank row (written by the GEMM, read by the
select): at Q = 128, D = 1536, bf16 that is 4096 bytes per bank row against the stream's 6144.
Once 2 Q D / (D s + 8 Q) passes 184 (Q >~ 500 at D = 1536, bf16) the score GEMM is compute-bound
and the vendor GEMM's efficiency decides. k > 32 takes the GEMM path at any Q: the streaming
kernel keeps its running lists in registers ([K_PAD, 64] int64 keys), and the GEMM path's extra
traffic is small at few queries (8 Q / (D s) of the bank's: 4% at Q = 16).

Path "stream", :func:`topk_stream_kernel`: program (i_q, i_c) takes BQ = 64 queries (the
whole batch; fewer are padded) and chunk i_c of the bank, computes [BN, BQ] tiles of scores
S^T = B_tile Q_blk^T (bank rows as the MMA's M, so that Hopper's wgmma runs with N = BQ = 64:
no mma.sync, see the compile tests), packs them into keys and folds them into one running
list per query ([K_PAD, BQ] keys in registers). Filtering is per query: a key survives only
when it beats ITS query's current k-th best key; survivors are merged one round at a time
(each round moves every query's best survivor into the slot of its current k-th best, then
re-filters), so a tile costs max over queries of min(k, survivors) rounds, and a tile in
which no query has a survivor costs one compare per key. Bank norms (cosine) come from the
tile already in registers when the batch is one query block (each bank row is loaded by one
program only: computed once per call, no extra pass over the bank), else from
:func:`inverse_norms` once per call. Candidates [Q, n_chunks, K_PAD] go to one torch.topk.

Path "gemm", for many queries: per bank chunk of ``chunk`` rows (the chunk rule of
``vljepa_fast.ops._chunks``, computed by the op layer), a vendor GEMM writes raw [Q, chunk]
fp32 scores (CUDA 16-bit: ``torch.mm(q, bank_chunk.T, out_dtype=torch.float32)``; fp32:
``torch.mm``, so fp32 follows torch's matmul precision setting, full fp32 by default; under
the interpreter an fp32 mm of the upcast inputs, the same exact products), then
:func:`topk_select_kernel` (faiss's WarpSelect / BlockSelect idea): program (q, p) scans
columns slice p of query q's row in blocks of BLK, keeps the keys that beat its current k-th
best key, compacts them (prefix sum) into a K_PAD buffer, and only when the buffer is full
merges it into its sorted running list (sort the buffer ascending, take the elementwise max
with the descending list: a bitonic sequence holding the top K_PAD of both, then one bitonic
merge). Lists [Q, splits, K_PAD] persist across chunks; one torch.topk over them at the end.

Keys. A score and its index travel together as one int64: the high 32 bits are the fp32 score
mapped to an int32 of the same order (negative floats get their magnitude bits flipped; every
NaN maps to the smallest int32, below -inf, and -0.0 to +0.0), the low 32 bits are ``~index``
read as unsigned, so equal scores prefer the smaller index and the order is total and
deterministic: the order documented by :func:`vljepa_fast.topk_similarity` (NaN last, ties
lowest index), whatever the tiling. Masked rows get the smallest int64 (the padding key),
below every real key (a NaN key still has ``~index`` > 0 in its low bits), so padding is never
returned: every list holds min(K_PAD, its rows) real keys, which sums to at least k. Bank
indices must fit 31 bits (N < 2^31, checked).

Cost at the paper shapes (H200 design model of kernels/_common.py: 790 TFLOP/s bf16 dense,
4.3 TB/s; predictions, not measurements; :func:`cost` and :func:`predicted_seconds` state them;
D = 1536, bf16, N = 2^20):
* 1024 x 1M, k = 10 or 100 ("gemm"): GEMM 2 Q N D = 3.30 TFLOP -> 4.18 ms (compute-bound:
  its own traffic, bank 3.22 GB read + scores 4.29 GB written, is 1.75 ms); select reads the
  4.29 GB of scores once -> 1.00 ms; lists (Q x 16 or 128 int64, read and written per chunk: 4
  chunks of 262,144 rows at the default 1 GiB budget) below 5 MB. Total 11.8 GB HBM, ~5.2 ms
  predicted (the two phases run one after the other). k = 100 only adds survivor merges (about
  k (1 + ln(N / k)) ~ 1000 keys per query, ~8 merges of 128), which stay under the select's
  memory time.
* 16 x 1M, k <= 32 ("stream"): 2 Q N D = 51.5 GFLOP (206 GFLOP issued: 16 queries padded to
  the 64 of one block, 0.26 ms of tensor-core time); HBM: the bank once, 3.22 GB -> 0.75 ms
  predicted (memory-bound). k > 32 ("gemm"): 3.22 GB + 0.13 GB of scores -> 0.78 ms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import PEAK_BANDWIDTH, PEAK_FLOPS, interpreting, launch, pointer_type

__all__ = [
    "MAX_K",
    "STREAM_MAX_K",
    "STREAM_MAX_QUERIES",
    "TopkPlan",
    "choose_path",
    "cost",
    "inverse_norms",
    "kernel_specs",
    "make_plan",
    "predicted_seconds",
    "topk_select_kernel",
    "topk_similarity",
    "topk_stream_kernel",
]

#: The streaming path serves at most this many queries (one query block: the bank read once).
STREAM_MAX_QUERIES = 64
#: ... and k up to this (its running lists live in registers).
STREAM_MAX_K = 32
#: Largest k of the GEMM path's select (its sorted list of K_PAD keys lives in registers).
MAX_K = 2048
#: Smallest running list: tiny lists would make degenerate (size-1) tensors.
MIN_K_PAD = 16

# Smallest int64: the key of a masked row (and an empty list slot).
_KEY_PAD = tl.constexpr(-(2**63))
# Largest int64: a list slot past k that must never be replaced (the stream kernel's lists).
_KEY_TOP = tl.constexpr(2**63 - 1)
# Ordered value of "no key" in the stream kernel's int32 tiles: the smallest int32.
_ORD_NONE = tl.constexpr(-(2**31))
# Ordered value of every NaN score: above "no key", below -inf's (-2**31 + 2**23 - 1).
_ORD_NAN = tl.constexpr(-(2**31) + 1)
_INT32_MAX = tl.constexpr(2**31 - 1)
_PAD = -(2**63)


@triton.jit
def _score_ord(b_s):
    """fp32 scores -> int32 of the same order: negative floats get their magnitude bits flipped,
    every NaN maps to _ORD_NAN (below -inf, above _ORD_NONE, the value of "no key"), -0.0 to
    +0.0's 0 (equal scores tie, and ties go to the lowest index). Both tests are on the bits, so
    no compiler assumption about NaN can drop them."""
    b_bits = b_s.to(tl.int32, bitcast=True)
    b_mag = b_bits & 0x7FFFFFFF
    b_ord = b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)
    b_ord = tl.where(b_mag > 0x7F800000, _ORD_NAN, b_ord)
    return tl.where(b_mag == 0, 0, b_ord)


@triton.jit
def _pack(b_ord, b_idx):
    """int64 keys from ordered scores and int32 bank indices: (ord << 32) | ~index (unsigned)."""
    b_low = (~b_idx).to(tl.uint32, bitcast=True).to(tl.int64)
    return (b_ord.to(tl.int64) << 32) | b_low


@triton.jit
def _score_keys(b_s, b_idx, b_mask):
    """Pack fp32 scores and their int32 bank indices (broadcastable to b_s) into
    order-preserving int64 keys (module doc); where ``b_mask`` is false, the padding key."""
    return tl.where(b_mask, _pack(_score_ord(b_s), b_idx), _KEY_PAD)


@triton.jit
def inverse_norms_kernel(x, out, R, D, eps, BR: tl.constexpr, BD: tl.constexpr):
    """out[r] = 1 / max(|x[r]|, eps) in fp32 (sum of squares in fp32), BR rows per program."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_k = tl.arange(0, BD)
    b_ssq = tl.zeros([BR], dtype=tl.float32)
    for i_d in range(0, tl.cdiv(D, BD)):
        o_d = i_d * BD + o_k
        b_x = tl.load(
            x + o_r.to(tl.int64)[:, None] * D + o_d[None, :],
            mask=m_r[:, None] & (o_d < D)[None, :],
            other=0.0,
        ).to(tl.float32)
        b_ssq += tl.sum(b_x * b_x, axis=1)
    tl.store(out + o_r, 1.0 / tl.maximum(tl.sqrt(b_ssq), eps), mask=m_r)


@triton.jit
def _survivors(b_ord, o_n, b_thr):
    """b_ord [BN, BQ] where key (b_ord[n, j], bank row o_n[n]) beats query j's threshold key
    b_thr[j], else _ORD_NONE: the per-query filter, on int32 tiles (no int64 key tile)."""
    t_hi = (b_thr >> 32).to(tl.int32)
    # key low bits ~n > ~t (unsigned) <=> n < t_idx; pad thresholds admit every row.
    t_idx = tl.minimum(0xFFFFFFFF - (b_thr & 0xFFFFFFFF), _INT32_MAX).to(tl.int32)
    b_win = (b_ord > t_hi[None, :]) | ((b_ord == t_hi[None, :]) & (o_n[:, None] < t_idx[None, :]))
    return tl.where(b_win & (b_ord > _ORD_NONE), b_ord, _ORD_NONE)


@triton.jit
def topk_stream_kernel(
    q,
    b,
    rq,
    rb,
    keys,
    Q,
    N,
    D,
    tiles_per_chunk,
    eps,
    COSINE: tl.constexpr,
    BANK_NORMS: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BQ: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Path "stream". Grid (cdiv(Q, BQ), n_chunks); chunk i_c is bank tiles
    [i_c * tiles_per_chunk, (i_c + 1) * tiles_per_chunk) of BN rows. Writes the K_PAD list
    slots of every query and chunk to keys [Q, n_chunks * K_PAD] (unsorted; slots past K hold
    the padding key).

    rq [Q]: inverse query norms (COSINE). rb [N]: inverse bank norms, read when BANK_NORMS,
    else computed from the bank tiles (the launcher does so only for a single query block).

    The list of query j is column j of b_top [K_PAD, BQ]: slots below K start as distinct
    keys below every real key (padding + slot), slots from K on as distinct keys above every
    real key (never the minimum, so never replaced): min over the column is the query's
    current K-th best key, the threshold of its filter.
    """
    i_q, i_c = tl.program_id(0), tl.program_id(1)
    n_tiles = tl.cdiv(N, BN)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_q = o_q < Q
    # int64 row offsets: N * D and Q * keys may pass 2**31.
    o_qrow = o_q.to(tl.int64)
    o_k = tl.arange(0, BD)
    o_j = tl.arange(0, K_PAD)
    if COSINE:
        b_rq = tl.load(rq + o_q, mask=m_q, other=0.0)
    o_j64 = o_j.to(tl.int64)
    b_init = tl.where(o_j < K, _KEY_PAD + o_j64, _KEY_TOP - o_j64)
    b_top = tl.zeros([K_PAD, BQ], dtype=tl.int64) + b_init[:, None]
    b_thr = tl.min(b_top, axis=0)

    i_t0 = i_c * tiles_per_chunk
    for i_t in range(i_t0, tl.minimum(i_t0 + tiles_per_chunk, n_tiles)):
        o_n = i_t * BN + tl.arange(0, BN)
        m_n = o_n < N
        # [BN, BQ]: bank rows are the MMA's M dimension, the queries its N.
        b_s = tl.zeros([BN, BQ], dtype=tl.float32)
        if COSINE and not BANK_NORMS:
            b_ssb = tl.zeros([BN], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(D, BD)):
            o_d = i_d * BD + o_k
            m_d = o_d < D
            # [BN, BD]
            b_b = tl.load(
                b + o_n.to(tl.int64)[:, None] * D + o_d[None, :],
                mask=m_n[:, None] & m_d[None, :],
                other=0.0,
            )
            # [BQ, BD]
            b_q = tl.load(
                q + o_qrow[:, None] * D + o_d[None, :], mask=m_q[:, None] & m_d[None, :], other=0.0
            )
            if COSINE and not BANK_NORMS:
                b_ssb += tl.sum(b_b.to(tl.float32) * b_b.to(tl.float32), axis=1)
            if INTERPRET:
                # The interpreter's bf16 dot is wrong; only there, dot in fp32.
                b_b = b_b.to(tl.float32)
                b_q = b_q.to(tl.float32)
            b_s = tl.dot(b_b, tl.trans(b_q), b_s, input_precision=DOT_PRECISION)
        if COSINE:
            if BANK_NORMS:
                b_rb = tl.load(rb + o_n, mask=m_n, other=0.0)
            else:
                b_rb = 1.0 / tl.maximum(tl.sqrt(b_ssb), eps)
            b_s = b_s * b_rq[None, :] * b_rb[:, None]
        # [BN, BQ] int32 ordered scores in the accumulator's registers; "no key" where masked.
        b_ord = tl.where(m_n[:, None] & m_q[None, :], _score_ord(b_s), _ORD_NONE)
        b_ord = _survivors(b_ord, o_n, b_thr)
        while tl.max(tl.max(b_ord, axis=0), axis=0) > _ORD_NONE:
            # One round: every query's best survivor (largest score, then lowest index)
            # replaces its K-th best key (keys are unique), then the filter tightens.
            b_hi = tl.max(b_ord, axis=0)
            b_lo = tl.min(tl.where(b_ord == b_hi[None, :], o_n[:, None], _INT32_MAX), axis=0)
            b_best = _pack(b_hi, b_lo)
            b_put = (b_top == b_thr[None, :]) & (b_hi > _ORD_NONE)[None, :]
            b_top = tl.where(b_put, b_best[None, :], b_top)
            b_thr = tl.min(b_top, axis=0)
            b_ord = tl.where(o_n[:, None] == b_lo[None, :], _ORD_NONE, b_ord)
            b_ord = _survivors(b_ord, o_n, b_thr)

    b_top = tl.where(o_j[:, None] < K, b_top, _KEY_PAD)
    p_top = keys + o_qrow[None, :] * (tl.num_programs(1) * K_PAD) + i_c * K_PAD + o_j[:, None]
    tl.store(p_top, b_top, mask=m_q[None, :])


@triton.jit
def _merge_sorted(b_top, b_asc):
    """The top K_PAD of b_top (sorted descending) and b_asc (sorted ascending), sorted
    descending: their elementwise max is bitonic and holds exactly those keys."""
    return tl.bitonic_merge(tl.maximum(b_top, b_asc), descending=True)


@triton.jit
def _kth(b_top, o_j, K: tl.constexpr):
    """The K-th best key of a list sorted descending."""
    return tl.min(tl.where(o_j < K, b_top, _KEY_TOP), axis=0)


@triton.jit
def _flush(b_top, p_buf, o_j, count):
    """Merges buffer slots [0, count) into the sorted list. The barriers make the buffer's
    scattered stores visible to every thread before the load, and keep later stores behind it."""
    tl.debug_barrier()
    b_buf = tl.load(p_buf + o_j, mask=o_j < count, other=_KEY_PAD)
    tl.debug_barrier()
    return _merge_sorted(b_top, tl.sort(b_buf))


@triton.jit
def topk_select_kernel(
    s,
    rq,
    rb,
    lists,
    bufs,
    ld_s,
    n_cols,
    col0,
    width,
    COSINE: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLK: tl.constexpr,
):
    """Path "gemm", the k-select of one bank chunk. Grid (Q, splits): program (i_q, i_p) takes
    columns [i_p * width, min((i_p + 1) * width, n_cols)) of row i_q of the raw scores
    s [Q, ld_s] (fp32; column c is bank row col0 + c) and folds them into its running list
    lists[i_q, i_p, :K_PAD] (int64 keys, sorted descending, kept across chunks; starts as
    padding). bufs: a [Q, splits, K_PAD] scratch buffer of survivors (empty between launches).
    COSINE: scores are raw * rq[i_q] * rb[col0 + c].
    """
    i_q, i_p = tl.program_id(0), tl.program_id(1)
    o_j = tl.arange(0, K_PAD)
    row = i_q.to(tl.int64) * tl.num_programs(1) + i_p
    p_list = lists + row * K_PAD + o_j
    p_buf = bufs + row * K_PAD
    b_top = tl.load(p_list)
    b_thr = _kth(b_top, o_j, K)
    if COSINE:
        r_q = tl.load(rq + i_q)
    c_begin = i_p * width
    c_end = tl.minimum(c_begin + width, n_cols)
    p_row = s + i_q.to(tl.int64) * ld_s
    o_b = tl.arange(0, BLK)
    count = tl.zeros([], dtype=tl.int32)
    for c0 in range(c_begin, c_end, BLK):
        o_c = c0 + o_b
        m_c = o_c < c_end
        b_s = tl.load(p_row + o_c, mask=m_c, other=0.0)
        if COSINE:
            b_s = b_s * r_q * tl.load(rb + col0 + o_c, mask=m_c, other=0.0)
        b_key = _score_keys(b_s, col0 + o_c, m_c)
        m_new = b_key > b_thr
        n_new = tl.sum(m_new.to(tl.int32), axis=0)
        if n_new > 0:
            if count + n_new > K_PAD:
                b_top = _flush(b_top, p_buf, o_j, count)
                count = tl.zeros([], dtype=tl.int32)
                b_thr = _kth(b_top, o_j, K)
                m_new = b_key > b_thr
                n_new = tl.sum(m_new.to(tl.int32), axis=0)
            if BLK > K_PAD:
                if n_new > K_PAD:
                    # More survivors than the buffer holds (a block wider than the list, early
                    # on): merge the block's own top K_PAD directly.
                    b_best = tl.topk(tl.where(m_new, b_key, _KEY_PAD), K_PAD)
                    b_top = _merge_sorted(b_top, tl.flip(b_best, 0))
                    b_thr = _kth(b_top, o_j, K)
                    m_new = b_key < _KEY_PAD  # nothing left to append
                    n_new = tl.zeros([], dtype=tl.int32)
            # Compaction: survivor i of the block goes to buffer slot count + i.
            o_pos = count + tl.cumsum(m_new.to(tl.int32), axis=0) - 1
            tl.store(p_buf + o_pos, b_key, mask=m_new)
            count += n_new
    if count > 0:
        b_top = _flush(b_top, p_buf, o_j, count)
    tl.store(p_list, b_top)


class TopkPlan(NamedTuple):
    """How :func:`topk_similarity` runs one call (see the module doc; :func:`make_plan`).

    path: "stream" or "gemm". k_pad: list length, a power of two >= max(k, MIN_K_PAD).
    stream: bq, bn, bd block sizes, splits (bank chunks, one program each per query block);
    bank_norms: read precomputed inverse bank norms (cosine) instead of computing them from the
    tiles. gemm: chunk (bank rows per GEMM), blk (columns per select step), splits (select
    programs per query). num_warps, num_stages: launch options.
    """

    path: str
    k_pad: int
    bq: int = 0
    bn: int = 0
    bd: int = 0
    chunk: int = 0
    blk: int = 0
    splits: int = 1
    bank_norms: bool = False
    num_warps: int = 4
    num_stages: int = 3


def choose_path(
    num_queries: int,
    k: int,
    *,
    dtype: torch.dtype | None = None,
    dim: int = 16,
    cosine: bool = False,
    arch: int = 90,
) -> str:
    """The documented rule (module doc): "stream" when Q <= STREAM_MAX_QUERIES and
    k <= STREAM_MAX_K, else "gemm"; one exception: fp32 cosine with rows not a multiple of 16
    elements before Hopper (``arch`` < 90, the compute capability x 10) takes "gemm", as that
    stream variant spills registers on sm_80."""
    if num_queries > STREAM_MAX_QUERIES or k > STREAM_MAX_K:
        return "gemm"
    if arch < 90 and dtype == torch.float32 and cosine and dim % 16 != 0:
        return "gemm"
    return "stream"


def target_programs(device: torch.device) -> int:
    """Programs that fill the device: 4 per SM on CUDA; a few under the interpreter (they gain
    nothing from more, and a few chunks still exercise the merges)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def device_arch(device: torch.device) -> int:
    """Compute capability x 10 of a CUDA device; 90 elsewhere (the interpreter)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def make_plan(
    dtype: torch.dtype,
    num_queries: int,
    num_bank: int,
    dim: int,
    k: int,
    *,
    cosine: bool,
    chunk: int,
    programs: int,
    path: str | None = None,
    arch: int = 90,
) -> TopkPlan:
    """The plan of one call. ``path`` None: :func:`choose_path`; "stream" or "gemm" forces one
    (tests; "stream" needs k <= STREAM_MAX_K). ``chunk``: bank rows per GEMM (the op layer's
    chunk rule). ``programs``: :func:`target_programs` of the device. ``arch``: its compute
    capability x 10 (90 for the interpreter).

    Block sizes are chosen to compile without register spills (compile tests, sm_80/sm_90).
    Stream: BQ = 64 queries (wgmma N = 64), BN = 64 bank rows (the MMA's M), BD a 128-byte row
    segment for 16-bit inputs (64 bytes for fp32, whose dots are three tf32 MMAs; 32 before
    Hopper); rows whose
    length is not a multiple of 16 elements (scalar loads, an address register per element)
    take BD = 16 (8 for fp32), two stages, and precomputed bank norms. Bank norms come from the
    kernel's own tiles only with a single query block and aligned rows (``bank_norms`` False).
    Gemm: BLK = max(K_PAD, 512) scores per select step, warps growing with the list.
    """
    path = path or choose_path(num_queries, k, dtype=dtype, dim=dim, cosine=cosine, arch=arch)
    k_pad = max(MIN_K_PAD, triton.next_power_of_2(k))
    if path == "stream":
        if k > STREAM_MAX_K:
            raise ValueError(f"path 'stream': expected k <= {STREAM_MAX_K}, got {k}")
        aligned = dim % 16 == 0
        if aligned:
            # fp32 on sm_80 (mma.sync tf32x3): a narrower step keeps the split operands in
            # registers.
            bd, stages = (64 if dtype != torch.float32 else 16 if arch >= 90 else 8), 3
        else:
            bd, stages = (8 if dtype == torch.float32 else 16), 2
        bd = min(bd, max(16 if aligned else 8, triton.next_power_of_2(dim)))
        bq, bn = 64, 64
        bank_norms = cosine and (num_queries > bq or not aligned)
        # bank chunks: enough programs to fill the device
        n_tiles = triton.cdiv(num_bank, bn)
        splits = min(n_tiles, triton.cdiv(programs, triton.cdiv(num_queries, bq)))
        return TopkPlan(
            "stream",
            k_pad,
            bq=bq,
            bn=bn,
            bd=bd,
            splits=splits,
            bank_norms=bank_norms,
            num_warps=4,
            num_stages=stages,
        )
    if path != "gemm":
        raise ValueError(f"path: expected 'stream' or 'gemm', got {path!r}")
    if k > MAX_K:
        raise ValueError(f"path 'gemm': expected k <= {MAX_K}, got {k}")
    chunk = max(1, min(int(chunk), num_bank))
    blk = max(k_pad, 512)
    splits = max(1, min(triton.cdiv(programs, num_queries), triton.cdiv(chunk, 4 * blk)))
    num_warps = max(4, min(8, k_pad // 256))
    return TopkPlan(
        "gemm", k_pad, chunk=chunk, blk=blk, splits=splits, num_warps=num_warps, num_stages=1
    )


def kernel_specs(
    dtype: torch.dtype, cosine: bool, plan: TopkPlan, k: int, interpret: bool
) -> dict[str, tuple[object, dict, dict]]:
    """{name: (kernel, signature, constexprs)} of the Triton kernels a plan launches (for
    ``tests/_aot.aot_compile``): "stream" or "select", and "norms" under cosine.

    fp32 dots use three tf32 MMAs (``tf32x3``): fp32 accuracy on tensor cores, where ``ieee``
    falls back to FMAs and spills.
    """
    ptr = pointer_type(dtype)
    specs = {}
    if plan.path == "stream":
        signature = {
            "q": ptr,
            "b": ptr,
            "rq": "*fp32",
            "rb": "*fp32",
            "keys": "*i64",
            "Q": "i32",
            "N": "i32",
            "D": "i32",
            "tiles_per_chunk": "i32",
            "eps": "fp32",
        }
        constexprs = dict(
            COSINE=cosine,
            BANK_NORMS=cosine and plan.bank_norms,
            K=k,
            K_PAD=plan.k_pad,
            BQ=plan.bq,
            BN=plan.bn,
            BD=plan.bd,
            DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
            INTERPRET=interpret,
        )
        specs["stream"] = (topk_stream_kernel, signature, constexprs)
    else:
        signature = {
            "s": "*fp32",
            "rq": "*fp32",
            "rb": "*fp32",
            "lists": "*i64",
            "bufs": "*i64",
            "ld_s": "i32",
            "n_cols": "i32",
            "col0": "i32",
            "width": "i32",
        }
        constexprs = dict(COSINE=cosine, K=k, K_PAD=plan.k_pad, BLK=plan.blk)
        specs["select"] = (topk_select_kernel, signature, constexprs)
    if cosine:
        signature = {"x": ptr, "out": "*fp32", "R": "i32", "D": "i32", "eps": "fp32"}
        specs["norms"] = (inverse_norms_kernel, signature, dict(BR=_NORM_ROWS, BD=64))
    return {
        name: (kern, {**sig, **{c: "constexpr" for c in consts}}, consts)
        for name, (kern, sig, consts) in specs.items()
    }


_NORM_ROWS = 16


def inverse_norms(x: Tensor, eps: float) -> Tensor:
    """[R] fp32 1 / max(|x[r]|, eps) of the rows of x [R, D] (contiguous), one pass over x."""
    rows, dim = x.shape
    out = torch.empty(rows, dtype=torch.float32, device=x.device)
    launch(
        inverse_norms_kernel,
        (triton.cdiv(rows, _NORM_ROWS),),
        x,
        out,
        rows,
        dim,
        eps,
        BR=_NORM_ROWS,
        BD=64,
    )
    return out


def _decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of the kernels' key packing: int64 keys -> (fp32 scores, int64 indices)."""
    ordered = (keys >> 32).to(torch.int32)
    scores = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    indices = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return scores, indices


def _stream(queries, bank, k, cosine, eps, plan) -> Tensor:
    num_queries, dim = queries.shape
    num_bank = bank.shape[0]
    n_tiles = triton.cdiv(num_bank, plan.bn)
    q_blocks = triton.cdiv(num_queries, plan.bq)
    n_chunks = max(1, min(n_tiles, plan.splits))
    tiles_per_chunk = triton.cdiv(n_tiles, n_chunks)
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    none = torch.empty(1, dtype=torch.float32, device=queries.device)
    rq = inverse_norms(queries, eps) if cosine else none
    # One query block (aligned rows): every bank row is loaded by one program, which
    # computes its norm from the tile; else once here (the plan says which).
    rb = inverse_norms(bank, eps) if cosine and plan.bank_norms else none
    # Filled with the padding key: a slot the kernel failed to write decodes to NaN.
    keys = torch.full(
        (num_queries, n_chunks * plan.k_pad), _PAD, dtype=torch.int64, device=queries.device
    )
    _, _, consts = kernel_specs(queries.dtype, cosine, plan, k, interpreting(queries))["stream"]
    launch(
        topk_stream_kernel,
        (q_blocks, n_chunks),
        queries,
        bank,
        rq,
        rb,
        keys,
        num_queries,
        num_bank,
        dim,
        tiles_per_chunk,
        eps,
        **consts,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return keys


def _gemm(queries, bank, k, cosine, eps, plan) -> Tensor:
    num_queries = queries.shape[0]
    num_bank = bank.shape[0]
    device = queries.device
    none = torch.empty(1, dtype=torch.float32, device=device)
    rq = inverse_norms(queries, eps) if cosine else none
    rb = inverse_norms(bank, eps) if cosine else none
    lists = torch.full(
        (num_queries, plan.splits, plan.k_pad), _PAD, dtype=torch.int64, device=device
    )
    bufs = torch.empty_like(lists)
    chunk = plan.chunk
    _, _, consts = kernel_specs(queries.dtype, cosine, plan, k, interpret=False)["select"]
    raw = torch.empty(num_queries * chunk, dtype=torch.float32, device=device)
    # cuBLAS writes fp32 from 16-bit operands directly; elsewhere (fp32 inputs, the
    # interpreter's CPU tensors) an fp32 GEMM of the inputs (exact products of 16-bit values).
    vendor16 = device.type == "cuda" and queries.dtype != torch.float32
    q32 = queries if vendor16 else queries.float()
    for n0 in range(0, num_bank, chunk):
        cols = min(chunk, num_bank - n0)
        part = bank[n0 : n0 + cols]
        out = raw[: num_queries * cols].view(num_queries, cols)
        if vendor16:
            torch.mm(q32, part.T, out_dtype=torch.float32, out=out)
        else:
            torch.mm(q32, part.float().T, out=out)
        launch(
            topk_select_kernel,
            (num_queries, plan.splits),
            out,
            rq,
            rb,
            lists,
            bufs,
            cols,
            cols,
            n0,
            triton.cdiv(cols, plan.splits),
            **consts,
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
    return lists.view(num_queries, plan.splits * plan.k_pad)


def topk_similarity(
    queries: Tensor,
    bank: Tensor,
    k: int,
    cosine: bool,
    *,
    eps: float,
    plan: TopkPlan | None = None,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k bank rows by inner product or cosine similarity for every query.

    Inputs are validated by the caller (``vljepa_fast.ops.topk_similarity.topk_inputs``).

    Args:
        queries: [Q, D] float32, float16 or bfloat16, contiguous; CUDA, or CPU (interpreter).
        bank: [N, D], same dtype and device, contiguous; N < 2^31.
        k: 1 <= k <= N; k <= MAX_K (and k <= STREAM_MAX_K on the stream path).
        cosine: divide each score by max(|query|, eps) * max(|bank row|, eps) (fp32 norms).
        eps: smallest norm, no default here: the one owner of the value is
            ``vljepa_fast.reference.NORM_EPS``, which callers pass; a zero row scores 0.
        plan: a :class:`TopkPlan` (the op layer's ``supports`` makes it); default
            :func:`make_plan` with ``chunk`` (default: all of N).

    Returns:
        (scores [Q, k] float32 sorted descending, indices [Q, k] int64). NaN scores rank
        last (below -inf); equal scores come smallest index first.
    """
    num_queries, dim = queries.shape
    num_bank = bank.shape[0]
    if num_bank >= 2**31:
        raise ValueError(f"bank: expected fewer than 2^31 rows, got {num_bank}")
    if plan is None:
        programs = target_programs(queries.device)
        arch = device_arch(queries.device)
        plan = make_plan(
            queries.dtype,
            num_queries,
            num_bank,
            dim,
            k,
            cosine=cosine,
            chunk=num_bank if chunk is None else chunk,
            programs=programs,
            arch=arch,
        )
    if plan.path == "stream":
        keys = _stream(queries, bank, k, cosine, eps, plan)
    else:
        keys = _gemm(queries, bank, k, cosine, eps, plan)
    return _decode(torch.topk(keys, k, dim=1).values)


# ------------------------------------------------------------------------------ cost model


class Step(NamedTuple):
    """One launch kind of a plan, summed over its launches: ``flops`` (tensor-core work issued,
    padding included; 0 for selects), HBM ``bytes`` read and written, ``gemm`` (a product:
    time max(flops / peak, bytes / bandwidth)) or not (bytes / bandwidth)."""

    name: str
    flops: int
    bytes: int
    gemm: bool


def cost(
    num_queries: int,
    num_bank: int,
    dim: int,
    k: int,
    dtype: torch.dtype,
    cosine: bool,
    plan: TopkPlan,
) -> list[Step]:
    """FLOPs and HBM bytes of every step of one call under ``plan`` (module doc). Counted: the
    bank and query reads (the queries once per bank chunk), score writes and reads, candidate
    and list traffic, the norm passes under cosine; not counted: launch gaps, the final
    torch.topk's sort work (its bytes are)."""
    s = torch.empty((), dtype=dtype).element_size()
    q, n, d = num_queries, num_bank, dim
    steps = []
    if plan.path == "stream":
        blocks = triton.cdiv(q, plan.bq)
        if cosine:
            steps.append(Step("norms", 0, (q + (n if plan.bank_norms else 0)) * d * s, False))
        keys = 8 * q * plan.splits * plan.k_pad
        steps.append(
            Step(
                "stream",
                2 * blocks * plan.bq * n * d,
                blocks * n * d * s + q * d * s * plan.splits + keys,
                True,
            )
        )
        steps.append(Step("final top-k", 0, keys + 12 * q * k, False))
        return steps
    chunks = triton.cdiv(n, plan.chunk)
    if cosine:
        steps.append(Step("norms", 0, (q + n) * d * s + 4 * (q + n), False))
    steps.append(Step("GEMM", 2 * q * n * d, n * d * s + chunks * q * d * s + 4 * q * n, True))
    lists = 8 * q * plan.splits * plan.k_pad
    steps.append(
        Step("select", 0, 4 * q * n + (4 * n if cosine else 0) + 2 * chunks * lists, False)
    )
    steps.append(Step("final top-k", 0, lists + 12 * q * k, False))
    return steps


def predicted_seconds(
    num_queries: int,
    num_bank: int,
    dim: int,
    k: int,
    dtype: torch.dtype,
    cosine: bool,
    plan: TopkPlan,
) -> float:
    """The H200 time the design implies: over :func:`cost`'s steps, max(flops / peak, bytes /
    bandwidth) for a product (its traffic hides under its math or the reverse), bytes /
    bandwidth for the rest, added (the steps run one after the other)."""
    total = 0.0
    for step in cost(num_queries, num_bank, dim, k, dtype, cosine, plan):
        memory_s = step.bytes / PEAK_BANDWIDTH
        total += max(step.flops / PEAK_FLOPS[dtype], memory_s) if step.gemm else memory_s
    return total
