"""vljepa_fast.eval: metrics against float64 numpy oracles written here (ties on purpose,
several captions per video), the model-level evaluator and the CLI on generated tiny videos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vljepa_fast.models as M
from vljepa_fast import eval as E
from vljepa_fast.eval import cli


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's matmuls are microseconds: one intra-op thread avoids oversubscribing the
    shared CPU cores (10x faster here); restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- numpy oracles


def np_rank(row: np.ndarray, pos: np.ndarray, ties: str) -> int:
    """1-based rank of the first ground truth after sorting the row descending, negatives
    before tied positives (pessimistic) or after them (optimistic): a sort, not a count."""
    row = row.astype(np.float64)
    tie_key = pos.astype(np.int64) if ties == "pessimistic" else 1 - pos.astype(np.int64)
    order = np.lexsort((tie_key, -row))  # last key primary: score descending
    return int(np.nonzero(pos[order])[0][0]) + 1


def np_ranks(S: np.ndarray, P: np.ndarray, ties: str) -> np.ndarray:
    return np.array([np_rank(S[i], P[i], ties) for i in range(S.shape[0])], dtype=np.int64)


def np_summary(ranks: np.ndarray, ks) -> dict:
    out = {f"R@{k}": float(np.sum(ranks <= k)) / len(ranks) for k in ks}
    srt = np.sort(ranks).astype(np.float64)
    n = len(srt)
    out["median_rank"] = float(srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2)
    out["mean_rank"] = float(srt.sum() / n)
    out["queries"] = n
    return out


def np_positives(n_texts: int, n_videos: int, t2v: np.ndarray) -> np.ndarray:
    P = np.zeros((n_texts, n_videos), dtype=bool)
    for i, v in enumerate(t2v):
        P[i, v] = True
    return P


def np_retrieval(S: np.ndarray, t2v: np.ndarray, ks, ties: str) -> dict:
    P = np_positives(*S.shape, t2v)
    return {
        "text_to_video": np_summary(np_ranks(S, P, ties), ks),
        "video_to_text": np_summary(np_ranks(S.T, P.T, ties), ks),
    }


def clip4clip_compute_metrics(x: np.ndarray) -> dict:
    """The MSR-VTT / CLIP4Clip definition on a square matrix without ties: the position of the
    diagonal entry in its row sorted descending."""
    sx = np.sort(-x, axis=1)
    d = -np.diag(x)[:, None]
    ind = np.where(sx - d == 0)[1]
    assert len(ind) == x.shape[0]  # no ties
    return {
        "R@1": float(np.mean(ind == 0)),
        "R@5": float(np.mean(ind < 5)),
        "R@10": float(np.mean(ind < 10)),
        "median_rank": float(np.median(ind) + 1),
        "mean_rank": float(np.mean(ind) + 1),
    }


def clip_benchmark_recall(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's CLIP-paper recall: at least one positive among torch.topk's k."""
    top = torch.topk(scores, k, dim=1).indices
    hit = torch.gather(positives, 1, top).any(dim=1)
    return float(hit.double().mean())


def tied(rng: np.random.Generator, shape, levels: int = 4) -> np.ndarray:
    """Scores on a few levels: many ties on purpose (and whole tied rows)."""
    S = rng.integers(0, levels, size=shape).astype(np.float64) / levels
    S[0, :] = 0.5  # one fully tied row
    return S


def assert_same(got: dict, want: dict) -> None:
    assert set(want) <= set(got), (sorted(got), sorted(want))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (k, got[k], v)


# ----------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_multi_caption_with_ties_matches_numpy(seed, ties):
    rng = np.random.default_rng(seed)
    n_videos = int(rng.integers(10, 25))
    per = rng.integers(1, 4, size=n_videos)  # 1..3 captions per video
    t2v = np.repeat(np.arange(n_videos), per)
    rng.shuffle(t2v)
    S = tied(rng, (len(t2v), n_videos))
    ks = (1, 5, 10)
    want = np_retrieval(S, t2v, ks, ties)
    for sim in (S, torch.from_numpy(S).float(), torch.from_numpy(S).half()):  # exact levels
        got = E.retrieval_metrics(sim, t2v, ks, ties=ties)
        assert_same(got["text_to_video"], want["text_to_video"])
        assert_same(got["video_to_text"], want["video_to_text"])
    got = E.retrieval_metrics(S, torch.from_numpy(t2v), ks, ties=ties)
    assert_same(got["text_to_video"], want["text_to_video"])


def test_tie_rule_exact():
    # row 0: gt 1.0 tied with one negative; row 1: gt tied with two; row 2: gt strictly best
    S = np.array([[1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.1, 0.0, 0.9]])
    pess = E.text_to_video_metrics(S, ks=(1, 2, 3))
    opt = E.text_to_video_metrics(S, ks=(1, 2, 3), ties="optimistic")
    # ranks: pessimistic [2, 3, 1]; optimistic [1, 1, 1]
    assert pess["R@1"] == pytest.approx(1 / 3) and pess["mean_rank"] == pytest.approx(2.0)
    assert pess["median_rank"] == 2.0
    assert opt["R@1"] == 1.0 and opt["mean_rank"] == 1.0
    # a constant model ranks every ground truth last under the default rule
    const = E.text_to_video_metrics(np.zeros((6, 6)), ks=(1, 5))
    assert const["R@1"] == 0.0 and const["median_rank"] == 6.0


def test_video_to_text_other_captions_are_not_negatives():
    # video 0 has captions 0 and 1; video 1 has caption 2. Column 0: caption 1 best -> rank 1
    S = np.array([[0.9, 0.0], [0.95, 0.1], [0.92, 0.8]])
    got = E.video_to_text_metrics(S, [0, 0, 1], ks=(1,))
    # video 0: best positive 0.95, no negative above -> 1; video 1: 0.8 vs caption 1? captions 0
    # and 1 are negatives: 0.0, 0.1 < 0.8 -> 1
    assert got["R@1"] == 1.0 and got["mean_rank"] == 1.0
    S[2, 0] = 0.97  # the caption of video 1 now outscores both captions of video 0
    assert E.video_to_text_metrics(S, [0, 0, 1], ks=(1,))["R@1"] == 0.5


@pytest.mark.parametrize("seed", [3, 4])
def test_no_ties_equals_clip4clip_and_clip_benchmark(seed):
    rng = np.random.default_rng(seed)
    n = 37
    S = rng.standard_normal((n, n))
    want = clip4clip_compute_metrics(S)
    for ties in ("pessimistic", "optimistic"):
        assert_same(E.text_to_video_metrics(S, ties=ties), want)
        assert_same(E.video_to_text_metrics(S, ties=ties), clip4clip_compute_metrics(S.T))
    # several captions per video, CLIP_benchmark's recall in both directions
    t2v = rng.integers(0, 12, size=40)
    t2v[:12] = np.arange(12)
    S = torch.from_numpy(rng.standard_normal((40, 12)))
    P = torch.from_numpy(np_positives(40, 12, t2v))
    got = E.retrieval_metrics(S, t2v, (1, 5, 10))
    for k in (1, 5, 10):
        assert got["text_to_video"][f"R@{k}"] == pytest.approx(clip_benchmark_recall(S, P, k))
        assert got["video_to_text"][f"R@{k}"] == pytest.approx(clip_benchmark_recall(S.T, P.T, k))


def test_gt_ranks_and_rank_summary_match_numpy():
    rng = np.random.default_rng(5)
    S = tied(rng, (50, 9), levels=3)
    P = rng.random((50, 9)) < 0.3
    P[np.arange(50), rng.integers(0, 9, 50)] = True
    for ties in ("pessimistic", "optimistic"):
        ranks = E.gt_ranks(S, P, ties=ties)
        assert ranks.dtype == torch.int64
        np.testing.assert_array_equal(ranks.numpy(), np_ranks(S, P, ties))
        assert_same(E.rank_summary(ranks, (1, 3)), np_summary(np_ranks(S, P, ties), (1, 3)))
    # integer scores are ranked too
    Si = rng.integers(0, 3, size=(20, 6))
    Pi = np.eye(20, 6, dtype=bool)
    Pi[6:, 0] = True
    np.testing.assert_array_equal(E.gt_ranks(Si, Pi).numpy(), np_ranks(Si, Pi, "pessimistic"))


def test_chunked_ranks_match(monkeypatch):
    from vljepa_fast.eval import metrics

    rng = np.random.default_rng(6)
    S = tied(rng, (23, 7))
    P = np_positives(23, 7, rng.integers(0, 7, 23))
    monkeypatch.setattr(metrics, "_CHUNK", 4)
    np.testing.assert_array_equal(E.gt_ranks(S, P).numpy(), np_ranks(S, P, "pessimistic"))


# ----------------------------------------------------------------------------- classification, VQA


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_classification_topk_matches_numpy(ties):
    rng = np.random.default_rng(7)
    N, C = 60, 11
    S = tied(rng, (N, C), levels=5)
    y = rng.integers(0, C, N)
    ranks = np_ranks(S, np_positives(N, C, y), ties)
    got = E.classification_accuracy(torch.from_numpy(S), torch.from_numpy(y), (1, 5), ties=ties)
    assert got["top1"] == pytest.approx(float(np.mean(ranks <= 1)), abs=1e-15)
    assert got["top5"] == pytest.approx(float(np.mean(ranks <= 5)), abs=1e-15)
    assert got["samples"] == N
    # no ties: top-1 is argmax accuracy
    S2 = rng.standard_normal((N, C))
    assert E.classification_accuracy(S2, y, (1,))["top1"] == pytest.approx(
        float(np.mean(S2.argmax(1) == y))
    )


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_vqa_accuracy_matches_numpy(ties):
    rng = np.random.default_rng(8)
    rows = [np.round(rng.random(int(rng.integers(2, 6))) * 3) / 3 for _ in range(40)]
    ans = [int(rng.integers(0, len(r))) for r in rows]

    def right(r, a):
        others = np.delete(r, a)
        return (
            bool(np.all(others < r[a])) if ties == "pessimistic" else bool(np.all(others <= r[a]))
        )

    want = float(np.mean([right(r, a) for r, a in zip(rows, ans)]))
    got = E.vqa_accuracy([torch.from_numpy(r) for r in rows], ans, ties=ties)
    assert got == {"accuracy": pytest.approx(want, abs=1e-15), "questions": 40}
    S = tied(rng, (30, 4))
    a = rng.integers(0, 4, 30)
    want = float(np.mean([right(S[i], a[i]) for i in range(30)]))
    assert E.vqa_accuracy(S, a, ties=ties)["accuracy"] == pytest.approx(want, abs=1e-15)


# ----------------------------------------------------------------------------- selective decoding


def np_boundary_recall(pred, true, tol):
    """Maximum one-to-one matching (Kuhn's augmenting paths) of true and predicted boundaries
    within the tolerance, over the number of true boundaries."""
    tb, pb = [b for b in true if b != 0], [b for b in pred if b != 0]
    if not tb:
        return 1.0
    owner = {}  # predicted index -> true index

    def augment(i, seen):
        for j, p in enumerate(pb):
            if abs(p - tb[i]) <= tol and j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(tb))) / len(tb)


def np_uniform(T, n):
    return sorted({int(np.floor(i * T / n)) for i in range(n)})


def np_efficiency(pred, true, T, tol):
    r = np_boundary_recall(pred, true, tol)
    n = next(n for n in range(1, T + 1) if np_boundary_recall(np_uniform(T, n), true, tol) >= r)
    return r, n


def random_starts(rng, T, n):
    return [0] + sorted(rng.choice(np.arange(1, T), size=n - 1, replace=False).tolist())


@pytest.mark.parametrize("tol", [0, 1, 3])
def test_boundary_recall_and_efficiency_match_numpy(tol):
    rng = np.random.default_rng(10 + tol)
    for _ in range(60):
        T = int(rng.integers(2, 60))
        true = random_starts(rng, T, int(rng.integers(1, min(T, 15) + 1)))
        pred = random_starts(rng, T, int(rng.integers(1, min(T, 15) + 1)))
        assert E.boundary_recall(pred, true, T, tol) == pytest.approx(
            np_boundary_recall(pred, true, tol), abs=1e-15
        )
        r, n = np_efficiency(pred, true, T, tol)
        got = E.decoding_efficiency(torch.tensor(pred), true, T, tol)
        assert got["recall"] == pytest.approx(r, abs=1e-15)
        assert got["uniform_calls"] == n and got["calls"] == len(pred)
        assert got["calls_ratio"] == pytest.approx(n / len(pred))
        assert got["calls_saved"] == n - len(pred)
        assert got["uniform_recall"] >= got["recall"]
        for m in range(1, T + 1):
            assert E.uniform_segment_starts(T, m).tolist() == np_uniform(T, m)


def test_boundary_recall_is_one_to_one():
    # one cut at 5 lies within 1 window of both true boundaries 4 and 6: it finds one of them
    assert E.boundary_recall([0, 5], [0, 4, 6], 11, tolerance=1) == 0.5
    assert E.boundary_recall([0, 4, 5], [0, 4, 6], 11, tolerance=1) == 1.0
    # greedy must not steal the only partner of a later boundary: 3 -> 2, 4 -> 5
    assert E.boundary_recall([0, 3, 4], [0, 2, 5], 8, tolerance=1) == 1.0
    assert E.boundary_recall([0, 3], [0], 5, tolerance=0) == 1.0  # nothing to find
    assert E.boundary_recall([0], [0, 2], 5, tolerance=4) == 0.0


def test_selective_decoding_efficiency_planted_stream():
    # long and short shots with distinct means: Ward finds every boundary; uniform decoding
    # needs many more calls to find the short shots' boundaries within the tolerance
    rng = np.random.default_rng(20)
    lengths = [25, 3, 30, 2, 20, 4]
    means = rng.standard_normal((len(lengths), 8)) * 4
    x = np.concatenate([m + 0.05 * rng.standard_normal((n, 8)) for m, n in zip(means, lengths)])
    true = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    T = len(x)
    got = E.selective_decoding_efficiency(torch.from_numpy(x), true, tolerance=1)
    ward = M.temporal_ward_segments(torch.from_numpy(x), len(lengths)).tolist()
    assert got["starts"] == ward == true
    r, n = np_efficiency(ward, true, T, 1)
    assert got["recall"] == r == 1.0 and got["uniform_calls"] == n
    assert got["calls_ratio"] == pytest.approx(n / 6) and got["calls_ratio"] > 2
    # fewer Ward segments than true ones
    got3 = E.selective_decoding_efficiency(x, true, n_segments=3, tolerance=0)
    w3 = M.temporal_ward_segments(torch.from_numpy(x), 3).tolist()
    assert got3["starts"] == w3 and got3["calls"] == 3
    assert (got3["recall"], got3["uniform_calls"]) == np_efficiency(w3, true, T, 0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    good = np.random.default_rng(0).random((4, 4))
    nan = good.copy()
    nan[1, 2] = np.nan
    cases = [
        (lambda: E.text_to_video_metrics(nan), "similarity: contains NaN"),
        (lambda: E.text_to_video_metrics(good[0]), "similarity: expected a"),
        (lambda: E.text_to_video_metrics(good, ks=(1, 5)), "ks: k = 5 is larger"),
        (lambda: E.video_to_text_metrics(good[:, :3], [0, 1, 2, 0], ks=(5,)), "ks: k = 5"),
        (lambda: E.text_to_video_metrics(good[:, :3]), "text_to_video: required"),
        (lambda: E.text_to_video_metrics(good, [0, 1, 2]), "text_to_video: expected shape"),
        (lambda: E.text_to_video_metrics(good, [0, 1, 2, 4]), "text_to_video: indices"),
        (lambda: E.text_to_video_metrics(good, [0.0, 1, 2, 3]), "text_to_video: expected int"),
        (lambda: E.video_to_text_metrics(good, [0, 1, 2, 2], (1,)), "text_to_video: videos [3]"),
        (lambda: E.text_to_video_metrics(good, ties="mean"), "ties: expected"),
        (lambda: E.text_to_video_metrics(good, ks=(0,)), "ks: expected ints >= 1"),
        (lambda: E.classification_accuracy(good, [0, 1, 2]), "labels: expected shape"),
        (lambda: E.classification_accuracy(nan, [0, 1, 2, 3]), "scores: contains NaN"),
        (lambda: E.classification_accuracy(good, [0, 1, 2, 3], (1, 5)), "ks: k = 5"),
        (lambda: E.vqa_accuracy([np.ones(3), np.ones(2)], [0, 2]), "answers[1]: 2"),
        (lambda: E.vqa_accuracy([np.ones(3), np.array([np.nan])], [0, 0]), "scores[1]: cont"),
        (lambda: E.gt_ranks(good, np.zeros((4, 4), bool)), "positives: queries without"),
        (lambda: E.gt_ranks(good, np.eye(4)), "positives: expected bool"),
        (lambda: E.boundary_recall([0, 3], [1, 3], 5), "true_starts: expected strictly"),
        (lambda: E.boundary_recall([0, 3, 3], [0], 5), "pred_starts: expected strictly"),
        (lambda: E.boundary_recall([0, 5], [0], 5), "pred_starts: expected strictly"),
        (lambda: E.boundary_recall([0], [0], 5, -1), "tolerance: expected"),
        (lambda: E.uniform_segment_starts(5, 6), "n_segments: expected"),
        (lambda: E.selective_decoding_efficiency(torch.zeros(5), [0]), "embeddings: expected"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            fn()


# ----------------------------------------------------------------------------- model + CLI

QUERY = "what is happening?"
TIE_CAPS = None


def tiny_model(seed: int = 0) -> M.VLJEPA:
    torch.manual_seed(seed)
    return M.VLJEPA(M.VLJEPAConfig.tiny()).eval()


def make_dataset(root: Path, rng: np.random.Generator) -> dict:
    """A folder of tiny videos in every format and an annotations file; returns the truth."""
    vids = root / "videos"
    vids.mkdir()
    names = [f"clip{i}" for i in range(7)]
    tensors = {}
    for i, n in enumerate(names):
        frames = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0
        if i % 3 == 0:
            np.save(vids / f"{n}.npy", frames)  # [T, H, W, C] uint8
        elif i % 3 == 1:
            torch.save(video.clone(), vids / f"{n}.pt")  # [C, T, H, W] float
        else:
            from PIL import Image

            (vids / n).mkdir()
            for t in range(4):
                Image.fromarray(frames[t]).save(vids / n / f"{t:03d}.png")
        tensors[n] = video
    (vids / "README.txt").write_text("not a video")
    classes = ["cat", "dog", "bird"]
    records, truth = [], {"captions": [], "cap_video": [], "labels": {}, "questions": []}
    for i, n in enumerate(names):
        caps = [f"caption {i} take {j}" for j in range(1 + i % 3)]
        rec = {"video": n, "captions": caps} if len(caps) > 1 else {"video": n, "caption": caps[0]}
        truth["captions"] += caps
        truth["cap_video"] += [i] * len(caps)
        if i < 6:
            rec["label"] = classes[i % 3]
            truth["labels"][i] = i % 3
        if i % 2 == 0:
            cands = ["yes", "no", f"maybe {i}"]
            rec["question"], rec["candidates"], rec["answer"] = f"is it {i}?", cands, i % 3
            truth["questions"].append((i, f"is it {i}?", cands, i % 3))
        records.append(rec)
    stream = {"windows": [names[j] for j in [0, 0, 0, 0, 3, 3, 5, 5, 5, 5, 5]], "starts": [0, 4, 6]}
    ann = {"records": records, "classes": classes, "streams": [stream], "query": QUERY}
    (root / "ann.json").write_text(json.dumps(ann))
    (root / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    truth.update(names=names, tensors=tensors, classes=classes, stream=stream)
    return truth


def oracle_metrics(model: M.VLJEPA, truth: dict, tol: int = 1) -> dict:
    """Metrics from embeddings made one video at a time, scored in float64 numpy."""
    names = truth["names"]
    with torch.no_grad():
        pred = {
            i: model.predict(truth["tensors"][n][None], QUERY)[0].double().numpy()
            for i, n in enumerate(names)
        }
        text = lambda ts: [model.encode_text([t])[0].double().numpy() for t in ts]  # noqa: E731
        unit = lambda a: a / np.linalg.norm(a)  # noqa: E731
        V = np.stack([unit(pred[i]) for i in range(len(names))])
        T = np.stack([unit(t) for t in text(truth["captions"])])
        ret = np_retrieval(T @ V.T, np.array(truth["cap_video"]), (1, 5), "pessimistic")
        L = np.stack([unit(t) for t in text(truth["classes"])])
        lv = sorted(truth["labels"])
        y = np.array([truth["labels"][i] for i in lv])
        cr = np_ranks(V[lv] @ L.T, np_positives(len(lv), 3, y), "pessimistic")
        right = []
        for i, q, cands, a in truth["questions"]:
            p = unit(model.predict(truth["tensors"][names[i]][None], q)[0].double().numpy())
            s = np.stack([unit(c) for c in text(cands)]) @ p
            right.append(bool(np.all(np.delete(s, a) < s[a])))
    st = truth["stream"]
    emb = torch.from_numpy(np.stack([pred[names.index(w)] for w in st["windows"]]))
    ward = M.temporal_ward_segments(F.normalize(emb, dim=-1), len(st["starts"])).tolist()
    r, n = np_efficiency(ward, st["starts"], len(st["windows"]), tol)
    return {
        "ret": ret,
        "top1": float(np.mean(cr <= 1)),
        "vqa": float(np.mean(right)),
        "sd": (ward, r, n),
    }


def save_weights(model: M.VLJEPA, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": model.state_dict()}, path)


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_cli_on_generated_videos_equals_in_process_metrics(tmp_path, fmt):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(30)
    truth = make_dataset(tmp_path, rng)
    model = tiny_model(1)
    wpath = tmp_path / ("w.safetensors" if fmt == "json" else "w.pt")
    save_weights(model, wpath)
    out_json, out_md = tmp_path / "out" / "r.json", tmp_path / "out" / "r.md"
    argv = [
        "--config", "tiny", "--weights", str(wpath), "--videos", str(tmp_path / "videos"),
        "--annotations", str(tmp_path / f"ann.{fmt}"), "--json", str(out_json),
        "--markdown", str(out_md), "--batch-size", "1", "--ks", "1,5,10",
    ]  # fmt: skip
    report = cli.main(argv)
    on_disk = json.loads(out_json.read_text())
    assert on_disk == json.loads(json.dumps(report))
    m = on_disk["metrics"]
    want = oracle_metrics(model, truth)
    n_caps = len(truth["captions"])
    assert set(m) >= {"text_to_video", "video_to_text", "classification", "vqa"}
    assert_same(m["text_to_video"], want["ret"]["text_to_video"])
    assert_same(m["video_to_text"], want["ret"]["video_to_text"])
    assert m["text_to_video"]["skipped_ks"] == [10]  # 7 videos
    assert m["video_to_text"]["skipped_ks"] == ([] if n_caps >= 10 else [10])
    assert m["text_to_video"]["queries"] == n_caps and m["video_to_text"]["queries"] == 7
    assert m["classification"]["top1"] == pytest.approx(want["top1"], abs=1e-15)
    assert m["classification"]["skipped_ks"] == [5] and m["classification"]["samples"] == 6
    assert m["vqa"] == {"accuracy": pytest.approx(want["vqa"], abs=1e-15), "questions": 4}
    d = on_disk["data"]
    assert d["skipped_files"] == ["README.txt"] and d["items"] == 7 and d["input"] == "videos"
    if fmt == "json":
        ward, r, n = want["sd"]
        sd = m["selective_decoding"]
        assert sd["streams"][0]["starts"] == ward and sd["streams"][0]["recall"] == r
        assert sd["uniform_calls"] == n and sd["calls"] == 3
        assert sd["calls_ratio"] == pytest.approx(n / 3)
    else:
        assert "selective_decoding" not in m
    md = out_md.read_text()
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|"))
        for line in md.splitlines()
        if line.startswith("| ") and not line.startswith("| task")
    }
    for task, title in cli.TASK_TITLES.items():
        for key, v in m.get(task, {}).items():
            if isinstance(v, (list, dict)):
                continue
            assert (title, key, f"{v:.4f}" if isinstance(v, float) else str(v)) in rows


def test_cli_features_equal_videos(tmp_path):
    pytest.importorskip("PIL")
    truth = make_dataset(tmp_path, np.random.default_rng(31))
    model = tiny_model(2)
    wpath = tmp_path / "w.safetensors"
    save_weights(model, wpath)
    from safetensors.torch import save_file

    with torch.no_grad():
        feats = {
            n: model.encode_video(v[None])[0].contiguous() for n, v in truth["tensors"].items()
        }
    save_file(feats, str(tmp_path / "feats.safetensors"))
    fdir = tmp_path / "feats"
    fdir.mkdir()
    for n, f in feats.items():
        np.save(fdir / f"{n}.npy", f.numpy())
    common = ["--config", "tiny", "--weights", str(wpath), "--annotations",
              str(tmp_path / "ann.json"), "--batch-size", "1"]  # fmt: skip
    ref = cli.main(common + ["--videos", str(tmp_path / "videos"),
                             "--json", str(tmp_path / "a.json"),
                             "--markdown", str(tmp_path / "a.md")])  # fmt: skip
    for src in (tmp_path / "feats.safetensors", fdir):
        got = cli.main(common + ["--features", str(src), "--json", str(tmp_path / "b.json"),
                                 "--markdown", str(tmp_path / "b.md")])  # fmt: skip
        assert got["data"]["input"] == "features"
        assert got["metrics"] == ref["metrics"]


def test_evaluate_model_scores_and_batching():
    rng = np.random.default_rng(32)
    model = tiny_model(3)
    videos = [torch.from_numpy(rng.random((3, 4, 32, 32), dtype=np.float32)) for _ in range(5)]
    videos.append(torch.from_numpy(rng.random((3, 2, 32, 32), dtype=np.float32)))  # other shape
    caps = [f"text {i}" for i in range(6)] + ["extra for 0"]
    data = E.EvalData(videos=videos, captions=caps, caption_video=[0, 1, 2, 3, 4, 5, 0])
    r = E.evaluate_model(model, data, retrieval_ks=(1, 5), return_scores=True, batch_size=4)
    sim = r["scores"]["retrieval"]["similarity"]
    assert sim.dtype == torch.float64 and sim.shape == (7, 6)
    with torch.no_grad():
        v = F.normalize(torch.cat([model.predict(x[None], QUERY) for x in videos]).double(), dim=-1)
        t = F.normalize(model.encode_text(caps).double(), dim=-1)
    torch.testing.assert_close(sim, t @ v.T, atol=1e-5, rtol=0)
    want = np_retrieval(sim.numpy(), np.array([0, 1, 2, 3, 4, 5, 0]), (1, 5), "pessimistic")
    assert_same(r["text_to_video"], want["text_to_video"])
    assert_same(r["video_to_text"], want["video_to_text"])
    with pytest.raises(ValueError, match="caption_video: expected one video per caption"):
        E.EvalData(videos=videos, captions=caps, caption_video=[0])
    with pytest.raises(ValueError, match="videos\\[0\\]: expected a floating"):
        E.EvalData(videos=[torch.zeros(3, 4, 32, 32, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="exactly one of videos and features"):
        E.EvalData()
    with pytest.raises(ValueError, match="batch_size"):
        E.evaluate_model(model, data, batch_size=0)


def _cli_error(argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return str(e.value)


def test_cli_errors_name_file_and_field(tmp_path, monkeypatch):
    truth = make_dataset(tmp_path, np.random.default_rng(33)) if _has_pil() else None
    del truth
    vids = tmp_path / "videos"
    vids.mkdir(exist_ok=True)
    np.save(vids / "a.npy", np.zeros((4, 32, 32, 3), np.uint8))
    base = ["--config", "tiny", "--random-init", "--videos", str(vids),
            "--json", str(tmp_path / "o.json"), "--markdown", str(tmp_path / "o.md")]  # fmt: skip

    def ann(name: str, text: str) -> list[str]:
        (tmp_path / name).write_text(text)
        return base + ["--annotations", str(tmp_path / name)]

    missing = tmp_path / "nope.jsonl"
    assert f"{missing}: no such file" in _cli_error(base + ["--annotations", str(missing)])
    msg = _cli_error(
        ann("b1.jsonl", '{"video": "a", "caption": "x"}\n{"video": "a", "captions": 3}\n')
    )
    assert "b1.jsonl: line 2: field 'captions'" in msg
    msg = _cli_error(ann("b2.jsonl", '{"video": "a", "capton": "x"}\n'))
    assert "b2.jsonl: line 1: unknown field(s) ['capton']" in msg
    msg = _cli_error(ann("b3.json", '{"records": [{"video": "a", "question": "q", '
                                    '"candidates": ["x"], "answer": 3}]}'))  # fmt: skip
    assert "b3.json: records[0]: field 'answer'" in msg
    msg = _cli_error(ann("b4.jsonl", '{"video": "zz", "caption": "x"}\n'))
    assert str(vids) in msg and "'zz'" in msg
    msg = _cli_error(ann("b5.json", '{"records": [{"video": "a", "caption": "x"}], '
                                    '"streams": [{"windows": ["a"], "starts": [1]}]}'))  # fmt: skip
    assert "b5.json: streams[0]: field 'starts'" in msg
    msg = _cli_error(ann("b6.json", "{not json"))
    assert "b6.json: invalid JSON" in msg
    good = ann("g.jsonl", '{"video": "a", "caption": "x"}\n')
    msg = _cli_error([a if a != "tiny" else str(tmp_path / "cfg.json") for a in good])
    assert "cfg.json" in msg and "neither" in msg
    (tmp_path / "cfg.json").write_text('{"base": "tiny", "predictor": {"layrs": 3}}')
    msg = _cli_error([a if a != "tiny" else str(tmp_path / "cfg.json") for a in good])
    assert "cfg.json: field 'predictor': unknown field(s) ['layrs']" in msg
    # weights of another config: the bad keys are named
    torch.manual_seed(0)
    cfg = M.VLJEPAConfig.tiny().replace(embed_dim=16)
    torch.save(M.VLJEPA(cfg).state_dict(), tmp_path / "bad.pt")
    w = [a for a in good if a != "--random-init"] + ["--weights", str(tmp_path / "bad.pt")]
    msg = _cli_error(w)
    assert "bad.pt" in msg and "shape mismatches" in msg
    # a bad video array is named
    np.save(vids / "a.npy", np.zeros((4, 32, 32), np.uint8))
    assert f"{vids / 'a.npy'}: expected [T, H, W, C]" in _cli_error(good)
    # a video the model cannot take (3 frames, tubelet 2) is named
    np.save(vids / "a.npy", np.zeros((3, 32, 32, 3), np.uint8))
    msg = _cli_error(good)
    assert "videos 'a': video: frame count 3" in msg
    # frame folders without Pillow: a clear error
    np.save(vids / "a.npy", np.zeros((4, 32, 32, 3), np.uint8))
    (vids / "f").mkdir()
    (vids / "f" / "0.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)
    msg = _cli_error(ann("g2.jsonl", '{"video": "f", "caption": "x"}\n'))
    assert "needs Pillow" in msg and str(vids / "f") in msg


def _has_pil() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


def test_module_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "vljepa_fast.eval", "--help"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    for word in ("--videos", "--features", "--annotations", "--config", "--weights", "--ties"):
        assert word in out.stdout


def test_cli_tokenizer_folders_serve_a_real_vocabulary(tmp_path):
    """A model whose predictor vocabulary is not the byte tokenizer's needs --query-tokenizer:
    without it the CLI names the missing tokenizer; with a local tokenizer folder it runs and
    equals the in-process model given the same tokenizer."""
    import transformers
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vids = tmp_path / "videos"
    vids.mkdir()
    rng = np.random.default_rng(34)
    for i in range(3):
        np.save(vids / f"v{i}.npy", rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    (tmp_path / "ann.jsonl").write_text(
        "".join(f'{{"video": "v{i}", "caption": "w{i} w{i + 1}"}}\n' for i in range(3))
    )
    (tmp_path / "cfg.json").write_text(
        '{"base": "tiny", "predictor": {"vocab_size": 300, "pad_id": 0}}'
    )
    vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(50)] + ["what", "is", "happening?"]
    tk = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp_path / "tok"
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(tok_dir)
    torch.manual_seed(5)
    cfg = M.VLJEPAConfig.tiny().replace(
        predictor=M.PredictorConfig(**{**M.VLJEPAConfig.tiny().predictor.__dict__,
                                       "vocab_size": 300, "pad_id": 0})
    )  # fmt: skip
    model = M.VLJEPA(cfg, query_tokenizer=str(tok_dir)).eval()
    save_weights(model, tmp_path / "w.safetensors")
    base = ["--config", str(tmp_path / "cfg.json"), "--weights", str(tmp_path / "w.safetensors"),
            "--videos", str(vids), "--annotations", str(tmp_path / "ann.jsonl"),
            "--json", str(tmp_path / "o.json"), "--markdown", str(tmp_path / "o.md"),
            "--ks", "1"]  # fmt: skip
    assert "query_tokenizer" in _cli_error(base)
    assert "--query-tokenizer" in _cli_error(base + ["--query-tokenizer", str(tmp_path / "no")])
    report = cli.main(base + ["--query-tokenizer", str(tok_dir)])
    videos = [
        torch.from_numpy(np.load(vids / f"v{i}.npy")).permute(3, 0, 1, 2).float() / 255.0
        for i in range(3)
    ]
    data = E.EvalData(videos=videos, captions=[f"w{i} w{i + 1}" for i in range(3)],
                      caption_video=[0, 1, 2])  # fmt: skip
    want = E.evaluate_model(model, data, retrieval_ks=(1,), batch_size=1)
    assert report["metrics"]["text_to_video"] == json.loads(json.dumps(want["text_to_video"]))


# ------------------------------------------------------------------ review 13 regressions


def _tiny_videos(root: Path, n: int = 3) -> Path:
    vids = root / "videos"
    vids.mkdir()
    rng = np.random.default_rng(40)
    for i in range(n):
        np.save(vids / f"v{i}.npy", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    return vids


def test_config_json_lists_become_tuples_by_field_type(tmp_path):
    """JSON has no tuples: a list given to a tuple-typed field (read from the dataclass type
    hints) becomes a tuple; a dict (rope_scaling) stays a dict; the CLI runs on it."""
    tiny = M.VLJEPAConfig.tiny()
    layers = tiny.y_encoder.layers
    kinds = [("full_attention" if i % 2 else "sliding_attention") for i in range(layers)]
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 2.0, "original_max_position_embeddings": 64}  # fmt: skip
    dense = [2 * tiny.embed_dim, tiny.embed_dim]
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({
        "base": "tiny",
        "y_encoder": {"dense": dense, "layer_types": kinds},
        "predictor": {"rope_scaling": scaling},
    }))  # fmt: skip
    cfg = E.io.load_config(str(cfg_path))
    assert cfg.y_encoder.dense == tuple(dense) and type(cfg.y_encoder.dense) is tuple
    assert cfg.y_encoder.layer_types == tuple(kinds) and type(cfg.y_encoder.layer_types) is tuple
    assert cfg.predictor.rope_scaling == scaling and type(cfg.predictor.rope_scaling) is dict
    # the generic rule on a dataclass of its own: nested tuples, optional tuples, dicts
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Demo:
        pairs: tuple[tuple[int, int], ...] = ()
        maybe: tuple[str, ...] | None = None
        fixed: tuple[int, str] = (0, "")
        extra: dict = field(default_factory=dict)
        plain: list = field(default_factory=list)

    got = E.io._sub(Demo, Demo(), {"pairs": [[1, 2], [3, 4]], "maybe": ["a"], "fixed": [5, "b"],
                                   "extra": {"k": [1]}, "plain": [1, 2]}, "demo")  # fmt: skip
    assert got == Demo(((1, 2), (3, 4)), ("a",), (5, "b"), {"k": [1]}, [1, 2])
    assert type(got.pairs[0]) is tuple and type(got.extra["k"]) is list
    assert type(got.plain) is list
    assert E.io._sub(Demo, Demo(), {"maybe": None}, "demo").maybe is None
    # a wrong length still reaches the config's own check, naming the field
    cfg_path.write_text(json.dumps({"base": "tiny", "y_encoder": {"layer_types": kinds[:1]}}))
    with pytest.raises(ValueError, match="cfg.json: field 'y_encoder': YEncoderConfig.layer_types"):
        E.io.load_config(str(cfg_path))
    # and the CLI evaluates with such a config
    cfg_path.write_text(json.dumps({"base": "tiny", "y_encoder": {"dense": dense}}))
    vids = _tiny_videos(tmp_path)
    (tmp_path / "ann.jsonl").write_text(
        "".join(f'{{"video": "v{i}", "caption": "c{i}"}}\n' for i in range(3))
    )
    report = cli.main(["--config", str(cfg_path), "--random-init", "--videos", str(vids),
                       "--annotations", str(tmp_path / "ann.jsonl"), "--ks", "1",
                       "--json", str(tmp_path / "o.json"),
                       "--markdown", str(tmp_path / "o.md")])  # fmt: skip
    assert report["metrics"]["text_to_video"]["queries"] == 3


def test_cli_without_an_evaluable_task_is_an_error(tmp_path):
    """Annotations with videos only: an error naming the file and what was expected, no empty
    report; evaluate_model refuses such data too."""
    vids = _tiny_videos(tmp_path, 2)
    out = tmp_path / "o.json"
    for name, text in (
        ("only.jsonl", '{"video": "v0"}\n{"video": "v1"}\n'),
        ("only.json", '{"records": [{"video": "v0"}], "classes": ["a"], "query": "q?"}'),
    ):
        (tmp_path / name).write_text(text)
        argv = ["--config", "tiny", "--random-init", "--videos", str(vids),
                "--annotations", str(tmp_path / name), "--json", str(out),
                "--markdown", str(tmp_path / "o.md")]  # fmt: skip
        msg = _cli_error(argv)
        assert f"{tmp_path / name}: nothing to evaluate" in msg
        for word in ("'caption'", "'captions'", "'label'", "'question'", "'streams'"):
            assert word in msg
        assert not out.exists()
    # the exit status of the module is non-zero
    proc = subprocess.run(
        [sys.executable, "-m", "vljepa_fast.eval", *argv],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "nothing to evaluate" in proc.stderr
    data = E.EvalData(videos=[torch.zeros(3, 4, 32, 32)])
    with pytest.raises(ValueError, match="data: nothing to evaluate"):
        E.evaluate_model(tiny_model(), data)


def test_cli_features_of_the_wrong_width_name_the_file(tmp_path, monkeypatch):
    """Features whose width is not the config's x_encoder.dim: the feature file (and entry) and
    the expected width are named, before the model runs."""
    from safetensors.torch import save_file

    x_dim = M.VLJEPAConfig.tiny().x_encoder.dim
    rng = np.random.default_rng(41)
    feats = {f"v{i}": torch.from_numpy(rng.standard_normal((8, x_dim + 16), dtype=np.float32))
             for i in range(3)}  # fmt: skip
    one = tmp_path / "feats.safetensors"
    save_file(feats, str(one))
    fdir = tmp_path / "feats"
    fdir.mkdir()
    for n, f in feats.items():
        np.save(fdir / f"{n}.npy", f.numpy())
    (tmp_path / "ann.jsonl").write_text(
        "".join(f'{{"video": "v{i}", "caption": "c{i}"}}\n' for i in range(3))
    )

    def boom(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(M.VLJEPA, "predict", boom)
    for src, where in ((one, f"{one}: features 'v0'"), (fdir, str(fdir / "v0.npy"))):
        msg = _cli_error(["--config", "tiny", "--random-init", "--features", str(src),
                          "--annotations", str(tmp_path / "ann.jsonl"),
                          "--json", str(tmp_path / "o.json"),
                          "--markdown", str(tmp_path / "o.md")])  # fmt: skip
        assert where in msg, msg
        assert f"x_encoder.dim = {x_dim}" in msg and f"(8, {x_dim + 16})" in msg
        assert "visual:" not in msg
    # load_features alone: the width is checked only when asked
    got, _ = E.io.load_features(one)
    assert got["v1"].shape == (8, x_dim + 16)
    with pytest.raises(ValueError, match=f"x_encoder.dim = {x_dim}"):
        E.io.load_features(one, x_dim=x_dim)


def test_vqa_tie_rule_is_documented_and_differs_from_answer():
    """VQA accuracy follows --ties on exact ties (pessimistic by default); VLJEPA.answer() takes
    the lowest index: the help and the docstrings say so, and the difference is real."""
    help_text = cli.build_parser().format_help()
    flat = " ".join(help_text.split())
    assert "VLJEPA.answer()" in flat and "lowest index" in flat
    assert "wrong under pessimistic (default)" in flat
    doc = " ".join(E.vqa_accuracy.__doc__.split())
    assert "VLJEPA.answer" in doc and "lowest candidate index" in doc
    assert "lowest index" in " ".join(E.evaluate_model.__doc__.split())
    # a bank of identical candidate texts holds identical rows: an exact tie for first
    model = tiny_model(4)
    video = torch.from_numpy(np.random.default_rng(42).random((1, 3, 4, 32, 32), np.float32))
    bank = model.encode_labels(["the same words", "the same words"])
    assert torch.equal(bank.embeddings[0], bank.embeddings[1])
    _, idx = model.answer(video, "which?", bank)
    assert int(idx[0]) == 0  # answer(): the lowest index among the tied
    with torch.no_grad():
        p = F.normalize(model.predict(video, "which?").double(), dim=-1)[0]
    # row by row: one matrix-vector product may sum equal rows in different orders (BLAS
    # blocking by row), which is not the tie under test
    s = torch.stack([row.double() @ p.to(row.device) for row in bank.embeddings])
    assert s[0] == s[1]
    # true answer 0: answer() picks it, the default (pessimistic) accuracy counts it wrong
    assert E.vqa_accuracy([s], [0])["accuracy"] == 0.0
    assert E.vqa_accuracy([s], [0], ties="optimistic")["accuracy"] == 1.0
    # true answer 1: answer() misses it, the optimistic accuracy counts it right
    assert E.vqa_accuracy([s], [1], ties="optimistic")["accuracy"] == 1.0
    assert E.vqa_accuracy([s], [1])["accuracy"] == 0.0
