"""Selective decoding: split a stream of embeddings into contiguous segments, decode once each.

Offline: exact agglomerative clustering with Ward linkage under a temporal-chain constraint
(only neighbouring segments merge). Merging adjacent segments A and B raises the total
within-segment sum of squares by

    cost(A, B) = |A| |B| / (|A| + |B|) * ||mean(A) - mean(B)||^2,

and only the two costs next to a merge change, so a min-heap of candidate merges over a doubly
linked list of segments does the whole hierarchy in O(T log T) heap work (O(T D log T) in
all): stale heap entries are skipped on pop (lazy invalidation by a per-segment version).
Ties break toward the leftmost pair, as the brute-force reference does.

Online: a new segment starts when the variance of the window of recent embeddings in the
current segment exceeds a threshold.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

__all__ = [
    "OnlineSegmenter",
    "online_segment_starts",
    "segment_embeddings",
    "temporal_ward_segments",
]


def _check_stream(embeddings: Tensor) -> Tensor:
    if (
        not isinstance(embeddings, Tensor)
        or embeddings.dim() != 2
        or not embeddings.is_floating_point()
    ):
        got = (
            f"{embeddings.dtype} {tuple(embeddings.shape)}"
            if isinstance(embeddings, Tensor)
            else type(embeddings).__name__
        )
        raise ValueError(f"embeddings: expected a floating [T, D] tensor, got {got}")
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings: expected T >= 1 and D >= 1, got {tuple(embeddings.shape)}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings: contains NaN or infinity")
    return embeddings.detach().to("cpu", torch.float64)


def temporal_ward_segments(embeddings: Tensor, n_segments: int) -> Tensor:
    """Contiguous segments by constrained Ward agglomeration.

    Args:
        embeddings: [T, D] floating stream (one embedding per window, in time order); the
            math runs in float64 on the CPU.
        n_segments: 1 <= n_segments <= T.

    Returns:
        [n_segments] int64 segment start indices, ascending, the first 0.

    Raises:
        ValueError: a malformed stream (NaN, wrong rank, empty) or n_segments out of range.
    """
    x = _check_stream(embeddings)
    T = x.shape[0]
    if isinstance(n_segments, bool) or not isinstance(n_segments, int) or not 1 <= n_segments <= T:
        raise ValueError(f"n_segments: expected an int in [1, T = {T}], got {n_segments!r}")
    mean = [x[i] for i in range(T)]  # segment i is keyed by its start index
    size = [1] * T
    prev = list(range(-1, T - 1))
    nxt = list(range(1, T + 1))  # T = end of the list
    version = [0] * T
    alive = [True] * T

    def cost(a: int, b: int) -> float:
        d = mean[a] - mean[b]
        return size[a] * size[b] / (size[a] + size[b]) * float(d @ d)

    # (cost, left start, left version, right start, right version)
    heap = [(cost(i, i + 1), i, 0, i + 1, 0) for i in range(T - 1)]
    heapq.heapify(heap)
    segments = T
    while segments > n_segments:
        _, a, va, b, vb = heapq.heappop(heap)
        if not (alive[a] and alive[b] and version[a] == va and version[b] == vb):
            continue  # stale: one side has merged since this entry was pushed
        n = size[a] + size[b]
        mean[a] = (size[a] * mean[a] + size[b] * mean[b]) / n
        size[a], alive[b] = n, False
        version[a] += 1
        nxt[a] = nxt[b]
        if nxt[a] < T:
            prev[nxt[a]] = a
            heapq.heappush(heap, (cost(a, nxt[a]), a, version[a], nxt[a], version[nxt[a]]))
        if prev[a] >= 0:
            p = prev[a]
            heapq.heappush(heap, (cost(p, a), p, version[p], a, version[a]))
        segments -= 1
    return torch.tensor([i for i in range(T) if alive[i]], dtype=torch.long)


def segment_embeddings(embeddings: Tensor, starts: Tensor, mode: str = "mean") -> Tensor:
    """One embedding per segment, to decode.

    Args:
        embeddings: [T, D] stream.
        starts: [S] ascending segment starts, the first 0 (from :func:`temporal_ward_segments`).
        mode: "mean" (the segment's mean embedding) or "midpoint" (its middle embedding).

    Returns:
        [S, D] in the stream's dtype.
    """
    if mode not in ("mean", "midpoint"):
        raise ValueError(f"mode: expected 'mean' or 'midpoint', got {mode!r}")
    T = embeddings.shape[0]
    bounds = starts.tolist() + [T]
    if bounds[0] != 0 or any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ValueError(
            f"starts: expected ascending starts in [0, {T}) beginning at 0, got {starts.tolist()}"
        )
    rows = []
    for b, e in zip(bounds, bounds[1:]):
        rows.append(embeddings[b:e].mean(0) if mode == "mean" else embeddings[(b + e - 1) // 2])
    return torch.stack(rows)


class OnlineSegmenter:
    """Streaming variant: push embeddings one at a time; a push returns True when a new segment
    starts there (the first push always does), i.e. when the caller should decode.

    The variance of the current segment's last ``window`` embeddings (mean squared distance to
    their mean) is tracked; when adding the new embedding would lift it above ``threshold``,
    the new embedding opens a new segment.

    Args:
        window: embeddings per variance window (>= 2).
        threshold: variance level that triggers a new segment (> 0).
    """

    def __init__(self, window: int, threshold: float) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window: expected an int >= 2, got {window!r}")
        if not threshold > 0:
            raise ValueError(f"threshold: expected > 0, got {threshold!r}")
        self.window, self.threshold = window, float(threshold)
        self._recent: list[Tensor] = []

    def push(self, embedding: Tensor) -> bool:
        e = embedding.detach().to("cpu", torch.float64).reshape(-1)
        recent = (self._recent + [e])[-self.window :]
        if len(recent) > 1:
            stack = torch.stack(recent)
            var = float(((stack - stack.mean(0)) ** 2).sum(1).mean())
        else:
            var = 0.0
        new = not self._recent or var > self.threshold
        self._recent = [e] if new else recent
        return new


def online_segment_starts(embeddings: Tensor, window: int, threshold: float) -> Tensor:
    """Segment starts [S] int64 chosen by :class:`OnlineSegmenter` over a [T, D] stream."""
    x = _check_stream(embeddings)
    seg = OnlineSegmenter(window, threshold)
    return torch.tensor([t for t in range(x.shape[0]) if seg.push(x[t])], dtype=torch.long)
