"""What the distributed pairwise losses (infonce_loss, sigmoid_loss) share: the one collective
that checks every rank's arguments at once, the differentiable gather of rows of unequal sizes,
and the value/gradient convention of a "mean" or "sum" over all ranks (each op's module doc
states it for its loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: (argument name, what is compared, value on this rank, how a value is shown in the error)
Agreed = tuple[str, str, int, Callable[[int], object]]
#: (argument name, value on this rank or NaN where it is not read, how it is shown)
AgreedValue = tuple[str, float, Callable[[float], object]]


def known_value(v: float | Tensor) -> float:
    """A scalar argument's value for the cross-rank check: NaN where it is not read (a tensor
    under torch.compile, whose value is not read while tracing), which is then left out of the
    comparison on every rank alike."""
    if isinstance(v, Tensor):
        return math.nan if torch.compiler.is_compiling() else float(v.detach())
    return float(v)


def exchange_sizes(
    pred: Tensor, group, flags: Sequence[Agreed], values: Sequence[AgreedValue]
) -> list[int]:
    """Every rank's local batch size (rank order), after checking on all ranks at once, in one
    all-gather, that each rank has at least one row and that all agree on D, the dtype, the
    ``flags`` (small ints) and the ``values`` (floats, NaN = not read): the same ValueError is
    raised on every rank (a mismatch left to the collectives would hang or abort them, and
    different scalars would give each rank another "global" loss)."""
    world = dist.get_world_size(group)
    own = [pred.shape[0], pred.shape[1], DTYPES.index(pred.dtype), *(f[2] for f in flags)]
    # float64 holds the sizes exactly
    mine = torch.tensor([*own, *(v[1] for v in values)], dtype=torch.float64, device=pred.device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).tolist()
    for col, (name, _, show) in enumerate(values, start=len(own)):
        vals = [row[col] for row in table]
        if len({v for v in vals if not math.isnan(v)}) > 1:
            raise ValueError(
                f"{name}: expected the same value on every rank of group, got "
                f"{[None if math.isnan(v) else show(v) for v in vals]} (in rank order)"
            )
    ints = [[int(v) for v in row[: len(own)]] for row in table]
    sizes = [row[0] for row in ints]
    if min(sizes) < 1:
        raise ValueError(
            f"pred: expected at least one row on every rank of group, got local batch sizes "
            f"{sizes} (in rank order)"
        )
    if ints[0][1] < 1:
        raise ValueError(f"pred: expected at least one column (D >= 1), got D = {ints[0][1]}")
    checks = [
        ("pred", "feature size D", lambda v: v),
        ("pred", "dtype", lambda v: str(DTYPES[v]).removeprefix("torch.")),
        *((name, what, show) for name, what, _, show in flags),
    ]
    for col, (name, what, show) in enumerate(checks, start=1):
        vals = [row[col] for row in ints]
        if len(set(vals)) > 1:
            raise ValueError(
                f"{name}: expected the same {what} on every rank of group, got "
                f"{[show(v) for v in vals]} (in rank order)"
            )
    return sizes


def gather_rows(x: Tensor, group, sizes: list[int]) -> Tensor:
    """The rows of every rank (``sizes[r]`` from rank r, in rank order), differentiable: the
    backward sums every rank's gradient into the owner's rows. The local rows are padded to the
    largest size (the collective moves equal shapes) and the padding is sliced off again."""
    from torch.distributed import _functional_collectives as collectives

    # torch's differentiable functional all-gather (backward: a reduce-scatter sum), traceable
    # by torch.compile; renamed all_gather_single_autograd after torch 2.11
    gather = getattr(collectives, "all_gather_single_autograd", None)
    if gather is None:
        gather = collectives.all_gather_tensor_autograd
    width = max(sizes)
    padded = torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[0]))
    full = gather(padded.contiguous(), 0, group)
    return torch.cat([full[r * width : r * width + size] for r, size in enumerate(sizes)])


def loss_factor(reduction: str, sizes: list[int]) -> float:
    """The factor :func:`global_loss` applies to this rank's undivided terms: world_size for
    "sum", world_size / N (N = sum of the local sizes) for "mean"."""
    world = len(sizes)
    return float(world) if reduction == "sum" else world / sum(sizes)


def global_loss(own: Tensor, reduction: str, sizes: list[int], group) -> Tensor:
    """The global "mean" or "sum" loss from ``own``, the sum of this rank's rows' terms
    (undivided): the value L is the same on every rank (an all-reduce), the gradient is
    world_size x L_r's (L_r = this rank's share of L), so DistributedDataParallel's average over
    ranks gives exactly the single-process gradient of L whatever the local batch sizes."""
    total_rows = sum(sizes)
    local = own * loss_factor(reduction, sizes)
    total = own.detach().clone()
    dist.all_reduce(total, group=group)
    if reduction == "mean":
        total = total / total_rows
    return local + (total - local).detach()
