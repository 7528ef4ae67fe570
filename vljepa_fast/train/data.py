"""Training data: which samples each step sees, and the batches themselves.

:func:`open_data` reads a ``--data`` spec:

* ``synthetic`` / ``synthetic:N``: N (default 2**20, at most 2**31: an epoch's order is N
  int64s in memory) coloured-shape clips of :mod:`vljepa_fast.train.synthetic` at the preset's
  clip shape, sample i a pure function of (seed, i); query ``preset.query``, target the caption;
* a folder with ``captions.jsonl``: one ``{"video": path relative to the folder (no absolute
  path, no ``..``), "caption": str, "query": str (optional, default preset.query)}`` per line,
  clips read by :func:`vljepa_fast.eval.io.load_video` (as read: uint8 frames scaled to [0, 1],
  no normalisation) and checked against the preset's [3, frames, image_size, image_size]; a clip
  that cannot be read at a step is a ValueError starting ``--data: `` and naming the file;
* a feature cache folder (``cache.json``, written by ``python -m
  vljepa_fast.train.cache_features``): X-encoder tokens read row by row from memory-mapped
  safetensors shards (see :mod:`vljepa_fast.train.cache_features` for the layout). Every
  shard's header is checked against cache.json when the cache is opened: its cache id, first
  row and row count (so a swapped, copied or foreign shard is refused), tensor dtypes and shapes.

Texts stay texts when the model has the tokenizer for them; otherwise (the paper preset's
Llama / Gemma vocabularies without a tokenizer) the synthetic texts become deterministic
word-hash token ids (:func:`hash_ids`), and a folder of real captions is refused.

:func:`global_indices` says which dataset indices make up optimizer step ``step``'s global batch.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from vljepa_fast.eval.io import load_video
from vljepa_fast.train import synthetic
from vljepa_fast.train.presets import Preset

__all__ = [
    "Batch",
    "CACHE_VERSION",
    "CacheData",
    "FolderData",
    "SyntheticData",
    "global_indices",
    "hash_ids",
    "open_data",
]

SYNTHETIC_DEFAULT_N = 2**20
#: the largest synthetic:N (torch.randperm of an epoch holds N int64s: 16 GiB at 2**31)
SYNTHETIC_MAX_N = 2**31
#: 2: shards carry the cache id, first row and row count in their metadata
CACHE_VERSION = 2
#: the fields every cache.json holds (cache_features writes them)
CACHE_KEYS = ("version", "cache_id", "n", "N", "x_dim", "dtype", "shards", "ids", "pad",
              "source", "preset", "seed", "x_encoder")  # fmt: skip
#: cache.json's dtype -> (safetensors dtype code of x_features, torch dtype)
CACHE_DTYPES = {"float32": ("F32", torch.float32), "bfloat16": ("BF16", torch.bfloat16)}
CAPTIONS_FILE = "captions.jsonl"
Text = list[str] | tuple[Tensor, Tensor]


class Batch(NamedTuple):
    """One (micro-)batch of b samples.

    Attributes:
        video: [b, C, T, H, W] float32, or None when ``x_features`` is given.
        x_features: [b, N, x_dim] float32 cached X-encoder tokens, or None.
        query: b query texts, or (ids [b, L] int64, mask [b, L] bool).
        target: b target texts, or (ids [b, L] int64, mask [b, L] bool).
        indices: [b] int64 dataset indices.
    """

    video: Tensor | None
    x_features: Tensor | None
    query: Text
    target: Text
    indices: Tensor


# ------------------------------------------------------------------------------ indices


def _int(name: str, v: object, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v >= hi):
        want = f"an int >= {lo}" + ("" if hi is None else f" and < {hi}")
        raise ValueError(f"{name}: expected {want}, got {v!r}")
    return v


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def global_indices(n: int, shuffle: bool, seed: int, step: int, batch_size: int) -> list[int]:
    """The dataset indices of optimizer step ``step``'s global batch (0-based step).

    Epochs are drop-last: ``n // batch_size`` steps each. Epoch e's order is
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))`` when
    ``shuffle``, else ``range(n)``; step s takes positions ``[j * batch_size, (j + 1) *
    batch_size)`` of epoch ``s // steps_per_epoch``, j its step inside the epoch.

    Raises:
        ValueError: n < batch_size (naming both), or an argument out of range.
    """
    _int("n", n, 1)
    _int("batch_size", batch_size, 1)
    _int("seed", seed, 0, 2**32)
    _int("step", step, 0)
    if n < batch_size:
        raise ValueError(
            f"batch_size: {batch_size} is larger than the dataset ({n} samples); an epoch "
            "needs at least one full batch"
        )
    per_epoch = n // batch_size
    epoch, j = divmod(step, per_epoch)
    lo, hi = j * batch_size, (j + 1) * batch_size
    if not shuffle:
        return list(range(lo, hi))
    return _epoch_order(n, seed, epoch)[lo:hi].tolist()


# ------------------------------------------------------------------------------ token ids


def _token_spec(model, kind: str) -> tuple[int, int, int | None]:
    """(vocab, max_len, pad_id) of the predictor ("query") or the Y-encoder ("text")."""
    if kind == "query":
        pc = model.config.predictor
        return pc.vocab_size, pc.max_query_len, pc.pad_id
    inner = getattr(model.y_encoder, "cfg", model.config.y_encoder)
    vocab, max_len = model._token_spec["text"]  # what the model checks token tensors against
    if not isinstance(vocab, int) or not isinstance(max_len, int):
        raise ValueError(
            "--data: the model's Y-encoder has no known vocabulary; build the model with a "
            "text_tokenizer"
        )
    return vocab, max_len, getattr(inner, "pad_id", None)


def hash_ids(
    texts: Sequence[str], vocab: int, max_len: int, pad_id: int | None
) -> tuple[Tensor, Tensor]:
    """Deterministic stand-in token ids for ``texts`` when no tokenizer is at hand.

    One id per whitespace-separated word: the first 8 bytes of the word's sha256 modulo
    ``vocab - 1``, shifted past ``pad_id`` (so never the pad id, always in [0, vocab)); cut to
    ``max_len`` words. The same word has the same id in every text, so the captions share
    structure a model can learn.

    Returns:
        (ids [B, L] int64 right-padded with ``pad_id`` (0 when None), mask [B, L] bool True on
        real tokens), L the longest row.
    """
    pad = 0 if pad_id is None or not 0 <= pad_id < vocab else pad_id
    rows = []
    for t in texts:
        words = t.split() or [t]
        row = []
        for w in words[:max_len]:
            h = int.from_bytes(hashlib.sha256(w.encode("utf-8")).digest()[:8], "little")
            i = h % (vocab - 1)
            row.append(i + 1 if pad_id is not None and i >= pad_id else i)
        rows.append(row)
    return _pad_rows(rows, pad)


def _pad_rows(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[b, : len(r)] = True
    return ids, mask


class _Texts:
    """Texts as the model takes them: strings when it has the tokenizer, else hash ids."""

    def __init__(self, model, real_texts: bool) -> None:
        self.as_ids = {"query": model.query_tokenizer is None, "text": model.text_tokenizer is None}
        if real_texts and any(self.as_ids.values()):
            arg = "query_tokenizer" if self.as_ids["query"] else "text_tokenizer"
            raise ValueError(
                f"--data: the captions are texts, but the model has no {arg} (its vocabulary is "
                "not the byte one): build the model with the tokenizer of its weights"
            )
        self.spec = {k: _token_spec(model, k) for k, ids in self.as_ids.items() if ids}

    def __call__(self, texts: list[str], kind: str) -> Text:
        return hash_ids(texts, *self.spec[kind]) if self.as_ids[kind] else texts


# ------------------------------------------------------------------------------ kinds


def _indices(indices: Sequence[int], n: int) -> Tensor:
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError(f"indices: expected a non-empty sequence of ints, got {indices!r}")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"indices: expected ints in [0, {n}), got [{idx.min()}, {idx.max()}]")
    return idx


def _clip_shape(preset: Preset) -> tuple[int, int, int, int]:
    x = preset.model.x_encoder
    return (x.in_chans, preset.frames, preset.image_size, preset.image_size)


class SyntheticData:
    """``synthetic:N``: sample i is :func:`vljepa_fast.train.synthetic.sample` (seed, i) at the
    preset's clip shape; query ``preset.query``, target the class caption. Shuffled like
    every dataset (an epoch's batches mix differently each epoch), so that a feature cache of
    it (shuffled too) trains on the same batches."""

    kind, shuffle = "synthetic", True

    def __init__(self, n: int, preset: Preset, model, seed: int) -> None:
        self.n, self.preset = _int("n", n, 1, SYNTHETIC_MAX_N + 1), preset
        self.seed = _int("seed", seed, 0, 2**32)
        c, self.frames, self.size, _ = _clip_shape(preset)
        if c != 3:
            raise ValueError(f"--data: synthetic clips are RGB; the preset's X-encoder takes {c}")
        synthetic.geometry(self.size, self.frames)
        self.texts = _Texts(model, real_texts=False)

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: Sequence[int]) -> Batch:
        """Batch of ``indices``: video [b, 3, frames, S, S] float32, query / target texts (or
        ids); every row depends on its own index only."""
        idx = _indices(indices, self.n)
        clips, labels = zip(*(synthetic.sample(self.seed, i, self.size, self.frames)
                              for i in idx.tolist()))  # fmt: skip
        video = torch.from_numpy(np.stack(clips))
        query = self.texts([self.preset.query] * len(labels), "query")
        target = self.texts([synthetic.CAPTIONS[c] for c in labels], "text")
        return Batch(video, None, query, target, idx)

    def describe(self) -> dict:
        """kind, path (None), n, seed, clip [C, T, H, W]."""
        return {"kind": self.kind, "path": None, "n": self.n, "seed": self.seed,
                "clip": list(_clip_shape(self.preset))}  # fmt: skip


class FolderData:
    """A folder of clips and ``captions.jsonl`` (module docstring); clips read on demand."""

    kind, shuffle = "folder", True

    def __init__(self, root: Path, preset: Preset, model, seed: int) -> None:
        self.root, self.preset, self.seed = root.resolve(), preset, _int("seed", seed, 0, 2**32)
        self.shape = _clip_shape(preset)
        self.records = _read_captions(self.root / CAPTIONS_FILE, self.root)
        self.texts = _Texts(model, real_texts=True)

    def __len__(self) -> int:
        return len(self.records)

    def _clip(self, i: int) -> Tensor:
        path = self.root / self.records[i]["video"]
        try:
            x = load_video(path)
        except MemoryError:
            raise
        except Exception as e:  # the file changed since open_data: one --data line, not a trace
            msg = str(e).removeprefix("--data: ")
            if not isinstance(e, ValueError):
                msg = f"{path}: cannot be read ({type(e).__name__}: {_first_line(e)})"
            elif str(path) not in msg:
                msg = f"{path}: {msg}"
            raise ValueError(f"--data: {msg}") from None
        if tuple(x.shape) != self.shape:
            raise ValueError(
                f"--data: {path}: clip shape {tuple(x.shape)} [C, T, H, W], the preset "
                f"{self.preset.name!r} expects {self.shape}"
            )
        return x

    def batch(self, indices: Sequence[int]) -> Batch:
        """Batch of ``indices``: video [b, 3, frames, S, S] float32, texts as the model takes."""
        idx = _indices(indices, len(self))
        recs = [self.records[i] for i in idx.tolist()]
        video = torch.stack([self._clip(i) for i in idx.tolist()])
        query = self.texts([r.get("query", self.preset.query) for r in recs], "query")
        target = self.texts([r["caption"] for r in recs], "text")
        return Batch(video, None, query, target, idx)

    def describe(self) -> dict:
        """kind, path (resolved), n, seed, fingerprint (sha256 of captions.jsonl)."""
        digest = hashlib.sha256((self.root / CAPTIONS_FILE).read_bytes()).hexdigest()
        return {"kind": self.kind, "path": str(self.root), "n": len(self), "seed": self.seed,
                "fingerprint": digest}  # fmt: skip


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _inside(name: str) -> bool:
    """Whether ``name`` is a relative path that stays inside its folder (no absolute path, no
    ``..`` part, not the folder itself). Checked on the text: a symlink inside the folder is
    the folder owner's choice and is followed."""
    parts = [q for q in Path(name).parts if q != "."]
    return not Path(name).is_absolute() and bool(parts) and ".." not in parts


def _read_captions(path: Path, root: Path) -> list[dict]:
    """captions.jsonl -> [{"video", "caption"[, "query"]}]; each video must exist inside root."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--data: {path}: cannot be read as UTF-8 text ({e})") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--data: {path}: line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        extra = sorted(set(obj) - {"video", "caption", "query"})
        if extra:
            raise ValueError(f"{where}: unknown field(s) {extra} (known: video, caption, query)")
        for field in ("video", "caption") + (("query",) if "query" in obj else ()):
            v = obj.get(field)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(
                    f"{where}: field {field!r}: expected a non-empty string, got {v!r}"
                )
        if not _inside(obj["video"]):
            raise ValueError(
                f"{where}: video {obj['video']!r}: expected a path relative to {root} that stays "
                "inside it (no absolute path, no '..')"
            )
        if not (root / obj["video"]).exists():
            raise ValueError(f"{where}: video {obj['video']!r}: no such file or folder in {root}")
        records.append(obj)
    if not records:
        raise ValueError(f"--data: {path}: no records")
    return records


def _check_cache_json(meta: object, where: str) -> dict:
    """The structure of a cache.json (values that the preset or model decide are checked by
    :class:`CacheData`)."""
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        got = meta.get("version") if isinstance(meta, dict) else None
        raise ValueError(
            f"{where}: not a version {CACHE_VERSION} feature cache (cache.json version {got!r}); "
            "write it again with python -m vljepa_fast.train.cache_features"
        )
    missing = sorted(set(CACHE_KEYS) - set(meta))
    if missing:
        raise ValueError(f"{where}: cache.json lacks {missing}")

    def bad(key: str, want: str) -> ValueError:
        return ValueError(f"{where}: cache.json {key}: expected {want}, got {meta[key]!r}")

    if not isinstance(meta["cache_id"], str) or not re.fullmatch(r"[0-9a-f]{32}", meta["cache_id"]):
        raise bad("cache_id", "32 hex digits (a uuid4)")
    for key in ("n", "N", "x_dim"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 1:
            raise bad(key, "an int >= 1")
    if meta["dtype"] not in CACHE_DTYPES:
        raise bad("dtype", f"one of {sorted(CACHE_DTYPES)}")
    ids = meta["ids"]
    if not isinstance(ids, dict) or set(ids) != {"query", "target"}:
        raise bad("ids", "{'query': bool, 'target': bool}")
    if not all(isinstance(v, bool) for v in ids.values()):
        raise bad("ids", "{'query': bool, 'target': bool}")
    pad = meta["pad"]
    want_pad = {k for k, v in ids.items() if v}
    if not isinstance(pad, dict) or set(pad) != want_pad:
        raise bad("pad", f"a pad id for each ids kind {sorted(want_pad)}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in pad.values()):
        raise bad("pad", "ints >= 0")
    shards = meta["shards"]
    if not isinstance(shards, list) or not shards:
        raise bad("shards", "a non-empty list of {'file', 'rows'}")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or set(s) != {"file", "rows"}:
            raise ValueError(f"{where}: cache.json shards[{i}]: expected {{'file', 'rows'}}, "
                             f"got {s!r}")  # fmt: skip
        f, rows = s["file"], s["rows"]
        if not isinstance(f, str) or not f or f in (".", "..") or Path(f).name != f or "\\" in f:
            raise ValueError(
                f"{where}: cache.json shards[{i}].file: expected a plain file name inside the "
                f"cache folder, got {f!r}"
            )
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(
                f"{where}: cache.json shards[{i}].rows: expected an int >= 1, got {rows!r}"
            )
    files = [s["file"] for s in shards]
    if len(set(files)) != len(files):
        raise ValueError(f"{where}: cache.json names a shard file twice: {files}")
    return meta


class CacheData:
    """A feature cache: x_features rows from memory-mapped safetensors shards, with the texts
    (or token ids) of the data it was made from. ``x_encoder_fingerprint`` is the
    fingerprint (:func:`~vljepa_fast.train.cache_features.x_encoder_fingerprint`) of the
    X-encoder that wrote it. Every shard is opened, and its header checked against cache.json
    (cache id, first row, rows, tensor names, dtypes and shapes), when the cache is."""

    kind, shuffle = "cache", True

    def __init__(self, root: Path, preset: Preset, model, seed: int) -> None:
        self.root, self.seed = root.resolve(), _int("seed", seed, 0, 2**32)
        where = f"--data: {self.root}"
        try:
            raw = (self.root / "cache.json").read_bytes()
            meta = json.loads(raw)
        except OSError as e:
            raise ValueError(f"{where}: cache.json cannot be read ({e})") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{where}: cache.json is not valid JSON ({e})") from None
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        self.meta = meta = _check_cache_json(meta, where)
        want = {"N": preset.visual_tokens, "x_dim": preset.model.x_encoder.dim}
        for key, v in want.items():
            if meta.get(key) != v:
                raise ValueError(
                    f"{where}: cached features have {key} = {meta.get(key)}, the preset "
                    f"{preset.name!r} model takes {v} (tokens per clip N, width x_dim)"
                )
        self.x_encoder_fingerprint = meta["x_encoder"]
        if model.x_encoder is not None:  # the trainer may drop it; then it compares itself
            from vljepa_fast.train.cache_features import x_encoder_fingerprint

            if x_encoder_fingerprint(model.x_encoder) != self.x_encoder_fingerprint:
                raise ValueError(
                    f"{where}: the features were written by another X-encoder (weights "
                    "fingerprint differs): rebuild the cache with this model's seed / checkpoint"
                )
        self.shards, self.starts, self.rows, total = [], [], [], 0
        for s in meta["shards"]:
            path = self.root / s["file"]
            if not path.is_file():
                raise ValueError(f"{where}: shard {s['file']} is missing")
            self.shards.append(path)
            self.starts.append(total)
            self.rows.append(s["rows"])
            total += s["rows"]
        if total != meta["n"]:
            raise ValueError(f"{where}: shards hold {total} rows, cache.json says {meta['n']}")
        self.n, self.ids = total, meta["ids"]  # {"query": bool, "target": bool}
        tokenizers = {"query": model.query_tokenizer, "target": model.text_tokenizer}
        for key, is_ids in self.ids.items():
            if not is_ids and tokenizers[key] is None:
                arg = "query_tokenizer" if key == "query" else "text_tokenizer"
                raise ValueError(
                    f"{where}: the cached {key} are texts, but the model has no {arg}: build "
                    "the model with the tokenizer of its weights"
                )
        self._open: dict[int, object] = {}
        self._texts: dict[int, dict] = {}
        for k in range(len(self.shards)):  # headers only: a bad shard is refused up front
            self._shard(k)

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        # open shard handles do not pickle (DataLoader workers): each process reopens its own
        return {**self.__dict__, "_open": {}, "_texts": {}}

    def _shard(self, k: int):
        """Shard k's open handle; opened (and its header checked) the first time."""
        if k not in self._open:
            from safetensors import safe_open

            path = self.shards[k]
            try:
                f = safe_open(str(path), framework="pt")
                header = f.metadata() or {}
                tensors = {
                    key: (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape())
                    for key in f.keys()
                }
            except Exception as e:  # SafetensorError (truncated, not safetensors), OSError
                raise ValueError(
                    f"--data: shard {path}: cannot be read ({type(e).__name__}: {_first_line(e)})"
                ) from None
            self._texts[k] = self._check_shard(k, header, tensors)
            self._open[k] = f
        return self._open[k]

    def _check_shard(self, k: int, header: dict, tensors: dict) -> dict:
        """Shard k's header against cache.json; returns its texts {kind: [rows strings]}."""
        path, meta, rows, start = self.shards[k], self.meta, self.rows[k], self.starts[k]
        where = f"--data: shard {path}"
        if header.get("cache_id") != meta["cache_id"]:
            raise ValueError(
                f"{where}: belongs to another cache (cache id {header.get('cache_id')!r}, "
                f"cache.json's {meta['cache_id']!r}): the folder mixes files of two caches"
            )
        got = (header.get("first_row"), header.get("rows"))
        if got != (str(start), str(rows)):
            raise ValueError(
                f"{where}: holds rows from {got[0]} ({got[1]} rows), cache.json puts it at rows "
                f"from {start} ({rows} rows): shards swapped or copied over one another"
            )
        want = {"x_features": (CACHE_DTYPES[meta["dtype"]][0], [rows, meta["N"], meta["x_dim"]])}
        for key, is_ids in self.ids.items():
            if is_ids:
                shape = tensors.get(f"{key}_ids", (None, []))[1]
                L = shape[1] if len(shape) == 2 else "L"  # any width, the same for the mask
                want[f"{key}_ids"] = ("I64", [rows, L])
                want[f"{key}_mask"] = ("BOOL", [rows, L])
        if set(tensors) != set(want):
            raise ValueError(f"{where}: holds tensors {sorted(tensors)}, expected {sorted(want)}")
        for key, (dtype, shape) in want.items():
            if tensors[key] != (dtype, shape):
                raise ValueError(
                    f"{where}: {key} is {tensors[key][0]} {tensors[key][1]}, cache.json says "
                    f"{dtype} {shape} (dtype {meta['dtype']})"
                )
        texts = {}
        for key, is_ids in self.ids.items():
            if is_ids:
                continue
            try:
                texts[key] = json.loads(header.get(key, "null"))
            except ValueError:
                texts[key] = None
            if not isinstance(texts[key], list) or len(texts[key]) != rows:
                raise ValueError(f"{where}: metadata {key!r}: expected a JSON list of {rows} texts")
            if not all(isinstance(t, str) for t in texts[key]):
                raise ValueError(f"{where}: metadata {key!r}: expected texts (strings)")
        return texts

    def _rows(self, index: int) -> tuple[int, int]:
        k = bisect.bisect_right(self.starts, index) - 1
        return k, index - self.starts[k]

    def batch(self, indices: Sequence[int]) -> Batch:
        """Batch of ``indices``: x_features [b, N, x_dim] float32 (read row by row, only those
        rows), query / target as the source data gave them (ids re-padded to the batch)."""
        idx = _indices(indices, self.n)
        feats, texts = [], {"query": [], "target": []}
        for i in idx.tolist():
            k, r = self._rows(i)
            f = self._shard(k)
            try:
                feats.append(f.get_slice("x_features")[r : r + 1])
                for key in texts:
                    if self.ids[key]:
                        ids, mask = (f.get_slice(f"{key}_{t}")[r : r + 1][0]
                                     for t in ("ids", "mask"))  # fmt: skip
                        texts[key].append(ids[mask].tolist())
                    else:
                        texts[key].append(self._texts[k][key][r])
            except Exception as e:  # the file changed under the open handle
                raise ValueError(
                    f"--data: shard {self.shards[k]}: row {r} cannot be read "
                    f"({type(e).__name__}: {_first_line(e)})"
                ) from None
        x = torch.cat(feats).float()
        q, t = (
            _pad_rows(texts[key], self.meta["pad"][key]) if self.ids[key] else texts[key]
            for key in ("query", "target")
        )
        return Batch(None, x, q, t, idx)

    def describe(self) -> dict:
        """kind, path, n, seed, fingerprint (sha256 of cache.json), x_encoder_fingerprint (of
        the X-encoder that wrote it) and source (the cached data's describe())."""
        return {"kind": self.kind, "path": str(self.root), "n": self.n, "seed": self.seed,
                "fingerprint": self.fingerprint, "source": self.meta["source"],
                "x_encoder_fingerprint": self.x_encoder_fingerprint}  # fmt: skip


def open_data(
    spec: str, preset: Preset, model, *, seed: int
) -> SyntheticData | FolderData | CacheData:
    """The training data of a ``--data`` spec (module docstring) for ``preset`` and ``model``
    (a :class:`~vljepa_fast.models.VLJEPA`: its tokenizers decide texts or ids).

    Raises:
        ValueError: naming ``--data``: an unknown spec, ``synthetic:N`` with N outside
            [1, 2**31], a folder without captions.jsonl or cache.json, a bad captions line, a
            cache that does not fit the preset or model, a shard that is not cache.json's.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--data: expected 'synthetic', 'synthetic:N' or a folder, got {spec!r}")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = SYNTHETIC_DEFAULT_N
        if spec != "synthetic":
            text = spec.split(":", 1)[1]
            # ASCII digits only (str.isdigit takes '²'), and bounded before int() (a huge N
            # would fail inside torch.randperm, a huge text inside int())
            if not re.fullmatch(r"[0-9]{1,12}", text) or not 1 <= int(text) <= SYNTHETIC_MAX_N:
                raise ValueError(
                    f"--data: expected synthetic:N with an int N in [1, 2**31 = "
                    f"{SYNTHETIC_MAX_N}], got {spec!r}"
                )
            n = int(text)
        return SyntheticData(n, preset, model, seed)
    root = Path(spec)
    if not root.is_dir():
        raise ValueError(
            f"--data: {spec!r} is neither 'synthetic', 'synthetic:N' nor an existing folder"
        )
    if (root / "cache.json").is_file() and (root / CAPTIONS_FILE).is_file():
        raise ValueError(
            f"--data: {root} holds both cache.json (a feature cache) and {CAPTIONS_FILE} (a "
            "folder of clips): which one is meant is not clear; keep them in separate folders"
        )
    if (root / "cache.json").is_file():
        return CacheData(root, preset, model, seed)
    if (root / CAPTIONS_FILE).is_file():
        return FolderData(root, preset, model, seed)
    raise ValueError(
        f"--data: {root} has neither {CAPTIONS_FILE} (a folder of clips) nor cache.json (a "
        "feature cache; a cache whose cache.json is missing was never finished)"
    )
