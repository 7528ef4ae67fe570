"""Reading evaluation inputs from disk: videos, cached features, annotations, configs, weights.

Video formats (one video per entry of a folder, named by the entry's stem):

* ``name.npy`` / ``name.pt`` / ``name.pth``: one array or tensor, either [T, H, W, C] uint8
  (frames, 0..255: scaled to [0, 1]) or [C, T, H, W] floating (used as is);
* ``name/``: a folder of frame images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``) in
  file-name order, read as RGB by Pillow (optional dependency: a clear error without it) and
  scaled to [0, 1].

Cached X-encoder features (``model.encode_video`` output, one [tokens, x_dim] per video):

* a folder of ``name.npy`` / ``name.pt`` / ``name.pth`` / ``name.safetensors`` files, one
  floating [tokens, x_dim] array each (a safetensors file: its single tensor);
* one file: a ``.pt`` / ``.pth`` / ``.safetensors`` mapping {name: [tokens, x_dim]}, or a
  ``.npy`` / ``.pt`` [N, tokens, x_dim] array (names "0".."N-1").

The annotations file (JSON or JSONL, schema in :func:`load_annotations`).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Annotations",
    "IMAGE_SUFFIXES",
    "Record",
    "load_annotations",
    "load_config",
    "load_features",
    "load_video",
    "load_videos",
    "load_weights",
]

ARRAY_SUFFIXES = (".npy", ".pt", ".pth")
FEATURE_SUFFIXES = ARRAY_SUFFIXES + (".safetensors",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ arrays


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _torch_load(path: Path):
    """torch.load of plain tensors / dicts only (weights_only: no arbitrary code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_array(path: Path) -> Tensor:
    try:
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
            return torch.from_numpy(np.ascontiguousarray(x))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            d = load_file(str(path))
            if len(d) != 1:
                raise ValueError(f"{path}: expected one tensor, got keys {sorted(d)[:10]}")
            return next(iter(d.values()))
        x = _torch_load(path)
    except Exception as e:  # unpickling, zip and format errors: re-raised naming the file
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise ValueError(f"{path}: expected one tensor, got {type(x).__name__}")
    return x


def _video_tensor(x: Tensor, where: str) -> Tensor:
    if x.dim() != 4:
        raise ValueError(
            f"{where}: expected [T, H, W, C] uint8 or [C, T, H, W] floating, got shape "
            f"{tuple(x.shape)}"
        )
    if x.dtype == torch.uint8:
        return x.permute(3, 0, 1, 2).float().div_(255.0).contiguous()
    if x.is_floating_point():
        if not torch.isfinite(x).all():
            raise ValueError(f"{where}: contains NaN or infinity")
        return x.float()
    raise ValueError(
        f"{where}: expected uint8 [T, H, W, C] or floating [C, T, H, W], got {x.dtype}"
    )


def _frames(folder: Path) -> Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(
            f"{folder}: a folder of frame images needs Pillow (pip install pillow); or give the "
            "video as a .npy / .pt array"
        ) from None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no frame images ({', '.join(IMAGE_SUFFIXES)})")
    frames = []
    for f in files:
        try:
            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise ValueError(f"{f}: cannot be read as an image ({e})") from None
    shapes = {a.shape for a in frames}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: frames differ in size: {sorted(shapes)}")
    return torch.from_numpy(np.stack(frames))  # [T, H, W, 3] uint8


def load_video(path: str | Path, normalize: str = "none") -> Tensor:
    """One video -> [C, T, H, W] float32 (formats in the module docstring).

    Args:
        path: a .npy / .pt / .pth file or a folder of frame images.
        normalize: "none" (values as read; uint8 scaled to [0, 1]) or "imagenet"
            ((x - mean) / std per channel with the ImageNet statistics V-JEPA 2 uses).
    """
    if normalize not in ("none", "imagenet"):
        raise ValueError(f"normalize: expected 'none' or 'imagenet', got {normalize!r}")
    path = Path(path)
    if path.is_dir():
        x = _video_tensor(_frames(path), str(path))
    elif path.is_file() and path.suffix in ARRAY_SUFFIXES:
        x = _video_tensor(_load_array(path), str(path))
    elif not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    else:
        raise ValueError(
            f"{path}: unsupported video format {path.suffix!r} (expected {ARRAY_SUFFIXES} or "
            "a folder of frame images; decode other formats to frames first)"
        )
    if normalize == "imagenet":
        if x.shape[0] != 3:
            raise ValueError(f"{path}: 'imagenet' normalisation needs 3 channels, got {x.shape[0]}")
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
        x = (x - mean) / std
    return x


def _entries(folder: Path, suffixes: tuple[str, ...], dirs: bool) -> tuple[dict, list[str]]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    found, skipped = {}, []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if (dirs and p.is_dir()) or (p.is_file() and p.suffix in suffixes):
            name = p.name if p.is_dir() else p.stem
            if name in found:
                raise ValueError(f"{folder}: two entries named {name!r}: {found[name]}, {p}")
            found[name] = p
        else:
            skipped.append(p.name)
    if not found:
        raise ValueError(f"{folder}: no videos or features found (expected {suffixes})")
    return found, skipped


def load_videos(
    folder: str | Path, names: list[str] | None = None, normalize: str = "none"
) -> tuple[dict[str, Tensor], list[str]]:
    """The videos of a folder: ({name: [C, T, H, W] float32}, skipped file names).

    Only ``names`` are read when given (each must exist: ValueError naming it and the folder).
    Files of other suffixes are skipped and returned (not silently: the CLI reports them).
    """
    folder = Path(folder)
    found, skipped = _entries(folder, ARRAY_SUFFIXES, dirs=True)
    want = list(found) if names is None else names
    missing = [n for n in want if n not in found]
    if missing:
        raise ValueError(f"{folder}: no video named {missing[:10]} (have {sorted(found)[:10]})")
    return {n: load_video(found[n], normalize) for n in want}, skipped


def load_features(
    path: str | Path, x_dim: int | None = None
) -> tuple[dict[str, Tensor], list[str]]:
    """Cached features: ({name: [tokens, x_dim] float}, skipped file names) from a folder or
    one file (module docstring).

    Args:
        path: the folder or file.
        x_dim: when given, the width every feature must have (the config's
            ``x_encoder.dim``); a mismatch raises naming the file (and the entry).

    Raises:
        ValueError: naming the file (and entry): unreadable, not floating [tokens, x_dim],
            another width than ``x_dim``, or NaN / infinity.
    """
    path = Path(path)
    found: dict[str, Path] = {}
    if path.is_dir():
        found, skipped = _entries(path, FEATURE_SUFFIXES, dirs=False)
        out = {n: _load_array(p) for n, p in found.items()}
    elif path.is_file():
        skipped = []
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            out = dict(load_file(str(path)))
        elif path.suffix in ARRAY_SUFFIXES:
            if path.suffix == ".npy":
                x = _load_array(path)
            else:
                try:
                    x = _torch_load(path)
                except Exception as e:  # re-raised naming the file
                    why = f"{type(e).__name__}: {_first_line(e)}"
                    raise ValueError(f"{path}: cannot be read ({why})") from None
            if isinstance(x, dict):
                out = dict(x)
            elif isinstance(x, Tensor) and x.dim() == 3:
                out = {str(i): x[i] for i in range(x.shape[0])}
            else:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"{path}: expected {{name: [tokens, x_dim]}} or [N, tokens, x_dim], got {got}"
                )
        else:
            raise ValueError(f"{path}: unsupported features format {path.suffix!r}")
    else:
        raise ValueError(f"{path}: no such file or folder")
    for n, x in out.items():
        where = f"{found[n]}" if n in found else f"{path}: features {n!r}"
        if isinstance(x, np.ndarray):
            x = out[n] = torch.from_numpy(x)
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 2:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{where}: expected floating [tokens, x_dim], got {got}")
        if x_dim is not None and x.shape[1] != x_dim:
            raise ValueError(
                f"{where}: expected features [tokens, {x_dim}] (x_dim = the config's "
                f"x_encoder.dim = {x_dim}), got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{where}: contains NaN or infinity")
    return out, skipped


# ------------------------------------------------------------------------------ annotations


@dataclass
class Record:
    """One video's annotations (one JSONL line, one entry of a JSON list)."""

    video: str
    captions: list[str]
    label: str | None
    questions: list[dict]  # {"question": str, "candidates": [str], "answer": int}


@dataclass
class Annotations:
    records: list[Record]
    classes: list[str]
    streams: list[dict]  # {"windows": [video names], "starts": [int]}
    query: str | None


def _field_error(where: str, field: str, want: str, got) -> ValueError:
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ValueError(f"{where}: field {field!r}: expected {want}, got {shown}")


def _str_list(v, where: str, field: str) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
        raise _field_error(where, field, "a non-empty list of non-empty strings", v)
    return v


def _record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    known = {"video", "caption", "captions", "label", "question", "candidates", "answer",
             "questions"}  # fmt: skip
    extra = sorted(set(obj) - known)
    if extra:
        raise ValueError(f"{where}: unknown field(s) {extra} (known: {sorted(known)})")
    video = obj.get("video")
    if isinstance(video, int) and not isinstance(video, bool):
        video = str(video)
    if not isinstance(video, str) or not video:
        raise _field_error(where, "video", "a video name (string)", video)
    if "caption" in obj and "captions" in obj:
        raise ValueError(f"{where}: give 'caption' or 'captions', not both")
    captions = []
    if "caption" in obj:
        captions = _str_list([obj["caption"]], where, "caption")
    elif "captions" in obj:
        captions = _str_list(obj["captions"], where, "captions")
    label = obj.get("label")
    if label is not None and (not isinstance(label, str) or not label):
        raise _field_error(where, "label", "a class name (string)", label)
    qs = []
    single = [k for k in ("question", "candidates", "answer") if k in obj]
    if single and "questions" in obj:
        raise ValueError(f"{where}: give 'question'/'candidates'/'answer' or 'questions', not both")
    raw = [obj] if single else obj.get("questions", [])
    if not isinstance(raw, list):
        raise _field_error(where, "questions", "a list of objects", raw)
    for j, q in enumerate(raw):
        qw = where if single else f"{where}: questions[{j}]"
        if not isinstance(q, dict):
            raise ValueError(f"{qw}: expected an object, got {type(q).__name__}")
        text = q.get("question")
        if not isinstance(text, str) or not text:
            raise _field_error(qw, "question", "a non-empty string", text)
        cands = _str_list(q.get("candidates"), qw, "candidates")
        ans = q.get("answer")
        if isinstance(ans, str):
            if ans not in cands:
                raise _field_error(qw, "answer", "an index or one of the candidates", ans)
            ans = cands.index(ans)
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(cands):
            raise _field_error(qw, "answer", f"an int in [0, {len(cands)}) or a candidate", ans)
        qs.append({"question": text, "candidates": cands, "answer": ans})
    return Record(video, captions, label, qs)


def load_annotations(path: str | Path) -> Annotations:
    """Read the annotations (captions, labels, questions, streams) of a dataset.

    Schema. A record annotates one video::

        {"video": "clip_0001",                      # the video's name (file stem / folder)
         "caption": "a dog runs"  |  "captions": ["a dog runs", "a running dog"],
         "label": "dog",                             # optional class name
         "question": "what runs?", "candidates": ["a dog", "a cat"], "answer": 0 | "a dog"
           | "questions": [{"question": ..., "candidates": [...], "answer": ...}, ...]}

    All fields but "video" are optional. A ``.jsonl`` file holds one record per line (blank
    lines skipped). A ``.json`` file holds a list of records, or an object::

        {"records": [...],                           # required
         "classes": ["cat", "dog", ...],             # optional: the class list (default: the
                                                     #   labels in first-appearance order)
         "streams": [{"windows": ["w0", "w1", ...],  # optional: video names in time order
                      "starts": [0, 5, 9]}],         #   true segment starts (window positions)
         "query": "what is happening?"}              # optional: the predictor query

    Raises:
        ValueError: naming the file, the line or record, and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    classes: list[str] | None = None
    streams: list[dict] = []
    query = None
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
            records.append(_record(obj, f"{path}: line {n}"))
    elif path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(obj, dict):
            extra = sorted(set(obj) - {"records", "classes", "streams", "query"})
            if extra:
                raise ValueError(f"{path}: unknown top-level field(s) {extra}")
            if "records" not in obj:
                raise ValueError(f"{path}: field 'records': missing")
            raw = obj["records"]
            if "classes" in obj:
                classes = _str_list(obj["classes"], str(path), "classes")
                if len(set(classes)) != len(classes):
                    raise _field_error(str(path), "classes", "distinct names", classes)
            query = obj.get("query")
            if query is not None and (not isinstance(query, str) or not query):
                raise _field_error(str(path), "query", "a non-empty string", query)
            raw_streams = obj.get("streams", [])
            if not isinstance(raw_streams, list):
                raise _field_error(str(path), "streams", "a list of objects", raw_streams)
            for j, s in enumerate(raw_streams):
                where = f"{path}: streams[{j}]"
                if not isinstance(s, dict) or set(s) != {"windows", "starts"}:
                    raise ValueError(f"{where}: expected an object with 'windows' and 'starts'")
                windows = _str_list(s["windows"], where, "windows")
                starts = s["starts"]
                if (
                    not isinstance(starts, list)
                    or not starts
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in starts)
                    or starts[0] != 0
                    or any(a >= b for a, b in zip(starts, starts[1:]))
                    or starts[-1] >= len(windows)
                ):
                    raise _field_error(
                        where, "starts",
                        f"ascending ints in [0, {len(windows)}) beginning at 0", starts,
                    )  # fmt: skip
                streams.append({"windows": windows, "starts": starts})
        else:
            raw = obj
        if not isinstance(raw, list):
            raise _field_error(str(path), "records", "a list of records", raw)
        records = [_record(r, f"{path}: records[{j}]") for j, r in enumerate(raw)]
    else:
        raise ValueError(f"{path}: expected a .json or .jsonl annotations file")
    if not records:
        raise ValueError(f"{path}: no records")
    seen: dict[str, int] = {}
    for j, r in enumerate(records):
        if r.video in seen:
            raise ValueError(
                f"{path}: video {r.video!r} annotated twice (records {seen[r.video]} and {j}); "
                "put all its captions in one record"
            )
        seen[r.video] = j
    labels = [r.label for r in records if r.label is not None]
    if classes is None:
        classes = list(dict.fromkeys(labels))
    else:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise ValueError(f"{path}: field 'label': {unknown[:10]} not in 'classes'")
    return Annotations(records, classes, streams, query)


# ------------------------------------------------------------------------------ model


def _tuple_hint(hint):
    """The ``tuple[...]`` member of a type hint (``tuple[int, ...]``, ``tuple[str, ...] | None``,
    ``Optional[tuple[...]]``), or None when the hint admits no tuple."""
    if hint is tuple or typing.get_origin(hint) is tuple:
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            found = _tuple_hint(arg)
            if found is not None:
                return found
    return None


def _from_json(hint, v):
    """A JSON value as the dataclass field typed ``hint`` holds it: JSON has no tuples, so a list
    becomes a tuple where the hint is a tuple type (elements converted by the tuple's own
    element types, recursively); everything else (numbers, strings, dicts such as
    ``rope_scaling``) is kept as is, for the config's own checks."""
    t = _tuple_hint(hint)
    if t is None or not isinstance(v, list):
        return v
    args = typing.get_args(t)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_from_json(args[0], x) for x in v)
    if args and len(args) == len(v):
        return tuple(_from_json(a, x) for a, x in zip(args, v))
    return tuple(v)  # bare tuple, or a length mismatch the config's check reports


def _sub(cls, base, d, where: str):
    from dataclasses import replace

    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    extra = sorted(set(d) - names)
    if extra:
        raise ValueError(f"{where}: unknown field(s) {extra} of {cls.__name__}")
    hints = typing.get_type_hints(cls)
    d = {k: _from_json(hints.get(k), v) for k, v in d.items()}
    try:
        return replace(base, **d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(spec: str):
    """ "tiny" | "paper" | a JSON file -> :class:`~vljepa_fast.models.VLJEPAConfig`.

    The JSON file: ``{"base": "tiny" | "paper" (default "paper"), "x_encoder": {...},
    "predictor": {...}, "y_encoder": {...}, "y_decoder": {...}, "embed_dim": ..., ...}``:
    the base preset with the given fields replaced (nested objects replace single fields of
    the sub-config); unknown fields raise naming them. JSON lists given to tuple-typed fields
    (read from the dataclasses' type hints, e.g. ``y_encoder.dense``, ``y_encoder.layer_types``)
    become tuples; objects (e.g. ``predictor.rope_scaling``) stay dicts.
    """
    from vljepa_fast.models.config import (
        PredictorConfig,
        VLJEPAConfig,
        XEncoderConfig,
        YDecoderConfig,
        YEncoderConfig,
    )

    if spec == "tiny":
        return VLJEPAConfig.tiny()
    if spec == "paper":
        return VLJEPAConfig.paper()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--config: {spec!r} is neither 'tiny', 'paper' nor an existing file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    d = dict(d)
    base_name = d.pop("base", "paper")
    if base_name not in ("tiny", "paper"):
        raise _field_error(str(path), "base", "'tiny' or 'paper'", base_name)
    base = VLJEPAConfig.tiny() if base_name == "tiny" else VLJEPAConfig.paper()
    subs = {
        "x_encoder": XEncoderConfig,
        "predictor": PredictorConfig,
        "y_encoder": YEncoderConfig,
        "y_decoder": YDecoderConfig,
    }
    changes = {}
    for k, cls in subs.items():
        if k in d:
            changes[k] = _sub(cls, getattr(base, k), d.pop(k), f"{path}: field {k!r}")
    changes.update(d)
    return _sub(VLJEPAConfig, base, changes, str(path))


def load_weights(model, path: str | Path) -> None:
    """Load a state dict (``.safetensors``, or a torch file ``.pt`` / ``.pth`` / ``.bin``,
    optionally wrapped as {"state_dict": ...} or {"model": ...}) into ``model``; missing,
    unexpected and mis-shaped keys are listed by name."""
    from vljepa_fast.models._layers import load_checked

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--weights: {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = _torch_load(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(
            f"{path}: cannot be read as a state dict ({type(e).__name__}: {_first_line(e)})"
        ) from None
    for outer in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(outer), dict):
            state = state[outer]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict {{name: tensor}}")
    load_checked(model, state, str(path))
