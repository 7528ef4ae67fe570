"""The 64-query tile of the Triton top-k streaming kernel and the GEMM paths (gpu tier; runs
in scripts/gpu_run.sh): ids and scores of the Triton and CUDA backends against a float64
reference whose ties go to the lowest bank index.

Which path a shape takes (the documented rules, decided by the records' ``supports``):
* Triton (kernels/topk_similarity.py, choose_path): "stream" (one 64-query block, wgmma N = 64)
  when Q <= 64 and k <= 32, else "gemm"; checked here on the CPU by test_shapes_take_their_path,
  so the gpu cases cannot drift off their path.
* CUDA (ops/topk_similarity.cuda_plan, csrc/cuda/topk_similarity.cu): always "gemm" (its one
  path), few queries included.

Shapes: Q = 64 (one whole tile), Q = 40 (a partial tile) with N odd, CUDA k = 64 at Q = 40, and
Q = 256 / 100; D = 1536 (VL-JEPA's embedding).
Every case plants exact duplicates of bank rows (two and three copies, the lower index before or
after the source) and queries equal to those rows, so that the top two or three scores are exact
ties far above the rest.

Checks: scores within an fp32-accumulation bound of the float64 top-k; every returned id carries
its returned score; ids equal the reference's at every position whose score is separated from
its neighbours by more than twice that bound (near-ties may swap, exact ties may not); exact
ties come out with bitwise-equal scores, lowest index first.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import vljepa_fast as vf
from vljepa_fast.ops import topk_similarity as topk_op
from vljepa_fast.reference import NORM_EPS

#: where the gpu cases run (a module constant: the checks can be tried on CPU backends too)
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
D = 1536
# (Q, N, k, backend, path)
SHAPES = [
    pytest.param(64, 50_000, 10, "triton", "stream", id="Q64-N50000-k10-triton"),
    pytest.param(64, 50_000, 10, "cuda", "gemm", id="Q64-N50000-k10-cuda"),
    pytest.param(40, 50_001, 10, "triton", "stream", id="Q40-N50001-k10-triton"),
    pytest.param(40, 50_001, 10, "cuda", "gemm", id="Q40-N50001-k10-cuda"),
    pytest.param(40, 50_000, 64, "cuda", "gemm", id="Q40-N50000-k64-cuda"),
    *(
        pytest.param(256, 50_000, 10, b, "gemm", id=f"Q256-N50000-k10-{b}")
        for b in ("triton", "cuda")
    ),
    *(
        pytest.param(100, 50_001, 100, b, "gemm", id=f"Q100-N50001-k100-{b}")
        for b in ("triton", "cuda")
    ),
]
# (source row, its copies): a copy below the source, above it, and a source with two copies
DUPLICATES = [(3, (49_990,)), (40_000, (5,)), (12_345, (12_346, 777)), (20_000, (19_999,))]


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes_take_their_path(dtype):
    """The gpu cases below run on the path their id names (the records' plans, computed on CPU
    stand-ins of the same shapes)."""
    for param in SHAPES:
        Q, N, k, backend, path = param.values
        q, b = torch.empty(Q, D, dtype=dtype), torch.empty(N, D, dtype=dtype)
        inputs = topk_op.topk_inputs(q, b, k)
        plan = topk_op.triton_plan(inputs) if backend == "triton" else topk_op.cuda_plan(inputs)
        assert plan.path == path, (param.id, plan)
        if backend == "triton" and path == "stream":
            assert plan.bq == 64


def inputs(Q: int, N: int, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """Fresh N(0, 1) queries and bank on CUDA with planted duplicate rows; queries 0.. equal the
    duplicated rows (their top scores are exact ties)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    bank = torch.randn(N, D, generator=g, device=DEVICE).to(dtype)
    queries = torch.randn(Q, D, generator=g, device=DEVICE).to(dtype)
    for i, (src, copies) in enumerate(DUPLICATES):
        for dst in copies:
            bank[min(dst, N - 1)] = bank[src]
        queries[i] = bank[src]
        queries[len(DUPLICATES) + i] = 0.5 * bank[src]  # the same ties, another magnitude
    return queries, bank


def scores64(queries: Tensor, bank: Tensor, metric: str) -> Tensor:
    """[Q, N] float64 scores of the (already rounded) inputs; cosine divides by max(|x|, eps)."""
    q, b = queries.double(), bank.double()
    if metric == "cosine":
        q, b = F.normalize(q, dim=1, eps=NORM_EPS), F.normalize(b, dim=1, eps=NORM_EPS)
    return q @ b.T


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Q, N, k, backend, path", SHAPES)
def test_gpu_64_query_tile_matches_float64(Q, N, k, backend, path, dtype, metric):
    queries, bank = inputs(Q, N, dtype, seed=Q + N + k + DTYPES.index(dtype))
    scores, ids = vf.topk_similarity(queries, bank, k, metric=metric, backend=backend)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert scores.shape == (Q, k) and scores.dtype == torch.float32
    assert ids.shape == (Q, k) and ids.dtype == torch.int64
    assert torch.isfinite(scores).all(), "non-finite score (an unwritten candidate)"
    assert ((ids >= 0) & (ids < N)).all(), "id out of range"
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "an id repeats within a row"
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "scores not sorted descending"

    full = scores64(queries, bank, metric)
    # fp32 accumulation of exact products: a few ulps of the largest sum of |q_i * b_i|
    magnitude = scores64(queries.abs(), bank.abs(), metric).max().item()
    atol = 1e-5 * magnitude + 1e-6
    # the reference order: descending score, equal scores by lowest index (a stable sort)
    ref_scores, ref_ids = torch.sort(full, dim=1, descending=True, stable=True)
    ref_scores, ref_ids = ref_scores[:, : k + 1], ref_ids[:, : k + 1]
    torch.testing.assert_close(scores.double(), ref_scores[:, :k], rtol=0, atol=atol)
    torch.testing.assert_close(full.gather(1, ids), scores.double(), rtol=0, atol=atol)

    ref_s, ref_i = ref_scores.tolist(), ref_ids.tolist()
    got_s, got_i = scores.tolist(), ids.tolist()
    exact_ties = 0
    for r in range(Q):
        # clusters of positions 0..k whose neighbouring reference scores are within 2 atol
        cuts = [j for j in range(1, k + 1) if ref_s[r][j - 1] - ref_s[r][j] > 2 * atol]
        for lo, hi in zip([0, *cuts], [*cuts, k + 1]):
            if hi > k:  # the cluster reaches past the k-th result: any of its members may win
                break
            want, got = ref_i[r][lo:hi], got_i[r][lo:hi]
            if hi - lo == 1:
                assert got == want, f"row {r} position {lo}: id {got}, want {want}"
            elif len(set(ref_s[r][lo:hi])) == 1:  # exact ties: lowest index first
                exact_ties += 1
                assert got == want, f"row {r}: tied ids {got}, want lowest index first {want}"
                tied = got_s[r][lo:hi]
                assert len(set(tied)) == 1, f"row {r}: equal bank rows scored {tied}"
            else:  # near-ties: the same ids, in either order
                assert sorted(got) == sorted(want), f"row {r}: ids {got}, want {want}"
    # the planted duplicates: 2 query rows per source, each an exact tie at the top
    assert exact_ties >= 2 * len(DUPLICATES), f"only {exact_ties} exact-tie groups checked"
