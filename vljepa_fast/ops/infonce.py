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
            raise ValueError(f"temperature: expected device {like.device}, got {temperature.device}")
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


def distributed_loss(
    terms, pred: Tensor, target: Tensor, *, temperature, symmetric: bool, normalize: bool,
    reduction: str, group,
) -> Tensor:
    """Compose a differentiable per-direction ``terms`` function into the distributed loss.

    ``terms(a, b, scale, offset, normalize) -> (row_lse [n], pos_row [n])`` over all rows of b.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = pred.shape[0]
    scale = 1.0 / temperature
    target_all = _GatherRows.apply(target, group)
    lse, pos = terms(pred, target_all, scale, rank * n, normalize)
    per_row = lse - pos
    if symmetric:
        pred_all = _GatherRows.apply(pred, group)
        lse_t, pos_t = terms(target, pred_all, scale, rank * n, normalize)
        per_row = 0.5 * (per_row + (lse_t - pos_t))
    if reduction == "none":
        return per_row
    local = per_row.sum() * (world if reduction == "sum" else 1.0 / n)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    total = total / world
    # value: the global loss; gradient: the local rows' part x world_size (see module doc).
    return local + (total - local).detach()


def _reference_terms(a: Tensor, b: Tensor, scale, offset: int, normalize: bool):
    row_lse, _, pos_row, _ = reference.infonce_terms(
        a, b, scale, offset=offset, normalize=normalize, col_stats=False
    )
    return row_lse, pos_row


def _reference(pred, target, *, temperature, symmetric, normalize, reduction, group):
    if group is not None:
        return distributed_loss(
            _reference_terms, pred, target, temperature=temperature, symmetric=symmetric,
            normalize=normalize, reduction=reduction, group=group,
        )
    return reference.infonce_loss(
        pred, target, temperature=temperature, symmetric=symmetric, normalize=normalize,
        reduction=reduction,
    )


_backends.register(_backends.Backend("reference", OP, _reference, available=list, priority=100))
