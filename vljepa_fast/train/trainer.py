"""The training loop: data-parallel VL-JEPA on the fused modules, exact InfoNCE negatives.

One optimizer step (:meth:`Trainer.step`) over the global batch of B samples: W ranks x K
micro-batches of B / (W K) samples each. The negatives of the InfoNCE loss are the whole global
batch in both accumulation modes that make it exact:

* K = 1: each rank embeds its B / W samples; the loss all-gathers the targets (and
  predictions) of every rank with exact gradients (``infonce_loss(..., group=)``, whose
  gradient convention makes the wrappers' mean over ranks the single-process gradient).
* K > 1, ``accum="exact"`` (GradCache, Gao et al. 2021): (1) embed every micro-batch without
  autograd, (2) the loss over all B embeddings, its gradient with respect to the embeddings
  (and the temperature), (3) per micro-batch, embed again with autograd and back-propagate
  the cached embedding gradient. Gradients equal one big batch's (to float rounding); the cost
  is one more forward of the predictor and Y-encoder (the frozen X-encoder runs once: its
  features from pass 1 are kept for pass 3, B / W x N x x_dim per rank).
  The random state is replayed per micro-batch, so a model with dropout recomputes the same
  function in (3) as in (1).
* K > 1, ``accum="local"``: each micro-batch's own InfoNCE (B / K negatives), averaged over
  the micro-batches. Cheaper; not the big-batch loss (a contrastive loss does not decompose
  over micro-batches).

The X-encoder is frozen in every preset: with a feature cache (``--data`` a cache folder) it
is not even kept in memory, the cache's features replace it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import re
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vljepa_fast.train import checkpoint as ckpt
from vljepa_fast.train import data as data_mod
from vljepa_fast.train.config import TrainConfig
from vljepa_fast.train.distributed import grad_sync, setup, wrap
from vljepa_fast.train.model import build_model
from vljepa_fast.train.presets import preset as get_preset
from vljepa_fast.train.progress import Progress

__all__ = ["Trainer"]

#: settings a resumed run must share with the checkpoint (the others may change: dist,
#: threads, progress, checkpoint_every, keep, stop_at, device, backend)
RESUME_MUST_MATCH = (
    "preset", "global_batch", "lr", "y_lr_mult", "weight_decay", "schedule", "warmup", "seed",
    "accum", "grad_accum", "precision", "x_encoder", "predictor", "y_encoder",
)  # fmt: skip


#: load_pretrained's argument names at the start of its messages -> the trainer's flags
_FLAG = re.compile(r"^(x_encoder|predictor|y_encoder)\b")


@dataclass
class _Inputs:
    """One micro-batch on the device, tokenized."""

    video: Tensor | None
    x_features: Tensor | None
    query: tuple[Tensor, Tensor | None]
    target: tuple[Tensor, Tensor | None]
    tokens: int  # predictor tokens (visual + real query) + real target tokens


class _Embed(nn.Module):
    """What the data-parallel wrapper wraps: (inputs) -> (predicted, target) embeddings, or
    with ``features_only`` the X-encoder's tokens of the video."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, video, x_features, query, target, features_only: bool = False):
        if features_only:  # the frozen X-encoder's tokens (inside the wrapper: FSDP2 unshards)
            return self.model.encode_video(video)
        pred = self.model.predict(video, query, x_features=x_features)
        tgt = self.model.encode_text(target)
        return pred, tgt.to(pred.dtype)


def _checkpointed(forward, *args, **kwargs):
    # non-reentrant checkpointing passes keywords through (the predictor's mask_queries)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _peak_memory(device: torch.device) -> int:
    """CUDA: bytes allocated at the peak (torch's allocator); CPU: the process's peak
    resident set size (Linux ru_maxrss, KiB -> bytes), which includes the interpreter."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Trainer:
    """Builds the run of a :class:`TrainConfig` and steps it.

    Args:
        cfg: the settings (checked).

    Attributes:
        model: the :class:`~vljepa_fast.models.VLJEPA` being trained (unwrapped;
            ``model.x_encoder`` is None on a feature cache, ``model.y_decoder`` always None).
        step_index: optimizer steps done.
        dist: this process's :class:`~vljepa_fast.train.distributed.Dist`.

    Raises:
        ValueError: a batch that does not split over the ranks and micro-batches, data that
            do not fit the preset, a cache of another X-encoder, an ``out`` that already holds
            a checkpoint without ``resume``, a checkpoint of other settings.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
        cfg = dataclasses.replace(cfg)  # checked again: its fields may have been set since
        self.cfg, self.preset = cfg, get_preset(cfg.preset)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.dist = setup(cfg.dist, cfg.device)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ construction

    def _build(self) -> None:
        cfg, d = self.cfg, self.dist
        B, K = cfg.global_batch, cfg.grad_accum
        if B % (d.world * K):
            raise ValueError(
                f"--batch-size: the global batch {B} must divide by world size {d.world} x "
                f"--grad-accum {K} = {d.world * K}"
            )
        try:
            model = build_model(
                self.preset, cfg.seed, cfg.backend, x_encoder=cfg.x_encoder,
                predictor=cfg.predictor, y_encoder=cfg.y_encoder,
            )  # fmt: skip
        except ValueError as e:  # load_pretrained names its arguments: name the flags
            raise ValueError(_FLAG.sub(lambda m: "--" + m[1].replace("_", "-"), str(e))) from None
        self.data = data_mod.open_data(cfg.data, self.preset, model, seed=cfg.seed)
        if len(self.data) < B:
            raise ValueError(
                f"--data: {len(self.data)} samples, fewer than one global batch (--batch-size {B})"
            )
        if self.data.kind == "cache":  # open_data checked the X-encoder's fingerprint
            model.x_encoder = None  # the cache replaces it: not kept in memory
        if cfg.checkpointing:
            for layer in model.predictor.layers:
                layer.forward = functools.partial(_checkpointed, layer.forward)
        model.to(d.device)
        model.train()
        self.model = model
        self._ignored = [model.logit_scale] if model.logit_scale is not None else []
        blocks = [
            blk
            for part in (model.x_encoder, model.predictor, model.y_encoder)
            if part is not None
            for name in ("blocks", "layers")
            if isinstance(getattr(part, name, None), nn.ModuleList)
            for blk in getattr(part, name)
        ]
        self.wrapped = wrap(_Embed(model), d, blocks, self._ignored)
        groups = model.param_groups(cfg.lr, cfg.weight_decay)
        groups[1]["lr"] = cfg.lr * cfg.y_lr_mult
        groups = [g for g in groups if g["params"]]
        # foreach off: under FSDP2 a group mixes sharded DTensors and the replicated temperature
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, foreach=d.kind != "fsdp")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step_index = 0
        self.out = None if cfg.out is None else Path(cfg.out)
        self._metrics, self._lock, self._closed = None, None, False
        if self.out is not None:
            self._open_out()
        # on CUDA the next step's batch is read in a thread while this one computes (the
        # kernels release the GIL); on CPU the cores are the training's, so it is read in turn
        self._pool = ThreadPoolExecutor(1) if d.device.type == "cuda" else None
        self._ahead: Future | None = None
        stop = cfg.stop_at or cfg.steps
        self.progress = Progress(stop, self.step_index, cfg.progress, d.main)

    def _open_out(self) -> None:
        """Lock ``out``, resume its checkpoint when asked, open metrics.jsonl (collective)."""
        cfg, d = self.cfg, self.dist
        root = self.out / "checkpoint"
        d.agree(self._lock_out if d.main else lambda: None)
        found = d.agree(lambda: ckpt.latest(root))
        if found is not None and not cfg.resume:
            raise ValueError(
                f"--out: {self.out} already holds a checkpoint ({found.name}): pass --resume to "
                "continue it, or another --out"
            )
        if cfg.resume and found is not None:
            state = d.agree(lambda: ckpt.read_state(found))
            self._check_resume(state, found)
            d.agree(lambda: ckpt.load(found, self.model, self.optimizer, d))
            self.scheduler.load_state_dict(state["scheduler"])
            self.step_index = state["step"]
            if d.main and self.step_index >= (cfg.stop_at or cfg.steps):
                print(
                    f"[vljepa_fast.train] --resume: the checkpoint {found.name} is at step "
                    f"{self.step_index}, the run ends at {cfg.stop_at or cfg.steps}: nothing to do"
                )
        elif cfg.resume and d.main:
            print(f"[vljepa_fast.train] --resume: no complete checkpoint in {root}: step 0")
        d.agree(self._open_metrics if d.main else lambda: None)

    def _lock_out(self) -> None:
        """Create ``out`` and hold an exclusive lock on ``out/.lock`` for the run (the kernel
        drops it when the process ends, killed or not): two runs never write one folder."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {out} exists and is not a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._lock = open(out / ".lock", "a+")  # noqa: SIM115 (held until close)
        except OSError as e:
            raise ValueError(f"--out: cannot create {out}: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise ValueError(
                f"--out: {out} is in use by another run (it holds {out / '.lock'}); a torchrun "
                "killed with SIGKILL can leave its workers running: stop them first"
            ) from None
        checks = (("checkpoint", "a folder"), ("metrics.jsonl", "a file"),
                  ("checkpoint/latest", "a file"))  # fmt: skip
        for name, kind in checks:
            p = out / name
            if p.exists() and (p.is_dir() if kind == "a file" else not p.is_dir()):
                raise ValueError(f"--out: {p} exists and is not {kind}")

    def _open_metrics(self) -> None:
        path = self.out / "metrics.jsonl"
        kept = []
        if self.cfg.resume and path.is_file():  # steps after the checkpoint are redone
            for line in path.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line)["step"] <= self.step_index:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a line cut by a kill: the rest is redone
        try:
            path.write_text("".join(line + "\n" for line in kept))
            self._metrics = path.open("a")
        except OSError as e:
            raise ValueError(f"--out: cannot write {path}: {e.strerror or e}") from None

    def _check_resume(self, state: dict, folder: Path) -> None:
        saved, now = state["settings"], self._settings()
        keys = list(RESUME_MUST_MATCH) + (["steps"] if self.cfg.schedule == "cosine" else [])
        diff = [k for k in keys if saved.get(k) != now.get(k)]
        if state.get("data") != self.data.describe():
            diff.append("data")
        if diff:
            shown = ", ".join(
                f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff if k != "data"
            )
            if "data" in diff:
                shown += (", " if shown else "") + "data: another dataset"
            raise ValueError(
                f"--resume: the checkpoint {folder} was made with other settings ({shown}); "
                "resume with the same ones, or start a new --out"
            )

    def _settings(self) -> dict:
        s = self.cfg.to_dict()
        s["global_batch"] = self.cfg.global_batch
        return s

    def _lr_factor(self, i: int) -> float:
        """The learning-rate factor of optimizer step ``i`` (0-based)."""
        cfg = self.cfg
        if i < cfg.warmup:
            return (i + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(i - cfg.warmup, span) / span))

    # ------------------------------------------------------------------ one step

    def _inputs(self, batch) -> _Inputs:
        m, dev = self.model, self.dist.device
        q_ids, q_mask = m._tokens(batch.query, m.query_tokenizer, "query")
        t_ids, t_mask = m._tokens(batch.target, m.text_tokenizer, "target", "text")
        vis = batch.x_features if batch.x_features is not None else batch.video
        n = vis.shape[0]
        visual = self.preset.visual_tokens if batch.x_features is None else vis.shape[1]

        def real(ids: Tensor, mask: Tensor | None) -> int:
            rows = n if ids.shape[0] == 1 else 1  # one shared query counts for every sample
            return rows * int(ids.numel() if mask is None else mask.sum())

        tokens = n * visual + real(q_ids, q_mask) + real(t_ids, t_mask)

        def to(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dev, non_blocking=True)

        return _Inputs(
            to(batch.video), to(batch.x_features), (to(q_ids), to(q_mask)),
            (to(t_ids), to(t_mask)), tokens,
        )  # fmt: skip

    def _load(self, step: int) -> list[_Inputs]:
        """This rank's micro-batches of optimizer step ``step`` (0-based), tokenized, on the
        device: a pure function of the step (the data position a checkpoint stores)."""
        cfg, d = self.cfg, self.dist
        B, K = cfg.global_batch, cfg.grad_accum
        idx = data_mod.global_indices(len(self.data), self.data.shuffle, cfg.seed, step, B)
        micro, local = B // K, B // K // d.world
        lo = d.rank * local
        try:
            return [
                self._inputs(self.data.batch(idx[k * micro + lo : k * micro + lo + local]))
                for k in range(K)
            ]
        except ValueError as e:
            msg = str(e) if str(e).startswith("--data") else f"--data: {e}"
            raise ValueError(f"{msg} (step {step + 1}, rank {d.rank})") from None

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _embed(self, x: _Inputs) -> tuple[Tensor, Tensor]:
        with self._autocast():
            return self.wrapped(x.video, x.x_features, x.query, x.target)

    def _loss(self, pred: Tensor, tgt: Tensor) -> Tensor:
        return self.model.embedding_loss(pred, tgt, group=self.dist.group)

    def _rng_state(self) -> list[Tensor]:
        out = [torch.get_rng_state()]
        if self.dist.device.type == "cuda":
            out.append(torch.cuda.get_rng_state(self.dist.device))
        return out

    def _set_rng_state(self, state: list[Tensor]) -> None:
        torch.set_rng_state(state[0])
        if len(state) > 1:
            torch.cuda.set_rng_state(state[1], self.dist.device)

    def _features(self, x: _Inputs) -> _Inputs:
        """``x`` with its video replaced by the frozen X-encoder's features (no autograd)."""
        if x.video is None:
            return x
        with torch.no_grad(), self._autocast():
            feats = self.wrapped(x.video, None, None, None, features_only=True)
        return _Inputs(None, feats, x.query, x.target, x.tokens)

    def _backward(self, micro: list[_Inputs]) -> float:
        """Forward and backward of one optimizer step; returns the (global) loss value."""
        K, d = len(micro), self.dist
        if K == 1:
            pred, tgt = self._embed(micro[0])
            loss = self._loss(pred, tgt)
            loss.backward()
            return float(loss.detach())
        if self.cfg.accum == "local":
            total = 0.0
            for k, x in enumerate(micro):
                with grad_sync(self.wrapped, d, sync=k == K - 1):
                    pred, tgt = self._embed(x)
                    loss = self._loss(pred, tgt) / K
                    loss.backward()
                total += float(loss.detach())
            return total
        # GradCache: (1) embeddings without autograd, the random state of each micro-batch kept;
        # a frozen X-encoder's features are kept too (pass 3 needs them again, not its work)
        if self.model.config.freeze_x_encoder:
            micro = [self._features(x) for x in micro]
        states, preds, tgts = [], [], []
        with torch.no_grad():
            for x in micro:
                states.append(self._rng_state())
                p, t = self._embed(x)
                preds.append(p)
                tgts.append(t)
        after = self._rng_state()
        # (2) the loss over the whole global batch, its gradient at the embeddings
        P = torch.cat(preds).requires_grad_()
        T = torch.cat(tgts).requires_grad_()
        loss = self._loss(P, T)
        loss.backward()  # also the temperature's gradient (a parameter outside the wrapper)
        gP, gT = P.grad.split([p.shape[0] for p in preds]), T.grad.split([t.shape[0] for t in tgts])
        # (3) per micro-batch: recompute with autograd, back-propagate the cached gradient
        for k, x in enumerate(micro):
            self._set_rng_state(states[k])
            with grad_sync(self.wrapped, d, sync=k == K - 1):
                p, t = self._embed(x)
                surrogate = (p.float() * gP[k].float()).sum() + (t.float() * gT[k].float()).sum()
                surrogate.backward()
        self._set_rng_state(after)
        return float(loss.detach())

    def step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics: ``step`` (steps
        done), ``loss`` (the global loss), ``lr`` (the main group's, this step), ``temperature``,
        ``samples_per_s`` and ``tokens_per_s`` (global, this step's wall time, data
        included), ``peak_memory_bytes`` (the largest over ranks, see :func:`_peak_memory`),
        ``time_s``."""
        cfg, d = self.cfg, self.dist
        if self._closed:
            raise ValueError("step: the trainer is closed")
        if self.step_index >= cfg.steps:
            raise ValueError(f"step: the run's {cfg.steps} steps (--steps) are done")
        B = cfg.global_batch
        start = time.perf_counter()
        ahead, self._ahead = self._ahead, None
        step = self.step_index
        inputs = d.agree(lambda: ahead.result() if ahead is not None else self._load(step))
        if self._pool is not None and self.step_index + 1 < (cfg.stop_at or cfg.steps):
            self._ahead = self._pool.submit(self._load, self.step_index + 1)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(inputs)
        if not math.isfinite(loss):  # the same global value on every rank: all stop here
            raise ValueError(
                f"the loss is {loss} at step {step + 1}: training diverged (lower --lr, or "
                "check the data); the weights were not updated and no checkpoint is written"
            )
        d.average_grads(self._ignored)
        self.optimizer.step()
        self.scheduler.step()
        self.step_index += 1
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        elapsed = time.perf_counter() - start
        tokens = torch.tensor([float(sum(x.tokens for x in inputs))], dtype=torch.float64)
        peak = torch.tensor([float(_peak_memory(d.device))], dtype=torch.float64)
        if d.group is not None and d.device.type == "cuda":
            tokens, peak = tokens.to(d.device), peak.to(d.device)
        d.all_reduce(tokens)
        d.all_reduce(peak, op="max")
        temp = self.model.temperature()
        temp = temp.detach() if isinstance(temp, Tensor) else temp
        return {
            "step": self.step_index,
            "loss": loss,
            "lr": lr,
            "temperature": float(temp),
            "samples_per_s": B / elapsed,
            "tokens_per_s": float(tokens) / elapsed,
            "peak_memory_bytes": int(peak),
            "time_s": elapsed,
        }

    # ------------------------------------------------------------------ the run

    def save(self) -> Path:
        """A checkpoint of the steps done so far (collective); needs ``out``."""
        if self.out is None:
            raise ValueError("save: the run has no --out")
        self._check_replicated()
        state = {
            "settings": self._settings(),
            "data": self.data.describe(),
            "scheduler": self.scheduler.state_dict(),
            "world": self.dist.world,
            "torch": torch.__version__,
        }
        return ckpt.save(
            self.out / "checkpoint", self.step_index, self.model, self.optimizer, state,
            self.dist, self.cfg.keep,
        )  # fmt: skip

    def _check_replicated(self) -> None:
        """The parameters kept out of the wrapper (the temperature) must be bitwise the same
        on every rank: a rank that drifted would train another loss. RuntimeError if not."""
        if self.dist.group is None:
            return
        for p in self._ignored:
            mine = p.detach().reshape(-1).to(torch.float64)
            top, low = mine.clone(), -mine.clone()
            self.dist.all_reduce(top, op="max")
            self.dist.all_reduce(low, op="max")
            if not (torch.equal(top, mine) and torch.equal(-low, mine)):
                raise RuntimeError(
                    f"the replicated parameter (temperature) differs across ranks: "
                    f"{float(-low.min())}..{float(top.max())}"
                )

    def fit(self) -> list[dict]:
        """Step to ``stop_at`` (else ``steps``), writing metrics.jsonl and checkpoints (every
        ``checkpoint_every`` steps and at the end) when the run has ``out``; returns the
        metrics of the steps it ran."""
        cfg = self.cfg
        stop, every, rows = cfg.stop_at or cfg.steps, cfg.checkpoint_every, []
        saved = self.step_index
        while self.step_index < stop:
            m = self.step()
            rows.append(m)
            if self._metrics is not None:
                self._metrics.write(json.dumps(m) + "\n")
                self._metrics.flush()
            self.progress.update(self.step_index, m)
            if self.out is not None and every and self.step_index % every == 0:
                self.save()
                saved = self.step_index
        if self.out is not None and saved != self.step_index:
            self.save()
        self.progress.close()
        return rows

    def close(self) -> None:
        """Close the metrics file, release ``out``'s lock and a process group this trainer
        made. The trainer cannot step afterwards."""
        self._closed = True
        for name in ("_metrics", "_lock"):
            f = getattr(self, name, None)
            if f is not None:
                f.close()  # closing the lock file releases the flock
                setattr(self, name, None)
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self.dist.close()
