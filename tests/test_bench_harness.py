"""The bench harness pieces that can be wrong: FLOP and byte formulas, padding lengths, the CPU
peak-memory method, presets, and the report on a small synthetic pytest-benchmark JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402
import presets  # noqa: E402
import report  # noqa: E402

pytestmark = pytest.mark.cpu


def test_topk_formulas():
    assert _harness.topk_flops(256, 200_000, 768) == 2 * 256 * 200_000 * 768
    assert _harness.topk_bytes(1_000_000, 1536, 2) == 1_000_000 * 1536 * 2


def test_infonce_formulas():
    N, D = 4096, 1536
    fwd = _harness.infonce_flops(N, D, "fwd")
    assert fwd == 2 * N * N * D
    assert _harness.infonce_flops(N, D, "fwd+bwd") == 4 * fwd  # fwd + recompute + two GEMMs
    assert _harness.infonce_flops(N, D, "bwd") == 3 * fwd
    assert _harness.infonce_bytes(N, D, 2, "fwd") == 2 * N * D * 2
    assert _harness.infonce_bytes(N, D, 2, "fwd+bwd") == 6 * N * D * 2


def test_attention_formulas_count_real_tokens():
    Hq, Hkv, D = 32, 8, 64
    full = _harness.attention_flops([512] * 4, Hq, D, False, "fwd")
    assert full == 4 * 4 * 512 * 512 * D * Hq
    assert _harness.attention_flops([512] * 4, Hq, D, True, "fwd") == full // 2
    assert _harness.attention_flops([512] * 4, Hq, D, False, "bwd") == int(2.5 * full)
    assert _harness.attention_flops([512] * 4, Hq, D, False, "fwd+bwd") == int(3.5 * full)
    # padding: only the real tokens of each sequence count
    assert _harness.attention_flops([3, 5], Hq, D, False, "fwd") == 4 * (9 + 25) * D * Hq
    fwd_bytes = _harness.attention_bytes([3, 5], Hq, Hkv, D, 2, "fwd")
    assert fwd_bytes == (2 * 8 * Hq + 2 * 8 * Hkv) * D * 2
    assert _harness.attention_bytes([3, 5], Hq, Hkv, D, 2, "bwd") == 2 * fwd_bytes


@pytest.mark.parametrize("B,T,pad", [(32, 512, 0.5), (4, 4608, 0.5), (3, 100, 0.3), (1, 64, 0.5)])
def test_padded_lengths(B, T, pad):
    lengths = _harness.padded_lengths(B, T, pad)
    assert len(lengths) == B and all(1 <= n <= T for n in lengths)
    mean = sum(lengths) / (B * T)
    assert abs(mean - (1 - pad)) < 0.02, mean
    if B > 1:
        assert min(lengths) < max(lengths)  # a real batch mixes lengths
    assert _harness.padded_lengths(B, T, 0.0) == [T] * B


_MiB = 1 << 20


def _measure(fn) -> int:
    meter = _harness.PeakMemory(torch.device("cpu"))
    if not meter.available:
        pytest.skip(meter.method)
    meter.start()
    fn()
    return meter.stop()


def test_cpu_peak_memory_sees_a_known_allocation():
    size = 96 * _MiB

    def alloc():
        x = torch.empty(size // 4, dtype=torch.float32)
        x.fill_(1.5)  # touched, as any kernel output is
        del x

    peak = _measure(alloc)
    assert 0.95 * size <= peak <= size + 24 * _MiB, peak / _MiB


def test_cpu_peak_memory_ignores_memory_held_before():
    held = torch.randn(64 * _MiB // 4)
    peak = _measure(lambda: torch.randn(16).sum())
    assert peak < 8 * _MiB, peak / _MiB
    del held


def test_cpu_peak_memory_sees_reuse_of_freed_heap_pages():
    # Freeing a 4 MiB block raises glibc's mmap threshold, so the 1 MiB blocks below come from
    # the heap; freed under a live allocation ("pin"), their pages stay resident, and a call
    # that reuses them would show no growth unless malloc_trim returns them first.
    t = torch.empty(4 * _MiB // 4)
    t.fill_(0.5)
    del t
    blocks = [torch.randn(_MiB // 4) for _ in range(48)]
    pin = torch.randn(_MiB // 8)  # 512 KiB: too big for any free list, so it comes from the top
    del blocks

    def alloc():
        again = [torch.ones(_MiB // 4) for _ in range(48)]
        del again

    peak = _measure(alloc)
    assert peak >= 40 * _MiB, peak / _MiB
    del pin


def test_cpu_has_no_ceiling():
    tflops, gbs, note = _harness.ceiling("cpu", "float32")
    assert tflops is None and gbs is None and "no ceiling" in note


def test_ceiling_table_matches_known_gpus():
    names = [name for name, _, _ in _harness.CEILINGS]
    # the first matching entry wins, so "H100 PCIe" must precede "H100"
    assert names.index("H100 PCIe") < names.index("H100")
    h200 = dict((n, (t, g)) for n, t, g in _harness.CEILINGS)["H200"]
    assert h200[0]["bfloat16"] == pytest.approx(989) and h200[1] == pytest.approx(4800)


def test_input_rotation_covers_the_cache():
    llc = _harness.llc_bytes("cpu")
    assert _harness.n_input_sets(10 * llc, "cpu") == 1
    assert _harness.n_input_sets(1024, "cpu") == _harness.MAX_INPUT_SETS
    assert _harness.n_input_sets(llc, "cpu") == 2


def test_preset_selection():
    assert presets.default_preset(cuda_available=False) == "cpu"
    assert presets.default_preset(cuda_available=True) == "gpu"
    with pytest.raises(ValueError, match="--preset"):
        presets.get("huge")
    for name, preset in presets.PRESETS.items():
        assert set(preset.cases) == {"topk_similarity", "infonce", "attention"}, name


def test_cpu_and_gpu_presets_hold_the_issue_shapes():
    (topk,) = presets.cases("cpu", "topk_similarity")
    assert (topk["Q"], topk["N"], topk["D"], topk["k"], topk["dtype"]) == (
        256,
        200_000,
        768,
        10,
        "float32",
    )
    infonce = presets.cases("cpu", "infonce")
    assert {(c["N"], c["mode"]) for c in infonce} >= {
        (8192, "fwd"),
        (8192, "fwd+bwd"),
        (2048, "fwd"),
    }
    gpu_topk = presets.cases("gpu", "topk_similarity")
    assert {(c["Q"], c["k"]) for c in gpu_topk} == {(16, 10), (16, 100), (1024, 10), (1024, 100)}
    gpu_attn = presets.cases("gpu", "attention")
    assert {c["T"] for c in gpu_attn} == {512, 1024, 4608}
    assert {c["mode"] for c in gpu_attn} == {"fwd", "bwd", "fwd+bwd"}
    for c in gpu_attn:
        assert abs(c["B"] * c["T"] - 16384) <= 0.15 * 16384  # about 16k tokens per batch


def test_smoke_preset_is_tiny():
    for op in ("topk_similarity", "infonce", "attention"):
        for c in presets.cases("smoke", op):
            numel = max(
                c.get("N", 0) * c.get("D", 0),
                c.get("B", 0) * c.get("T", 0) * c.get("Hq", 0) * c.get("D", 0),
            )
            assert numel <= 1 << 20, (op, c)


def _bench(op: str, case: str, provider: str, median: float, peak: int | None) -> dict:
    return {
        "group": f"{op} | {case}",
        "name": f"test_{op}[{provider}]",
        "fullname": "x",
        "params": None,
        "param": None,
        "options": {},
        "stats": {"median": median, "min": median, "max": median, "mean": median, "rounds": 3},
        "extra_info": {
            "op": op,
            "case": case,
            "mode": "fwd",
            "provider": provider,
            "peak_extra_bytes": peak,
            "peak_method": "test",
            "tflops": 1.0,
            "gbs": 2.0,
            "roofline": None,
            "formula": "flops 2*N*N*D",
        },
    }


def _run_json(path: Path, eager: float, fused: float) -> Path:
    data = {
        "datetime": "2026-01-01T00:00:00",
        "machine_info": {
            "vljepa_fast": {
                "device": {"type": "cpu", "name": "test cpu"},
                "versions": {"torch": "x"},
            }
        },
        "commit_info": {},
        "benchmarks": [
            _bench("infonce", "fwd N64 D8 float32", "reference", eager, 64 * _MiB),
            _bench("infonce", "fwd N64 D8 float32", "vf.cpu", fused, 2 * _MiB),
        ],
        "vljepa_fast": {
            "preset": "smoke",
            "skipped": [
                {
                    "op": "infonce",
                    "case": "fwd N64 D8 float32",
                    "provider": "open_clip.ClipLoss",
                    "skipped": "open_clip is not importable",
                }
            ],
            "failed": [
                {
                    "op": "infonce",
                    "case": "fwd N64 D8 float32",
                    "provider": "vf.triton",
                    "failed": "RuntimeError: boom",
                }
            ],
        },
    }
    path.write_text(json.dumps(data))
    return path


def test_summary_lines_speedup_and_skips(tmp_path):
    rows = report.load(_run_json(tmp_path / "a.json", 0.4, 0.1))["rows"]
    text = "\n".join(report.summary_lines(rows))
    assert "4.00x" in text and "1.00x" in text
    assert "64.0 MiB" in text and "2.0 MiB" in text
    assert "open_clip.ClipLoss: open_clip is not importable (1 case)" in text
    assert text.index("failed:") < text.index("vf.triton: RuntimeError: boom")
    assert "vf.triton  " not in text  # a provider that failed has no row in the table


def test_report_writes_markdown_charts_and_comparison(tmp_path):
    a = _run_json(tmp_path / "a.json", 0.4, 0.1)
    b = _run_json(tmp_path / "b.json", 0.4, 0.05)
    out = tmp_path / "out"
    assert report.main([str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| infonce | fwd N64 D8 float32 | vf.cpu | 100 ms | 4.00x |" in md
    assert "## Comparison" in md and "| 0.50 |" in md  # B's fused case is twice as fast
    for name in ("infonce_speedup.png", "infonce_memory.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
        assert f"]({name})" in md
