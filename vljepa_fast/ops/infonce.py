"""infonce_loss: the op's validated inputs, the distributed composition, the fused autograd op
over the kernels, and the backend records.

Zero-row rule (``normalize=True``, every backend). Rows are divided by max(norm, NORM_EPS)
(``reference.NORM_EPS`` = 1e-12), so the values are ``F.normalize(x, eps=NORM_EPS)``'s and a zero
row gives zero logits. The gradient is that of x / |x| on rows whose norm is >= NORM_EPS, and
zero on rows below it (``reference.normalize_rows``, as topk_similarity's cosine): a zero row has
no direction, and the clamp's 1 / NORM_EPS slope would reach 1e12 and overflow fp16. Such a row
keeps its clamped value x / NORM_EPS in the other rows' logits, so their gradients are exact.
The reference backend computes it with ``normalize_rows``; the cpu, triton and cuda backward
kernels give the rows whose norm was clamped a zero gradient in their normalisation backward
(the Triton kernels receive ``reference.NORM_EPS`` from here as their ``eps``).

Chunks (fused backends). The triton and cuda kernels compute S = a b^T by chunks of rows of a
(a vendor GEMM per chunk plus fused epilogues, kernels/infonce.py); the rows per chunk are
computed here, once per call, by :func:`chunk_rows` (the rule of ``ops/_chunks.py``, its one
owner: a memory budget over 4 + itemsize bytes per pair, VLJEPA_FAST_CHUNK_BUDGET_MIB
overriding it), and passed to the forward and, through the autograd context, the same value to
the backward (the native ops' trailing ``chunk``; the CPU kernels ignore it).

Distributed convention (``group`` given). Rank r holds N_r >= 1 local rows of pred and target;
the sizes may differ by rank (they are all-gathered first, with the feature size, dtype and the
flags, and a mismatch raises the same ValueError on every rank). The negatives are the global
batch of N = sum_r N_r rows, in rank order: rank r's rows are global rows
s_r = N_0 + ... + N_(r-1) onwards. Rank r computes the terms of its own rows (its pred rows
against all targets, its target rows against all preds); the other ranks' embeddings reach it
through an all-gather (torch's functional collective, rows padded to the largest N_r) whose
backward returns every rank's gradient contribution to the owner (a sum over ranks:
reduce-scatter).

* reduction "mean" / "sum": every rank returns the global loss L (the same value everywhere).
  Write L = sum_r L_r, where L_r holds the terms of rank r's own rows (with "mean", each term
  divided by the global N). Rank r receives world_size x its share of the exact single-process
  gradient of L: for its local pred and target rows, world_size x dL/d(those rows) (the whole
  gradient of rows no other rank holds), and for a tensor temperature, world_size x dL_r/d
  temperature (the part of dL/d temperature that its rows' terms contribute; the shares of the
  ranks sum to dL/d temperature). DistributedDataParallel averages gradients over ranks, so a DDP
  model, the temperature included, receives exactly the single-process full-batch gradient,
  whatever the local batch sizes.
* reduction "none": the [N_r] per-row losses of the local rows. Each rank's gradients (inputs
  and temperature) are the exact gradients of O = sum over ranks of what each rank computes from
  its own per-row losses (a row's loss reaches the inputs of every rank through the gather's
  backward); for the temperature, rank r receives the part of dO/d temperature that flows
  through its own per-row losses. DDP's average then gives the gradient of O / world_size. With
  equal local sizes, every rank taking the local mean is exactly the "mean" convention.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from vljepa_fast import _backends, _validate, reference
from vljepa_fast.ops import _chunks, _common, _distributed

OP = "infonce_loss"
REDUCTIONS = ("mean", "sum", "none")

#: Smallest temperature served: 1/temperature <= 2**60. The logits then stay within 2**60 in
#: magnitude (|S| <= 1/temperature with normalize), every loss term within 2**61 + log(N), and
#: the float32 products the kernels form from the scale (scale times an inverse norm of at most
#: 1/eps = 1e12 < 2**40; the gradient of a tensor temperature, dscale / temperature**2 <= 2**120
#: |dscale|) stay far below float32's 2**128. A temperature of 1e-39 (1/temperature infinite in
#: float32) is refused instead of turning into NaN.
MIN_TEMPERATURE = 2.0**-60


# ------------------------------------------------------------------------------ inputs


# eq=False: the fields hold tensors (identity, not elementwise, comparison)
@dataclass(frozen=True, eq=False)
class InfoNCEInputs:
    """Validated arguments of :func:`vljepa_fast.infonce_loss` (built by :func:`infonce_inputs`).

    Attributes:
        pred: [N, D] floating tensor as given (any strides; may require a gradient); N, D >= 1
            unless ``group`` is given (then every rank's N is checked once the sizes are
            exchanged, see :func:`exchange_sizes`).
        target: [N, D], same shape, dtype and device.
        temperature: a Python float >= MIN_TEMPERATURE, or a 0-dim floating tensor on pred's
            device (its value in that range, checked eagerly outside torch.compile).
        symmetric, normalize: bools.
        reduction: "mean", "sum" or "none".
        group: None, or a process group of an initialised torch.distributed.
    """

    pred: Tensor
    target: Tensor
    temperature: float | Tensor
    symmetric: bool
    normalize: bool
    reduction: str
    group: object | None

    @property
    def device(self) -> torch.device:
        return self.pred.device


def infonce_inputs(
    pred: Tensor,
    target: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    symmetric: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
    group: object | None = None,
) -> InfoNCEInputs:
    """The arguments of :func:`vljepa_fast.infonce_loss`, checked (see its docstring).

    Raises:
        ValueError: a malformed argument (named in the message).
    """
    _validate.embedding_pairs(pred, target, grouped=group is not None)
    temperature = _validate.plain_number(temperature)  # numpy scalars
    _check_temperature(temperature, pred)
    for name, flag in (("symmetric", symmetric), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: expected a bool, got {flag!r}")
    _validate.choice("reduction", reduction, REDUCTIONS)
    _check_group(group)
    return InfoNCEInputs(pred, target, temperature, symmetric, normalize, reduction, group)


def _check_temperature(temperature: object, like: Tensor) -> None:
    """``temperature``: a finite float >= MIN_TEMPERATURE, or a 0-dim floating tensor on
    ``like``'s device whose value (read eagerly, outside torch.compile) is in that range."""
    value = _validate.scalar_value("temperature", temperature, like)
    if value is None:  # a tensor under torch.compile: its value is not read
        return
    if not math.isfinite(value) or not value >= MIN_TEMPERATURE:
        raise ValueError(
            f"temperature: expected a positive finite value >= 2**-60 (about 8.7e-19: "
            f"1/temperature and the logits must stay well inside float32), got {value}"
        )


def _check_group(group: object) -> None:
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group: a process group was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )


# ------------------------------------------------------------------------------ distributed


def exchange_sizes(x: InfoNCEInputs, scale: float | Tensor | None = None) -> list[int]:
    """Every rank's local batch size (rank order), after checking on all ranks at once that each
    has at least one row and that all agree on D, the dtype, the flags and the temperature's
    value (``scale`` = 1 / temperature; not compared where not read): the same ValueError on
    every rank (``ops/_distributed.exchange_sizes``)."""
    known = math.nan if scale is None else _distributed.known_value(scale)
    return _distributed.exchange_sizes(
        x.pred,
        x.group,
        [
            ("symmetric", "value", int(x.symmetric), bool),
            ("normalize", "value", int(x.normalize), bool),
            ("reduction", "value", REDUCTIONS.index(x.reduction), lambda v: REDUCTIONS[v]),
        ],
        [("temperature", known, lambda v: 1.0 / v)],
    )


def distributed_loss(row_loss, x: InfoNCEInputs, scale: float | Tensor) -> Tensor:
    """Compose a differentiable one-direction loss into the distributed loss (module doc).

    ``row_loss(a, b, scale, offset, normalize) -> [n]``: logsumexp over all rows of b minus the
    positive (column i + offset) of each row of a.
    """
    group = x.group
    sizes = exchange_sizes(x, scale)
    start = sum(sizes[: dist.get_rank(group)])
    gathered = _distributed.gather_rows(x.target, group, sizes)
    per_row = row_loss(x.pred, gathered, scale, start, x.normalize)
    if x.symmetric:
        gathered = _distributed.gather_rows(x.pred, group, sizes)
        back = row_loss(x.target, gathered, scale, start, x.normalize)
        per_row = 0.5 * (per_row + back)
    if x.reduction == "none":
        return per_row
    # own: L_r x total_rows ("mean") or L_r ("sum"): this rank's rows' terms
    return _distributed.global_loss(per_row.sum(), x.reduction, sizes, group)


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


# ------------------------------------------------------------------------------ reference


def _reference_row_loss(a: Tensor, b: Tensor, scale, offset: int, normalize: bool) -> Tensor:
    row_lse, _, pos_row, _ = reference.infonce_terms(
        a, b, scale, offset=offset, normalize=normalize, col_stats=False
    )
    return row_lse - pos_row


def _reference(x: InfoNCEInputs, plan: None) -> Tensor:
    if x.group is not None:
        return distributed_loss(_reference_row_loss, x, 1.0 / x.temperature)
    return reference.infonce_loss(
        x.pred,
        x.target,
        temperature=x.temperature,
        symmetric=x.symmetric,
        normalize=x.normalize,
        reduction=x.reduction,
    )


# ------------------------------------------------------------------------------ fused op


def scale_tensor(temperature: float | Tensor, like: Tensor) -> Tensor:
    """1 / temperature as a 0-dim float32 tensor on like's device (differentiable if a tensor)."""
    if isinstance(temperature, Tensor):
        return (1.0 / temperature).to(torch.float32)
    return torch.tensor(1.0 / temperature, dtype=torch.float32, device=like.device)


def chunk_rows(a: Tensor, b: Tensor) -> int:
    """Rows of ``a`` per chunk of the chunked kernels (vendor GEMM + fused epilogues) for
    S = a b^T: the rule of :mod:`vljepa_fast.ops._chunks` with (4 + itemsize) bytes per pair
    (the fp32 score block plus the dS block in the input dtype) over the bytes of a and b. One
    value serves the forward and the backward of a call (saved in the autograd context), so that
    the backward's recomputed S is the forward's to the bit."""
    size = a.element_size()
    return _chunks.chunk_rows(
        a.shape[0], b.shape[0], 4 + size, (a.shape[0] + b.shape[0]) * a.shape[1] * size
    )


def _kernels(impl: str):
    """(forward, backward) of the kernel contract (csrc/ops.cpp, ``infonce_fwd`` /
    ``infonce_bwd``) for ``impl``: "native" (the C++/CUDA library) or "triton". Both take the
    chunk as the keyword ``chunk``."""
    if impl == "native":
        fwd, bwd = torch.ops.vljepa_fast.infonce_fwd, torch.ops.vljepa_fast.infonce_bwd
        return (
            lambda *args, chunk: fwd(*args, chunk),
            lambda *args, chunk: bwd(*args, chunk),
        )
    from vljepa_fast._kernels import infonce as kernel

    eps = reference.NORM_EPS
    return (
        functools.partial(kernel.infonce_forward, eps=eps),
        functools.partial(kernel.infonce_backward, eps=eps),
    )


@torch.library.custom_op("vljepa_fast::infonce_fused", mutates_args=())
def _fused_terms(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    offset: int,
    normalize: bool,
    col_stats: bool,
    chunk: int,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_loss [N], col_loss [M] or [0], row_lse [N], col_lse [M] or [0]) by ``impl``'s
    kernels: the loss terms lse - positive in float32 and the float64 LSEs the backward reads
    (the kernel contract, csrc/ops.cpp). ``chunk``: rows of a per chunk (:func:`chunk_rows`),
    passed to the kernels and, through the autograd context, to the backward. Differentiable in
    a, b and scale (register_autograd below); the backward saves only the inputs, the scale and
    the two LSEs: never the N x M logits. a [N, D] and b [M, D] are contiguous rows (the callers
    copy other strides)."""
    forward, _ = _kernels(impl)
    # detached views: native kernels run ATen ops (out= GEMMs) on worker threads where the
    # grad mode of this thread does not apply
    row_lse, col_lse, pos_row, pos_col = forward(
        a.detach(), b.detach(), scale.detach(), offset, normalize, col_stats, chunk=chunk
    )
    if col_lse is None:  # the native contract: empty column outputs without col_stats
        col_lse, pos_col = row_lse.new_empty(0), pos_row.new_empty(0)
    return (row_lse - pos_row).float(), (col_lse - pos_col).float(), row_lse, col_lse


@_fused_terms.register_fake
def _(a, b, scale, offset, normalize, col_stats, chunk, impl):
    n, m = a.shape[0], (b.shape[0] if col_stats else 0)
    f32, f64 = dict(dtype=torch.float32), dict(dtype=torch.float64)
    return (
        a.new_empty(n, **f32),
        a.new_empty(m, **f32),
        a.new_empty(n, **f64),
        a.new_empty(m, **f64),
    )


# The backward's tensors first, then _fused_terms' options (offset, normalize, col_stats, chunk,
# impl).
_BWD_SCHEMA = (
    "(Tensor a, Tensor b, Tensor scale, Tensor row_lse, Tensor col_lse, Tensor g_row, "
    "Tensor g_col, int offset, bool normalize, bool col_stats, int chunk, str impl) "
    "-> (Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("vljepa_fast::infonce_fused_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _fused_terms_bwd(
    a, b, scale, row_lse, col_lse, g_row, g_col, offset, normalize, col_stats, chunk, impl
):
    """(da, db, dscale) of sum g_row * row_loss + sum g_col * col_loss by ``impl``'s backward
    kernel with the forward's ``chunk``; without ``col_stats`` the column vectors are empty and
    not passed on."""
    _, backward = _kernels(impl)
    col_lse, g_col = (col_lse, g_col) if col_stats else (None, None)
    return backward(
        a.detach(),
        b.detach(),
        scale.detach(),
        offset,
        normalize,
        row_lse,
        col_lse,
        g_row,
        g_col,
        chunk=chunk,
    )


@_fused_terms_bwd.register_fake
def _(a, b, scale, *args):
    return torch.empty_like(a), torch.empty_like(b), scale.new_empty((), dtype=torch.float32)


def _fused_setup(ctx, inputs, output):
    a, b, scale, *options = inputs
    ctx.save_for_backward(a, b, scale, output[2], output[3])
    ctx.options = options


def _fused_backward(ctx, g_row, g_col, g_row_lse, g_col_lse):
    a, b, scale, row_lse, col_lse = ctx.saved_tensors
    g_row, g_col = g_row.float().contiguous(), g_col.float().contiguous()
    da, db, dscale = _fused_terms_bwd(a, b, scale, row_lse, col_lse, g_row, g_col, *ctx.options)
    return da, db, dscale if ctx.needs_input_grad[2] else None, None, None, None, None, None


_fused_terms.register_autograd(_fused_backward, setup_context=_fused_setup)


def _fused(impl: str):
    # The kernels read rows densely: inputs of any strides (transposed, sliced with a step,
    # expanded, offset) are copied first; .contiguous() is differentiable and a no-op otherwise.
    def row_loss(a, b, scale, offset, normalize):
        a, b = a.contiguous(), b.contiguous()
        return _fused_terms(a, b, scale, offset, normalize, False, chunk_rows(a, b), impl)[0]

    def run(x: InfoNCEInputs, plan: None) -> Tensor:
        scale = scale_tensor(x.temperature, x.pred)
        if x.group is not None:
            return distributed_loss(row_loss, x, scale)
        pred, target = x.pred.contiguous(), x.target.contiguous()
        chunk = chunk_rows(pred, target)
        rows, cols, _, _ = _fused_terms(
            pred, target, scale, 0, x.normalize, x.symmetric, chunk, impl
        )
        per_row = 0.5 * (rows + cols) if x.symmetric else rows
        return _reduce(per_row, x.reduction)

    return run


def _fused_supports(x: InfoNCEInputs) -> object:
    return _backends.plan_or_refusal(_common.dtype_in("pred", x.pred))


_common.native_records(
    OP,
    "infonce_fwd",
    _fused("native"),
    supports={"cuda": _fused_supports, "cpu": _fused_supports},
    priority={"cuda": 15, "cpu": 20},
)
def _triton_supports(x: InfoNCEInputs) -> object:
    why = _common.dtype_in("pred", x.pred)
    if x.group is None and x.pred.shape[0] * x.pred.shape[1] >= 2**31:
        # kernels/infonce.py: the row kernels' element offsets are int32 (distributed calls,
        # whose gathered size is known only after the exchange, meet the launcher's check)
        why.append(
            f"pred: N * D = {x.pred.shape[0] * x.pred.shape[1]} >= 2^31 elements (the Triton "
            f"kernels index rows with int32 offsets)"
        )
    return _backends.plan_or_refusal(why)


_common.triton_record(OP, _fused("triton"), _triton_supports, priority=10)
_common.reference_record(OP, _reference)
