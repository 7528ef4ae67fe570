"""topk_similarity: validation, every native/eager backend against float64, properties, the
EmbeddingIndex module, and (gpu tier) the CUDA and Triton kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import vljepa_fast as vf
from tests._util import (
    assert_close_2x,
    assert_no_spills,
    check_topk,
    cuda_library_dump,
    dump_sections,
    topk_expected,
    topk_tie_inputs,
)
from vljepa_fast import _backends

ATOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(Q, N, D, dtype, device="cpu", seed=0, ties=False, zero_rows=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Q, D, generator=g).to(device, dtype)
    b = torch.randn(N, D, generator=g)
    if ties and N > 2:
        b[N // 2] = b[0]
        b[N - 1] = b[0]
    if zero_rows:
        b[0] = 0
        q[0] = 0
    return q, b.to(device, dtype)


def _tol(dtype, D):
    # fp32 accumulation of rounded inputs: the error grows with sqrt(D) and input magnitude
    return ATOL[dtype] * max(1.0, D**0.5 / 4)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "q_shape,b_shape,k,metric,match",
    [
        ((3, 4), (5, 4), 0, "ip", "k: expected in \\[1, 5\\]"),
        ((3, 4), (5, 4), 6, "ip", "k: expected in \\[1, 5\\]"),
        ((3, 4), (5, 3), 2, "ip", "bank: expected dimension D = 4"),
        ((3, 4, 1), (5, 4), 2, "ip", "queries: expected a 2-D tensor"),
        ((3, 4), (5,), 2, "ip", "bank: expected a 2-D tensor"),
        ((3, 4), (0, 4), 1, "ip", "bank: expected at least one bank row"),
        ((0, 4), (5, 4), 1, "ip", "queries: expected at least one query row"),
        ((3, 4), (5, 4), 2, "l2", "metric: expected one of"),
    ],
)
def test_bad_input_names_argument(q_shape, b_shape, k, metric, match):
    with pytest.raises(ValueError, match=match):
        vf.topk_similarity(torch.randn(q_shape), torch.randn(b_shape), k, metric=metric)


def test_bad_dtype_device_contiguity_k_type():
    q, b = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="bank: expected the same dtype as queries"):
        vf.topk_similarity(q, b.half(), 2)
    with pytest.raises(ValueError, match="queries: expected float32"):
        vf.topk_similarity(q.int(), b.int(), 2)
    with pytest.raises(ValueError, match="k: expected an int"):
        vf.topk_similarity(q, b, 2.0)
    with pytest.raises(ValueError, match="bank: expected the same device as queries"):
        vf.topk_similarity(q, b.to("meta"), 2)
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        vf.topk_similarity(q, b, 2, backend="nope")


def test_named_backend_refuses_with_reasons():
    q, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(vf.BackendUnavailableError, match="(?s)cpu.*float64 not supported"):
        vf.topk_similarity(q, b, 2, backend="cpu")
    with pytest.raises(vf.BackendUnavailableError, match="(?s)cuda.*does not run on cpu"):
        vf.topk_similarity(q.float(), b.float(), 2, backend="cuda")


# ------------------------------------------------------------------------------ cpu backend


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize(
    "Q,N,D,k",
    [(1, 1, 1, 1), (5, 127, 72, 10), (33, 300, 64, 300), (3, 5000, 16, 1024), (2, 9000, 8, 3)],
)
def test_cpu_backend_matches_float64(dtype, metric, Q, N, D, k):
    q, b = _inputs(Q, N, D, dtype, seed=Q * N + D, ties=True, zero_rows=metric == "cosine")
    scores, idx = vf.topk_similarity(q, b, k, metric=metric, backend="cpu")
    assert scores.dtype == torch.float32
    check_topk(scores, idx, q, b, k, metric, _tol(dtype, D))
    if metric == "cosine":
        assert (scores[0] == 0).all(), "zero query row must score exactly 0"


def test_auto_on_cpu_uses_the_native_backend():
    q, b = _inputs(4, 50, 8, torch.float32)
    from vljepa_fast import _backends
    from vljepa_fast.ops.topk_similarity import topk_inputs

    rec, plan = _backends.select("topk_similarity", "auto", topk_inputs(q, b, 3))
    assert rec.name == "cpu" and plan is None


def test_topk_inputs_are_one_checked_object():
    """The builder checks and packs the arguments once (numpy k as int); every backend gets
    that object; the refusals are the records' readable reasons."""
    import dataclasses

    from vljepa_fast import _backends
    from vljepa_fast.ops.topk_similarity import topk_inputs

    q, b = _inputs(4, 50, 8, torch.float64)
    inputs = topk_inputs(q, b, np.int64(3), metric="cosine")
    assert type(inputs.k) is int and inputs.k == 3 and inputs.metric == "cosine"
    assert inputs.queries is q and inputs.bank is b and inputs.device == q.device
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.k = 4
    with pytest.raises(ValueError, match="metric: expected one of"):
        topk_inputs(q, b, 3, metric="l2")
    rec, plan = _backends.select("topk_similarity", "auto", inputs)
    assert rec.name == "reference" and plan is None  # float64: the native kernels refuse
    cpu = next(r for r in _backends.records("topk_similarity") if r.name == "cpu")
    assert _backends.reasons_for(cpu, inputs) == [
        "queries dtype float64 not supported (serves float32, float16, bfloat16)"
    ]


def test_scores_grad_custom_op_registration():
    """The gradient of the kernels' scores is a torch.library custom op (one autograd style):
    schema, autograd registration and fake kernel pass opcheck, and the scores it returns are
    the kernel's, unchanged."""
    q = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    scores, idx = vf.topk_similarity(q.detach(), b.detach(), 4, backend="reference")
    for cosine in (False, True):
        torch.library.opcheck(
            torch.ops.vljepa_fast.topk_scores_grad.default, (q, b, scores, idx, cosine),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )
    got, _ = vf.topk_similarity(q, b, 4, backend="reference")
    assert torch.equal(got, scores) and "topk_scores_grad" in type(got.grad_fn).__name__.lower()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    Q=st.integers(1, 9),
    N=st.integers(1, 700),
    D=st.integers(1, 80),
    kfrac=st.floats(0, 1),
    dtype=st.sampled_from(DTYPES),
    metric=st.sampled_from(["ip", "cosine"]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_vs_reference(Q, N, D, kfrac, dtype, metric, ties, seed):
    k = max(1, round(kfrac * min(N, 1024)))
    q, b = _inputs(Q, N, D, dtype, seed=seed, ties=ties)
    scores, idx = vf.topk_similarity(q, b, k, metric=metric, backend="cpu")
    check_topk(scores, idx, q, b, k, metric, _tol(dtype, D))


def test_reference_backend_float64_and_scores_gradient():
    q, b = _inputs(3, 20, 5, torch.float64)
    q.requires_grad_(True)
    b.requires_grad_(True)
    scores, idx = vf.topk_similarity(q, b, 4, metric="cosine")
    ref = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    want = ref.gather(1, idx)
    torch.testing.assert_close(scores, want)
    gq, gb = torch.autograd.grad(scores.sum(), (q, b))
    wq, wb = torch.autograd.grad(want.sum(), (q, b))
    torch.testing.assert_close(gq, wq)
    torch.testing.assert_close(gb, wb)


# ---------------------------------------------------------------------------- rules, every backend
# The order rule (NaN last, ties lowest index), gradients, strides: every backend that runs here,
# and the GPU ones in the gpu tier (Triton interpreted: tests/test_topk_similarity_triton.py).

CPU_BACKENDS = ["reference", "cpu", "auto"]
GPU_BACKENDS = [pytest.param(b, marks=pytest.mark.gpu) for b in ("cuda", "triton")]


def _device(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") else "cpu"


def _special_inputs(dtype, metric, seed):
    """A tie bank (see topk_tie_inputs) with NaN, +-inf and duplicated special rows, a NaN
    query row and a zero query row. fp32 "ip" adds products that overflow fp32 to +-inf."""
    q, b = topk_tie_inputs(6, 40, 16, dtype, metric, seed)
    q[:, 0] = torch.where(q[:, 0] == 0, torch.ones_like(q[:, 0]), q[:, 0])  # inf * q0 != NaN
    b[5, 2] = float("nan")
    b[7, 0] = float("inf")
    b[8] = b[7]
    b[9, 0] = float("-inf")
    b[10] = b[9]
    q[1, 3] = float("nan")  # every score NaN: indices 0..k-1
    q[4] = 0  # every score +-0 or NaN: ties
    overflow = dtype == torch.float32 and metric == "ip"
    if overflow:
        q[2, 1] = 2.0**100
        b[11, 1] = 2.0**100  # 2^200: +inf in fp32
        b[12, 1] = -(2.0**100)  # -inf
    return q, b, overflow


def _check_order(scores, idx, q, b, k, metric, fp32_order, atol):
    want_s, want_i = topk_expected(q, b, k, metric, fp32_order=fp32_order)
    assert idx.dtype == torch.int64 and scores.dtype == torch.float32
    torch.testing.assert_close(idx.cpu(), want_i, rtol=0, atol=0)
    got = scores.double().cpu()
    assert torch.equal(got.isnan(), want_s.isnan()), "NaN scores at other places"
    assert torch.equal(got.isinf() & (got > 0), want_s.isinf() & (want_s > 0)), "+inf places"
    assert torch.equal(got.isinf() & (got < 0), want_s.isinf() & (want_s < 0)), "-inf places"
    fin = want_s.isfinite()
    torch.testing.assert_close(got[fin], want_s[fin], rtol=0, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_nan_and_inf_rank_rule(backend, dtype, metric):
    """NaN scores rank last (below -inf), +-inf are ordinary scores, ties (also among the inf
    and NaN ones) go to the lowest index; a NaN query row returns indices 0..k-1."""
    q, b, overflow = _special_inputs(dtype, metric, seed=3)
    dev = _device(backend)
    b_want = b
    if backend == "triton" and dtype == torch.float32:
        # Documented: three-tf32 dots split x = hi + (x - hi), and an inf entry makes
        # inf - inf = NaN (products that overflow still give +-inf).
        b_want = b.masked_fill(b.isinf(), float("nan"))
    for k in (40, 13):
        scores, idx = vf.topk_similarity(q.to(dev), b.to(dev), k, metric=metric, backend=backend)
        _check_order(scores, idx, q, b_want, k, metric, overflow, _tol(dtype, 16))
    assert torch.equal(idx[1].cpu(), torch.arange(13)), "NaN query row: lowest indices first"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_topk_order_is_the_stable_order(dtype):
    """The reference's choice (topk plus the exact redo of rows whose tie group is cut by k or
    that hold a NaN) equals a full stable sort, for every k: ties, +-0, +-inf, NaN."""
    from vljepa_fast import reference

    g = torch.Generator().manual_seed(12)
    s = torch.randint(-4, 5, (9, 61), generator=g).to(dtype) / 2  # many exact ties
    s[0, 3:9] = -0.0
    s[1, ::7] = float("nan")
    s[2] = float("nan")
    s[3, 5:20] = float("-inf")
    s[3, 30:40] = float("nan")
    s[4, 10:12] = float("inf")
    s[5] = torch.randn(61, generator=g).to(dtype)  # no ties: the fast path
    nan = s.isnan()
    order = s.masked_fill(nan, float("-inf")).argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, nan.gather(1, order).to(torch.uint8).argsort(dim=1, stable=True))
    for k in (1, 2, 5, 17, 40, 60, 61):
        assert torch.equal(reference.topk_order(s, k), order[:, :k]), k


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_ties_lowest_index_across_threads(deterministic, backend, dtype, metric):
    """Many exact duplicate rows; k spans tie groups. Large enough (Q * N * D = 2^20) for the
    cpu kernel's parallel path: 1 and 2 threads, repeated runs, all equal to the stable
    float64 order."""
    q, b = topk_tie_inputs(16, 4096, 16, dtype, metric, seed=7)
    dev = _device(backend)
    qd, bd = q.to(dev), b.to(dev)
    runs = []
    for threads in (1, 2, 2, 1, 2):
        torch.set_num_threads(threads)
        for k in (300, 1000):
            scores, idx = vf.topk_similarity(qd, bd, k, metric=metric, backend=backend)
            _check_order(scores, idx, q, b, k, metric, False, _tol(dtype, 16))
            runs.append((k, scores.cpu(), idx.cpu()))
    for k, s, i in runs:
        first = next(r for r in runs if r[0] == k)
        assert torch.equal(s, first[1]) and torch.equal(i, first[2]), "runs differ"


def _oracle_grads(q, b, idx, g, metric, cdt):
    """Gradients of sum(g * scores[idx]) by autograd through the full score matrix in ``cdt``,
    with the documented cosine rule: rows with norm < 1e-12 get a zero gradient. Returned in
    the inputs' dtypes (so a float32 run is the eager result in the input dtype)."""
    qc = q.detach().cpu().to(cdt).requires_grad_(True)
    bc = b.detach().cpu().to(cdt).requires_grad_(True)
    qn, bn = qc, bc
    if metric == "cosine":
        qn, bn = F.normalize(qc, dim=1, eps=1e-12), F.normalize(bc, dim=1, eps=1e-12)
    s = (qn @ bn.T).gather(1, idx.cpu())
    gq, gb = torch.autograd.grad((s * g.cpu().to(cdt)).sum(), (qc, bc))
    if metric == "cosine":
        gq[qc.detach().norm(dim=1) < 1e-12] = 0
        gb[bc.detach().norm(dim=1) < 1e-12] = 0
    out = (gq, gb) if cdt == torch.float64 else (gq.to(q.dtype), gb.to(b.dtype))
    return out


@pytest.mark.parametrize(
    "backend,dtype",
    [(be, dt) for be in CPU_BACKENDS for dt in DTYPES]
    + [pytest.param(be, dt, marks=pytest.mark.gpu) for be in ("cuda", "triton") for dt in DTYPES]
    + [("reference", torch.float64)],
)
@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("zero_rows", [False, True])
def test_gradients_match_float64(backend, dtype, metric, zero_rows):
    """Scores with a gradient are the kernel's scores (same values, same order: ties included)
    and their gradients to queries and bank match float64 within 2x the eager error; a zero
    row (cosine, fp16 included) gets a finite, zero gradient."""
    dev = _device(backend)
    q, b = _inputs(7, 300, 72, dtype, device=dev, seed=11, ties=True, zero_rows=zero_rows)
    b[100:120] = b[0:20]  # more exact ties inside the top k
    k = 37
    s_plain, i_plain = vf.topk_similarity(q, b, k, metric=metric, backend=backend)
    qg, bg = q.clone().requires_grad_(True), b.clone().requires_grad_(True)
    scores, idx = vf.topk_similarity(qg, bg, k, metric=metric, backend=backend)
    assert scores.requires_grad and not idx.requires_grad
    assert torch.equal(idx, i_plain), "a gradient changed the indices"
    assert torch.equal(scores, s_plain), "a gradient changed the scores"
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "scores not sorted descending"
    g = torch.randn(scores.shape, generator=torch.Generator().manual_seed(5)).to(dev)
    gq, gb = torch.autograd.grad((scores * g).sum(), (qg, bg))
    assert gq.dtype == dtype and gb.dtype == dtype
    assert torch.isfinite(gq).all() and torch.isfinite(gb).all()
    exact = _oracle_grads(q, b, idx, g, metric, torch.float64)
    eager = _oracle_grads(q, b, idx, g, metric, torch.float32)
    for name, got, e32, e64 in zip(("d_queries", "d_bank"), (gq, gb), eager, exact):
        assert_close_2x(got.cpu(), e32, e64, dtype, name)
    if zero_rows and metric == "cosine":
        assert (gq[0] == 0).all() and (gb[0] == 0).all(), "zero rows: zero gradient"
    # one input at a time
    (only_q,) = torch.autograd.grad(
        vf.topk_similarity(qg, b, k, metric=metric, backend=backend)[0].mul(g).sum(), qg
    )
    assert torch.equal(only_q, gq)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_gradcheck_float64(metric):
    q, b = _inputs(3, 12, 5, torch.float64, seed=2)
    q.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: vf.topk_similarity(x, y, 4, metric=metric, backend="reference")[0], (q, b)
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS + GPU_BACKENDS)
def test_non_contiguous_inputs_any_strides(backend):
    """Transposed and strided inputs give the results (and gradients) of contiguous copies."""
    dev = _device(backend)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(40, 9, generator=g).to(dev).T  # [9, 40], strides (1, 9)
    b = torch.randn(2 * 130, 40, generator=g).to(dev)[::2]  # [130, 40], strides (80, 1)
    assert not q.is_contiguous() and not b.is_contiguous()
    for metric in ("ip", "cosine"):
        want = vf.topk_similarity(q.contiguous(), b.contiguous(), 17, metric=metric,
                                  backend=backend)
        got = vf.topk_similarity(q, b, 17, metric=metric, backend=backend)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        qg = q.detach().requires_grad_(True)
        (dq,) = torch.autograd.grad(vf.topk_similarity(qg, b, 17, metric=metric,
                                                       backend=backend)[0].sum(), qg)
        qc = q.detach().contiguous().requires_grad_(True)
        (dqc,) = torch.autograd.grad(vf.topk_similarity(qc, b.contiguous(), 17, metric=metric,
                                                        backend=backend)[0].sum(), qc)
        assert torch.equal(dq, dqc)


@pytest.mark.parametrize(
    "k,match",
    [
        (True, "k: expected an int, got bool"),
        (np.bool_(True), "k: expected an int"),
        (2.0, "k: expected an int, got float"),
        (torch.tensor(2), "k: expected an int, got Tensor"),
        ("2", "k: expected an int"),
        (np.int64(0), "k: expected in \\[1, 5\\]"),
    ],
)
def test_k_validation(k, match):
    with pytest.raises(ValueError, match=match):
        vf.topk_similarity(torch.randn(3, 4), torch.randn(5, 4), k)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_k_numpy_integer_accepted(backend):
    q, b = _inputs(3, 20, 4, torch.float32)
    want = vf.topk_similarity(q, b, 3, backend=backend)
    for k in (np.int64(3), np.int32(3), np.uint8(3)):
        got = vf.topk_similarity(q, b, k, backend=backend)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "q_shape,b_shape,match",
    [
        ((3, 0), (5, 0), "queries: expected at least one column \\(D >= 1\\)"),
        ((0, 0), (5, 0), "queries: expected at least one query row"),
        ((3, 4), (0, 4), "bank: expected at least one bank row"),
    ],
)
def test_empty_dims_rejected(q_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        vf.topk_similarity(torch.randn(q_shape), torch.randn(b_shape), 1)


def test_native_op_called_directly_with_grad_inputs():
    """The registered CPU kernel records no autograd history (its mm_out used to fail)."""
    from vljepa_fast.ops import _common

    assert _common.native_kernel("topk_similarity", "cpu") == []  # loads the library
    q, b = torch.randn(3, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    scores, idx = torch.ops.vljepa_fast.topk_similarity(q, b, 4, False)
    want = vf.topk_similarity(q.detach(), b.detach(), 4, backend="cpu")
    assert torch.equal(scores, want[0]) and torch.equal(idx, want[1])


NATIVE_BAD = {
    "d_zero": ((3, 0), (5, 0), 2, "at least one feature column"),
    "k_zero": ((3, 4), (5, 4), 0, "k must be in"),
    "k_above_n": ((3, 4), (5, 4), 6, "k must be in"),
    "k_huge": ((3, 4), (5, 4), 2**63 - 1, "k must be in"),
    "k_negative": ((3, 4), (5, 4), -(2**63), "k must be in"),
    "dim_mismatch": ((3, 4), (5, 3), 2, "same feature size"),
    "queries_3d": ((3, 4, 1), (5, 4), 2, "must be 2-D"),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", NATIVE_BAD)
def test_native_op_refuses_bad_calls(case, device):
    """Direct calls through torch.ops (eager and FakeTensor tracing alike) get the same checks."""
    from vljepa_fast.ops import _common

    assert _common.native_kernel("topk_similarity", "cpu") == []  # loads the library
    q_shape, b_shape, k, match = NATIVE_BAD[case]
    q, b = torch.randn(q_shape, device=device), torch.randn(b_shape, device=device)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vljepa_fast.topk_similarity(q, b, k, False)


def test_native_meta_refuses_mixed_devices():
    """A real tensor mixed with a meta one must not get uninitialised real outputs back."""
    from vljepa_fast.ops import _common

    assert _common.native_kernel("topk_similarity", "cpu") == []
    q, b = torch.randn(3, 4), torch.randn(5, 4, device="meta")
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        torch.ops.vljepa_fast.topk_similarity(q, b, 2, False)


# ------------------------------------------------------------------------------ EmbeddingIndex


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_embedding_index_add_search_ids(metric):
    g = torch.Generator().manual_seed(1)
    a, c = torch.randn(40, 16, generator=g), torch.randn(25, 16, generator=g)
    index = vf.nn.EmbeddingIndex(16, metric=metric)
    index.add(a)
    index.add(c, ids=torch.arange(1000, 1025))
    assert len(index) == 65
    q = torch.randn(7, 16, generator=g)
    scores, ids = index.search(q, 5)
    allv = torch.cat([a, c])
    all_ids = torch.cat([torch.arange(40), torch.arange(1000, 1025)])
    s_ref, i_ref = vf.topk_similarity(q, allv, 5, metric=metric, backend="reference")
    torch.testing.assert_close(scores, s_ref, atol=1e-5, rtol=0)
    row_of = {int(i): r for r, i in enumerate(all_ids)}
    rows = torch.tensor([[row_of[int(i)] for i in line] for line in ids])
    check_topk(scores, rows, q, allv, 5, metric, 1e-5)  # the ids point at rows with those scores
    s1, i1 = index.search(q[0], 3)
    assert s1.shape == (3,) and i1.shape == (3,)
    index.reset()
    assert len(index) == 0
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(q, 1)


def test_embedding_index_errors():
    index = vf.nn.EmbeddingIndex(8)
    with pytest.raises(ValueError, match="x: expected a \\[n, 8\\] tensor"):
        index.add(torch.randn(3, 7))
    with pytest.raises(ValueError, match="ids: expected an integer tensor of shape \\[3\\]"):
        index.add(torch.randn(3, 8), ids=torch.arange(2))
    index.add(torch.randn(3, 8))
    with pytest.raises(ValueError, match="k: expected in \\[1, 3\\]"):
        index.search(torch.randn(2, 8), 4)
    with pytest.raises(ValueError, match="metric"):
        vf.nn.EmbeddingIndex(8, metric="l2")


def test_embedding_index_save_load_roundtrip_and_corruption(tmp_path):
    index = vf.nn.EmbeddingIndex(12, metric="cosine", dtype=torch.bfloat16)
    index.add(torch.randn(30, 12), ids=torch.randint(0, 10**9, (30,)))
    path = tmp_path / "idx.vfi"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["idx.vfi"], "temporary file left behind"
    back = vf.nn.EmbeddingIndex.load(path)
    assert (back.dim, back.metric, back.dtype, len(back)) == (12, "cosine", torch.bfloat16, 30)
    assert torch.equal(back.vectors, index.vectors) and torch.equal(back.ids, index.ids)
    q = torch.randn(4, 12)
    assert all(torch.equal(x, y) for x, y in zip(back.search(q, 6), index.search(q, 6)))
    data = path.read_bytes()
    (tmp_path / "trunc").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        vf.nn.EmbeddingIndex.load(tmp_path / "trunc")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    (tmp_path / "flip").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        vf.nn.EmbeddingIndex.load(tmp_path / "flip")
    (tmp_path / "junk").write_bytes(b"hello")
    with pytest.raises(ValueError, match="bad header"):
        vf.nn.EmbeddingIndex.load(tmp_path / "junk")


# ------------------------------------------------------------------------------ gpu tier


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize(
    "Q,N,D,k",
    [
        (1, 1, 1, 1),
        (5, 127, 72, 10),
        (33, 3000, 64, 100),
        (16, 100000, 1536, 10),
        (1024, 20000, 256, 1024),
    ],
)
def test_gpu_backends_match_float64(backend, dtype, metric, Q, N, D, k):
    q, b = _inputs(
        Q, N, D, dtype, device="cuda", seed=Q + N + D, ties=True, zero_rows=metric == "cosine"
    )
    scores, idx = vf.topk_similarity(q, b, k, metric=metric, backend=backend)
    torch.cuda.synchronize()
    check_topk(scores.cpu(), idx.cpu(), q.cpu(), b.cpu(), k, metric, _tol(dtype, D))


@pytest.mark.gpu
def test_gpu_triton_large_k_and_auto():
    q, b = _inputs(4, 5000, 64, torch.bfloat16, device="cuda")
    scores, idx = vf.topk_similarity(q, b, 2048, backend="triton")
    check_topk(scores.cpu(), idx.cpu(), q.cpu(), b.cpu(), 2048, "ip", _tol(torch.bfloat16, 64))
    s2, _ = vf.topk_similarity(q, b, 10)
    torch.testing.assert_close(s2, scores[:, :10], atol=_tol(torch.bfloat16, 64), rtol=0)
    with pytest.raises(vf.BackendUnavailableError, match="k = 3000 > 2048"):
        vf.topk_similarity(q, b, 3000, backend="triton")


# ------------------------------------------------------------------------------ plans, faiss


def faiss_inputs(num_queries: int, num_bank: int, dtype: torch.dtype, seed: int, device="cpu"):
    """Tie-free inputs with exact scores in every dtype: bank rows are distinct 4-digit base-32
    numbers (digits 0..31), each query a signed permutation of the weights 32^j, so every score
    is an integer below 2^20 (exact in fp32 sums, 16-bit inputs exact) and, per query, distinct
    between bank rows: any correct kernel returns exactly faiss's ids and scores."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randperm(32**4, generator=g)[:num_bank]
    digits = torch.stack([(codes // 32**j) % 32 for j in range(4)], dim=1).float()
    weights = torch.tensor([32.0**j for j in range(4)])
    queries = torch.stack([weights[torch.randperm(4, generator=g)] for _ in range(num_queries)])
    queries *= torch.where(torch.rand(num_queries, 1, generator=g) < 0.5, -1.0, 1.0)
    return queries.to(device, dtype), digits.to(device, dtype)


def faiss_search(queries: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """faiss's exact inner-product search (IndexFlatIP) of the same values, in float32."""
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank.float().cpu().numpy())
    scores, ids = index.search(queries.float().cpu().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(ids).long()


def test_native_plan_arguments():
    """The native schema's plan arguments (path, chunk) are checked on every device (eager and
    Meta); the cpu kernel ignores a valid plan (same results)."""
    from vljepa_fast.ops import _common

    assert _common.native_kernel("topk_similarity", "cpu") == []
    q, b = torch.randn(3, 8), torch.randn(40, 8)
    want = torch.ops.vljepa_fast.topk_similarity(q, b, 5, False)
    for path, chunk in ((1, 0), (2, 7), (0, 100)):
        got = torch.ops.vljepa_fast.topk_similarity(q, b, 5, False, path, chunk)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for device in ("cpu", "meta"):
        qd, bd = q.to(device), b.to(device)
        with pytest.raises(RuntimeError, match="path must be 0 \\(the rule\\), 1"):
            torch.ops.vljepa_fast.topk_similarity(qd, bd, 5, False, 3, 0)
        with pytest.raises(RuntimeError, match="chunk must be >= 0"):
            torch.ops.vljepa_fast.topk_similarity(qd, bd, 5, False, 2, -1)


def test_cuda_plan_rule(monkeypatch):
    """The cuda record's plan: always GEMM + k-select (its one path) with the chunk rule
    (ops/_chunks); k > 2048 is a reason (CPU stand-ins: the plan reads shapes only)."""
    from vljepa_fast.ops import topk_similarity as topk_op

    def plan(Q, N, k):
        return topk_op.cuda_plan(topk_op.topk_inputs(torch.empty(Q, 8), torch.empty(N, 8), k))

    assert plan(64, 1000, 64).path == "gemm" and plan(1, 10, 1).path == "gemm"
    assert plan(65, 1000, 10).path == "gemm" and plan(16, 1000, 65).path == "gemm"
    assert plan(100, 5000, 10) == topk_op.NativePlan("gemm", 5000)  # the 1 GiB floor: one chunk
    monkeypatch.setenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", str(100 * 4 * 640 / 2**20))
    assert plan(100, 5000, 10).chunk == 640
    inputs = topk_op.topk_inputs(torch.empty(2, 8), torch.empty(3000, 8), 2049)
    refusal = topk_op._cuda_supports(inputs)
    assert isinstance(refusal, _backends.Refusal) and "k = 2049 > 2048" in refusal.reasons[0]


GPU_FAISS = [
    pytest.param(backend, path, k, marks=pytest.mark.gpu, id=f"{backend}-{path}-k{k}")
    for backend, paths in (("cuda", ("gemm",)), ("triton", ("stream", "gemm")))
    for path in paths
    for k in (1, 10, 100, 1024, 2048)
    if path == "gemm" or k <= 32
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, path, k", GPU_FAISS)
def test_gpu_ids_equal_faiss(backend, path, k, dtype, monkeypatch):
    """ids (and scores) equal faiss's IndexFlatIP on tie-free exact data, for every k of the
    issue and both paths (forced through the record's plan), with chunks that do not divide N."""
    from vljepa_fast.ops import topk_similarity as topk_op

    Q = 40 if path == "stream" else 300
    queries, bank = faiss_inputs(Q, 20_001, dtype, seed=k, device="cuda")
    want_s, want_i = faiss_search(queries, bank, k)
    monkeypatch.setenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", str(Q * 4 * 6400 / 2**20))
    inputs = topk_op.topk_inputs(queries, bank, k)
    record, _ = _backends.select("topk_similarity", backend, inputs)
    plan = topk_op.cuda_plan(inputs) if backend == "cuda" else topk_op.triton_plan(inputs, path)
    assert plan.path == path and (path == "stream" or plan.chunk == 6400)
    scores, ids = record.run(inputs, plan)
    torch.cuda.synchronize()
    assert torch.equal(ids.cpu(), want_i), "ids differ from faiss"
    assert torch.equal(scores.cpu(), want_s)


# ------------------------------------------------------------------------------ compile (CUDA)
# The kernels of csrc/cuda/topk_similarity.cu: nvcc names the anonymous namespace of a
# translation unit after its file, so every function of that file carries this tag.
TOPK_TAG = "_topk_similarity_cu_"
TOPK_KERNELS = ("topk_select_kernel", "topk_merge_kernel", "inv_norm_kernel")


def _topk_sections(header: str, *args: str) -> dict[str, str]:
    """{mangled name: section} of the topk_similarity.cu functions in a cuobjdump listing of the
    built CUDA library."""
    found = dump_sections(cuda_library_dump(*args), header, TOPK_TAG)
    for kernel in TOPK_KERNELS:
        assert any(kernel in name for name in found), f"{kernel} missing from the sm_90a code"
    return found


@pytest.mark.compile
def test_sm90a_topk_kernels_have_no_spills():
    """Regression (the 16- and 32-query stream tiles spilled on sm_90a): ptxas's resources of
    every topk_similarity.cu kernel for sm_90a show no stack frame and no local memory, and the
    streaming tile is gone."""
    sections = _topk_sections("Function", "--dump-resource-usage", "-arch", "sm_90a")
    assert_no_spills(sections, "sm_90a")


@pytest.mark.compile
def test_sm90a_topk_has_no_hand_written_gemm_loop():
    """Regression (the GPU design rule: a hand-written GEMM loop must be wgmma on sm_90): the
    streaming WMMA tile is gone, so no topk_similarity.cu kernel issues an MMA instruction in
    its sm_90a SASS; the products are cuBLAS's."""
    import re

    sections = _topk_sections("Function :", "-sass", "-arch", "sm_90a")
    assert not any("topk_chunk_kernel" in name for name in sections)
    for name, body in sections.items():
        mma = re.findall(r"\b(HMMA|HGMMA|IMMA|IGMMA|BMMA|QMMA|DMMA)\b", body)
        assert not mma, f"{name}: {len(mma)} MMA instructions ({sorted(set(mma))})"
