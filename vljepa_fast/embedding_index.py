"""An exact (flat) embedding index searched with the fused top-k op, and its file format.

``vljepa_fast.nn.EmbeddingIndex`` is this module's :class:`EmbeddingIndex`. Storage, search and
files live here; the search itself is :func:`vljepa_fast.functional.topk_similarity`.

File format, version 2 (what :meth:`EmbeddingIndex.save` writes): a safetensors file
(https://huggingface.co/docs/safetensors: an 8-byte little-endian header length, a JSON header,
then the raw tensor bytes; nothing in it can run code on load). Tensors:

* ``vectors``: [count, dim], the storage dtype (F32, F16 or BF16), unit rows under "cosine";
* ``ids``: [count], I64.

The header's ``__metadata__`` (strings only) holds exactly :data:`_META_FIELDS`: ``format``
(``"vljepa_fast.EmbeddingIndex"``), ``version`` (``"2"``), ``dim``, ``metric``, ``dtype``
(``"float32"``, ``"float16"``, ``"bfloat16"``), ``count`` (decimal integers), and the sha256 of
each tensor's bytes (``sha256_vectors``, ``sha256_ids``, lowercase hex). The loader reads the
header itself (strict JSON: duplicate keys refused), checks the file size against it, the
checksums, then every field on its own and against the others, and only then lets safetensors
decode the tensors.

Version 1 (the format of earlier releases: a magic line, sha256 and length, then a torch.save
archive) is still read, with a DeprecationWarning: call ``save()`` on the loaded index to
rewrite the file as version 2. Its pickle is never unpickled: :func:`_v1_interpret` walks the
opcodes (``pickletools.genops`` only decodes them) and builds nothing but numbers, strings,
tuples, lists, dicts and tensors from the archive's storages; any other global is refused.
Neither version is read with ``torch.load`` or ``pickle``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import numbers
import os
import pickletools
import re
import secrets
import stat
import struct
import threading
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor

from vljepa_fast import _backends, _validate, functional, reference

__all__ = ["EmbeddingIndex", "IndexFileNotFoundError"]

_METRICS = ("ip", "cosine")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# |row| of a normalised row after rounding to the storage dtype is at most 1 + this
_UNIT_NORM_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# ------------------------------------------------------------------------ version 2 (safetensors)
_FORMAT = "vljepa_fast.EmbeddingIndex"
_VERSION = "2"
_TENSORS = ("vectors", "ids")
_META_FIELDS = (
    "format",
    "version",
    "dim",
    "metric",
    "dtype",
    "count",
    "sha256_vectors",
    "sha256_ids",
)
_HEADER_LEN = struct.Struct("<Q")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")  # at most 19 digits: int() never gets a huge string

# --------------------------------------------------------------------- version 1 (read only)
# _V1_MAGIC, then _V1_HEADER (sha256 of the payload, payload length), then the payload: a
# torch.save zip archive of {"dim": int, "metric": str, "dtype": str, "vectors": [n, dim]
# tensor, "ids": [n] int64 tensor}.
_V1_MAGIC = b"VLJEPA_FAST_INDEX\x00v1\n"
_V1_HEADER = struct.Struct("<32sQ")
_V1_FIELDS = ("dim", "metric", "dtype", "vectors", "ids")
_V1_STORAGES = {
    "Float": torch.float32,
    "Half": torch.float16,
    "BFloat16": torch.bfloat16,
    "Double": torch.float64,
    "Long": torch.int64,
    "Int": torch.int32,
    "Short": torch.int16,
    "Char": torch.int8,
    "Byte": torch.uint8,
    "Bool": torch.bool,
}

# ----------------------------------------------------------------------------- atomic saves
# Temporaries are ".<name>.tmp-<pid>-<8 hex>" beside the target; a save in progress is listed
# here so that another thread of this process never removes it.
_TMP_SUFFIX = r"\.tmp-(\d+)-[0-9a-f]{8}"
_TMP_IN_PROGRESS: set[str] = set()
_TMP_LOCK = threading.Lock()
_CLOCK_SLACK_S = 60.0  # mtime vs process start: tolerate this much clock error


class IndexFileNotFoundError(ValueError, FileNotFoundError):
    """No file at the path given to :meth:`EmbeddingIndex.load` (a ValueError, as every unusable
    index path is, and a FileNotFoundError)."""


def _path(v: object) -> Path:
    if isinstance(v, (str, bytes, os.PathLike)):
        p = os.fsdecode(v)
        if p:
            return Path(p)
    raise ValueError(f"path: expected a non-empty str or os.PathLike file path, got {v!r}")


# ------------------------------------------------------------------------ validation (both)


def _malformed(name: str, field: str, msg: str) -> ValueError:
    return ValueError(f"{name}: malformed index file: field {field!r}: {msg}")


def _bad_header(name: str, why: str = "") -> ValueError:
    more = f": {why}" if why else ""
    return ValueError(f"{name}: not a vljepa_fast EmbeddingIndex file (bad header{more})")


def _truncated(name: str, got: int, want: int, what: str = "bytes") -> ValueError:
    return ValueError(f"{name}: truncated or corrupt index ({got} of {want} {what})")


def _exact_keys(name: str, mapping: dict, expected: tuple[str, ...], what: str) -> None:
    for key in expected:
        if key not in mapping:
            raise _malformed(name, key, "missing")
    extra = [k for k in mapping if k not in expected]
    if extra:
        raise ValueError(f"{name}: malformed index file: unexpected {what}(s) {extra!r}")


def _checked_state(
    name: str, dim: object, metric: object, dtype_name: object, vectors: object, ids: object
) -> tuple[int, str, torch.dtype, Tensor, Tensor]:
    """(dim, metric, dtype, vectors [n, dim], ids [n]) of a decoded file (either version), every
    field checked on its own and against the others; a ValueError naming the file and the field
    otherwise."""
    if type(dim) is not int or dim < 1:
        raise _malformed(name, "dim", f"expected an int >= 1, got {dim!r}")
    if type(metric) is not str or metric not in _METRICS:
        raise _malformed(name, "metric", f"expected one of {_METRICS}, got {metric!r}")
    if type(dtype_name) is not str or dtype_name not in _DTYPES:
        raise _malformed(name, "dtype", f"expected one of {tuple(_DTYPES)}, got {dtype_name!r}")
    dtype = _DTYPES[dtype_name]
    tensors = {}
    for field, t, want_dtype, ndim in (
        ("vectors", vectors, dtype, 2),
        ("ids", ids, torch.int64, 1),
    ):
        if not isinstance(t, Tensor):
            raise _malformed(name, field, f"expected a tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            raise _malformed(
                name, field, f"expected a dense CPU tensor, got {t.layout} on {t.device}"
            )
        if t.dim() != ndim:
            raise _malformed(
                name, field, f"expected {ndim} dimension(s), got shape {tuple(t.shape)}"
            )
        if t.dtype != want_dtype:
            raise _malformed(
                name, field, f"expected dtype {want_dtype} (the header's), got {t.dtype}"
            )
        if not t.is_contiguous():
            raise _malformed(name, field, f"expected a contiguous tensor, got strides {t.stride()}")
        tensors[field] = t.detach()
    vectors, ids = tensors["vectors"], tensors["ids"]
    if vectors.shape[1] != dim:
        raise _malformed(
            name, "vectors", f"expected {dim} columns (the header's dim), got {vectors.shape[1]}"
        )
    if ids.shape[0] != vectors.shape[0]:
        raise _malformed(
            name, "ids", f"expected {vectors.shape[0]} ids (one per vector), got {ids.shape[0]}"
        )
    if not bool(torch.isfinite(vectors).all()):
        raise _malformed(name, "vectors", "holds NaN or inf")
    if metric == "cosine" and vectors.shape[0]:
        # add() stores unit rows (a zero row stays zero): any other norm is not from save()
        norms = vectors.float().norm(dim=1)
        off = ((norms - 1).abs() > _UNIT_NORM_TOL[dtype]) & (norms != 0)
        if bool(off.any()):
            norm = norms[off][0].item()
            raise _malformed(
                name, "vectors", f"metric 'cosine' stores unit rows, found a row of norm {norm}"
            )
    return dim, metric, dtype, vectors, ids


# ------------------------------------------------------------------------------- version 2


def _tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _encode(dim: int, metric: str, dtype: torch.dtype, vectors: Tensor, ids: Tensor) -> bytes:
    """The version-2 file of these (CPU, contiguous) tensors."""
    tensors = {"vectors": vectors, "ids": ids}
    metadata = {
        "format": _FORMAT,
        "version": _VERSION,
        "dim": str(dim),
        "metric": metric,
        "dtype": str(dtype).removeprefix("torch."),
        "count": str(ids.shape[0]),
        **{f"sha256_{k}": _tensor_sha256(t) for k, t in tensors.items()},
    }
    return safetensors.torch.save(tensors, metadata)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def _v2_header(name: str, data: bytes) -> tuple[dict, dict, int]:
    """(metadata, tensor entries, offset of the data) of a version-2 file, the file's size
    checked against the header's offsets."""
    if len(data) < _HEADER_LEN.size:
        raise _bad_header(name)
    (n,) = _HEADER_LEN.unpack_from(data)
    if n > _MAX_HEADER:
        raise _bad_header(name, f"a JSON header of {n} bytes")
    start = _HEADER_LEN.size + n
    if start > len(data):
        raise _truncated(name, len(data), start, "bytes of header")
    try:
        header = json.loads(data[_HEADER_LEN.size : start].decode(), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad_header(name, f"the header is not JSON ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise _bad_header(name, f"no __metadata__ with format {_FORMAT!r}")
    if meta.get("version") != _VERSION:
        raise ValueError(
            f"{name}: unsupported EmbeddingIndex file version {meta.get('version')!r} (this "
            f"vljepa_fast reads version {_VERSION}, and version 1 for compatibility)"
        )
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for key, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _malformed(name, key, f"expected data_offsets [begin, end], got {offsets!r}")
        end = max(end, offsets[1])
    if start + end != len(data):
        raise _truncated(name, len(data) - start, end, "bytes of tensor data")
    return meta, entries, start


def _decimal(name: str, field: str, v: object, lo: int) -> int:
    if not isinstance(v, str) or not _DECIMAL.fullmatch(v) or int(v) < lo:
        raise _malformed(name, field, f"expected the decimal digits of an int >= {lo}, got {v!r}")
    return int(v)


def _read_v2(name: str, data: bytes) -> tuple[int, str, torch.dtype, Tensor, Tensor]:
    meta, entries, start = _v2_header(name, data)
    _exact_keys(name, meta, _META_FIELDS, "field")
    _exact_keys(name, entries, _TENSORS, "tensor")
    view = memoryview(data)
    for field in _TENSORS:
        want = meta[f"sha256_{field}"]
        if not isinstance(want, str) or not _SHA256.fullmatch(want):
            raise _malformed(
                name, f"sha256_{field}", f"expected 64 lowercase hex digits, got {want!r}"
            )
        begin, end = entries[field]["data_offsets"]
        if hashlib.sha256(view[start + begin : start + end]).hexdigest() != want:
            raise ValueError(f"{name}: corrupt index (checksum mismatch in {field!r})")
    dim = _decimal(name, "dim", meta["dim"], 1)
    count = _decimal(name, "count", meta["count"], 0)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # any failure of the decoder is a malformed file
        raise ValueError(
            f"{name}: malformed index file: safetensors cannot decode it ({type(e).__name__}: {e})"
        ) from e
    state = _checked_state(
        name, dim, meta["metric"], meta["dtype"], tensors["vectors"], tensors["ids"]
    )
    if state[4].shape[0] != count:
        raise _malformed(name, "count", f"the file holds {state[4].shape[0]} rows, not {count}")
    return state


# ------------------------------------------------------------------------------- version 1


class _Refused(Exception):
    """Something a version-1 payload may not hold (turned into a ValueError naming the file)."""


@dataclass(frozen=True)
class _V1Global:
    what: str  # "rebuild", "ordered_dict" or "storage"
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class _V1Tensor:
    """A _rebuild_tensor_v2 call, checked and materialised per field by :func:`_v1_tensor`."""

    storage: Tensor  # 1-D, the whole storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _v1_global(arg: str) -> _V1Global:
    module, _, attr = arg.partition(" ")
    if (module, attr) == ("torch._utils", "_rebuild_tensor_v2"):
        return _V1Global("rebuild")
    if (module, attr) == ("collections", "OrderedDict"):
        return _V1Global("ordered_dict")
    if module == "torch" and attr.endswith("Storage") and attr[: -len("Storage")] in _V1_STORAGES:
        return _V1Global("storage", _V1_STORAGES[attr[: -len("Storage")]])
    raise _Refused(
        f"the payload names {arg!r}, which is not a tensor, a number or a string "
        "(nothing in an index file is ever run)"
    )


def _ints(v: object) -> bool:
    return isinstance(v, tuple) and all(type(x) is int and x >= 0 for x in v)


def _empty(v: object) -> bool:
    return isinstance(v, dict) and not v


def _v1_reduce(fn: object, args: object) -> object:
    what = fn.what if isinstance(fn, _V1Global) else None
    if what == "ordered_dict" and isinstance(args, tuple) and not args:
        return {}
    if what == "rebuild" and isinstance(args, tuple) and len(args) in (6, 7):
        storage, offset, size, stride, requires_grad, hooks = args[:6]
        if (
            isinstance(storage, Tensor)
            and type(offset) is int
            and offset >= 0
            and _ints(size)
            and _ints(stride)
            and len(size) == len(stride)
            and type(requires_grad) is bool
            and _empty(hooks)
            and (len(args) == 6 or args[6] is None or _empty(args[6]))
        ):
            return _V1Tensor(storage, offset, size, stride)
    raise _Refused(
        f"the payload calls {what or type(fn).__name__!r} with arguments an index never holds"
    )


def _v1_interpret(pkl: bytes, storage: Callable[[object], Tensor]) -> object:
    """The object a torch.save pickle describes, built by walking its opcodes: only the ones a
    dict of numbers, strings and tensors needs; tensors come from ``storage(persistent id)``."""
    stack: list = []
    marks: list[list] = []
    memo: dict = {}

    def since_mark() -> list:
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    for op, arg, _ in pickletools.genops(pkl):
        code = op.name
        if code in ("PROTO", "FRAME"):
            continue
        if code in (
            "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BININT", "BININT1", "BININT2",
            "LONG1", "BINFLOAT",
        ):  # fmt: skip
            stack.append(arg)
        elif code in ("NEWTRUE", "NEWFALSE", "NONE"):
            stack.append({"NEWTRUE": True, "NEWFALSE": False, "NONE": None}[code])
        elif code in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"):
            stack.append({"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple}[code]())
        elif code == "MARK":
            marks.append(stack)
            stack = []
        elif code == "TUPLE":
            items = tuple(since_mark())  # before naming ``stack``: since_mark rebinds it
            stack.append(items)
        elif code in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(code[-1])
            if len(stack) < n:
                raise _Refused(f"{code} on a stack of {len(stack)}")
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif code in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif code == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif code in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif code == "GLOBAL":
            stack.append(_v1_global(arg))
        elif code == "BINPERSID":
            stack.append(storage(stack.pop()))
        elif code == "REDUCE":
            args = stack.pop()
            stack.append(_v1_reduce(stack.pop(), args))
        elif code in ("SETITEM", "SETITEMS"):
            items = [stack.pop(-2), stack.pop()] if code == "SETITEM" else since_mark()
            if not isinstance(stack[-1], dict) or len(items) % 2:
                raise _Refused(f"{code} on a {type(stack[-1]).__name__}")
            stack[-1].update(zip(items[::2], items[1::2]))
        elif code in ("APPEND", "APPENDS"):
            items = [stack.pop()] if code == "APPEND" else since_mark()
            if not isinstance(stack[-1], list):
                raise _Refused(f"{code} on a {type(stack[-1]).__name__}")
            stack[-1].extend(items)
        elif code == "STOP":
            if len(stack) != 1 or marks:
                raise _Refused(f"STOP with a stack of {len(stack)} and {len(marks)} marks")
            return stack[0]
        else:
            raise _Refused(f"the payload uses the pickle opcode {code}, which an index never holds")
    raise _Refused("the pickle ends without STOP")


def _v1_storages(zf: zipfile.ZipFile, prefix: str) -> Callable[[object], Tensor]:
    """The ``storage(persistent id)`` of :func:`_v1_interpret` for one archive."""
    loaded: dict[str, Tensor] = {}

    def storage(pid: object) -> Tensor:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _V1Global)
            and pid[1].what == "storage"
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise _Refused(f"a persistent id that is not a tensor storage: {pid!r}")
        _, kind, key, _location, numel = pid
        if key not in loaded:
            info = zf.getinfo(f"{prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _Refused(f"storage {key!r} is compressed (torch.save never compresses)")
            raw = zf.read(info)
            size = torch.empty(0, dtype=kind.dtype).element_size()
            if len(raw) != numel * size:
                raise _Refused(f"storage {key!r} holds {len(raw)} bytes, not {numel} x {size}")
            loaded[key] = (
                torch.frombuffer(bytearray(raw), dtype=kind.dtype)
                if raw
                else torch.empty(0, dtype=kind.dtype)
            )
        t = loaded[key]
        if t.dtype != kind.dtype or t.numel() != numel:
            raise _Refused(f"storage {key!r} is read as two different storages")
        return t

    return storage


def _v1_tensor(name: str, field: str, v: object) -> object:
    """A tensor of a version-1 payload, its layout checked before anything is allocated."""
    if not isinstance(v, _V1Tensor):
        return v
    numel = math.prod(v.size)
    expected = 1
    for n, s in zip(reversed(v.size), reversed(v.stride)):
        if numel and n != 1 and s != expected:
            raise _malformed(name, field, f"expected a contiguous tensor, got strides {v.stride}")
        expected *= n
    if v.offset + numel > v.storage.numel():
        raise _malformed(name, field, f"its {numel} elements run past the end of its storage")
    return v.storage[v.offset : v.offset + numel].view(v.size)


def _read_v1(name: str, data: bytes) -> tuple[int, str, torch.dtype, Tensor, Tensor]:
    head = len(_V1_MAGIC) + _V1_HEADER.size
    if len(data) < head:
        raise _bad_header(name)
    digest, length = _V1_HEADER.unpack_from(data, len(_V1_MAGIC))
    if len(data) - head != length:
        raise _truncated(name, len(data) - head, length)
    payload = data[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"{name}: corrupt index (checksum mismatch)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(payload))
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise _Refused(f"expected one <archive>/data.pkl record, found {len(pkl)}")
        prefix = pkl[0].removesuffix("data.pkl")
        if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder") != b"little":
            raise _Refused("not a little-endian archive")
        state = _v1_interpret(zf.read(pkl[0]), _v1_storages(zf, prefix))
    except _Refused as e:
        raise ValueError(f"{name}: malformed index file: {e}") from None
    except Exception as e:  # a malformed archive or pickle (zipfile, genops, the stack walk)
        raise ValueError(
            f"{name}: malformed index file: the payload is not a torch.save archive of an index "
            f"({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(
            f"{name}: malformed index file: expected a dict payload, got {type(state).__name__}"
        )
    _exact_keys(name, state, _V1_FIELDS, "field")
    return _checked_state(
        name,
        state["dim"],
        state["metric"],
        state["dtype"],
        _v1_tensor(name, "vectors", state["vectors"]),
        _v1_tensor(name, "ids", state["ids"]),
    )


# --------------------------------------------------------------------------- reading files


def _read_file(path: Path, name: str) -> bytes:
    """The bytes of the regular file at ``path``; ValueErrors name the file as ``name``."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise IndexFileNotFoundError(f"{name}: no such index file") from None
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
        data = f.read(st.st_size + 1)
    if len(data) != st.st_size:  # the file changed under us
        raise _truncated(name, len(data), st.st_size)
    return data


# --------------------------------------------------------------------------- writing files


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


def _write_atomically(path: Path, target: Path, data: bytes) -> None:
    """``data`` into ``target`` (the file ``path`` names) through a temporary beside it."""
    if not target.parent.is_dir():  # else the error would name the hidden temporary file
        raise FileNotFoundError(
            errno.ENOENT,
            f"EmbeddingIndex.save: the folder of {str(path)!r} does not exist",
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
                f.write(data)
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


# ------------------------------------------------------------------------------------ index


class EmbeddingIndex(_backends.HoldsBackend):
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
        backend: a :data:`~vljepa_fast._backends.BackendSpec` ("auto", a backend name, or
            {op name: name}) passed unchanged to :func:`vljepa_fast.topk_similarity` (op
            "topk_similarity"); a name that op does not have is refused here (ValueError).

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
        backend: _backends.BackendSpec = "auto",
    ) -> None:
        dim = _validate.integer("dim", dim, 1)
        metric = _validate.choice("metric", metric, _METRICS)
        dtype = torch.float32 if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values():
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
        self.dim, self.metric, self.dtype = dim, metric, dtype
        self.backend = _backends.check_spec(backend, ops=("topk_similarity",))
        self.device = _validate.device(
            "device", "cpu" if device is None else device, ("cpu", "cuda")
        )
        self.reset()

    def reset(self) -> None:
        """Remove every vector."""
        self._vectors = torch.empty(0, self.dim, dtype=self.dtype, device=self.device)
        self._ids = torch.empty(0, dtype=torch.long, device=self.device)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def ntotal(self) -> int:
        """The number of stored vectors (faiss's name; = ``len(index)``); read-only."""
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
        elif (
            not isinstance(ids, Tensor)
            or ids.shape != (n,)
            or ids.dtype not in _validate.INT_DTYPES
        ):
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
            BackendUnavailableError: the backend asked for cannot serve the search.
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
        self.device = _validate.device("device", device, ("cpu", "cuda"))
        self._vectors = self.vectors.to(self.device)
        self._ids = self.ids.to(self.device)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` as a safetensors file (format version 2, see the module
        docstring), atomically: a temporary file beside it (``.<name>.tmp-<pid>-<random>``),
        fsync, rename over ``path``, fsync of the directory; the temporary is removed if any
        step fails.

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
        data = _encode(
            self.dim,
            self.metric,
            self.dtype,
            # copies: a view would save the whole capacity buffer
            self.vectors.to("cpu", copy=True),
            self.ids.to("cpu", copy=True),
        )
        _write_atomically(p, target, data)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: torch.device | str | None = None,
        *,
        backend: _backends.BackendSpec = "auto",
    ) -> EmbeddingIndex:
        """Read an index written by :meth:`save` (no code in the file is ever run).

        Every field is checked: the header (format, version, the file's size against the
        header's offsets, the sha256 of each tensor), then the fields on their own and against
        each other (dim, metric, dtype, count, [count, dim] vectors of that dtype, finite, unit
        rows under "cosine", [count] int64 ids). A file of format version 1 (earlier releases)
        is read with the same checks and a DeprecationWarning: save the loaded index to rewrite
        it as version 2. Stale temporaries of killed saves of this file are deleted (as
        :meth:`save` does).

        Args:
            path: the file (symlinks are followed).
            device, backend: as the constructor.

        Raises:
            ValueError: a malformed argument, or the file is missing (the error is then also a
                FileNotFoundError), not a regular file, not an index, of an unknown version,
                truncated, corrupt (checksum mismatch) or malformed (the message names the file
                and the field).
            OSError: the file exists but cannot be read (permissions, I/O).
        """
        p = _path(path)
        dev = _validate.device("device", "cpu" if device is None else device, ("cpu", "cuda"))
        backend = _backends.check_spec(backend, ops=("topk_similarity",))
        _remove_stale_temps(Path(os.path.realpath(p)))
        name = str(p)
        data = _read_file(p, name)
        if data.startswith(_V1_MAGIC):
            dim, metric, dtype, vectors, ids = _read_v1(name, data)
            warnings.warn(
                f"{name}: EmbeddingIndex file format version 1 is deprecated and will not be "
                "read by a future release; call .save() on the loaded index to rewrite the "
                "file in the current format (version 2, safetensors)",
                DeprecationWarning,
                stacklevel=2,
            )
        else:
            dim, metric, dtype, vectors, ids = _read_v2(name, data)
        index = cls(dim, metric, dtype, dev, backend=backend)
        n = ids.shape[0]
        index._reserve(n)
        index._vectors[:n] = vectors
        index._ids[:n] = ids
        index._count = n
        return index
