"""Checkpoints that a killed run can never leave half-loaded.

Layout under ``OUT/checkpoint/``::

    step-00000010/          one complete checkpoint
        .metadata, *.distcp   torch.distributed.checkpoint: model (trainable parameters and
                              buffers; the frozen X-encoder is rebuilt from its seed or file),
                              optimizer
        rng-<rank>.pt         each rank's torch (and CUDA) random state
        trainer.json          step, settings, data identity, scheduler: written last
    step-00000010.partial/  a save in progress (or killed): never read, removed by the next save
    latest                  the name of the newest complete checkpoint

A save goes to ``step-N.partial``; when every rank has written its part, rank 0 writes
``trainer.json`` (fsync), renames the folder to ``step-N`` and replaces ``latest`` (write to a
temporary file, fsync, ``os.replace``): a SIGKILL at any point leaves either the previous
complete checkpoint or the new one, never a mix. Loading takes ``latest`` when it names a folder
with a ``trainer.json``, else the newest such folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from vljepa_fast.train.distributed import Dist

__all__ = ["latest", "load", "model_state_dict", "read_state", "save"]

_STEP = re.compile(r"^step-(\d{8})$")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
#: test hook: "kill-in-save:N" SIGKILLs rank 0 in the save of step N after the tensors are
#: written and before the commit (tests/test_train_resume.py: a half-written checkpoint)
FAULT_ENV = "VLJEPA_FAST_TRAIN_FAULT"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save and load that it assumes one process: that is
    what ``no_dist`` asks for, so the warning says nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _complete(folder: Path) -> bool:
    return (folder / "trainer.json").is_file() and (folder / ".metadata").is_file()


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``OUT/checkpoint``), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    named = root / "latest"
    if named.is_file():  # a damaged or stale name falls back to the scan below
        name = named.read_bytes().decode("ascii", "replace").strip()
        if _STEP.match(name) and _complete(root / name):  # a bare name: never outside root
            return root / name
    steps = sorted(p for p in root.iterdir() if _STEP.match(p.name) and _complete(p))
    return steps[-1] if steps else None


def save(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    d: Dist,
    keep: int,
) -> Path:
    """Save after optimizer step ``step`` (collective: every rank calls it).

    ``state`` (JSON-able: settings, data identity, scheduler) goes to trainer.json. Returns the
    complete folder.
    """
    root = Path(root)
    name = f"step-{step:08d}"
    partial, final = root / f"{name}.partial", root / name
    if d.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a re-run of the same step (after a resume from an older one)
            shutil.rmtree(final)
        partial.mkdir()
    d.barrier()
    msd, osd = get_state_dict(model, optimizer, options=_OPTIONS)
    with _single_process_quiet():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(partial), no_dist=d.group is None)
    rng = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(d.device)
    torch.save(rng, partial / f"rng-{d.rank}.pt")
    d.barrier()
    if d.main:
        if os.environ.get(FAULT_ENV) == f"kill-in-save:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        _fsync_write(partial / "trainer.json", json.dumps({**state, "step": step}, indent=1))
        os.rename(partial, final)
        _fsync_write(root / "latest", name)
        done = sorted(p for p in root.iterdir() if _STEP.match(p.name) and _complete(p))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def _damaged(folder: Path, what: str) -> ValueError:
    return ValueError(
        f"--resume: the checkpoint {folder} is damaged ({what}); move it away to resume from "
        "the one before it"
    )


def read_state(folder: Path) -> dict:
    """``folder``'s trainer.json, checked (ValueError naming the file when it is not what
    :func:`save` writes)."""
    path = folder / "trainer.json"
    try:
        state = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise _damaged(folder, f"{path.name}: {e}") from None
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("settings"), dict)
        and isinstance(state.get("scheduler"), dict)
        and "data" in state
        and isinstance(state.get("step"), int)
        and not isinstance(state.get("step"), bool)
        and state["step"] >= 1
        and f"step-{state['step']:08d}" == folder.name
    )
    if not ok:
        raise _damaged(folder, f"{path.name} is not the trainer state of {folder.name}")
    return state


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict:
    """Load ``folder`` (from :func:`latest`) into ``model`` and ``optimizer`` in place, restore
    this rank's random state, and return its trainer.json (collective). A folder whose files
    cannot be read is a ValueError naming it (never a half-loaded model: the tensors are read
    into fresh state dicts before any is set)."""
    state = read_state(folder)
    try:  # read first: a damaged .metadata would make DCP log tracebacks before it raises
        FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # noqa: BLE001 (unpickling errors come in many types)
        raise _damaged(folder, f".metadata: {type(e).__name__}") from None
    msd, osd = get_state_dict(model, optimizer, options=_OPTIONS)
    sd = {"model": msd, "optim": osd}
    try:
        with _single_process_quiet():
            dcp.load(sd, checkpoint_id=str(folder), no_dist=d.group is None)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (DCP's is a BaseException)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _damaged(folder, f"{type(e).__name__}: {first[:300]}") from None
    # not strict: the frozen parameters are not in the checkpoint; every other key must be
    result = set_state_dict(
        model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )  # fmt: skip
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"--resume: {folder} does not fit the model: missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}"
        )
    rng_file = folder / f"rng-{d.rank}.pt"
    if rng_file.is_file():  # absent when the run resumes on more ranks than it saved from
        try:
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and d.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], d.device)
        except Exception as e:  # noqa: BLE001 (unpickling errors come in many types)
            raise _damaged(folder, f"{rng_file.name}: {type(e).__name__}") from None
    return state


def model_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint folder as one plain state dict (full tensors, in
    this process, no process group needed): e.g. to export trained weights, or to compare
    runs. Frozen X-encoder weights are not in a checkpoint (see the module doc)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    if not _complete(folder):
        raise ValueError(f"folder: {folder} is not a complete checkpoint (no trainer.json)")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), os.path.join(tmp, "all.pt"))
        everything = torch.load(os.path.join(tmp, "all.pt"), weights_only=True)
    return dict(everything["model"])
