"""Drop-in modules built on the fused ops."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import functional, reference

__all__ = ["EmbeddingIndex"]

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
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
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
        """Write the index atomically: temporary file, fsync, rename; a sha256 guards the payload."""
        buf = io.BytesIO()
        torch.save(
            {"dim": self.dim, "metric": self.metric, "dtype": str(self.dtype).removeprefix("torch."),
             "vectors": self.vectors.cpu(), "ids": self.ids.cpu()},
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
        cls, path: str | os.PathLike, device: torch.device | str | None = None, *, backend: str = "auto"
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
            raise ValueError(f"{path}: truncated or corrupt index ({len(payload)} of {length} bytes)")
        if hashlib.sha256(payload).digest() != digest:
            raise ValueError(f"{path}: corrupt index (checksum mismatch)")
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        index = cls(state["dim"], state["metric"], getattr(torch, state["dtype"]), device, backend=backend)
        index._vectors = state["vectors"].to(index.device)
        index._ids = state["ids"].to(index.device)
        index._count = state["ids"].shape[0]
        return index
