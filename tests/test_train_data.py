"""vljepa_fast.train data: the global-batch schedule, the synthetic clips (pure in (seed, index)),
the token-id path of models without a tokenizer, folder datasets, and feature caches written by
cache_features and read back against model.encode_video."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from vljepa_fast.models import VLJEPA, VLJEPAConfig
from vljepa_fast.train import cache_features as CF
from vljepa_fast.train import synthetic as S
from vljepa_fast.train.data import global_indices, hash_ids, open_data
from vljepa_fast.train.model import build_model
from vljepa_fast.train.presets import Preset, preset

pytestmark = pytest.mark.cpu
TINY = preset("tiny")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread avoids oversubscribing the shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model():
    torch.set_num_threads(1)
    return build_model(TINY, 0, "reference")


def _rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh draws every run


# ------------------------------------------------------------------------------ indices


def test_global_indices_epochs_drop_last_and_shuffle():
    rng = _rng()
    b = int(rng.integers(2, 6))
    n = b * int(rng.integers(2, 5)) + int(rng.integers(1, b))  # a ragged tail, dropped
    seed = int(rng.integers(0, 2**31))
    per_epoch = n // b
    # unshuffled: range(n) in order, the tail never reached, epoch 1 starts over
    got = [global_indices(n, False, seed, s, b) for s in range(2 * per_epoch)]
    assert got[:per_epoch] == [list(range(j * b, (j + 1) * b)) for j in range(per_epoch)]
    assert got[per_epoch:] == got[:per_epoch]
    # shuffled: epoch e is torch.randperm with the documented seed
    for e in range(3):
        g = torch.Generator().manual_seed(seed * 1_000_003 + e)
        order = torch.randperm(n, generator=g).tolist()
        steps = [global_indices(n, True, seed, e * per_epoch + j, b) for j in range(per_epoch)]
        assert steps == [order[j * b : (j + 1) * b] for j in range(per_epoch)]
        flat = sum(steps, [])
        assert len(set(flat)) == len(flat) == per_epoch * b
    assert global_indices(n, True, seed, 0, b) == global_indices(n, True, seed, 0, b)
    # another seed, another order (n >= 5 has 120+ orders: equal first epochs are a bug)
    a = [global_indices(n, True, seed, j, b) for j in range(per_epoch)]
    c = [global_indices(n, True, seed + 1, j, b) for j in range(per_epoch)]
    assert a != c


def test_global_indices_errors():
    with pytest.raises(ValueError, match="batch_size.*larger than the dataset"):
        global_indices(3, True, 0, 0, 4)
    with pytest.raises(ValueError, match="step"):
        global_indices(8, True, 0, -1, 4)
    with pytest.raises(ValueError, match="seed"):
        global_indices(8, True, -1, 0, 4)


# ------------------------------------------------------------------------------ synthetic


@pytest.mark.parametrize("size,frames", [(32, 4), (64, 8), (256, 16)])
def test_sample_draws_the_captioned_shape_and_motion(size, frames):
    """The shape's exact-colour pixels are there in every frame and their centroid moves by
    the step in the caption's direction (noise pixels never hit the colour exactly)."""
    _, _, step = S.geometry(size, frames)
    seed = int(_rng().integers(0, 2**31))
    for index in range(3):
        clip, label = S.sample(seed, index, size, frames)
        assert clip.shape == (3, frames, size, size) and clip.dtype == np.float32
        shape, colour, motion = S.CLASSES[label]
        rgb = np.array(S.COLORS[colour], dtype=np.float32)[:, None, None, None]
        hit = (clip == rgb).all(axis=0)  # [T, H, W]
        assert hit.reshape(frames, -1).any(axis=1).all()
        ys = [np.nonzero(h)[0].mean() for h in hit]
        xs = [np.nonzero(h)[1].mean() for h in hit]
        dy, dx = S.MOTIONS[motion]
        np.testing.assert_allclose(np.diff(ys), dy * step, atol=1e-9)
        np.testing.assert_allclose(np.diff(xs), dx * step, atol=1e-9)
        again, label2 = S.sample(seed, index, size, frames)
        assert label2 == label and np.array_equal(again, clip)


def test_render_keeps_the_example_geometry():
    """examples/train_tiny.py's clips: radius 4..6 pixels, 3 pixels a frame at 32^2 x 4."""
    assert S.geometry(32, 4) == (4, 7, 3)
    for size, frames in ((4, 4), (32, 64)):
        with pytest.raises(ValueError, match="size: .* too small"):
            S.geometry(size, frames)


def test_synthetic_batch_is_a_pure_function_of_indices(tiny_model):
    seed = int(_rng().integers(0, 2**31))
    d = open_data("synthetic:40", TINY, tiny_model, seed=seed)
    assert (d.kind, d.shuffle, len(d)) == ("synthetic", True, 40)
    both, three, seven = d.batch([3, 7]), d.batch([3]), d.batch([7])
    assert both.video.shape == (2, 3, TINY.frames, 32, 32) and both.video.dtype == torch.float32
    assert both.x_features is None and both.indices.tolist() == [3, 7]
    assert torch.equal(both.video[0], three.video[0]) and torch.equal(both.video[1], seven.video[0])
    assert both.target == three.target + seven.target
    assert both.query == [TINY.query] * 2
    clip, label = S.sample(seed, 7, 32, TINY.frames)
    assert torch.equal(seven.video[0], torch.from_numpy(clip))
    assert seven.target == [S.CAPTIONS[label]]
    other = open_data("synthetic:40", TINY, tiny_model, seed=seed + 1).batch([3])
    assert not torch.equal(other.video, three.video)
    assert d.describe() == {"kind": "synthetic", "path": None, "n": 40, "seed": seed,
                            "clip": [3, TINY.frames, 32, 32]}  # fmt: skip
    assert len(open_data("synthetic", TINY, tiny_model, seed=0)) == 2**20
    with pytest.raises(ValueError, match="indices"):
        d.batch([40])


# ------------------------------------------------------------------------------ token ids


def _ids_setup(vocab: int, pad: int):
    """A tiny model whose vocabulary is not the byte one (as the paper's Llama / Gemma): no
    tokenizers, so the data are token ids."""
    cfg = VLJEPAConfig.tiny(vocab_size=vocab, pad_id=pad).replace(freeze_x_encoder=True)
    torch.manual_seed(0)
    model = VLJEPA(cfg, "reference")
    return Preset("ids", cfg, 4, 8), model


def test_hash_ids_avoid_pad_and_stay_in_vocab():
    words = [f"w{i}" for i in range(200)]
    ids, mask = hash_ids([" ".join(words[i : i + 7]) for i in range(0, 200, 7)], 3, 512, 1)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    real = ids[mask]
    assert set(real.tolist()) == {0, 2}  # vocab 3 minus the pad id, both reached
    ids, mask = hash_ids(["a b c d e", "a"], 1000, 3, 7)
    assert ids.shape == (2, 3) and mask.tolist() == [[True] * 3, [True, False, False]]
    assert ids[0, 0] == ids[1, 0] and ids[1, 1:].tolist() == [7, 7]  # same word, same id


def test_paper_like_vocab_gives_ids(tmp_path):
    pad = int(_rng().integers(0, 300))
    p, model = _ids_setup(300, pad)
    assert model.query_tokenizer is None and model.text_tokenizer is None
    d = open_data("synthetic:16", p, model, seed=1)
    b = d.batch(list(range(8)))
    for (ids, mask), max_len in ((b.query, 48), (b.target, 48)):
        assert ids.dtype == torch.int64 and mask.dtype == torch.bool and ids.shape == mask.shape
        assert ids.shape[0] == 8 and ids.shape[1] <= max_len
        assert ids.min() >= 0 and ids.max() < 300 and not (ids[mask] == pad).any()
        assert mask.any(1).all()
    assert (b.query[0] == b.query[0][0]).all()  # one query for every sample
    # the same caption, the same ids; other captions, other ids
    caps = [S.CAPTIONS[S.sample(1, i, 32, 4)[1]] for i in range(8)]
    ref = hash_ids(caps, 300, 48, pad)
    assert torch.equal(b.target[0], ref[0]) and torch.equal(b.target[1], ref[1])
    loss = model(b.video, b.query, b.target)
    assert torch.isfinite(loss)
    # an ids cache round trip keeps the ids (re-padded per batch)
    CF.write_cache(d, model, tmp_path, batch_size=5, shard_size=6, dtype=torch.float32,
                   device=torch.device("cpu"), info={"preset": "ids", "seed": 1})  # fmt: skip
    c = open_data(str(tmp_path), p, model, seed=1)
    idx = [13, 2, 7]
    cb, sb = c.batch(idx), d.batch(idx)
    for got, want in ((cb.query, sb.query), (cb.target, sb.target)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # real captions cannot become ids silently
    _folder(tmp_path / "f", [np.zeros((4, 32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="--data.*query_tokenizer"):
        open_data(str(tmp_path / "f"), p, model, seed=0)


# ------------------------------------------------------------------------------ folders


def _folder(root, clips, lines=None):
    root.mkdir(parents=True)
    (root / "clips").mkdir()
    recs = []
    for i, c in enumerate(clips):
        name = f"clips/c{i}.npy" if isinstance(c, np.ndarray) else f"clips/c{i}.pt"
        np.save(root / name, c) if isinstance(c, np.ndarray) else torch.save(c, root / name)
        recs.append({"video": name, "caption": f"caption number {i}"})
    if len(recs) > 1:
        recs[1]["query"] = "what moves?"
    text = "\n".join(json.dumps(r) for r in recs) if lines is None else lines
    (root / "captions.jsonl").write_text(text + "\n\n", encoding="utf-8")
    return root


def test_folder_round_trip(tmp_path, tiny_model):
    rng = _rng()
    u8 = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)  # [T, H, W, C]
    fl = torch.from_numpy(rng.standard_normal((3, 4, 32, 32)).astype(np.float32))
    root = _folder(tmp_path / "data", [u8, fl, u8[::-1].copy()])
    d = open_data(str(root), TINY, tiny_model, seed=0)
    assert (d.kind, d.shuffle, len(d)) == ("folder", True, 3)
    b = d.batch([1, 0])
    want0 = torch.from_numpy(u8).permute(3, 0, 1, 2).float() / 255
    assert torch.equal(b.video[0], fl) and torch.allclose(b.video[1], want0, atol=0, rtol=0)
    assert b.query == ["what moves?", TINY.query]
    assert b.target == ["caption number 1", "caption number 0"]
    desc = d.describe()
    assert desc["kind"] == "folder" and desc["path"] == str(root.resolve()) and desc["n"] == 3
    assert torch.isfinite(tiny_model(b.video, b.query, b.target))


def test_folder_errors(tmp_path, tiny_model):
    ok = np.zeros((4, 32, 32, 3), np.uint8)
    bad = _folder(tmp_path / "shape", [ok, np.zeros((2, 32, 32, 3), np.uint8)])
    d = open_data(str(bad), TINY, tiny_model, seed=0)
    with pytest.raises(ValueError, match=r"c1\.npy.*\(3, 2, 32, 32\).*\(3, 4, 32, 32\)"):
        d.batch([0, 1])
    cases = {
        "invalid JSON": "{not json",
        "unknown field": json.dumps({"video": "clips/c0.npy", "caption": "x", "lable": 1}),
        "'caption'": json.dumps({"video": "clips/c0.npy", "caption": ""}),
        "no such file": json.dumps({"video": "clips/nope.npy", "caption": "x"}),
        "no records": "",
    }
    for i, (msg, line) in enumerate(cases.items()):
        root = _folder(tmp_path / f"bad{i}", [ok], lines=line)
        with pytest.raises(ValueError, match=f"--data.*{msg}"):
            open_data(str(root), TINY, tiny_model, seed=0)


def test_bad_specs(tmp_path, tiny_model):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for spec in ("", "synthetic:0", "synthetic:x", "synthetic:-3", str(tmp_path / "missing"),
                 str(tmp_path / "file.txt"), str(tmp_path / "empty")):  # fmt: skip
        with pytest.raises(ValueError, match="--data"):
            open_data(spec, TINY, tiny_model, seed=0)


# ------------------------------------------------------------------------------ caches


def test_cache_round_trip(tmp_path, tiny_model):
    seed = int(_rng().integers(0, 1000))
    out = tmp_path / "cache"
    argv = ["--preset", "tiny", "--data", "synthetic:40", "--out", str(out), "--seed", str(seed),
            "--batch-size", "8", "--shard-size", "16", "--backend", "reference",
            "--device", "cpu"]  # fmt: skip
    meta = CF.main(argv)
    assert [s["rows"] for s in meta["shards"]] == [16, 16, 8]
    assert (meta["n"], meta["N"], meta["x_dim"]) == (40, TINY.visual_tokens, 64)
    model = build_model(TINY, seed, "reference")
    assert meta["x_encoder"] == CF.x_encoder_fingerprint(model.x_encoder)
    c = open_data(str(out), TINY, model, seed=seed)
    src = open_data("synthetic:40", TINY, model, seed=seed)
    assert meta["source"] == src.describe() and (c.kind, len(c)) == ("cache", 40)
    idx = [int(i) for i in _rng().permutation(40)[:6]] + [15, 16, 39]  # across shards
    cb, sb = c.batch(idx), src.batch(idx)
    assert cb.video is None and cb.x_features.dtype == torch.float32
    torch.testing.assert_close(cb.x_features, model.encode_video(sb.video), atol=1e-6, rtol=0)
    assert cb.query == sb.query and cb.target == sb.target and cb.indices.tolist() == idx
    assert (
        c.describe()["fingerprint"] and c.describe()["x_encoder_fingerprint"] == meta["x_encoder"]
    )
    # another X-encoder (another seed) is refused
    with pytest.raises(ValueError, match="--data.*another X-encoder"):
        open_data(str(out), TINY, build_model(TINY, seed + 1, "reference"), seed=0)
    # an existing cache is kept unless --overwrite
    with pytest.raises(ValueError, match="--out.*--overwrite"):
        CF.main(argv)
    meta16 = CF.main(argv + ["--overwrite", "--dtype", "bfloat16", "--shard-size", "64"])
    assert meta16["dtype"] == "bfloat16" and len(list(out.glob("shard-*"))) == 1
    b16 = open_data(str(out), TINY, model, seed=seed).batch(idx).x_features
    assert torch.equal(b16, model.encode_video(sb.video).bfloat16().float())


def test_cache_refusals(tmp_path, tiny_model):
    out = tmp_path / "cache"
    CF.main(["--preset", "tiny", "--data", "synthetic:8", "--out", str(out), "--seed", "0",
             "--backend", "reference", "--device", "cpu"])  # fmt: skip
    meta = json.loads((out / "cache.json").read_text())
    for key, value in (("x_dim", 65), ("N", 31)):
        wrong = tmp_path / f"wrong_{key}"
        shutil.copytree(out, wrong)
        (wrong / "cache.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ValueError, match=f"--data.*{key}"):
            open_data(str(wrong), TINY, tiny_model, seed=0)
    half = tmp_path / "half"
    shutil.copytree(out, half)
    (half / "cache.json").unlink()  # shards written, cache.json never: unfinished
    with pytest.raises(ValueError, match="--data.*never finished"):
        open_data(str(half), TINY, tiny_model, seed=0)
    with pytest.raises(ValueError, match="--data.*synthetic:N"):
        CF.main(["--preset", "tiny", "--data", "synthetic", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--data.*already a feature cache"):
        CF.main(["--preset", "tiny", "--data", str(out), "--out", str(tmp_path / "y")])


# ------------------------------------------------------------------------------ review fixes


def test_synthetic_n_is_bounded(tiny_model):
    """A huge N is refused naming --data before torch.randperm would try to allocate it."""
    big = int(_rng().integers(2**31 + 1, 2**62))
    for n in (big, 10**12, "9" * 23, "9" * 5000, "²", "1_000", " 5"):
        with pytest.raises(ValueError, match=r"^--data: .*synthetic:N.*2\*\*31"):
            open_data(f"synthetic:{n}", TINY, tiny_model, seed=0)
    assert len(open_data(f"synthetic:{2**31}", TINY, tiny_model, seed=0)) == 2**31


def _small_cache(path, seed=0, n=12, shard=4):
    CF.main(["--preset", "tiny", "--data", f"synthetic:{n}", "--out", str(path), "--seed",
             str(seed), "--batch-size", "4", "--shard-size", str(shard), "--backend",
             "reference", "--device", "cpu"])  # fmt: skip
    return json.loads((path / "cache.json").read_text())


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A 12-row cache in three 4-row shards (tests copy it before spoiling it)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("small") / "cache"
    _small_cache(out)
    return out


def _edited(tmp_path, src, name, edit_meta=None):
    """A copy of the cache ``src`` with cache.json edited by ``edit_meta(meta)``."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if edit_meta is not None:
        meta = json.loads((dst / "cache.json").read_text())
        edit_meta(meta)
        (dst / "cache.json").write_text(json.dumps(meta))
    return dst


def _refused(root, model, pattern):
    with pytest.raises(ValueError, match=pattern):
        open_data(str(root), TINY, model, seed=0)


def test_cache_truncated_shard(tmp_path, tiny_model, small_cache):
    """One line naming --data and the file, not a SafetensorError traceback."""
    cut = _edited(tmp_path, small_cache, "cut")
    raw = (cut / "shard-00001.safetensors").read_bytes()
    (cut / "shard-00001.safetensors").write_bytes(raw[: int(_rng().integers(1, len(raw)))])
    _refused(cut, tiny_model, r"^--data: shard .*shard-00001\.safetensors: cannot be read")


def test_cache_shard_file_must_be_a_plain_name(tmp_path, tiny_model, small_cache):
    outside = tmp_path / "outside.safetensors"  # a readable shard, only its place is wrong
    outside.write_bytes((small_cache / "shard-00000.safetensors").read_bytes())
    escapes = ("../outside.safetensors", str(outside), "../../etc/passwd", "/etc/passwd",
               "sub/x.safetensors", "..", ".", "")  # fmt: skip
    for i, bad in enumerate(escapes):
        root = _edited(tmp_path, small_cache, f"esc{i}",
                       lambda m, bad=bad: m["shards"][0].update(file=bad))  # fmt: skip
        _refused(root, tiny_model, r"^--data: .*shards\[0\]\.file: expected a plain file name")


def test_cache_shards_belong_to_their_place(tmp_path, tiny_model, small_cache):
    """Swapped in cache.json, a copy over another, a shard of another cache: refused."""
    from safetensors import safe_open

    meta = json.loads((small_cache / "cache.json").read_text())
    assert int(meta["cache_id"], 16) >= 0 and len(meta["cache_id"]) == 32
    for k, s in enumerate(meta["shards"]):  # the metadata a reader checks
        with safe_open(str(small_cache / s["file"]), framework="pt") as f:
            got = {key: f.metadata().get(key) for key in ("cache_id", "first_row", "rows")}
        assert got == {"cache_id": meta["cache_id"], "first_row": str(4 * k), "rows": "4"}
    open_data(str(small_cache), TINY, tiny_model, seed=0)  # the untouched cache opens
    swap = _edited(tmp_path, small_cache, "swap",
                   lambda m: m["shards"].insert(0, m["shards"].pop(1)))  # fmt: skip
    _refused(swap, tiny_model, r"^--data: shard .*shard-00001.*rows from 4.*puts it at rows from 0")
    copy = _edited(tmp_path, small_cache, "copy")
    shutil.copy(copy / "shard-00000.safetensors", copy / "shard-00002.safetensors")
    _refused(copy, tiny_model, r"^--data: shard .*shard-00002.*swapped or copied")
    other = tmp_path / "other"
    _small_cache(other)  # same seed and data: the same tensors, another cache id
    mixed = _edited(tmp_path, small_cache, "mixed")
    shutil.copy(other / "shard-00001.safetensors", mixed / "shard-00001.safetensors")
    _refused(mixed, tiny_model, r"^--data: shard .*shard-00001.*another cache")
    rows = _edited(tmp_path, small_cache, "rows",
                   lambda m: (m["shards"][2].update(rows=3), m.update(n=11)))  # fmt: skip
    _refused(rows, tiny_model, r"^--data: shard .*shard-00002.*\(4 rows\).*\(3 rows\)")
    rows = _edited(tmp_path, small_cache, "rows2", lambda m: m["shards"][0].update(rows="4"))
    _refused(rows, tiny_model, r"^--data: .*shards\[0\]\.rows: expected an int")
    old = _edited(tmp_path, small_cache, "v1", lambda m: m.update(version=1))
    _refused(old, tiny_model, r"^--data: .*not a version 2 feature cache.*cache_features")


def test_cache_dtype_is_checked(tmp_path, tiny_model, small_cache):
    dt = _edited(tmp_path, small_cache, "dtype", lambda m: m.update(dtype="bfloat16"))
    _refused(dt, tiny_model, r"^--data: shard .*shard-00000.*x_features is F32.*BF16.*bfloat16")
    dt = _edited(tmp_path, small_cache, "dtype2", lambda m: m.update(dtype="float16"))
    _refused(dt, tiny_model, r"^--data: .*cache.json dtype")


def _cf_refused(tmp_path, flag, value, pattern):
    """cache_features with ``flag value`` on a small valid command line: refused."""
    argv = ["--preset", "tiny", "--data", "synthetic:8", "--out", str(tmp_path / "c"),
            "--backend", "reference", "--device", "cpu"]  # fmt: skip
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with pytest.raises(ValueError, match=pattern):
        CF.main(argv)
    assert not (tmp_path / "c").exists()


def test_cache_features_flags_are_named(tmp_path):
    _cf_refused(tmp_path, "--seed", str(-int(_rng().integers(1, 100))), r"^--seed: ")
    _cf_refused(tmp_path, "--seed", str(2**32), r"^--seed: ")
    for flag in ("--out", "--data", "--x-encoder"):
        for empty in ("", "  "):
            _cf_refused(tmp_path, flag, empty, f"^{flag}: expected a path")
    _cf_refused(tmp_path, "--x-encoder", str(tmp_path / "nope.safetensors"), r"^--x-encoder\b")


def test_cache_features_device(tmp_path, monkeypatch):
    # no GPU (patched, so the test means the same on a CUDA machine)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:0"):
        _cf_refused(tmp_path, "--device", dev,
                    "^--device: cuda asked for, but torch sees no CUDA device$")  # fmt: skip
    for dev in ("meta", "bogus"):
        _cf_refused(tmp_path, "--device", dev, r"^--device: expected auto, cpu, cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _cf_refused(tmp_path, "--device", "cuda:1", r"^--device: cuda:1 asked for, but torch sees 1")


def test_folder_video_must_stay_inside(tmp_path, tiny_model):
    ok = np.zeros((4, 32, 32, 3), np.uint8)
    elsewhere = _folder(tmp_path / "other", [ok])  # exists: only the path itself is wrong
    target = elsewhere / "clips" / "c0.npy"
    for i, video in enumerate(
        ("../other/clips/c0.npy", str(target), "clips/../../other/clips/c0.npy", ".")
    ):
        root = _folder(
            tmp_path / f"data{i}", [ok], lines="\n" + json.dumps({"video": video, "caption": "x"})
        )
        pattern = rf"^--data: .*data{i}/captions\.jsonl: line 2: video .*inside"
        with pytest.raises(ValueError, match=pattern):
            open_data(str(root), TINY, tiny_model, seed=0)
    root = _folder(tmp_path / "dots", [ok], lines=json.dumps({"video": "./clips/c0.npy",
                                                              "caption": "x"}))  # fmt: skip
    assert len(open_data(str(root), TINY, tiny_model, seed=0)) == 1


def test_folder_clip_errors_at_a_step(tmp_path, tiny_model, monkeypatch):
    """A clip that turned bad after open_data: a ValueError starting --data: naming the file."""
    import vljepa_fast.train.data as D

    rng = _rng()
    good = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    root = _folder(tmp_path / "d", [good, good])
    d = open_data(str(root), TINY, tiny_model, seed=0)
    clip = root / "clips" / "c1.npy"
    nan = rng.standard_normal((3, 4, 32, 32)).astype(np.float32)
    nan[tuple(rng.integers(0, s) for s in nan.shape)] = np.nan
    cases = {
        "nan": lambda: np.save(clip, nan),
        "dtype": lambda: np.save(clip, good.astype(np.int32)),
        "shape": lambda: np.save(clip, good[:, :16]),
        "truncated": lambda: clip.write_bytes(clip.read_bytes()[: int(rng.integers(1, 200))]),
        "folder": lambda: (clip.unlink(), clip.mkdir()),
        "gone": lambda: clip.unlink(),
    }
    for spoil in cases.values():
        if clip.is_dir():
            clip.rmdir()
        np.save(clip, good)
        d.batch([1])  # fine again
        spoil()
        with pytest.raises(ValueError, match=rf"^--data: {root.resolve()}/clips/c1\.npy"):
            d.batch([0, 1])
    if clip.is_dir():
        clip.rmdir()
    np.save(clip, good)
    for exc in (OSError("disk gone"), EOFError(), RuntimeError("zip"), KeyError("x")):

        def boom(path, exc=exc):
            raise exc

        monkeypatch.setattr(D, "load_video", boom)
        with pytest.raises(
            ValueError, match=rf"^--data: .*c1\.npy: cannot be read \({type(exc).__name__}"
        ):
            d.batch([1])


def test_cache_out_and_data_folders_do_not_mix(tmp_path, tiny_model, small_cache):
    """cache_features refuses an --out it cannot create (under a file) and an --out that holds
    a folder dataset (the cache would hide its clips); a --data folder holding both a cache
    and captions.jsonl is refused as ambiguous; shards are readable like cache.json."""
    afile = tmp_path / "afile"
    afile.write_text("")
    _cf_refused(tmp_path, "--out", str(afile / "x"), r"^--out: cannot create")
    clips = _folder(tmp_path / "clips", [np.zeros((4, 32, 32, 3), np.uint8)])
    _cf_refused(tmp_path, "--out", str(clips), r"^--out: .* holds a folder dataset")
    both = _edited(tmp_path, small_cache, "both")
    shutil.copy(clips / "captions.jsonl", both / "captions.jsonl")
    _refused(both, tiny_model, r"^--data: .* holds both cache.json .* and captions.jsonl")
    modes = {p.name: p.stat().st_mode & 0o777 for p in small_cache.iterdir()}
    assert len(set(modes.values())) == 1, modes
