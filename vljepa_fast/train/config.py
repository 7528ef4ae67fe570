"""The trainer's settings: one dataclass, filled from a config file and the command line.

``python -m vljepa_fast.train --config run.toml --steps 500`` reads ``run.toml`` (or a
``.json`` file) whose keys are the flags' names (``batch_size`` or ``batch-size``), then lets
the command line override them. Every value is checked here; an error names the flag.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import tomllib

from vljepa_fast import _backends
from vljepa_fast.train.presets import PRESETS

__all__ = ["TrainConfig", "parse_args"]

SCHEDULES = ("constant", "cosine")
ACCUM = ("exact", "local")
DISTS = ("none", "ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PROGRESS = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """What one training run does.

    Attributes:
        preset: "tiny", "small" or "paper" (:mod:`vljepa_fast.train.presets`).
        steps: optimizer steps of the whole run (the schedule spans them).
        batch_size: the global batch (samples per optimizer step over all ranks and
            accumulation micro-batches); None: the preset's. Must divide by
            world_size x grad_accum.
        lr: the peak learning rate of everything but the Y-encoder's body.
        y_lr_mult: the Y-encoder body's learning rate is ``lr * y_lr_mult`` (paper: 0.05).
        weight_decay: AdamW's decoupled weight decay.
        schedule: "constant" (after the warm-up) or "cosine" (to 0 at ``steps``).
        warmup: linear warm-up steps (from lr / warmup to lr).
        grad_accum: micro-batches per optimizer step.
        accum: "exact": GradCache-style, the InfoNCE over the whole global batch (every
            micro-batch's samples are negatives of every other's), gradients equal to one big
            batch's; "local": each micro-batch's own InfoNCE, averaged (cheaper, not exact: the
            negatives are one micro-batch's).
        dist: "none" (one process), "ddp" (DistributedDataParallel) or "fsdp" (FSDP2,
            ``fully_shard``); under torchrun the process group comes from its environment,
            otherwise a one-process group is made.
        precision: "fp32", or "bf16" (autocast in bfloat16, float32 master weights).
        checkpointing: activation checkpointing of every predictor layer (recomputed in the
            backward: less memory, one more predictor forward).
        data: "synthetic", "synthetic:N", a folder of clips and captions, or a feature cache
            folder (``python -m vljepa_fast.train.cache_features``).
        out: the output folder (metrics.jsonl, checkpoint/); None writes nothing.
        resume: continue from the last complete checkpoint in ``out``.
        seed: the model's initialisation and the data order.
        checkpoint_every: save every N steps (0: only at the end).
        keep: complete checkpoints kept (the oldest are removed).
        stop_at: stop (and save) after this step, the schedule still spanning ``steps``.
        backend: the ops' backend spec ("auto", a name, or op=name pairs).
        device: "auto" (cuda when available), "cpu" or "cuda".
        threads: torch CPU threads per process (None: torch's default).
        progress: a progress bar on rank 0: "auto" (when stderr is a terminal), "on", "off".
        x_encoder, predictor, y_encoder: local checkpoints (``load_pretrained``), or None.
    """

    preset: str = "tiny"
    steps: int = 100
    batch_size: int | None = None
    lr: float = 3e-4
    y_lr_mult: float = 0.05
    weight_decay: float = 0.05
    schedule: str = "constant"
    warmup: int = 0
    grad_accum: int = 1
    accum: str = "exact"
    dist: str = "none"
    precision: str = "fp32"
    checkpointing: bool = False
    data: str = "synthetic"
    out: str | None = None
    resume: bool = False
    seed: int = 0
    checkpoint_every: int = 0
    keep: int = 2
    stop_at: int | None = None
    backend: object = "auto"
    device: str = "auto"
    threads: int | None = None
    progress: str = "auto"
    x_encoder: str | None = None
    predictor: str | None = None
    y_encoder: str | None = None

    def __post_init__(self) -> None:
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ValueError(
                    f"{flag(name)}: expected one of {list(options)}, got {getattr(self, name)!r}"
                )

        def integer(name: str, lo: int, none: bool = False) -> None:
            v = getattr(self, name)
            if none and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{flag(name)}: expected an integer >= {lo}, got {v!r}")

        def number(name: str, lo: float, strict: bool) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (v <= lo if strict else v < lo):
                rel = ">" if strict else ">="
                raise ValueError(f"{flag(name)}: expected a finite number {rel} {lo}, got {v!r}")

        choice("preset", tuple(PRESETS))
        for name, options in (
            ("schedule", SCHEDULES), ("accum", ACCUM), ("dist", DISTS),
            ("precision", PRECISIONS), ("device", DEVICES), ("progress", PROGRESS),
        ):  # fmt: skip
            choice(name, options)
        integer("steps", 1)
        integer("batch_size", 1, none=True)
        integer("warmup", 0)
        integer("grad_accum", 1)
        integer("seed", 0)
        if self.seed >= 2**32:
            raise ValueError(f"--seed: expected an integer < 2**32, got {self.seed}")
        integer("checkpoint_every", 0)
        integer("keep", 1)
        integer("stop_at", 1, none=True)
        integer("threads", 1, none=True)
        number("lr", 0.0, strict=True)
        number("y_lr_mult", 0.0, strict=False)
        number("weight_decay", 0.0, strict=False)
        if self.lr > 1.0:  # AdamW moves each weight by up to lr a step: above 1, nothing trains
            raise ValueError(f"--lr: expected at most 1 (AdamW), got {self.lr}")
        if self.lr * self.weight_decay >= 1.0:  # the decay factor 1 - lr * wd would be <= 0
            raise ValueError(
                f"--weight-decay: lr x weight decay must be below 1 (AdamW multiplies every "
                f"weight by 1 - lr x wd each step), got {self.lr} x {self.weight_decay}"
            )
        for name in ("checkpointing", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"{flag(name)}: expected true or false, got {getattr(self, name)!r}"
                )
        if self.warmup >= self.steps and self.warmup:
            raise ValueError(
                f"--warmup: expected fewer than --steps ({self.steps}), got {self.warmup}"
            )
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ValueError(f"--stop-at: expected <= --steps ({self.steps}), got {self.stop_at}")
        if self.resume and self.out is None:
            raise ValueError("--resume: needs --out (the folder whose checkpoint to resume)")
        for name in ("data", "out", "x_encoder", "predictor", "y_encoder"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str | Path):
                raise ValueError(f"{flag(name)}: expected a path or string, got {v!r}")
            if isinstance(v, str) and not v.strip():  # "" would mean the current folder
                raise ValueError(f"{flag(name)}: expected a path, got an empty string")
            if isinstance(v, Path):
                setattr(self, name, str(v))
        self.backend = _backends.parse_spec(self.backend, "--backend")

    @property
    def global_batch(self) -> int:
        """The global batch: ``batch_size`` or the preset's."""
        return PRESETS[self.preset].batch_size if self.batch_size is None else self.batch_size

    def to_dict(self) -> dict:
        """JSON-able (stored in checkpoints)."""
        d = asdict(self)
        d["backend"] = self.backend if isinstance(self.backend, str) else dict(self.backend)
        return d


def _no_repeats(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice is an error, not "the last one wins"."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key!r} is set twice")
        out[key] = value
    return out


def _read_config_file(path: str) -> dict:
    if not path.strip():
        raise ValueError("--config: expected a path, got an empty string")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: {path} is not a file")
    if p.suffix not in (".toml", ".json"):
        raise ValueError(f"--config: expected a .toml or .json file, got {path}")
    try:
        if p.suffix == ".toml":
            with p.open("rb") as f:
                d = tomllib.load(f)
        else:
            d = json.loads(p.read_bytes(), object_pairs_hook=_no_repeats)
    except (OSError, ValueError) as e:  # decoding, syntax (TOML's too), a repeated key
        raise ValueError(f"--config: cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--config: {path} must hold a table of settings, got {type(d).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for key, value in d.items():
        name = key.replace("-", "_")
        if name in out:
            raise ValueError(f"--config: {path}: {key!r} is set twice (as - and _ spellings)")
        if name not in known:
            raise ValueError(f"--config: {path}: unknown setting {key!r} (known: {sorted(known)})")
        out[name] = value
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vljepa_fast.train",
        description="Train VL-JEPA (one process, or torchrun with --dist ddp|fsdp).",
    )
    ap.add_argument("--config", help="a .toml or .json file of settings (flags override it)")
    doc = {
        "preset": f"model sizes: {', '.join(PRESETS)}",
        "steps": "optimizer steps of the whole run (the schedule spans them)",
        "batch_size": "global batch (all ranks and micro-batches); default: the preset's",
        "lr": "peak learning rate",
        "y_lr_mult": "the Y-encoder body's LR multiplier (paper 0.05)",
        "weight_decay": "AdamW weight decay",
        "schedule": "constant or cosine (to 0 at --steps), after --warmup",
        "warmup": "linear warm-up steps",
        "grad_accum": "micro-batches per optimizer step",
        "accum": "exact (GradCache: InfoNCE over the whole global batch) or local",
        "dist": "none, ddp or fsdp (FSDP2); under torchrun ddp or fsdp",
        "precision": "fp32, or bf16 (autocast, fp32 master weights)",
        "checkpointing": "activation checkpointing of every predictor layer",
        "data": "synthetic[:N], a folder of clips + captions.jsonl, or a feature cache",
        "out": "output folder: metrics.jsonl and checkpoint/ (default: write nothing)",
        "resume": "continue from the last complete checkpoint in --out",
        "seed": "initialisation and data-order seed",
        "checkpoint_every": "save every N steps (0: at the end only)",
        "keep": "complete checkpoints kept",
        "stop_at": "stop and save after this step (the schedule still spans --steps)",
        "backend": "ops backend: auto, a name, or op=name pairs",
        "device": "auto (cuda when available), cpu or cuda",
        "threads": "torch CPU threads per process (default: torch's)",
        "progress": "progress bar: auto (on a terminal), on, off",
        "x_encoder": "a local X-encoder checkpoint (V-JEPA 2)",
        "predictor": "a local predictor checkpoint (Llama-3.2)",
        "y_encoder": "a local Y-encoder checkpoint (EmbeddingGemma)",
    }
    defaults = TrainConfig.__dataclass_fields__
    for f in fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        default = defaults[f.name].default
        text = doc[f.name] if default is None else f"{doc[f.name]} [default: {default}]"
        if f.type in ("bool", bool):
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            ap.add_argument(name, default=None, help=text, metavar=f.name.upper())
    return ap


_INTS = ("steps", "batch_size", "warmup", "grad_accum", "seed", "checkpoint_every", "keep",
         "stop_at", "threads")  # fmt: skip
_FLOATS = ("lr", "y_lr_mult", "weight_decay")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command-line flags (over a ``--config`` file) -> a checked :class:`TrainConfig`.

    Raises:
        SystemExit: a malformed flag (argparse's message), or a value TrainConfig refuses
            (its ValueError's message, naming the flag).
    """
    ap = _parser()
    args = vars(ap.parse_args(argv))
    try:
        config = args.pop("config", None)
        settings = {} if config is None else _read_config_file(config)
        args.pop("config", None)
        for name, v in args.items():
            if v is None:
                continue
            if name in _INTS:
                try:
                    v = int(v)
                except ValueError:
                    raise ValueError(
                        f"--{name.replace('_', '-')}: expected an integer, got {v!r}"
                    ) from None
            elif name in _FLOATS:
                try:
                    v = float(v)
                except ValueError:
                    raise ValueError(
                        f"--{name.replace('_', '-')}: expected a number, got {v!r}"
                    ) from None
            settings[name] = v
        return TrainConfig(**settings)
    except ValueError as e:
        ap.error(str(e))
        raise  # unreachable: ap.error exits
