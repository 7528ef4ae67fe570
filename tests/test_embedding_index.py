"""cpu tier: vf.nn.EmbeddingIndex (vljepa_fast/embedding_index.py): its file format (version 2,
safetensors; version 1 still read), adversarial loading, atomic saves, stale temporaries,
permissions, symlinks, and the argument checks of its API.

The search results themselves are tested against the reference in test_topk_similarity.py.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import vljepa_fast as vf
from vljepa_fast import _backends
from vljepa_fast import embedding_index as ei

EmbeddingIndex = vf.nn.EmbeddingIndex
# torch's own note when it validates the sparse tensor that one malformed v1 file holds
pytestmark = pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
TMP_RE = re.compile(r"\.idx\.vfi\.tmp-(\d+)-[0-9a-f]{8}")


def _index(n=30, dim=12, metric="cosine", dtype=torch.bfloat16, seed=0) -> EmbeddingIndex:
    g = torch.Generator().manual_seed(seed)
    index = EmbeddingIndex(dim, metric=metric, dtype=dtype)
    index.add(torch.randn(n, dim, generator=g), ids=torch.randint(0, 10**9, (n,), generator=g))
    return index


def _raises_naming(path, *words):
    """pytest.raises(ValueError) whose message names the file, then every word, in order."""
    pattern = re.escape(str(path)) + "".join(".*" + re.escape(w) for w in words)
    return pytest.raises(ValueError, match=re.compile(pattern, re.S))


def _equal(a: EmbeddingIndex, b: EmbeddingIndex) -> bool:
    return (
        (a.dim, a.metric, a.dtype, len(a)) == (b.dim, b.metric, b.dtype, len(b))
        and torch.equal(a.vectors, b.vectors)
        and torch.equal(a.ids, b.ids)
    )


# ------------------------------------------------------------- version 2 (safetensors) files
# Written here from the documented layout (vljepa_fast/embedding_index.py's docstring), not
# with the module's own encoder.


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _tensors(index: EmbeddingIndex) -> dict:
    return {"vectors": index.vectors.clone(), "ids": index.ids.clone()}


def _meta(index: EmbeddingIndex, checksums: bool = True) -> dict:
    """The __metadata__ :meth:`EmbeddingIndex.save` writes for ``index`` (the checksums None
    without ``checksums``: :func:`_craft` then computes them)."""
    return {
        "format": "vljepa_fast.EmbeddingIndex",
        "version": "2",
        "dim": str(index.dim),
        "metric": index.metric,
        "dtype": str(index.dtype).removeprefix("torch."),
        "count": str(len(index)),
        "sha256_vectors": _sha(index.vectors) if checksums else None,
        "sha256_ids": _sha(index.ids) if checksums else None,
    }


def _v2_state(index: EmbeddingIndex) -> dict:
    """The metadata and tensors of the file of ``index``, in one dict to corrupt."""
    return {**_meta(index, checksums=False), **_tensors(index)}


def _craft(path, state: dict) -> None:
    """A safetensors file of the tensors of ``state``, its other entries the metadata; the
    checksums that are None are computed (valid), whatever else the file holds."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in state.items() if k not in tensors}
    for k in ("vectors", "ids"):
        if meta.get(f"sha256_{k}", "") is None:
            meta[f"sha256_{k}"] = _sha(tensors[k]) if k in tensors else "0" * 64
    path.write_bytes(safetensors.torch.save(tensors, meta))


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_save_writes_a_safetensors_file_with_the_documented_metadata(tmp_path):
    index = _index()
    path = tmp_path / "idx.vfi"
    index.save(path)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == _meta(index)
        assert sorted(f.keys()) == ["ids", "vectors"]
        vectors, ids = f.get_tensor("vectors"), f.get_tensor("ids")
    assert vectors.dtype == torch.bfloat16 and ids.dtype == torch.int64
    assert torch.equal(vectors, index.vectors) and torch.equal(ids, index.ids)
    header, body = _split(path.read_bytes())
    assert len(body) == 30 * 12 * 2 + 30 * 8  # the stored rows and ids, nothing else
    assert header["vectors"]["shape"] == [30, 12] and header["ids"]["shape"] == [30]


# every storage dtype and metric, as (dtype, metric)
STORAGES = [
    (d, m) for d in (torch.float32, torch.float16, torch.bfloat16) for m in ("ip", "cosine")
]


@pytest.mark.parametrize("n", [0, 1, 37])
@pytest.mark.parametrize("dtype, metric", STORAGES)
def test_save_load_round_trip(tmp_path, n, dtype, metric):
    index = EmbeddingIndex(5, metric=metric, dtype=dtype)
    if n:
        index.add(torch.randn(n, 5), ids=torch.randint(-(2**62), 2**62, (n,)))
    index.save(tmp_path / "idx.vfi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a version-2 file loads without a warning
        back = EmbeddingIndex.load(tmp_path / "idx.vfi")
    assert _equal(back, index)
    if n:
        q = torch.randn(3, 5)
        assert all(torch.equal(x, y) for x, y in zip(back.search(q, 1), index.search(q, 1)))


def test_a_file_written_by_safetensors_itself_loads(tmp_path):
    """The format is plain safetensors: another writer with the same tensors and metadata
    makes a file that loads (the loader does not depend on this package's encoder)."""
    index = _index(metric="ip", dtype=torch.float16)
    path = tmp_path / "other.vfi"
    safetensors.torch.save_file(_tensors(index), path, metadata=_meta(index))
    assert _equal(EmbeddingIndex.load(path), index)


# mutations of a file's fields, as one dict (_v2_state, _v1_state)


def _set(**kw):
    return lambda s: {**s, **kw}


def _drop(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


def _vectors(fn):
    return lambda s: {**s, "vectors": fn(s["vectors"])}


def _ids(fn):
    return lambda s: {**s, "ids": fn(s["ids"])}


def _nan_row(v):
    v = v.clone()
    v[3, 1] = float("nan")
    return v


def _inf_row(v):
    v = v.clone()
    v[0, 0] = float("inf")
    return v


# vectors that no save writes, in either version
BAD_VECTORS = {
    "vectors-1d": (_vectors(lambda v: v.flatten()), "vectors"),
    "vectors-3d": (_vectors(lambda v: v[None].clone()), "vectors"),
    "vectors-float64": (_vectors(lambda v: v.double()), "vectors"),
    "vectors-int": (_vectors(lambda v: v.long()), "vectors"),
    "vectors-nan": (_vectors(_nan_row), "vectors"),
    "vectors-inf": (_vectors(_inf_row), "vectors"),
    "vectors-not-unit": (_vectors(lambda v: v * 3), "vectors"),
    "vectors-short-rows": (_vectors(lambda v: v * 0.02), "vectors"),
}


BAD_FIELDS = {
    "100-ids-10-rows": (
        lambda s: {
            **s,
            "count": "10",
            "vectors": s["vectors"][:10].clone(),
            "ids": torch.arange(100),
        },
        "ids",
    ),
    "float-ids": (_ids(lambda i: i.double()), "ids"),
    "int32-ids": (_ids(lambda i: i.int()), "ids"),
    "bool-ids": (_ids(lambda i: i > 0), "ids"),
    "2d-ids": (_ids(lambda i: i[:, None].contiguous()), "ids"),
    "fewer-ids": (_ids(lambda i: i[:-1].clone()), "ids"),
    "dim-unlike-vectors": (_set(dim="13"), "vectors"),
    "dim-bool": (_set(dim="True"), "dim"),
    "dim-float": (_set(dim="12.0"), "dim"),
    "dim-zero": (_set(dim="0"), "dim"),
    "dim-negative": (_set(dim="-12"), "dim"),
    "dim-leading-zero": (_set(dim="012"), "dim"),
    "dim-space": (_set(dim=" 12"), "dim"),
    "dim-empty": (_set(dim=""), "dim"),
    "dim-5000-digits": (_set(dim="1" * 5000), "dim"),  # int() would refuse with its own error
    "count-unlike-rows": (_set(count="31"), "count"),
    "count-not-a-number": (_set(count="many"), "count"),
    "dtype-unlike-vectors": (_set(dtype="float32"), "vectors"),
    "dtype-unknown": (_set(dtype="float64"), "dtype"),
    "dtype-torch-name": (_set(dtype="torch.bfloat16"), "dtype"),
    "metric-unknown": (_set(metric="l2"), "metric"),
    "metric-empty": (_set(metric=""), "metric"),
    "sha256-not-hex": (_set(sha256_vectors="x" * 64), "sha256_vectors"),
    "sha256-upper-case": (
        lambda s: {**s, "sha256_ids": _sha(s["ids"]).upper()},
        "sha256_ids",
    ),
    **BAD_VECTORS,
    "vectors-transposed": (
        lambda s: {
            **s,
            "dim": "30",
            "count": "12",
            "vectors": s["vectors"].T.contiguous(),
            "ids": torch.arange(12),
        },
        "vectors",
    ),
    # every tensor and metadata field (format and version: test_load_refuses_broken_files)
    **{
        f"missing-{k}": (_drop(k), k) for k in _v2_state(_index()) if k not in ("format", "version")
    },
    "extra-field": (_set(note="hello"), "note"),
    "extra-tensor": (_set(norms=torch.ones(30)), "norms"),
}


@pytest.mark.parametrize("mutate, field", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_load_refuses_every_malformed_field(tmp_path, mutate, field):
    """A valid safetensors file with valid checksums, inconsistent content: a ValueError naming
    the file and the field, never another exception and never an index that disagrees with its
    header."""
    index = _index()
    path = tmp_path / "bad.vfi"
    _craft(path, mutate(_v2_state(index)))
    with _raises_naming(path, "malformed", field):
        EmbeddingIndex.load(path)


def _header_edit(fn):
    def edit(data: bytes) -> bytes:
        header, body = _split(data)
        fn(header)
        return _join(header, body)

    return edit


def _set_meta(**kw):
    return _header_edit(lambda h: h["__metadata__"].update(kw))


def _set_entry(name, **kw):
    return _header_edit(lambda h: h[name].update(kw))


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _header_end(data: bytes) -> int:
    return 8 + struct.unpack_from("<Q", data)[0]


BROKEN_FILES = {
    # the size and the JSON header
    "empty": (lambda d: b"", "bad header"),
    "short": (lambda d: d[:7], "bad header"),
    "hello": (lambda d: b"hello", "bad header"),
    "header-length-huge": (lambda d: struct.pack("<Q", 2**40) + d[8:], "bad header"),
    "in-header": (lambda d: d[: _header_end(d) - 3], "truncated or corrupt"),
    "header-only": (lambda d: d[: _header_end(d)], "truncated or corrupt"),
    "truncated": (lambda d: d[:-10], "truncated or corrupt"),
    "trailing": (lambda d: d + b"\0", "truncated or corrupt"),
    "not-json": (lambda d: _join(b"{" * 16, _split(d)[1]), "bad header"),
    "not-utf8": (lambda d: _join(b'{"\xff": 1}', _split(d)[1]), "bad header"),
    "json-list": (lambda d: _join(b"[1, 2]", _split(d)[1]), "bad header"),
    "duplicate-key": (
        lambda d: _join(
            d[8 : _header_end(d)]
            .rstrip()
            .replace(b'"__metadata__":{', b'"__metadata__":{"dim":"12",', 1),
            _split(d)[1],
        ),
        "bad header",
    ),
    "no-metadata": (_header_edit(lambda h: h.pop("__metadata__")), "bad header"),
    "metadata-not-a-dict": (_header_edit(lambda h: h.update(__metadata__=[1])), "bad header"),
    "wrong-format": (_set_meta(format="something.else"), "bad header"),
    "version-3": (_set_meta(version="3"), "unsupported EmbeddingIndex file version '3'"),
    "version-missing": (
        _header_edit(lambda h: h["__metadata__"].pop("version")),
        "unsupported EmbeddingIndex file version None",
    ),
    # checksums
    "checksum": (_flip_last, "checksum mismatch"),
    "first-data-byte": (
        lambda d: d[: _header_end(d)] + bytes([d[_header_end(d)] ^ 0x80]) + d[_header_end(d) + 1 :],
        "checksum mismatch",
    ),
    "digest": (_set_meta(sha256_vectors="0" * 64), "checksum mismatch in 'vectors'"),
    # tensor entries that safetensors itself refuses, with valid checksums and metadata
    "offsets-not-ints": (_set_entry("ids", data_offsets=["0", "240"]), "malformed"),
    "offsets-reversed": (_set_entry("ids", data_offsets=[240, 0]), "malformed"),
    "shape-huge": (  # 10**9 rows claimed for 30 rows of data: never allocated
        _set_entry("vectors", shape=[10**9, 12]),
        "malformed",
    ),
    "dtype-unknown": (_set_entry("vectors", dtype="Q8"), "malformed"),
    "entry-not-a-dict": (_header_edit(lambda h: h.update(ids=[0, 240])), "malformed"),
}


@pytest.mark.parametrize("edit, words", BROKEN_FILES.values(), ids=BROKEN_FILES.keys())
def test_load_refuses_broken_files(tmp_path, edit, words):
    src = tmp_path / "idx.vfi"
    _index().save(src)
    path = tmp_path / "broken.vfi"
    path.write_bytes(edit(src.read_bytes()))
    with _raises_naming(path, words):
        EmbeddingIndex.load(path)


def test_load_refuses_overlapping_tensors(tmp_path):
    """ids and vectors declared over the same bytes (checksums valid for each range)."""
    index = _index(metric="ip", dtype=torch.float32, n=4, dim=2)  # vectors: 32 bytes = 4 ids
    header, body = _split(safetensors.torch.save(_tensors(index), _meta(index)))
    header["ids"]["data_offsets"] = header["vectors"]["data_offsets"]
    start, end = header["vectors"]["data_offsets"]
    header["__metadata__"]["sha256_ids"] = hashlib.sha256(body[start:end]).hexdigest()
    path = tmp_path / "overlap.vfi"
    path.write_bytes(_join(header, body))
    with _raises_naming(path, "malformed"):
        EmbeddingIndex.load(path)


def test_load_refuses_paths_that_are_not_index_files(tmp_path):
    missing = tmp_path / "missing.vfi"
    with _raises_naming(missing, "no such index file"):
        EmbeddingIndex.load(missing)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, for except clauses
        EmbeddingIndex.load(missing)
    with _raises_naming(tmp_path, "directory"):
        EmbeddingIndex.load(tmp_path)
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    with _raises_naming(loop, "symlink loop"):
        EmbeddingIndex.load(loop)
    if hasattr(os, "mkfifo"):  # reading a FIFO would block forever
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with _raises_naming(fifo, "not a regular file"):
            EmbeddingIndex.load(fifo)
    for bad in (None, 3, "", 2.5, ["a"]):  # 3 would open file descriptor 3
        with pytest.raises(ValueError, match="path: expected"):
            EmbeddingIndex.load(bad)


def _flips(data: bytes, rng: random.Random) -> bytes:
    flipped = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(flipped)


def test_load_fuzzed_byte_flips_always_raise_value_error(tmp_path):
    """Random flips anywhere in a saved file (header included): always a ValueError naming the
    file."""
    src = tmp_path / "idx.vfi"
    _index().save(src)
    data = src.read_bytes()
    rng = random.Random(0)
    path = tmp_path / "flipped.vfi"
    for _ in range(300):
        path.write_bytes(_flips(data, rng))
        with _raises_naming(path):
            EmbeddingIndex.load(path)


def _loaded_or_refused(path) -> bool:
    """True: loaded an index that passed every check; False: a ValueError naming the file."""
    try:
        back = EmbeddingIndex.load(path)
    except ValueError as e:
        assert str(path) in str(e)
        return False
    assert back.vectors.shape == (len(back), back.dim) and back.ids.shape == (len(back),)
    assert back.vectors.dtype == back.dtype and back.ids.dtype == torch.int64
    assert bool(torch.isfinite(back.vectors).all())
    return True


def test_load_fuzzed_file_with_valid_checksums_never_raises_another_type(tmp_path):
    """The adversary's file: flips and cuts in the tensor bytes with the checksums recomputed,
    and flips in the JSON header: the load either gives an index that passed every check or a
    ValueError naming the file."""
    src = tmp_path / "idx.vfi"
    _index().save(src)
    header, body = _split(src.read_bytes())
    rng = random.Random(1)
    path = tmp_path / "fuzzed.vfi"
    outcomes = []
    for i in range(300):
        if i % 2:  # the header, as JSON text
            raw = bytearray(_join(header, body)[8 : 8 + len(json.dumps(header))])
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            path.write_bytes(_join(bytes(raw), body))
        else:  # the tensor data, checksums recomputed over the declared ranges
            fuzzed = bytearray(body)
            if i % 3 == 0:
                fuzzed = fuzzed[: rng.randrange(len(fuzzed))]
            for _ in range(rng.randint(1, 3)):
                if fuzzed:
                    fuzzed[rng.randrange(len(fuzzed))] = rng.randrange(256)
            h = copy.deepcopy(header)
            for k in ("vectors", "ids"):
                a, b = h[k]["data_offsets"]
                h["__metadata__"][f"sha256_{k}"] = hashlib.sha256(fuzzed[a:b]).hexdigest()
            path.write_bytes(_join(h, bytes(fuzzed)))
        outcomes.append(_loaded_or_refused(path))
    assert not all(outcomes)


# ------------------------------------------------------------------- version 1 files (legacy)
# The encoder of the version-1 writer (EmbeddingIndex.save before the safetensors format),
# copied as it was: its output is byte for byte what that save wrote (checked against it when
# the format changed, and pinned by V1_GOLDEN below, a file the old release wrote).

V1_MAGIC = b"VLJEPA_FAST_INDEX\x00v1\n"
V1_HEADER = struct.Struct("<32sQ")  # sha256 of the payload, payload length


def _v1_state(index: EmbeddingIndex) -> dict:
    """The payload the version-1 save wrote, as a dict to corrupt."""
    return {
        "dim": index.dim,
        "metric": index.metric,
        "dtype": str(index.dtype).removeprefix("torch."),
        "vectors": index.vectors.to("cpu", copy=True),
        "ids": index.ids.to("cpu", copy=True),
    }


def _v1_wrap(payload: bytes) -> bytes:
    """A version-1 file whose header and checksum are valid for ``payload``."""
    return V1_MAGIC + V1_HEADER.pack(hashlib.sha256(payload).digest(), len(payload)) + payload


def _v1_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return _v1_wrap(buf.getvalue())


# EmbeddingIndex(4, "cosine", torch.bfloat16) with rows [1, 2, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0]
# and ids [7, -2, 10**12], saved by the version-1 release (zlib, base64)
V1_GOLDEN = (
    "eNqllV1P01AYx0/3bsExUHkzwXjlDDDWjb3gCwsTarQgE3xZNKYpXVkbupXTns2gITHRkXBlwgfwhpBg/AAmXnnh"
    "tYnGK+OdN2qMJngv9rQw2iID8UmWds35P8/v9Hn+p7fGr47lRlh6ZPoGe+Xa6FgeVClyUqzQ3MarWtevhyunvn8U"
    "o69vr4Ym3/TPvX+r3pvbWF3zAyNyjNsDQCAAdkUItAFO5UWpKgwUOMRF5udkOhsEd2zxyLUIQTjv1gUFqQQJxpP3"
    "6fclAakSD13GH17RpLIA3XkvXoUW5gXoyeOKM7OywiEqCb15jFMVeKSoGvThCy9G2AqSZI1kVWGmIskFFgllTVHZ"
    "aoyE/nDYkGj6Sq4owIApIbO0mXHafE7CI3lCXxaFpIHIz1dgE9OMYPN1BjBuxrMEjzIehliCwWWeV2RZJ5CUskZO"
    "qgVBFQqjEo9I2HJ2CoYQbJ2CbUYWqaDBY6KOIG6XHVfKxXrJ40ZJCp4Qmxg3gu1GqRrsYIga7FwWcbYuBLun4MlK"
    "JMf4A+t3RxczugT/9m5HB7hQb0dkVlFLHGKrgqrpuHQ27ejKwYPCBC9/fnqMmYmGA9ENUjsEWy+e5WSpWC4JZURn"
    "44eBSA5igMx9+NWll3A1BGgFmTrAzAISFNwkOnv+0JvXQ5YQkgXMULv4uQtPq68hQxAM21wxEKWz5/4D4MVwb6Y3"
    "Y3nJ+v1EBhP4A8QT8nKn/qxzH6I+OxFFZ8MHJto6BsDvTTNAaO3DF2DWPz1R/rZ//RbQW69fH8gzBwWIk7jSu2fF"
    "m/v3vwfEdgbQ2KomqJI+gQ847FpWKtDZyD/2IppIUlQ0nYjFk9RQMhVNxIYGqWQ6nkrFE6l0IhGPReODsVQaUz7/"
    "EdgM6xxhg5LAsHVOq4lDu8id56hTbTVgh035lAB72d6ZxGqibrtxXKCBc515rEZoteVZseSpG9Apt05t0CZvdwOH"
    "d5xa68TZtetOLeXUWmeoxaYNe4BzQp1ia2t77Hu2iP8+dDnG5+vbHlF3f10ZcFybXOY17d3+9PoM913a8qB5+np9"
    "piZgrDfX/gGKlsM4"
)


def test_a_v1_file_of_the_old_release_loads_with_a_deprecation_warning(tmp_path):
    path = tmp_path / "old.vfi"
    path.write_bytes(zlib.decompress(base64.b64decode(V1_GOLDEN)))
    with pytest.warns(DeprecationWarning, match=r"version 1 .*call \.save\(\)"):
        back = EmbeddingIndex.load(path)
    rows = torch.tensor([[1.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 4.0, 0.0]])
    want = torch.nn.functional.normalize(rows, dim=1, eps=1e-12).bfloat16()
    assert (back.dim, back.metric, back.dtype) == (4, "cosine", torch.bfloat16)
    assert torch.equal(back.vectors, want)
    assert back.ids.tolist() == [7, -2, 10**12]
    expected = EmbeddingIndex(4, "cosine", torch.bfloat16)
    expected.add(rows, ids=torch.tensor([7, -2, 10**12]))
    assert path.read_bytes() == _v1_bytes(_v1_state(expected))  # the encoder above is the old one


@pytest.mark.parametrize("n", [0, 30])
@pytest.mark.parametrize("dtype, metric", STORAGES)
def test_a_v1_file_loads_with_the_same_contents_and_save_rewrites_it(tmp_path, n, dtype, metric):
    index = EmbeddingIndex(12, metric=metric, dtype=dtype)
    if n:
        index.add(torch.randn(n, 12), ids=torch.randint(-(2**62), 2**62, (n,)))
    path = tmp_path / "idx.vfi"
    path.write_bytes(_v1_bytes(_v1_state(index)))
    with pytest.warns(DeprecationWarning, match=re.escape(str(path))):
        back = EmbeddingIndex.load(path)
    assert _equal(back, index)
    back.save(path)  # what the warning says to do
    assert not path.read_bytes().startswith(V1_MAGIC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _equal(EmbeddingIndex.load(path), index)


def test_load_never_unpickles_or_calls_torch_load(tmp_path, monkeypatch):
    """Both versions load with every unpickler of Python and torch made to fail."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader must not unpickle")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    index = _index()
    index.save(tmp_path / "v2.vfi")
    (tmp_path / "v1.vfi").write_bytes(_v1_bytes(_v1_state(index)))
    assert _equal(EmbeddingIndex.load(tmp_path / "v2.vfi"), index)
    with pytest.warns(DeprecationWarning):
        assert _equal(EmbeddingIndex.load(tmp_path / "v1.vfi"), index)


V1_BAD_FIELDS = {
    # the correctness issue's cases: 100 ids but 10 vector rows, float ids, dim / dtype unlike
    # the header
    "100-ids-10-rows": (
        lambda s: {**s, "vectors": s["vectors"][:10].clone(), "ids": torch.arange(100)},
        "ids",
    ),
    "float-ids": (_ids(lambda i: i.double()), "ids"),
    "int32-ids": (_ids(lambda i: i.int()), "ids"),
    "bool-ids": (_ids(lambda i: i > 0), "ids"),
    "2d-ids": (_ids(lambda i: i[:, None]), "ids"),
    "list-ids": (_ids(lambda i: i.tolist()), "ids"),
    "fewer-ids": (_ids(lambda i: i[:-1].clone()), "ids"),
    "dim-unlike-vectors": (_set(dim=13), "vectors"),
    "dim-bool": (_set(dim=True), "dim"),
    "dim-float": (_set(dim=12.0), "dim"),
    "dim-zero": (_set(dim=0), "dim"),
    "dim-str": (_set(dim="12"), "dim"),
    "dtype-unlike-vectors": (_set(dtype="float32"), "vectors"),
    "dtype-unknown": (_set(dtype="float64"), "dtype"),
    "metric-unknown": (_set(metric="l2"), "metric"),
    "metric-none": (_set(metric=None), "metric"),
    "vectors-list": (_vectors(lambda v: v.tolist()), "vectors"),
    **BAD_VECTORS,
    "vectors-3d-view": (_vectors(lambda v: v[None]), "vectors"),
    "vectors-transposed": (
        lambda s: {**s, "dim": 30, "vectors": s["vectors"].T, "ids": torch.arange(12)},
        "vectors",
    ),
    "vectors-expanded": (  # 10**6 rows held in one: would allocate far beyond the file's size
        lambda s: {
            **s,
            "vectors": s["vectors"][:1].expand(10**6, -1),
            "ids": torch.zeros(1, dtype=torch.long).expand(10**6),
        },
        "vectors",
    ),
    "vectors-offset-view": (_vectors(lambda v: v[1:]), "ids"),  # a view into a larger storage
    **{f"missing-{k}": (_drop(k), k) for k in ("dim", "metric", "dtype", "vectors", "ids")},
    "extra-field": (_set(count=30), "count"),
}


@pytest.mark.parametrize("mutate, field", V1_BAD_FIELDS.values(), ids=V1_BAD_FIELDS.keys())
def test_v1_load_refuses_every_malformed_field(tmp_path, mutate, field):
    """Valid magic, length and checksum, inconsistent content: a ValueError naming the file and
    the field (the checks of version 2 apply to version 1 too)."""
    path = tmp_path / "bad.vfi"
    path.write_bytes(_v1_bytes(mutate(_v1_state(_index()))))
    with _raises_naming(path, "malformed", field):
        EmbeddingIndex.load(path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_v1_load_never_runs_code_from_the_file(tmp_path):
    """A pickle that would call exec (valid checksum): refused, and exec is never called."""
    marker, path = tmp_path / "ran", tmp_path / "evil.vfi"
    state = _v1_state(_index())
    state["metric"] = _RunsCode(marker)
    path.write_bytes(_v1_bytes(state))
    with _raises_naming(
        path, "malformed", "__builtin__ exec", "nothing in an index file is ever run"
    ):
        EmbeddingIndex.load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, words",
    [
        (torch.bfloat16, "torch bfloat16"),
        (torch.zeros(3).to_sparse(), "_rebuild_sparse_tensor"),
        ({1, 2}, "__builtin__ set"),
        (np.float32(1.0), "numpy"),
        (torch.Size([2]), "torch Size"),
    ],
    ids=["dtype-object", "sparse-tensor", "set", "numpy-scalar", "torch-size"],
)
def test_v1_load_refuses_objects_that_are_not_numbers_strings_or_tensors(tmp_path, value, words):
    path = tmp_path / "bad.vfi"
    path.write_bytes(_v1_bytes({**_v1_state(_index()), "dtype": value}))
    with _raises_naming(path, "malformed", words):
        EmbeddingIndex.load(path)


@pytest.mark.parametrize("payload", [[1, 2, 3], torch.zeros(3), None, 7, "index", (1, 2)], ids=repr)
def test_v1_load_refuses_a_payload_that_is_not_a_dict(tmp_path, payload):
    path = tmp_path / "bad.vfi"
    path.write_bytes(_v1_bytes(payload))
    with _raises_naming(path, "malformed", "dict payload"):
        EmbeddingIndex.load(path)


def test_v1_load_refuses_a_payload_that_is_not_an_archive(tmp_path):
    path = tmp_path / "junk.vfi"
    path.write_bytes(_v1_wrap(b"not a zip archive at all"))
    with _raises_naming(path, "malformed", "not a torch.save archive"):
        EmbeddingIndex.load(path)


def test_v1_load_refuses_broken_headers(tmp_path):
    data = _v1_bytes(_v1_state(_index()))
    head = len(V1_MAGIC) + V1_HEADER.size
    cases = {
        "magic-only": (V1_MAGIC, "bad header"),
        "in-header": (data[: head - 3], "bad header"),
        "truncated": (data[:-10], "truncated or corrupt"),
        "header-only": (data[:head], "truncated or corrupt"),
        "trailing": (data + b"\0", "truncated or corrupt"),
        "checksum": (data[:-1] + bytes([data[-1] ^ 1]), "checksum mismatch"),
        "digest": (
            data[: len(V1_MAGIC)] + b"\0" * 32 + data[len(V1_MAGIC) + 32 :],
            "checksum mismatch",
        ),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with _raises_naming(path, words):
            EmbeddingIndex.load(path)


def _rezip(records: dict) -> bytes:
    """A zip archive of ``records`` (name -> bytes), stored uncompressed as torch.save does."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_v1_load_fuzzed_payload_with_valid_checksum_never_raises_another_type(tmp_path):
    """The adversary's version-1 file: flips and cuts in the archive, and in its pickle (the
    archive rebuilt around it, so that the zip CRCs hold and the opcode walk sees the damage),
    with the checksum recomputed: an index that passed every check or a ValueError naming the
    file."""
    buf = io.BytesIO()
    torch.save(_v1_state(_index()), buf)
    payload = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        records = {name: zf.read(name) for name in zf.namelist()}
    pkl = records["archive/data.pkl"]
    rng = random.Random(2)
    path = tmp_path / "fuzzed.vfi"
    outcomes = []
    for i in range(300):
        fuzzed = bytearray(payload if i % 3 == 0 else pkl)
        if i % 2:
            fuzzed = fuzzed[: rng.randrange(len(fuzzed))]
        for _ in range(rng.randint(1, 3)):
            if fuzzed:
                fuzzed[rng.randrange(len(fuzzed))] = rng.randrange(256)
        if i % 3:
            fuzzed = _rezip({**records, "archive/data.pkl": bytes(fuzzed)})
        path.write_bytes(_v1_wrap(bytes(fuzzed)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            outcomes.append(_loaded_or_refused(path))
    assert not all(outcomes)


# ------------------------------------------------------------------------------- saving


def test_save_writes_only_the_stored_rows(tmp_path):
    """A view of the [capacity, dim] buffer would save all of it: 1024 rows for 3 here."""
    index = EmbeddingIndex(256)
    index.add(torch.randn(3, 256))
    path = tmp_path / "idx.vfi"
    index.save(path)
    assert path.stat().st_size < 3 * 256 * 4 + 4096
    back = EmbeddingIndex.load(path)
    assert torch.equal(back.vectors, index.vectors) and torch.equal(back.ids, index.ids)


def test_a_failed_save_leaves_no_temporary_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "idx.vfi"
    old = _index(seed=1)
    old.save(path)

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        _index(seed=2).save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx.vfi"]
    assert _equal(EmbeddingIndex.load(path), old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_save_permissions_follow_the_umask(tmp_path, umask):
    path = tmp_path / "idx.vfi"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    old = os.umask(umask)
    try:
        _index().save(path)
        (tmp_path / "new").mkdir()
        _index().save(tmp_path / "new" / "idx.vfi")
    finally:
        os.umask(old)
    for p in (path, tmp_path / "new" / "idx.vfi"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_through_a_symlink_replaces_its_target(tmp_path):
    target = tmp_path / "v1.vfi"
    _index(seed=1).save(target)
    link = tmp_path / "latest.vfi"
    os.symlink(target.name, link)
    index = _index(seed=2)
    index.save(link)
    assert link.is_symlink() and os.readlink(link) == target.name
    assert torch.equal(EmbeddingIndex.load(target).ids, index.ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.vfi", "v1.vfi"]
    dangling = tmp_path / "next.vfi"
    os.symlink("v2.vfi", dangling)
    index.save(dangling)  # the missing target is created
    assert dangling.is_symlink() and torch.equal(
        EmbeddingIndex.load(tmp_path / "v2.vfi").ids, index.ids
    )


def test_save_refuses_paths_it_must_not_replace(tmp_path):
    index = _index()
    with pytest.raises(ValueError, match="path: .* is a directory"):
        index.save(tmp_path)
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    with pytest.raises(ValueError, match="path: .* is a symlink loop"):
        index.save(loop)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(ValueError, match="path: .* not a regular file"):
            index.save(fifo)
        assert not fifo.is_file()
    for bad in (None, 3, ""):
        with pytest.raises(ValueError, match="path: expected"):
            index.save(bad)


def test_save_into_a_missing_folder_names_the_path(tmp_path):
    """The error names the user's path, not the hidden temporary file (regression)."""
    index = vf.nn.EmbeddingIndex(4)
    index.add(torch.randn(3, 4))
    target = tmp_path / "missing" / "labels.vfi"
    with pytest.raises(FileNotFoundError, match="labels.vfi.*does not exist") as info:
        index.save(target)
    assert ".tmp-" not in str(info.value)


def test_cosine_zero_rows_round_trip(tmp_path):
    """add() keeps a zero row zero under cosine; save() then load() must accept it."""
    index = EmbeddingIndex(6, metric="cosine")
    x = torch.randn(4, 6)
    x[2] = 0
    index.add(x)
    index.save(tmp_path / "z.vfi")
    back = EmbeddingIndex.load(tmp_path / "z.vfi")
    assert torch.equal(back.vectors, index.vectors) and torch.equal(back.ids, index.ids)


# -------------------------------------------------------------------- stale temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp(tmp_path, pid, token="deadbeef", name="idx.vfi", mtime=None):
    p = tmp_path / f".{name}.tmp-{pid}-{token}"
    p.write_bytes(b"partial")
    if mtime is not None:
        os.utime(p, (mtime, mtime))
    return p


@pytest.mark.skipif(os.name != "posix", reason="pid liveness is checked on POSIX only")
@pytest.mark.parametrize("when", ["save", "load"])
def test_stale_temporaries_of_the_same_index_are_removed(tmp_path, when):
    path = tmp_path / "idx.vfi"
    _index().save(path)
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [
            _temp(tmp_path, dead),  # its writer died (killed mid-write)
            _temp(tmp_path, os.getpid(), "0123abcd"),  # ours, and no save of ours is writing it
        ]
        kept = [
            _temp(tmp_path, live.pid, "00ff00ff"),  # a live writer: a concurrent save
            _temp(tmp_path, dead, name="other.vfi"),  # another index's
            _temp(tmp_path, dead, token="NOTHEX00"),  # not a name save makes
            tmp_path / ".idx.vfi.backup",
        ]
        kept[-1].write_bytes(b"user data")
        if ei._process_start(live.pid) is not None:  # /proc: a reused pid is detected
            stale.append(_temp(tmp_path, live.pid, "11111111", mtime=time.time() - 86400))
        if when == "save":
            _index().save(path)
        else:
            EmbeddingIndex.load(path)
        for p in stale:
            assert not p.exists(), p.name
        for p in kept:
            assert p.exists(), p.name
    finally:
        live.kill()
        live.wait()


_KILLED_SAVE = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import vljepa_fast as vf

    index = vf.nn.EmbeddingIndex(64)
    index.add(torch.randn(5000, 64))

    def stall(fd):  # the payload is written: stop here until killed
        print("writing", flush=True)
        time.sleep(600)

    os.fsync = stall
    index.save(sys.argv[1])
    """
)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_save_killed_mid_write_is_cleaned_up_by_the_next_save_and_load(tmp_path):
    path = tmp_path / "idx.vfi"
    for cleaner in ("save", "load"):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "writing"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        orphans = [p for p in tmp_path.iterdir() if TMP_RE.fullmatch(p.name)]
        assert len(orphans) == 1 and orphans[0].stat().st_size > 5000 * 64 * 4
        assert int(TMP_RE.fullmatch(orphans[0].name).group(1)) == proc.pid
        if cleaner == "save":
            _index(dim=64).save(path)
        else:
            EmbeddingIndex.load(path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["idx.vfi"]


def test_a_save_in_progress_in_another_thread_is_not_removed(tmp_path, monkeypatch):
    """Two threads of one process save the same file: the second must not delete the first's
    temporary (same pid) while the first is writing it."""
    path = tmp_path / "idx.vfi"
    writing, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd):
        if threading.current_thread().name == "slow":
            writing.set()
            assert release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    first, second = _index(seed=1), _index(seed=2)
    errors = []

    def slow_save():
        try:
            first.save(path)
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=slow_save, name="slow")
    t.start()
    assert writing.wait(30)
    second.save(path)
    assert len([p for p in tmp_path.iterdir() if TMP_RE.fullmatch(p.name)]) == 1
    release.set()
    t.join(30)
    assert not errors
    assert torch.equal(EmbeddingIndex.load(path).ids, first.ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx.vfi"]


# ---------------------------------------------------------------------------- arguments


def test_nn_exports_the_index_of_its_own_module():
    assert vf.nn.EmbeddingIndex is ei.EmbeddingIndex
    assert "EmbeddingIndex" in vf.nn.__all__


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"dim": True}, "dim"),
        ({"dim": 0}, "dim"),
        ({"dim": -3}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"dim": "8"}, "dim"),
        ({"dim": None}, "dim"),
        ({"metric": "l2"}, "metric"),
        ({"metric": None}, "metric"),
        ({"metric": ["ip"]}, "metric"),
        ({"dtype": torch.float64}, "dtype"),
        ({"dtype": torch.int64}, "dtype"),
        ({"dtype": "float32"}, "dtype"),
        ({"device": "nonsense"}, "device"),
        ({"device": 2.5}, "device"),
        ({"device": True}, "device"),
        ({"device": "meta"}, "device"),
        ({"backend": "nope"}, "backend"),
        ({"backend": None}, "backend"),
        ({"backend": 3}, "backend"),
        ({"backend": {"topk": "cpu"}}, "backend"),  # not an op name
        ({"backend": {"topk_similarity": "fast"}}, r"backend\['topk_similarity'\]"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v,
)
def test_constructor_refuses_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        EmbeddingIndex(**{"dim": 8, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_constructor_refuses_a_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="^device: cuda.* not available"):
        EmbeddingIndex(8, device="cuda")


@pytest.mark.parametrize(
    "backend, ran",
    [
        ("reference", "reference"),
        ({"topk_similarity": "reference"}, "reference"),
        ({"attention": "sdpa", "topk_similarity": "reference"}, "reference"),
    ],
    ids=["name", "mapping", "mapping-with-other-ops"],
)
def test_the_backend_spec_reaches_topk_similarity(backend, ran, tmp_path):
    """backend is a BackendSpec, as everywhere: a name or a per-op mapping; search runs the op
    on it (the dispatch trace), and load passes it on."""
    index = EmbeddingIndex(8, backend=backend)
    index.add(torch.randn(5, 8))
    assert index.backend == backend and isinstance(index.backend, (str, dict))
    # a read-only dict (FrozenSpec), not a mappingproxy: copyable and picklable
    assert copy.deepcopy(index).backend == backend
    assert pickle.loads(pickle.dumps(index)).backend == backend
    with _backends.trace() as events:
        index.search(torch.randn(2, 8), 3)
    assert [(e.op, e.backend) for e in events] == [("topk_similarity", ran)]
    index.save(tmp_path / "idx.vfi")
    back = EmbeddingIndex.load(tmp_path / "idx.vfi", backend=backend)
    with _backends.trace() as events:
        back.search(torch.randn(2, 8), 3)
    assert [(e.op, e.backend) for e in events] == [("topk_similarity", ran)]


def test_a_backend_name_topk_does_not_have_is_refused_at_construction():
    """ "sdpa" is a backend name (of attention), not one of topk_similarity, the only op the
    index runs: refused when the index is built or loaded, not at the first search."""
    with pytest.raises(ValueError, match="^backend: topk_similarity has no backend 'sdpa'"):
        EmbeddingIndex(8, backend="sdpa")


def test_numpy_ints_are_accepted():
    index = EmbeddingIndex(np.int64(8))
    assert index.dim == 8 and type(index.dim) is int
    index.add(torch.randn(5, 8))
    scores, ids = index.search(torch.randn(2, 8), np.int32(3))
    assert scores.shape == ids.shape == (2, 3)


@pytest.mark.parametrize(
    "x, ids, name",
    [
        ([[0.0] * 8], None, "x"),
        (torch.randn(2, 3, 8), None, "x"),
        (torch.randn(2, 7), None, "x"),
        (torch.ones(2, 8, dtype=torch.long), None, "x"),
        (torch.tensor([[0.0] * 7 + [float("nan")]]), None, "x"),
        (torch.tensor([[0.0] * 7 + [float("inf")]]), None, "x"),
        (torch.randn(2, 8), torch.tensor([True, False]), "ids"),
        (torch.randn(2, 8), torch.tensor([1.0, 2.0]), "ids"),
        (torch.randn(2, 8), torch.tensor([1, 2], dtype=torch.uint64), "ids"),
        (torch.randn(2, 8), torch.arange(3), "ids"),
        (torch.randn(2, 8), [1, 2], "ids"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_add_refuses_bad_arguments_and_stores_nothing(x, ids, name, metric):
    index = EmbeddingIndex(8, metric=metric)
    index.add(torch.randn(3, 8))
    with pytest.raises(ValueError, match=f"^{name}: "):
        index.add(x, ids=ids)
    assert len(index) == 3


def test_add_refuses_values_that_overflow_the_storage_dtype():
    index = EmbeddingIndex(4, dtype=torch.float16)
    x = torch.randn(3, 4)
    x[1, 2] = 1e5  # finite in float32, inf in float16
    with pytest.raises(ValueError, match="^x: row 1 .*float16"):
        index.add(x)
    assert len(index) == 0
    cos = EmbeddingIndex(4, metric="cosine", dtype=torch.float16)
    cos.add(x)  # normalised first: fits
    assert bool(torch.isfinite(cos.vectors).all())


def test_add_accepts_every_integer_id_dtype():
    index = EmbeddingIndex(4)
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        index.add(torch.randn(2, 4), ids=torch.tensor([5, 6], dtype=dtype))
    assert index.ids.dtype == torch.int64 and index.ids.tolist() == [5, 6] * 5


@pytest.mark.parametrize(
    "q, k, name",
    [
        ([0.0] * 8, 1, "q"),
        (torch.randn(2, 7), 1, "q"),
        (torch.randn(1, 2, 8), 1, "q"),
        (torch.ones(2, 8, dtype=torch.long), 1, "q"),
        (torch.tensor([float("nan")] * 8), 1, "q"),
        (torch.randn(2, 8), 0, "k"),
        (torch.randn(2, 8), 6, "k"),
        (torch.randn(2, 8), True, "k"),
        (torch.randn(2, 8), 2.0, "k"),
        (torch.randn(2, 8), "1", "k"),
        (torch.randn(2, 8), None, "k"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
def test_search_refuses_bad_arguments(q, k, name):
    index = EmbeddingIndex(8)
    index.add(torch.randn(5, 8))
    with pytest.raises(ValueError, match=f"^{name}: "):
        index.search(q, k)


def test_search_of_no_queries_gives_empty_results():
    index = EmbeddingIndex(8)
    index.add(torch.randn(5, 8))
    scores, ids = index.search(torch.empty(0, 8), 3)
    assert scores.shape == ids.shape == (0, 3)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64


def test_to_and_load_refuse_bad_devices_and_backends(tmp_path):
    index = _index()
    with pytest.raises(ValueError, match="^device: "):
        index.to("bogus")
    assert index.device == torch.device("cpu")
    path = tmp_path / "idx.vfi"
    index.save(path)
    with pytest.raises(ValueError, match="^device: "):
        EmbeddingIndex.load(path, device="bogus")
    with pytest.raises(ValueError, match="^backend: "):
        EmbeddingIndex.load(path, backend="nope")
    back = EmbeddingIndex.load(path, backend="reference")
    assert back.backend == "reference" and torch.equal(back.vectors, index.vectors)
