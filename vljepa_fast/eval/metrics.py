"""Evaluation metrics on similarity matrices and scores: pure functions, python floats out.

Inputs are torch tensors or numpy arrays of any real dtype on any device (read once, compared
in their own precision: ranks need comparisons only); outputs are python floats and dicts.

Ranks and the tie rule
----------------------
A query's ground truth (its video, its caption, its class, its answer) gets the rank

    rank = 1 + #{negatives j : s_j > s_gt}            ties="optimistic"
    rank = 1 + #{negatives j : s_j >= s_gt}           ties="pessimistic" (the default)

where the negatives are the gallery items that are not a ground truth of that query. So with
the default a ground truth tied with k negatives ranks below all k of them (a constant-score
model gets rank = gallery size, never R@1 = 1); "optimistic" ranks it above them. Without ties
both equal the rank of CLIP4Clip's / the MSR-VTT ``compute_metrics`` (1 + the position of the
diagonal entry in the row sorted in descending order) and CLIP_benchmark's recall@k (at least
one positive among ``torch.topk``), which break ties by sort position (CLIP4Clip's ``np.where``
then emits one entry per tied position) or arbitrarily (``torch.topk``).

A query with several ground truths (video-to-text retrieval with several captions per video,
as CLIP_benchmark's ``text_retrieval_recall``) takes the best-ranked one: rank is computed
against the highest-scoring positive, so R@k = "at least one positive among the top k".

R@k = mean over queries of [rank <= k]; median rank = numpy's median of the ranks (the mean of
the two middle ranks for an even count, as ``np.median(ind) + 1`` in CLIP4Clip); mean rank = the
mean of the ranks. Fractions are in [0, 1] (not percent).

For VQA (:func:`vqa_accuracy`) a question is right when its true answer has rank 1, so a tie
for first is wrong under "pessimistic" and right under "optimistic"; this differs from
:meth:`vljepa_fast.models.VLJEPA.answer`, which picks the lowest index among tied candidates.

NaN scores are refused (ValueError naming the argument); +-inf are ordinary ordered values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "boundary_recall",
    "classification_accuracy",
    "decoding_efficiency",
    "gt_ranks",
    "rank_summary",
    "retrieval_metrics",
    "selective_decoding_efficiency",
    "text_to_video_metrics",
    "uniform_segment_starts",
    "video_to_text_metrics",
    "vqa_accuracy",
]

TIES = ("pessimistic", "optimistic")
_CHUNK = 1024  # query rows per comparison block (bounds the [rows, gallery] bool temporary)


# ---------------------------------------------------------------------------------- checks


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    return x.detach()


def _scores(x, name: str, rank: int = 2) -> Tensor:
    t = _as_tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name}: expected real scores, got {t.dtype}")
    if t.dim() != rank:
        want = "[queries, gallery]" if rank == 2 else f"rank {rank}"
        raise ValueError(f"{name}: expected a {want} matrix, got shape {tuple(t.shape)}")
    if t.numel() == 0 or min(t.shape) == 0:
        raise ValueError(f"{name}: expected a non-empty matrix, got shape {tuple(t.shape)}")
    if t.is_floating_point() and torch.isnan(t).any():
        raise ValueError(f"{name}: contains NaN")
    return t


def _indices(x, name: str, n: int, upper: int, upper_name: str) -> Tensor:
    t = _as_tensor(x, name) if not isinstance(x, Sequence) else torch.as_tensor(list(x))
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name}: expected integer indices, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: expected shape [{n}], got {tuple(t.shape)}")
    t = t.to("cpu", torch.int64)
    if n and (t.min() < 0 or t.max() >= upper):
        raise ValueError(
            f"{name}: indices must lie in [0, {upper}) ({upper_name}), got "
            f"[{int(t.min())}, {int(t.max())}]"
        )
    return t


def _ks(ks, gallery: int, what: str) -> tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks: expected at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ks: expected ints >= 1, got {k!r}")
        if k > gallery:
            raise ValueError(f"ks: k = {k} is larger than the {what} ({gallery})")
    return ks


def _check_ties(ties: str) -> str:
    if ties not in TIES:
        raise ValueError(f"ties: expected one of {TIES}, got {ties!r}")
    return ties


# ---------------------------------------------------------------------------------- ranks


def gt_ranks(scores, positives, *, ties: str = "pessimistic") -> Tensor:
    """Rank of each query's best ground truth in its row (see the module docstring).

    Args:
        scores: [Q, G] real scores (higher = more similar), torch or numpy, any device.
        positives: [Q, G] bool, True where gallery item g is a ground truth of query q; every
            row needs at least one True and (for a meaningful rank) may hold several.
        ties: "pessimistic" (default; a tied negative ranks above the ground truth) or
            "optimistic" (below it).

    Returns:
        [Q] int64 ranks in [1, G] on the CPU.

    Raises:
        ValueError: NaN scores, a non-matrix, mismatched shapes, a row without a positive.
    """
    ties = _check_ties(ties)
    s = _scores(scores, "scores")
    p = _as_tensor(positives, "positives")
    if p.dtype != torch.bool or p.shape != s.shape:
        raise ValueError(
            f"positives: expected bool {tuple(s.shape)} (the shape of scores), got "
            f"{p.dtype} {tuple(p.shape)}"
        )
    p = p.to(s.device)
    empty = ~p.any(dim=1)
    if empty.any():
        rows = torch.nonzero(empty).flatten()[:10].tolist()
        raise ValueError(f"positives: queries without a ground truth (rows {rows}...)")
    out = []
    for lo in range(0, s.shape[0], _CHUNK):
        sb, pb = s[lo : lo + _CHUNK], p[lo : lo + _CHUNK]
        if sb.is_floating_point():
            floor = torch.tensor(-torch.inf, dtype=sb.dtype, device=sb.device)
        else:
            floor = torch.tensor(torch.iinfo(sb.dtype).min, dtype=sb.dtype, device=sb.device)
        best = torch.where(pb, sb, floor).amax(dim=1, keepdim=True)
        beats = sb > best if ties == "optimistic" else sb >= best
        out.append(1 + (beats & ~pb).sum(dim=1).cpu())
    return torch.cat(out).to(torch.int64)


def rank_summary(ranks, ks: Sequence[int] = (1, 5, 10), *, gallery: int | None = None) -> dict:
    """R@k, median and mean rank of ranks.

    Args:
        ranks: [Q] int ranks >= 1.
        ks: the k of each R@k; each k must be <= ``gallery`` when it is given.
        gallery: the gallery size (checks ks).

    Returns:
        {"R@k": fraction of ranks <= k for each k, "median_rank": float, "mean_rank": float,
        "queries": Q}.
    """
    r = _as_tensor(ranks, "ranks")
    if r.dim() != 1 or r.numel() == 0 or r.is_floating_point() or r.dtype == torch.bool:
        raise ValueError(
            f"ranks: expected a non-empty [Q] integer tensor, got {r.dtype} {tuple(r.shape)}"
        )
    if r.min() < 1:
        raise ValueError(f"ranks: expected ranks >= 1, got min {int(r.min())}")
    ks = _ks(ks, (1 << 62) if gallery is None else gallery, "gallery")
    a = r.cpu().numpy().astype(np.float64)
    out = {f"R@{k}": float(np.mean(a <= k)) for k in ks}
    out["median_rank"] = float(np.median(a))
    out["mean_rank"] = float(np.mean(a))
    out["queries"] = int(a.shape[0])
    return out


# ---------------------------------------------------------------------------------- retrieval


def _positives(n_texts: int, n_videos: int, text_to_video: Tensor) -> Tensor:
    p = torch.zeros(n_texts, n_videos, dtype=torch.bool)
    p[torch.arange(n_texts), text_to_video] = True
    return p


def _text_video(similarity, text_to_video, ties: str) -> tuple[Tensor, Tensor]:
    _check_ties(ties)
    s = _scores(similarity, "similarity")
    n_texts, n_videos = s.shape
    if text_to_video is None:
        if n_texts != n_videos:
            raise ValueError(
                f"text_to_video: required when similarity is not square (got {n_texts} texts "
                f"x {n_videos} videos)"
            )
        idx = torch.arange(n_texts)
    else:
        idx = _indices(text_to_video, "text_to_video", n_texts, n_videos, "the video count")
    return s, idx


def text_to_video_metrics(
    similarity, text_to_video=None, ks: Sequence[int] = (1, 5, 10), *, ties: str = "pessimistic"
) -> dict:
    """Text-to-video retrieval: each caption queries the videos.

    Args:
        similarity: [n_texts, n_videos] scores (e.g. cosine of caption and video embeddings).
        text_to_video: [n_texts] int, the video of each caption (several captions may share a
            video); None means the identity (a square matrix, caption i of video i).
        ks: the R@k to report (each <= n_videos).
        ties: the tie rule (module docstring).

    Returns:
        {"R@1", "R@5", "R@10", "median_rank", "mean_rank", "queries"} (python numbers).
    """
    s, idx = _text_video(similarity, text_to_video, ties)
    ks = _ks(ks, s.shape[1], "video gallery")
    ranks = gt_ranks(s, _positives(*s.shape, idx).to(s.device), ties=ties)
    return rank_summary(ranks, ks)


def video_to_text_metrics(
    similarity, text_to_video=None, ks: Sequence[int] = (1, 5, 10), *, ties: str = "pessimistic"
) -> dict:
    """Video-to-text retrieval: each video queries the captions; a video's rank is the rank of
    its best-ranked caption (CLIP_benchmark's "at least one of its captions in the top k").

    Args:
        similarity: [n_texts, n_videos] scores, the same matrix as text-to-video (transposed
            here).
        text_to_video: [n_texts] int, the video of each caption; every video needs at least one
            caption. None means the identity.
        ks: the R@k to report (each <= n_texts).
        ties: the tie rule (module docstring); a video's other captions are never negatives.

    Returns:
        {"R@k"..., "median_rank", "mean_rank", "queries"}.
    """
    s, idx = _text_video(similarity, text_to_video, ties)
    n_texts, n_videos = s.shape
    ks = _ks(ks, n_texts, "caption gallery")
    counts = torch.bincount(idx, minlength=n_videos)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten()[:10].tolist()
        raise ValueError(
            f"text_to_video: videos {missing} have no caption (video-to-text needs one per video)"
        )
    ranks = gt_ranks(s.t(), _positives(n_texts, n_videos, idx).t().to(s.device), ties=ties)
    return rank_summary(ranks, ks)


def retrieval_metrics(
    similarity, text_to_video=None, ks: Sequence[int] = (1, 5, 10), *, ties: str = "pessimistic"
) -> dict:
    """Both directions: {"text_to_video": ..., "video_to_text": ...} (see those functions)."""
    return {
        "text_to_video": text_to_video_metrics(similarity, text_to_video, ks, ties=ties),
        "video_to_text": video_to_text_metrics(similarity, text_to_video, ks, ties=ties),
    }


# ---------------------------------------------------------------------------- classification


def classification_accuracy(
    scores, labels, ks: Sequence[int] = (1, 5), *, ties: str = "pessimistic"
) -> dict:
    """Zero-shot classification top-k accuracy.

    Args:
        scores: [N, n_classes] scores of each sample against each class (label-text) embedding.
        labels: [N] int true class of each sample.
        ks: the top-k to report (each <= n_classes).
        ties: the tie rule (module docstring): with "pessimistic" a class tied with the true
            one counts as ranked above it.

    Returns:
        {"top1": ..., "top5": ... (one "top{k}" per k), "samples": N}.
    """
    _check_ties(ties)
    s = _scores(scores, "scores")
    n, c = s.shape
    y = _indices(labels, "labels", n, c, "the class count")
    ks = _ks(ks, c, "number of classes")
    ranks = gt_ranks(s, _positives(n, c, y).to(s.device), ties=ties).numpy()
    out = {f"top{k}": float(np.mean(ranks <= k)) for k in ks}
    out["samples"] = int(n)
    return out


def vqa_accuracy(scores, answers, *, ties: str = "pessimistic") -> dict:
    """Multiple-choice VQA accuracy: a question is right when its true answer ranks first.

    Args:
        scores: [N, n_candidates] scores of each question's candidate answers, or a sequence of
            N 1-D score vectors (questions with different candidate counts).
        answers: [N] int index of the true candidate of each question.
        ties: the tie rule (module docstring): "pessimistic" (default) counts a true answer
            tied for first with another candidate as wrong, "optimistic" as right.

    Returns:
        {"accuracy": fraction right, "questions": N}.

    Note:
        :meth:`vljepa_fast.models.VLJEPA.answer` breaks an exact tie by the lowest candidate
        index instead, so on exact ties its picks and this accuracy can differ: a true answer
        tied with a higher-index candidate is answer()'s pick but wrong under "pessimistic";
        a true answer tied with a lower-index one is not answer()'s pick but right under
        "optimistic". Without ties all three agree.
    """
    _check_ties(ties)
    if isinstance(scores, (list, tuple)):
        if not scores:
            raise ValueError("scores: expected at least one question")
        rows = [_scores(r, f"scores[{i}]", rank=1) for i, r in enumerate(scores)]
        n = len(rows)
        y = _indices(answers, "answers", n, 1 << 62, "the candidate count")
        correct = []
        for i, (r, a) in enumerate(zip(rows, y.tolist())):
            if a >= r.shape[0]:
                raise ValueError(
                    f"answers[{i}]: {a} is not a candidate index (question {i} has "
                    f"{r.shape[0]} candidates)"
                )
            pos = torch.zeros(1, r.shape[0], dtype=torch.bool, device=r.device)
            pos[0, a] = True
            correct.append(int(gt_ranks(r[None], pos, ties=ties)[0]) == 1)
        return {"accuracy": float(np.mean(correct)), "questions": n}
    s = _scores(scores, "scores")
    n, c = s.shape
    y = _indices(answers, "answers", n, c, "the candidate count")
    ranks = gt_ranks(s, _positives(n, c, y).to(s.device), ties=ties).numpy()
    return {"accuracy": float(np.mean(ranks == 1)), "questions": int(n)}


# ------------------------------------------------------------------------ selective decoding


def _starts(x, name: str, T: int) -> list[int]:
    t = _as_tensor(x, name) if not isinstance(x, Sequence) else torch.as_tensor(list(x))
    if t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(
            f"{name}: expected a non-empty 1-D integer list of segment starts, got "
            f"{t.dtype} {tuple(t.shape)}"
        )
    s = t.tolist()
    if s[0] != 0 or any(b >= e for b, e in zip(s, s[1:])) or s[-1] >= T:
        raise ValueError(
            f"{name}: expected strictly ascending starts in [0, {T}) beginning at 0, got {s[:20]}"
        )
    return s


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T: expected an int >= 1 (the stream length), got {T!r}")
    return T


def _check_tolerance(tolerance) -> int:
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance: expected an int >= 0 (windows), got {tolerance!r}")
    return tolerance


def boundary_recall(pred_starts, true_starts, T: int, tolerance: int = 0) -> float:
    """Fraction of true segment boundaries found within ``tolerance`` windows.

    A boundary is a segment start other than 0 (a change between windows b - 1 and b). True
    and predicted boundaries are matched one to one, a pair allowed when |p - b| <= tolerance;
    the recall is (the size of a maximum matching) / (the number of true boundaries). So one
    predicted boundary never finds two true ones (two close scene changes need two cuts).
    The maximum matching is found greedily: true boundaries in ascending order each take the
    smallest unmatched predicted boundary >= b - tolerance when it is <= b + tolerance (optimal
    for equal-width windows on a line). With no true boundary (one segment) the recall is 1.0
    (nothing to find).

    Args:
        pred_starts, true_starts: ascending segment starts in [0, T), the first 0 (as
            :func:`vljepa_fast.models.temporal_ward_segments` returns).
        T: the stream length (windows).
        tolerance: int >= 0, in windows.

    Returns:
        python float in [0, 1].
    """
    T, tolerance = _check_T(T), _check_tolerance(tolerance)
    pred = _starts(pred_starts, "pred_starts", T)[1:]
    true = _starts(true_starts, "true_starts", T)[1:]
    if not true:
        return 1.0
    matched, j = 0, 0
    for b in true:  # both ascending; pred[j:] are the unmatched candidates >= the last match
        while j < len(pred) and pred[j] < b - tolerance:
            j += 1
        if j < len(pred) and pred[j] <= b + tolerance:
            matched += 1
            j += 1
    return matched / len(true)


def uniform_segment_starts(T: int, n_segments: int) -> Tensor:
    """Uniform decoding: [n_segments] int64 starts floor(i * T / n_segments), i < n_segments
    (segment lengths differ by at most one)."""
    T = _check_T(T)
    if isinstance(n_segments, bool) or not isinstance(n_segments, int) or not 1 <= n_segments <= T:
        raise ValueError(f"n_segments: expected an int in [1, T = {T}], got {n_segments!r}")
    return torch.tensor([i * T // n_segments for i in range(n_segments)], dtype=torch.long)


def decoding_efficiency(pred_starts, true_starts, T: int, tolerance: int = 0) -> dict:
    """Decoder calls of a segmentation against uniform decoding at equal boundary recall.

    One decoder call per segment. ``uniform_calls`` is the fewest segments n in [1, T] for
    which :func:`uniform_segment_starts` (T, n) reaches the boundary recall of ``pred_starts``
    (n = T reaches 1.0, so it exists); the search is over every n, not a bisection, as the
    recall of uniform segmentation is not monotone in n.

    Returns:
        {"windows": T, "tolerance", "calls": len(pred_starts), "recall": its boundary recall,
        "uniform_calls", "uniform_recall": the recall uniform decoding reaches with them,
        "calls_ratio": uniform_calls / calls (> 1: fewer calls than uniform),
        "calls_saved": uniform_calls - calls}.
    """
    T, tolerance = _check_T(T), _check_tolerance(tolerance)
    pred = _starts(pred_starts, "pred_starts", T)
    true = _starts(true_starts, "true_starts", T)
    recall = boundary_recall(pred, true, T, tolerance)
    for n in range(1, T + 1):
        uni = uniform_segment_starts(T, n).tolist()
        uni_recall = boundary_recall(uni, true, T, tolerance)
        if uni_recall >= recall:
            break
    return {
        "windows": T,
        "tolerance": tolerance,
        "calls": len(pred),
        "recall": recall,
        "uniform_calls": n,
        "uniform_recall": uni_recall,
        "calls_ratio": n / len(pred),
        "calls_saved": n - len(pred),
    }


def selective_decoding_efficiency(
    embeddings, true_starts, n_segments: int | None = None, tolerance: int = 0
) -> dict:
    """Constrained-Ward selective decoding of a stream against uniform decoding.

    Args:
        embeddings: [T, D] floating stream, one embedding per window in time order.
        true_starts: the ground-truth segment starts (ascending, the first 0).
        n_segments: the Ward segment count (decoder calls); default ``len(true_starts)``.
        tolerance: boundary tolerance in windows.

    Returns:
        :func:`decoding_efficiency` of the segments of
        :func:`vljepa_fast.models.temporal_ward_segments`, plus "starts" (the Ward starts).
    """
    from vljepa_fast.models.selective_decoding import temporal_ward_segments

    e = _as_tensor(embeddings, "embeddings")
    if e.dim() != 2:
        raise ValueError(f"embeddings: expected a [T, D] stream, got shape {tuple(e.shape)}")
    T = int(e.shape[0])
    true = _starts(true_starts, "true_starts", max(T, 1))
    n = len(true) if n_segments is None else n_segments
    starts = temporal_ward_segments(e, n).tolist()
    out = decoding_efficiency(starts, true, T, tolerance)
    out["starts"] = starts
    return out
