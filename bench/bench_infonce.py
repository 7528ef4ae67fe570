"""infonce_loss: the bidirectional InfoNCE loss of VL-JEPA (temperature 0.07, normalised rows,
mean reduction), forward alone and forward + backward.

Providers, side by side in one benchmark group per shape and mode:

* ``reference``: the eager reference (materialises the N x N logits, two softmax passes).
* ``reference+compile``: the eager reference under torch.compile (cases with ``compile``).
* ``vf.<backend>``: every backend registered for the op (fused: no N x N buffer), skipped with
  the backend's own reasons where it cannot serve the inputs.
* ``open_clip.ClipLoss``: open_clip's CLIP loss on the normalised rows with logit scale
  1 / temperature (the same loss), when open_clip is importable.

FLOPs and bytes: :func:`infonce_cost`. The peak-memory column is the point of this file: eager
grows with N^2 (the logits and their softmax), fused with N*D.
"""

from __future__ import annotations

import functools

import _harness
import torch
import torch.nn.functional as F

import vljepa_fast as vf
from vljepa_fast import _backends, reference
from vljepa_fast.ops import infonce as infonce_op

OP = "infonce"
BACKEND_OP = "infonce_loss"
TEMPERATURE = 0.07

INFONCE_FORMULA = (
    "flops fwd 2*N*N*D (the similarity GEMM S = pred target^T, shared by both directions); "
    "bwd 6*N*N*D (S recomputed, dpred = dS target, dtarget = dS^T pred: the least a backward "
    "that stores no N x N matrix does, and what the chunked triton and cuda backends and the cpu "
    "backend execute; eager executes 4*N*N*D from its stored logits); fwd+bwd 8*N*N*D; bytes "
    "fwd 2*N*D*s (read pred, target), bwd 4*N*D*s (read both, write both gradients), fwd+bwd "
    "6*N*D*s; H200 model (vf.triton, vf.cuda): kernels/infonce.py predicted_seconds(overlap="
    "False), GEMM flops at 790 TFLOP/s plus every step's bytes at 4.3 TB/s"
)


def infonce_flops(N: int, D: int, mode: str) -> int:
    """FLOPs of the loss of N pairs of D-dim rows, counted the same for every provider.

    Forward 2*N*N*D: the one similarity GEMM S = pred @ target^T (the row and column softmaxes
    of the symmetric loss read the same S). Backward 6*N*N*D, three GEMMs of that size: S
    recomputed, dpred = dS @ target, dtarget = dS^T @ pred; that is the least work of a
    backward that keeps no N x N matrix, and the chunked triton and cuda backends and the cpu
    backend execute exactly that. The eager reference and open_clip execute 4*N*N*D (they keep
    the N x N probabilities from the forward, the N^2 memory of the peak column).
    Exponentials, logarithms and the row norms (O(N*N) and O(N*D)) are not counted.
    """
    gemm = 2 * N * N * D
    return _harness.mode_total(gemm, 3 * gemm, mode)


def infonce_bytes(N: int, D: int, itemsize: int, mode: str) -> int:
    """Compulsory traffic in bytes: forward reads pred and target ([N, D] each, 2*N*D*s; the
    loss is a scalar), backward reads both and writes both gradients (4*N*D*s). The fused
    kernels' O(N) statistics (norms, log-sum-exps) are not counted."""
    tensor = N * D * itemsize
    return _harness.mode_total(2 * tensor, 4 * tensor, mode)


def infonce_predicted(N: int, D: int, dtype: torch.dtype, mode: str) -> float:
    """The H200 time the chunked design implies (``vljepa_fast._kernels.infonce.
    predicted_seconds``, the kernel file's own model, nothing overlapped: per GEMM its FLOPs at
    790 TFLOP/s plus its bytes at 4.3 TB/s, per epilogue its bytes at 4.3 TB/s) with the chunk
    the op layer would pass (``ops.infonce.chunk_rows``). The cuda backend runs the same
    algorithm on the same chunks (csrc/cuda/infonce.cu header), so both providers are held to
    this one number."""
    from vljepa_fast._kernels import infonce as kernel

    like = torch.empty(N, D, dtype=dtype, device="meta")
    chunk = infonce_op.chunk_rows(like, like)
    # overlap=False: GEMM math and traffic added, as bench_sigmoid_loss's model adds them (an
    # upper bound; the kernel header also gives the per-GEMM roofline, 19.6 ms at the paper
    # shape against 23.8 ms here)
    return kernel.predicted_seconds(N, N, D, dtype, mode, chunk=chunk, overlap=False)


def infonce_cost(
    N: int, D: int, dtype: torch.dtype, mode: str, provider: str = ""
) -> _harness.Cost:
    """:func:`infonce_flops` and :func:`infonce_bytes` of one call in ``mode``; for the chunked
    ``vf.triton`` and ``vf.cuda`` providers also the design's H200 time
    (:func:`infonce_predicted`)."""
    s = dtype.itemsize
    predicted = (
        infonce_predicted(N, D, dtype, mode) if provider in ("vf.triton", "vf.cuda") else None
    )
    return _harness.Cost(
        infonce_flops(N, D, mode), infonce_bytes(N, D, s, mode), INFONCE_FORMULA, predicted
    )


def pytest_generate_tests(metafunc):
    providers = _harness.loss_providers(BACKEND_OP, "open_clip.ClipLoss")
    _harness.parametrize(metafunc, OP, providers, _harness.pair_label)


@functools.cache
def _compiled_reference():
    return torch.compile(reference.infonce_loss)


def _make(provider: str):
    if provider == "reference+compile":
        fn = _compiled_reference()
        return lambda s: lambda: fn(s[0], s[1], temperature=TEMPERATURE)
    if provider == "open_clip.ClipLoss":

        def make(s):
            open_clip = _harness.import_peer("open_clip", "open-clip-torch")
            loss = open_clip.loss.ClipLoss()
            scale = torch.tensor(1.0 / TEMPERATURE, device=s[0].device)
            return lambda: loss(F.normalize(s[0], dim=-1), F.normalize(s[1], dim=-1), scale)

        return make
    name = provider.removeprefix("vf.")

    def make(s):
        # raises BackendUnavailableError with the backend's reasons: the case is skipped
        inputs = infonce_op.infonce_inputs(s[0], s[1], temperature=TEMPERATURE)
        _backends.select(BACKEND_OP, name, inputs)
        return lambda: vf.infonce_loss(s[0], s[1], temperature=TEMPERATURE, backend=name)

    return make


def test_infonce(benchmark, case, provider):
    bench = _harness.Bench(benchmark, OP, case, provider)
    device, dtype = bench.device, bench.dtype
    N, D, mode = case["N"], case["D"], case["mode"]
    grad = mode != "fwd"

    def build(seed: int) -> tuple:
        return _harness.pair_rows(N, D, device, dtype, grad, seed)

    sets = _harness.input_sets((OP, N, D, case["dtype"], grad), build, device)
    bench.run(
        _make(provider),
        sets,
        infonce_cost(N, D, dtype, mode, provider),
        compiled=provider == "reference+compile",
    )
