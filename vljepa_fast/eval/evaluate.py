"""Model-level evaluation: a :class:`~vljepa_fast.models.VLJEPA` on a dataset -> the metrics.

Only ``model.predict``, ``model.encode_text`` and ``model.encode_video`` are used; every score
is the cosine similarity of L2-normalised embeddings, formed in float64 from the model's
embeddings (so the metrics do not depend on a kernel's accumulation order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast.eval import metrics

__all__ = ["DEFAULT_QUERY", "EvalData", "Question", "Stream", "evaluate_model"]

#: the predictor query used to embed a video for retrieval, classification and streams
DEFAULT_QUERY = "what is happening?"


@dataclass(frozen=True)
class Question:
    """A multiple-choice question about video ``video`` (an index into the dataset's videos);
    ``answer`` indexes ``candidates``."""

    video: int
    question: str
    candidates: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Stream:
    """A stream of windows (video indices in time order) with ground-truth segment starts
    (ascending window positions, the first 0)."""

    windows: tuple[int, ...]
    starts: tuple[int, ...]


@dataclass
class EvalData:
    """A dataset: N videos (or their cached X-encoder features) and annotations by index.

    Attributes:
        videos: N floating videos [C, T, H, W] (a list, shapes may differ) or a stacked
            [N, C, T, H, W] tensor; None when ``features`` is given.
        features: N cached X-encoder outputs [tokens, x_dim] (list) or [N, tokens, x_dim];
            None when ``videos`` is given.
        names: N video names (reports only); default "0".."N-1".
        captions: caption texts; ``caption_video[i]`` is the video of caption i (several
            captions per video allowed). Retrieval runs over the captioned videos.
        classes: class names (label texts); ``label_video[i]`` has class ``labels[i]``.
        questions: multiple-choice questions.
        streams: streams for the selective-decoding efficiency.
    """

    videos: Tensor | Sequence[Tensor] | None = None
    features: Tensor | Sequence[Tensor] | None = None
    names: Sequence[str] | None = None
    captions: Sequence[str] = ()
    caption_video: Sequence[int] = ()
    classes: Sequence[str] = ()
    label_video: Sequence[int] = ()
    labels: Sequence[int] = ()
    questions: Sequence[Question] = ()
    streams: Sequence[Stream] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if (self.videos is None) == (self.features is None):
            raise ValueError("EvalData: give exactly one of videos and features")
        src, name = (
            (self.videos, "videos") if self.videos is not None else (self.features, "features")
        )
        items = list(src.unbind(0)) if isinstance(src, Tensor) else list(src)
        want = 4 if name == "videos" else 2
        for i, x in enumerate(items):
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != want:
                got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
                shape = "[C, T, H, W]" if name == "videos" else "[tokens, x_dim]"
                raise ValueError(f"{name}[{i}]: expected a floating {shape} tensor, got {got}")
        if not items:
            raise ValueError(f"{name}: expected at least one item")
        self._items, self._kind = items, name
        n = len(items)
        if self.names is None:
            self.names = [str(i) for i in range(n)]
        if len(self.names) != n:
            raise ValueError(f"names: expected {n} names, got {len(self.names)}")
        if len(self.captions) != len(self.caption_video):
            raise ValueError(
                f"caption_video: expected one video per caption ({len(self.captions)}), got "
                f"{len(self.caption_video)}"
            )
        if len(self.labels) != len(self.label_video):
            raise ValueError(
                f"labels: expected one label per labelled video ({len(self.label_video)}), got "
                f"{len(self.labels)}"
            )
        if self.labels and not self.classes:
            raise ValueError("classes: labels are given but no class names")
        for arg, idx in (("caption_video", self.caption_video), ("label_video", self.label_video)):
            for j, v in enumerate(idx):
                if not 0 <= int(v) < n:
                    raise ValueError(f"{arg}[{j}]: video index {v} not in [0, {n})")
        for j, y in enumerate(self.labels):
            if not 0 <= int(y) < len(self.classes):
                raise ValueError(f"labels[{j}]: class index {y} not in [0, {len(self.classes)})")
        for j, q in enumerate(self.questions):
            if not 0 <= q.video < n:
                raise ValueError(f"questions[{j}].video: index {q.video} not in [0, {n})")
            if not q.candidates or not 0 <= q.answer < len(q.candidates):
                raise ValueError(
                    f"questions[{j}].answer: {q.answer} is not an index of its "
                    f"{len(q.candidates)} candidates"
                )
        for j, s in enumerate(self.streams):
            if any(not 0 <= w < n for w in s.windows):
                raise ValueError(f"streams[{j}].windows: video indices must lie in [0, {n})")

    def __len__(self) -> int:
        return len(self._items)


def _batches(items: list[Tensor], order: list[int], batch_size: int):
    """Consecutive runs of ``order`` with equal shapes, at most batch_size long."""
    run: list[int] = []
    for i in order:
        if run and (len(run) == batch_size or items[i].shape != items[run[0]].shape):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


def _param(model) -> Tensor:
    return next(model.parameters())


def _embed(model, data: EvalData, order: list[int], query, batch_size: int) -> Tensor:
    """[len(order), D] float64 unit predicted embeddings of videos ``order`` with ``query`` (one
    string for all, or one per entry of order)."""
    p = _param(model)
    out = []
    pos = 0
    for run in _batches(data._items, order, batch_size):
        x = torch.stack([data._items[i] for i in run]).to(p.device, p.dtype)
        q = query if isinstance(query, str) else list(query[pos : pos + len(run)])
        pos += len(run)
        try:
            if data._kind == "videos":
                pred = model.predict(x, q)
            else:
                pred = model.predict(None, q, x_features=x)
        except ValueError as e:  # name the inputs: the model's message names only its argument
            shown = ", ".join(repr(data.names[i]) for i in run[:5])
            raise ValueError(f"{data._kind} {shown}: {e}") from None
        out.append(pred.detach().to("cpu", torch.float64))
    return F.normalize(torch.cat(out), dim=-1)


def _encode_texts(model, texts: Sequence[str], batch_size: int) -> Tensor:
    out = [
        model.encode_text(list(texts[i : i + batch_size])).detach().to("cpu", torch.float64)
        for i in range(0, len(texts), batch_size)
    ]
    return F.normalize(torch.cat(out), dim=-1)


def _usable(ks: Sequence[int], n: int) -> tuple[tuple[int, ...], list[int]]:
    keep = tuple(k for k in ks if k <= n)
    return keep, [k for k in ks if k > n]


@torch.no_grad()
def evaluate_model(
    model,
    data: EvalData,
    *,
    query: str = DEFAULT_QUERY,
    retrieval_ks: Sequence[int] = (1, 5, 10),
    class_ks: Sequence[int] = (1, 5),
    ties: str = "pessimistic",
    tolerance: int = 1,
    batch_size: int = 16,
    return_scores: bool = False,
) -> dict:
    """Evaluate a VL-JEPA model on ``data``.

    A video's embedding is ``model.predict(video, query)`` (or from cached features); captions,
    class names and candidate answers are embedded by ``model.encode_text``; a VQA question's
    embedding is ``model.predict(video, question)``. Scores are cosines in float64.

    Tasks (each only when its annotations are present):
        "text_to_video" / "video_to_text": :func:`metrics.retrieval_metrics` over the captioned
            videos (the gallery; other videos are not distractors); ks larger than the gallery
            are dropped and listed under "skipped_ks".
        "classification": :func:`metrics.classification_accuracy` over the labelled videos
            (class_ks larger than the class count dropped likewise).
        "vqa": :func:`metrics.vqa_accuracy` (ties follow ``ties``; ``model.answer`` takes the
            lowest index on a tie, so the two can differ on exact ties).
        "selective_decoding": :func:`metrics.selective_decoding_efficiency` per stream (Ward
            on the unit predicted embeddings of its windows, with as many segments as true
            ones) and the totals over streams (calls_ratio = total uniform / total Ward calls).

    Args:
        model: a :class:`~vljepa_fast.models.VLJEPA` (put in eval mode here).
        data: the dataset.
        query: the predictor query that embeds a video.
        retrieval_ks, class_ks: the R@k and top-k to report.
        ties: the tie rule of :mod:`vljepa_fast.eval.metrics`.
        tolerance: boundary tolerance in windows (selective decoding).
        batch_size: videos / texts per model call.
        return_scores: also return the score matrices under "scores" (float64 tensors).

    Returns:
        {task: metrics dict, ..., "data": counts}.

    Raises:
        ValueError: ``data`` has no task (no captions, labels, questions nor streams), or bad
            arguments.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not isinstance(query, str) or not query:
        raise ValueError(f"query: expected a non-empty string, got {query!r}")
    metrics._check_ties(ties)
    if not (data.captions or data.labels or data.questions or data.streams):
        raise ValueError(
            "data: nothing to evaluate: expected captions (retrieval), labels "
            "(classification), questions (VQA) or streams (selective decoding)"
        )
    model.eval()
    result: dict = {}
    scores: dict = {}
    need = sorted(
        set(int(v) for v in data.caption_video)
        | set(int(v) for v in data.label_video)
        | {w for s in data.streams for w in s.windows}
    )
    emb = dict(zip(need, _embed(model, data, need, query, batch_size))) if need else {}

    if data.captions:
        gallery = sorted(set(int(v) for v in data.caption_video))
        col = {v: j for j, v in enumerate(gallery)}
        t = _encode_texts(model, data.captions, batch_size)
        v = torch.stack([emb[i] for i in gallery])
        sim = t @ v.t()
        t2v = torch.tensor([col[int(i)] for i in data.caption_video])
        ks_v, skip_v = _usable(retrieval_ks, len(gallery))
        ks_t, skip_t = _usable(retrieval_ks, len(data.captions))
        result["text_to_video"] = metrics.text_to_video_metrics(sim, t2v, ks_v, ties=ties)
        result["text_to_video"]["skipped_ks"] = skip_v
        result["video_to_text"] = metrics.video_to_text_metrics(sim, t2v, ks_t, ties=ties)
        result["video_to_text"]["skipped_ks"] = skip_t
        scores["retrieval"] = {"similarity": sim, "text_to_video": t2v, "videos": gallery}

    if data.labels:
        lab = _encode_texts(model, data.classes, batch_size)
        x = torch.stack([emb[int(i)] for i in data.label_video])
        s = x @ lab.t()
        ks_c, skip_c = _usable(class_ks, len(data.classes))
        y = torch.tensor([int(c) for c in data.labels])
        result["classification"] = metrics.classification_accuracy(s, y, ks_c, ties=ties)
        result["classification"]["skipped_ks"] = skip_c
        scores["classification"] = {"scores": s, "labels": y}

    if data.questions:
        qs = list(data.questions)
        pred = _embed(model, data, [q.video for q in qs], [q.question for q in qs], batch_size)
        rows = []
        for q, p in zip(qs, pred):
            rows.append(_encode_texts(model, list(q.candidates), batch_size) @ p)
        answers = torch.tensor([q.answer for q in qs])
        result["vqa"] = metrics.vqa_accuracy(rows, answers, ties=ties)
        scores["vqa"] = {"scores": rows, "answers": answers}

    if data.streams:
        per = []
        for s in data.streams:
            e = torch.stack([emb[w] for w in s.windows])
            r = metrics.selective_decoding_efficiency(e, list(s.starts), tolerance=tolerance)
            per.append(r)
        calls = sum(r["calls"] for r in per)
        uni = sum(r["uniform_calls"] for r in per)
        result["selective_decoding"] = {
            "streams": per,
            "tolerance": tolerance,
            "calls": calls,
            "uniform_calls": uni,
            "calls_ratio": uni / calls,
            "calls_saved": uni - calls,
            "mean_recall": sum(r["recall"] for r in per) / len(per),
        }

    result["data"] = {
        "items": len(data),
        "input": data._kind,
        "captions": len(data.captions),
        "captioned_videos": len(set(int(v) for v in data.caption_video)),
        "labelled_videos": len(data.label_video),
        "classes": len(data.classes),
        "questions": len(data.questions),
        "streams": len(data.streams),
        "query": query,
        "ties": ties,
    }
    if return_scores:
        result["scores"] = scores
    return result
