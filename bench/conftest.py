"""pytest setup of the benchmarks: ``pytest bench/ --benchmark-only [--preset NAME]``.

* Collects ``bench/bench_*.py`` and makes bench/ importable (``_harness``, ``presets``, ``report``).
* ``--preset smoke|cpu|gpu|paper`` picks the shape table (default: ``gpu`` with CUDA, else ``cpu``);
  ``--bench-deadline SECONDS`` skips the cases that would start after that many seconds, so a
  time-boxed run (scripts/gpu_run.sh) still ends normally and writes its JSON.
* Prints the device and versions in the header, one progress line per case (cases left), and
  a closing summary: per op and shape, every provider's median time, speedup over the eager
  reference, peak extra memory, TFLOP/s, GB/s and fraction of the roofline, then the providers
  that were skipped and why.
* Adds device metadata, versions, ceilings and skips to the ``--benchmark-json`` file.
* Under ``--bench-deadline`` the cases run most valuable first, so that a time-boxed run measures
  every shape before it runs out: every shape's fwd+bwd, then fwd, then bwd, and the torch.compile
  providers (slowest to start, not our kernels) after all of them.
* Without the pytest-benchmark plugin (a GPU machine without a registry may lack it), the
  stand-in bench/_benchmark_fallback.py provides the ``benchmark`` fixture and the JSON.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import _harness  # noqa: E402
import presets  # noqa: E402
import pytest  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402

_progress = {"config": None, "total": 0, "done": 0, "start": 0.0}


def pytest_addoption(parser, pluginmanager):
    if not pluginmanager.has_plugin("benchmark"):  # pytest-benchmark is not installed (or -p no:)
        import _benchmark_fallback

        pluginmanager.register(_benchmark_fallback, "vljepa_fast_benchmark_fallback")
    group = parser.getgroup("vljepa_fast bench")
    group.addoption(
        "--preset",
        default=None,
        choices=sorted(presets.PRESETS),
        help="shape table of bench/presets.py (default: gpu when CUDA is available, else cpu)",
    )
    group.addoption(
        "--bench-deadline",
        type=float,
        default=None,
        metavar="SECONDS",
        help="skip cases that would start more than SECONDS after the session began",
    )


def pytest_configure(config):
    name = config.getoption("preset") or presets.default_preset(torch.cuda.is_available())
    config.option.preset = name
    deadline = config.getoption("bench_deadline")
    _harness.STATE.update(
        preset=name,
        timing=presets.get(name).timing,
        deadline=None if deadline is None else time.time() + deadline,
    )
    _progress.update(config=config, start=time.time())


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device_type() -> str:
    preset = presets.get(_harness.STATE["preset"])
    if preset.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preset.device


def _machine() -> dict:
    dev = _device_type()
    if dev == "cuda" and not torch.cuda.is_available():
        dev = "cpu"
    info = {
        "preset": _harness.STATE["preset"],
        "device": _harness.device_info(dev),
        "versions": _harness.versions(),
        "ceilings_table": [list(c) for c in _harness.CEILINGS],
    }
    if dev == "cuda":
        info["measured_ceilings"] = _harness.measured_ceilings()
    return info


def pytest_report_header(config):
    m = _machine()
    dev = m["device"]
    lines = [f"vljepa_fast bench: preset {m['preset']!r} on {dev['type']} {dev.get('name')}"]
    if dev["type"] == "cpu":
        lines.append(
            f"  cores {dev['cores_available']} available of {dev['logical_cores']}, "
            f"torch threads {dev['torch_threads']}; no published ceiling for CPUs"
        )
    else:
        lines.append(
            f"  driver {dev.get('driver')}, SM clock {dev.get('sm_clock_mhz')} of "
            f"{dev.get('sm_clock_max_mhz')} MHz, power {dev.get('power_w')} W, "
            f"measured {m.get('measured_ceilings')}"
        )
    lines.append("  " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    return lines


#: order of the modes under --bench-deadline (training steps first)
_MODE_RANK = {"fwd+bwd": 0, "fwd": 1, "bwd": 2}


def pytest_collection_modifyitems(config, items):
    """Under --bench-deadline: every shape's fwd+bwd, then fwd, then bwd; torch.compile last.

    The providers of one case stay together (a case's inputs are built once for all of them).
    """
    if config.getoption("bench_deadline") is None:
        return

    def key(pair):
        index, item = pair
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        case, provider = params.get("case") or {}, str(params.get("provider", ""))
        return ("compile" in provider, _MODE_RANK.get(case.get("mode"), len(_MODE_RANK)), index)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def pytest_collection_finish(session):
    _progress["total"] = len(session.items)


def pytest_runtest_logfinish(nodeid, location):
    config = _progress["config"]
    tr = config.pluginmanager.get_plugin("terminalreporter") if config else None
    if tr is None:
        return
    _progress["done"] += 1
    done, total = _progress["done"], _progress["total"]
    elapsed = time.time() - _progress["start"]
    tr.ensure_newline()
    tr.write_line(
        f"[bench {done}/{total}, {total - done} left, {elapsed:.0f} s] {nodeid.rsplit('::', 1)[-1]}"
    )


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["vljepa_fast"] = _machine()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["vljepa_fast"] = {
        "preset": _harness.STATE["preset"],
        "skipped": [r for r in _harness.RESULTS if "skipped" in r],
        "failed": [r for r in _harness.RESULTS if "failed" in r],
    }


def pytest_terminal_summary(terminalreporter):
    if not _harness.RESULTS:
        return
    tr = terminalreporter
    tr.section(f"vljepa_fast benchmarks (preset {_harness.STATE['preset']!r})")
    for line in report.summary_lines(_harness.RESULTS):
        tr.write_line(line)


def pytest_sessionfinish(session):
    _harness.release_inputs()
