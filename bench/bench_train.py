"""The end-to-end training step: ours against the peers' recipe, side by side.

Providers:

* ``peers``: bench/train_peers.py, the recipe a careful user builds from transformers parts
  (Llama decoder layers with a dense 4-D additive mask, Gemma-3 Y-encoder, eager InfoNCE with
  an all-gather, the X-encoder recomputed from the video frames every step), AdamW on our
  parameter groups, starting from our initial weights.
* ``vf``: :class:`vljepa_fast.train.Trainer` on a feature cache written once before timing by
  ``vljepa_fast.train.cache_features`` (its one-off cost is the row's ``cache_s``, not part of
  the step), fused backends ("auto").
* ``vf+ckpt``: the same with ``checkpointing=True`` (every predictor layer recomputed in the
  backward).

Cases (:data:`CASES`; here rather than in bench/presets.py, as bench_model.py's, because they
are model configurations, not op shapes): the tiny and small presets on CPU at two global batches
each (the preset's and half), the paper preset at batch 128 per GPU in bfloat16 (plus batches
16 and 32, which the peers' recipe can fit) on CUDA. Precision: float32 on CPU; bfloat16 on
CUDA = autocast over float32 parameters for both (the Trainer's "bf16").

Reported per (case, provider): the median step time (pytest-benchmark rounds, one optimizer
step each, data loading included: the peers' two video batches are built before timing and
used in turn, ours are read from the cache by the Trainer) and samples/s = global batch /
median; peak memory by :mod:`train_memory` (``peak_bytes``: the run's high-water mark,
parameters, optimizer state, data and activations; ``step_extra_bytes``: one steady-state
step's peak over what it holds before it). On CPU each (case, provider) is measured in its own
process (bench/train_memory.py), so that one provider's freed heap cannot hide another's
growth; on CUDA in the bench process with the allocator's counters. bench/report.py fits
peak = a + b * batch through the two batches measured per (config, provider) and reports the
largest global batch that fits a budget (CPU 24 GiB, CUDA the device's memory), labelled as
extrapolated from two measured points.

Cost: no FLOP count. The providers do different work for the same samples (the peers
recompute the frozen X-encoder every step; ours read cached features, vf+ckpt recomputes the
predictor), so the comparable rate is samples/s, not FLOP/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import _harness
import pytest
import torch
import train_memory

OP = "train"
FORMULA = (
    "samples/s = global batch / median optimizer-step time (data loading included); no FLOP "
    "count: the providers do different work per sample (peers recompute the X-encoder)"
)
#: memory budget of the fit on CPU (bench/report.py: the largest batch that fits)
CPU_BUDGET_BYTES = 24 << 30

_CACHE: dict = {"key": None, "dir": None, "seconds": None}


def _cases(config: str, batches: tuple[int, ...], dtype: str) -> list[dict]:
    """One case per global batch of a model preset (vljepa_fast/train/presets.py); two batches
    per config give bench/report.py the two points of its memory fit."""
    return [dict(config=config, B=B, dtype=dtype, mode="train") for B in batches]


#: the paper config at batch 128 per GPU (the target) first, then 16 and 32, which the peers'
#: eager recipe can fit (its dense masks and N x N logits run out of memory first)
_PAPER = _cases("paper", (128, 16, 32), "bfloat16")
#: preset name -> cases; cpu: each model preset's default global batch and half of it
CASES: dict[str, list[dict]] = {
    "smoke": _cases("tiny", (8, 4), "auto"),
    "cpu": _cases("tiny", (32, 16), "float32") + _cases("small", (32, 16), "float32"),
    "gpu": _PAPER,
    "paper": _PAPER,
}


def _label(c: dict) -> str:
    return f"train {c['config']} B{c['B']} {c['dtype']}"


def pytest_generate_tests(metafunc):
    _harness.parametrize(
        metafunc, OP, lambda c: list(train_memory.PROVIDERS), _label, cases=lambda n: CASES[n]
    )


def _precision(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _feature_cache(case: dict, device: torch.device) -> tuple[str, float]:
    """The case's feature cache (one per case, shared by vf and vf+ckpt) and the seconds its
    writing took; the previous case's is removed."""
    key = (case["config"], case["B"], str(device))
    if _CACHE["key"] != key:
        if _CACHE["dir"] is not None:
            _CACHE["dir"].cleanup()
        _CACHE.update(key=None, dir=None, seconds=None)
        folder = tempfile.TemporaryDirectory(prefix="vf-bench-cache-")
        t0 = time.perf_counter()
        train_memory.write_cache(case["config"], case["B"], device, folder.name)
        _CACHE.update(key=key, dir=folder, seconds=time.perf_counter() - t0)
    return _CACHE["dir"].name, _CACHE["seconds"]


def _memory_subprocess(args: dict) -> dict:
    """bench/train_memory.py in a fresh process (CPU peak memory of one provider)."""
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "train_memory.py"),
           json.dumps(args)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"train_memory.py failed ({done.returncode}): {' | '.join(tail)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _budget(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return CPU_BUDGET_BYTES


def test_train(benchmark, case, provider):
    bench = _harness.Bench(benchmark, OP, case, provider)
    device, precision = bench.device, _precision(bench.dtype)
    B = case["B"]
    cache, cache_s = None, None
    with bench.guard():
        if provider != "peers":
            cache, cache_s = _feature_cache(case, device)

        def make():
            return train_memory.build(provider, case["config"], B, device, precision, cache)

        if device.type == "cuda":  # the allocator's counters: measured in this process
            torch.cuda.empty_cache()
            memory, runner = train_memory.measure(make, device)
        else:  # a fresh process per provider, then this process's runner for the timing
            memory = _memory_subprocess(
                dict(provider=provider, preset=case["config"], batch=B, device=str(device),
                     precision=precision, cache=cache, threads=torch.get_num_threads())
            )  # fmt: skip
            runner = make()
    notes = list(runner.notes)
    try:
        timing = _harness.STATE["timing"]
        with bench.guard():
            est = None
            for _ in range(max(1, timing.warmup)):
                t0 = time.perf_counter()
                runner.step()
                est = time.perf_counter() - t0
            fill = int(timing.budget_s / max(est, 1e-9)) + 1
            rounds = max(timing.min_rounds, min(timing.max_rounds, fill))
            benchmark.group = f"{OP} | {case['label']}"
            benchmark.pedantic(runner.step, rounds=rounds, iterations=1)
        stats = getattr(benchmark.stats, "stats", None)
        median = stats.median if stats is not None else est
    finally:
        runner.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row = {
        "op": OP,
        "case": case["label"],
        "mode": case["mode"],
        "provider": provider,
        "config": case["config"],
        "batch": B,
        "device_type": device.type,
        "median_s": median,
        "rounds": rounds,
        "samples_per_s": B / median,
        "peak_bytes": memory["peak_bytes"],
        "peak_extra_bytes": memory["step_extra_bytes"],
        "peak_method": memory["method"],
        "memory_budget_bytes": _budget(device),
        "cache_s": cache_s,
        "flops": None,
        "bytes": None,
        "formula": FORMULA,
        "tflops": None,
        "gbs": None,
        "roofline": None,
        "predicted_s": None,
    }
    _harness.RESULTS.append(row)
    benchmark.extra_info.update(row)
    benchmark.extra_info.update(
        {
            "params": {k: v for k, v in case.items() if k != "label"},
            "preset": _harness.STATE["preset"],
            "notes": [f"precision {precision}", *notes],
            "device": _harness.device_info(device.type),
            "versions": _harness.versions(),
        }
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q"]))
