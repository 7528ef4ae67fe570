"""Local checkpoint files -> state dicts (no hub access): the one reader of weight files.

:func:`read_state_dict` reads what a user downloaded: a ``.safetensors`` file, a torch file
(``.pt``, ``.pth``, ``.bin``, ``.ckpt``, read with ``weights_only=True``), a transformers folder
(``model.safetensors``, ``pytorch_model.bin`` or their sharded ``*.index.json``) or Meta's
folder (``consolidated.00.pth``). It returns the mapping as saved; the module loaders
(:func:`~vljepa_fast.models.load_vjepa2_state_dict`,
:func:`~vljepa_fast.models.load_llama_layers`,
:func:`~vljepa_fast.models.load_gemma3_state_dict`) detect the key layout and unwrap. It imports
no model module, so every loader (the Y-encoder's folder loader, :mod:`.pretrained`) uses it.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["as_path", "read_json", "read_state_dict"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
#: the files a checkpoint folder is searched for, in this order (transformers' preference)
FOLDER_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_EXPECTED = (
    "a .safetensors file, a torch file (" + ", ".join(TORCH_SUFFIXES) + ") or a folder holding "
    + ", ".join(FOLDER_FILES) + " or consolidated.00.pth (Meta)"
)  # fmt: skip


def _names(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- reading files


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError (header), OSError: one message naming the file
        raise ValueError(
            f"{path}: not a valid safetensors file (corrupted or truncated header or data?): {e}"
        ) from None


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        detail = text.partition("WeightsUnpickler error:")[2].partition("Check the documentation")
        detail = " ".join(detail[0].split())
        if "Weights only load failed" in text and "Unsupported global" in detail:
            raise ValueError(
                f"{path}: holds Python objects beyond tensors and containers, which "
                f"torch.load(weights_only=True) refuses ({detail[:200]}). Loading it needs "
                "weights_only=False, which can run arbitrary code: not done here. In a trusted "
                "environment, re-save its tensors (torch.save(state_dict) or safetensors) and "
                "pass that file"
            ) from None
        raise ValueError(
            f"{path}: not a readable torch checkpoint (corrupted, or not a torch file?): "
            f"torch.load(weights_only=True): {(detail or text)[:200]}"
        ) from None
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(
            f"{path}: not a readable torch checkpoint (corrupted or truncated?): "
            f"{type(e).__name__}: {first}"
        ) from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        got = type(obj).__name__ if not isinstance(obj, Mapping) else "a mapping with non-str keys"
        raise ValueError(
            f"{path}: expected a state dict (a mapping of str names to tensors, or a training "
            f"checkpoint's dict of them), got {got}"
        )
    return dict(obj)


def _read_file(path: Path) -> dict[str, Tensor]:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise ValueError(f"{path}: not a checkpoint file by its name; expected {_EXPECTED}")


def read_json(path: Path) -> object:
    """A JSON file's content; ValueError naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def _read_sharded(index: Path) -> dict[str, Tensor]:
    """A transformers sharded checkpoint: every shard its index names, checked against the
    index's weight_map (keys listed there and not found, found and not listed, found in
    another shard than the one listed, found twice)."""
    meta = read_json(index)
    weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(
            f"{index}: expected a JSON object with a 'weight_map' of tensor names to shard files"
        )
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if Path(s).name != s or s in ("", ".", "..")]
    if bad:
        raise ValueError(f"{index}: shard names must be plain file names, got {_names(bad)}")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise ValueError(f"{index}: shard files missing from {index.parent}: {_names(missing)}")
    reader = _read_safetensors if index.name.startswith("model.safetensors") else _read_torch
    out: dict[str, Tensor] = {}
    where: dict[str, str] = {}
    for shard in shards:
        for key, value in reader(index.parent / shard).items():
            if key in out:
                raise ValueError(f"{index}: {key!r} is in two shards, {where[key]} and {shard}")
            out[key], where[key] = value, shard
    problems = []
    not_found = sorted(set(weight_map) - set(out))
    if not_found:
        problems.append(f"in the weight_map but in no shard: {_names(not_found)}")
    unlisted = sorted(set(out) - set(weight_map))
    if unlisted:
        problems.append(f"in a shard but not in the weight_map: {_names(unlisted)}")
    moved = sorted(
        f"{k} (listed in {weight_map[k]}, found in {where[k]})"
        for k in out
        if k in weight_map and weight_map[k] != where[k]
    )
    if moved:
        problems.append(f"in another shard than listed: {_names(moved)}")
    if problems:
        raise ValueError(f"{index}: the shards do not match the index; " + "; ".join(problems))
    return out


def _read_folder(folder: Path) -> dict[str, Tensor]:
    for name in FOLDER_FILES:
        f = folder / name
        if f.is_file():
            return _read_sharded(f) if name.endswith(".index.json") else _read_file(f)
    meta = sorted(folder.glob("consolidated.*.pth"))
    if len(meta) == 1:
        return _read_torch(meta[0])
    if len(meta) > 1:
        raise ValueError(
            f"{folder}: {len(meta)} model-parallel consolidated.*.pth shards "
            f"({_names([m.name for m in meta], 4)}); merging Meta's model-parallel shards is not "
            "implemented (Llama-3.2-1B ships one, consolidated.00.pth): convert the checkpoint "
            "with transformers' convert_llama_weights_to_hf.py and pass its folder"
        )
    present = sorted(p.name for p in folder.iterdir())
    hint = ""
    if (folder / "original" / "consolidated.00.pth").is_file():
        hint = f" (Meta's file is in {folder / 'original'}: pass that folder)"
    raise ValueError(
        f"{folder}: no checkpoint in the folder; expected one of {', '.join(FOLDER_FILES)} or "
        f"consolidated.00.pth (Meta){hint}; found: {_names(present, 10) or '(empty)'}"
    )


def as_path(path: object, name: str) -> Path:
    """``path`` as a Path; ValueError naming ``name`` when it is not a str or PathLike."""
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"{name}: expected a local file or folder path, got {type(path).__name__}")
    return Path(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a local checkpoint (no hub access) into CPU tensors.

    Accepted:

    * a ``.safetensors`` file;
    * a torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), read with
      ``torch.load(weights_only=True, map_location="cpu")``: tensors and plain containers
      only, never arbitrary pickled objects;
    * a folder holding, searched in this order, ``model.safetensors``,
      ``model.safetensors.index.json`` (sharded), ``pytorch_model.bin``,
      ``pytorch_model.bin.index.json`` (sharded), or Meta's single ``consolidated.00.pth``
      (any ``consolidated.*.pth``). A sharded checkpoint reads every shard its index names;
      the index's ``weight_map`` must list exactly the keys found, each in its shard.

    Nothing is unwrapped or renamed: a training checkpoint (e.g. V-JEPA 2's ``{"encoder":
    {...}, "target_encoder": {...}, "epoch": ...}``) comes back as saved, and the loaders
    detect the layout.

    Returns:
        the mapping of names to tensors (as saved; values may be nested mappings).

    Raises:
        ValueError naming the path: not found; not a checkpoint (name or content); a corrupted
            safetensors file; a torch file that needs ``weights_only=False`` (refused: it could
            run code) or that is not a state dict; a sharded index whose shard files are missing
            (named) or whose ``weight_map`` disagrees with the shards (keys named); several
            model-parallel ``consolidated.*.pth`` shards (merging is not implemented).
    """
    p = as_path(path, "path")
    if not p.exists():
        raise ValueError(f"{p}: not found; expected {_EXPECTED}")
    return _read_folder(p) if p.is_dir() else _read_file(p)
