"""topk_similarity: the op's validated inputs, backend records over the Triton kernel, the
native CPU/CUDA kernels and the eager reference, and the custom op that gives the kernels'
scores a gradient.

The triton record's ``supports`` makes the kernel's plan (``kernels/topk_similarity.make_plan``:
the streaming path for few queries and small k, else vendor GEMM on bank chunks of
:func:`gemm_chunk` rows plus our k-select; docs/topk_similarity.md) and ``run`` consumes it.

Every backend returns (scores float32 [Q, k], indices int64 [Q, k]) in one order: descending,
NaN scores last (below -inf), equal scores lowest bank index first (see
:func:`vljepa_fast.reference.topk_order`); the reference returns float64 scores for float64
inputs. Every kernel runs on detached, contiguous copies of the inputs; :func:`_run` then
attaches the gradient of the chosen products (``vljepa_fast::topk_scores_grad``), so the
gradient is the same whichever backend chose the rows.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from vljepa_fast import _backends, _validate, reference
from vljepa_fast.ops import _chunks, _common

OP = "topk_similarity"
CUDA_MAX_K = 2048
#: Path codes of the native schema's ``path`` argument (the cuda kernels serve "gemm" only:
#: csrc/cuda/topk_similarity.cu, whose streaming WMMA tile was removed under the wgmma rule).
NATIVE_PATHS = {"stream": 1, "gemm": 2}
#: Largest k of the triton backend (its select keeps a sorted k-list in registers).
TRITON_MAX_K = 2048
METRICS = ("ip", "cosine")

#: Elements of the [rows, k, D] gathered block that one backward step holds at once.
GRAD_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class TopkInputs:
    """Validated arguments of :func:`vljepa_fast.topk_similarity`.

    Attributes:
        queries: [Q, D] floating tensor as given (any strides; may require a gradient).
        bank: [N, D], same dtype and device, any strides.
        k: a Python int, 1 <= k <= N.
        metric: "ip" or "cosine".
    """

    queries: Tensor
    bank: Tensor
    k: int
    metric: str

    @property
    def device(self) -> torch.device:
        return self.queries.device

    @property
    def cosine(self) -> bool:
        return self.metric == "cosine"


def topk_inputs(queries: Tensor, bank: Tensor, k: int, *, metric: str = "ip") -> TopkInputs:
    """The arguments of :func:`vljepa_fast.topk_similarity`, checked (see its docstring).

    Raises:
        ValueError: a malformed argument (named in the message).
    """
    _validate.matching(("queries", "bank"), (queries, bank), ndim=2, layouts=("[Q, D]", "[N, D]"))
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"bank: expected dimension D = {queries.shape[1]} (queries'), got {bank.shape[1]}"
        )
    _validate.nonempty("queries", queries, 0, "query row")
    _validate.nonempty("bank", bank, 0, "bank row (the bank is empty)")
    _validate.nonempty("queries", queries, 1, "column (D >= 1)")
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        k = operator.index(k)  # numpy integers
    _validate.int_in("k", k, 1, bank.shape[0], hint=f" (k <= N, the {bank.shape[0]} bank rows)")
    _validate.choice("metric", metric, METRICS)
    return TopkInputs(queries, bank, k, metric)


# ---------------------------------------------------------------------------------- gradient


def _unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x / max(|x|, eps), 1 / |x| where |x| >= eps else 0) per row: the cosine value and the
    factor of its gradient (rows below eps get none: :func:`vljepa_fast.reference.normalize_rows`).
    """
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    unit = x / norm.clamp_min(reference.NORM_EPS)
    inv = torch.where(norm >= reference.NORM_EPS, 1.0 / norm, torch.zeros_like(norm))
    return unit, inv


def _unit_backward(grad_unit: Tensor, unit: Tensor, inv: Tensor) -> Tensor:
    """Gradient through x / |x|: (g - u (u . g)) / |x|, zero where |x| < eps."""
    return (grad_unit - unit * (unit * grad_unit).sum(1, keepdim=True)) * inv


def scores_backward(
    grad: Tensor,
    queries: Tensor,
    bank: Tensor,
    indices: Tensor,
    cosine: bool,
    need_queries: bool = True,
    need_bank: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of sum(grad * scores) where scores[q, j] = <u(queries[q]), u(bank[indices[q, j]])>
    (u = identity for "ip", :func:`vljepa_fast.reference.normalize_rows` for "cosine").

    Math in fp32 (float64 stays); results in the inputs' dtypes. Only the distinct chosen bank
    rows are read; extra memory is O(U * D + GRAD_CHUNK_ELEMENTS) for U distinct rows. The bank
    gradient is summed with ``index_add_`` (deterministic on CPU, and on CUDA under
    ``torch.use_deterministic_algorithms(True)``).

    Args:
        grad: [Q, k] upstream gradient of the scores.
        queries: [Q, D]; bank: [N, D]; indices: [Q, k] int64 rows of bank.
        cosine: the cosine metric.

    Returns:
        (d_queries [Q, D] or None, d_bank [N, D] or None).
    """
    cdt = torch.float64 if queries.dtype == torch.float64 else torch.float32
    num_queries, k = indices.shape
    dim = queries.shape[1]
    rows, inverse = torch.unique(indices, return_inverse=True)  # [U], [Q, k]
    # Contiguous fp32 copies: the same sums whatever the strides of the inputs.
    q = queries.to(cdt).contiguous()
    b = bank.index_select(0, rows).to(cdt).contiguous()  # [U, D]
    g = grad.to(cdt)
    if cosine:
        q, q_inv = _unit_rows(q)
        b, b_inv = _unit_rows(b)
    d_q = torch.zeros_like(q) if need_queries else None
    d_b = torch.zeros_like(b) if need_bank else None
    step = max(1, GRAD_CHUNK_ELEMENTS // max(1, k * dim))
    for q0 in range(0, num_queries, step):
        g_c, inv_c = g[q0 : q0 + step], inverse[q0 : q0 + step]
        if d_q is not None:
            # [c, D] = sum_j g[c, j] * b[inv[c, j]]
            d_q[q0 : q0 + step] = torch.einsum("ck,ckd->cd", g_c, b[inv_c])
        if d_b is not None:
            contrib = g_c.unsqueeze(-1) * q[q0 : q0 + step].unsqueeze(1)  # [c, k, D]
            d_b.index_add_(0, inv_c.reshape(-1), contrib.reshape(-1, dim))
    if cosine:
        d_q = None if d_q is None else _unit_backward(d_q, q, q_inv)
        d_b = None if d_b is None else _unit_backward(d_b, b, b_inv)
    grad_queries = None if d_q is None else d_q.to(queries.dtype)
    grad_bank = None
    if d_b is not None:
        grad_bank = torch.zeros_like(bank)
        grad_bank[rows] = d_b.to(bank.dtype)
    return grad_queries, grad_bank


@torch.library.custom_op("vljepa_fast::topk_scores_grad", mutates_args=())
def _scores_grad(
    queries: Tensor, bank: Tensor, scores: Tensor, indices: Tensor, cosine: bool
) -> Tensor:
    """The kernel's ``scores``, unchanged (values and order exactly the kernel's), carrying the
    gradient of scores[q, j] = sim(queries[q], bank[indices[q, j]]) to ``queries`` and ``bank``
    (recomputed from the chosen rows by :func:`scores_backward`)."""
    return scores.clone()


@_scores_grad.register_fake
def _(queries, bank, scores, indices, cosine):
    return torch.empty_like(scores)


def _scores_grad_setup(ctx, inputs, output) -> None:
    queries, bank, _, indices, cosine = inputs
    ctx.save_for_backward(queries, bank, indices)
    ctx.cosine = cosine


def _scores_grad_backward(ctx, grad: Tensor):
    queries, bank, indices = ctx.saved_tensors
    grad_queries, grad_bank = scores_backward(
        grad,
        queries,
        bank,
        indices,
        ctx.cosine,
        need_queries=ctx.needs_input_grad[0],
        need_bank=ctx.needs_input_grad[1],
    )
    return grad_queries, grad_bank, None, None, None


_scores_grad.register_autograd(_scores_grad_backward, setup_context=_scores_grad_setup)


#: A backend's kernel: (queries, bank, k, metric, plan) on detached contiguous tensors ->
#: (scores, indices) without a gradient; ``plan`` is what the record's ``supports`` returned.
Kernel = Callable[[Tensor, Tensor, int, str, object], tuple[Tensor, Tensor]]


def _run(kernel: Kernel) -> Callable[[TopkInputs, object], tuple[Tensor, Tensor]]:
    """A record's run: ``kernel`` on detached contiguous inputs, then the scores' gradient."""

    def run(inputs: TopkInputs, plan: object) -> tuple[Tensor, Tensor]:
        queries, bank = inputs.queries, inputs.bank
        scores, indices = kernel(
            queries.detach().contiguous(),
            bank.detach().contiguous(),
            inputs.k,
            inputs.metric,
            plan,
        )
        if torch.is_grad_enabled() and (queries.requires_grad or bank.requires_grad):
            scores = _scores_grad(queries, bank, scores, indices, inputs.cosine)
        return scores, indices

    return run


# ---------------------------------------------------------------------------------- backends


def gemm_chunk(inputs: TopkInputs) -> int:
    """Bank rows per GEMM of the GEMM path: the chunk rule (``ops/_chunks.chunk_rows``) for
    the [Q, chunk] fp32 score buffer (4 bytes per pair) of inputs of (Q + N) D elements."""
    q, b = inputs.queries, inputs.bank
    input_bytes = (q.shape[0] + b.shape[0]) * q.shape[1] * q.element_size()
    return _chunks.chunk_rows(b.shape[0], q.shape[0], 4, input_bytes)


def triton_plan(inputs: TopkInputs, path: str | None = None):
    """The Triton kernel's plan for ``inputs`` (``kernels/topk_similarity.make_plan``): the
    documented path rule unless ``path`` ("stream" or "gemm") forces one, the chunk rule."""
    from vljepa_fast._kernels import topk_similarity as kernel

    q, b = inputs.queries, inputs.bank
    programs = kernel.target_programs(q.device)
    return kernel.make_plan(
        q.dtype,
        q.shape[0],
        b.shape[0],
        q.shape[1],
        inputs.k,
        cosine=inputs.cosine,
        chunk=gemm_chunk(inputs),
        programs=programs,
        path=path,
        arch=kernel.device_arch(q.device),
    )


@torch.library.custom_op("vljepa_fast::topk_similarity_triton", mutates_args=())
def _triton_op(
    queries: Tensor, bank: Tensor, k: int, cosine: bool, path: str, fields: list[int]
) -> tuple[Tensor, Tensor]:
    """The Triton kernel under the plan ``TopkPlan(path, *fields)`` (a custom op's arguments
    are plain values: the plan travels as its fields)."""
    from vljepa_fast._kernels import topk_similarity as kernel

    plan = kernel.TopkPlan(path, *fields)
    plan = plan._replace(bank_norms=bool(plan.bank_norms))
    return kernel.topk_similarity(queries, bank, k, cosine, eps=reference.NORM_EPS, plan=plan)


@_triton_op.register_fake
def _(queries: Tensor, bank: Tensor, k: int, cosine: bool, path: str, fields: list[int]):
    q = queries.shape[0]
    return queries.new_empty(q, k, dtype=torch.float32), queries.new_empty(q, k, dtype=torch.long)


def _low_precision(inputs: TopkInputs) -> object:
    return _backends.plan_or_refusal(_common.dtype_in("queries", inputs.queries))


def _gpu_reasons(inputs: TopkInputs, max_k: int, why_max: str) -> list[str]:
    """The reasons a GPU backend (k <= max_k) refuses ``inputs``: dtype, k."""
    why = _common.dtype_in("queries", inputs.queries)
    if inputs.k > max_k:
        why.append(
            f"k = {inputs.k} > {max_k} ({why_max}; the cpu and reference backends serve any k)"
        )
    return why


def _triton_supports(inputs: TopkInputs) -> object:
    why = _gpu_reasons(inputs, TRITON_MAX_K, "the k-select keeps a sorted k-list in registers")
    if inputs.bank.shape[0] >= 2**31:
        why.append(f"N = {inputs.bank.shape[0]} bank rows >= 2^31 (indices travel in 32 bits)")
    return _backends.plan_or_refusal(why, None if why else triton_plan(inputs))


class NativePlan(NamedTuple):
    """The cuda record's plan: ``path`` (always "gemm": vendor GEMM + k-select, the cuda
    kernels' one path) and ``chunk`` (bank rows per GEMM, :func:`gemm_chunk`), handed to
    ``torch.ops.vljepa_fast.topk_similarity``."""

    path: str
    chunk: int


def cuda_plan(inputs: TopkInputs) -> NativePlan:
    """The cuda kernel's plan: its GEMM + k-select path with the chunk rule's bank chunk (for
    few queries too: at 16 x 1M x 1536 bf16 the model gives 0.78 ms against the 0.75 ms of a
    streaming tile, which the cuda kernels no longer have; the triton backend streams)."""
    return NativePlan("gemm", gemm_chunk(inputs))


def _cuda_supports(inputs: TopkInputs) -> object:
    why = _gpu_reasons(inputs, CUDA_MAX_K, "warp-select limit")
    return _backends.plan_or_refusal(why, None if why else cuda_plan(inputs))


def _native(
    queries: Tensor, bank: Tensor, k: int, metric: str, plan: NativePlan | None
) -> tuple[Tensor, Tensor]:
    """The native kernel; the cpu record has no plan (its kernel tiles for the cache)."""
    if plan is None:
        return torch.ops.vljepa_fast.topk_similarity(queries, bank, k, metric == "cosine")
    return torch.ops.vljepa_fast.topk_similarity(
        queries, bank, k, metric == "cosine", NATIVE_PATHS[plan.path], plan.chunk
    )


def _triton(queries: Tensor, bank: Tensor, k: int, metric: str, plan) -> tuple[Tensor, Tensor]:
    fields = [int(v) for v in plan[1:]]
    return _triton_op(queries, bank, k, metric == "cosine", plan.path, fields)


def _reference(
    queries: Tensor, bank: Tensor, k: int, metric: str, plan: object
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return reference.topk_similarity(queries, bank, k, metric=metric)


_common.native_records(
    OP,
    "topk_similarity",
    _run(_native),
    supports={"cuda": _cuda_supports, "cpu": _low_precision},
    priority={"cuda": 10, "cpu": 20},
)
_common.triton_record(OP, _run(_triton), _triton_supports, priority=30)
_common.reference_record(OP, _run(_reference))
