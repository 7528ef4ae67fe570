"""Drop-in modules built on the fused ops."""

from __future__ import annotations

import errno
import hashlib
import io
import numbers
import os
import re
import secrets
import stat
import struct
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import _backends, _validate, functional, reference
from vljepa_fast.ops.infonce import MIN_TEMPERATURE
from vljepa_fast.ops.rotary import (
    LLAMA3_ROPE_SCALING,
    apply_rotary,
    check_rope_scaling,
    rotary_cos_sin,
)

__all__ = ["EmbeddingIndex", "InfoNCELoss", "PredictorAttention"]


# ----------------------------------------------------------------------------- argument checks
# Shared with vljepa_fast.integrations. Each returns the normalised value or raises a ValueError
# naming the argument. Numbers may be numpy scalars (numbers.Integral / numbers.Real); bools are
# refused where a number is expected (Python would silently read True as 1).


def _flag(name: str, v: object) -> bool:
    if not _validate.is_bool(v):
        raise ValueError(f"{name}: expected a bool, got {v!r}")
    return bool(v)


def _integer(name: str, v: object, lo: int) -> int:
    if _validate.is_bool(v) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    if int(v) < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {int(v)}")
    return int(v)


def _device(name: str, v: object, types: tuple[str, ...] | None = None) -> torch.device:
    """A device torch can parse; CUDA ones must exist here; ``types`` restricts the kind."""
    if _validate.is_bool(v) or not isinstance(v, (str, int, torch.device)):
        raise ValueError(f"{name}: expected a torch.device or a string like 'cuda:0', got {v!r}")
    try:
        dev = torch.device(v)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: not a device: {v!r} ({e})") from None
    if types is not None and dev.type not in types:
        raise ValueError(f"{name}: expected a {' or '.join(types)} device, got {dev}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(f"{name}: {dev} is not available ({count} CUDA devices)")
    return dev


def _backend(v: object, ops: Iterable[str]) -> str:
    """``"auto"`` or the name of a backend registered for one of ``ops``."""
    names = tuple(dict.fromkeys(b.name for op in ops for b in _backends.records(op)))
    if not isinstance(v, str) or (v != "auto" and v not in names):
        raise ValueError(f"backend: expected 'auto' or one of {names}, got {v!r}")
    return v


def _choice(name: str, v: object, options: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in options:
        raise ValueError(f"{name}: expected one of {options}, got {v!r}")
    return v


# ------------------------------------------------------------------------------ index files
# Layout: _MAGIC, then _HEADER (sha256 of the payload, payload length), then the payload: a
# torch.save archive of {"dim": int, "metric": str, "dtype": str, "vectors": [n, dim] tensor,
# "ids": [n] int64 tensor}, read back with weights_only=True (no code runs on load). Only
# _encode_payload / _decode_payload know the serialiser; _checked_state validates the decoded
# fields whatever wrote them, so moving the payload to another format replaces those two only.

_MAGIC = b"VLJEPA_FAST_INDEX\x00v1\n"
_HEADER = struct.Struct("<32sQ")  # sha256 of the payload, payload length
_FIELDS = ("dim", "metric", "dtype", "vectors", "ids")
_METRICS = ("ip", "cosine")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ID_DTYPES = (
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
)
# |row| of a normalised row after rounding to the storage dtype is at most 1 + this
_UNIT_NORM_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Temporaries are ".<name>.tmp-<pid>-<8 hex>" beside the target; a save in progress is listed
# here so that another thread of this process never removes it.
_TMP_SUFFIX = r"\.tmp-(\d+)-[0-9a-f]{8}"
_TMP_IN_PROGRESS: set[str] = set()
_TMP_LOCK = threading.Lock()
_CLOCK_SLACK_S = 60.0  # mtime vs process start: tolerate this much clock error


class _IndexFileNotFoundError(ValueError, FileNotFoundError):
    """No file at the path given to :meth:`EmbeddingIndex.load` (a ValueError, as every unusable
    index path is, and a FileNotFoundError)."""


def _path(v: object) -> Path:
    if isinstance(v, (str, bytes, os.PathLike)):
        p = os.fsdecode(v)
        if p:
            return Path(p)
    raise ValueError(f"path: expected a non-empty str or os.PathLike file path, got {v!r}")


def _encode_payload(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _decode_payload(name: str, payload: bytes) -> object:
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # any failure of the deserialiser is a malformed file
        raise ValueError(
            f"{name}: malformed index file: the payload is not a weights-only torch archive "
            f"({type(e).__name__}: {e})"
        ) from e


def _checked_state(name: str, state: object) -> tuple[int, str, torch.dtype, Tensor, Tensor]:
    """(dim, metric, dtype, vectors [n, dim], ids [n]) of a decoded payload, every field checked
    on its own and against the others; a ValueError naming the file and the field otherwise."""

    def bad(field: str, msg: str) -> ValueError:
        return ValueError(f"{name}: malformed index file: field {field!r}: {msg}")

    if not isinstance(state, dict):
        raise ValueError(
            f"{name}: malformed index file: expected a dict payload, got {type(state).__name__}"
        )
    for field in _FIELDS:
        if field not in state:
            raise bad(field, "missing")
    extra = [k for k in state if k not in _FIELDS]
    if extra:
        raise ValueError(f"{name}: malformed index file: unexpected field(s) {extra!r}")
    dim, metric, dtype_name = state["dim"], state["metric"], state["dtype"]
    if type(dim) is not int or dim < 1:
        raise bad("dim", f"expected an int >= 1, got {dim!r}")
    if type(metric) is not str or metric not in _METRICS:
        raise bad("metric", f"expected one of {_METRICS}, got {metric!r}")
    if type(dtype_name) is not str or dtype_name not in _DTYPES:
        raise bad("dtype", f"expected one of {tuple(_DTYPES)}, got {dtype_name!r}")
    dtype = _DTYPES[dtype_name]
    tensors = {}
    for field, want_dtype, ndim in (("vectors", dtype, 2), ("ids", torch.int64, 1)):
        t = state[field]
        if not isinstance(t, Tensor):
            raise bad(field, f"expected a tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            raise bad(field, f"expected a dense CPU tensor, got {t.layout} on {t.device}")
        if t.dim() != ndim:
            raise bad(field, f"expected {ndim} dimension(s), got shape {tuple(t.shape)}")
        if t.dtype != want_dtype:
            raise bad(field, f"expected dtype {want_dtype} (the header's), got {t.dtype}")
        if not t.is_contiguous():  # also bounds the copy below by the file's size
            raise bad(field, f"expected a contiguous tensor, got strides {t.stride()}")
        tensors[field] = t.detach()
    vectors, ids = tensors["vectors"], tensors["ids"]
    if vectors.shape[1] != dim:
        raise bad("vectors", f"expected {dim} columns (the header's dim), got {vectors.shape[1]}")
    if ids.shape[0] != vectors.shape[0]:
        raise bad("ids", f"expected {vectors.shape[0]} ids (one per vector), got {ids.shape[0]}")
    if not bool(torch.isfinite(vectors).all()):
        raise bad("vectors", "holds NaN or inf")
    if metric == "cosine" and vectors.shape[0]:
        # add() stores unit rows (a zero row stays zero): any other norm is not from save()
        norms = vectors.float().norm(dim=1)
        off = ((norms - 1).abs() > _UNIT_NORM_TOL[dtype]) & (norms != 0)
        if bool(off.any()):
            norm = norms[off][0].item()
            raise bad("vectors", f"metric 'cosine' stores unit rows, found a row of norm {norm}")
    return dim, metric, dtype, vectors, ids


def _read_index_file(path: Path, name: str) -> bytes:
    """The checked payload of the file at ``path``; ValueErrors name the file as ``name``."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _IndexFileNotFoundError(f"{name}: no such index file") from None
    except IsADirectoryError:
        raise ValueError(f"{name}: not an index file (a directory)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{name}: not an index file (a symlink loop)") from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{name}: not an index file (a directory)")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name}: not an index file (not a regular file)")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        head = len(_MAGIC) + _HEADER.size
        data = f.read(head)
        if len(data) < head or not data.startswith(_MAGIC):
            raise ValueError(f"{name}: not a vljepa_fast EmbeddingIndex file (bad header)")
        digest, length = _HEADER.unpack(data[len(_MAGIC) :])
        size = st.st_size - head
        if size != length:
            raise ValueError(f"{name}: truncated or corrupt index ({size} of {length} bytes)")
        payload = f.read(length + 1)
    if len(payload) != length:  # the file changed under us
        raise ValueError(f"{name}: truncated or corrupt index ({len(payload)} of {length} bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"{name}: corrupt index (checksum mismatch)")
    return payload


def _process_start(pid: int) -> tuple[str, float] | None:
    """(state letter, start time since the epoch) of a live process, from Linux's /proc; None
    where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(ln.split()[1]) for ln in f if ln.startswith(b"btime "))
        return fields[0].decode(), btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _temp_is_stale(tmp: Path, pid: int) -> bool:
    """A temporary left by a save that cannot finish: its writer is dead (or is this process
    and not writing it), or the live process with that pid started after the file was last
    written (the pid was reused)."""
    if pid == os.getpid():
        with _TMP_LOCK:
            return str(tmp) not in _TMP_IN_PROGRESS
    if os.name != "posix":
        return False
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        pass
    proc = _process_start(pid)
    if proc is None:
        return False
    state, started = proc
    if state in ("Z", "X"):  # killed, not yet reaped
        return True
    try:
        return tmp.lstat().st_mtime < started - _CLOCK_SLACK_S
    except OSError:
        return False


def _remove_stale_temps(target: Path) -> None:
    """Delete the stale temporaries of saves of ``target`` (best effort: never fails)."""
    pattern = re.compile(re.escape(f".{target.name}") + _TMP_SUFFIX)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        try:
            if m is None or not entry.is_file(follow_symlinks=False):
                continue
            tmp = Path(entry.path)
            if _temp_is_stale(tmp, int(m.group(1))):
                tmp.unlink()
        except OSError:
            continue


def _save_target(path: Path, name: str) -> Path:
    """The file a save to ``path`` replaces: symlinks are followed (the link stays, its target
    is written); a directory, a device or a symlink loop is refused."""
    target = Path(os.path.realpath(path))
    if target.is_symlink():
        raise ValueError(f"path: {name} is a symlink loop")
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    if stat.S_ISDIR(mode):
        raise ValueError(f"path: {name} is a directory")
    if not stat.S_ISREG(mode):
        raise ValueError(f"path: {name} exists and is not a regular file")
    return target


class EmbeddingIndex:
    """An exact (flat) embedding index searched with the fused top-k kernel (like faiss IndexFlat).

    Vectors live in one growing [capacity, dim] buffer on ``device`` (capacity doubles, so ``add``
    is amortised O(rows)). With metric "cosine" rows are L2-normalised when added (a zero row stays
    zero and scores 0) and searched by inner product. Stored rows and queries must be finite in
    the storage dtype (NaN, inf and values that overflow it are refused).

    Args:
        dim: embedding dimension D >= 1.
        metric: "ip" (inner product) or "cosine".
        dtype: storage dtype (float32, float16 or bfloat16); default float32.
        device: storage device, CPU or an available CUDA device; default CPU.
        backend: "auto" or a :func:`vljepa_fast.topk_similarity` backend name.

    Raises:
        ValueError: a malformed argument (named in the message).
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
        dim = _integer("dim", dim, 1)
        metric = _choice("metric", metric, _METRICS)
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values():
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
        self.dim, self.metric, self.dtype = dim, metric, dtype
        self.backend = _backend(backend, ("topk_similarity",))
        self.device = _device("device", "cpu" if device is None else device, ("cpu", "cuda"))
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

    def _finite_rows(self, name: str, rows: Tensor, what: str) -> None:
        bad = ~torch.isfinite(rows).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}: {what} {i} holds NaN or inf, or a value beyond the range of {self.dtype}"
            )

    def add(self, x: Tensor, ids: Tensor | None = None) -> None:
        """Append rows (nothing is stored if an argument is refused).

        Args:
            x: [n, dim] floating tensor (any device and float dtype; converted to the index's),
                finite in the index's dtype.
            ids: [n] integer tensor (int8/16/32/64, uint8/16/32; any device), stored as int64;
                default len(self) + arange(n), as faiss does. Duplicates are allowed.

        Raises:
            ValueError: a malformed argument (named in the message).
        """
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a [n, {self.dim}] tensor, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating tensor, got {x.dtype}")
        n = x.shape[0]
        if ids is None:
            ids = torch.arange(self._count, self._count + n, device=self.device)
        elif not isinstance(ids, Tensor) or ids.shape != (n,) or ids.dtype not in _ID_DTYPES:
            got = (
                f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            )
            raise ValueError(
                f"ids: expected an integer tensor of shape [{n}] (int8/16/32/64 or "
                f"uint8/16/32), got {got}"
            )
        rows = x.detach().to(self.device, torch.float32)
        if self.metric == "cosine":
            rows = F.normalize(rows, dim=1, eps=reference.NORM_EPS)
        rows = rows.to(self.dtype)
        self._finite_rows("x", rows, "row")
        self._reserve(self._count + n)
        self._vectors[self._count : self._count + n] = rows
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
            q: [Q, dim] or [dim] floating queries (converted to the index's device and dtype;
                finite there). Q may be 0.
            k: int (numpy ints too), 1 <= k <= len(self).

        Returns:
            (scores [Q, k] float32 sorted descending, ids [Q, k] int64), faiss's order; a 1-D
            query gives [k] results.

        Raises:
            ValueError: a malformed argument (named in the message), or the index is empty.
        """
        if len(self) == 0:
            raise ValueError("search: the index is empty (add vectors first)")
        if not isinstance(q, Tensor) or q.dim() not in (1, 2) or q.shape[-1] != self.dim:
            got = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(f"q: expected a [Q, {self.dim}] or [{self.dim}] tensor, got {got}")
        if not q.is_floating_point():
            raise ValueError(f"q: expected a floating tensor, got {q.dtype}")
        bad_k = _validate.is_bool(k) or not isinstance(k, numbers.Integral)
        if bad_k or not 1 <= int(k) <= len(self):
            raise ValueError(f"k: expected in [1, {len(self)}] (k <= len(index)), got {k!r}")
        k = int(k)
        single = q.dim() == 1
        queries = q.detach().reshape(-1, self.dim).to(self.device, torch.float32)
        if self.metric == "cosine":  # stored rows are unit already: inner product is the cosine
            queries = F.normalize(queries, dim=1, eps=reference.NORM_EPS)
        queries = queries.to(self.dtype).contiguous()
        self._finite_rows("q", queries, "query")
        if queries.shape[0] == 0:
            return (
                torch.empty(0, k, device=self.device),
                torch.empty(0, k, dtype=torch.long, device=self.device),
            )
        scores, rows = functional.topk_similarity(queries, self.vectors, k, backend=self.backend)
        ids = self._ids[rows]
        return (scores[0], ids[0]) if single else (scores, ids)

    def to(self, device: torch.device | str) -> EmbeddingIndex:
        """Move the storage to ``device`` (CPU or an available CUDA device; in place); return
        self."""
        self.device = _device("device", device, ("cpu", "cuda"))
        self._vectors = self.vectors.to(self.device)
        self._ids = self.ids.to(self.device)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically: a temporary file beside it
        (``.<name>.tmp-<pid>-<random>``), fsync, rename over ``path``, fsync of the directory.

        The file gets the permissions of a new file under the process umask (0o666 & ~umask).
        If ``path`` is a symlink, the file it points to is replaced and the link kept (a
        dangling link's target is created). Temporaries of earlier saves of the same file that
        can never finish (their process is gone, e.g. killed mid-write) are deleted first.

        Raises:
            ValueError: ``path`` is not a path, or names a directory, a device, a FIFO or a
                symlink loop.
            OSError: the file cannot be written (its directory is missing, permissions, disk).
        """
        p = _path(path)
        target = _save_target(p, str(p))
        payload = _encode_payload(
            {
                "dim": self.dim,
                "metric": self.metric,
                "dtype": str(self.dtype).removeprefix("torch."),
                # copies: a view would save the whole capacity buffer
                "vectors": self.vectors.to("cpu", copy=True),
                "ids": self.ids.to("cpu", copy=True),
            }
        )
        if not target.parent.is_dir():  # else the error would name the hidden temporary file
            raise FileNotFoundError(
                errno.ENOENT, f"EmbeddingIndex.save: the folder of {str(p)!r} does not exist",
                str(target.parent),
            )
        _remove_stale_temps(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        with _TMP_LOCK:
            _TMP_IN_PROGRESS.add(str(tmp))
        try:
            fd = os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_MAGIC + _HEADER.pack(hashlib.sha256(payload).digest(), len(payload)))
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        finally:
            with _TMP_LOCK:
                _TMP_IN_PROGRESS.discard(str(tmp))
        dir_fd = os.open(target.parent, os.O_RDONLY)
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
        """Read an index written by :meth:`save` (no code in the file is ever run).

        Every field is checked: the header (magic, length, sha256 of the payload), then the
        payload's fields on their own and against each other (dim, metric, dtype, [n, dim]
        vectors of that dtype, finite, unit rows under "cosine", [n] int64 ids). Stale
        temporaries of killed saves of this file are deleted (as :meth:`save` does).

        Args:
            path: the file (symlinks are followed).
            device, backend: as the constructor.

        Raises:
            ValueError: a malformed argument, or the file is missing (the error is then also a
                FileNotFoundError), not a regular file, not an index, truncated, corrupt
                (checksum mismatch) or malformed (the message names the file and the field).
            OSError: the file exists but cannot be read (permissions, I/O).
        """
        p = _path(path)
        dev = _device("device", "cpu" if device is None else device, ("cpu", "cuda"))
        _backend(backend, ("topk_similarity",))
        _remove_stale_temps(Path(os.path.realpath(p)))
        name = str(p)
        dim, metric, dtype, vectors, ids = _checked_state(
            name, _decode_payload(name, _read_index_file(p, name))
        )
        index = cls(dim, metric, dtype, dev, backend=backend)
        n = ids.shape[0]
        index._reserve(n)
        index._vectors[:n] = vectors
        index._ids[:n] = ids
        index._count = n
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
        rope_theta: RoPE frequency base, a finite number > 1 (500000).
        rope_scaling: transformers' ``rope_scaling`` dict (default Llama 3.2's "llama3" scaling:
            factor 32, low 1, high 4, original 8192) or None for plain RoPE.
        max_position_embeddings: positions must be below this (131072).
        causal: lower-triangular mask on top of the key padding (the VL-JEPA predictor: False).
        backend: "auto" or a :func:`vljepa_fast.attention` backend name; rotary runs on its
            eager reference when this is "reference", else on "auto".
        device: parameter device.
        dtype: parameter dtype (float32, float16, bfloat16 or float64).

    Ints accept numpy integers; bools are refused where numbers are expected.

    Raises:
        ValueError: a malformed argument (named in the message).
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
        hidden_size = _integer("hidden_size", hidden_size, 1)
        num_heads = _integer("num_heads", num_heads, 1)
        num_kv_heads = _integer("num_kv_heads", num_kv_heads, 1)
        head_dim = _integer("head_dim", head_dim, 1)
        max_position_embeddings = _integer("max_position_embeddings", max_position_embeddings, 1)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: must divide num_heads ({num_heads}), got {num_kv_heads}"
            )
        if head_dim % 2:
            raise ValueError(f"head_dim: expected an even head dim (RoPE pairs), got {head_dim}")
        if dtype is not None and dtype not in _validate.FLOAT_DTYPES:
            raise ValueError(
                f"dtype: expected float32, float16, bfloat16 or float64 (or None), got {dtype!r}"
            )
        if device is not None:
            device = _device("device", device)
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = _validate.number("rope_theta", rope_theta, above=1.0)
        self.rope_scaling = check_rope_scaling(rope_scaling)
        self.max_position_embeddings = max_position_embeddings
        self.causal = _flag("causal", causal)
        self.backend = _backend(backend, ("attention",))
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

    def _check_positions(self, position_ids: object, hidden: Tensor) -> Tensor:
        B, L, _ = hidden.shape
        if not isinstance(position_ids, Tensor):
            raise ValueError(
                f"position_ids: expected an integer tensor, got {type(position_ids).__name__}"
            )
        if position_ids.dtype not in _ID_DTYPES:
            raise ValueError(f"position_ids: expected an integer tensor, got {position_ids.dtype}")
        if position_ids.shape not in ((L,), (B, L)):
            raise ValueError(
                f"position_ids: expected [B, L] or [L] = {(B, L)}, got {tuple(position_ids.shape)}"
            )
        if position_ids.device != hidden.device:
            raise ValueError(
                f"position_ids: expected device {hidden.device} (hidden's), got "
                f"{position_ids.device}"
            )
        if not torch.compiler.is_compiling():  # one host sync; not inside a compiled graph
            lo, hi = torch.aminmax(position_ids.to(torch.int64))
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.max_position_embeddings:
                raise ValueError(
                    f"position_ids: expected values in [0, {self.max_position_embeddings}) "
                    f"(max_position_embeddings), got values in [{lo}, {hi}]"
                )
        return position_ids

    def forward(
        self,
        hidden: Tensor,
        key_padding_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Attend over the sequence.

        Args:
            hidden: [B, L, hidden_size], B, L >= 1, on the parameters' device and in their
                dtype (any float dtype under torch.autocast).
            key_padding_mask: [B, L] bool, True = a real token; PAD keys take no part (a PAD
                query still gets an output, from the real keys). None: every token is real.
            position_ids: [B, L] or [L] integer positions for RoPE on hidden's device, each in
                [0, max_position_embeddings) (checked eagerly, one host sync; not checked inside
                torch.compile); default 0..L-1.

        Returns:
            [B, L, hidden_size].

        Raises:
            ValueError: a malformed argument (named in the message).
        """
        H = self.hidden_size
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[-1] != H:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"hidden: expected [B, L, {self.hidden_size}], got {got}")
        weight = self.q_proj.weight
        if hidden.dtype != weight.dtype or hidden.device != weight.device:
            try:  # under autocast the projections cast; its absence on meta & co. is an error
                autocast = torch.is_autocast_enabled(hidden.device.type)
            except RuntimeError:
                autocast = False
            if hidden.device != weight.device or not autocast:
                raise ValueError(
                    f"hidden: expected {weight.dtype} on {weight.device} (the parameters'), got "
                    f"{hidden.dtype} on {hidden.device}"
                )
        B, L, _ = hidden.shape
        if B == 0 or L == 0:
            raise ValueError(f"hidden: expected B, L >= 1, got shape {tuple(hidden.shape)}")
        if position_ids is None:
            if L > self.max_position_embeddings:
                raise ValueError(
                    f"hidden: {L} tokens exceed max_position_embeddings "
                    f"({self.max_position_embeddings})"
                )
            position_ids = torch.arange(L, device=hidden.device)
        else:
            position_ids = self._check_positions(position_ids, hidden)
        cos, sin = rotary_cos_sin(
            position_ids,
            self.head_dim,
            theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            # float64 modules keep float64 angles (fp32 tables cost them 1e-8 of accuracy)
            dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
        )
        q = self.q_proj(hidden).view(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(B, L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(B, L, self.num_kv_heads, self.head_dim)
        rot = "reference" if self.backend == "reference" else "auto"
        q, k = apply_rotary(q, k, cos, sin, layout="llama", backend=rot)
        out = functional.attention(
            q, k, v, key_padding_mask=key_padding_mask, causal=self.causal, backend=self.backend
        )
        return self.o_proj(out.reshape(B, L, self.num_heads * self.head_dim))


class InfoNCELoss(torch.nn.Module):
    """Bidirectional InfoNCE on the fused kernels (:func:`vljepa_fast.infonce_loss`) as a module.

    Args:
        temperature: the fixed temperature, or the initial one when learnable: a positive finite
            number (numpy scalars too; not a bool). When learnable it must be at least
            ``1 / max_logit_scale`` (the clamp would otherwise change it at once).
        learnable_temperature: learn ``logit_scale = log(1 / temperature)`` (CLIP convention);
            the scale used is ``exp(logit_scale)`` clamped at ``max_logit_scale``.
        max_logit_scale: the clamp of the learned scale, a number > 0 (CLIP: 100; inf: none).
        symmetric: both directions (bool).
        reduction: "mean", "sum" or "none".
        group, backend: as :func:`vljepa_fast.infonce_loss` (backend: "auto" or one of its
            backend names).

    Shapes:
        forward(pred [N, D], target [N, D]) -> scalar float32 (or [N] with reduction "none").

    Raises:
        ValueError: a malformed argument (named in the message).
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
        self.temperature = _validate.number("temperature", temperature, above=0.0)
        if not self.temperature >= MIN_TEMPERATURE:  # the range vf.infonce_loss serves
            raise ValueError(
                f"temperature: expected a value >= 2**-60 (about 8.7e-19, the smallest that "
                f"vf.infonce_loss serves), got {self.temperature:g}"
            )
        learnable = _flag("learnable_temperature", learnable_temperature)
        self.max_logit_scale = _validate.number(
            "max_logit_scale", max_logit_scale, above=0.0, allow_inf=True
        )
        self.symmetric = _flag("symmetric", symmetric)
        self.reduction = _choice("reduction", reduction, ("mean", "sum", "none"))
        self.group = group
        self.backend = _backend(backend, ("infonce_loss",))
        if learnable:
            scale = 1.0 / self.temperature
            if not scale <= self.max_logit_scale:
                raise ValueError(
                    f"temperature: a learnable temperature starts at or above 1 / max_logit_scale "
                    f"= {1.0 / self.max_logit_scale:g} (the clamp), got {self.temperature:g}"
                )
            self.logit_scale = torch.nn.Parameter(torch.tensor(scale).log())
        else:
            self.register_parameter("logit_scale", None)

    def current_temperature(self) -> float | Tensor:
        """The temperature the next forward uses (a 0-dim tensor when learnable)."""
        if self.logit_scale is None:
            return self.temperature
        return 1.0 / self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        temperature = self.current_temperature()
        if isinstance(temperature, Tensor) and isinstance(pred, Tensor):
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
