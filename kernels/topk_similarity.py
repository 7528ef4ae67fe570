"""Batched top-k similarity search without the Q x N score matrix.

scores[q, n] = <queries[q], bank[n]>           (metric "ip")
             = <queries[q], bank[n]> / (max(|queries[q]|, eps) * max(|bank[n]|, eps))   ("cosine")
returns the k largest scores of every query row and their bank row indices.

Stage 1 (Triton): program (i_q, i_c) takes BQ queries and one chunk of the bank, computes
[BQ, BN] score tiles with fp32 accumulation (tensor-core dots; fp32 as three tf32 MMAs, for
fp32 accuracy) and folds each
tile into a running per-query top-K_PAD list held in registers, then writes that list:
candidates [Q, n_chunks, K_PAD]. Splitting the bank into chunks keeps the GPU full when there
are few queries. Stage 2 (torch) takes the top k of the n_chunks * K_PAD candidates of each query.

Keys. A score and its index travel together as one int64, so that selecting the largest keys
carries the index along: the high 32 bits are the fp32 score mapped to an int32 with the same
order (negative floats get their magnitude bits flipped; every NaN maps to the smallest int32,
below -inf, and -0.0 to +0.0), the low 32 bits are ``~index`` read as unsigned, so equal scores
prefer the smaller index and the order is total and deterministic: the order documented by
:func:`vljepa_fast.topk_similarity` (NaN last, ties lowest index). Masked bank rows get the
smallest int64, below every real key (a NaN key still has ``~index`` > 0 in its low bits), so
padding is never returned: every chunk holds at least min(K_PAD, rows in chunk) real keys, which
sums to at least k over the chunks. NaN keys decode to a NaN score (bits 0xFFFFFFFF).

A tile is merged only when one of its keys beats the current K_PAD-th best of some query; after
the first few tiles most tiles are skipped, which saves the K_PAD selection rounds of a merge.

Large k (K_PAD > MAX_K_PAD, where the running list no longer fits in registers): stage 1 writes
every key of its tiles and stage 2 selects, query block by query block, so that the key buffer
stays below ``_MAX_BUFFER_KEYS`` elements.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import interpreting, launch, pointer_type

__all__ = [
    "MAX_K_PAD",
    "TopkConfig",
    "kernel_spec",
    "topk_config",
    "topk_similarity",
    "topk_similarity_kernel",
]

#: Largest running list (per query, a power of two) kept in registers by stage 1.
MAX_K_PAD = 128

# Smallest int64: the key of a masked bank row.
_KEY_PAD = tl.constexpr(-(2**63))
# Ordered value of every NaN score: the smallest int32, below -inf's (-2**31 + 2**23 - 1).
_ORD_NAN = tl.constexpr(-(2**31))

# Keys kept at once on the large-k path (8 bytes each).
_MAX_BUFFER_KEYS = 1 << 26


@triton.jit
def _score_keys(b_s, o_n, m_n):
    """Pack fp32 scores [BQ, BN] and their bank indices [BN] into order-preserving int64 keys.

    Every NaN maps to the smallest ordered value (ranks below -inf) and -0.0 to +0.0's (equal
    scores tie, and ties go to the lowest index). Both tests are on the bits, so no compiler
    assumption about NaN can drop them.
    """
    b_bits = b_s.to(tl.int32, bitcast=True)
    b_mag = b_bits & 0x7FFFFFFF
    b_ord = b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)
    b_ord = tl.where(b_mag > 0x7F800000, _ORD_NAN, b_ord)
    b_ord = tl.where(b_mag == 0, 0, b_ord)
    b_idx = (~o_n).to(tl.uint32, bitcast=True).to(tl.int64)
    b_key = (b_ord.to(tl.int64) << 32) | b_idx[None, :]
    return tl.where(m_n[None, :], b_key, _KEY_PAD)


@triton.jit
def topk_similarity_kernel(
    q,
    b,
    keys,
    Q,
    N,
    D,
    tiles_per_chunk,
    eps,
    COSINE: tl.constexpr,
    SELECT: tl.constexpr,
    K_PAD: tl.constexpr,
    BQ: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Stage 1. Grid (cdiv(Q, BQ), n_chunks); chunk i_c is bank tiles
    [i_c * tiles_per_chunk, (i_c + 1) * tiles_per_chunk) of BN rows.

    SELECT: write the top K_PAD keys of the chunk to keys [Q, n_chunks, K_PAD], sorted
    descending. Otherwise (tiles_per_chunk == 1) write all BN keys of the tile to keys
    [Q, n_chunks * BN].
    """
    i_q, i_c = tl.program_id(0), tl.program_id(1)
    n_tiles = tl.cdiv(N, BN)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_q = o_q < Q
    # int64 row offsets: N * D and Q * N_keys may pass 2**31.
    o_qrow = o_q.to(tl.int64)
    o_k = tl.arange(0, BD)

    if COSINE:
        b_ssq = tl.zeros([BQ], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(D, BD)):
            o_d = i_d * BD + o_k
            # [BQ, BD]
            b_q = tl.load(
                q + o_qrow[:, None] * D + o_d[None, :],
                mask=m_q[:, None] & (o_d < D)[None, :],
                other=0.0,
            )
            b_q = b_q.to(tl.float32)
            b_ssq += tl.sum(b_q * b_q, axis=1)
        b_rq = 1.0 / tl.maximum(tl.sqrt(b_ssq), eps)

    if SELECT:
        o_top = tl.arange(0, K_PAD)
        b_top = tl.full([BQ, K_PAD], _KEY_PAD, dtype=tl.int64)
    i_t0 = i_c * tiles_per_chunk
    for i_t in range(i_t0, tl.minimum(i_t0 + tiles_per_chunk, n_tiles)):
        o_n = i_t * BN + tl.arange(0, BN)
        m_n = o_n < N
        b_s = tl.zeros([BQ, BN], dtype=tl.float32)
        b_ssb = tl.zeros([BN], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(D, BD)):
            o_d = i_d * BD + o_k
            m_d = o_d < D
            # [BQ, BD]
            b_q = tl.load(
                q + o_qrow[:, None] * D + o_d[None, :], mask=m_q[:, None] & m_d[None, :], other=0.0
            )
            # [BN, BD]
            b_b = tl.load(
                b + o_n.to(tl.int64)[:, None] * D + o_d[None, :],
                mask=m_n[:, None] & m_d[None, :],
                other=0.0,
            )
            if COSINE:
                b_ssb += tl.sum(b_b.to(tl.float32) * b_b.to(tl.float32), axis=1)
            if INTERPRET:
                # The interpreter's bf16 dot is wrong; only there, dot in fp32.
                b_q = b_q.to(tl.float32)
                b_b = b_b.to(tl.float32)
            # [BQ, BN]
            b_s = tl.dot(b_q, tl.trans(b_b), b_s, input_precision=DOT_PRECISION)
        if COSINE:
            b_s = b_s * b_rq[:, None] * (1.0 / tl.maximum(tl.sqrt(b_ssb), eps))[None, :]
        # [BQ, BN]
        b_key = _score_keys(b_s, o_n, m_n)

        if SELECT:
            # Merge only if some query's tile maximum beats its current K_PAD-th key.
            m_new = (tl.max(b_key, axis=1) > tl.min(b_top, axis=1)) & m_q
            if tl.max(m_new.to(tl.int32), axis=0) > 0:
                # Selection by K_PAD rounds of "take the largest key of both lists": it leaves
                # the list sorted and needs only row maxima (tl.sort's bitonic network needs
                # xor reductions, which Triton's interpreter runs element by element).
                b_old = b_top
                for i_k in range(0, K_PAD):
                    # [BQ]
                    b_max = tl.maximum(tl.max(b_old, axis=1), tl.max(b_key, axis=1))
                    b_top = tl.where(o_top[None, :] == i_k, b_max[:, None], b_top)
                    b_old = tl.where(b_old == b_max[:, None], _KEY_PAD, b_old)
                    b_key = tl.where(b_key == b_max[:, None], _KEY_PAD, b_key)
        else:
            p_key = keys + o_qrow[:, None] * (tl.num_programs(1) * BN) + o_n[None, :]
            tl.store(p_key, b_key, mask=m_q[:, None])

    if SELECT:
        p_top = keys + o_qrow[:, None] * (tl.num_programs(1) * K_PAD) + i_c * K_PAD + o_top[None, :]
        tl.store(p_top, b_top, mask=m_q[:, None])


class TopkConfig(NamedTuple):
    """Stage-1 launch configuration (see :func:`topk_config`)."""

    select: bool  # keep a running top-k_pad per query (else write every key, large k)
    k_pad: int  # running list length, a power of two >= k
    bq: int  # queries per program
    bn: int  # bank rows per tile
    bd: int  # feature columns per dot step
    num_warps: int
    num_stages: int


def topk_config(dtype: torch.dtype, num_queries: int, dim: int, k: int) -> TopkConfig:
    """Block sizes for :func:`topk_similarity`, chosen to compile without register spills.

    A program holds a [BQ, BN] fp32 score tile, its [BQ, BN] int64 keys and the [BQ, K_PAD]
    int64 running list in registers, so BQ shrinks as K_PAD grows (BQ * K_PAD <= 2048). BD is
    a 128-byte row segment per dot step for fp16/bf16 (64 bytes for fp32). When D is not a
    multiple of 16 the loads cannot be vectorised, each element needs its own address register,
    and the tiles are halved. Checked by the ``compile`` tests for sm_80 and sm_90.

    Args:
        dtype: dtype of queries and bank (float32, float16 or bfloat16).
        num_queries: Q.
        dim: D.
        k: number of results per query.

    Returns:
        a :class:`TopkConfig`.
    """
    k_pad = triton.next_power_of_2(k)
    select = k_pad <= MAX_K_PAD
    aligned = dim % 16 == 0
    # fp32 dots are three tf32 MMAs on split operands: a narrower step keeps them in registers.
    bd = 16 if dtype == torch.float32 else 64 if aligned else 32
    # fp32 with scalar loads has the most live registers of all: narrower tiles, one stage less.
    narrow = dtype == torch.float32 and not aligned
    bn = 32 if narrow else 64
    if select:
        bq = max(16, min(64, 2048 // k_pad) // (1 if aligned else 2))
        num_warps = 4
    else:
        k_pad = 1  # unused: no running list
        bq, bn, num_warps = (64, 128, 8) if aligned else (32, bn, 4)
    bq = min(bq, max(16, triton.next_power_of_2(num_queries)))
    bd = min(bd, max(16, triton.next_power_of_2(dim)))
    return TopkConfig(select, k_pad, bq, bn, bd, num_warps, num_stages=2 if narrow else 3)


def kernel_spec(
    dtype: torch.dtype, cosine: bool, cfg: TopkConfig, interpret: bool
) -> tuple[dict, dict]:
    """Signature (for ``tests/_aot.aot_compile``) and constexprs of one stage-1 variant.

    fp32 dots use three tf32 MMAs (``tf32x3``): fp32 accuracy on tensor cores, where ``ieee``
    falls back to FMAs and spills.
    """
    ptr = pointer_type(dtype)
    signature = {
        "q": ptr,
        "b": ptr,
        "keys": "*i64",
        "Q": "i32",
        "N": "i32",
        "D": "i32",
        "tiles_per_chunk": "i32",
        "eps": "fp32",
    }
    constexprs = dict(
        COSINE=cosine,
        SELECT=cfg.select,
        K_PAD=cfg.k_pad,
        BQ=cfg.bq,
        BN=cfg.bn,
        BD=cfg.bd,
        DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
        INTERPRET=interpret,
    )
    return {**signature, **{name: "constexpr" for name in constexprs}}, constexprs


def _decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of the kernel's key packing: int64 keys -> (fp32 scores, int64 indices)."""
    ordered = (keys >> 32).to(torch.int32)
    scores = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    indices = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return scores, indices


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreted runs gain nothing from more programs; a few chunks still exercise the merge.
    return 4


def topk_similarity(
    queries: Tensor,
    bank: Tensor,
    k: int,
    cosine: bool,
    *,
    eps: float,
    config: TopkConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k bank rows by inner product or cosine similarity for every query.

    Inputs are validated by the caller (``vljepa_fast.ops.topk_similarity.topk_inputs``).

    Args:
        queries: [Q, D] float32, float16 or bfloat16, contiguous; CUDA, or CPU (interpreter).
        bank: [N, D], same dtype and device, contiguous.
        k: 1 <= k <= N.
        cosine: divide each score by max(|query|, eps) * max(|bank row|, eps) (fp32 norms).
        eps: smallest norm, no default here: the one owner of the value is
            ``vljepa_fast.reference.NORM_EPS``, which callers pass; a zero row scores 0.
        config: block sizes; default :func:`topk_config`.

    Returns:
        (scores [Q, k] float32 sorted descending, indices [Q, k] int64). NaN scores rank
        last (below -inf); equal scores come smallest index first.
    """
    num_queries, dim = queries.shape
    num_bank = bank.shape[0]
    cfg = config or topk_config(queries.dtype, num_queries, dim, k)
    n_tiles = triton.cdiv(num_bank, cfg.bn)
    _, constexprs = kernel_spec(queries.dtype, cosine, cfg, interpreting(queries))
    consts = dict(**constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.select:
        q_blocks = triton.cdiv(num_queries, cfg.bq)
        n_chunks = min(n_tiles, triton.cdiv(_target_programs(queries.device), q_blocks))
        tiles_per_chunk = triton.cdiv(n_tiles, n_chunks)
        n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
        # Filled with the padding key: a candidate the kernel failed to write decodes to NaN.
        keys = torch.full(
            (num_queries, n_chunks * cfg.k_pad), -(2**63), dtype=torch.int64, device=queries.device
        )
        grid = (q_blocks, n_chunks)
        launch(
            topk_similarity_kernel,
            grid,
            queries,
            bank,
            keys,
            num_queries,
            num_bank,
            dim,
            tiles_per_chunk,
            eps,
            **consts,
        )
        return _decode(torch.topk(keys, k, dim=1).values)

    rows = max(cfg.bq, _MAX_BUFFER_KEYS // (n_tiles * cfg.bn) // cfg.bq * cfg.bq)
    scores, indices = [], []
    for q0 in range(0, num_queries, rows):
        part = queries[q0 : q0 + rows]
        keys = torch.full(
            (part.shape[0], n_tiles * cfg.bn), -(2**63), dtype=torch.int64, device=queries.device
        )
        grid = (triton.cdiv(part.shape[0], cfg.bq), n_tiles)
        launch(
            topk_similarity_kernel,
            grid,
            part,
            bank,
            keys,
            part.shape[0],
            num_bank,
            dim,
            1,
            eps,
            **consts,
        )
        s, i = _decode(torch.topk(keys, k, dim=1).values)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)
