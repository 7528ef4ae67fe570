"""sigmoid_loss: the SigLIP loss (logit_scale 10, logit_bias -10: SigLIP's initialisation, both
learnable tensors; normalised rows; mean reduction), forward alone and forward + backward, at
the paper's batch B = 65,536, D = 768 (bench/presets.py).

Providers, side by side in one benchmark group per shape and mode:

* ``reference``: the eager reference (materialises the N x N logits and labels).
* ``reference+compile``: the eager reference under torch.compile (cases with ``compile``).
* ``vf.<backend>``: every backend registered for the op (chunked: no N x N buffer), skipped with
  the backend's own reasons where it cannot serve the inputs.
* ``open_clip.SigLipLoss``: open_clip's SigLIP loss on the normalised rows (the same loss; its
  logits in the features' dtype), when open_clip is importable.

FLOPs and bytes: :func:`sigmoid_cost`; the H200 model of the chunked design:
:func:`sigmoid_model_bytes` (kernels/sigmoid_loss.py header).
"""

from __future__ import annotations

import functools
import math

import _harness
import torch
import torch.nn.functional as F

import vljepa_fast as vf
from vljepa_fast import _backends, reference
from vljepa_fast.ops import _chunks
from vljepa_fast.ops import sigmoid_loss as sigmoid_op

OP = "sigmoid_loss"
BACKEND_OP = "sigmoid_loss"
LOG_SCALE, BIAS = math.log(10.0), -10.0

SIGMOID_FORMULA = (
    "flops fwd 2*N*N*D (the logits GEMM pred target^T); bwd 4*N*N*D (dpred = dS target, "
    "dtarget = dS^T pred: eager keeps the N x N logits, the chunked triton backend computes both "
    "in its one training pass beside the logits); fwd+bwd 6*N*N*D; bytes fwd 2*N*D*s (read pred, "
    "target), bwd 4*N*D*s (read both, write both gradients), fwd+bwd 6*N*D*s; H200 model: those "
    "GEMM flops at 790 TFLOP/s plus the chunked design's HBM bytes at 4.3 TB/s "
    "(sigmoid_model_bytes)"
)


def sigmoid_flops(N: int, D: int, mode: str) -> int:
    """FLOPs of the loss of N pairs of D-dim rows, counted the same for every provider: forward
    2*N*N*D (the logits GEMM), backward 4*N*N*D (the two gradient GEMMs). The chunked triton
    backend executes exactly 6*N*N*D for fwd+bwd (gradients in the forward pass, no recompute)
    and 2*N*N*D for a forward without gradients. The O(N*N) sigmoids and the O(N*D) norms are
    not counted."""
    gemm = 2 * N * N * D
    return _harness.mode_total(gemm, 2 * gemm, mode)


def sigmoid_bytes(N: int, D: int, itemsize: int, mode: str) -> int:
    """Compulsory traffic: forward reads pred and target (2*N*D*s; the loss is a scalar),
    backward reads both and writes both gradients (4*N*D*s)."""
    tensor = N * D * itemsize
    return _harness.mode_total(2 * tensor, 4 * tensor, mode)


def sigmoid_model_bytes(N: int, D: int, itemsize: int, mode: str) -> int:
    """HBM bytes the chunked triton design moves (kernels/sigmoid_loss.py header), N x N, with c
    rows per chunk from the chunk rule (the kernels' ``pair_bytes``) and C = ceil(N / c) chunks.

    16-bit inputs (itemsize 2: the fused GEMM-plus-epilogue kernel, T = ceil(N / BN) column
    blocks of its sm_90 tile):
    forward alone (1 byte per pair in the rule): nothing per pair; A read once and B once per
    chunk (N D s (1 + C)), the loss's row slots written and read (8 N T).
    Training pass (fwd+bwd; s bytes per pair): 6 N^2 (H written, read by the two gradient
    GEMMs), the row slots (8 N T), B (fused kernel) and B̂ (H_c B̂) read per chunk and A once
    (2 N D s C + N D s), the fp32 E accumulator read and written per chunk (8 N D C), dA, dB
    and B̂ written (3 N D s).
    fp32 inputs (vendor GEMM + epilogue): forward alone (4 bytes per pair) 8 N^2 (the fp32
    block written and read) + N D s (1 + C); training pass (4 + 4 bytes per pair) 8 N^2 + 12 N^2
    (H written and read twice, 4 bytes) + the same per-chunk and per-call terms without the
    row slots.
    The backward's share is the training pass minus the forward alone.
    """
    from vljepa_fast._kernels import sigmoid_loss as kernel

    def chunks(grad: bool) -> int:
        per_pair = kernel.pair_bytes(itemsize, grad)
        rows = _chunks.chunk_rows(N, N, per_pair, 2 * N * D * itemsize)
        return -(-N // rows)

    nd = N * D
    c_fwd, c_train = chunks(False), chunks(True)
    if itemsize == 2:
        slots = 8 * N * -(-N // kernel.FUSED_HOPPER.BN)
        fwd = nd * itemsize * (1 + c_fwd) + slots
        pairs = 6 * N * N
    else:
        slots = 0
        fwd = 8 * N * N + nd * itemsize * (1 + c_fwd)
        pairs = (8 + 3 * itemsize) * N * N
    train = pairs + slots + 2 * nd * itemsize * c_train + nd * itemsize + 8 * nd * c_train
    train += 3 * nd * itemsize
    return _harness.mode_total(fwd, train - fwd, mode)


def sigmoid_cost(N: int, D: int, itemsize: int, mode: str, provider: str = "") -> _harness.Cost:
    """:func:`sigmoid_flops` and :func:`sigmoid_bytes` of one call in ``mode``; for the chunked
    ``vf.triton`` provider also the H200 model time (:func:`sigmoid_model_bytes`)."""
    predicted = None
    if provider == "vf.triton":
        predicted = _harness.model_seconds(
            sigmoid_flops(N, D, mode), sigmoid_model_bytes(N, D, itemsize, mode)
        )
    return _harness.Cost(
        sigmoid_flops(N, D, mode), sigmoid_bytes(N, D, itemsize, mode), SIGMOID_FORMULA, predicted
    )


def pytest_generate_tests(metafunc):
    providers = _harness.loss_providers(BACKEND_OP, "open_clip.SigLipLoss")
    _harness.parametrize(metafunc, OP, providers, _harness.pair_label)


@functools.cache
def _compiled_reference():
    return torch.compile(reference.sigmoid_loss)


def _make(provider: str):
    if provider == "reference+compile":
        fn = _compiled_reference()
        return lambda s: lambda: fn(s[0], s[1], logit_scale=s[2].exp(), logit_bias=s[3])
    if provider == "open_clip.SigLipLoss":

        def make(s):
            open_clip = _harness.import_peer("open_clip", "open-clip-torch")
            loss = open_clip.loss.SigLipLoss()
            return lambda: loss(
                F.normalize(s[0], dim=-1), F.normalize(s[1], dim=-1), s[2].exp(), s[3]
            )

        return make
    if provider == "reference":
        return lambda s: lambda: reference.sigmoid_loss(
            s[0], s[1], logit_scale=s[2].exp(), logit_bias=s[3]
        )
    name = provider.removeprefix("vf.")

    def make(s):
        # raises BackendUnavailableError with the backend's reasons: the case is skipped
        inputs = sigmoid_op.sigmoid_inputs(s[0], s[1], logit_scale=10.0, logit_bias=BIAS)
        _backends.select(BACKEND_OP, name, inputs)
        return lambda: vf.sigmoid_loss(
            s[0], s[1], logit_scale=s[2].exp(), logit_bias=s[3], backend=name
        )

    return make


def test_sigmoid_loss(benchmark, case, provider):
    bench = _harness.Bench(benchmark, OP, case, provider)
    device, dtype = bench.device, bench.dtype
    N, D, mode = case["N"], case["D"], case["mode"]
    grad = mode != "fwd"

    def build(seed: int) -> tuple:
        rows = _harness.pair_rows(N, D, device, dtype, grad, seed)
        # SigLIP's learnable t' (logit_scale = exp(t')) and bias, float32 leaves
        scalars = tuple(
            torch.tensor(v, device=device).requires_grad_(grad) for v in (LOG_SCALE, BIAS)
        )
        return rows + scalars

    sets = _harness.input_sets((OP, N, D, case["dtype"], grad), build, device)
    bench.run(
        _make(provider),
        sets,
        sigmoid_cost(N, D, dtype.itemsize, mode, provider),
        compiled=provider == "reference+compile",
    )
