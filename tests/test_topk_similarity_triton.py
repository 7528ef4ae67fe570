"""Triton top-k similarity: interpreted runs on CPU tensors against float64, and AOT compiles."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from vljepa_fast._kernels import topk_similarity as topk_mod
from vljepa_fast._kernels.topk_similarity import (
    TopkConfig,
    kernel_spec,
    topk_config,
    topk_similarity,
)

import vljepa_fast as vf
from tests._aot import aot_compile
from tests._util import topk_tie_inputs
from tests.test_topk_similarity import _check_order, _oracle_grads, _special_inputs
from vljepa_fast.reference import NORM_EPS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METRICS = ["ip", "cosine"]


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


def _run_and_check(
    queries: Tensor, bank: Tensor, k: int, metric: str, config: TopkConfig | None = None
) -> None:
    cosine = metric == "cosine"
    scores, indices = topk_similarity(queries, bank, k, cosine, eps=NORM_EPS, config=config)
    _check(queries, bank, k, metric, scores, indices)


# (Q, N, D, k): N and D off every block size, k == N, k past MAX_K_PAD (the write-all path), D = 1.
SHAPES = [
    (1, 1, 1, 1),
    (5, 127, 72, 10),
    (33, 300, 64, 10),
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
    num_queries, num_bank, dim, k = shape
    queries = torch.randn(num_queries, dim).to(dtype)
    bank = torch.randn(num_bank, dim).to(dtype)
    _run_and_check(queries, bank, k, metric)


@pytest.mark.interpret
@pytest.mark.parametrize("k", [10, 16])
def test_many_tiles_per_chunk(k: int) -> None:
    """Small tiles: many merges per chunk, with tiles as wide as the running list and wider."""
    queries, bank = torch.randn(20, 40), torch.randn(300, 40)
    bn = 16 if k == 16 else 32
    _run_and_check(queries, bank, k, "ip", TopkConfig(True, 16, 16, bn, 16, 4, 3))


@pytest.mark.interpret
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties(dtype: torch.dtype, metric: str) -> None:
    """Bank rows repeated many times: more exact ties than k, across tiles and chunks."""
    base = torch.randn(6, 48)
    bank = base[torch.randint(0, 6, (250,))].to(dtype)
    queries = torch.randn(7, 48).to(dtype)
    _run_and_check(queries, bank, 40, metric)


@pytest.mark.interpret
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [40, 300], ids=["running-list", "write-all"])
def test_ties_lowest_index_first(dtype: torch.dtype, metric: str, k: int) -> None:
    """Exact ties (scores exact in fp32, see topk_tie_inputs), k spanning tie groups, through
    the public API: the stable float64 order, lowest index first; two runs identical."""
    queries, bank = topk_tie_inputs(9, 600, 16, dtype, metric, seed=k)
    first = vf.topk_similarity(queries, bank, k, metric=metric, backend="triton")
    _check_order(*first, queries, bank, k, metric, False, 1e-6)
    again = vf.topk_similarity(queries, bank, k, metric=metric, backend="triton")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.interpret
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_rank_rule(dtype: torch.dtype, metric: str) -> None:
    """NaN scores rank last (below -inf), +-inf are ordinary scores, ties lowest index; a NaN
    query row returns indices 0..k-1 (the rule of tests/test_topk_similarity.py)."""
    queries, bank, overflow = _special_inputs(dtype, metric, seed=3)
    for k in (40, 13):
        scores, idx = vf.topk_similarity(queries, bank, k, metric=metric, backend="triton")
        _check_order(scores, idx, queries, bank, k, metric, overflow, 2e-6)
    assert torch.equal(idx[1], torch.arange(13))


@pytest.mark.interpret
def test_nan_keys_are_real_keys() -> None:
    """A bank of NaN rows only: every key is a NaN key, still above the padding key, so k real
    rows come back (lowest indices), never the padding index."""
    queries, bank = torch.randn(3, 16), torch.full((70, 16), float("nan"))
    for k in (5, 70):
        scores, idx = topk_similarity(queries, bank, k, False, eps=NORM_EPS)
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
def test_cosine_zero_rows(dtype: torch.dtype) -> None:
    queries, bank = torch.randn(6, 72).to(dtype), torch.randn(130, 72).to(dtype)
    queries[2] = 0
    bank[[0, 64, 129]] = 0
    scores, indices = topk_similarity(queries, bank, 130, True, eps=NORM_EPS)
    _check(queries, bank, 130, "cosine", scores, indices)
    assert (scores[2] == 0).all()


@pytest.mark.interpret
def test_unwritten_candidates_fail() -> None:
    """A stage 1 that writes nothing must not pass the checks above."""
    queries, bank = torch.randn(3, 64), torch.randn(100, 64)
    mp = pytest.MonkeyPatch()
    with mp.context() as patch:
        patch.setattr(topk_mod, "launch", lambda *args, **kwargs: None)
        scores, indices = topk_similarity(queries, bank, 5, False, eps=NORM_EPS)
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
    from vljepa_fast import _backends
    from vljepa_fast.ops.topk_similarity import topk_inputs

    inputs = topk_inputs(torch.randn(3, 8), torch.randn(20, 8), 4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backends.select("topk_similarity", "auto", inputs)[0].name != "triton"
    assert _backends.select("topk_similarity", "triton", inputs)[0].name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(vf.BackendUnavailableError, match="TRITON_INTERPRET"):
        _backends.select("topk_similarity", "triton", inputs)


# Every dtype x metric x arch with a short running list and D a multiple of 16 (the common
# case); the other k buckets (the longest running list, the write-all path) and D = 72 (unaligned
# rows, scalar loads) with cosine, the variant with the most live registers, for fp32 and bf16
# (fp16 compiles to the same code as bf16).
COMPILE_CASES = [(dtype, metric, 10, 768) for dtype in DTYPES for metric in METRICS] + [
    (dtype, "cosine", k, dim)
    for dtype in (torch.float32, torch.bfloat16)
    for k, dim in [(128, 768), (1000, 768), (10, 72), (128, 72), (1000, 72)]
]


@pytest.mark.compile
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize(
    "dtype, metric, k, dim", COMPILE_CASES, ids=lambda v: str(v).replace("torch.", "")
)
def test_aot_compile(dtype: torch.dtype, metric: str, k: int, dim: int, arch: int) -> None:
    cfg = topk_config(dtype, 4096, dim, k)
    signature, constexprs = kernel_spec(dtype, metric == "cosine", cfg, interpret=False)
    # As the JIT specialises at launch: aligned pointers, and D when it is a multiple of 16.
    aligned = ["q", "b", "keys"] + (["D"] if dim % 16 == 0 else [])
    report = aot_compile(
        topk_mod.topk_similarity_kernel,
        signature,
        constexprs,
        arch=arch,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        divisible_by_16=aligned,
    )
    assert report.n_spills == 0, f"{report.n_spills} bytes spilled ({report.n_regs} registers)"
    assert report.shared <= report.shared_limit
    if arch == 90 and cfg.bq >= 64 and dim % 16 == 0:
        assert report.uses_wgmma
