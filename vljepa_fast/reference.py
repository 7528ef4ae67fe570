"""Eager PyTorch reference of every op: the specification, the fallback and the test oracle.

Each function here is the definition of what the fused kernels compute. They take the same
arguments as the public ops in :mod:`vljepa_fast.functional` (which validate them first), do their
math in float32 (float64 stays float64) and return results in the dtypes the public ops promise.
They build full intermediate matrices (attention probabilities, the N x M logits, the Q x N scores)
on purpose: they are clear, not fast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "apply_rotary",
    "attention",
    "attention_varlen",
    "infonce_loss",
    "infonce_terms",
    "sigmoid_loss",
    "sigmoid_terms",
    "topk_similarity",
    "topk_order",
    "normalize_rows",
    "NORM_EPS",
]

#: Smallest norm used when normalising rows (cosine similarity, InfoNCE ``normalize=True``): a
#: zero row is divided by this instead of by 0, so it stays a zero row and scores 0; rows below
#: it get a zero gradient (:func:`normalize_rows`).
NORM_EPS = 1e-12


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (low precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    scale: float | None = None,
    mask_queries: bool = False,
) -> Tensor:
    """Softmax attention with GQA, key padding, an optional causal mask and a local window.

    Args:
        q: [B, T, Hq, D] queries.
        k: [B, S, Hkv, D] keys, Hq % Hkv == 0 (query head h reads KV head h // (Hq // Hkv)).
        v: [B, S, Hkv, D] values.
        key_padding_mask: [B, S] bool, True marks a real key. None: every key is real.
        causal: mask key j for query i when j > i + (S - T) (bottom-right aligned, as flash-attn).
        window_size: (left, right), flash-attn's local window: query i attends key j only if
            i + S - T - left <= j <= i + S - T + right (padded positions, aligned as causal); a
            bound of -1 is unbounded; causal=True makes the right bound 0.
        scale: multiplier of q.k; None means 1 / sqrt(D).
        mask_queries: the key padding mask marks the queries too (needs it and T == S): query
            i of batch b is padding where key_padding_mask[b, i] is False; its output row is
            computed, then replaced by zeros (so it passes no gradient).

    Returns:
        [B, T, Hq, D] in q's dtype. A query whose keys are all masked (padding, causal, window)
        gets zeros, and so does a padded query under ``mask_queries``.

    Raises:
        ValueError: ``mask_queries`` without a key_padding_mask or with T != S.

    Padded keys take no part: their k and v are replaced by zeros before any arithmetic (a
    NaN there would otherwise reach every output through 0 * NaN), so they get zero gradients.
    Everything else is plain softmax arithmetic; its NaN / Inf results define the rule every
    backend follows (see :func:`vljepa_fast.functional.attention`).
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if mask_queries and (key_padding_mask is None or T != S):
        raise ValueError(
            f"mask_queries: True needs key_padding_mask and T == S, got "
            f"key_padding_mask={'None' if key_padding_mask is None else 'a mask'}, T={T}, S={S}"
        )
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = _compute_dtype(q, k, v)
    group = Hq // Hkv
    if key_padding_mask is not None:
        real = key_padding_mask[:, :, None, None]
        k = torch.where(real, k, torch.zeros((), dtype=k.dtype, device=k.device))
        v = torch.where(real, v, torch.zeros((), dtype=v.dtype, device=v.device))
    qf = q.to(cdt).transpose(1, 2)  # [B, Hq, T, D]
    kf = k.to(cdt).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    vf = v.to(cdt).transpose(1, 2).repeat_interleave(group, dim=1)
    logits = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hq, T, S]
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(T, device=q.device)[:, None] + (S - T)  # query i's diagonal key
    j = torch.arange(S, device=q.device)[None, :]
    if right >= 0:
        allowed = allowed & (j <= i + right)
    if left >= 0:
        allowed = allowed & (j >= i - left)
    logits = logits.masked_fill(~allowed, float("-inf"))
    # A fully masked row would give NaN from softmax; define it as zeros instead.
    any_allowed = allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(~any_allowed, 0.0), dim=-1) * any_allowed
    out = torch.matmul(probs, vf).transpose(1, 2)  # [B, T, Hq, D]
    if mask_queries:
        out = torch.where(key_padding_mask[:, :, None, None], out, 0.0)
    return out.to(q.dtype)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    scale: float | None = None,
) -> Tensor:
    """Attention over packed variable-length sequences (flash-attn's varlen layout).

    Args:
        q: [total_q, Hq, D] packed queries; sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1].
        k: [total_k, Hkv, D] packed keys, likewise with cu_seqlens_k.
        v: [total_k, Hkv, D] packed values.
        cu_seqlens_q: [B + 1] int32, cumulative query lengths starting at 0.
        cu_seqlens_k: [B + 1] int32, cumulative key lengths starting at 0.
        max_seqlen_q: longest query sequence (unused here; part of the flash-attn signature).
        max_seqlen_k: longest key sequence (unused here).
        causal: bottom-right aligned causal mask within each sequence.
        window_size: (left, right) local window within each sequence, aligned to its own
            lengths (see :func:`attention`).
        scale: multiplier of q.k; None means 1 / sqrt(D).

    Returns:
        [total_q, Hq, D] in q's dtype.
    """
    del max_seqlen_q, max_seqlen_k
    out = torch.empty_like(q)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if cq[b + 1] == cq[b]:
            continue
        out[qs] = attention(
            q[None, qs],
            k[None, ks],
            v[None, ks],
            causal=causal,
            window_size=window_size,
            scale=scale,
        )[0]
    return out


# --------------------------------------------------------------------------------------------
# infonce
# --------------------------------------------------------------------------------------------


def infonce_terms(
    pred: Tensor,
    target: Tensor,
    scale: Tensor | float,
    *,
    offset: int = 0,
    normalize: bool = True,
    col_stats: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The per-row and per-column terms every InfoNCE backend computes (the kernel contract).

    With S = scale * norm(pred) @ norm(target)^T ([N, M]; norm is :func:`normalize_rows` with
    ``normalize``, the identity without), the positive of row i is column i + offset. Zero-row
    rule: a row whose norm is below NORM_EPS is divided by NORM_EPS (a zero row gives zero
    logits) and gets a zero gradient; every backend's backward follows it.

    Returns:
        (row_lse [N], col_lse [M] or None, pos_row [N], pos_col [M] or None), float32 (float64
        for float64 inputs): log-sum-exp of each row and column of S, and the positive logit of
        each row (S[i, i + offset]) and column (S[j - offset, j]). The fused kernels
        (``torch.ops.vljepa_fast.infonce_fwd``) give the same values but return the two LSEs in
        float64, for their backward's sake (see csrc/ops.cpp).
    """
    cdt = _compute_dtype(pred, target)
    a, b = pred.to(cdt), target.to(cdt)
    if normalize:
        a, b = normalize_rows(a), normalize_rows(b)
    s = (a @ b.T) * (scale.to(cdt) if isinstance(scale, Tensor) else scale)
    n, m = s.shape
    rows = torch.arange(n, device=s.device)
    row_lse = torch.logsumexp(s, dim=1)
    pos_row = s[rows, rows + offset]
    if not col_stats:
        return row_lse, None, pos_row, None
    cols = torch.arange(m, device=s.device)
    col_lse = torch.logsumexp(s, dim=0)
    pos_col = s[(cols - offset).clamp(0, n - 1), cols]
    return row_lse, col_lse, pos_row, pos_col


def infonce_loss(
    pred: Tensor,
    target: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    symmetric: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Bidirectional (or one-way) InfoNCE between matching rows of ``pred`` and ``target``.

    logits = norm(pred) @ norm(target)^T / temperature, [N, N]; row i's positive is column i.
    pred->target loss of row i: logsumexp(logits[i, :]) - logits[i, i]; target->pred loss of row
    i: logsumexp(logits[:, i]) - logits[i, i]. Symmetric: per-row loss is the mean of the two.

    Args:
        pred: [N, D] predicted embeddings.
        target: [N, D] target embeddings.
        temperature: positive float, or a 0-dim tensor (gradient flows to it); the public op
            serves temperature >= 2**-60 (vljepa_fast.ops.infonce.MIN_TEMPERATURE).
        symmetric: average both directions; False keeps pred->target only.
        normalize: L2-normalise rows first with :func:`normalize_rows`: values as
            ``F.normalize(eps=NORM_EPS)``; rows with norm below NORM_EPS (zero rows) get a zero
            gradient, the others that of x / |x|.
        reduction: "mean" (scalar), "sum" (scalar) or "none" ([N] per-row losses).

    Returns:
        The loss in float32 (float64 for float64 inputs). NaN rule: NaN / Inf inputs are not
        filtered and propagate through the logits by IEEE arithmetic; the terms this gives
        non-finite define the rule every backend follows (vljepa_fast.functional.infonce_loss).
    """
    scale = 1.0 / temperature
    row_lse, col_lse, pos_row, pos_col = infonce_terms(
        pred, target, scale, normalize=normalize, col_stats=symmetric
    )
    per_row = row_lse - pos_row
    if symmetric:
        per_row = 0.5 * (per_row + (col_lse - pos_col))
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


# --------------------------------------------------------------------------------------------
# sigmoid_loss
# --------------------------------------------------------------------------------------------


def sigmoid_terms(
    pred: Tensor,
    target: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    offset: int = 0,
    normalize: bool = True,
) -> Tensor:
    """Per-row sums of the sigmoid (SigLIP) loss terms (what every sigmoid_loss backend computes).

    x = logit_scale * norm(pred) @ norm(target)^T + logit_bias ([N, M]; norm is
    :func:`normalize_rows` with ``normalize``, the identity without); z_ij = +1 when
    j == i + offset (row i's positive), else -1. Returns [N]: sum_j -log sigmoid(z_ij x_ij), in
    float32 (float64 for float64 inputs; a tensor scale or bias is cast to that dtype).
    """
    cdt = _compute_dtype(pred, target)
    a, b = pred.to(cdt), target.to(cdt)
    if normalize:
        a, b = normalize_rows(a), normalize_rows(b)
    scale = logit_scale.to(cdt) if isinstance(logit_scale, Tensor) else logit_scale
    bias = logit_bias.to(cdt) if isinstance(logit_bias, Tensor) else logit_bias
    x = (a @ b.T) * scale + bias
    n, m = x.shape
    rows = torch.arange(n, device=x.device)[:, None]
    cols = torch.arange(m, device=x.device)[None, :]
    z = torch.where(cols == rows + offset, 1.0, -1.0).to(cdt)
    return -torch.nn.functional.logsigmoid(z * x).sum(dim=1)


def sigmoid_loss(
    pred: Tensor,
    target: Tensor,
    *,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """The sigmoid (SigLIP) loss of matching rows: -sum_ij log sigmoid(z_ij x_ij).

    x = logit_scale * norm(pred) @ norm(target)^T + logit_bias, z_ij = +1 on the diagonal and -1
    elsewhere (:func:`sigmoid_terms`). ``logit_scale`` is the multiplier itself (open_clip's
    ``SigLipLoss`` receives ``logit_scale.exp()``). reduction: "mean" divides the sum over all
    N x N pairs by N (open_clip's convention), "sum" keeps it, "none" returns the [N] per-row
    sums. float32 (float64 for float64 inputs).
    """
    per_row = sigmoid_terms(pred, target, logit_scale, logit_bias, normalize=normalize)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.sum() / per_row.shape[0]


# --------------------------------------------------------------------------------------------
# topk_similarity
# --------------------------------------------------------------------------------------------


def normalize_rows(x: Tensor) -> Tensor:
    """Rows divided by max(norm, NORM_EPS), with the gradient rule of the cosine metric.

    The value is ``F.normalize(x, dim=-1, eps=NORM_EPS)``. The gradient is that of x / |x| on
    rows with norm >= NORM_EPS, and zero on rows below it (the clamp is treated as a constant:
    a zero row has no direction, and 1 / NORM_EPS = 1e12 slopes would overflow fp16 gradients).
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    big = norm >= NORM_EPS
    # x / 1 on the small rows keeps NaN (0 / 0) out of the masked branch and its gradient
    unit = x / torch.where(big, norm, torch.ones_like(norm))
    return torch.where(big, unit, (x / NORM_EPS).detach())


def _topk_order_exact(scores: Tensor, k: int) -> Tensor:
    """:func:`topk_order` by ranks over whole rows (O(Q * N) extra passes and memory)."""
    nan = scores.isnan()
    key = scores.masked_fill(nan, -math.inf)
    # The k-th best key of each row (a value, unique whatever topk does with ties).
    kth = key.topk(k, dim=1).values[:, -1:]
    above = key > kth
    # Of the keys equal to the k-th, the lowest indices fill the remaining places; when the k-th
    # is -inf, real -inf scores come before NaN ones.
    need = k - above.sum(1, keepdim=True)
    tie = (key == kth) & ~nan
    tie_nan = nan & (kth == -math.inf)
    tie_rank = tie.cumsum(1)
    nan_rank = tie.sum(1, keepdim=True) + tie_nan.cumsum(1)
    chosen = above | (tie & (tie_rank <= need)) | (tie_nan & (nan_rank <= need))
    return chosen.nonzero()[:, 1].view(scores.shape[0], k)


def topk_order(scores: Tensor, k: int) -> Tensor:
    """Indices [Q, k] of the k best columns of every row of ``scores`` [Q, N] in the documented
    order of topk_similarity: descending, NaN below -inf, equal scores lowest index first
    (-0.0 equals +0.0). Each row's choice is unique, so every backend returns the same indices.
    """
    # torch.topk picks any of equal values and ranks NaN first. Its set is still the right one
    # in every row without a NaN whose k-th value differs from its (k+1)-th (no tie cut by k).
    kk = min(k + 1, scores.shape[1])
    values, index = scores.topk(kk, dim=1)
    redo = values[:, 0].isnan()
    if kk > k:
        redo = redo | (values[:, k - 1] == values[:, k])
    # The other rows take the exact choice by ranks over the whole row (slower).
    rows = redo.nonzero()[:, 0]
    index = index[:, :k].index_copy(0, rows, _topk_order_exact(scores.index_select(0, rows), k))
    # Order the k: by index, then stably by score descending, then stably NaN last.
    index = index.sort(dim=1).values
    chosen = scores.gather(1, index)
    nan = chosen.isnan()
    order = chosen.masked_fill(nan, -math.inf).sort(dim=1, descending=True, stable=True).indices
    index, nan = index.gather(1, order), nan.gather(1, order)
    return index.gather(1, nan.to(torch.uint8).sort(dim=1, stable=True).indices)


def topk_similarity(
    queries: Tensor, bank: Tensor, k: int, *, metric: str = "ip"
) -> tuple[Tensor, Tensor]:
    """Top-k bank rows by similarity for every query (mm + topk over the full score matrix).

    Args:
        queries: [Q, D].
        bank: [N, D].
        k: 1 <= k <= N.
        metric: "ip" (inner product) or "cosine" (rows divided by max(norm, NORM_EPS): a zero
            row scores 0 against everything; gradient rule: :func:`normalize_rows`).

    Returns:
        (scores [Q, k] float32 (float64 for float64 inputs), indices [Q, k] int64), in the order
        of :func:`topk_order`: descending, NaN scores last (below -inf), equal scores lowest
        bank index first.
    """
    cdt = _compute_dtype(queries, bank)
    q, b = queries.to(cdt), bank.to(cdt)
    if metric == "cosine":
        q, b = normalize_rows(q), normalize_rows(b)
    full = q @ b.T
    indices = topk_order(full.detach(), k)
    return full.gather(1, indices), indices


# --------------------------------------------------------------------------------------------
# rotary
# --------------------------------------------------------------------------------------------


def _partner(x: Tensor, interleaved: bool) -> Tensor:
    """x[p(c)] * s(c): (-x1, x0, -x3, x2, ..) interleaved, (-x_hi, x_lo) rotate-half."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, layout: str = "llama"
) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of queries and keys: x * cos + partner(x) * sin per head.

    out[.., c] = x[.., c] * cos[t, c] + s(c) * x[.., p(c)] * sin[t, c], with pair partner p(c)
    and sign s(c) = -1 on the first channel of a pair, +1 on the second: ``"llama"`` pairs c
    with c + D/2 (rotate-half), ``"vjepa2"`` pairs 2i with 2i + 1.

    Args:
        q: [B, T, Hq, D] queries; k: [B, T, Hkv, D] keys, same dtype.
        cos, sin: [T, D] or [B or 1, T, D] tables (any float dtype).
        layout: "llama" or "vjepa2".

    Returns:
        (q_rot, k_rot) in q's dtype; math in fp32 (float64 for float64 inputs), differentiable
        in every argument (the tables included).
    """
    cdt = _compute_dtype(q)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    c, s = cos.to(cdt)[:, :, None, :], sin.to(cdt)[:, :, None, :]
    interleaved = layout == "vjepa2"
    out = []
    for x in (q, k):
        x32 = x.to(cdt)
        out.append((x32 * c + _partner(x32, interleaved) * s).to(x.dtype))
    return out[0], out[1]
