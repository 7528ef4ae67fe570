"""scripts/gpu_run.py, the prepared GPU run: its schedule fits the 8-minute budget and schedules
every bench file, the arch and worker choices, the packing of the output folder and the check of
its limits (at most 8 plain files of at most 16 MiB, names [A-Za-z0-9._-], two folders deep),
the merge of the per-op benchmark JSON files, a step cut at its end (SIGINT first, so pytest
can still write its files), and the pytest-benchmark stand-in of bench/. The whole dry run
(`bash scripts/gpu_run.sh --dry-run`) runs in .ci/run, not here.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "scripts" / "gpu_run.py")
gpu_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_run)

pytestmark = pytest.mark.cpu


def test_plan_fits_the_budget():
    assert gpu_run.BUDGET_S <= 480
    assert gpu_run.plan_total() < gpu_run.BUDGET_S, gpu_run.PLAN
    assert all(seconds > 0 for _, seconds in gpu_run.PLAN)
    ends = gpu_run.step_ends()
    assert list(ends) == [name for name, _ in gpu_run.PLAN]
    assert max(ends.values()) + gpu_run.PACK_RESERVE_S == gpu_run.plan_total()
    dry = gpu_run.step_ends(factor=gpu_run.DRY_RUN_FACTOR)
    assert all(dry[n] == gpu_run.DRY_RUN_FACTOR * ends[n] for n in ends)


def test_every_bench_file_has_its_own_budget():
    steps = {name for name, _ in gpu_run.PLAN}
    ops = gpu_run.bench_ops()
    assert {"topk_similarity", "infonce", "attention", "model"} <= set(ops)
    missing = [op for op in ops if f"bench_{op}" not in steps]
    assert not missing, f"bench files without a step in PLAN: {missing}"
    for name, seconds in gpu_run.PLAN:
        if name.startswith("bench_"):
            # a positive --bench-deadline with time to measure before the tail
            assert seconds >= gpu_run.BENCH_TAIL_S + 15, name
            assert (ROOT / "bench" / f"{name}.py").is_file(), name


def test_wrapper_runs_python3_and_the_plan():
    text = (ROOT / "scripts" / "gpu_run.sh").read_text()
    assert 'exec "${PYTHON:-python3}" scripts/gpu_run.py "$@"' in text


@pytest.mark.parametrize(
    "capability, archs", [((9, 0), "9.0a"), ((8, 0), "8.0"), ((8, 6), "8.6"), ((10, 0), "10.0")]
)
def test_cuda_archs_for_the_device(capability, archs):
    assert gpu_run.cuda_archs(capability) == archs


def test_test_workers():
    assert gpu_run.test_workers(16, True) == gpu_run.MAX_TEST_WORKERS
    assert gpu_run.test_workers(2, True) == 2
    assert gpu_run.test_workers(16, False) == 1
    assert gpu_run.test_workers(0, True) == 1


def _work_folder(tmp: Path, big: int) -> Path:
    work = tmp / "work"
    (work / "report").mkdir(parents=True)
    for i in range(12):
        (work / f"step{i}.log").write_text(f"log {i}\n" * 50)
    (work / "report" / "report.md").write_text("# report\n")
    (work / "report" / "a_speedup.png").write_bytes(b"\x89PNG" + bytes(range(256)) * 8)
    (work / "huge.log").write_bytes(b"head\n" + b"x" * big + b"\ntail\n")
    (work / "bench.json").write_text(json.dumps({"benchmarks": []}))
    return work


def test_pack_writes_at_most_8_files_within_the_limits(tmp_path):
    work = _work_folder(tmp_path, big=6 << 20)  # one log over MEMBER_CAP
    out = tmp_path / "out"
    members = gpu_run.pack(work, out, "# summary\n")
    assert gpu_run.check_out(out) == []
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench.json", "gpu_run.tar.gz", "report.md", "summary.md"]
    assert (out / "summary.md").read_text() == "# summary\n"
    with tarfile.open(out / "gpu_run.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(members)
        assert "report/a_speedup.png" in members and "step11.log" in members
        huge = tar.extractfile("huge.log").read()
    assert len(huge) < gpu_run.MEMBER_CAP + 200
    assert huge.startswith(b"head\n") and huge.endswith(b"\ntail\n") and b"bytes cut" in huge


def test_pack_shrinks_members_and_gzips_a_large_json_to_fit(tmp_path):
    limits = dict(gpu_run.OUT_LIMITS, file_bytes=64 << 10)
    work = _work_folder(tmp_path, big=0)
    (work / "noise.bin").write_bytes(bytes(range(256)) * 2048)  # 512 KiB, barely compressible
    (work / "bench.json").write_text(json.dumps({"benchmarks": ["x" * 100] * 2000}))  # ~200 KiB
    out = tmp_path / "out"
    gpu_run.pack(work, out, "# summary\n", limits=limits)
    assert gpu_run.check_out(out, limits) == []
    assert (out / "bench.json.gz").is_file() and not (out / "bench.json").exists()


def test_check_out_names_every_violation(tmp_path):
    limits = dict(gpu_run.OUT_LIMITS, file_bytes=1000)
    out = tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True)
    for i in range(8):
        (out / f"f{i}.txt").write_text("ok")
    (out / "a" / "b" / "c" / "deep.txt").write_text("deep")
    (out / "big.bin").write_bytes(b"x" * 1001)
    (out / "a b.txt").write_text("space")
    (out / "link").symlink_to(out / "f0.txt")
    problems = "\n".join(gpu_run.check_out(out, limits))
    assert "11 files > 8" in problems
    assert "big.bin: 1001 bytes > 1000" in problems
    assert "a/b/c: folder deeper than 2" in problems
    assert "a/b/c/deep.txt: more than 2 folders deep" in problems
    assert "a b.txt: name outside" in problems
    assert "link: a link" in problems
    fine = tmp_path / "fine"
    (fine / "a" / "b").mkdir(parents=True)
    (fine / "a" / "b" / "x.md").write_text("two folders deep is allowed")
    assert gpu_run.check_out(fine, limits) == []


def _bench(op: str, provider: str, median: float) -> dict:
    info = {"op": op, "case": "fwd N8", "mode": "fwd", "provider": provider}
    return {"name": f"test_{op}", "stats": {"median": median}, "extra_info": info}


def test_merge_bench_json_keeps_every_op(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    a = {
        "datetime": "d",
        "machine_info": {"vljepa_fast": {"device": {"type": "cuda"}}},
        "benchmarks": [_bench("topk_similarity", "reference", 2.0), _bench("x", "vf.cuda", 1.0)],
        "vljepa_fast": {"preset": "gpu", "skipped": [], "failed": []},
    }
    skip = {"op": "infonce", "case": "fwd N8", "provider": "p", "skipped": "time budget spent"}
    b = {
        "benchmarks": [_bench("infonce", "reference", 3.0)],
        "vljepa_fast": {"preset": "gpu", "skipped": [skip], "failed": []},
    }
    paths = []
    for name, data in (("a.json", a), ("b.json", b)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(data))
    (tmp_path / "broken.json").write_text("{")  # a file cut by the kill is left out
    merged = gpu_run.merge_bench_json([*paths, tmp_path / "broken.json"])
    assert [x["extra_info"]["op"] for x in merged["benchmarks"]] == [
        "topk_similarity",
        "x",
        "infonce",
    ]
    assert merged["vljepa_fast"]["skipped"] == [skip]
    assert merged["vljepa_fast"]["files"] == ["a.json", "b.json"]
    assert merged["machine_info"] == a["machine_info"]
    (tmp_path / "m.json").write_text(json.dumps(merged))
    rows = report.load(tmp_path / "m.json")["rows"]
    assert {r["op"] for r in rows} == {"topk_similarity", "x", "infonce"}
    assert gpu_run.merge_bench_json([tmp_path / "broken.json"]) is None


def test_a_step_gets_sigint_before_it_is_cut(tmp_path, monkeypatch):
    # SIGINT comes GRACE_S before the step's end, time for the child to enter its try block
    monkeypatch.setattr(gpu_run, "GRACE_S", 4)
    # as under pytest-xdist or nohup: the step must still see SIGINT as KeyboardInterrupt
    # (regression: it inherited SIG_IGN and was only killed at the end, outputs unwritten)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    run = gpu_run.Run(tmp_path / "out", dry=True)
    (tmp_path / "out").mkdir()
    try:
        run.ends = {"slow": 8, "quick": 60}
        flag = tmp_path / "interrupted"
        child = (
            "import sys, time\n"
            "try:\n    time.sleep(30)\n"
            f"except KeyboardInterrupt:\n    open({str(flag)!r}, 'w').write('yes')\n"
            "    sys.exit(2)\n"
        )
        assert run.step("slow", [sys.executable, "-c", child]) == 124
        assert flag.read_text() == "yes", "the step was killed without a SIGINT first"
        assert run.step("quick", [sys.executable, "-c", "raise SystemExit(5)"]) == 5
        assert [(r["step"], r["status"]) for r in run.rows] == [
            ("slow", "timeout"),
            ("quick", "failed"),  # exit 5 (pytest: no test ran) is a failure
        ]
        assert run.failed() == ["slow", "quick"]
        text = (tmp_path / "out" / "summary.md").read_text()
        assert "| slow | timeout | 124 |" in text and "| quick | failed | 5 |" in text
    finally:
        import shutil

        signal.signal(signal.SIGINT, previous)
        shutil.rmtree(run.work, ignore_errors=True)


def test_benchmark_fallback_when_pytest_benchmark_is_missing(tmp_path):
    """The bench files run on bench/_benchmark_fallback.py, and report.py reads its JSON."""
    path = tmp_path / "fallback.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "bench/bench_topk_similarity.py",
            "-p",
            "no:benchmark",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            "--preset",
            "smoke",
            "-k",
            "reference",
            f"--benchmark-json={path}",
            "--benchmark-columns=median",
            "-q",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(path.read_text())
    assert "fallback" in data["version"]
    assert data["vljepa_fast"]["preset"] == "smoke"  # the conftest's hooks ran
    assert data["machine_info"]["vljepa_fast"]["device"]["type"] == "cpu"
    (bench,) = data["benchmarks"]
    assert bench["extra_info"]["provider"] == "reference" and bench["stats"]["median"] > 0
    assert bench["stats"]["rounds"] >= 2
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    (row,) = report.load(path)["rows"]
    assert row["op"] == "topk_similarity" and row["median_s"] == bench["stats"]["median"]
