"""The shared bench harness: timing, warm-up, input rotation, peak memory, TFLOP/s, GB/s and
roofline fractions from a bench file's stated cost, device metadata, and the rows of the closing
summary. Nothing here knows an op: each bench file (bench/bench_<op>.py) owns its shapes, its
providers and its FLOP and byte formulas, and hands the harness a :class:`Cost`.

How one (case, provider) is measured (:meth:`Bench.run`):

1. Input sets are built once per case and shared by its providers. Small cases get several sets
   (enough to cover twice the last-level cache) used in turn, so a round never finds its inputs
   in cache from the round before; large cases get one.
2. Warm-up, untimed: the preset's number of calls (the first compiles under torch.compile, and
   Triton autotunes on its first call). The last warm-up call is timed to size the rounds:
   rounds = budget / call time, within the preset's bounds.
3. Rounds through pytest-benchmark's pedantic mode, one call per round. The timed target ends
   with torch.cuda.synchronize() on GPU, so a round is the device time of the call plus its
   launch cost, never just the launch.
4. Peak memory is taken on the first timed round, with the bookkeeping in pedantic's setup and
   teardown (outside the timer): the CUDA allocator's peak minus what was allocated before the
   call (inputs, and for "bwd" the saved forward), or on CPU the process's resident high-water
   mark (Linux /proc/self/clear_refs "5" resets VmHWM) minus the resident size before the call,
   after malloc_trim so freed heap pages cannot hide new allocations. The CPU figure sees every
   allocation of the process (torch, BLAS, faiss), not only torch's allocator.

Modes: "fwd" runs under torch.no_grad(); "fwd+bwd" runs the forward and backward of fresh
graphs; "bwd" times only the backward of a graph built before the round (retain_graph=True).

A provider that cannot serve a case (a backend's reasons, a peer not installed, out of memory)
is skipped with the reason; one that raises anything else, while its calls are prepared, warmed
up or timed, fails its test. Both are listed in the closing summary.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.metadata
import itertools
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, NoReturn

import pytest
import torch

#: Rows of the closing summary and of bench/report.py, one per (case, provider), run or skipped.
RESULTS: list[dict] = []
#: Session settings written by bench/conftest.py: preset name, timing, deadline (time.time()).
STATE: dict = {"preset": None, "deadline": None}

MAX_INPUT_SETS = 4

# Published dense peaks (datasheets, SXM parts unless named): TFLOP/s per input dtype of a
# matmul (bf16/fp16 tensor cores; fp32 without TF32, torch's default) and HBM GB/s. First
# substring match of the device name wins, so specific names come first.
CEILINGS: tuple[tuple[str, dict[str, float], float], ...] = (
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 4800.0),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}, 2000.0),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}, 3350.0),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}, 2039.0),
)


def model_seconds(flops: float, nbytes: float, dtype: torch.dtype = torch.bfloat16) -> float:
    """H200 design-model seconds of ``flops`` GEMM FLOPs plus ``nbytes`` of HBM traffic, added
    (nothing overlapped), at the rates of kernels/_common.py."""
    from vljepa_fast._kernels import _common

    return flops / _common.PEAK_FLOPS[dtype] + nbytes / _common.PEAK_BANDWIDTH


class Cost(NamedTuple):
    """The work of one call of a case, as its bench file counts it.

    Attributes:
        flops: floating-point operations of one call (a multiply-add counts 2).
        nbytes: compulsory memory traffic of one call in bytes.
        formula: how ``flops`` and ``nbytes`` follow from the shape, in words (it goes into every
            row and the report, so a reader can check a rate).
        predicted_s: the design model's H200 time of this provider on this case (the kernel
            file's own ``predicted_seconds``, whose rates live in kernels/_common.py), or None
            where no model is stated (eager, peers, the cpu backend). Printed beside the measured
            time on a GPU run, so a kernel that misses its design shows.
    """

    flops: int
    nbytes: int
    formula: str
    predicted_s: float | None = None


def mode_total(fwd: int, bwd: int, mode: str) -> int:
    """The count of ``mode`` from the forward and backward counts: fwd, bwd or their sum."""
    totals = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
    if mode not in totals:
        raise ValueError(f"mode: expected one of {sorted(totals)}, got {mode!r}")
    return totals[mode]


# ------------------------------------------------------------------------------------------
# machine: device metadata, versions, ceilings, caches
# ------------------------------------------------------------------------------------------


@functools.cache
def versions() -> dict[str, str]:
    """Versions of python, torch (and its CUDA), and every package the benches may use."""
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
    }
    dists = (
        "triton",
        "vljepa_fast",
        "faiss-cpu",
        "faiss-gpu",
        "faiss",
        "numpy",
        "pytest-benchmark",
        "nvidia-ml-py",
        "open-clip-torch",
        "flash-attn",
        "xformers",
    )
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _nvml(index: int) -> dict:
    """Name, driver, clocks, memory and power of CUDA device ``index`` through nvidia-ml-py."""
    try:
        import pynvml
    except ImportError as e:
        return {"nvml_error": f"nvidia-ml-py is not importable: {e}"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"nvml_error": f"nvmlInit failed: {e}"}
    info: dict = {}
    try:
        handle = None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(
                    text if text.startswith("GPU-") else f"GPU-{text}"
                )
            except pynvml.NVMLError:
                handle = None
        if (
            handle is None
        ):  # no UUID from torch: the index (right unless CUDA_VISIBLE_DEVICES remaps)
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        queries = {
            "name": lambda: pynvml.nvmlDeviceGetName(handle),
            "driver": pynvml.nvmlSystemGetDriverVersion,
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(
                handle, pynvml.NVML_CLOCK_SM
            ),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(
                handle, pynvml.NVML_CLOCK_MEM
            ),
            "memory_total_bytes": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total,
            "memory_used_bytes": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used,
            "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(
                handle, pynvml.NVML_TEMPERATURE_GPU
            ),
        }
        for key, query in queries.items():
            try:
                val = query()
                info[key] = val.decode() if isinstance(val, bytes) else val
            except pynvml.NVMLError as e:  # a query the device or driver does not support
                info[key] = f"unavailable ({e})"
    except pynvml.NVMLError as e:
        info["nvml_error"] = str(e)
    finally:
        pynvml.nvmlShutdown()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def device_info(device_type: str) -> dict:
    """What the numbers were measured on: GPU name, clocks, memory, power; or CPU model, cores."""
    if device_type == "cuda":
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info = {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
        }
        info.update(_nvml(index))
        return info
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    return {
        "type": "cpu",
        "name": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "cores_available": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": mem,
        "llc_bytes": llc_bytes("cpu"),
    }


def ceiling(device_type: str, dtype: str) -> tuple[float | None, float | None, str]:
    """(TFLOP/s, GB/s, note) of the device's published ceilings for ``dtype``; Nones if unknown."""
    if device_type != "cuda":
        return None, None, "no ceiling: CPUs have no entry in the ceiling table"
    name = device_info("cuda")["name"]
    for key, tflops, gbs in CEILINGS:
        if key in name:
            return tflops.get(dtype), gbs, f"published ceiling of {key}"
    return None, None, f"no ceiling for {name!r} in the table"


@functools.cache
def measured_ceilings() -> dict:
    """Measured on this GPU: a large bf16 matmul (TFLOP/s) and a device copy (GB/s, read+write)."""
    if not torch.cuda.is_available():
        return {}
    n, reps = 8192, 10
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    x = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    t_mm = timed(lambda: a @ b)
    t_cp = timed(lambda: y.copy_(x))
    return {"matmul_bf16_tflops": 2 * n**3 / t_mm / 1e12, "copy_gbs": 2 * x.numel() / t_cp / 1e9}


@functools.cache
def llc_bytes(device_type: str) -> int:
    """Size of the last-level cache (GPU L2; CPU the largest cache level), 32 MiB if unknown."""
    if device_type == "cuda":
        size = getattr(
            torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0
        )
        return int(size) or 32 << 20
    best = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 << 20


def n_input_sets(set_bytes: int, device_type: str) -> int:
    """Input sets to rotate through: enough to cover twice the last-level cache, at most 4."""
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * llc_bytes(device_type) / max(set_bytes, 1))))


# ------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


class PeakMemory:
    """Peak memory of the work between :meth:`start` and :meth:`stop`, above the level at start.

    CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated) minus what was
    allocated at start. CPU (Linux): the resident high-water mark VmHWM, reset to the current
    resident size by writing "5" to /proc/self/clear_refs, minus the resident size at start;
    malloc_trim(0) first returns freed heap pages to the system, so memory that the call
    allocates cannot hide in pages that were already resident.

    Attributes:
        method: how the figure was taken, or why there is none.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.peak: int | None = None
        self.method = self._method()

    def _method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated minus memory_allocated before the call"
        if not os.access("/proc/self/clear_refs", os.W_OK):
            return "unavailable: needs Linux /proc/self/clear_refs (resident high-water mark)"
        return (
            "resident high-water mark (clear_refs 5 + VmHWM) minus VmRSS before, after malloc_trim"
        )

    @property
    def available(self) -> bool:
        return not self.method.startswith("unavailable")

    def start(self) -> None:
        if not self.available:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _proc_status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        """The peak extra bytes (None when this machine offers no method)."""
        if not self.available:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _proc_status_kib("VmHWM") * 1024 - self.base
        return self.peak


# ------------------------------------------------------------------------------------------
# inputs and dtypes
# ------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE: dict = {"key": None, "sets": None}


def dtype_for(name: str, device: torch.device) -> torch.dtype:
    """A case's dtype; "auto" is bfloat16 on CUDA and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) tuple or list."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x) for x in obj)
    return 0


def release_inputs() -> None:
    """Drop the cached input sets (between cases, and at the end of the session)."""
    _CACHE.update(key=None, sets=None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def input_sets(key, build: Callable[[int], tuple], device: torch.device) -> list[tuple]:
    """The case's input sets, built once and shared by the providers of one case.

    Args:
        key: identifies the case (and whether its inputs require grad); a new key frees the
            previous case's sets before building.
        build: seed -> one input set (a tuple whose tensors are the op's inputs).
        device: where the sets live (sizes the rotation to its cache).
    """
    if _CACHE["key"] != key:
        release_inputs()
        first = build(0)
        n = n_input_sets(tensor_bytes(first), device.type)
        _CACHE.update(key=key, sets=[first] + [build(i) for i in range(1, n)])
    return _CACHE["sets"]


class PeerMissing(Exception):
    """An outside peer (faiss, open_clip, flash-attn, xformers) cannot run here; says why."""


def import_peer(module: str, pip_name: str):
    """Import an outside peer, or raise PeerMissing naming the package to install."""
    try:
        return __import__(module, fromlist=["_"])
    except Exception as e:  # any import failure (missing, or built for another torch) is a skip
        raise PeerMissing(
            f"{module} is not importable ({type(e).__name__}: {e}); pip install {pip_name}"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _reasons(e: Exception) -> str:
    """An unavailable-backend message as one line: its bulleted reasons joined by '; '."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    bullets = [ln[2:] for ln in lines if ln.startswith("- ")]
    return "; ".join(bullets) if bullets else " ".join(lines)


# ------------------------------------------------------------------------------------------
# one measured (case, provider)
# ------------------------------------------------------------------------------------------


class Bench:
    """One (case, provider) of a bench test: where it runs, its skips, its measurement.

    Constructing it skips the test, before any input is built, when the session's time budget
    (--bench-deadline) is spent or when the preset runs on CUDA and there is none.

    Args:
        benchmark: the pytest-benchmark fixture (or bench/_benchmark_fallback.py's).
        op: the op's stem ("topk_similarity", "infonce", "attention", "model").
        case: the preset case, with "label" (shape text), "mode", "device" and "dtype" (the
            resolved name).
        provider: the provider's name, as the summary shows it.

    Attributes:
        device, dtype: the case's torch device and dtype.
    """

    def __init__(self, benchmark, op: str, case: dict, provider: str) -> None:
        self.benchmark, self.op, self.case, self.provider = benchmark, op, case, provider
        self.check_deadline()
        if case["device"] == "cuda" and not torch.cuda.is_available():
            self.skip(
                f"preset {STATE['preset']!r} runs on CUDA and torch.cuda.is_available() is False"
            )
        self.device = torch.device(case["device"])
        self.dtype = dtype_for(case["dtype"], self.device)

    def _record(self, **outcome: str) -> None:
        RESULTS.append(
            {"op": self.op, "case": self.case["label"], "provider": self.provider, **outcome}
        )

    def skip(self, reason: str) -> NoReturn:
        """Record that the provider cannot run this case (shown in the summary), then skip."""
        self._record(skipped=reason)
        pytest.skip(f"{self.provider}: {reason}")

    def check_deadline(self) -> None:
        """Skip when the session's time budget (--bench-deadline) is spent."""
        deadline = STATE.get("deadline")
        if deadline is not None and time.time() > deadline:
            self.skip("time budget spent (--bench-deadline)")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn the provider's errors into the case's outcome.

        BackendUnavailableError and PeerMissing skip with their reasons, out of memory skips
        saying so (eager at large N does), anything else is recorded as a failure and re-raised.
        """
        from vljepa_fast import BackendUnavailableError

        try:
            yield
        except (BackendUnavailableError, PeerMissing) as e:
            self.skip(_reasons(e))
        except torch.OutOfMemoryError as e:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.skip(f"out of memory: {_first_line(e)[:200]}")
        except Exception as e:
            self._record(failed=f"{type(e).__name__}: {_first_line(e)}"[:300])
            raise

    def run(
        self,
        make: Callable[[tuple], Callable[[], object]],
        sets: list[tuple],
        cost: Cost,
        *,
        compiled: bool = False,
        notes: Sequence[str] = (),
    ) -> dict:
        """Measure the provider on the case; record it in ``benchmark.extra_info`` and RESULTS.

        Args:
            make: input set -> a callable that runs the op once on it and returns its output (a
                tensor for "bwd" and "fwd+bwd"). Called for every set before any timing, so
                index builds, packing and masks stay out of the numbers. May raise
                BackendUnavailableError or PeerMissing: the case is then skipped with that
                reason.
            sets: the input sets to rotate through (tensors that require grad are the leaves).
            cost: FLOPs and bytes of one call, by the bench file's formula.
            compiled: the provider compiles on its first call (with a single warm-up call, that
                call's time does not size the rounds: they fill the budget at the fewest).
            notes: anything a reader of the numbers must know (e.g. threads of a peer).

        Returns:
            The summary row (also appended to RESULTS).
        """
        self.check_deadline()
        mode, device, benchmark = self.case["mode"], self.device, self.benchmark
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        with self.guard():
            calls = [make(s) for s in sets]
        leaves = [[t for t in s if isinstance(t, torch.Tensor) and t.requires_grad] for s in sets]
        outs: dict[int, object] = {}
        grads: dict[int, object] = {}

        def grad_for(i: int, out: torch.Tensor):
            if i not in grads:  # the first output (in warm-up) shapes the gradients of every set
                for j in range(len(sets)):
                    grads[j] = None if out.numel() == 1 else torch.randn_like(out)
            return grads[i]

        if mode == "fwd":

            def target(i: int):
                with torch.no_grad():
                    out = calls[i]()
                sync()
                return out
        elif mode == "fwd+bwd":

            def target(i: int):
                out = calls[i]()
                out.backward(grad_for(i, out))
                sync()
        elif mode == "bwd":

            def target(i: int):
                outs[i].backward(grads[i], retain_graph=True)
                sync()
        else:
            raise ValueError(f"mode: expected fwd, bwd or fwd+bwd, got {mode!r}")

        def prepare(i: int) -> None:
            for t in leaves[i]:
                t.grad = None
            if mode == "bwd" and i not in outs:
                outs[i] = out = calls[i]()
                grad_for(i, out)
            sync()

        timing = STATE["timing"]
        order = itertools.cycle(range(len(sets)))
        n_warm = timing.warmup
        with self.guard():
            for _ in range(n_warm):
                i = next(order)
                prepare(i)
                t0 = time.perf_counter()
                target(i)
                est = time.perf_counter() - t0
        if compiled and n_warm == 1:  # the one warm-up call compiled too: its time says little
            est = timing.budget_s
        rounds = max(
            timing.min_rounds, min(timing.max_rounds, math.ceil(timing.budget_s / max(est, 1e-9)))
        )

        meter = PeakMemory(device)
        state = {"round": 0}

        def setup():
            i = next(order)
            prepare(i)
            if state["round"] == 0:
                meter.start()
            return (i,), {}

        def teardown(i):
            if state["round"] == 0:
                meter.stop()
            state["round"] += 1

        benchmark.group = f"{self.op} | {self.case['label']}"
        with self.guard():
            benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds, iterations=1)
        if meter.peak is None and meter.available:  # --benchmark-disable: one call, no teardown
            meter.stop()
        stats = getattr(benchmark.stats, "stats", None)
        median = stats.median if stats is not None else est
        for ls in leaves:
            for t in ls:
                t.grad = None
        outs.clear()

        tflops_ceil, gbs_ceil, ceil_note = ceiling(device.type, self.case["dtype"])
        tflops = cost.flops / median / 1e12
        gbs = cost.nbytes / median / 1e9
        roofline = None
        if tflops_ceil and gbs_ceil:
            roofline = max(tflops / tflops_ceil, gbs / gbs_ceil)
        row = {
            "op": self.op,
            "case": self.case["label"],
            "mode": mode,
            "provider": self.provider,
            "median_s": median,
            "rounds": rounds,
            "warmup_calls": n_warm,
            "input_sets": len(sets),
            "peak_extra_bytes": meter.peak,
            "peak_method": meter.method,
            "input_bytes": tensor_bytes(sets[0]),
            "flops": cost.flops,
            "bytes": cost.nbytes,
            "formula": cost.formula,
            "tflops": tflops,
            "gbs": gbs,
            "roofline": roofline,
            "ceiling_tflops": tflops_ceil,
            "ceiling_gbs": gbs_ceil,
            "ceiling_note": ceil_note,
            "predicted_s": cost.predicted_s,
        }
        RESULTS.append(row)
        benchmark.extra_info.update(row)
        benchmark.extra_info.update(
            {
                "params": {k: v for k, v in self.case.items() if k != "label"},
                "preset": STATE["preset"],
                "notes": list(notes),
                "device": device_info(device.type),
                "versions": versions(),
            }
        )
        if device.type == "cuda":
            benchmark.extra_info["measured_ceilings"] = measured_ceilings()
        return row


def parametrize(
    metafunc,
    op: str,
    providers: Callable[[dict], list[str]],
    label: Callable[[dict], str],
    cases: Callable[[str], list[dict]] | None = None,
) -> None:
    """Parametrize a bench test over (case, provider) of the selected preset, providers innermost.

    Args:
        metafunc: pytest's Metafunc of a test taking ``case`` and ``provider``.
        op: the preset table's key for this op.
        providers: case -> provider names, in the order the summary shows them.
        label: case -> its shape text (the benchmark group and the summary's case column).
        cases: preset name -> the op's cases, for an op whose cases are not in bench/presets.py
            (default: ``presets.cases(name, op)``). The device and dtype rules are the same.
    """
    import presets

    if not {"case", "provider"} <= set(metafunc.fixturenames):
        return
    pairs, ids = [], []
    name = metafunc.config.getoption("preset")
    preset_device = presets.get(name).device
    if preset_device == "auto":  # is_available() does not initialise CUDA at collection
        preset_device = "cuda" if torch.cuda.is_available() else "cpu"
    for c in (cases or (lambda n: presets.cases(n, op)))(name):
        c = dict(c, device=preset_device)
        c["dtype"] = dtype_name(dtype_for(c["dtype"], torch.device(preset_device)))
        c["label"] = label(c)
        for p in providers(c):
            pairs.append((c, p))
            ids.append(f"{c['label']}-{p}".replace(" ", "_"))
    metafunc.parametrize("case,provider", pairs, ids=ids)


# ------------------------------------------------------------------------------------------
# what the pairwise-loss bench files (bench_infonce.py, bench_sigmoid_loss.py) share
# ------------------------------------------------------------------------------------------


def pair_label(c: dict) -> str:
    """The shape text of a pairwise-loss case: mode, batch N, width D and dtype."""
    return f"{c['mode']} N{c['N']} D{c['D']} {c['dtype']}"


def loss_providers(backend_op: str, peer: str) -> Callable[[dict], list[str]]:
    """case -> providers of a pairwise loss: the eager reference, its torch.compile (cases
    marked ``compile``), every non-reference backend registered for ``backend_op`` and the
    ``peer`` (e.g. open_clip's loss)."""
    from vljepa_fast import _backends

    def providers(c: dict) -> list[str]:
        fused = [f"vf.{r.name}" for r in _backends.records(backend_op) if r.name != "reference"]
        compiled = ["reference+compile"] if c.get("compile") else []
        return ["reference", *compiled, *fused, peer]

    return providers


def pair_rows(N: int, D: int, device, dtype, grad: bool, seed: int) -> tuple:
    """The two [N, D] inputs (pred, target) of a pairwise-loss case, leaves when ``grad``."""
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(
        torch.randn(N, D, generator=g, device=device, dtype=dtype).requires_grad_(grad)
        for _ in range(2)
    )
