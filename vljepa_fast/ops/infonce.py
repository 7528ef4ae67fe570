"""infonce_loss: argument checks, the distributed composition, and backend records.

Distributed convention (``group`` given; every rank holds N_local rows, the same on every rank):
the negatives are the global batch (N = world_size * N_local rows of pred and of target). Rank r
computes the terms of its own rows (pred rows r*N_local.. against all targets, and target rows
against all preds), and the embeddings of the other ranks reach it through an all-gather whose
backward returns every rank's gradient contribution to the owner (all-reduce or reduce-scatter).

* reduction "mean" / "sum": every rank returns the global loss (the same value everywhere), and
  the gradient of that returned value with respect to the local inputs (and the temperature) is
  world_size x the exact full-batch gradient. DistributedDataParallel averages gradients over
  ranks, so a DDP model receives exactly the single-process full-batch gradient.
* reduction "none": the [N_local] per-row losses of the local rows; their local mean follows the
  same convention as "mean".
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from vljepa_fast import _backends, reference
from vljepa_fast.ops import _common

OP = "infonce_loss"


def check_temperature(temperature: object, like: Tensor) -> None:
    """``temperature``: positive finite float, or a 0-dim floating tensor on ``like``'s device."""
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0 or not temperature.is_floating_point():
            raise ValueError(
                f"temperature: expected a 0-dim floating tensor, got {temperature.dtype} of shape "
                f"{tuple(temperature.shape)}"
            )
        if temperature.device != like.device:
            raise ValueError(
                f"temperature: expected device {like.device}, got {temperature.device}"
            )
        if torch.compiler.is_compiling():
            return
        value = float(temperature.detach())
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        value = float(temperature)
    else:
        raise ValueError(f"temperature: expected a float or a 0-dim tensor, got {temperature!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature: expected a positive finite value, got {value}")


def check_group(group: object) -> None:
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group: a process group was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient into the owner's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        n = grad.shape[0] // world
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = grad.new_empty((n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        dist.all_reduce(grad, group=group)  # gloo has no reduce_scatter
        return grad[rank * n : (rank + 1) * n], None


def scale_tensor(temperature: float | Tensor, like: Tensor) -> Tensor:
    """1 / temperature as a 0-dim float32 tensor on like's device (differentiable if a tensor)."""
    if isinstance(temperature, Tensor):
        return (1.0 / temperature).to(torch.float32)
    return torch.tensor(1.0 / temperature, dtype=torch.float32, device=like.device)


def distributed_loss(
    row_loss,
    pred: Tensor,
    target: Tensor,
    scale,
    *,
    symmetric: bool,
    normalize: bool,
    reduction: str,
    group,
) -> Tensor:
    """Compose a differentiable one-direction loss into the distributed loss (module doc).

    ``row_loss(a, b, scale, offset, normalize) -> [n]``: logsumexp over all rows of b minus the
    positive (column i + offset) of each row of a.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = pred.shape[0]
    per_row = row_loss(pred, _GatherRows.apply(target, group), scale, rank * n, normalize)
    if symmetric:
        back = row_loss(target, _GatherRows.apply(pred, group), scale, rank * n, normalize)
        per_row = 0.5 * (per_row + back)
    if reduction == "none":
        return per_row
    local = per_row.sum() * (world if reduction == "sum" else 1.0 / n)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    total = total / world
    # value: the global loss; gradient: the local rows' part x world_size (see module doc).
    return local + (total - local).detach()


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


# ------------------------------------------------------------------------- reference backend


def _reference_row_loss(a: Tensor, b: Tensor, scale, offset: int, normalize: bool) -> Tensor:
    row_lse, _, pos_row, _ = reference.infonce_terms(
        a, b, scale, offset=offset, normalize=normalize, col_stats=False
    )
    return row_lse - pos_row


def _reference(pred, target, *, temperature, symmetric, normalize, reduction, group):
    if group is not None:
        return distributed_loss(
            _reference_row_loss,
            pred,
            target,
            1.0 / temperature,
            symmetric=symmetric,
            normalize=normalize,
            reduction=reduction,
            group=group,
        )
    return reference.infonce_loss(
        pred,
        target,
        temperature=temperature,
        symmetric=symmetric,
        normalize=normalize,
        reduction=reduction,
    )


# ------------------------------------------------------------------------- fused backends


def _native_fwd(a, b, scale, offset, normalize, col_stats):
    return torch.ops.vljepa_fast.infonce_fwd(a, b, scale, offset, normalize, col_stats)


def _native_bwd(a, b, scale, offset, normalize, row_lse, col_lse, g_row, g_col):
    return torch.ops.vljepa_fast.infonce_bwd(
        a, b, scale, offset, normalize, row_lse, col_lse, g_row, g_col
    )


@torch.library.custom_op("vljepa_fast::infonce_fwd_triton", mutates_args=())
def _triton_fwd(
    a: Tensor, b: Tensor, scale: Tensor, offset: int, normalize: bool, col_stats: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from vljepa_fast._kernels import infonce as kernel

    row_lse, col_lse, pos_row, pos_col = kernel.infonce_forward(
        a, b, scale, offset, normalize, col_stats
    )
    if col_lse is None:  # the native contract: empty column outputs without col_stats
        col_lse, pos_col = row_lse.new_empty(0), pos_row.new_empty(0)
    return row_lse, col_lse, pos_row, pos_col


@_triton_fwd.register_fake
def _(a, b, scale, offset, normalize, col_stats):
    m = b.shape[0] if col_stats else 0
    f32, f64 = dict(dtype=torch.float32), dict(dtype=torch.float64)
    return (
        a.new_empty(a.shape[0], **f64),
        a.new_empty(m, **f64),
        a.new_empty(a.shape[0], **f32),
        a.new_empty(m, **f32),
    )


@torch.library.custom_op("vljepa_fast::infonce_bwd_triton", mutates_args=())
def _triton_bwd(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    offset: int,
    normalize: bool,
    row_lse: Tensor,
    col_lse: Tensor | None,
    g_row: Tensor,
    g_col: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    from vljepa_fast._kernels import infonce as kernel

    return kernel.infonce_backward(a, b, scale, offset, normalize, row_lse, col_lse, g_row, g_col)


@_triton_bwd.register_fake
def _(a, b, scale, *args):
    return torch.empty_like(a), torch.empty_like(b), scale.new_empty((), dtype=torch.float32)


_IMPLS = {"native": (_native_fwd, _native_bwd), "triton": (_triton_fwd, _triton_bwd)}


class _FusedInfoNCE(torch.autograd.Function):
    """(row_loss [N], col_loss [M] or [0]) of the kernel contract, with the fused backward.

    Saves only the inputs, the scale and the two LSE vectors: never the N x M logits.
    """

    @staticmethod
    def forward(ctx, a, b, scale, offset: int, normalize: bool, col_stats: bool, impl: str):
        fwd, _ = _IMPLS[impl]
        # detached views: native kernels run ATen ops (out= GEMMs) on worker threads where the
        # grad mode of this thread does not apply
        row_lse, col_lse, pos_row, pos_col = fwd(
            a.detach(), b.detach(), scale.detach(), offset, normalize, col_stats
        )
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.args = (offset, normalize, col_stats, impl)
        # The LSEs are float64 (the kernel contract, csrc/ops.cpp); the loss terms are float32.
        return (row_lse - pos_row).float(), (col_lse - pos_col).float()

    @staticmethod
    def backward(ctx, g_row, g_col):
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        offset, normalize, col_stats, impl = ctx.args
        _, bwd = _IMPLS[impl]
        g_row = g_row.float().contiguous()
        g_col = g_col.float().contiguous() if col_stats else None
        da, db, dscale = bwd(
            a.detach(),
            b.detach(),
            scale.detach(),
            offset,
            normalize,
            row_lse,
            col_lse if col_stats else None,
            g_row,
            g_col,
        )
        return da, db, dscale if ctx.needs_input_grad[2] else None, None, None, None, None


def _fused(impl: str):
    def row_loss(a, b, scale, offset, normalize):
        return _FusedInfoNCE.apply(a, b, scale, offset, normalize, False, impl)[0]

    def run(pred, target, *, temperature, symmetric, normalize, reduction, group):
        scale = scale_tensor(temperature, pred)
        if group is not None:
            return distributed_loss(
                row_loss,
                pred,
                target,
                scale,
                symmetric=symmetric,
                normalize=normalize,
                reduction=reduction,
                group=group,
            )
        rows, cols = _FusedInfoNCE.apply(pred, target, scale, 0, normalize, symmetric, impl)
        per_row = 0.5 * (rows + cols) if symmetric else rows
        return _reduce(per_row, reduction)

    return run


def _fused_supports(pred, target, **kwargs) -> list[str]:
    return _common.dtype_in("pred", pred)


_backends.register(
    _backends.Backend(
        "cuda",
        OP,
        _fused("native"),
        available=lambda: _common.native_kernel("infonce_fwd", "cuda"),
        supports=_fused_supports,
        devices=("cuda",),
        priority=15,
    )
)
_backends.register(
    _backends.Backend(
        "cpu",
        OP,
        _fused("native"),
        available=lambda: _common.native_kernel("infonce_fwd", "cpu"),
        supports=_fused_supports,
        devices=("cpu",),
        priority=20,
    )
)
_backends.register(
    _backends.Backend(
        "triton",
        OP,
        _fused("triton"),
        available=_common.triton_import,
        supports=lambda pred, target, **kw: (
            _common.triton_device(pred) + _fused_supports(pred, target)
        ),
        devices=("cuda", "cpu"),
        auto_devices=("cuda",),
        priority=10,
    )
)
_backends.register(_backends.Backend("reference", OP, _reference, available=list, priority=100))
