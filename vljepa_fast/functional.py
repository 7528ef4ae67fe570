"""The public ops of vljepa_fast: validation, dispatch and the full contract of each op.

Every function checks its arguments (a ValueError naming the argument for anything it cannot
serve), then hands them to the backend chosen by :mod:`vljepa_fast._backends`. ``backend="auto"``
takes the fastest backend that serves the inputs and ends in the eager reference; a named
backend that cannot serve raises :class:`vljepa_fast.BackendUnavailableError` with its reasons.
"""

from __future__ import annotations

from torch import Tensor

from vljepa_fast import _backends
from vljepa_fast.ops import attention as _attention_ops
from vljepa_fast.ops import attention_auto as _attention_auto  # noqa: F401  (auto's rule)
from vljepa_fast.ops import attention_cuda as _attention_cuda  # noqa: F401  (registers)
from vljepa_fast.ops import attention_peers as _attention_peers  # noqa: F401  (registers)
from vljepa_fast.ops import infonce as _infonce_ops
from vljepa_fast.ops import sigmoid_loss as _sigmoid_ops
from vljepa_fast.ops import topk_similarity as _topk_ops

__all__ = ["attention", "attention_varlen", "infonce_loss", "sigmoid_loss", "topk_similarity"]


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
    backend: _backends.BackendSpec = "auto",
) -> Tensor:
    """Multi-head attention with grouped KV heads (GQA), key padding, optional causal mask and
    sliding (local) window.

    softmax(q k^T * scale + mask) v per head, with query head h reading KV head
    h // (Hq // Hkv). Differentiable with respect to q, k and v.

    Args:
        q: [B, T, Hq, D] queries (flash-attn layout), float32/float16/bfloat16 (float64 on the
            reference and sdpa backends only); the last dimension must be contiguous.
        k: [B, S, Hkv, D] keys, same dtype and device; Hq % Hkv == 0.
        v: [B, S, Hkv, D] values, same shape as k.
        key_padding_mask: [B, S] bool on q's device (any strides), True = a real key. Keys
            marked False take no part, whatever they hold (NaN, Inf included): outputs and the
            gradients of q and of real keys/values are those of the same call without them,
            and padded k/v positions get zero gradients. A query with no real key gets an
            output of zeros.
        causal: mask key j for query i when j > i + S - T (bottom-right aligned, as flash-attn;
            the usual lower-triangular mask when T == S). The VL-JEPA predictor uses False.
        window_size: (left, right) ints >= -1, flash-attn's sliding window: query i attends
            key j only if i + S - T - left <= j <= i + S - T + right, a bound of -1 being
            unbounded ((-1, -1), the default: no window). j counts padded positions, aligned
            bottom-right as causal (with T == S: i - left <= j <= i + right). causal=True makes
            the right bound 0 (min(right, 0)). Key padding applies on top: a query whose window
            holds no real key gets zeros, as any query with no key. (0, 0) is each query's
            own diagonal key only. Backends that cannot serve a window refuse it (a reason
            under ``auto``), none ignores it.
        scale: multiplier of q.k; None means 1 / sqrt(D).
        mask_queries: the key padding mask marks the padded queries too (self-attention over
            one padded sequence, the VL-JEPA predictor's case). True needs key_padding_mask and
            T == S: query i of batch b is padding iff key_padding_mask[b, i] is False; its
            output row is zero whatever q holds and it passes no gradient (every backend gives
            the result of computing the row and zeroing it afterwards). Backends that can skip
            the padded rows do (Triton skips their blocks; flash_attn and xformers unpad the
            queries as they do the keys), so a padded batch costs its real tokens. Default
            False: every query row is computed (a padded query attends to the real keys).
        backend: "auto", a name from :func:`vljepa_fast.backends`, or a mapping
            {op name: name} (:data:`vljepa_fast._backends.BackendSpec`).

    Returns:
        [B, T, Hq, D] tensor in q's dtype.

    NaN rule (every backend): NaN and +-Inf propagate as in plain softmax over the keys a query
    attends to. A query that attends to at least one key gets an output row of NaN when its q
    row holds a NaN or Inf, when one of its scores q.k is NaN or +Inf, or when all of its scores
    are -Inf (0 / 0); a non-finite entry v[b, j, g, d] makes column d non-finite for the
    queries attending to key j. Every output no non-finite input reaches is unchanged. A query
    that attends to no key gets zeros whatever the inputs hold; padded keys never take part;
    with mask_queries, padded queries get zeros whatever they hold.
    With causal=True or a window, a non-finite real key or value may also reach queries of its
    batch entry that the mask hides it from (kernels work on blocks of keys). Gradients with
    non-finite inputs are not specified beyond the key padding rule above.

    Raises:
        ValueError: a malformed argument (named in the message).
        BackendUnavailableError: a named backend cannot serve these inputs.
    """
    inputs = _attention_ops.attention_inputs(
        q,
        k,
        v,
        key_padding_mask=key_padding_mask,
        causal=causal,
        window_size=window_size,
        scale=scale,
        mask_queries=mask_queries,
    )
    return _backends.dispatch("attention", backend, inputs)


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
    backend: _backends.BackendSpec = "auto",
) -> Tensor:
    """Attention over packed sequences of different lengths (flash-attn's varlen API).

    Sequence b owns query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and key rows
    cu_seqlens_k[b]:cu_seqlens_k[b+1]; queries only attend to keys of their own sequence, so a
    padded batch costs only its real tokens. Differentiable with respect to q, k and v.

    Args:
        q: [total_q, Hq, D] packed queries (last dimension contiguous; other strides free).
        k: [total_k, Hkv, D] packed keys, Hq % Hkv == 0, same dtype and device.
        v: [total_k, Hkv, D] packed values.
        cu_seqlens_q: [B + 1] int32 on q's device: 0, then non-decreasing, ending at total_q.
            Any strides (a strided view is read as such).
        cu_seqlens_k: [B + 1] int32 likewise, ending at total_k.
        max_seqlen_q: the longest query sequence (>= every length; kernels size their grid on it).
        max_seqlen_k: the longest key sequence.
        causal: bottom-right aligned causal mask inside each sequence.
        window_size: (left, right) sliding window inside each sequence, the rule of
            :func:`attention` with T and S that sequence's own query and key lengths.
        scale: multiplier of q.k; None means 1 / sqrt(D).
        backend: "auto", a name from :func:`vljepa_fast.backends`, or a mapping
            {op name: name} (:data:`vljepa_fast._backends.BackendSpec`).

    Returns:
        [total_q, Hq, D] in q's dtype; queries of a sequence with no keys get zeros.

    NaN rule: that of :func:`attention`, sequence by sequence; a non-finite value never reaches
    another sequence.

    Note:
        Checking cu_seqlens reads them on the host (one device sync on GPU).
    """
    inputs = _attention_ops.varlen_inputs(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal=causal,
        window_size=window_size,
        scale=scale,
    )
    return _backends.dispatch("attention_varlen", backend, inputs)


def infonce_loss(
    pred: Tensor,
    target: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    symmetric: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    group: object | None = None,
    backend: _backends.BackendSpec = "auto",
) -> Tensor:
    """Bidirectional InfoNCE between predicted and target embeddings, without N x N logits.

    logits = norm(pred) @ norm(target)^T / temperature; row i of pred matches row i of target.
    Per-row loss: pred->target, logsumexp(logits[i, :]) - logits[i, i]; with ``symmetric`` the
    mean of that and target->pred, logsumexp(logits[:, i]) - logits[i, i].
    Differentiable with respect to pred, target and a tensor temperature.

    Args:
        pred: [N, D] predicted embeddings, float32/float16/bfloat16 (float64: reference only),
            any strides (transposed, sliced, expanded, offset: the fused backends copy them to
            contiguous rows first).
        target: [N, D] target embeddings, same shape, dtype and device.
        temperature: a finite float >= 2**-60 (about 8.7e-19: 1/temperature and the logits,
            |logits| <= 1/temperature with ``normalize``, must stay well inside float32, where
            the kernels form them), or a 0-dim floating tensor (learnable; its value is checked
            eagerly against the same range, outside torch.compile).
        symmetric: both directions (VL-JEPA) or pred->target only.
        normalize: L2-normalise rows first, dividing by max(norm, 1e-12): a zero row stays zero
            (its logits are 0); rows with norm < 1e-12 get a zero gradient, the others that of
            x / |x| (:func:`vljepa_fast.reference.normalize_rows`).
        reduction: "mean" or "sum" (scalars) or "none" ([N] per-row losses).
        group: a torch.distributed process group (or ``torch.distributed.group.WORLD``): each
            rank passes its local rows (at least one; the number may differ by rank); negatives
            are the whole global batch.
        backend: "auto", a name from :func:`vljepa_fast.backends`, or a mapping
            {op name: name} (:data:`vljepa_fast._backends.BackendSpec`).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [N] for reduction="none".
        See :mod:`vljepa_fast.ops.infonce` for the distributed conventions (which gradient each
        rank receives).

    NaN rule:
        NaN and Inf in ``pred`` or ``target`` are not filtered: they propagate through the
        logits as IEEE arithmetic does (with ``normalize`` a row holding a NaN or an Inf
        normalises to NaNs). A per-row term is non-finite (NaN or +-Inf; which one is
        unspecified) exactly when the eager reference's is: when a logit of its row (or, with
        ``symmetric``, its column) is NaN or +Inf, or its positive logit is not finite; a -Inf
        logit elsewhere only adds exp(-inf) = 0. "mean" and "sum" are then non-finite. Every
        backend follows this rule.

    Raises:
        ValueError: a malformed argument (named in the message).
        BackendUnavailableError: a named backend cannot serve these inputs.
    """
    inputs = _infonce_ops.infonce_inputs(
        pred,
        target,
        temperature=temperature,
        symmetric=symmetric,
        normalize=normalize,
        reduction=reduction,
        group=group,
    )
    return _backends.dispatch("infonce_loss", backend, inputs)


def sigmoid_loss(
    pred: Tensor,
    target: Tensor,
    *,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    normalize: bool = True,
    reduction: str = "mean",
    group: object | None = None,
    backend: _backends.BackendSpec = "auto",
) -> Tensor:
    """The sigmoid (SigLIP) loss between predicted and target embeddings, without N x N logits.

    logits x_ij = logit_scale * cos(pred_i, target_j) + logit_bias; labels z_ij = +1 when
    j == i (row i of pred matches row i of target), else -1; loss = -sum_ij log sigmoid(z_ij
    x_ij). Differentiable with respect to pred, target and tensor logit_scale / logit_bias.
    The same values and gradients as open_clip's ``SigLipLoss`` (which takes already
    normalised features: use ``normalize=False``, or the drop-in
    :class:`vljepa_fast.integrations.open_clip.SigLipLoss`).

    Args:
        pred: [N, D] predicted (image) embeddings, float32/float16/bfloat16 (float64:
            reference only), any strides (the fused backend copies them to contiguous rows).
        target: [N, D] target (text) embeddings, same shape, dtype and device.
        logit_scale: the multiplier of the cosines itself, not its log (SigLIP learns
            t' and passes exp(t'), as open_clip's ``logit_scale.exp()``): a finite float with
            |logit_scale| <= 2**60, or a 0-dim floating tensor on pred's device (learnable;
            value checked eagerly against the same range, outside torch.compile).
        logit_bias: the bias added to every logit (SigLIP: b, initialised to -10), same rules.
        normalize: L2-normalise rows first, dividing by max(norm, 1e-12) (the values of
            ``F.normalize(eps=1e-12)``); rows with norm < 1e-12 get a zero gradient, the others
            that of x / |x| (:func:`vljepa_fast.reference.normalize_rows`). False: raw dot
            products (open_clip's convention: its features are normalised by the model).
        reduction: "mean": the sum over all N x N pairs divided by N (open_clip's SigLipLoss:
            the batch size, not N^2); "sum": that sum; "none": [N] per-row sums
            sum_j -log sigmoid(z_ij x_ij).
        group: a torch.distributed process group (or ``torch.distributed.group.WORLD``): each
            rank passes its local rows (at least one; the number may differ by rank); the
            negatives are the whole global batch, each of the global N x N pairs counted once
            (on the rank holding its pred row), "mean" divides by the global N and every rank
            returns the global loss. See :mod:`vljepa_fast.ops.sigmoid_loss` for which gradient
            each rank receives (DDP's average is the exact single-process gradient).
        backend: "auto", a name from :func:`vljepa_fast.backends`, or a mapping
            {op name: name} (:data:`vljepa_fast._backends.BackendSpec`).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [N] for reduction="none".

    NaN rule:
        NaN and Inf in the inputs are not filtered: they propagate through the logits as IEEE
        arithmetic does (with ``normalize`` a row holding a NaN or an Inf normalises to NaNs,
        so every term of its row, or of its column for a target row, is NaN); "mean" and
        "sum" are then NaN.

    Raises:
        ValueError: a malformed argument (named in the message).
        BackendUnavailableError: a named backend cannot serve these inputs.
    """
    inputs = _sigmoid_ops.sigmoid_inputs(
        pred,
        target,
        logit_scale=logit_scale,
        logit_bias=logit_bias,
        normalize=normalize,
        reduction=reduction,
        group=group,
    )
    return _backends.dispatch("sigmoid_loss", backend, inputs)


def topk_similarity(
    queries: Tensor, bank: Tensor, k: int, *, metric: str = "ip",
    backend: _backends.BackendSpec = "auto",
) -> tuple[Tensor, Tensor]:
    """The k most similar bank rows of every query, without writing the Q x N score matrix.

    Args:
        queries: [Q, D], float32/float16/bfloat16 (float64: reference only), Q >= 1, D >= 1.
            Any strides (a non-contiguous tensor is copied once for the kernels).
        bank: [N, D], same dtype and device, N >= 1, any strides.
        k: an int (Python or numpy integer, not bool), 1 <= k <= N (the cuda and triton
            backends serve k <= 2048, the cpu and reference backends any k).
        metric: "ip" (inner product) or "cosine" (each row divided by max(norm, 1e-12): a
            zero row scores exactly 0, never NaN).
        backend: "auto", a name from :func:`vljepa_fast.backends`, or a mapping
            {op name: name} (:data:`vljepa_fast._backends.BackendSpec`).

    Returns:
        (scores, indices): scores [Q, k] float32 (float64 for float64 inputs), accumulated in
        fp32 whatever the input dtype; indices [Q, k] int64 rows of ``bank``. Every backend
        returns one order (:func:`vljepa_fast.reference.topk_order`):

        * descending; +inf and -inf are ordinary scores (inf inputs, or fp32 products that
          overflow), and NaN scores (NaN inputs, inf - inf, inf * 0) rank last, below -inf,
          and are returned as NaN: a query row with a NaN gets indices 0..k-1, all NaN. (The
          triton backend's fp32 dots on CUDA are three tf32 products of x = hi + (x - hi): an
          inf entry scores NaN there.)
        * equal scores (-0.0 equals +0.0) come lowest bank index first, so results are
          deterministic and match faiss's order on exact ties.

        Scores carry a gradient to ``queries`` and ``bank`` when they require one: the values
        and order are the kernel's, the gradient is that of
        sim(queries[q], bank[indices[q, j]]) recomputed from the chosen rows in fp32 (float64
        stays). With "cosine", rows with norm < 1e-12 (zero rows) get a zero gradient: the eps
        clamp is treated as a constant (:func:`vljepa_fast.reference.normalize_rows`), so
        fp16 gradients stay finite. Indices never carry a gradient.

    Raises:
        ValueError: a malformed argument (named in the message).
        BackendUnavailableError: a named backend cannot serve these inputs.
    """
    return _backends.dispatch(
        "topk_similarity", backend, _topk_ops.topk_inputs(queries, bank, k, metric=metric)
    )
