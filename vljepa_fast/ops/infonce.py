"""infonce_loss: argument checks, the distributed composition, and backend records.

Zero-row rule (``normalize=True``, every backend). Rows are divided by max(norm, NORM_EPS)
(``reference.NORM_EPS`` = 1e-12), so the values are ``F.normalize(x, eps=NORM_EPS)``'s and a zero
row gives zero logits. The gradient is that of x / |x| on rows whose norm is >= NORM_EPS, and
zero on rows below it (``reference.normalize_rows``, as topk_similarity's cosine): a zero row has
no direction, and the clamp's 1 / NORM_EPS slope would reach 1e12 and overflow fp16. Such a row
keeps its clamped value x / NORM_EPS in the other rows' logits, so their gradients are exact.
The reference backend computes it with ``normalize_rows``; the cpu, triton and cuda backward
kernels give the rows whose norm was clamped a zero gradient in their normalisation backward.

Distributed convention (``group`` given). Rank r holds N_r >= 1 local rows of pred and target;
the sizes may differ by rank (they are all-gathered first, with the feature size, dtype and the
flags, and a mismatch raises the same ValueError on every rank). The negatives are the global
batch of N = sum_r N_r rows, in rank order: rank r's rows are global rows
s_r = N_0 + ... + N_(r-1) onwards. Rank r computes the terms of its own rows (its pred rows
against all targets, its target rows against all preds); the other ranks' embeddings reach it
through an all-gather whose backward returns every rank's gradient contribution to the owner
(all-reduce on gloo, reduce-scatter on NCCL).

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

import math

import torch
import torch.distributed as dist
from torch import Tensor

from vljepa_fast import _backends, reference
from vljepa_fast.ops import _common

OP = "infonce_loss"


#: Smallest temperature served: 1/temperature <= 2**60. The logits then stay within 2**60 in
#: magnitude (|S| <= 1/temperature with normalize), every loss term within 2**61 + log(N), and
#: the float32 products the kernels form from the scale (scale times an inverse norm of at most
#: 1/eps = 1e12 < 2**40; the gradient of a tensor temperature, dscale / temperature**2 <= 2**120
#: |dscale|) stay far below float32's 2**128. A temperature of 1e-39 (1/temperature infinite in
#: float32) is refused instead of turning into NaN.
MIN_TEMPERATURE = 2.0**-60


def check_temperature(temperature: object, like: Tensor) -> None:
    """``temperature``: a finite float >= MIN_TEMPERATURE, or a 0-dim floating tensor on
    ``like``'s device whose value (read eagerly, outside torch.compile) is in that range."""
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
    if not math.isfinite(value) or not value >= MIN_TEMPERATURE:
        raise ValueError(
            f"temperature: expected a positive finite value >= 2**-60 (about 8.7e-19: "
            f"1/temperature and the logits must stay well inside float32), got {value}"
        )


def check_group(group: object) -> None:
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group: a process group was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 of ``sizes[r]`` rows from each rank r (the sizes may differ: rows
    are padded to the largest), whose backward sums every rank's gradient into the owner's rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, sizes: list[int]) -> Tensor:
        ctx.group, ctx.sizes = group, sizes
        width = max(sizes)
        x = x.contiguous()
        if x.shape[0] != width:
            padded = x.new_zeros((width,) + tuple(x.shape[1:]))
            padded[: x.shape[0]] = x
            x = padded
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group, sizes = ctx.group, ctx.sizes
        rank = dist.get_rank(group)
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
        n = sizes[rank]
        # a private copy: the collectives below work in place
        grad = grad.clone(memory_format=torch.contiguous_format)
        if dist.get_backend(group) == dist.Backend.NCCL:
            width = max(sizes)
            full = grad
            if any(size != width for size in sizes):
                full = grad.new_zeros((len(sizes) * width,) + tuple(grad.shape[1:]))
                for r, (start, size) in enumerate(zip(starts, sizes)):
                    full[r * width : r * width + size] = grad[start : start + size]
            out = grad.new_empty((width,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, full, group=group)
            return out[:n], None, None
        dist.all_reduce(grad, group=group)  # gloo has no reduce_scatter
        return grad[starts[rank] : starts[rank] + n], None, None


_DIST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DIST_REDUCTIONS = ("mean", "sum", "none")


def exchange_sizes(
    pred: Tensor,
    *,
    symmetric: bool,
    normalize: bool,
    reduction: str,
    group,
    scale: float | Tensor | None = None,
):
    """Every rank's local batch size (rank order), after checking on all ranks at once that each
    has at least one row and that all agree on D, the dtype, the flags and the temperature's
    value (``scale`` = 1 / temperature): the same ValueError is raised on every rank (a mismatch
    left to the collectives would hang or abort them; different temperatures would give each rank
    another "global" loss)."""
    world = dist.get_world_size(group)
    # one gather for everything (float64 holds the sizes exactly); the scale is 0 where it is
    # not read (no scale given, or a tensor under torch.compile): a real one is > 0
    known = scale is not None and not torch.compiler.is_compiling()
    value = (float(scale.detach()) if isinstance(scale, Tensor) else float(scale)) if known else 0.0
    mine = torch.tensor(
        [
            pred.shape[0],
            pred.shape[1],
            _DIST_DTYPES.index(pred.dtype),
            int(symmetric),
            int(normalize),
            _DIST_REDUCTIONS.index(reduction),
            value,
        ],
        dtype=torch.float64,
        device=pred.device,
    )
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).tolist()
    scales = [row[6] for row in table]
    if len(set(scales)) > 1:
        raise ValueError(
            f"temperature: expected the same value on every rank of group, got "
            f"{[1.0 / v if v else None for v in scales]} (in rank order)"
        )
    table = [[int(v) for v in row[:6]] for row in table]
    sizes = [row[0] for row in table]
    if min(sizes) < 1:
        raise ValueError(
            f"pred: expected at least one row on every rank of group, got local batch sizes "
            f"{sizes} (in rank order)"
        )
    if table[0][1] < 1:
        raise ValueError(f"pred: expected at least one column (D >= 1), got D = {table[0][1]}")
    decode = {
        1: ("pred", "feature size D", lambda v: v),
        2: ("pred", "dtype", lambda v: str(_DIST_DTYPES[v]).removeprefix("torch.")),
        3: ("symmetric", "value", bool),
        4: ("normalize", "value", bool),
        5: ("reduction", "value", lambda v: _DIST_REDUCTIONS[v]),
    }
    for col, (name, what, show) in decode.items():
        vals = [row[col] for row in table]
        if len(set(vals)) > 1:
            raise ValueError(
                f"{name}: expected the same {what} on every rank of group, got "
                f"{[show(v) for v in vals]} (in rank order)"
            )
    return sizes


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
    sizes = exchange_sizes(
        pred, symmetric=symmetric, normalize=normalize, reduction=reduction, group=group,
        scale=scale,
    )
    world, rank = len(sizes), dist.get_rank(group)
    start, total_rows = sum(sizes[:rank]), sum(sizes)
    per_row = row_loss(pred, _GatherRows.apply(target, group, sizes), scale, start, normalize)
    if symmetric:
        back = row_loss(target, _GatherRows.apply(pred, group, sizes), scale, start, normalize)
        per_row = 0.5 * (per_row + back)
    if reduction == "none":
        return per_row
    own = per_row.sum()  # L_r x total_rows ("mean") or L_r ("sum"): this rank's rows' terms
    local = own * (world if reduction == "sum" else world / total_rows)
    total = own.detach().clone()
    dist.all_reduce(total, group=group)
    if reduction == "mean":
        total = total / total_rows
    # value: the global loss L; gradient: world_size x L_r's (see module doc).
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
    # The kernels read rows densely: inputs of any strides (transposed, sliced with a step,
    # expanded, offset) are copied first; .contiguous() is differentiable and a no-op otherwise.
    def row_loss(a, b, scale, offset, normalize):
        return _FusedInfoNCE.apply(
            a.contiguous(), b.contiguous(), scale, offset, normalize, False, impl
        )[0]

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
        rows, cols = _FusedInfoNCE.apply(
            pred.contiguous(), target.contiguous(), scale, 0, normalize, symmetric, impl
        )
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
