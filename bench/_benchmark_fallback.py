"""A small stand-in for pytest-benchmark, registered by bench/conftest.py only when the
pytest-benchmark plugin is not loaded (the GPU machine has no package registry and may lack it).

It provides what the bench files use and nothing more: the ``benchmark`` fixture with
``pedantic(target, setup=, teardown=, rounds=, iterations=1)``, ``group``, ``extra_info`` and
``stats.stats`` (min, max, mean, stddev, median, iqr, rounds), the options ``--benchmark-only``,
``--benchmark-disable``, ``--benchmark-json PATH`` and ``--benchmark-columns``, and a JSON file in
pytest-benchmark's layout (``machine_info``, ``commit_info``, ``benchmarks`` with ``stats`` and
``extra_info``, ``datetime``, ``version``), passed through the same two hooks
(``pytest_benchmark_update_machine_info``, ``pytest_benchmark_update_json``), so that
bench/report.py reads it unchanged. Timing: time.perf_counter around each round's target call,
setup and teardown outside the timer, as pytest-benchmark's pedantic mode. ``version`` names
this fallback, so a reader of the JSON knows which timer produced it.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import pytest

VERSION = "vljepa_fast bench/_benchmark_fallback.py (pytest-benchmark not installed)"
_DONE: list[Benchmark] = []


class HookSpecs:
    """pytest-benchmark's two hooks that bench/conftest.py implements."""

    @pytest.hookspec
    def pytest_benchmark_update_machine_info(self, config, machine_info):
        """Add to the machine_info dict of the JSON."""

    @pytest.hookspec
    def pytest_benchmark_update_json(self, config, benchmarks, output_json):
        """Edit the JSON before it is written."""


def pytest_addhooks(pluginmanager):
    pluginmanager.add_hookspecs(HookSpecs)


def pytest_addoption(parser):
    group = parser.getgroup("benchmark", "benchmark (vljepa_fast fallback timer)")
    group.addoption("--benchmark-only", action="store_true", help="accepted; every test times")
    group.addoption(
        "--benchmark-disable", action="store_true", help="run each target once, untimed"
    )
    group.addoption("--benchmark-json", default=None, metavar="PATH", help="write the JSON here")
    group.addoption("--benchmark-columns", default=None, help="accepted, ignored")


class Stats:
    """Seconds per round of one benchmark: min, max, mean, stddev, median, iqr, rounds."""

    def __init__(self, data: list[float]):
        self.data = list(data)
        self.rounds = len(data)
        self.min, self.max = min(data), max(data)
        self.mean = statistics.fmean(data)
        self.stddev = statistics.stdev(data) if len(data) > 1 else 0.0
        self.median = statistics.median(data)
        if len(data) > 1:
            q1, _, q3 = statistics.quantiles(data, n=4)
            self.iqr = q3 - q1
        else:
            self.iqr = 0.0

    def as_dict(self) -> dict:
        keys = ("min", "max", "mean", "stddev", "median", "iqr", "rounds")
        out = {k: getattr(self, k) for k in keys}
        out.update(iterations=1, ops=1.0 / self.mean if self.mean > 0 else None)
        return out


class _Metadata:
    def __init__(self, stats: Stats):
        self.stats = stats


class Benchmark:
    """The ``benchmark`` fixture: pedantic mode only (what bench/_harness.py calls)."""

    def __init__(self, node, disabled: bool):
        self.name = node.name
        self.fullname = node.nodeid
        callspec = getattr(node, "callspec", None)
        self.params = dict(callspec.params) if callspec is not None else None
        self.group: str | None = None
        self.extra_info: dict = {}
        self.stats: _Metadata | None = None
        self.disabled = disabled

    def pedantic(
        self,
        target,
        args=(),
        kwargs=None,
        setup=None,
        teardown=None,
        rounds=1,
        warmup_rounds=0,
        iterations=1,
    ):
        if iterations != 1:
            raise ValueError(f"iterations: the fallback timer supports 1, got {iterations}")
        rounds = 1 if self.disabled else rounds
        times, result = [], None
        for i in range(warmup_rounds + rounds):
            a, kw = args, dict(kwargs or {})
            if setup is not None:
                made = setup()
                if made is not None:
                    a, kw = made
            t0 = time.perf_counter()
            result = target(*a, **kw)
            elapsed = time.perf_counter() - t0
            if teardown is not None:
                teardown(*a, **kw)
            if i >= warmup_rounds:
                times.append(elapsed)
        if not self.disabled:
            self.stats = _Metadata(Stats(times))
            _DONE.append(self)
        return result

    def as_dict(self) -> dict:
        return {
            "group": self.group,
            "name": self.name,
            "fullname": self.fullname,
            "params": self.params,
            "param": None,
            "extra_info": self.extra_info,
            "options": {"timer": "time.perf_counter", "fallback": True},
            "stats": self.stats.stats.as_dict(),
        }


@pytest.fixture
def benchmark(request):
    return Benchmark(request.node, request.config.getoption("benchmark_disable"))


def output_json(config, done: list[Benchmark]) -> dict:
    """The JSON of pytest-benchmark's layout for the benchmarks that ran."""
    machine = {
        "node": platform.node(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "python_implementation": platform.python_implementation(),
        "python_version": platform.python_version(),
        "system": platform.system(),
        "release": platform.release(),
    }
    config.hook.pytest_benchmark_update_machine_info(config=config, machine_info=machine)
    data = {
        "machine_info": machine,
        "commit_info": {},
        "benchmarks": [b.as_dict() for b in done],
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": VERSION,
    }
    config.hook.pytest_benchmark_update_json(config=config, benchmarks=done, output_json=data)
    return data


def pytest_sessionfinish(session):
    path = session.config.getoption("benchmark_json")
    if path:
        data = output_json(session.config, _DONE)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def pytest_report_header(config):
    return f"benchmark: {VERSION}"
