"""cpu tier: vf.nn.EmbeddingIndex files (adversarial loading, atomic saves, stale temporaries,
permissions, symlinks) and the argument checks of its API.

The search results themselves are tested against the reference in test_topk_similarity.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import vljepa_fast as vf
from vljepa_fast import nn as vnn

EmbeddingIndex = vf.nn.EmbeddingIndex
# torch's own note when it validates the sparse tensor that one malformed file holds
pytestmark = pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
TMP_RE = re.compile(r"\.idx\.vfi\.tmp-(\d+)-[0-9a-f]{8}")


def _index(n=30, dim=12, metric="cosine", dtype=torch.bfloat16, seed=0) -> EmbeddingIndex:
    g = torch.Generator().manual_seed(seed)
    index = EmbeddingIndex(dim, metric=metric, dtype=dtype)
    index.add(torch.randn(n, dim, generator=g), ids=torch.randint(0, 10**9, (n,), generator=g))
    return index


def _state(index: EmbeddingIndex) -> dict:
    """The payload :meth:`EmbeddingIndex.save` writes, as a dict to corrupt."""
    return {
        "dim": index.dim,
        "metric": index.metric,
        "dtype": str(index.dtype).removeprefix("torch."),
        "vectors": index.vectors.clone(),
        "ids": index.ids.clone(),
    }


def _write_payload(path, payload: bytes) -> None:
    """A file whose header and checksum are valid for ``payload``, whatever it holds."""
    digest = hashlib.sha256(payload).digest()
    path.write_bytes(vnn._MAGIC + vnn._HEADER.pack(digest, len(payload)) + payload)


def _craft(path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _write_payload(path, buf.getvalue())


def _raises_naming(path, *words):
    """pytest.raises(ValueError) whose message names the file, then every word, in order."""
    pattern = re.escape(str(path)) + "".join(".*" + re.escape(w) for w in words)
    return pytest.raises(ValueError, match=re.compile(pattern, re.S))


def _payload(path) -> bytes:
    return path.read_bytes()[len(vnn._MAGIC) + vnn._HEADER.size :]


# -------------------------------------------------------------------- adversarial payloads


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


BAD_FIELDS = {
    # the cases: 100 ids but 10 vector rows, float ids, dim / dtype unlike the header
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
    "dtype-not-str": (_set(dtype=torch.bfloat16), "dtype"),
    "metric-unknown": (_set(metric="l2"), "metric"),
    "metric-none": (_set(metric=None), "metric"),
    "vectors-list": (_vectors(lambda v: v.tolist()), "vectors"),
    "vectors-1d": (_vectors(lambda v: v.flatten()), "vectors"),
    "vectors-3d": (_vectors(lambda v: v[None]), "vectors"),
    "vectors-float64": (_vectors(lambda v: v.double()), "vectors"),
    "vectors-nan": (_vectors(_nan_row), "vectors"),
    "vectors-inf": (_vectors(_inf_row), "vectors"),
    "vectors-not-unit": (_vectors(lambda v: v * 3), "vectors"),
    "vectors-short-rows": (_vectors(lambda v: v * 0.02), "vectors"),  # was accepted
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
    "vectors-sparse": (_vectors(lambda v: v.float().to_sparse()), "vectors"),
    **{f"missing-{k}": (_drop(k), k) for k in ("dim", "metric", "dtype", "vectors", "ids")},
    "extra-field": (_set(count=30), "count"),
}


@pytest.mark.parametrize("mutate, field", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_load_refuses_every_malformed_field(tmp_path, mutate, field):
    """Valid magic, length and checksum, inconsistent content: a ValueError naming the file and
    the field, never another exception and never an index that disagrees with its header."""
    path = tmp_path / "bad.vfi"
    _craft(path, mutate(_state(_index())))
    with _raises_naming(path, "malformed", field):
        EmbeddingIndex.load(path)


@pytest.mark.parametrize("payload", [[1, 2, 3], torch.zeros(3), None, 7, "index", (1, 2)], ids=repr)
def test_load_refuses_a_payload_that_is_not_a_dict(tmp_path, payload):
    path = tmp_path / "bad.vfi"
    _craft(path, payload)
    with _raises_naming(path, "malformed", "dict payload"):
        EmbeddingIndex.load(path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_load_never_runs_code_from_the_file(tmp_path):
    """A pickle that would call exec (valid checksum): refused, and exec is never called."""
    marker, path = tmp_path / "ran", tmp_path / "evil.vfi"
    state = _state(_index())
    state["metric"] = _RunsCode(marker)
    _craft(path, state)
    with _raises_naming(path, "malformed", "weights-only"):
        EmbeddingIndex.load(path)
    assert not marker.exists()


def test_load_refuses_a_payload_that_is_not_an_archive(tmp_path):
    path = tmp_path / "junk.vfi"
    _write_payload(path, b"not a zip archive at all")
    with _raises_naming(path, "malformed"):
        EmbeddingIndex.load(path)


# ------------------------------------------------------------------- headers and paths


def test_load_refuses_broken_headers(tmp_path):
    _index().save(tmp_path / "idx.vfi")
    data = (tmp_path / "idx.vfi").read_bytes()
    head = len(vnn._MAGIC) + vnn._HEADER.size
    cases = {
        "empty": (b"", "bad header"),
        "magic-only": (vnn._MAGIC, "bad header"),
        "in-header": (data[: head - 3], "bad header"),
        "wrong-magic": (b"X" + data[1:], "bad header"),
        "truncated": (data[:-10], "truncated or corrupt"),
        "header-only": (data[:head], "truncated or corrupt"),
        "trailing": (data + b"\0", "truncated or corrupt"),
        "checksum": (data[:-1] + bytes([data[-1] ^ 1]), "checksum mismatch"),
        "digest": (
            data[: len(vnn._MAGIC)] + b"\0" * 32 + data[len(vnn._MAGIC) + 32 :],
            "checksum mismatch",
        ),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with _raises_naming(path, words):
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


def test_load_fuzzed_byte_flips_always_raise_value_error(tmp_path):
    """Random flips anywhere in a saved file: always a ValueError naming the file."""
    src = tmp_path / "idx.vfi"
    _index().save(src)
    data = src.read_bytes()
    rng = random.Random(0)
    path = tmp_path / "flipped.vfi"
    for _ in range(300):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        with _raises_naming(path):
            EmbeddingIndex.load(path)


def test_load_fuzzed_payload_with_valid_checksum_never_raises_another_type(tmp_path):
    """Flips and cuts in the payload with the checksum recomputed (the adversary's file): the
    load either gives an index that passed every check or a ValueError naming the file."""
    src = tmp_path / "idx.vfi"
    _index().save(src)
    payload = _payload(src)
    rng = random.Random(1)
    path = tmp_path / "fuzzed.vfi"
    loaded = refused = 0
    for i in range(300):
        fuzzed = bytearray(payload)
        if i % 3 == 0:
            fuzzed = fuzzed[: rng.randrange(len(fuzzed))]
        else:
            for _ in range(rng.randint(1, 3)):
                fuzzed[rng.randrange(len(fuzzed))] = rng.randrange(256)
        _write_payload(path, bytes(fuzzed))
        try:
            back = EmbeddingIndex.load(path)
        except ValueError as e:
            assert str(path) in str(e)
            refused += 1
            continue
        loaded += 1  # the flips hit bytes no check can tell from data (vector values, ids)
        assert back.vectors.shape == (len(back), back.dim) and back.ids.shape == (len(back),)
        assert bool(torch.isfinite(back.vectors).all())
    assert refused > 0


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
        if vnn._process_start(live.pid) is not None:  # /proc: a reused pid is detected
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
        ({"backend": "sdpa"}, "backend"),  # an attention backend, not a top-k one
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
