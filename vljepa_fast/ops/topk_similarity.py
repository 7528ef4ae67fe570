"""topk_similarity: backend records over the Triton kernel, the native CPU/CUDA kernels and the
eager reference, plus the differentiable score recomputation used when scores need a gradient.

Every backend returns (scores float32 [Q, k] sorted descending, indices int64 [Q, k]); the
reference returns float64 scores for float64 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import _backends, reference
from vljepa_fast.ops import _common

OP = "topk_similarity"
CUDA_MAX_K = 1024


def differentiable_scores(queries: Tensor, bank: Tensor, indices: Tensor, metric: str) -> Tensor:
    """Scores of the chosen rows recomputed with autograd: [Q, k] float32 (float64 stays).

    O(Q * k * D) work, the same math as the kernels (fp32, norms clamped at NORM_EPS).
    """
    cdt = torch.float64 if queries.dtype == torch.float64 else torch.float32
    q, b = queries.to(cdt), bank.to(cdt)
    if metric == "cosine":
        q = F.normalize(q, dim=-1, eps=reference.NORM_EPS)
        b = F.normalize(b, dim=-1, eps=reference.NORM_EPS)
    return torch.einsum("qd,qkd->qk", q, b[indices])


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
