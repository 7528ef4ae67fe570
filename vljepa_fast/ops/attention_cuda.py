"""The ``cuda`` backend of attention and attention_varlen: the CUDA C++ flash attention on CuTe
(host side csrc/cuda/attention.cu, kernels csrc/include/attention_kernels.h, forward and
backward; the kernels' header states the algorithm and cost).

Custom ops (with fake functions, so torch.compile traces through them) wrap the native
``vljepa_fast::flash_attention_fwd`` / ``flash_attention_bwd``; autograd saves q, k, v, out and
the fp32 log-sum-exp. The backward runs the deterministic path (no atomics, bitwise
reproducible) under ``torch.are_deterministic_algorithms_enabled()``, else dQ by fp32 atomics.

Plans: dense, the per-batch key lengths of a right-padded ``key_padding_mask`` (one host read per
call, shared with the Triton record through :meth:`AttentionInputs.key_counts`), and the same
lengths as query lengths under ``mask_queries`` (padded query rows give 0 and no gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vljepa_fast import _backends
from vljepa_fast.ops import _common
from vljepa_fast.ops.attention import (
    _MASKING,
    AttentionInputs,
    VarlenInputs,
    _scale,
    bwd_fake,
    fwd_fake,
    fwd_setup,
)

__all__ = ["HEAD_DIMS", "DTYPES"]

#: Head dims the CUDA kernels are compiled for (csrc/include/attention_check.h).
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
#: Rows (and batch x heads) the kernels index with int (attention_check.h).
MAX_ROWS = 2**29



@torch.library.custom_op(
    "vljepa_fast::attention_fwd_cuda",
    mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor v, {_MASKING}) -> (Tensor, Tensor)",
)
def _fwd(q: Tensor, k: Tensor, v: Tensor, *masking) -> tuple[Tensor, Tensor]:
    q, k, v = (_aligned(t) for t in (q, k, v))
    return torch.ops.vljepa_fast.flash_attention_fwd(q, k, v, *masking)


_fwd.register_fake(fwd_fake)


@torch.library.custom_op(
    "vljepa_fast::attention_bwd_cuda",
    mutates_args=(),
    schema=(
        f"(Tensor do, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_MASKING}, "
        "bool deterministic) -> (Tensor, Tensor, Tensor)"
    ),
)
def _bwd(do: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    tensors = tuple(_aligned(t) for t in (do, *args[:4]))  # do, q, k, v, out (not lse)
    return torch.ops.vljepa_fast.flash_attention_bwd(*tensors, *args[4:])


_bwd.register_fake(bwd_fake)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    det = torch.are_deterministic_algorithms_enabled()
    dq, dk, dv = _bwd(d_out, q, k, v, out, lse, *ctx.rest, det)
    return (dq, dk, dv) + (None,) * len(ctx.rest)


_fwd.register_autograd(_backward, setup_context=fwd_setup)


def _aligned(t: Tensor) -> Tensor:
    """``t`` as the kernels load it (16-byte packs): unit last stride, every other stride a
    multiple of 8 elements, a 16-byte aligned start; a contiguous copy otherwise (inside the
    custom ops, on real tensors)."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0
    ok = ok and all(st % 8 == 0 or n <= 1 for n, st in zip(t.shape[:-1], t.stride()[:-1]))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


class _Plan(NamedTuple):
    """What the dense record hands its run: int32 [B] key lengths and query lengths (or None)."""

    seqlens_k: Tensor | None
    seqlens_q: Tensor | None


def _reasons(x: AttentionInputs | VarlenInputs) -> list[str]:
    """Reasons that need no device read: dtype, head dim, scale, sizes, compute capability."""
    q = x.q
    why = _common.dtype_in("q", q, DTYPES)
    if q.shape[-1] not in HEAD_DIMS:
        why.append(f"head dim {q.shape[-1]} not compiled (serves {HEAD_DIMS})")
    sc = _scale(q, x.scale)
    if not 0.0 < sc < float("inf"):
        # the running max is taken of the raw scores and scaled once (one FMA per score): with
        # scale 0 a masked score gives -inf * 0 = NaN, with scale < 0 the max is the wrong one
        why.append(f"scale {sc} is not a positive finite number (the kernel's running max "
                   "assumes scale > 0)")
    rows = (q.shape[0], x.k.shape[0]) if q.dim() == 3 else (q.shape[1], x.k.shape[1])
    heads = q.shape[-2] * (len(x.lengths_q) if isinstance(x, VarlenInputs) else q.shape[0])
    if max(rows) >= MAX_ROWS or heads >= MAX_ROWS:
        why.append(f"rows or batch x heads >= 2**29 (the kernels index them with int): {rows}")
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8:
            why.append(f"needs compute capability >= 8.0, got {major}.{minor}")
    return why


def _supports(x: AttentionInputs) -> _Plan | _backends.Refusal:
    why = _reasons(x)
    mask_queries = bool(getattr(x, "mask_queries", False))
    lengths = None
    if x.key_padding_mask is not None:
        if torch.compiler.is_compiling():
            why.append(
                "a key_padding_mask under torch.compile (its right padding cannot be checked)"
            )
        elif not why:  # read the mask only when nothing else refuses
            counts = x.key_counts()
            lengths = counts.lengths if counts.right else None
            if lengths is None:
                why.append("key_padding_mask is not right padding (True... then False... per row)")
    return _backends.plan_or_refusal(why, _Plan(lengths, lengths if mask_queries else None))


def _varlen_supports(x: VarlenInputs) -> None | _backends.Refusal:
    return _backends.plan_or_refusal(_reasons(x))


def _run(x: AttentionInputs, plan: _Plan) -> Tensor:
    out, _ = _fwd(
        x.q, x.k, x.v, plan.seqlens_k, plan.seqlens_q, None, None, 0, 0, x.causal, *x.window_size,
        _scale(x.q, x.scale),
    )  # fmt: skip
    return out


def _run_varlen(x: VarlenInputs, plan: None) -> Tensor:
    out, _ = _fwd(
        x.q, x.k, x.v, None, None, x.cu_seqlens_q.contiguous(), x.cu_seqlens_k.contiguous(),
        x.max_seqlen_q, x.max_seqlen_k, x.causal, *x.window_size, _scale(x.q, x.scale),
    )  # fmt: skip
    return out


def _available() -> list[str]:
    return _common.native_kernel("flash_attention_fwd", "cuda")


for _op, _r, _s in (
    ("attention", _run, _supports),
    ("attention_varlen", _run_varlen, _varlen_supports),
):
    _backends.register(
        _backends.Backend(
            "cuda", _op, _r, available=_available, supports=_s, devices=("cuda",), priority=30
        )
    )
