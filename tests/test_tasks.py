"""The model's tasks: classify / answer against a float64 oracle, the label embedding cache and
LabelBank (hits identical, stale results impossible), retrieval over an EmbeddingIndex, and the
Y-decoder inside the model (decode, decoder_loss, caption_stream against a hand-assembled
pipeline), every bad argument named."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vljepa_fast.models as M
from vljepa_fast.nn import EmbeddingIndex


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LABELS = ["red", "blue", "green", "yellow", "a red square", "a blue circle moving left"]
QUESTION = "what color is it?"


def _model(seed: int = 0, **kwargs) -> M.VLJEPA:
    torch.manual_seed(seed)
    return M.VLJEPA(M.VLJEPAConfig.tiny(), **kwargs).eval()


def _video(B: int = 3, seed: int = 0, T: int = 2) -> torch.Tensor:
    return torch.randn(B, 3, T, 32, 32, generator=torch.Generator().manual_seed(seed))


def _exact(model: M.VLJEPA) -> M.VLJEPA:
    """A float64 eager copy: the oracle's model."""
    other = M.VLJEPA(model.config, backend="reference")
    other.load_state_dict(model.state_dict())
    return other.double().eval()


def _oracle_cos(model64: M.VLJEPA, video, question, labels) -> torch.Tensor:
    with torch.no_grad():
        pred = model64.predict(video.double(), question)
        lab = model64.encode_text(list(labels))
    pred = pred / pred.norm(dim=1, keepdim=True)
    lab = lab / lab.norm(dim=1, keepdim=True)
    return pred @ lab.T  # [B, N] float64


def _check_argmax(got_s, got_i, cos, atol=2e-5):
    want_s, want_i = cos.max(dim=1)
    top2 = cos.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 10 * atol, "near tie: the test cannot decide"
    assert got_i.dtype == torch.long and got_s.dtype == torch.float32
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s.double(), want_s, atol=atol, rtol=0)


class _Counter:
    """Counts Y-encoder forward calls and the texts they embed."""

    def __init__(self, module):
        self.calls = self.rows = 0
        module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.calls += 1
        self.rows += out.shape[0]


# ------------------------------------------------------------------------------ answer


@pytest.mark.parametrize("seed", [0, 1])
def test_answer_returns_scores_and_indices_equal_to_a_float64_oracle(seed):
    model = _model(seed)
    exact = _exact(model)
    video = _video(seed=seed)
    scores, idx = model.answer(video, QUESTION, LABELS)
    assert scores.shape == idx.shape == (3,)
    _check_argmax(scores, idx, _oracle_cos(exact, video, QUESTION, LABELS))
    # per-sample candidate lists of different lengths, one a LabelBank
    per = [LABELS[:2], LABELS[1:5], model.encode_labels(LABELS[3:])]
    s, i = model.answer(video, QUESTION, per)
    for b, cands in enumerate([LABELS[:2], LABELS[1:5], LABELS[3:]]):
        cos = _oracle_cos(exact, video[b : b + 1], QUESTION, cands)
        _check_argmax(s[b : b + 1], i[b : b + 1], cos)
    # one shared LabelBank equals the shared list
    s2, i2 = model.answer(video, QUESTION, model.encode_labels(LABELS))
    assert torch.equal(i2, idx)
    torch.testing.assert_close(s2, scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [2, 3])
def test_classify_topk_equals_a_float64_oracle(seed):
    model = _model(seed)
    video = _video(B=2, seed=seed)
    cos = _oracle_cos(_exact(model), video, QUESTION, LABELS)
    for labels in (LABELS, model.encode_labels(LABELS)):
        scores, idx = model.classify(video, QUESTION, labels, k=4)
        want = cos.topk(4, dim=1)
        torch.testing.assert_close(scores.double(), want.values, atol=2e-5, rtol=0)
        gaps = (want.values[:, :-1] - want.values[:, 1:]).min()
        assert gaps > 1e-4 and torch.equal(idx, want.indices)


# ------------------------------------------------------------------------------ caching


def test_cache_hits_are_identical_and_skip_the_y_encoder():
    model = _model(4)
    count = _Counter(model.y_encoder)
    video = _video()
    first = model.classify(video, QUESTION, LABELS, k=3)
    assert count.rows == len(LABELS)
    again = model.classify(video, QUESTION, LABELS, k=3)
    assert count.rows == len(LABELS), "cache hit re-encoded labels"
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # answer shares the cache; only the new text is encoded
    model.answer(video, QUESTION, [LABELS[:3], LABELS[2:], ["brand new", "red"]])
    assert count.rows == len(LABELS) + 1
    # a bank does not touch the Y-encoder once made
    bank = model.encode_labels(LABELS)
    rows = count.rows
    got = model.classify(video, QUESTION, bank, k=3)
    assert count.rows == rows and torch.equal(got[1], first[1])
    torch.testing.assert_close(got[0], first[0], atol=1e-6, rtol=0)


def _fresh(model: M.VLJEPA, video, labels, k=3):
    """Ground truth: the same weights, no cache."""
    other = M.VLJEPA(model.config)
    other.load_state_dict(model.state_dict())
    other.train(model.training)
    return other.classify(video, QUESTION, labels, k=k)


def _assert_same(a, b):
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)


def test_stale_cache_is_impossible_after_an_optimizer_step():
    model = _model(5)
    video = _video()
    before = model.classify(video, QUESTION, LABELS, k=3)
    bank = model.encode_labels(LABELS)
    opt = torch.optim.SGD(model.y_encoder.parameters(), lr=5.0)
    model.train()
    loss = model(video, QUESTION, LABELS[:3])
    loss.backward()
    opt.step()
    model.eval()
    after = model.classify(video, QUESTION, LABELS, k=3)
    _assert_same(after, _fresh(model, video, LABELS))
    assert not torch.equal(after[0], before[0]), "the step changed nothing (test cannot fail)"
    with pytest.raises(ValueError, match="label_texts: this LabelBank is stale"):
        model.classify(video, QUESTION, bank)
    with pytest.raises(ValueError, match=r"candidates\[1\]: this LabelBank is stale"):
        model.answer(video, QUESTION, [LABELS, bank, LABELS])


def test_stale_cache_is_impossible_after_load_state_dict_inplace_edit_and_dtype():
    model, other = _model(6), _model(7)
    video = _video()
    model.classify(video, QUESTION, LABELS)
    model.load_state_dict(other.state_dict())
    _assert_same(model.classify(video, QUESTION, LABELS, k=3), _fresh(other, video, LABELS))
    with torch.no_grad():
        model.y_encoder.head.weight.mul_(-1.0)  # flips every cosine: an in-place edit
    flipped = model.classify(video, QUESTION, LABELS, k=3)
    _assert_same(flipped, _fresh(model, video, LABELS))
    _assert_same(model.classify(video, QUESTION, LABELS, k=3), flipped)
    bank = model.encode_labels(LABELS)
    model.double()
    with pytest.raises(ValueError, match="LabelBank is stale"):
        model.classify(video.double(), QUESTION, bank)
    got = model.classify(video.double(), QUESTION, LABELS, k=3)
    assert torch.equal(got[1], flipped[1])


def test_train_mode_bypasses_the_cache_and_refuses_an_eval_bank():
    model = _model(8)
    count = _Counter(model.y_encoder)
    video = _video()
    bank = model.encode_labels(LABELS)
    model.train()
    model.classify(video, QUESTION, LABELS)
    model.classify(video, QUESTION, LABELS)
    assert count.calls == 3 and len(model._label_cache) == 0
    with pytest.raises(ValueError, match="train/eval mode"):
        model.classify(video, QUESTION, bank)
    model.eval()
    model.classify(video, QUESTION, bank)  # valid again: the same weights and mode


def test_a_new_text_tokenizer_invalidates_and_another_models_bank_is_refused():
    model = _model(9)
    video = _video()
    model.classify(video, QUESTION, LABELS)
    model.text_tokenizer = M.ByteTokenizer(48)
    count = _Counter(model.y_encoder)
    model.classify(video, QUESTION, LABELS)
    assert count.calls == 1
    with pytest.raises(ValueError, match="another model's"):
        model.classify(video, QUESTION, _model(9).encode_labels(LABELS))


def test_inference_mode_weights_bypass_the_cache_and_refuse_a_bank():
    """Regression: inference tensors have no version counter (reading it raised RuntimeError)."""
    with torch.inference_mode():
        model = _model(19)
    count = _Counter(model.y_encoder)
    video = _video()
    with torch.inference_mode():
        video = video.clone()
        first = model.classify(video, QUESTION, LABELS, k=len(LABELS))
        head = model.y_encoder.head
        head.weight.mul_(-1.0)  # untracked in-place edit: every text embedding negated
        head.bias.mul_(-1.0)
        second = model.classify(video, QUESTION, LABELS, k=len(LABELS))
        bank = model.encode_labels(LABELS)
    assert count.calls == 3 and len(model._label_cache) == 0
    torch.testing.assert_close(second[0], -first[0].flip(1), atol=1e-5, rtol=0)
    assert torch.equal(second[1], first[1].flip(1))
    with pytest.raises(ValueError, match="label_texts: a LabelBank cannot be checked"):
        model.classify(video, QUESTION, bank)


def test_cache_size_is_bounded():
    model = _model(10)
    model.label_cache_size = 3
    video = _video()
    got = model.classify(video, QUESTION, LABELS, k=2)
    assert len(model._label_cache) == 3
    _assert_same(got, _fresh(model, video, LABELS, k=2))
    model.label_cache_size = 0
    model.clear_label_cache()
    count = _Counter(model.y_encoder)
    model.classify(video, QUESTION, LABELS)
    model.classify(video, QUESTION, LABELS)
    assert count.calls == 2 and len(model._label_cache) == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, v: m.classify(v, "q", []), "label_texts: expected at least one label"),
        (lambda m, v: m.classify(v, "q", "red"), "label_texts: expected a list of strings"),
        (lambda m, v: m.classify(v, "q", ["a", 1]), r"label_texts\[1\]: expected a string"),
        (lambda m, v: m.classify(v, "q", ["a"], k=2), r"k: expected an int in \[1, 1\]"),
        (lambda m, v: m.answer(v, "q", []), "candidates: expected at least one"),
        (lambda m, v: m.answer(v, "q", [["a"], ["b"]]), "candidates: expected one shared list"),
        (lambda m, v: m.answer(v, "q", [["a"], [], ["b"]]), r"candidates\[1\]: expected at le"),
        (lambda m, v: m.answer(v, "q", [["a"], "b", ["c"]]), r"candidates\[1\]: expected a lis"),
        (lambda m, v: m.answer(v, "q", 3), "candidates: expected a list of strings"),
        (lambda m, v: m.encode_labels([]), "texts: expected a non-empty list of strings"),
        (lambda m, v: m.encode_labels(["a"], batch_size=0), "batch_size: expected an int >= 1"),
    ],
)
def test_task_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(_model(11), _video())


# ------------------------------------------------------------------------------ retrieval


def test_retrieval_over_an_embedding_index_equals_the_tensor_path():
    model = _model(12)
    videos = _video(B=7, seed=3)
    texts = ["red", "blue circle", "green"]
    want_s, want_i = model.retrieve(texts, videos, "caption", k=4)
    index = model.index_videos(videos, "caption", batch_size=3)
    assert isinstance(index, EmbeddingIndex) and len(index) == 7 and index.metric == "cosine"
    s, i = model.retrieve(texts, index, k=4)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(s, want_s, atol=1e-5, rtol=0)
    # the same gallery from an iterable of batches, then grown
    again = model.index_videos(iter([videos[:4], videos[4:]]), "caption")
    torch.testing.assert_close(again.vectors, index.vectors, atol=1e-5, rtol=0)
    model.index_videos(videos[:2], "caption", index=again)
    assert len(again) == 9 and again.ids.tolist() == list(range(9))
    # float64 oracle of the scores
    exact = _exact(model)
    with torch.no_grad():
        t = F.normalize(exact.encode_text(texts), dim=1)
        v = F.normalize(exact.predict(videos.double(), "caption"), dim=1)
    want = (t @ v.T).topk(4, dim=1)
    torch.testing.assert_close(s.double(), want.values, atol=2e-5, rtol=0)
    assert torch.equal(i, want.indices)


def test_retrieval_bad_arguments_are_named():
    model = _model(13)
    videos = _video(B=3)
    index = model.index_videos(videos, "caption")
    with pytest.raises(ValueError, match="query: not used with an EmbeddingIndex"):
        model.retrieve("red", index, "caption")
    with pytest.raises(ValueError, match="query: required to embed a video tensor"):
        model.retrieve("red", videos)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 3\]"):
        model.retrieve("red", index, k=4)
    with pytest.raises(ValueError, match="index: expected an EmbeddingIndex of dim 32 and metric"):
        model.retrieve("red", EmbeddingIndex(32, "ip"))
    with pytest.raises(ValueError, match="index: expected an EmbeddingIndex of dim 32"):
        model.index_videos(videos, "caption", index=EmbeddingIndex(16, "cosine"))
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        model.index_videos(videos, "caption", batch_size=0)


# ------------------------------------------------------------------------------ Y-decoder


def test_decode_and_decoder_loss_match_the_decoder_run_by_hand():
    model = _model(14)
    tok = M.ByteTokenizer()
    emb = torch.randn(3, 32)
    rows = model.y_decoder.generate(emb, 10)
    assert model.decode(emb, max_new_tokens=10) == [tok.decode(r) for r in rows]
    assert model.decode(emb.double(), max_new_tokens=10) == [tok.decode(r) for r in rows]
    texts = ["red", "a blue circle"]
    framed = [[257, *tok.encode(t), 258] for t in texts]
    ids = torch.full((2, len(framed[1])), 256)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, r in enumerate(framed):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), True
    want = model.y_decoder.loss(emb[:2], ids, mask)
    torch.testing.assert_close(model.decoder_loss(emb[:2], texts), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"texts: .* more than the Y-decoder's max_len - 2 \(46"):
        model.decoder_loss(emb[:1], ["x" * 47])
    with pytest.raises(ValueError, match="texts: expected a list of strings"):
        model.decoder_loss(emb[:1], "red")
    with pytest.raises(ValueError, match=r"embeddings: expected \[B, 32\], got \(2, 5\)"):
        model.decode(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"embeddings: expected \[B, 32\], got \(32,\)"):
        model.decode(torch.randn(32))
    with pytest.raises(ValueError, match=r"max_new_tokens: expected 1\.\.47, got True"):
        model.decode(emb, max_new_tokens=True)
    with pytest.raises(ValueError, match="embeddings: expected a floating"):
        model.decode(torch.ones(2, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="y_decoder: the model was built with y_decoder=False"):
        _model(14, y_decoder=False).decode(emb)


def _stream(T: int = 24, seed: int = 0) -> torch.Tensor:
    """Two scenes (a constant clip each, with a little noise)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 3, 1, 32, 32, generator=g)
    frames = torch.cat([a.expand(-1, T // 2, -1, -1), b.expand(-1, T - T // 2, -1, -1)], 1)
    return frames + 0.05 * torch.randn(frames.shape, generator=g)


def _by_hand(model, frames, window, stride, query, seg_fn, max_new_tokens, mode="mean"):
    T = frames.shape[1]
    starts = list(range(0, T - window + 1, stride))
    with torch.no_grad():
        emb = model.predict(torch.stack([frames[:, s : s + window] for s in starts]), query)
    seg = seg_fn(emb)
    tok = M.ByteTokenizer()
    caps = [
        tok.decode(r)
        for r in model.y_decoder.generate(M.segment_embeddings(emb, seg, mode), max_new_tokens)
    ]
    ends = seg.tolist()[1:] + [len(starts)]
    spans = [(starts[a], starts[e - 1] + window) for a, e in zip(seg.tolist(), ends)]
    return starts, emb, seg, caps, spans


@pytest.mark.parametrize(("window", "stride", "T"), [(4, 2, 24), (2, 3, 23), (6, 6, 25)])
def test_caption_stream_equals_the_pipeline_assembled_by_hand(window, stride, T):
    model = _model(15)
    frames = _stream(T)
    W = (T - window) // stride + 1
    starts, emb, seg, caps, spans = _by_hand(
        model, frames, window, stride, "describe", lambda e: M.temporal_ward_segments(e, 2), 8
    )
    out = model.caption_stream(
        frames, window, stride, n_segments=2, query="describe", batch_size=64, max_new_tokens=8
    )
    assert isinstance(out, M.StreamCaptions) and out.windows == W == len(starts)
    assert out.window_starts.tolist() == starts
    assert torch.equal(out.embeddings, emb)  # one batch: bitwise
    assert torch.equal(out.segment_starts, seg) and out.segments == spans
    assert out.captions == caps and len(caps) == 2
    assert out.decoder_calls == 2 and out.calls_saved == W - 2
    # batched window by window: the same up to rounding
    small = model.caption_stream(
        frames, window, stride, n_segments=2, query="describe", batch_size=1, max_new_tokens=8
    )
    torch.testing.assert_close(small.embeddings, emb, atol=1e-5, rtol=1e-5)
    assert torch.equal(small.segment_starts, seg)


def test_caption_stream_online_variant_and_midpoints():
    model = _model(16)
    frames = _stream(30, seed=1)
    with torch.no_grad():
        probe = model.predict(torch.stack([frames[:, s : s + 2] for s in range(0, 29, 2)]), "d")
    thr = 0.3 * float(probe.var(0).sum())

    def online(e):
        return M.online_segment_starts(e, 3, thr)

    want = _by_hand(model, frames, 2, 2, "d", online, 6, mode="midpoint")
    out = model.caption_stream(
        frames, 2, 2, threshold=thr, variance_window=3, query="d", mode="midpoint",
        batch_size=64, max_new_tokens=6,
    )  # fmt: skip
    assert torch.equal(out.segment_starts, want[2]) and out.captions == want[3]
    assert out.segments == want[4] and out.decoder_calls == len(want[2]) >= 1
    assert out.calls_saved == out.windows - out.decoder_calls == 15 - len(want[2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "n_segments, threshold: give exactly one"),
        ({"n_segments": 2, "threshold": 1.0}, "n_segments, threshold: give exactly one"),
        (
            {"frames": torch.randn(3, 8, 32), "n_segments": 2},
            r"frames: expected a floating \[C, T, H, W\]",
        ),
        (
            {"frames": torch.ones(3, 8, 32, 32, dtype=torch.long), "n_segments": 2},
            "frames: expected a floating",
        ),
        (
            {"window": 3, "n_segments": 2},
            r"window: expected a positive multiple of the tubelet \(2\)",
        ),
        ({"window": 0, "n_segments": 2}, "window: expected a positive multiple"),
        ({"window": True, "n_segments": 2}, "window: expected a positive multiple"),
        (
            {"window": 10, "n_segments": 2},
            r"frames: the stream has 8 frames, fewer than window \(10\)",
        ),
        ({"stride": 0, "n_segments": 2}, "stride: expected an int >= 1"),
        ({"stride": 1.5, "n_segments": 2}, "stride: expected an int >= 1"),
        ({"n_segments": 0}, r"n_segments: expected an int in \[1, 4\] \(the stream has 4 w"),
        ({"n_segments": 5}, r"n_segments: expected an int in \[1, 4\]"),
        ({"threshold": 0.0}, "threshold: expected a finite number > 0"),
        ({"threshold": math.nan}, "threshold: expected a finite number > 0"),
        ({"threshold": "1"}, "threshold: expected a number > 0"),
        ({"threshold": 1.0, "variance_window": 1}, "variance_window: expected an int >= 2"),
        ({"n_segments": 2, "mode": "max"}, "mode: expected 'mean' or 'midpoint'"),
        ({"n_segments": 2, "batch_size": 0}, "batch_size: expected an int >= 1"),
        ({"n_segments": 2, "max_new_tokens": 0}, r"max_new_tokens: expected 1\.\.47"),
        ({"n_segments": 2, "max_new_tokens": 2.0}, r"max_new_tokens: expected 1\.\.47"),
        ({"n_segments": 2, "query": 5}, "query: expected a string"),
    ],
)
def test_caption_stream_bad_arguments_are_named(kwargs, match):
    model = _model(17)
    args = {"frames": torch.randn(3, 8, 32, 32), "window": 2, "stride": 2, **kwargs}
    frames, window, stride = args.pop("frames"), args.pop("window"), args.pop("stride")
    with pytest.raises(ValueError, match=match):
        model.caption_stream(frames, window, stride, **args)


def test_caption_stream_needs_a_decoder_and_its_tokenizer():
    frames = torch.randn(3, 8, 32, 32)
    with pytest.raises(ValueError, match="y_decoder: the model was built with y_decoder=False"):
        _model(18, y_decoder=False).caption_stream(frames, 2, 2, n_segments=1)
    real = M.VLJEPA(M.VLJEPAConfig.tiny(vocab_size=300, pad_id=3, bos_id=1, eos_id=2))
    with pytest.raises(ValueError, match="decoder_tokenizer: the Y-decoder's vocabulary"):
        real.caption_stream(frames, 2, 2, n_segments=1, query=(torch.ones(1, 3).long(), None))


# ------------------------------------------------------------------------------ NaN rule


class _Calls:
    """Counts predictor forward calls."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.n += 1


def _nan_video(B=3, row=1, seed=0):
    v = _video(B=B, seed=seed)
    v[row, 0, 0, 0, 0] = math.nan
    return v


def test_nan_inputs_are_refused_by_every_task_naming_the_argument_and_rows():
    model = _model(20)
    rows = r"the predicted embeddings of rows \[1\] are not finite"
    video = _nan_video()
    with pytest.raises(ValueError, match="video: " + rows):
        model.classify(video, QUESTION, LABELS, k=2)
    with pytest.raises(ValueError, match="video: " + rows):
        model.answer(video, QUESTION, LABELS)
    with pytest.raises(ValueError, match="video: " + rows):
        model.answer(video, QUESTION, [["red"], ["blue", "green"], ["red", "blue"]])
    with pytest.raises(ValueError, match="videos: " + rows):
        model.retrieve("red", video, QUESTION, k=1)
    inf = _video(B=4)
    inf[3, 1] = math.inf
    with pytest.raises(ValueError, match=r"video: the predicted embeddings of rows \[3\]"):
        model.classify(inf, QUESTION, LABELS)
    with pytest.raises(ValueError, match=r"embeddings: rows \[0\] are not finite"):
        model.decode(torch.full((1, 32), math.nan))
    # finite inputs are untouched by the check
    s, i = model.classify(_video(), QUESTION, LABELS, k=2)
    assert torch.isfinite(s).all() and i.shape == (3, 2)


def test_index_videos_refuses_a_nan_video_per_batch_before_embedding_the_rest():
    model = _model(21)
    gallery = _video(B=5, seed=4)
    gallery[2, 1, 0] = math.nan
    calls = _Calls(model.predictor)
    index = EmbeddingIndex(32, "cosine")
    with pytest.raises(ValueError, match=r"videos: the predicted embeddings of videos \[2\]"):
        model.index_videos(gallery, "caption", index=index, batch_size=1)
    assert calls.n == 3 and len(index) == 2  # stopped at the bad batch
    # positions count over the batches of an iterable too
    with pytest.raises(ValueError, match=r"videos: the predicted embeddings of videos \[2\]"):
        model.index_videos(iter([gallery[:2], gallery[2:]]), "caption")


def test_caption_stream_refuses_nan_frames_per_batch_before_embedding_the_rest():
    model = _model(22)
    frames = _stream(T=24)
    frames[:, 5] = math.nan  # in the window starting at frame 4 (window 2, stride 2): window 2
    calls = _Calls(model.predictor)
    match = r"frames: the predicted embeddings of windows \[2\] \(first frames \[4\]\)"
    with pytest.raises(ValueError, match=match):
        model.caption_stream(frames, 2, 2, n_segments=2, batch_size=1, max_new_tokens=2)
    assert calls.n == 3  # windows 0, 1, 2: never the other nine
    with pytest.raises(ValueError, match=match):
        model.caption_stream(frames, 2, 2, threshold=0.1, batch_size=4, max_new_tokens=2)


def test_non_finite_label_and_candidate_embeddings_are_refused_by_name():
    model = _model(23)
    with torch.no_grad():  # every text holding a "z" embeds to NaN
        model.y_encoder.embed_tokens.weight[ord("z")] = math.nan
    video = _video()
    labels = ["red", "zebra", "blue"]
    with pytest.raises(ValueError, match=r"label_texts: the Y-encoder embeddings of texts \[1\] "):
        model.classify(video, QUESTION, labels)
    ids, mask = M.ByteTokenizer()(labels)
    with pytest.raises(ValueError, match=r"label_texts: the Y-encoder embeddings of texts \[1\]"):
        model.classify(video, QUESTION, (ids, mask))
    with pytest.raises(ValueError, match=r"candidates: the Y-encoder embeddings of texts \[1\]"):
        model.answer(video, QUESTION, labels)
    with pytest.raises(ValueError, match=r"candidates: .*candidates\[1\]\[0\] \('zebra'\)"):
        model.answer(video, QUESTION, [["red"], ["zebra", "blue"], ["blue"]])
    with pytest.raises(ValueError, match=r"texts: the Y-encoder embeddings of texts \[0\]"):
        model.encode_labels(["zoo", "red"])
    with pytest.raises(ValueError, match=r"text: the Y-encoder embeddings of texts \[0\]"):
        model.retrieve("zoo", video, QUESTION)
    index = model.index_videos(video, QUESTION)
    with pytest.raises(ValueError, match=r"text: the Y-encoder embeddings of texts \[1\]"):
        model.retrieve(["red", "zoo"], index)
    s, _ = model.classify(video, QUESTION, ["red", "blue"])  # the others still work
    assert torch.isfinite(s).all()


# ------------------------------------------------------------------------------ messages


def test_task_errors_name_the_users_arguments_not_internal_ones():
    model = _model(24)
    video = _video(B=2)
    with pytest.raises(ValueError, match=r"embeddings: expected at least one row"):
        model.decode(torch.randn(0, 32))
    with pytest.raises(ValueError, match=r"texts: 1 captions for 2 embeddings"):
        model.decoder_loss(torch.randn(2, 32), ["a"])
    with pytest.raises(ValueError, match=r"texts\[1\]: expected a string, got int"):
        model.decoder_loss(torch.randn(2, 32), ["a", 1])
    with pytest.raises(ValueError, match=r"query: 3 queries for 2 videos \(video batch 2\)"):
        model.predict(video, ["q1", "q2", "q3"])
    feats = model.encode_video(video)
    with pytest.raises(ValueError, match=r"query: 3 queries for 2 videos \(x_features batch 2"):
        model.predict(None, ["q1", "q2", "q3"], x_features=feats)
    with pytest.raises(ValueError, match=r"query: 3 queries for 2 videos"):
        model(video, ["q1", "q2", "q3"], ["a", "b"])
    with pytest.raises(ValueError, match=r"query\[1\]: expected a string, got int"):
        model.predict(video, ["q1", 2])
    bad_ids = (torch.full((2, 3), 999), None)
    with pytest.raises(ValueError, match=r"query: token ids must lie in \[0, 260\)"):
        model.predict(video, bad_ids)
    with pytest.raises(ValueError, match=r"text: token ids must lie in \[0, 260\)"):
        model.encode_text(bad_ids)
    with pytest.raises(ValueError, match=r"target: token ids must lie in \[0, 260\)"):
        model(video, "q", bad_ids)
    with pytest.raises(ValueError, match=r"label_texts: token ids must lie in \[0, 260\)"):
        model.classify(video, "q", bad_ids)
    with pytest.raises(ValueError, match=r"candidates\[1\]\[0\]: expected a string, got int"):
        model.answer(video, "q", [["a"], [3]])
    with pytest.raises(ValueError, match=r"texts\[1\]: expected a string, got NoneType"):
        model.encode_labels(["a", None])
    with pytest.raises(ValueError, match=r"videos: expected 3 channels"):
        model.retrieve("red", torch.randn(2, 4, 2, 32, 32), "q")
    with pytest.raises(ValueError, match=r"videos: frame size 30x30"):
        model.index_videos(torch.randn(2, 3, 2, 30, 30), "q")
    with pytest.raises(ValueError, match=r"videos \(batch 1\): expected 3 channels"):
        model.index_videos([video, torch.randn(1, 4, 2, 32, 32)], "q")
    with pytest.raises(ValueError, match=r"frames: frame size 30x30"):
        model.caption_stream(torch.randn(3, 8, 30, 30), 2, 2, n_segments=1)
    long = torch.randn(3, 20, 32, 32)
    with pytest.raises(ValueError, match=r"window: 18 frames, more than the X-encoder's max_f"):
        model.caption_stream(long, 18, 2, n_segments=1)
    wrong = M.VLJEPA(
        model.config, text_tokenizer=lambda t: (torch.full((len(t), 2), 999), None)
    ).eval()
    with pytest.raises(ValueError, match=r"text_tokenizer output: token ids must lie in"):
        wrong.encode_text(["a"])


# ------------------------------------------------------------------------------ reprs


def test_label_bank_stream_captions_and_index_reprs_are_short():
    model = _model(25)
    texts = [f"label number {i} " * 2 for i in range(300)]
    bank = model.encode_labels(texts)
    r = repr(bank)
    assert len(r) < 300 and "300 texts" in r and "[300, 32]" in r and "float32" in r
    assert "tensor(" not in r
    out = model.caption_stream(_stream(T=24), 2, 2, n_segments=3, max_new_tokens=40)
    r = repr(out)
    assert len(r) < 400 and "windows=12" in r and "segments=3" in r and "[12, 32]" in r
    assert "tensor(" not in r
    index = model.index_videos(_video(B=3), "q")
    assert index.ntotal == len(index) == 3 and "ntotal=3" in repr(index)
    model.index_videos(_video(B=2), "q", index=index)
    assert index.ntotal == 5
    with pytest.raises(AttributeError):
        index.ntotal = 7
