"""Triton top-k similarity: both paths (streaming kernel, GEMM + k-select) interpreted on CPU
tensors against float64 and faiss, the path rule and the plan, and AOT compiles."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from vljepa_fast._kernels import topk_similarity as topk_mod
from vljepa_fast._kernels.topk_similarity import (
    MAX_K,
    STREAM_MAX_K,
    STREAM_MAX_QUERIES,
    TopkPlan,
    choose_path,
    kernel_specs,
    make_plan,
    topk_similarity,
)

import vljepa_fast as vf
from tests._aot import aot_compile
from tests._util import topk_tie_inputs
from tests.test_topk_similarity import (
    _check_order,
    _oracle_grads,
    _special_inputs,
    faiss_inputs,
    faiss_search,
)
from vljepa_fast import _backends
from vljepa_fast.ops import topk_similarity as topk_op
from vljepa_fast.reference import NORM_EPS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METRICS = ["ip", "cosine"]
PATHS = ["stream", "gemm"]


def _scores64(queries: Tensor, bank: Tensor, metric: str) -> Tensor:
    """Full [Q, N] float64 score matrix of the (already rounded) inputs."""
    q, b = queries.double(), bank.double()
    if metric == "cosine":
        q, b = F.normalize(q, dim=-1, eps=NORM_EPS), F.normalize(b, dim=-1, eps=NORM_EPS)
    return q @ b.T


def _check(
    queries: Tensor, bank: Tensor, k: int, metric: str, scores: Tensor, indices: Tensor
) -> None:
    """Scores match the float64 top-k; indices are valid, distinct and carry their scores.

    Indices are checked through the scores they point to (random data has no exact ties;
    the tie order is checked exactly by test_ties_lowest_index_first).
    The kernel accumulates in fp32 whatever the input dtype, so the tolerance is an fp32 bound
    on a dot product: a few ulps of the sum of |q_i * b_i|.
    """
    num_queries, num_bank = queries.shape[0], bank.shape[0]
    assert scores.shape == (num_queries, k) and scores.dtype == torch.float32
    assert indices.shape == (num_queries, k) and indices.dtype == torch.int64
    assert torch.isfinite(scores).all()
    assert ((indices >= 0) & (indices < num_bank)).all()
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "indices repeat within a row"
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "scores not sorted descending"
    full = _scores64(queries, bank, metric)
    magnitude = _scores64(queries.abs(), bank.abs(), metric).abs().max().item()
    atol = 1e-5 * magnitude + 1e-6
    torch.testing.assert_close(scores.double(), full.topk(k, dim=1).values, rtol=0, atol=atol)
    torch.testing.assert_close(full.gather(1, indices), scores.double(), rtol=0, atol=atol)


def _plan(queries, bank, k, metric, path=None, chunk=None, programs=4) -> TopkPlan:
    return make_plan(
        queries.dtype,
        queries.shape[0],
        bank.shape[0],
        queries.shape[1],
        k,
        cosine=metric == "cosine",
        chunk=bank.shape[0] if chunk is None else chunk,
        programs=programs,
        path=path,
    )


def _run_and_check(queries, bank, k, metric, path=None, chunk=None, programs=4):
    plan = _plan(queries, bank, k, metric, path, chunk, programs)
    scores, indices = topk_similarity(queries, bank, k, metric == "cosine", eps=NORM_EPS, plan=plan)
    _check(queries, bank, k, metric, scores, indices)
    return plan


def _forced(queries, bank, k, metric, path):
    """The public op's triton record run with the plan ``supports`` would make, its path forced:
    the dispatch contract (supports -> plan -> run) with a chosen path."""
    inputs = topk_op.topk_inputs(queries, bank, k, metric=metric)
    record, _ = _backends.select("topk_similarity", "triton", inputs)
    return record.run(inputs, topk_op.triton_plan(inputs, path=path))


# (Q, N, D, k): N and D off every block size, k == N, D = 1, k above the stream limit, a
# query count above one stream block.
SHAPES = [
    (1, 1, 1, 1),
    (5, 127, 72, 10),
    (70, 300, 64, 10),
    (5, 127, 72, 127),
    (33, 300, 72, 1),
    (1, 300, 64, 300),
    (5, 300, 1, 200),
]


@pytest.mark.interpret
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "Q{}-N{}-D{}-k{}".format(*s))
def test_matches_float64(shape: tuple[int, int, int, int], dtype: torch.dtype, metric: str) -> None:
    """The rule's path, and the other path too where the stream serves k."""
    num_queries, num_bank, dim, k = shape
    queries = torch.randn(num_queries, dim).to(dtype)
    bank = torch.randn(num_bank, dim).to(dtype)
    plan = _run_and_check(queries, bank, k, metric, chunk=100)
    assert plan.path == choose_path(num_queries, k)
    if k <= STREAM_MAX_K:
        other = "gemm" if plan.path == "stream" else "stream"
        _run_and_check(queries, bank, k, metric, path=other, chunk=100)


def test_path_rule() -> None:
    """The documented rule: stream for Q <= 64 and k <= 32, GEMM otherwise; the plan carries
    it (and the stream's fixed 64-query block: wgmma N = 64)."""
    assert (STREAM_MAX_QUERIES, STREAM_MAX_K, MAX_K) == (64, 32, 2048)
    assert choose_path(64, 32) == "stream" and choose_path(1, 1) == "stream"
    assert choose_path(65, 10) == "gemm" and choose_path(16, 33) == "gemm"
    assert choose_path(1024, 10) == "gemm"
    assert choose_path(16, 10, dtype=torch.float32, dim=72, cosine=True, arch=80) == "gemm"
    assert choose_path(16, 10, dtype=torch.float32, dim=72, cosine=True, arch=90) == "stream"
    q, b = torch.randn(16, 64), torch.randn(1000, 64)
    stream = _plan(q, b, 10, "ip")
    assert stream.path == "stream" and stream.bq == 64 and stream.k_pad == 16
    gemm = _plan(q, b, 100, "ip", chunk=300)
    assert gemm.path == "gemm" and gemm.chunk == 300 and gemm.k_pad == 128
    with pytest.raises(ValueError, match="path 'stream': expected k <= 32"):
        _plan(q, b, 33, "ip", path="stream")
    with pytest.raises(ValueError, match="path: expected 'stream' or 'gemm'"):
        _plan(q, b, 3, "ip", path="fused")


def test_supports_hands_the_plan_to_run(monkeypatch) -> None:
    """``supports`` decides path and chunk (the chunk rule of ops/_chunks with its budget
    variable); k past the select's limit is a reason."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, b = torch.randn(100, 16), torch.randn(5000, 16)
    inputs = topk_op.topk_inputs(q, b, 10)
    _, plan = _backends.select("topk_similarity", "triton", inputs)
    assert plan.path == "gemm" and plan.chunk == 5000  # the 1 GiB floor: one chunk
    monkeypatch.setenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", str(100 * 4 * 640 / 2**20))
    _, plan = _backends.select("topk_similarity", "triton", inputs)
    assert plan.chunk == 640  # budget / (Q * 4 bytes), a multiple of 64
    _, plan = _backends.select("topk_similarity", "triton", topk_op.topk_inputs(q[:64], b, 32))
    assert plan.path == "stream"
    big = topk_op.topk_inputs(q, torch.randn(MAX_K + 1, 16), MAX_K + 1)
    with pytest.raises(vf.BackendUnavailableError, match="k = 2049 > 2048"):
        _backends.select("topk_similarity", "triton", big)


FAISS_CASES = [
    *((torch.float32, k, path) for k in (1, 10) for path in PATHS),
    (torch.float32, 100, "gemm"),
    (torch.float32, 1024, "gemm"),
    (torch.float32, 2048, "gemm"),
    (torch.bfloat16, 10, "stream"),
    (torch.bfloat16, 100, "gemm"),
    (torch.float16, 32, "gemm"),
]


def test_cost_model_at_the_paper_shapes() -> None:
    """The header's predictions (H200 model of kernels/_common.py) follow from cost() with the
    plans the rule and the chunk rule give at the paper shapes (D = 1536, bf16, N = 2^20)."""
    from vljepa_fast.ops import _chunks

    n, d, dt = 1 << 20, 1536, torch.bfloat16

    def predicted(q, k):
        chunk = _chunks.chunk_rows(n, q, 4, (q + n) * d * 2)
        plan = make_plan(dt, q, n, d, k, cosine=False, chunk=chunk, programs=528)
        steps = topk_mod.cost(q, n, d, k, dt, False, plan)
        return plan, topk_mod.predicted_seconds(q, n, d, k, dt, False, plan), steps

    plan, seconds, steps = predicted(1024, 10)
    assert plan.path == "gemm" and plan.chunk == 262_144
    assert steps[0].flops == 2 * 1024 * n * d and abs(seconds - 5.17e-3) < 0.02e-3
    assert abs(predicted(1024, 100)[1] - 5.18e-3) < 0.02e-3
    plan, seconds, _ = predicted(16, 10)
    assert plan.path == "stream" and abs(seconds - 0.756e-3) < 0.005e-3
    plan, seconds, _ = predicted(16, 100)
    assert plan.path == "gemm" and abs(seconds - 0.781e-3) < 0.005e-3


@pytest.mark.interpret
@pytest.mark.parametrize("dtype, k, path", FAISS_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_ids_equal_faiss(dtype: torch.dtype, k: int, path: str, monkeypatch) -> None:
    """ids equal faiss's IndexFlatIP (tie-free exact data), through the triton record with the
    path forced; the bank is cut into chunks that do not divide N (GEMM path)."""
    num_bank = max(700, k + 300)
    num_queries = 3 if k >= 1024 else 5
    queries, bank = faiss_inputs(num_queries, num_bank, dtype, seed=k)
    want_s, want_i = faiss_search(queries, bank, k)
    # chunks of 64 rows x 4 bytes x Q scores: several chunks, the last one partial
    monkeypatch.setenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", str(num_queries * 4 * 640 / 2**20))
    scores, ids = _forced(queries, bank, k, "ip", path)
    assert torch.equal(ids, want_i)
    assert torch.equal(scores, want_s)


@pytest.mark.interpret
@pytest.mark.parametrize("splits", [1, 3])
def test_gemm_chunks_and_splits(splits: int) -> None:
    """Chunks that do not divide N and several select programs per query row (each keeps its
    own list across chunks)."""
    queries, bank = torch.randn(4, 24), torch.randn(1500, 24)
    plan = _plan(queries, bank, 40, "cosine", path="gemm", chunk=448)
    plan = plan._replace(splits=splits, blk=64)
    scores, indices = topk_similarity(queries, bank, 40, True, eps=NORM_EPS, plan=plan)
    _check(queries, bank, 40, "cosine", scores, indices)


@pytest.mark.interpret
def test_stream_merges_only_survivors(monkeypatch) -> None:
    """Regression (a tile was merged, K_PAD selection rounds for all BQ queries, whenever ANY
    query of the block improved): the streaming kernel filters per query and spends one round
    per best survivor. Query 0 improves by one row in every tile, the other queries never after
    the first tile: the kernel runs k rounds for the first tile, then one per tile."""
    rounds = []
    pack = topk_mod._pack

    def counting_pack(b_ord, b_idx):
        rounds.append(1)
        return pack(b_ord, b_idx)

    monkeypatch.setattr(topk_mod, "_pack", counting_pack)
    k, tiles = 8, 6
    bank = torch.zeros(64 * tiles, 16)
    bank[:, 1] = -torch.arange(64 * tiles, dtype=torch.float32)  # queries 1..: best early
    bank[torch.arange(tiles) * 64 + 5, 0] = 1.0 + torch.arange(tiles, dtype=torch.float32)
    queries = torch.zeros(10, 16)
    queries[0, 0] = 1.0
    queries[1:, 1] = 1.0
    plan = _plan(queries, bank, k, "ip", path="stream", programs=1)
    scores, indices = topk_similarity(queries, bank, k, False, eps=NORM_EPS, plan=plan)
    assert len(rounds) == k + (tiles - 1), len(rounds)
    assert indices[0, :tiles].tolist() == [64 * t + 5 for t in reversed(range(tiles))]
    assert indices[1].tolist() == list(range(k))


@pytest.mark.interpret
@pytest.mark.parametrize(
    "num_queries, path, bank_calls", [(10, "stream", 0), (70, "stream", 1), (10, "gemm", 1)]
)
def test_inverse_norms_once_per_call(num_queries, path, bank_calls, monkeypatch) -> None:
    """Regression (cosine recomputed the bank norms in every query block): the bank's inverse
    norms are computed once per call, or by the single query block's own tiles."""
    calls = []
    norms = topk_mod.inverse_norms

    def counting(x, eps):
        calls.append(x.shape[0])
        return norms(x, eps)

    monkeypatch.setattr(topk_mod, "inverse_norms", counting)
    queries, bank = torch.randn(num_queries, 32), torch.randn(200, 32)
    _run_and_check(queries, bank, 10, "cosine", path=path)
    assert calls.count(200) == bank_calls and calls.count(num_queries) == 1, calls


@pytest.mark.interpret
@pytest.mark.parametrize("k", [10, 16])
def test_many_tiles_per_chunk(k: int) -> None:
    """One chunk of many tiles: rounds across tiles, lists as long as k and longer."""
    queries, bank = torch.randn(20, 40), torch.randn(700, 40)
    _run_and_check(queries, bank, k, "ip", path="stream", programs=1)


@pytest.mark.interpret
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_ties(dtype: torch.dtype, metric: str, path: str) -> None:
    """Bank rows repeated many times: more exact ties than k, across tiles and chunks."""
    base = torch.randn(6, 48)
    bank = base[torch.randint(0, 6, (250,))].to(dtype)
    queries = torch.randn(7, 48).to(dtype)
    _run_and_check(queries, bank, 30, metric, path=path, chunk=100)


@pytest.mark.interpret
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "k, path", [(20, "stream"), (20, "gemm"), (300, "gemm")], ids=["stream", "gemm", "gemm-300"]
)
def test_ties_lowest_index_first(dtype: torch.dtype, metric: str, k: int, path: str) -> None:
    """Exact ties (scores exact in fp32, see topk_tie_inputs), k spanning tie groups, through
    the triton record: the stable float64 order, lowest index first; two runs identical."""
    queries, bank = topk_tie_inputs(9, 600, 16, dtype, metric, seed=k)
    first = _forced(queries, bank, k, metric, path)
    _check_order(*first, queries, bank, k, metric, False, 1e-6)
    again = _forced(queries, bank, k, metric, path)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.interpret
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_rank_rule(dtype: torch.dtype, metric: str) -> None:
    """NaN scores rank last (below -inf), +-inf are ordinary scores, ties lowest index; a NaN
    query row returns indices 0..k-1 (the rule of tests/test_topk_similarity.py), both paths."""
    queries, bank, overflow = _special_inputs(dtype, metric, seed=3)
    for k, path in ((40, "gemm"), (13, "gemm"), (13, "stream")):
        scores, idx = _forced(queries, bank, k, metric, path)
        _check_order(scores, idx, queries, bank, k, metric, overflow, 2e-6)
        assert torch.equal(idx[1], torch.arange(k))


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
def test_nan_keys_are_real_keys(path: str) -> None:
    """A bank of NaN rows only: every key is a NaN key, still above the padding key, so k real
    rows come back (lowest indices), never the padding index."""
    queries, bank = torch.randn(3, 16), torch.full((70, 16), float("nan"))
    for k in (5, 32) if path == "stream" else (5, 70):
        plan = _plan(queries, bank, k, "ip", path=path, chunk=50)
        scores, idx = topk_similarity(queries, bank, k, False, eps=NORM_EPS, plan=plan)
        assert scores.isnan().all()
        assert torch.equal(idx, torch.arange(k).expand(3, k))


@pytest.mark.interpret
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_float64(dtype: torch.dtype, metric: str) -> None:
    """Scores with a gradient are the kernel's (values and order); gradients to both inputs
    match float64, zero rows (cosine, fp16 too) get a finite zero gradient."""
    from tests._util import assert_close_2x

    g = torch.Generator().manual_seed(8)
    queries = torch.randn(5, 72, generator=g).to(dtype)
    bank = torch.randn(127, 72, generator=g).to(dtype)
    queries[0], bank[3] = 0, 0
    bank[60:70] = bank[0:10]
    plain = vf.topk_similarity(queries, bank, 20, metric=metric, backend="triton")
    qg, bg = queries.clone().requires_grad_(True), bank.clone().requires_grad_(True)
    scores, idx = vf.topk_similarity(qg, bg, 20, metric=metric, backend="triton")
    assert torch.equal(scores, plain[0]) and torch.equal(idx, plain[1])
    up = torch.randn(scores.shape, generator=g)
    gq, gb = torch.autograd.grad((scores * up).sum(), (qg, bg))
    assert torch.isfinite(gq).all() and torch.isfinite(gb).all()
    exact = _oracle_grads(queries, bank, idx, up, metric, torch.float64)
    eager = _oracle_grads(queries, bank, idx, up, metric, torch.float32)
    for name, got, e32, e64 in zip(("d_queries", "d_bank"), (gq, gb), eager, exact):
        assert_close_2x(got, e32, e64, dtype, name)


@pytest.mark.interpret
def test_non_contiguous_inputs() -> None:
    g = torch.Generator().manual_seed(9)
    queries = torch.randn(40, 9, generator=g).T
    bank = torch.randn(260, 40, generator=g)[::2]
    got = vf.topk_similarity(queries, bank, 17, backend="triton")
    want = vf.topk_similarity(queries.contiguous(), bank.contiguous(), 17, backend="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _check_order(*got, queries, bank, 17, "ip", False, 1e-4)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k, path", [(130, "gemm"), (20, "stream")])
def test_cosine_zero_rows(dtype: torch.dtype, k: int, path: str) -> None:
    queries, bank = torch.randn(6, 72).to(dtype), torch.randn(130, 72).to(dtype)
    queries[2] = 0
    bank[[0, 64, 129]] = 0
    plan = _plan(queries, bank, k, "cosine", path=path)
    scores, indices = topk_similarity(queries, bank, k, True, eps=NORM_EPS, plan=plan)
    _check(queries, bank, k, "cosine", scores, indices)
    assert (scores[2] == 0).all()


@pytest.mark.interpret
@pytest.mark.parametrize("path", PATHS)
def test_unwritten_candidates_fail(path: str) -> None:
    """A kernel that writes nothing must not pass the checks above."""
    queries, bank = torch.randn(3, 64), torch.randn(100, 64)
    plan = _plan(queries, bank, 5, "ip", path=path)
    mp = pytest.MonkeyPatch()
    with mp.context() as patch:
        patch.setattr(topk_mod, "launch", lambda *args, **kwargs: None)
        scores, indices = topk_similarity(queries, bank, 5, False, eps=NORM_EPS, plan=plan)
    with pytest.raises(AssertionError):
        _check(queries, bank, 5, "ip", scores, indices)


def test_kernel_eps_has_no_default_of_its_own() -> None:
    """The epsilon has one owner (reference.NORM_EPS): the kernel wrapper takes it from the
    caller, so a copy of the value cannot drift (regression: it defaulted to 1e-12)."""
    eps = inspect.signature(topk_similarity).parameters["eps"]
    assert eps.kind is inspect.Parameter.KEYWORD_ONLY and eps.default is inspect.Parameter.empty
    with pytest.raises(TypeError, match="eps"):
        topk_similarity(torch.randn(2, 4), torch.randn(5, 4), 2, False)


def test_auto_never_picks_triton_for_cpu_tensors(monkeypatch) -> None:
    """Under auto, Triton serves CUDA tensors only, the interpreter notwithstanding; by name it
    serves CPU tensors through the interpreter and says so otherwise."""
    inputs = topk_op.topk_inputs(torch.randn(3, 8), torch.randn(20, 8), 4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backends.select("topk_similarity", "auto", inputs)[0].name != "triton"
    assert _backends.select("topk_similarity", "triton", inputs)[0].name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(vf.BackendUnavailableError, match="TRITON_INTERPRET"):
        _backends.select("topk_similarity", "triton", inputs)


# Stream: every dtype x metric at D = 1536 (aligned rows) with the longest list (k = 32), one
# query block (bank norms from the tiles) and several (precomputed norms); D = 72 (scalar
# loads). Select: k from 10 to 2048. sm_80: the stream cases the rule sends to the stream there
# (fp16 compiles like bf16; the select has no MMA, its sm_90 compile covers it).
_CASES = [
    *(("stream", dtype, metric, 32, 1536, 16) for dtype in DTYPES for metric in METRICS),
    *(
        ("stream", dtype, "cosine", 32, dim, q)
        for dtype in (torch.float32, torch.bfloat16)
        for dim, q in ((1536, 100), (72, 16))
    ),
    ("stream", torch.bfloat16, "ip", 32, 72, 16),
    ("stream", torch.float32, "ip", 10, 72, 16),
    *(("gemm", torch.bfloat16, "cosine", k, 1536, 1024) for k in (10, 100, 1024, 2048)),
    ("gemm", torch.float32, "ip", 100, 1536, 1024),
]
COMPILE_CASES = [(*case, 90) for case in _CASES] + [
    (*case, 80)
    for case in _CASES
    if case[0] == "stream"
    and case[1] != torch.float16
    and choose_path(
        case[5], case[3], dtype=case[1], dim=case[4], cosine=case[2] == "cosine", arch=80
    )
    == "stream"
]


@pytest.mark.compile
@pytest.mark.parametrize(
    "path, dtype, metric, k, dim, num_queries, arch",
    COMPILE_CASES,
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_aot_compile(path, dtype, metric, k, dim, num_queries, arch) -> None:
    """No spills in any kernel a plan launches; on sm_90 the stream's score product is wgmma
    with instruction N >= 64 (never mma.sync), the select has no product at all."""
    plan = make_plan(
        dtype,
        num_queries,
        1 << 20,
        dim,
        k,
        cosine=metric == "cosine",
        chunk=70_000,
        programs=528,
        path=path,
        arch=arch,
    )
    for name, (kernel, signature, constexprs) in kernel_specs(
        dtype, metric == "cosine", plan, k, interpret=False
    ).items():
        # As the JIT specialises at launch: aligned pointers, and D when it is a multiple of 16.
        aligned = [n for n, t in signature.items() if t.startswith("*")]
        aligned += ["D"] if dim % 16 == 0 and "D" in signature else []
        report = aot_compile(
            kernel,
            signature,
            constexprs,
            arch=arch,
            num_warps=plan.num_warps if name != "norms" else 4,
            num_stages=plan.num_stages if name != "norms" else 3,
            divisible_by_16=aligned,
        )
        assert report.n_spills == 0, f"{name}: {report.n_spills} bytes spilled"
        assert report.shared <= report.shared_limit
        if arch == 90 and name == "stream":
            widths = {int(n) for n in re.findall(r"wgmma\.mma_async\S*\.m64n(\d+)k", report.ptx)}
            assert widths and min(widths) >= 64, widths
            assert "mma.sync" not in report.ptx
        if name != "stream":
            assert "mma" not in report.ptx
