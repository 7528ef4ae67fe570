"""topk_similarity: validation, every native/eager backend against float64, properties, the
EmbeddingIndex module, and (gpu tier) the CUDA and Triton kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vljepa_fast as vf
from tests._util import check_topk

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
    with pytest.raises(ValueError, match="bank: expected a contiguous tensor"):
        vf.topk_similarity(q, torch.randn(4, 5).T, 2)
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

    assert _backends.select("topk_similarity", "auto", (q, b, 3), {"metric": "ip"}).name == "cpu"


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
    scores, idx = vf.topk_similarity(q, b, 3000, backend="triton")
    check_topk(scores.cpu(), idx.cpu(), q.cpu(), b.cpu(), 3000, "ip", _tol(torch.bfloat16, 64))
    s2, _ = vf.topk_similarity(q, b, 10)
    torch.testing.assert_close(s2, scores[:, :10], atol=_tol(torch.bfloat16, 64), rtol=0)
