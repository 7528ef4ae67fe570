"""The bench harness pieces that can be wrong: each op's FLOP and byte formulas (checked against
an independent count on a small shape: torch's FlopCounterMode on the eager reference, and the
bytes of the real tensors), padding lengths, a measured case's outcomes, the CPU peak-memory
method, presets, and the report on a small synthetic pytest-benchmark JSON."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402
import bench_attention  # noqa: E402
import bench_infonce  # noqa: E402
import bench_rotary  # noqa: E402
import bench_topk_similarity  # noqa: E402
import presets  # noqa: E402
import report  # noqa: E402

from vljepa_fast import BackendUnavailableError, reference  # noqa: E402

pytestmark = pytest.mark.cpu


def _flops(fn) -> int:
    """Matmul FLOPs torch itself counts while ``fn`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------
# formulas, each against an independent count
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_cost_matches_an_independent_count(metric, dtype):
    Q, N, D, k = 5, 97, 24, 7
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(Q, D, generator=g).to(dtype)
    bank = torch.randn(N, D, generator=g).to(dtype)
    out = {}
    flops = _flops(lambda: out.update(r=reference.topk_similarity(queries, bank, k, metric=metric)))
    scores, indices = out["r"]
    cost = bench_topk_similarity.topk_cost(Q, N, D, k, dtype.itemsize)
    assert cost.flops == flops
    # the bank and queries read once, the results written once
    assert cost.nbytes == _nbytes(queries, bank, scores, indices)
    assert cost.formula == bench_topk_similarity.TOPK_FORMULA


def test_infonce_cost_matches_an_independent_count():
    N, D = 48, 20
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(N, D, generator=g, requires_grad=True)
    target = torch.randn(N, D, generator=g, requires_grad=True)
    out = {}
    fwd = _flops(lambda: out.update(loss=reference.infonce_loss(pred, target, temperature=0.07)))
    eager_bwd = _flops(out["loss"].backward)  # from the stored logits: dpred and dtarget GEMMs
    flops = bench_infonce.infonce_flops
    assert flops(N, D, "fwd") == fwd
    # the counted backward recomputes S once (one more GEMM of the forward's size)
    assert flops(N, D, "bwd") == eager_bwd + fwd
    assert flops(N, D, "fwd+bwd") == fwd + eager_bwd + fwd
    nbytes = bench_infonce.infonce_bytes
    assert nbytes(N, D, 4, "fwd") == _nbytes(pred, target)
    assert nbytes(N, D, 4, "bwd") == _nbytes(pred, target, pred.grad, target.grad)
    assert nbytes(N, D, 4, "fwd+bwd") == nbytes(N, D, 4, "fwd") + nbytes(N, D, 4, "bwd")
    cost = bench_infonce.infonce_cost(N, D, torch.bfloat16, "fwd+bwd")
    assert cost == (flops(N, D, "fwd+bwd"), nbytes(N, D, 2, "fwd+bwd"), cost.formula, None)


def test_infonce_prediction_is_the_kernels_model_at_the_ops_chunk(monkeypatch):
    """The bench's H200 column for the chunked backends is kernels/infonce.py's own model at the
    chunk the op layer passes (here forced to 128 rows of a 320-row bf16 batch, 6 bytes per
    pair of the [c, N] buffers: the budget of 128 rows), and absent for other providers."""
    from vljepa_fast._kernels import infonce as kernel

    N, D, dtype = 320, 64, torch.bfloat16
    monkeypatch.setenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", str(128 * N * 6 / 2**20))
    for provider in ("vf.triton", "vf.cuda"):
        cost = bench_infonce.infonce_cost(N, D, dtype, "fwd+bwd", provider)
        want = kernel.predicted_seconds(N, N, D, dtype, "fwd+bwd", chunk=128, overlap=False)
        assert cost.predicted_s == want
        # the GEMM math alone (8 N^2 D at 790 TFLOP/s) is a floor of the model
        assert cost.predicted_s > 8 * N * N * D / 790e12
    assert bench_infonce.infonce_cost(N, D, dtype, "fwd+bwd", "reference").predicted_s is None


def _packed(lengths, H, D, g):
    return torch.randn(sum(lengths), H, D, generator=g, requires_grad=True)


def test_attention_cost_counts_real_tokens_like_an_independent_count():
    lengths, Hq, Hkv, D = [3, 9, 5], 4, 2, 8
    g = torch.Generator().manual_seed(2)
    q, k, v = _packed(lengths, Hq, D, g), _packed(lengths, Hkv, D, g), _packed(lengths, Hkv, D, g)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    out = {}
    L = max(lengths)
    run = lambda: out.update(o=reference.attention_varlen(q, k, v, cu, cu, L, L))  # noqa: E731
    fwd = _flops(run)  # the reference loops over the sequences: real tokens only
    o = out["o"]
    do = torch.randn_like(o)
    eager_bwd = _flops(lambda: o.backward(do))  # from the stored probabilities

    def scores():  # what the counted backward recomputes: s = q k^T, per sequence and head
        for b in range(len(lengths)):
            rows = slice(int(cu[b]), int(cu[b + 1]))
            kh = k[rows].repeat_interleave(Hq // Hkv, dim=1)
            torch.matmul(q[rows].transpose(0, 1), kh.transpose(0, 1).transpose(-1, -2))

    recompute = _flops(scores)
    flops = bench_attention.attention_flops
    assert flops(lengths, Hq, D, False, "fwd") == fwd
    assert flops(lengths, Hq, D, False, "bwd") == eager_bwd + recompute
    assert flops(lengths, Hq, D, False, "fwd+bwd") == fwd + eager_bwd + recompute
    # causal: the convention is half the pairs (the exact L*(L+1)/2 differs by (L+1)/L)
    assert flops(lengths, Hq, D, True, "fwd") == fwd // 2
    nbytes = bench_attention.attention_bytes
    assert nbytes(lengths, Hq, Hkv, D, 4, "fwd") == _nbytes(q, k, v, o)
    assert nbytes(lengths, Hq, Hkv, D, 4, "bwd") == _nbytes(q, o, do, k, v, q.grad, k.grad, v.grad)
    assert nbytes(lengths, Hq, Hkv, D, 4, "fwd+bwd") == 3 * nbytes(lengths, Hq, Hkv, D, 4, "fwd")
    cost = bench_attention.attention_cost(lengths, Hq, Hkv, D, 2, False, "bwd")
    assert cost == (
        flops(lengths, Hq, D, False, "bwd"),
        nbytes(lengths, Hq, Hkv, D, 2, "bwd"),
        bench_attention.ATTENTION_FORMULA,
        None,  # attention's design model: issue 15
    )


@pytest.mark.parametrize("B,T,pad", [(32, 512, 0.5), (4, 4608, 0.5), (3, 100, 0.3), (1, 64, 0.5)])
def test_padded_lengths(B, T, pad):
    lengths = bench_attention.padded_lengths(B, T, pad)
    assert len(lengths) == B and all(1 <= n <= T for n in lengths)
    mean = sum(lengths) / (B * T)
    assert abs(mean - (1 - pad)) < 0.02, mean
    if B > 1:
        assert min(lengths) < max(lengths)  # a real batch mixes lengths
    assert bench_attention.padded_lengths(B, T, 0.0) == [T] * B


def _tiny_model():
    import vljepa_fast.models as M

    cfg = M.VLJEPAConfig.tiny().replace(freeze_x_encoder=True)
    torch.manual_seed(3)
    model = M.VLJEPA(cfg, backend="reference")
    xc = cfg.x_encoder
    B, n_vis, L = 2, 24, 6
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(B, n_vis, xc.dim, generator=g)
    q = torch.randint(0, cfg.predictor.pad_id, (B, L), generator=g)
    t = torch.randint(1, cfg.y_encoder.vocab_size, (B, L), generator=g)
    ones = torch.ones(B, L, dtype=torch.bool)
    return model, cfg, feats, q, t, ones


@pytest.mark.parametrize(
    "L, causal, window",
    [(1, False, (0, 0)), (13, False, (3, 3)), (13, False, (0, 5)), (13, True, (4, 7)),
     (13, False, (-1, 2)), (13, False, (20, -1)), (40, True, (-1, -1))],
)  # fmt: skip
def test_attention_flops_count_the_pairs_of_the_sliding_window(L, causal, window):
    """The windowed count is the pairs the reference's mask lets through, times 4*D*Hq."""
    i, j = torch.arange(L)[:, None], torch.arange(L)[None]
    left, right = window
    right = 0 if causal else right
    seen = torch.ones(L, L, dtype=torch.bool)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    pairs = int(seen.sum())
    got = bench_attention.attention_flops([L, L], 4, 16, causal, "fwd", window)
    if window == (-1, -1):
        assert got == 2 * 4 * (L * L // 2 if causal else L * L) * 16 * 4  # the old convention
    else:
        assert bench_attention.visible_pairs(L, causal, window) == pairs
        assert got == 2 * 4 * pairs * 16 * 4


def test_model_cost_matches_the_flop_counter():
    import bench_model

    model, cfg, feats, q, t, ones = _tiny_model()
    B, n_vis, L = feats.shape[0], feats.shape[1], q.shape[1]

    def predictor():
        return model.predictor(feats, q, ones)

    cost, params = bench_model.model_cost(model, predictor, "predictor", "fwd", 4)
    with torch.no_grad():
        assert cost.flops == _flops(predictor)  # every matmul of the eager model, no more
    assert params == sum(p.numel() for p in model.predictor.parameters())
    assert cost.nbytes == 4 * params

    def step():
        return model(None, (q, ones), (t, ones), x_features=feats)

    cost, params = bench_model.model_cost(model, step, "train", "fwd+bwd", 4)
    out = {}
    eager = _flops(lambda: out.update(loss=step())) + _flops(out["loss"].backward)
    # the eager step keeps the attention probabilities and the logits; the counted backward
    # recomputes them: half an attention forward per layer, one similarity GEMM for the loss
    pc, yc = cfg.predictor, cfg.y_encoder
    attn = bench_attention.attention_flops
    recompute = (
        pc.layers * attn([n_vis + L] * B, pc.heads, pc.head_dim, False, "fwd") // 2
        + yc.layers * attn([L] * B, yc.heads, yc.head_dim, False, "fwd") // 2
        + 2 * B * B * cfg.embed_dim
    )
    assert cost.flops == eager + recompute
    assert params == sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------
# the harness: one measured (case, provider)
# ------------------------------------------------------------------------------------------


class _Benchmark:
    """pytest-benchmark's pedantic mode, untimed (stats None: the harness uses its estimate)."""

    def __init__(self):
        self.group, self.extra_info, self.stats = None, {}, None

    def pedantic(self, target, setup, teardown, rounds, iterations):
        for _ in range(rounds):
            args, kwargs = setup()
            target(*args, **kwargs)
            teardown(*args, **kwargs)


@pytest.fixture
def session(monkeypatch):
    monkeypatch.setattr(_harness, "RESULTS", [])
    monkeypatch.setitem(_harness.STATE, "preset", "test")
    monkeypatch.setitem(_harness.STATE, "deadline", None)
    monkeypatch.setitem(_harness.STATE, "timing", presets.Timing(1, 2, 3, 1e-6))
    return _harness.RESULTS


def _case(mode: str = "fwd+bwd") -> dict:
    return {"label": "x", "mode": mode, "device": "cpu", "dtype": "float32"}


def test_bench_run_records_the_cost_and_rates(session):
    bench = _harness.Bench(_Benchmark(), "op", _case(), "p")
    x = torch.randn(64, requires_grad=True)
    row = bench.run(lambda s: lambda: (s[0] * 2).sum(), [(x,)], _harness.Cost(10**9, 10**6, "f"))
    assert session == [row]
    assert (row["flops"], row["bytes"], row["formula"], row["provider"]) == (10**9, 10**6, "f", "p")
    assert row["tflops"] == pytest.approx(1e-3 / row["median_s"])
    assert row["gbs"] == pytest.approx(1e-3 / row["median_s"])
    assert row["rounds"] == 2 and x.grad is None  # leaves are cleared after the rounds


def test_bench_skips_a_backend_that_refuses(session):
    bench = _harness.Bench(_Benchmark(), "op", _case(), "p")

    def make(s):
        raise BackendUnavailableError("op: backend 'p' cannot run these inputs:\n  - too big")

    with pytest.raises(pytest.skip.Exception, match="too big"):
        bench.run(make, [(torch.ones(2),)], _harness.Cost(1, 1, "f"))
    assert session == [{"op": "op", "case": "x", "provider": "p", "skipped": "too big"}]


def test_bench_records_a_failure_in_the_timed_rounds(session):
    """A provider that raises while timed fails its test and is listed as failed."""
    calls = []

    def make(s):
        def call():
            calls.append(1)
            if len(calls) > 1:  # the warm-up call passes, the first timed round raises
                raise RuntimeError("boom\nmore")
            return s[0].sum()

        return call

    bench = _harness.Bench(_Benchmark(), "op", _case("fwd"), "p")
    with pytest.raises(RuntimeError, match="boom"):
        bench.run(make, [(torch.ones(2),)], _harness.Cost(1, 1, "f"))
    assert session == [{"op": "op", "case": "x", "provider": "p", "failed": "RuntimeError: boom"}]


def test_bench_skips_past_the_deadline_and_without_cuda(session, monkeypatch):
    monkeypatch.setitem(_harness.STATE, "deadline", 0.0)
    with pytest.raises(pytest.skip.Exception, match="time budget"):
        _harness.Bench(_Benchmark(), "op", _case(), "p")
    monkeypatch.setitem(_harness.STATE, "deadline", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="runs on CUDA"):
        _harness.Bench(_Benchmark(), "op", dict(_case(), device="cuda"), "p")
    assert [r["skipped"][:11] for r in session] == ["time budget", "preset 'tes"]


def test_mode_total():
    assert [_harness.mode_total(2, 5, m) for m in ("fwd", "bwd", "fwd+bwd")] == [2, 5, 7]
    with pytest.raises(ValueError, match="mode"):
        _harness.mode_total(2, 5, "both")


# ------------------------------------------------------------------------------------------
# machine, memory, presets
# ------------------------------------------------------------------------------------------

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
        ops = {"topk_similarity", "infonce", "sigmoid_loss", "attention", "rotary"}
        assert set(preset.cases) == ops, name


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
    pred = [c for c in gpu_attn if c.get("what") == "predictor"]
    # issue 15: B x (4096 visual + 512 query tokens), 32:8 heads, hd 64, 0/25/50% padding
    # with mask_queries, forward and forward+backward
    assert {(c["T"], c["Hq"], c["Hkv"], c["D"]) for c in pred} == {(4096 + 512, 32, 8, 64)}
    assert {c["pad"] for c in pred} == {0.0, 0.25, 0.5}
    assert {c["mode"] for c in pred} == {"fwd", "fwd+bwd"}
    assert all(c["mask_queries"] and not c["causal"] for c in pred)
    assert pred[0]["pad"] == 0.5  # first, should the deadline cut the tail
    sweep = [c for c in gpu_attn if c.get("what") == "sweep"]
    assert len(pred) + len(sweep) == len(gpu_attn)
    assert {(c["T"], c["Hkv"]) for c in sweep} >= {(16384, 8), (16384, 32)}
    for name in ("gpu", "paper"):
        for c in presets.cases(name, "attention"):
            if c.get("what") == "sweep":  # FA3's sweep: 16k tokens, unpadded, hd 64, 32 heads
                assert c["B"] * c["T"] == 16384 and c["pad"] == 0.0 and not c["causal"]
                assert (c["Hq"], c["D"]) == (32, 64) and c["Hkv"] in (8, 32)
    paper = presets.cases("paper", "attention")
    points = {(c["T"], c["Hkv"]) for c in paper if c.get("what") == "sweep"}
    assert points == {(T, h) for T in (512, 1024, 2048, 4096, 8192, 16384) for h in (8, 32)}
    assert {c["mode"] for c in paper} == {"fwd", "bwd", "fwd+bwd"}


def test_attention_providers_by_case():
    """Every attention backend and peer has a row (a skip saying why where it cannot run:
    "not installed"); the providers that materialise the [B, Hq, T, S] scores only where they
    fit; the SDPA baselines with the dense additive mask and without a mask."""
    from vljepa_fast import _backends

    def case(B, T, pad):
        return dict(B=B, T=T, Hq=32, Hkv=8, D=64, pad=pad, causal=False)

    big = bench_attention._providers(case(4, 4608, 0.5))
    backends = [r.name for r in _backends.records("attention") if r.name != "reference"]
    assert [p for p in big if p.startswith("vf.") and not p.endswith(".varlen")] == [
        f"vf.{b}" for b in backends
    ]
    for p in ("torch.sdpa[mask]", "torch.sdpa[nomask]", "flash_attn", "flash_attn3", "xformers"):
        assert p in big, p
    assert not {"reference", "reference+compile", "torch.sdpa[math]"} & set(big)
    assert {p for p in big if p.endswith(".varlen")} <= {"vf.triton.varlen", "vf.cuda.varlen"}
    unpadded = bench_attention._providers(case(1, 16384, 0.0))
    assert "torch.sdpa[mask]" in unpadded and "torch.sdpa[nomask]" not in unpadded
    assert not any(p.endswith(".varlen") for p in unpadded)
    small = bench_attention._providers(dict(case(2, 64, 0.25), compile=True))
    assert {"reference", "reference+compile", "torch.sdpa[math]", "vf.sdpa.varlen"} <= set(small)
    label = bench_attention._label(
        dict(case(4, 4608, 0.5), what="predictor", mask_queries=True, mode="fwd", dtype="bfloat16")
    )
    assert label == "fwd predictor B4 T4608 H32:8 hd64 pad50% mask_queries bfloat16"


def test_smoke_preset_is_tiny():
    for op in ("topk_similarity", "infonce", "attention", "rotary"):
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


def test_report_without_charts(tmp_path):
    a = _run_json(tmp_path / "a.json", 0.4, 0.1)
    out = tmp_path / "out"
    assert report.main([str(a), "--out", str(out), "--no-charts"]) == 0
    md = (out / "report.md").read_text()
    assert "| infonce | fwd N64 D8 float32 | vf.cpu | 100 ms | 4.00x |" in md
    assert "(no charts: --no-charts)" in md and ".png" not in md
    assert not list(out.glob("*.png"))


# ------------------------------------------------------------------------------------------
# rotary: cost and presets
# ------------------------------------------------------------------------------------------


class _ElementwiseFlops(TorchDispatchMode):
    """Elements written by every multiply, add and subtract torch runs (one FLOP each)."""

    OPS = ("mul", "add", "sub")

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.rstrip("_") in self.OPS:
            self.flops += out.numel()
        return out


@pytest.mark.parametrize("layout", ["llama", "vjepa2"])
@pytest.mark.parametrize("per_batch_tables", [False, True])
def test_rotary_cost_matches_an_independent_count(layout, per_batch_tables):
    from vljepa_fast import rotary_cos_sin

    B, T, Hq, Hkv, D = 2, 7, 4, 2, 12
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, T, Hq, D, generator=g, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, generator=g, requires_grad=True)
    pos = torch.randint(0, 50, (B, T) if layout == "llama" else (B, T, 3), generator=g)
    if not per_batch_tables:
        pos = pos[0]
    cos, sin = rotary_cos_sin(pos, D, layout=layout)
    fwd = _ElementwiseFlops()
    with fwd:
        q_rot, k_rot = reference.apply_rotary(q, k, cos, sin, layout=layout)
    dq, dk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    torch.autograd.backward((q_rot, k_rot), (dq, dk))
    # the backward as the kernel computes it, the transpose map: the forward on (dq, dk) with
    # sin negated and read at the partner channel (eager autograd runs one more add per
    # element, assembling the zero-padded halves of its partner's gradient)
    if layout == "llama":  # partner c + D/2 (mod D): the halves swapped
        sin_partner = sin.roll(D // 2, dims=-1)
    else:  # partner 2i <-> 2i + 1: the channels of each pair swapped
        sin_partner = sin.unflatten(-1, (D // 2, 2)).flip(-1).flatten(-2)
    bwd = _ElementwiseFlops()
    with bwd:
        gq, gk = reference.apply_rotary(dq, dk, cos, -sin_partner, layout=layout)
    torch.testing.assert_close(gq, q.grad)  # it is the backward
    torch.testing.assert_close(gk, k.grad)
    tb = B if per_batch_tables else 1
    cost = functools.partial(bench_rotary.rotary_cost, B, T, Hq, Hkv, D, 4, table_batch=tb)
    # the reference's sign flips are negations (no FLOP); its multiplies and adds are the count
    assert cost("fwd").flops == fwd.flops
    assert cost("bwd").flops == bwd.flops
    assert cost("fwd+bwd").flops == fwd.flops + bwd.flops
    # q, k and the tables read once, both outputs written once; the backward likewise
    assert cost("fwd").nbytes == _nbytes(q, k, cos, sin, q_rot, k_rot)
    assert cost("bwd").nbytes == _nbytes(dq, dk, cos, sin, q.grad, k.grad)
    assert cost("fwd+bwd").nbytes == cost("fwd").nbytes + cost("bwd").nbytes
    assert cost("fwd").formula == bench_rotary.ROTARY_FORMULA
    half = bench_rotary.rotary_cost(B, T, Hq, Hkv, D, 2, "fwd", table_batch=tb)
    assert half.nbytes == _nbytes(q, k, q_rot, k_rot) // 2 + _nbytes(cos, sin)


def test_rotary_presets_hold_the_paper_model_shapes():
    import vljepa_fast.models as M

    cfg = M.VLJEPAConfig.paper()
    xc, pc = cfg.x_encoder, cfg.predictor
    clip_frames = 16  # bench_model's paper case: batch 16 of 16-frame clips, 64 query tokens
    grid = (clip_frames // xc.tubelet, xc.image_size // xc.patch, xc.image_size // xc.patch)
    visual = grid[0] * grid[1] * grid[2]
    for name in ("gpu", "paper"):
        by = {(c["what"], c["mode"]): c for c in presets.cases(name, "rotary")}
        assert set(by) == {(w, m) for w in ("predictor", "x_encoder") for m in ("fwd", "fwd+bwd")}
        p, x = by["predictor", "fwd+bwd"], by["x_encoder", "fwd+bwd"]
        want_p = dict(B=16, T=visual + 64, Hq=pc.heads, Hkv=pc.kv_heads, D=pc.head_dim)
        assert {key: p[key] for key in want_p} == want_p and p["layout"] == "llama"
        want_x = dict(B=16, T=visual, grid=grid, Hq=xc.heads, Hkv=xc.heads, D=xc.head_dim)
        assert {key: x[key] for key in want_x} == want_x and x["layout"] == "vjepa2"
        assert p["dtype"] == x["dtype"] == "bfloat16"
    case = dict(presets.cases("gpu", "rotary")[2])
    assert bench_rotary.positions(case, torch.device("cpu")).tolist()[:3] == [
        [0, 0, 0],
        [0, 0, 1],
        [0, 0, 2],
    ]
