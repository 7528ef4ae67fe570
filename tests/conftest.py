"""Test tiers (see docs/DESIGN.md): cpu, interpret, compile, gpu.

* A test without a tier marker is a ``cpu`` test.
* ``interpret`` tests run with TRITON_INTERPRET=1 in the environment while they run (the kernels
  route CPU tensors through Triton's interpreter); the kernel modules are imported before any
  test sets it, so they stay compiled-mode JITFunctions for the ``compile`` tier.
* ``gpu`` tests are skipped, at run time and with a reason, when there is no CUDA device.
* Under CI (CI=true) a skipped cpu, interpret or compile test is a failure: no tier may skip
  silently. The run ends with a per-tier count.
"""

from __future__ import annotations

import importlib
import os
from collections import Counter

import pytest
import torch

TIERS = ("cpu", "interpret", "compile", "gpu")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_counts: Counter = Counter()

for _mod in ("attention", "infonce", "rotary", "topk_similarity"):
    try:  # compile-mode JITFunctions, before any interpret test sets TRITON_INTERPRET
        importlib.import_module(f"vljepa_fast._kernels.{_mod}")
    except ImportError:
        pass


def _tier(item: pytest.Item) -> str:
    for t in TIERS:
        if item.get_closest_marker(t) is not None:
            return t
    return "cpu"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.cpu)


def pytest_runtest_setup(item):
    if _tier(item) == "gpu" and not torch.cuda.is_available():
        pytest.skip("gpu tier: no CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def _interpreter_env(request, monkeypatch):
    if request.node.get_closest_marker("interpret") is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    tier = _tier(item)
    if rep.skipped and IN_CI and tier != "gpu" and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"[CI] the {tier} tier must not skip: {rep.longrepr}"


def pytest_runtest_logreport(report):
    """Count outcomes per tier where reports arrive (the controller, also under pytest-xdist)."""
    tier = next((t for t in TIERS if t in report.keywords), "cpu")
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _counts[(tier, report.outcome)] += 1


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("vljepa_fast test tiers")
    for tier in TIERS:
        got = {o: _counts[(tier, o)] for o in ("passed", "failed", "skipped")}
        note = ""
        if tier == "gpu" and got["skipped"] and not got["passed"]:
            note = "  (no CUDA device here: run scripts/gpu_run.sh on a GPU machine)"
        tr.write_line(
            f"{tier:<10} passed {got['passed']:>4}  failed {got['failed']:>4}  "
            f"skipped {got['skipped']:>4}{note}"
        )


def pytest_sessionfinish(session, exitstatus):
    """Under CI a full run (no -m / -k / path selection) fails when a required tier ran nothing."""
    cfg = session.config
    full_run = (
        not cfg.getoption("markexpr") and not cfg.getoption("keyword") and cfg.args == ["tests"]
    )
    is_worker = hasattr(cfg, "workerinput")  # pytest-xdist workers see only their share
    if not (IN_CI and full_run) or is_worker or exitstatus not in (0,):
        return
    empty = [t for t in ("cpu", "interpret", "compile") if _counts[(t, "passed")] == 0]
    if empty:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"[CI] tiers that ran no test: {', '.join(empty)}", red=True
        )
        session.exitstatus = 1
