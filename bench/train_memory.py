"""The training-step runners of bench/bench_train.py and their peak-memory measurement.

    python bench/train_memory.py '{"provider": "peers", "preset": "tiny", "batch": 32,
                                   "device": "cpu", "precision": "fp32", "cache": null}'

prints one JSON line: {"peak_bytes", "step_extra_bytes", "method"}. bench_train.py runs it once
per (case, provider) on CPU, in a fresh process, so that one provider's freed heap cannot hide
the next one's growth (glibc keeps freed pages mapped for reuse; a second provider in the same
process would reuse them and show no growth).

Peak memory of a training run (:func:`measure`), on both devices:

* ``peak_bytes``: the run's high-water mark over the process after imports, before anything is
  built: parameters, gradients, AdamW state, the data held (video frames, or the feature cache)
  and the step's activations. It is what decides whether a batch fits. Build-time transients
  (the peers copy our weights) are excluded: the mark is reset once the runner is built.
  CPU: resident set (Linux ``clear_refs`` 5 resets ``VmHWM`` to the current RSS; RSS after
  ``malloc_trim`` as the baseline). CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus ``memory_allocated`` before the build.
* ``step_extra_bytes``: one steady-state step's peak over what was held just before it (after
  ``WARMUP_STEPS`` steps, so the optimizer state exists): activations and transients only.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

PROVIDERS = ("peers", "vf", "vf+ckpt")
#: steps before the measured one: the first allocates gradients and AdamW state
WARMUP_STEPS = 2
CPU_METHOD = (
    "per (case, provider) in a fresh process: resident high-water mark (clear_refs 5 + VmHWM) "
    "after the runner is built, over VmRSS after imports (malloc_trim first)"
)
CUDA_METHOD = (
    "torch.cuda.max_memory_allocated (reset after the runner is built) minus memory_allocated "
    "before the build"
)


@dataclass
class Runner:
    """One provider's training step on one batch size: ``step()`` runs an optimizer step and
    returns its loss (a float)."""

    step: object
    batch: int
    notes: list[str] = field(default_factory=list)
    cleanup: object = None

    def close(self) -> None:
        if self.cleanup is not None:
            self.cleanup()
        self.step = self.cleanup = None


def write_cache(preset: str, batch: int, device: torch.device, out: str | Path) -> None:
    """A feature cache of 4 global batches of synthetic clips (enough for the steps timed: the
    data repeat by epoch), through vljepa_fast.train.cache_features' CLI."""
    from vljepa_fast.train import cache_features

    dev = "cpu" if device.type == "cpu" else str(device)
    with contextlib.redirect_stderr(_Null()):  # its per-shard progress lines
        cache_features.main([
            "--preset", preset, "--data", f"synthetic:{4 * batch}", "--out", str(out),
            "--seed", "0", "--batch-size", str(min(batch, 64)), "--device", dev,
            "--threads", str(torch.get_num_threads()),
        ])  # fmt: skip


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def _peers_batches(data, model, batch: int, device: torch.device, sets: int) -> list[tuple]:
    """``sets`` batches (video, (q ids, mask), (t ids, mask)) of the synthetic data, on
    ``device``, the texts tokenised by our model's tokenizers (as our model does inside)."""
    out = []
    for s in range(sets):
        b = data.batch(range(s * batch, (s + 1) * batch))
        texts = []
        for text, tok in ((b.query, model.query_tokenizer), (b.target, model.text_tokenizer)):
            ids, mask = text if isinstance(text, tuple) else tok(list(text))
            mask = ids.new_ones(ids.shape, dtype=torch.bool) if mask is None else mask
            texts.append((ids.to(device), mask.to(device)))
        out.append((b.video.to(device), texts[0], texts[1]))
    return out


def build(
    provider: str, preset: str, batch: int, device: torch.device, precision: str,
    cache: str | None, seed: int = 0,
) -> Runner:  # fmt: skip
    """The runner of ``provider`` ("peers", "vf", "vf+ckpt") at global batch ``batch``.

    peers: bench/train_peers.py's model with our initial weights (so both start from the same
    function), two batches of synthetic video frames built here and used in turn. vf and
    vf+ckpt: vljepa_fast.train.Trainer on the feature cache ``cache`` (fused backends,
    ``checkpointing`` for vf+ckpt), each step reading its batch from the cache.
    """
    from vljepa_fast.train import TrainConfig, Trainer

    if provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")
    defaults = TrainConfig()
    if provider == "peers":
        import train_peers

        from vljepa_fast.train.data import open_data
        from vljepa_fast.train.model import build_model
        from vljepa_fast.train.presets import preset as get_preset

        p = get_preset(preset)
        with torch.device(device):
            ours = build_model(p, seed, "reference")
            peers = train_peers.PeersModel(p.model)
        train_peers.peers_from_ours(peers, ours)
        data = open_data(f"synthetic:{2 * batch}", p, ours, seed=seed)
        sets = _peers_batches(data, ours, batch, device, 2)
        del ours, data
        step = train_peers.PeersStep(
            peers, lr=defaults.lr, weight_decay=defaults.weight_decay, precision=precision
        )
        state = {"i": 0}

        def run() -> float:
            loss = step(*sets[state["i"] % len(sets)])
            state["i"] += 1
            return loss

        notes = ["peers: transformers Llama layers (eager, dense 4-D mask), Gemma3 (eager), "
                 "eager InfoNCE, X-encoder recomputed every step"]  # fmt: skip
        return Runner(run, batch, notes, cleanup=lambda: sets.clear())
    if cache is None:
        raise ValueError("cache: the vf providers train on a feature cache; give its folder")
    cfg = TrainConfig(
        preset=preset, steps=10**6, batch_size=batch, data=str(cache), out=None,
        precision=precision, checkpointing=provider == "vf+ckpt", seed=seed, backend="auto",
        device=device.type, progress="off",
    )  # fmt: skip
    tr = Trainer(cfg)
    return Runner(
        lambda: tr.step()["loss"], batch, [f"{provider}: Trainer on the feature cache"], tr.close
    )


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


class _Meter:
    """start() -> stop() peak bytes over start's baseline (CPU RSS or CUDA allocator)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def baseline(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        gc.collect()
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        return _status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024


def measure(make_runner, device: torch.device) -> tuple[dict, Runner]:
    """Build the runner with ``make_runner()`` and measure its peaks (module docstring).

    Returns ({"peak_bytes", "step_extra_bytes", "method"}, the runner, warmed up).
    """
    meter = _Meter(device)
    base = meter.baseline()
    runner = make_runner()
    meter.baseline()  # collect the build's garbage before the mark is reset
    meter.reset_peak()
    for _ in range(WARMUP_STEPS):
        runner.step()
    held = meter.baseline()
    meter.reset_peak()
    runner.step()
    top = meter.peak()
    method = CUDA_METHOD if device.type == "cuda" else CPU_METHOD
    return {"peak_bytes": top - base, "step_extra_bytes": top - held, "method": method}, runner


def main(argv: list[str] | None = None) -> int:
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    device = torch.device(args["device"])
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    import train_peers  # noqa: F401  (imports counted in the baseline, not in the peak)

    import vljepa_fast.train  # noqa: F401

    result, runner = measure(
        lambda: build(args["provider"], args["preset"], int(args["batch"]), device,
                      args["precision"], args.get("cache")),
        device,
    )  # fmt: skip
    runner.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
