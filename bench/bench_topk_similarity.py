"""topk_similarity: batched top-k search of a query batch in an embedding bank.

Providers, side by side in one benchmark group per shape:

* ``reference``: the eager reference (torch mm + topk over the full Q x N score matrix).
* ``vf.<backend>``: every backend registered for the op (fused kernels that never write the
  score matrix), skipped with the backend's own reasons where it cannot serve the inputs.
* ``faiss.IndexFlatIP``: faiss brute-force inner-product search, the index built outside the
  timing; faiss-cpu on CPU inputs with as many OpenMP threads as torch has, faiss's GPU index
  on CUDA inputs when this faiss has GPU support.

FLOPs 2*Q*N*D; bytes N*D*itemsize (the bank, which a fused kernel reads once).
No torch.compile provider: compiling mm + topk still writes the score matrix.
"""

from __future__ import annotations

import _harness
import torch

import vljepa_fast as vf
from vljepa_fast import _backends

OP = "topk_similarity"


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
    device = _harness.device_for(OP, case, provider)
    dtype = _harness.dtype_for(case["dtype"], device)
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
            _backends.select(OP, name, (s[0], s[1], k), {"metric": metric})  # raises its reasons
            return lambda: vf.topk_similarity(s[0], s[1], k, metric=metric, backend=name)

    _harness.run_case(
        benchmark,
        op=OP,
        case=case,
        provider=provider,
        make=make,
        sets=sets,
        flops=_harness.topk_flops(Q, N, D),
        nbytes=_harness.topk_bytes(N, D, dtype.itemsize),
        formula=_harness.TOPK_FORMULA,
        notes=notes,
    )
