"""Drop-in modules built on the fused ops."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import functional, reference
from vljepa_fast.ops.rotary import LLAMA3_ROPE_SCALING, apply_rotary, rotary_cos_sin

__all__ = ["EmbeddingIndex", "InfoNCELoss", "PredictorAttention"]

_MAGIC = b"VLJEPA_FAST_INDEX\x00v1\n"
_HEADER = struct.Struct("<32sQ")  # sha256 of the payload, payload length


class EmbeddingIndex:
    """An exact (flat) embedding index searched with the fused top-k kernel (like faiss IndexFlat).

    Vectors live in one growing [capacity, dim] buffer on ``device`` (capacity doubles, so ``add``
    is amortised O(rows)). With metric "cosine" rows are L2-normalised when added (a zero row stays
    zero and scores 0) and searched by inner product.

    Args:
        dim: embedding dimension D >= 1.
        metric: "ip" (inner product) or "cosine".
        dtype: storage dtype (float32, float16 or bfloat16); default float32.
        device: storage device; default CPU.
        backend: passed to :func:`vljepa_fast.topk_similarity`.
    """

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
        if metric not in ("ip", "cosine"):
            raise ValueError(f"metric: expected 'ip' or 'cosine', got {metric!r}")
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        self.dim, self.metric, self.dtype, self.backend = dim, metric, dtype, backend
        self.device = torch.device("cpu" if device is None else device)
        self.reset()

    def reset(self) -> None:
        """Remove every vector."""
        self._vectors = torch.empty(0, self.dim, dtype=self.dtype, device=self.device)
        self._ids = torch.empty(0, dtype=torch.long, device=self.device)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex(dim={self.dim}, metric={self.metric!r}, dtype={self.dtype}, "
            f"device={self.device}, ntotal={self._count})"
        )

    @property
    def vectors(self) -> Tensor:
        """[len, dim] stored vectors (normalised under "cosine"); a view, do not modify."""
        return self._vectors[: self._count]

    @property
    def ids(self) -> Tensor:
        """[len] int64 ids, in insertion order."""
        return self._ids[: self._count]

    def add(self, x: Tensor, ids: Tensor | None = None) -> None:
        """Append rows.

        Args:
            x: [n, dim] floating tensor (any device and float dtype; converted to the index's).
            ids: [n] integer ids; default len(self) + arange(n), as faiss does.
        """
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a [n, {self.dim}] tensor, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating tensor, got {x.dtype}")
        n = x.shape[0]
        if ids is None:
            ids = torch.arange(self._count, self._count + n, device=self.device)
        elif not isinstance(ids, Tensor) or ids.shape != (n,) or ids.is_floating_point():
            got = (
                f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            )
            raise ValueError(f"ids: expected an integer tensor of shape [{n}], got {got}")
        rows = x.detach().to(self.device, torch.float32)
        if self.metric == "cosine":
            rows = F.normalize(rows, dim=1, eps=reference.NORM_EPS)
        self._reserve(self._count + n)
        self._vectors[self._count : self._count + n] = rows.to(self.dtype)
        self._ids[self._count : self._count + n] = ids.to(self.device, torch.long)
        self._count += n

    def _reserve(self, needed: int) -> None:
        cap = self._vectors.shape[0]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 1024)
        vec = torch.empty(new_cap, self.dim, dtype=self.dtype, device=self.device)
        idx = torch.empty(new_cap, dtype=torch.long, device=self.device)
        vec[: self._count] = self._vectors[: self._count]
        idx[: self._count] = self._ids[: self._count]
        self._vectors, self._ids = vec, idx

    @torch.no_grad()
    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k best stored rows of every query.

        Args:
            q: [Q, dim] or [dim] queries (converted to the index's device and dtype).
            k: 1 <= k <= len(self).

        Returns:
            (scores [Q, k] float32 sorted descending, ids [Q, k] int64), faiss's order; a 1-D
            query gives [k] results.
        """
        if len(self) == 0:
            raise ValueError("search: the index is empty (add vectors first)")
        if not isinstance(q, Tensor) or q.dim() not in (1, 2) or q.shape[-1] != self.dim:
            got = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"q: expected a [Q, {self.dim}] or [{self.dim}] tensor, got {got}")
        single = q.dim() == 1
        queries = q.reshape(-1, self.dim).to(self.device, torch.float32)
        if self.metric == "cosine":  # stored rows are unit already: inner product is the cosine
            queries = F.normalize(queries, dim=1, eps=reference.NORM_EPS)
        scores, rows = functional.topk_similarity(
            queries.to(self.dtype).contiguous(), self.vectors, k, backend=self.backend
        )
        ids = self._ids[rows]
        return (scores[0], ids[0]) if single else (scores, ids)

    def to(self, device: torch.device | str) -> EmbeddingIndex:
        """Move the storage to ``device`` (in place) and return self."""
        self.device = torch.device(device)
        self._vectors = self.vectors.to(self.device)
        self._ids = self.ids.to(self.device)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file, fsync, rename); a sha256 guards the payload."""
        buf = io.BytesIO()
        torch.save(
            {
                "dim": self.dim,
                "metric": self.metric,
                "dtype": str(self.dtype).removeprefix("torch."),
                "vectors": self.vectors.cpu(),
                "ids": self.ids.cpu(),
            },
            buf,
        )
        payload = buf.getvalue()
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + _HEADER.pack(hashlib.sha256(payload).digest(), len(payload)))
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: torch.device | str | None = None,
        *,
        backend: str = "auto",
    ) -> EmbeddingIndex:
        """Read an index written by :meth:`save`.

        Raises:
            ValueError: the file is not an index, or is truncated or corrupt (checksum mismatch).
        """
        data = Path(path).read_bytes()
        head = len(_MAGIC) + _HEADER.size
        if not data.startswith(_MAGIC) or len(data) < head:
            raise ValueError(f"{path}: not a vljepa_fast EmbeddingIndex file (bad header)")
        digest, length = _HEADER.unpack(data[len(_MAGIC) : head])
        payload = data[head:]
        if len(payload) != length:
            raise ValueError(
                f"{path}: truncated or corrupt index ({len(payload)} of {length} bytes)"
            )
        if hashlib.sha256(payload).digest() != digest:
            raise ValueError(f"{path}: corrupt index (checksum mismatch)")
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        index = cls(
            state["dim"], state["metric"], getattr(torch, state["dtype"]), device, backend=backend
        )
        index._vectors = state["vectors"].to(index.device)
        index._ids = state["ids"].to(index.device)
        index._count = state["ids"].shape[0]
        return index


class PredictorAttention(torch.nn.Module):
    """Llama-compatible grouped-query attention with RoPE and key padding, bidirectional by default.

    The VL-JEPA predictor's attention: a Llama-3.2 layer with the causal mask turned off. The
    parameters are named and shaped as transformers' ``LlamaAttention`` (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``, no biases), so a Llama layer's ``self_attn`` state dict loads with
    ``strict=True``; the rotary frequencies are recomputed, never stored. Queries and keys are
    rotated by :func:`vljepa_fast.apply_rotary` (``"llama"`` layout) and attended by
    :func:`vljepa_fast.attention` in the [B, L, H, D] layout the projections produce (no
    transposes), with the key padding mask passed as is (no dense [B, 1, L, L] additive mask).

    Args:
        hidden_size: model width (2048 for Llama-3.2-1B).
        num_heads: query heads Hq (32).
        num_kv_heads: key/value heads Hkv, dividing num_heads (8).
        head_dim: D, even (64).
        rope_theta: RoPE frequency base (500000).
        rope_scaling: transformers' ``rope_scaling`` dict (default Llama 3.2's "llama3" scaling:
            factor 32, low 1, high 4, original 8192) or None for plain RoPE.
        max_position_embeddings: the longest sequence accepted (131072).
        causal: lower-triangular mask on top of the key padding (the VL-JEPA predictor: False).
        backend: attention backend, passed to :func:`vljepa_fast.attention`.
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 32,
        num_kv_heads: int = 8,
        head_dim: int = 64,
        rope_theta: float = 500000.0,
        rope_scaling: Mapping[str, float | str] | None = LLAMA3_ROPE_SCALING,
        max_position_embeddings: int = 131072,
        causal: bool = False,
        backend: str = "auto",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (
            ("hidden_size", hidden_size),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("max_position_embeddings", max_position_embeddings),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: must divide num_heads ({num_heads}), got {num_kv_heads}"
            )
        if head_dim % 2:
            raise ValueError(f"head_dim: expected an even head dim (RoPE pairs), got {head_dim}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.rope_theta = head_dim, float(rope_theta)
        self.rope_scaling = None if rope_scaling is None else dict(rope_scaling)
        self.max_position_embeddings, self.causal, self.backend = (
            max_position_embeddings,
            causal,
            backend,
        )
        kw = {"device": device, "dtype": dtype, "bias": False}
        self.q_proj = torch.nn.Linear(hidden_size, num_heads * head_dim, **kw)
        self.k_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.v_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.o_proj = torch.nn.Linear(num_heads * head_dim, hidden_size, **kw)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"causal={self.causal}, backend={self.backend!r}"
        )

    def forward(
        self,
        hidden: Tensor,
        key_padding_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Attend over the sequence.

        Args:
            hidden: [B, L, hidden_size] in the parameters' dtype.
            key_padding_mask: [B, L] bool, True = a real token; PAD keys take no part (a PAD
                query still gets an output, from the real keys). None: every token is real.
            position_ids: [B, L] or [L] integer positions for RoPE; default 0..L-1.

        Returns:
            [B, L, hidden_size].
        """
        H = self.hidden_size
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[-1] != H:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"hidden: expected [B, L, {self.hidden_size}], got {got}")
        B, L, _ = hidden.shape
        if position_ids is None:
            if L > self.max_position_embeddings:
                raise ValueError(
                    f"hidden: {L} tokens exceed max_position_embeddings "
                    f"({self.max_position_embeddings})"
                )
            position_ids = torch.arange(L, device=hidden.device)
        elif position_ids.shape not in ((L,), (B, L)):
            raise ValueError(
                f"position_ids: expected [B, L] or [L] = {(B, L)}, got {tuple(position_ids.shape)}"
            )
        cos, sin = rotary_cos_sin(
            position_ids, self.head_dim, theta=self.rope_theta, rope_scaling=self.rope_scaling
        )
        q = self.q_proj(hidden).view(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(B, L, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, cos, sin, layout="llama")
        out = functional.attention(
            q, k, v, key_padding_mask=key_padding_mask, causal=self.causal, backend=self.backend
        )
        return self.o_proj(out.reshape(B, L, self.num_heads * self.head_dim))


class InfoNCELoss(torch.nn.Module):
    """Bidirectional InfoNCE on the fused kernels (:func:`vljepa_fast.infonce_loss`) as a module.

    Args:
        temperature: the fixed temperature, or the initial one when learnable.
        learnable_temperature: learn ``logit_scale = log(1 / temperature)`` (CLIP convention);
            the scale used is ``exp(logit_scale)`` clamped at ``max_logit_scale``.
        max_logit_scale: the clamp of the learned scale (CLIP: 100).
        symmetric, reduction, group, backend: as :func:`vljepa_fast.infonce_loss`.

    Shapes:
        forward(pred [N, D], target [N, D]) -> scalar float32 (or [N] with reduction "none").
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        max_logit_scale: float = 100.0,
        symmetric: bool = True,
        reduction: str = "mean",
        group: object | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature: expected a positive finite float, got {temperature!r}")
        if not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale: expected > 0, got {max_logit_scale!r}")
        self.temperature = float(temperature)
        self.max_logit_scale = float(max_logit_scale)
        self.symmetric, self.reduction, self.group, self.backend = (
            symmetric,
            reduction,
            group,
            backend,
        )
        if learnable_temperature:
            init = torch.tensor(1.0 / temperature).log()
            self.logit_scale = torch.nn.Parameter(init)
        else:
            self.register_parameter("logit_scale", None)

    def current_temperature(self) -> float | Tensor:
        """The temperature the next forward uses (a 0-dim tensor when learnable)."""
        if self.logit_scale is None:
            return self.temperature
        return 1.0 / self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        temperature = self.current_temperature()
        if isinstance(temperature, Tensor):
            temperature = temperature.to(pred.device)
        return functional.infonce_loss(
            pred,
            target,
            temperature=temperature,
            symmetric=self.symmetric,
            reduction=self.reduction,
            group=self.group,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        learn = self.logit_scale is not None
        return f"temperature={self.temperature}, learnable={learn}, symmetric={self.symmetric}"
