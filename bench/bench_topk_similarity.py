"""topk_similarity: batched top-k search of a query batch in an embedding bank.

Providers, side by side in one benchmark group per shape:

* ``reference``: the eager reference (torch mm + topk over the full Q x N score matrix).
* ``vf.<backend>``: every backend registered for the op (fused kernels that never write the
  score matrix), skipped with the backend's own reasons where it cannot serve the inputs.
* ``faiss.IndexFlatIP``: faiss brute-force inner-product search, the index built outside the
  timing; faiss-cpu on CPU inputs with as many OpenMP threads as torch has, faiss's GPU index
  on CUDA inputs when this faiss has GPU support.

FLOPs and bytes: :func:`topk_cost` (2*Q*N*D; the bank and queries read once, the results
written once). No torch.compile provider: compiling mm + topk still writes the score matrix.
"""

from __future__ import annotations

import _harness
import torch

import vljepa_fast as vf
from vljepa_fast import _backends
from vljepa_fast.ops import topk_similarity as topk_op

OP = "topk_similarity"

#: Bytes of one result entry: a float32 score and an int64 index (every backend, every bench
#: dtype; only float64 inputs, which no preset runs, get float64 scores).
RESULT_BYTES = 4 + 8

TOPK_FORMULA = (
    "flops 2*Q*N*D (one multiply-add per query, bank row and feature: the score GEMM; the "
    "selection's compares and cosine's row norms are not counted); bytes (N + Q)*D*s + "
    "Q*k*12 (bank and queries read once, k float32 scores and int64 indices per query written)"
)


def topk_cost(Q: int, N: int, D: int, k: int, itemsize: int) -> _harness.Cost:
    """FLOPs and compulsory bytes of one search of Q queries [Q, D] in a bank [N, D].

    FLOPs = 2*Q*N*D: every provider forms all Q*N scores (the fused kernels in tiles, faiss and
    the reference as a matrix). Not counted: the top-k selection (compares, not FLOPs) and, for
    metric "cosine", the row norms (2*(Q + N)*D, under 1/Q of the total).

    Bytes = (N + Q)*D*itemsize + Q*k*12: the least traffic of any implementation, reading the
    bank and the queries once and writing the results ([Q, k] float32 scores and int64
    indices) once. A kernel that reads the bank once per block of queries moves more; the
    reference also writes and reads the Q x N score matrix (4*Q*N bytes more), which this
    count leaves out so that every provider is measured against the same work.

    Args:
        Q, N, D: queries, bank rows, feature dimension.
        k: results per query.
        itemsize: bytes of one element of the queries and the bank.
    """
    flops = 2 * Q * N * D
    nbytes = (N + Q) * D * itemsize + Q * k * RESULT_BYTES
    return _harness.Cost(flops, nbytes, TOPK_FORMULA)  # predicted_s: topk_predicted


def _label(c: dict) -> str:
    return f"Q{c['Q']} N{c['N']} D{c['D']} k{c['k']} {c['metric']} {c['dtype']}"


def _providers(c: dict) -> list[str]:
    fused = [f"vf.{r.name}" for r in _backends.records(OP) if r.name != "reference"]
    return ["reference", *fused, "faiss.IndexFlatIP"]


def pytest_generate_tests(metafunc):
    _harness.parametrize(metafunc, OP, _providers, _label)


def _faiss(queries: torch.Tensor, bank: torch.Tensor, k: int, metric: str):
    faiss = _harness.import_peer("faiss", "faiss-cpu")
    if metric != "ip":
        raise _harness.PeerMissing(f"IndexFlatIP serves metric 'ip', this case is {metric!r}")
    dim = bank.shape[1]
    if queries.device.type == "cuda":
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            raise _harness.PeerMissing(
                "this faiss has no GPU support (faiss-cpu); a CPU index on GPU inputs is no peer"
            )
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take CUDA tensors)

        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = queries.device.index or 0
        cfg.useFloat16 = bank.dtype != torch.float32  # faiss stores fp16, not bf16
        index = faiss.GpuIndexFlatIP(res, dim, cfg)
        index.add(bank.float())
        qf = queries.float()
        return lambda: index.search(qf, k)
    if bank.dtype != torch.float32:
        raise _harness.PeerMissing(
            f"faiss-cpu IndexFlatIP takes float32, this case is {bank.dtype}"
        )
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(dim)
    index.add(bank.numpy())
    qn = queries.numpy()
    return lambda: index.search(qn, k)


def test_topk_similarity(benchmark, case, provider):
    bench = _harness.Bench(benchmark, OP, case, provider)
    device, dtype = bench.device, bench.dtype
    Q, N, D, k, metric = case["Q"], case["N"], case["D"], case["k"], case["metric"]

    def build(seed: int) -> tuple:
        g = torch.Generator(device=device).manual_seed(seed)
        return (
            torch.randn(Q, D, generator=g, device=device, dtype=dtype),
            torch.randn(N, D, generator=g, device=device, dtype=dtype),
        )

    sets = _harness.input_sets((OP, case["label"]), build, device)
    notes = []
    if provider == "faiss.IndexFlatIP":
        notes.append(f"faiss OpenMP threads = torch threads = {torch.get_num_threads()}")

        def make(s):
            return _faiss(s[0], s[1], k, metric)
    else:
        name = "reference" if provider == "reference" else provider.removeprefix("vf.")

        def make(s):
            # raises BackendUnavailableError with the backend's reasons: the case is skipped
            _backends.select(OP, name, topk_op.topk_inputs(s[0], s[1], k, metric=metric))
            return lambda: vf.topk_similarity(s[0], s[1], k, metric=metric, backend=name)

    cost = topk_cost(Q, N, D, k, dtype.itemsize)
    if provider == "vf.triton":
        cost = cost._replace(predicted_s=topk_predicted(sets[0], k, metric))
    bench.run(make, sets, cost, notes=notes)


def topk_predicted(inputs: tuple, k: int, metric: str) -> float | None:
    """The H200 time the Triton design implies for this case under the plan the backend would
    run (``vljepa_fast._kernels.topk_similarity.predicted_seconds``, the kernel file's model);
    None where the backend cannot serve the case (it is then skipped with its reasons)."""
    from vljepa_fast._kernels import topk_similarity as kernel

    x = topk_op.topk_inputs(inputs[0], inputs[1], k, metric=metric)
    try:
        _, plan = _backends.select(OP, "triton", x)
    except _backends.BackendUnavailableError:
        return None
    Q, D = x.queries.shape
    return kernel.predicted_seconds(Q, x.bank.shape[0], D, k, x.queries.dtype, x.cosine, plan)
