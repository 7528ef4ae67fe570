"""Cache the frozen X-encoder's features of a dataset, so that training skips the X-encoder.

    python -m vljepa_fast.train.cache_features --preset tiny --data synthetic:4096 --out cache/
    python -m vljepa_fast.train --preset tiny --data cache/ ...

The model is built by :func:`~vljepa_fast.train.model.build_model` from the same preset, seed
and ``--x-encoder`` checkpoint as training; ``model.encode_video`` runs (no autograd) over the
samples in index order. The cache folder holds:

* ``shard-00000.safetensors``, ...: ``x_features`` [rows, N, x_dim] (float32 or bfloat16);
  where the data are token ids, ``query_ids`` / ``target_ids`` [rows, L] int64 and
  ``query_mask`` / ``target_mask`` [rows, L] bool (L the shard's longest row); where they are
  texts, the safetensors metadata ``query`` / ``target``: JSON lists of the rows' strings. The
  metadata also holds ``cache_id`` (cache.json's), ``first_row`` and ``rows`` (decimal
  strings), so that a reader can tell a shard swapped, copied or brought from another cache;
* ``cache.json``, written last (a temporary name, then ``os.replace``: a folder without it is
  an unfinished cache and is never read): version (2), cache_id (a random uuid4, hex), n, N,
  x_dim, dtype, shards (file, rows), ids (per text kind: ids or texts), pad (the pad id of each
  ids kind), source (the data's ``describe()``), preset, seed, x_encoder
  (:func:`x_encoder_fingerprint`), x_encoder_path, backend.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import uuid
from pathlib import Path

import torch
from torch import nn

from vljepa_fast import _backends
from vljepa_fast.train.data import (
    CACHE_DTYPES,
    CACHE_VERSION,
    _pad_rows,
    _token_spec,
    open_data,
)
from vljepa_fast.train.model import build_model
from vljepa_fast.train.presets import PRESETS, preset

__all__ = ["main", "write_cache", "x_encoder_fingerprint"]

SHARD = "shard-{:05d}.safetensors"
DTYPES = {name: dtype for name, (_, dtype) in CACHE_DTYPES.items()}


def x_encoder_fingerprint(module: nn.Module) -> str:
    """sha256 (hex) of ``module.state_dict()``: per key, in sorted key order, the key, the
    shape and the values (floating tensors as float32 bytes, others as their own bytes; on any
    device). Equal weights give equal fingerprints whatever the device or floating dtype they
    were upcast from."""
    h = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        t = state[key].detach()
        t = (t.float() if t.is_floating_point() else t).cpu().contiguous().reshape(-1)
        h.update(f"{key}:{tuple(state[key].shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_shard(
    path: Path, feats: list, texts: dict, ids: dict, pads: dict, cache_id: str, first_row: int
) -> None:
    from safetensors.torch import save_file

    tensors = {"x_features": torch.cat(feats).contiguous()}
    n_rows = tensors["x_features"].shape[0]
    meta = {"cache_id": cache_id, "first_row": str(first_row), "rows": str(n_rows)}
    for key, rows in texts.items():
        if ids[key]:
            tensors[f"{key}_ids"], tensors[f"{key}_mask"] = _pad_rows(rows, pads[key])
        else:
            meta[key] = json.dumps(rows)
    save_file(tensors, str(path), metadata=meta)
    # safetensors creates the file 0600; a cache is shared like its cache.json (umask applies)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _rows(text, key: str, ids: dict) -> list:
    """A batch's texts -> list of strings, or of unpadded id lists."""
    is_ids = isinstance(text, tuple)
    if ids.setdefault(key, is_ids) != is_ids:
        raise ValueError(f"--data: the {key} switched between texts and ids")
    if is_ids:
        return [row[m].tolist() for row, m in zip(*text)]
    return list(text)


@torch.no_grad()
def write_cache(
    data, model, out: Path, *, batch_size: int, shard_size: int, dtype: torch.dtype,
    device: torch.device, info: dict,
) -> dict:  # fmt: skip
    """Encode every sample of ``data`` (index order) with ``model.encode_video`` and write the
    shards, then cache.json (its dict returned; ``info`` adds preset, seed, paths...)."""
    model.eval()
    n, shards, ids, N, x_dim = len(data), [], {}, None, None
    cache_id = uuid.uuid4().hex  # ties the shards to this cache.json
    pads = {}
    if model.query_tokenizer is None:
        pads["query"] = _token_spec(model, "query")[2] or 0
    if model.text_tokenizer is None:
        pads["target"] = _token_spec(model, "text")[2] or 0
    for k, lo in enumerate(range(0, n, shard_size)):
        hi = min(n, lo + shard_size)
        feats, texts = [], {"query": [], "target": []}
        for a in range(lo, hi, batch_size):
            b = data.batch(range(a, min(hi, a + batch_size)))
            x = model.encode_video(b.video.to(device))
            N, x_dim = x.shape[1], x.shape[2]
            feats.append(x.to(dtype).cpu())
            texts["query"] += _rows(b.query, "query", ids)
            texts["target"] += _rows(b.target, "target", ids)
        _save_shard(out / SHARD.format(k), feats, texts, ids, pads, cache_id, lo)
        shards.append({"file": SHARD.format(k), "rows": hi - lo})
        print(f"cache_features: shard {k}: rows {lo}..{hi - 1} of {n}", file=sys.stderr)
    meta = {
        "version": CACHE_VERSION, "cache_id": cache_id, "n": n, "N": N, "x_dim": x_dim,
        "dtype": str(dtype).removeprefix("torch."), "shards": shards, "ids": ids,
        "pad": {k: v for k, v in pads.items() if ids.get(k)}, "source": data.describe(),
        "x_encoder": x_encoder_fingerprint(model.x_encoder), **info,
    }  # fmt: skip
    tmp = out / "cache.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, out / "cache.json")
    return meta


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return v


def _device(text: str) -> torch.device:
    """--device: auto (cuda when torch sees one, else cpu), cpu, cuda or cuda:i."""
    try:
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if text == "auto" else text
        )
    except RuntimeError as e:
        raise ValueError(
            f"--device: expected auto, cpu, cuda or cuda:i, got {text!r} ({e})"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:i, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device: cuda asked for, but torch sees no CUDA device")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device: {text} asked for, but torch sees {count} CUDA device(s)")
    return dev


def _check_args(args: argparse.Namespace) -> None:
    """The flags argparse cannot check: ValueError naming the flag."""
    for flag, v in (("--data", args.data), ("--out", args.out), ("--x-encoder", args.x_encoder)):
        if v is not None and not v.strip():
            raise ValueError(f"{flag}: expected a path, got {v!r}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed: expected an int in [0, 2**32), got {args.seed}")
    if args.data == "synthetic":
        raise ValueError("--data: give synthetic:N, the number of clips to cache")


def main(argv: list[str] | None = None) -> dict:
    """The CLI (module docstring); returns the cache.json written (a dict)."""
    ap = argparse.ArgumentParser(prog="python -m vljepa_fast.train.cache_features",
                                 description=__doc__.split("\n")[0])  # fmt: skip
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--data", required=True, help="synthetic:N or a folder with captions.jsonl")
    ap.add_argument("--out", required=True, help="the cache folder (created)")
    ap.add_argument("--seed", type=int, default=0, help="model and synthetic-data seed")
    ap.add_argument("--batch-size", type=_positive, default=64)
    ap.add_argument("--shard-size", type=_positive, default=4096, help="rows per shard file")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--x-encoder", default=None, help="X-encoder checkpoint (as for training)")
    ap.add_argument("--backend", default="auto", help="auto, a backend, or op=name pairs")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda:0")
    ap.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    ap.add_argument("--overwrite", action="store_true", help="replace a cache in --out")
    args = ap.parse_args(argv)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    if Path(args.data).is_dir() and out.resolve() == Path(args.data).resolve():
        raise ValueError("--out: the cache cannot go into the --data folder itself")
    if (out / "cache.json").exists() and not args.overwrite:
        raise ValueError(f"--out: {out} already holds a feature cache; pass --overwrite")
    if (out / "captions.jsonl").exists():  # a cache there would hide the clips from --data
        raise ValueError(f"--out: {out} holds a folder dataset (captions.jsonl): pick another")
    device = _device(args.device)
    p = preset(args.preset)
    try:
        backend = _backends.parse_spec(args.backend, "--backend")
        model = build_model(p, args.seed, backend, x_encoder=args.x_encoder)
    except ValueError as e:  # load_pretrained names its argument, x_encoder: the flag's name
        raise ValueError(re.sub(r"^x_encoder(?=[ :])", "--x-encoder", str(e))) from None
    model.to(device)
    data = open_data(args.data, p, model, seed=args.seed)
    if data.kind == "cache":
        raise ValueError(f"--data: {args.data} is already a feature cache")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot create {out}: {e.strerror or e}") from None
    (out / "cache.json").unlink(missing_ok=True)  # from here on the folder is unfinished
    for old in out.glob("shard-*.safetensors"):
        old.unlink()
    x_path = None if args.x_encoder is None else str(Path(args.x_encoder).resolve())
    info = {"preset": p.name, "seed": args.seed, "backend": args.backend, "x_encoder_path": x_path}
    return write_cache(
        data, model, out, batch_size=args.batch_size, shard_size=args.shard_size,
        dtype=DTYPES[args.dtype], device=device, info=info,
    )  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a refused argument: one line naming it, as argparse's exit 2
        print(f"python -m vljepa_fast.train.cache_features: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
