"""sigmoid_loss: the op's validated inputs, the distributed composition, the fused autograd op
over the chunked kernels (kernels/sigmoid_loss.py), and the backend records.

The loss (SigLIP, open_clip's ``SigLipLoss``). x_ij = logit_scale * cos_ij + logit_bias, cos on
rows normalised by ``reference.normalize_rows`` (``normalize``; raw dot products without),
z_ij = +1 when j == i, else -1, loss = -sum_ij log sigmoid(z_ij x_ij); "mean" divides that sum
by N (open_clip's convention: the batch size, not N^2), "sum" keeps it, "none" returns the [N]
per-row sums sum_j -log sigmoid(z_ij x_ij).

Zero-row rule (``normalize=True``, every backend): rows are divided by max(norm, NORM_EPS); a
row whose norm is below NORM_EPS keeps that clamped value in the logits and gets a zero
gradient (``reference.normalize_rows``).

Distributed convention (``group`` given). Rank r holds N_r >= 1 local rows of pred and target
(sizes may differ by rank; they are exchanged first with D, the dtype, the flags and the values
of logit_scale and logit_bias, and a mismatch raises the same ValueError on every rank). The
global batch is the N = sum_r N_r rows in rank order; rank r's rows are global rows
s_r = N_0 + ... + N_(r-1) onwards, and row i's positive is global target row i. Rank r computes
the terms of its own pred rows against all N targets (an all-gather whose backward returns
every rank's contribution to the owner: a reduce-scatter sum), so every pair (i, j) of the
global N x N matrix is counted exactly once, on the rank that holds pred row i.

* reduction "mean" / "sum": every rank returns the global loss L (the sum over all N x N pairs,
  divided by the global N for "mean"). Write L = sum_r L_r, L_r the terms of rank r's pred rows.
  Rank r receives world_size x its share of the exact single-process gradient: for its local
  pred and target rows world_size x dL/d(those rows), and for tensor logit_scale / logit_bias
  world_size x dL_r/d(them) (the shares sum to dL/d(them) over ranks). DistributedDataParallel
  averages over ranks, so a DDP model, scale and bias included, receives exactly the
  single-process full-batch gradient, whatever the local sizes.
* reduction "none": the [N_r] per-row sums of the local pred rows; the gradients on each rank
  are those of O = sum over ranks of what each rank computes from its own rows (as
  vljepa_fast.ops.infonce).

The fused path (triton). Reduction "mean" / "sum" while a gradient is wanted (grad mode on and
pred, target, logit_scale or logit_bias requiring one) runs forward and gradient in ONE pass
over the chunks (the upstream gradient of a scalar is a constant factor, applied in the
backward): 6 N^2 D instead of 8 (kernels/sigmoid_loss.py header). The gradients are held from
the forward to the backward (inputs' dtype, the size of pred and target). Reduction "none" (per-row
upstream gradients), or no gradient wanted, runs the forward alone and the backward recomputes.
Chunk rows come from ``_chunks.chunk_rows`` with the kernels' bytes per pair
(``kernels/sigmoid_loss.pair_bytes``: for 16-bit inputs, which take the fused GEMM-plus-epilogue
kernel, 1 forward alone and itemsize (H) with gradients; for fp32 4 and 4 + 4), computed here
and passed down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from vljepa_fast import _backends, _validate, reference
from vljepa_fast.ops import _chunks, _common, _distributed

OP = "sigmoid_loss"
REDUCTIONS = ("mean", "sum", "none")

#: Largest |logit_scale| and |logit_bias| served: the fp32 logits, |x| <= |scale| + |bias| with
#: normalize, stay within 2**61, and the kernels' products of the scale with upstream
#: gradients far inside float32.
MAX_MAGNITUDE = 2.0**60


# ------------------------------------------------------------------------------ inputs


@dataclass(frozen=True, eq=False)
class SigmoidInputs:
    """Validated arguments of :func:`vljepa_fast.sigmoid_loss` (built by :func:`sigmoid_inputs`).

    Attributes:
        pred: [N, D] floating tensor as given (any strides; may require a gradient); N, D >= 1
            unless ``group`` is given (then checked on every rank once the sizes are exchanged).
        target: [N, D], same shape, dtype and device.
        logit_scale, logit_bias: Python floats or 0-dim floating tensors on pred's device, with
            |value| <= MAX_MAGNITUDE and finite (tensor values checked eagerly, outside
            torch.compile).
        normalize: bool.
        reduction: "mean", "sum" or "none".
        group: None, or a process group of an initialised torch.distributed.
    """

    pred: Tensor
    target: Tensor
    logit_scale: float | Tensor
    logit_bias: float | Tensor
    normalize: bool
    reduction: str
    group: object | None

    @property
    def device(self) -> torch.device:
        return self.pred.device


def _check_scalar(name: str, v: object, like: Tensor) -> float | Tensor:
    """``v``: a finite real number, or a 0-dim floating tensor on ``like``'s device, with
    |value| <= MAX_MAGNITUDE (a tensor's value read eagerly, not under torch.compile)."""
    v = _validate.plain_number(v)
    value = _validate.scalar_value(name, v, like)
    if value is None:  # a tensor under torch.compile: its value is not read
        return v
    if not (math.isfinite(value) and abs(value) <= MAX_MAGNITUDE):
        raise ValueError(
            f"{name}: expected a finite value with |{name}| <= 2**60 (the logits are formed in "
            f"float32), got {value}"
        )
    return v if isinstance(v, Tensor) else value


def sigmoid_inputs(
    pred: Tensor,
    target: Tensor,
    *,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    normalize: bool = True,
    reduction: str = "mean",
    group: object | None = None,
) -> SigmoidInputs:
    """The arguments of :func:`vljepa_fast.sigmoid_loss`, checked (see its docstring).

    Raises:
        ValueError: a malformed argument (named in the message).
    """
    _validate.embedding_pairs(pred, target, grouped=group is not None)
    logit_scale = _check_scalar("logit_scale", logit_scale, pred)
    logit_bias = _check_scalar("logit_bias", logit_bias, pred)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize: expected a bool, got {normalize!r}")
    _validate.choice("reduction", reduction, REDUCTIONS)
    if group is not None and (not dist.is_available() or not dist.is_initialized()):
        raise ValueError(
            "group: a process group was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )
    return SigmoidInputs(pred, target, logit_scale, logit_bias, normalize, reduction, group)


# ------------------------------------------------------------------------------ distributed


def exchange_sizes(x: SigmoidInputs) -> list[int]:
    """Every rank's local batch size (rank order), after checking on all ranks at once that each
    has at least one row and that all agree on D, the dtype, the flags and the values of
    logit_scale and logit_bias (not compared where not read): the same ValueError on every rank
    (``ops/_distributed.exchange_sizes``)."""
    return _distributed.exchange_sizes(
        x.pred,
        x.group,
        [
            ("normalize", "value", int(x.normalize), bool),
            ("reduction", "value", REDUCTIONS.index(x.reduction), lambda v: REDUCTIONS[v]),
        ],
        [
            ("logit_scale", _distributed.known_value(x.logit_scale), float),
            ("logit_bias", _distributed.known_value(x.logit_bias), float),
        ],
    )


def distributed_loss(terms, x: SigmoidInputs) -> Tensor:
    """Compose the local terms into the distributed loss (module doc).

    ``terms(a, b, offset, weight) -> Tensor``: the per-row sums [n] of rows a against all rows
    b (row i's positive is b's row i + offset) when ``weight`` is None, else their sum (a
    scalar) that the caller multiplies by ``weight`` (the fused backend forms its gradients at
    that scale).
    """
    group = x.group
    sizes = exchange_sizes(x)
    start = sum(sizes[: dist.get_rank(group)])
    targets = _distributed.gather_rows(x.target, group, sizes)
    if x.reduction == "none":
        return terms(x.pred, targets, start, None)
    # L_r (x total_rows for "mean"): this rank's rows' terms
    own = terms(x.pred, targets, start, _distributed.loss_factor(x.reduction, sizes))
    return _distributed.global_loss(own, x.reduction, sizes, group)


# ------------------------------------------------------------------------------ reference


def _reference(x: SigmoidInputs, plan: None) -> Tensor:
    if x.group is not None:

        def terms(a, b, offset, weight):
            rows = reference.sigmoid_terms(
                a, b, x.logit_scale, x.logit_bias, offset=offset, normalize=x.normalize
            )
            return rows if weight is None else rows.sum()

        return distributed_loss(terms, x)
    return reference.sigmoid_loss(
        x.pred,
        x.target,
        logit_scale=x.logit_scale,
        logit_bias=x.logit_bias,
        normalize=x.normalize,
        reduction=x.reduction,
    )


# ------------------------------------------------------------------------------ fused op

#: what the fused op returns: per-row sums, their sum, or their sum with the unit gradients
MODES = ("rows", "sum", "sum_grad")


def params_tensor(logit_scale: float | Tensor, logit_bias: float | Tensor, like: Tensor) -> Tensor:
    """(logit_scale, logit_bias) as a [2] float32 tensor on like's device (differentiable in
    the tensor ones)."""
    if not isinstance(logit_scale, Tensor) and not isinstance(logit_bias, Tensor):
        return torch.tensor([logit_scale, logit_bias], dtype=torch.float32, device=like.device)
    parts = [
        v.to(torch.float32)
        if isinstance(v, Tensor)
        else torch.tensor(v, dtype=torch.float32, device=like.device)
        for v in (logit_scale, logit_bias)
    ]
    return torch.stack(parts)


def _chunk(a: Tensor, b: Tensor, grad: bool) -> int:
    """Rows per chunk by the rule of ops/_chunks.py, with the bytes per pair of the kernels'
    [c, M]-sized buffers (kernels/sigmoid_loss.pair_bytes): 16-bit inputs (the fused kernel)
    itemsize for H with gradients, 1 (the loss's row slots) without; fp32 inputs 4 for the
    fp32 score block, plus 4 for H with gradients."""
    per_pair = _kernels().pair_bytes(a.element_size(), grad)
    inputs = (a.numel() + b.numel()) * a.element_size()
    return _chunks.chunk_rows(a.shape[0], b.shape[0], per_pair, inputs)


def _kernels():
    from vljepa_fast._kernels import sigmoid_loss as kernel

    return kernel


@torch.library.custom_op("vljepa_fast::sigmoid_fused", mutates_args=())
def _fused_op(
    a: Tensor,
    b: Tensor,
    params: Tensor,
    offset: int,
    normalize: bool,
    mode: str,
    weight: float,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, da, db, dparams) by ``impl``'s kernels ("triton"): out is the [N] fp32 per-row
    sums (mode "rows") or their sum (0-dim; "sum", "sum_grad"); with "sum_grad" also the
    gradients of ``weight`` x that sum (da [N, D] in a's dtype, db [M, D] in b's, dparams [2]
    fp32), else three empty tensors. ``weight`` (> 0) is the factor the caller applies to the
    sum (1 / N for "mean"): the held gradients are formed at the scale of the loss itself, so
    they fit the input dtype wherever the loss's gradient does (the gradient of the bare sum is
    N times larger and overflows fp16 first), and are rounded to it once. a [N, D], b [M, D]
    contiguous; params [2] fp32 (scale, bias)."""
    k = _kernels()
    eps = reference.NORM_EPS
    a, b, params = a.detach(), b.detach(), params.detach().contiguous()
    if mode == "sum_grad":
        g_row = torch.full((a.shape[0],), weight, device=a.device, dtype=torch.float32)
        rows, da, db, dp = k.sigmoid_backward(
            a,
            b,
            params,
            offset,
            normalize,
            g_row,
            eps=eps,
            chunk=_chunk(a, b, True),
            with_loss=True,
        )
        return rows.sum(), da, db, dp
    rows = k.sigmoid_forward(a, b, params, offset, normalize, eps=eps, chunk=_chunk(a, b, False))
    out = rows if mode == "rows" else rows.sum()
    return out, a.new_empty(0), b.new_empty(0), params.new_empty(0)


@_fused_op.register_fake
def _(a, b, params, offset, normalize, mode, weight, impl):
    out = a.new_empty((a.shape[0],) if mode == "rows" else (), dtype=torch.float32)
    if mode == "sum_grad":
        return out, torch.empty_like(a), torch.empty_like(b), params.new_empty(2)
    return out, a.new_empty(0), b.new_empty(0), params.new_empty(0)


@torch.library.custom_op("vljepa_fast::sigmoid_fused_bwd", mutates_args=())
def _fused_bwd(
    a: Tensor, b: Tensor, params: Tensor, g_row: Tensor, offset: int, normalize: bool, impl: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(da, db, dparams) of sum_i g_row[i] row_loss[i] by ``impl``'s kernels (recomputing the
    logits chunk by chunk); g_row [N] fp32 contiguous."""
    k = _kernels()
    _, da, db, dp = k.sigmoid_backward(
        a.detach(),
        b.detach(),
        params.detach().contiguous(),
        offset,
        normalize,
        g_row,
        eps=reference.NORM_EPS,
        chunk=_chunk(a, b, True),
    )
    return da, db, dp


@_fused_bwd.register_fake
def _(a, b, params, g_row, offset, normalize, impl):
    return torch.empty_like(a), torch.empty_like(b), params.new_empty(2)


def _setup(ctx, inputs, output):
    a, b, params, offset, normalize, mode, weight, impl = inputs
    ctx.options = (offset, normalize, mode, weight, impl)
    if mode == "sum_grad":  # the gradients are ready: keep them, not the inputs
        ctx.save_for_backward(output[1], output[2], output[3])
    else:
        ctx.save_for_backward(a, b, params)


def _backward(ctx, g_out, g_da, g_db, g_dp):
    offset, normalize, mode, weight, impl = ctx.options
    if mode == "sum_grad":
        da_w, db_w, dp_w = ctx.saved_tensors
        # the held gradients are weight x the sum's: g_out is weight itself when the caller
        # applied it as promised, and the factor is then exactly 1
        g = g_out.to(torch.float32) / weight
        da, db, dp = da_w * g, db_w * g, dp_w * g
    else:
        a, b, params = ctx.saved_tensors
        g_row = g_out.to(torch.float32).expand(a.shape[0]).contiguous()
        da, db, dp = _fused_bwd(a, b, params, g_row, offset, normalize, impl)
    return da, db, dp if ctx.needs_input_grad[2] else None, None, None, None, None, None


_fused_op.register_autograd(_backward, setup_context=_setup)


def _wants_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in xs)


def _fused(impl: str):
    def terms(params: Tensor, normalize: bool):
        def run(a: Tensor, b: Tensor, offset: int, weight: float | None) -> Tensor:
            # the kernels read rows densely: other strides are copied (differentiably)
            a, b = a.contiguous(), b.contiguous()
            if weight is None:
                return _fused_op(a, b, params, offset, normalize, "rows", 1.0, impl)[0]
            mode = "sum_grad" if _wants_grad(a, b, params) else "sum"
            return _fused_op(a, b, params, offset, normalize, mode, weight, impl)[0]

        return run

    def run(x: SigmoidInputs, plan: None) -> Tensor:
        params = params_tensor(x.logit_scale, x.logit_bias, x.pred)
        local = terms(params, x.normalize)
        if x.group is not None:
            return distributed_loss(local, x)
        if x.reduction == "none":
            return local(x.pred, x.target, 0, None)
        weight = 1.0 / x.pred.shape[0] if x.reduction == "mean" else 1.0
        out = local(x.pred, x.target, 0, weight)
        return out / x.pred.shape[0] if x.reduction == "mean" else out

    return run


def _fused_supports(x: SigmoidInputs) -> object:
    return _backends.plan_or_refusal(_common.dtype_in("pred", x.pred))


_common.triton_record(OP, _fused("triton"), _fused_supports, priority=10)
_common.reference_record(OP, _reference)
