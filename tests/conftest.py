"""Test tiers (docs/DESIGN.md, "Tests"): cpu, interpret, compile, gpu.

* A test without a tier marker is a ``cpu`` test.
* Triton's interpreter is a per-process choice (``@triton.jit`` reads TRITON_INTERPRET when a
  kernel module is imported; nothing patches Triton to mix the two). A process started with
  TRITON_INTERPRET=1 runs the ``interpret`` tier only; a process without it runs the other tiers
  and leaves the interpret tests out, saying so in its header and summary. ``bash
  scripts/test.sh`` (README's test command) runs both processes; by hand:
  ``python -m pytest tests`` then ``TRITON_INTERPRET=1 python -m pytest tests``. The compile
  tier (AOT compilation needs compiled JITFunctions) therefore never runs under the interpreter.
* ``gpu`` tests are skipped, at run time and with a reason, when there is no CUDA device.
* Under CI (CI=true) a skipped cpu, interpret or compile test is a failure: no tier may skip
  silently; and a full run (``pytest tests``, no -m / -k) fails when a tier this process runs
  (cpu and compile, or interpret) ran no test. The run ends with a per-tier count.

Shared fixtures: ``poisoned`` (every floating tensor made by torch.empty / torch.empty_like
during the test starts as NaN; the context-manager form is ``tests._util.poisoned_allocations``).
"""

from __future__ import annotations

import os
import shlex
from collections import Counter

import pytest
import torch

# the test modules import ``tests._util``: pyproject's ``pythonpath = ["."]`` puts the repository
# root on sys.path also under a plain ``pytest``
from tests._util import poisoned_allocations

TIERS = ("cpu", "interpret", "compile", "gpu")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _interpreter_process() -> bool:
    """Whether this process's ``@triton.jit`` kernels are interpreted (TRITON_INTERPRET, as
    Triton itself reads it)."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


INTERPRETER = _interpreter_process()
#: the tiers this process runs
PROCESS_TIERS = ("interpret",) if INTERPRETER else ("cpu", "compile", "gpu")


def _other_process(config) -> str:
    """How to run the tiers this process does not: the same command line in the other kind of
    process (so ``pytest tests/test_x.py`` is told about ``tests/test_x.py``, not the suite)."""
    args = " ".join(shlex.quote(a) for a in config.invocation_params.args) or "tests"
    if INTERPRETER:
        return f"they run in a process without TRITON_INTERPRET: python -m pytest {args}"
    return f"it runs in its own process: TRITON_INTERPRET=1 python -m pytest {args}"


_counts: Counter = Counter()
_left_out: Counter = Counter()  # tests of tiers this process does not run, by tier


def _tier(item: pytest.Item) -> str:
    for t in TIERS:
        if item.get_closest_marker(t) is not None:
            return t
    return "cpu"


def pytest_report_header(config):
    if INTERPRETER:
        return [
            "vljepa_fast tiers: interpret only (TRITON_INTERPRET=1: Triton's interpreter); "
            f"cpu, compile and gpu are left out, {_other_process(config)} "
            "(bash scripts/test.sh runs both)"
        ]
    return [
        "vljepa_fast tiers: cpu, compile, gpu; the interpret tier is left out, "
        f"{_other_process(config)} (bash scripts/test.sh runs both)"
    ]


def pytest_collection_modifyitems(config, items):
    # runs before -m / -k select (pytest's own hook runs after conftest ones), so `-m cpu` sees
    # the default marker
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.cpu)


class _ProcessTiers:
    """Leaves out the tests of tiers this process does not run, after -m / -k selected."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        keep, out = [], []
        for item in items:
            (keep if _tier(item) in PROCESS_TIERS else out).append(item)
        if out:
            _left_out.update(_tier(item) for item in out)
            config.hook.pytest_deselected(items=out)
            items[:] = keep


def pytest_configure(config):
    config.pluginmanager.register(_ProcessTiers(), "vljepa_fast_process_tiers")


def pytest_runtest_setup(item):
    if _tier(item) == "gpu" and not torch.cuda.is_available():
        pytest.skip("gpu tier: no CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture
def poisoned():
    """NaN-fill every floating tensor made by torch.empty / torch.empty_like during the test.

    Yields the list of poisoned tensors (a test can assert it is not empty: poisoning that
    reached no allocation proves nothing).
    """
    with poisoned_allocations() as made:
        yield made


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
    # which Triton compiled the kernels (scripts/test.sh runs the attention compile tier under
    # a second version too; .ci/run reads this line to tell the tables apart)
    try:
        import triton

        tr.write_line(f"triton     {triton.__version__} ({os.path.dirname(triton.__file__)})")
    except ImportError:
        tr.write_line("triton     not installed")
    for tier in TIERS:
        if tier not in PROCESS_TIERS:
            # under pytest-xdist the workers collect, so the count is not known here
            n = _left_out[tier]
            n = f" ({n} test{'s' * (n != 1)} left out)" if n else ""
            tr.write_line(f"{tier:<10} not run in this process{n}: {_other_process(tr.config)}")
            continue
        got = {o: _counts[(tier, o)] for o in ("passed", "failed", "skipped")}
        note = ""
        if tier == "gpu" and got["skipped"] and not got["passed"]:
            note = "  (no CUDA device here: run scripts/gpu_run.sh on a GPU machine)"
        tr.write_line(
            f"{tier:<10} passed {got['passed']:>4}  failed {got['failed']:>4}  "
            f"skipped {got['skipped']:>4}{note}"
        )


def pytest_sessionfinish(session, exitstatus):
    """Under CI a full run (no -m / -k / path selection) fails when a tier it runs ran nothing."""
    cfg = session.config
    full_run = (
        not cfg.getoption("markexpr") and not cfg.getoption("keyword") and cfg.args == ["tests"]
    )
    is_worker = hasattr(cfg, "workerinput")  # pytest-xdist workers see only their share
    if not (IN_CI and full_run) or is_worker or exitstatus not in (0,):
        return
    required = [t for t in ("cpu", "interpret", "compile") if t in PROCESS_TIERS]
    empty = [t for t in required if _counts[(t, "passed")] == 0]
    if empty:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"[CI] tiers that ran no test: {', '.join(empty)}", red=True
        )
        session.exitstatus = 1
