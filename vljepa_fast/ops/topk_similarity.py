"""topk_similarity: backend records over the Triton kernel, the native CPU/CUDA kernels and the
eager reference, plus the autograd function that gives the kernels' scores a gradient.

Every backend returns (scores float32 [Q, k], indices int64 [Q, k]) in one order: descending,
NaN scores last (below -inf), equal scores lowest bank index first (see
:func:`vljepa_fast.reference.topk_order`); the reference returns float64 scores for float64
inputs. Backends run on detached inputs; :func:`attach_grad` adds the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vljepa_fast import _backends, reference
from vljepa_fast.ops import _common

OP = "topk_similarity"
CUDA_MAX_K = 1024


#: Elements of the [rows, k, D] gathered block that one backward step holds at once.
GRAD_CHUNK_ELEMENTS = 1 << 24


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


class _AttachScoreGrad(torch.autograd.Function):
    """Returns the kernel's scores unchanged (values and order exactly the kernel's) and gives
    them the gradient of the chosen products, recomputed from the winning rows."""

    @staticmethod
    def forward(queries, bank, scores, indices, cosine):
        return scores.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        queries, bank, _, indices, cosine = inputs
        ctx.save_for_backward(queries, bank, indices)
        ctx.cosine = cosine

    @staticmethod
    def backward(ctx, grad):
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


def attach_grad(
    queries: Tensor, bank: Tensor, scores: Tensor, indices: Tensor, metric: str
) -> Tensor:
    """``scores`` (the kernel's output, unchanged) carrying the gradient of
    scores[q, j] = sim(queries[q], bank[indices[q, j]]) to ``queries`` and ``bank``."""
    return _AttachScoreGrad.apply(queries, bank, scores, indices, metric == "cosine")


@torch.library.custom_op("vljepa_fast::topk_similarity_triton", mutates_args=())
def _triton_op(queries: Tensor, bank: Tensor, k: int, cosine: bool) -> tuple[Tensor, Tensor]:
    from vljepa_fast._kernels import topk_similarity as kernel

    return kernel.topk_similarity(queries, bank, k, cosine, eps=reference.NORM_EPS)


@_triton_op.register_fake
def _(queries: Tensor, bank: Tensor, k: int, cosine: bool) -> tuple[Tensor, Tensor]:
    q = queries.shape[0]
    return queries.new_empty(q, k, dtype=torch.float32), queries.new_empty(q, k, dtype=torch.long)


def _no_float64(queries: Tensor, bank: Tensor, k: int, metric: str = "ip") -> list[str]:
    return _common.dtype_in("queries", queries)


def _native(queries: Tensor, bank: Tensor, k: int, metric: str = "ip") -> tuple[Tensor, Tensor]:
    return torch.ops.vljepa_fast.topk_similarity(queries, bank, k, metric == "cosine")


def _cuda_supports(queries: Tensor, bank: Tensor, k: int, metric: str = "ip") -> list[str]:
    why = _no_float64(queries, bank, k)
    if k > CUDA_MAX_K:
        why.append(f"k = {k} > {CUDA_MAX_K} (warp-select limit; the triton backend serves any k)")
    return why


def _triton_supports(queries: Tensor, bank: Tensor, k: int, metric: str = "ip") -> list[str]:
    return _common.triton_device(queries) + _no_float64(queries, bank, k)


def _triton(queries: Tensor, bank: Tensor, k: int, metric: str = "ip") -> tuple[Tensor, Tensor]:
    return _triton_op(queries, bank, k, metric == "cosine")


def _reference(queries: Tensor, bank: Tensor, k: int, metric: str = "ip") -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return reference.topk_similarity(queries, bank, k, metric=metric)


_backends.register(
    _backends.Backend(
        "cuda",
        OP,
        _native,
        available=lambda: _common.native_kernel(OP, "cuda"),
        supports=_cuda_supports,
        devices=("cuda",),
        priority=10,
    )
)
_backends.register(
    _backends.Backend(
        "triton",
        OP,
        _triton,
        available=_common.triton_import,
        supports=_triton_supports,
        devices=("cuda", "cpu"),
        auto_devices=("cuda",),
        priority=30,
    )
)
_backends.register(
    _backends.Backend(
        "cpu",
        OP,
        _native,
        available=lambda: _common.native_kernel(OP, "cpu"),
        supports=_no_float64,
        devices=("cpu",),
        priority=20,
    )
)
_backends.register(_backends.Backend("reference", OP, _reference, available=list, priority=100))
