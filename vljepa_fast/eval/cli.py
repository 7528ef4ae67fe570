"""``python -m vljepa_fast.eval``: evaluate a VL-JEPA model on a folder of videos (or cached
X-encoder features) and an annotations file; write JSON and a markdown table.

Examples::

    python -m vljepa_fast.eval --config tiny --weights model.safetensors \\
        --videos clips/ --annotations captions.jsonl --json out.json --markdown out.md
    python -m vljepa_fast.eval --config my_config.json --weights model.pt \\
        --features feats.safetensors --annotations ann.json --tolerance 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vljepa_fast.eval import io
from vljepa_fast.eval.evaluate import DEFAULT_QUERY, EvalData, Question, Stream, evaluate_model
from vljepa_fast.eval.metrics import TIES

__all__ = ["build_parser", "main", "markdown_table"]

TASK_TITLES = {
    "text_to_video": "Text-to-video retrieval",
    "video_to_text": "Video-to-text retrieval",
    "classification": "Zero-shot classification",
    "vqa": "Multiple-choice VQA",
    "selective_decoding": "Selective decoding (Ward vs uniform, equal boundary recall)",
}


EPILOG = """\
inputs:
  videos       DIR/NAME.npy | NAME.pt | NAME.pth: [T, H, W, C] uint8 (scaled to [0, 1]) or
               [C, T, H, W] float (as is); DIR/NAME/: frame images (png, jpg, jpeg, bmp, webp)
               in file-name order, read as RGB (needs Pillow). T a multiple of the tubelet, H and
               W of the patch. Other files in DIR are skipped and listed in the JSON.
  features     a folder of NAME.npy | .pt | .pth | .safetensors, each [tokens, x_dim]
               (model.encode_video output), or one .pt | .safetensors {NAME: [tokens, x_dim]}
               or .npy | .pt [N, tokens, x_dim] (names "0".."N-1"); x_dim = the
               --config's x_encoder.dim (checked before the model runs).
  annotations  .jsonl: one record per line; .json: a list of records, or
               {"records": [...], "classes": [names], "query": str,
                "streams": [{"windows": [NAME, ...], "starts": [0, ...]}]}
               record: {"video": NAME, "caption": str | "captions": [str, ...],
                        "label": str, "question": str, "candidates": [str, ...],
                        "answer": int | str}   (all fields but "video" optional)

metrics (cosine scores; fractions in [0, 1]):
  text_to_video / video_to_text  R@k, median_rank, mean_rank over the captioned videos; a
               video's rank in video-to-text is its best caption's (several captions allowed).
  classification  top-k accuracy of the labelled videos against the class-name embeddings.
  vqa          accuracy: the true candidate ranks first (query = the question). A true
               candidate tied for first follows --ties: wrong under pessimistic (default),
               right under optimistic. VLJEPA.answer() instead picks the lowest index among
               tied candidates, so on exact ties its answers and this accuracy can differ.
  selective_decoding  per stream: Ward segments (as many as true ones) vs the fewest uniform
               segments reaching the same boundary recall (one-to-one matching within
               --tolerance windows): calls, uniform_calls, calls_ratio = uniform / calls.
  ties         --ties pessimistic: a ground truth tied with k negatives ranks below them.

outputs: --json (the report: config, weights, data, metrics) and --markdown (a table).
"""


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vljepa_fast.eval",
        description=(
            "Evaluate a VL-JEPA model: text-to-video / video-to-text retrieval (R@k, median and "
            "mean rank), zero-shot classification (top-k), multiple-choice VQA accuracy and "
            "selective-decoding efficiency, on a folder of videos or cached X-encoder features "
            "plus an annotations file. Writes JSON and a markdown table."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", metavar="DIR", help="folder of videos (formats below)")
    src.add_argument(
        "--features", metavar="PATH", help="cached X-encoder features: a folder or one file"
    )
    ap.add_argument(
        "--annotations", "--captions", metavar="FILE", required=True,
        help="captions / labels / questions / streams (.json or .jsonl, schema below)",
    )  # fmt: skip
    ap.add_argument(
        "--config", required=True, metavar="tiny|paper|FILE",
        help="model sizes: a preset or a JSON file {\"base\": \"tiny\"|\"paper\", "
        "\"x_encoder\": {...}, ...} overriding the preset's fields",
    )  # fmt: skip
    w = ap.add_mutually_exclusive_group(required=True)
    w.add_argument(
        "--weights", metavar="FILE",
        help="state dict of the whole model (.safetensors, or torch .pt/.pth/.bin)",
    )  # fmt: skip
    w.add_argument(
        "--random-init", action="store_true",
        help="no weights: random initialisation from --seed (smoke tests, chance baselines)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seed of --random-init (default 0)")
    for flag, what in (("query", "predictor's queries"), ("text", "Y-encoder's texts")):
        ap.add_argument(
            f"--{flag}-tokenizer", metavar="DIR", default=None,
            help=f"local transformers tokenizer folder for the {what} (needed by a model "
            "whose vocabulary is not the byte tokenizer's, e.g. --config paper)",
        )  # fmt: skip
    ap.add_argument(
        "--json", default="eval_results.json", metavar="FILE",
        help="JSON output (default eval_results.json)",
    )  # fmt: skip
    ap.add_argument(
        "--markdown", default="eval_results.md", metavar="FILE",
        help="markdown output (default eval_results.md)",
    )  # fmt: skip
    ap.add_argument(
        "--query", default=None,
        help=f"predictor query embedding a video (default: the file's 'query', else "
        f"{DEFAULT_QUERY!r})",
    )  # fmt: skip
    ap.add_argument(
        "--normalize", choices=("none", "imagenet"), default="none",
        help="video normalisation after scaling uint8 to [0, 1] (default none)",
    )  # fmt: skip
    ap.add_argument(
        "--ks", type=_ks, default=(1, 5, 10),
        help="retrieval R@k, comma-separated (default 1,5,10; ks above the gallery skipped)",
    )  # fmt: skip
    ap.add_argument(
        "--class-ks", type=_ks, default=(1, 5),
        help="classification top-k (default 1,5; ks above the class count skipped)",
    )  # fmt: skip
    ap.add_argument(
        "--ties", choices=TIES, default="pessimistic",
        help="rank of a ground truth tied with negatives: pessimistic (below them, default) "
        "or optimistic (above them); for VQA a tie for first is wrong / right (unlike "
        "VLJEPA.answer(), which takes the lowest index among tied candidates)",
    )  # fmt: skip
    ap.add_argument(
        "--tolerance", type=int, default=1,
        help="boundary tolerance in windows for the selective-decoding recall (default 1)",
    )  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=16, help="videos / texts per model call")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument(
        "--backend", default="auto",
        help="op backend: 'auto', one name, or op=name pairs (as VLJEPA's backend)",
    )  # fmt: skip
    return ap


def _backend(text: str):
    if "=" in text:
        return {
            op.strip(): name.strip()
            for op, name in (part.split("=", 1) for part in text.split(",") if part)
        }
    return text


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown_table(report: dict) -> str:
    """The markdown of a report written by :func:`main` (one table, a row per metric)."""
    m = report["metrics"]
    lines = [
        "# VL-JEPA evaluation",
        "",
        f"config `{report['config']}`, weights `{report['weights']}`, "
        f"{report['data']['items']} {report['data']['input']}, ties {report['data']['ties']}",
        "",
        "| task | metric | value |",
        "|---|---|---|",
    ]
    for task, title in TASK_TITLES.items():
        if task not in m:
            continue
        for key, v in m[task].items():
            if key in ("streams", "skipped_ks") or isinstance(v, (list, dict)):
                continue
            lines.append(f"| {title} | {key} | {_fmt(v)} |")
    return "\n".join(lines) + "\n"


def _check_tasks(path, ann: io.Annotations) -> None:
    """At least one task must be evaluable: a run with none would write an empty table."""
    if not any(r.captions or r.label is not None or r.questions for r in ann.records) and not (
        ann.streams
    ):
        raise ValueError(
            f"{path}: nothing to evaluate: expected at least one record with 'caption' / "
            "'captions' (retrieval), 'label' (classification) or 'question' / 'questions' "
            "(VQA), or a top-level 'streams' list (selective decoding; a .json object file)"
        )


def _dataset(args, ann: io.Annotations, x_dim: int) -> tuple[EvalData, dict]:
    names = list(dict.fromkeys([r.video for r in ann.records] +
                               [w for s in ann.streams for w in s["windows"]]))  # fmt: skip
    if args.videos is not None:
        items, skipped = io.load_videos(args.videos, names, args.normalize)
        kind = "videos"
    else:
        # the width is checked here, before the model runs, naming the feature file
        feats, skipped = io.load_features(args.features, x_dim=x_dim)
        missing = [n for n in names if n not in feats]
        if missing:
            raise ValueError(
                f"{args.features}: no features for video(s) {missing[:10]} named in "
                f"{args.annotations}"
            )
        items, kind = {n: feats[n] for n in names}, "features"
    index = {n: i for i, n in enumerate(names)}
    captions, cap_video, label_video, labels, questions = [], [], [], [], []
    cls = {c: i for i, c in enumerate(ann.classes)}
    for r in ann.records:
        for c in r.captions:
            captions.append(c)
            cap_video.append(index[r.video])
        if r.label is not None:
            label_video.append(index[r.video])
            labels.append(cls[r.label])
        for q in r.questions:
            questions.append(
                Question(index[r.video], q["question"], tuple(q["candidates"]), q["answer"])
            )
    streams = [
        Stream(tuple(index[w] for w in s["windows"]), tuple(s["starts"])) for s in ann.streams
    ]
    data = EvalData(
        **{kind: [items[n] for n in names]},
        names=names,
        captions=captions,
        caption_video=cap_video,
        classes=ann.classes,
        label_video=label_video,
        labels=labels,
        questions=questions,
        streams=streams,
    )
    return data, {"skipped_files": skipped}


def main(argv: list[str] | None = None) -> dict:
    """Run the CLI; returns the report written to ``--json``. Bad input exits with
    ``SystemExit("python -m vljepa_fast.eval: error: ...")`` naming the file and field."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ValueError as e:
        raise SystemExit(f"python -m vljepa_fast.eval: error: {e}") from None


def _run(args) -> dict:
    from vljepa_fast.models import VLJEPA

    if args.tolerance < 0:
        raise ValueError(f"--tolerance: expected >= 0, got {args.tolerance}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {args.batch_size}")
    cfg = io.load_config(args.config)
    ann = io.load_annotations(args.annotations)
    _check_tasks(args.annotations, ann)
    data, extra = _dataset(args, ann, cfg.x_encoder.dim)
    if args.random_init:
        torch.manual_seed(args.seed)
    for flag in ("query_tokenizer", "text_tokenizer"):
        folder = getattr(args, flag)
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"--{flag.replace('_', '-')}: {folder} is not a folder")
    model = VLJEPA(
        cfg,
        _backend(args.backend),
        query_tokenizer=args.query_tokenizer,
        text_tokenizer=args.text_tokenizer,
    )
    if args.weights is not None:
        io.load_weights(model, args.weights)
    model.to(args.device)
    query = args.query or ann.query or DEFAULT_QUERY
    result = evaluate_model(
        model,
        data,
        query=query,
        retrieval_ks=args.ks,
        class_ks=args.class_ks,
        ties=args.ties,
        tolerance=args.tolerance,
        batch_size=args.batch_size,
    )
    data_info = result.pop("data")
    data_info.update(extra)
    data_info["annotations"] = str(args.annotations)
    data_info["source"] = str(args.videos if args.videos is not None else args.features)
    report = {
        "config": args.config,
        "weights": args.weights if args.weights is not None else f"random-init(seed={args.seed})",
        "data": data_info,
        "metrics": result,
    }
    for path, text in (
        (args.json, json.dumps(report, indent=2) + "\n"),
        (args.markdown, markdown_table(report)),
    ):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    print(markdown_table(report), end="", file=sys.stdout)
    return report
