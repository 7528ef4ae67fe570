"""The built-in Y-encoder is transformers' Gemma3TextModel run bidirectionally (EmbeddingGemma)
plus its sentence-transformers stack, and loads both public layouts.

Oracles: tiny RANDOM transformers models (no hub), a float64 naive Gemma-3 written here, and a
float64 mean-pool / Dense / normalise written here (sentence-transformers is not needed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch

import vljepa_fast.models as M
from vljepa_fast.models import y_encoder as Y

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SLIDING, FULL = "sliding_attention", "full_attention"


def _hf_config(**changes):
    """A tiny bidirectional Gemma-3: sliding AND global layers, GQA 4/2, head_dim 16 (not
    hidden / heads), window 9 -> each sliding query sees |i - j| <= 4."""
    kw = dict(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        query_pre_attn_scalar=12,
        sliding_window=9,
        layer_types=[SLIDING, FULL, SLIDING],
        use_bidirectional_attention=True,
        rope_parameters={
            FULL: {"rope_type": "default", "rope_theta": 1e6},
            SLIDING: {"rope_type": "default", "rope_theta": 1e4},
        },
        rms_norm_eps=1e-6,
        pad_token_id=0,
    )
    kw.update(changes)
    return transformers.Gemma3TextConfig(**kw)


def _hf_model(seed: int = 0, **changes):
    torch.manual_seed(seed)
    model = transformers.Gemma3TextModel(_hf_config(**changes)).eval()
    with torch.no_grad():  # norms start at 0 (scale 1): randomise them so (1 + w) is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


def _batch(B=3, L=30, vocab=300, seed=1):
    """Right-padded ids longer than the window; row 1 padded from 19, row 2 from 6."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 19:] = False
    mask[2, 6:] = False
    ids[~mask] = 0
    return ids, mask


def _encoder(hf, embed_dim=8, backend="reference", **changes) -> M.TextEncoder:
    cfg = M.YEncoderConfig.from_gemma3_config(hf.config, **changes)
    enc = M.TextEncoder(cfg, embed_dim, backend)
    M.load_gemma3_state_dict(enc, hf.state_dict())
    return enc.eval()


# ------------------------------------------------------------------------------------------
# a float64 Gemma-3, written out (the bidirectional rules of transformers 5)
# ------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1.0 + w)


def _rope(x, pos, theta):
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos[:, None].double() * inv[None]
    ang = torch.cat((ang, ang), -1)  # [L, D]
    half = torch.cat((-x[..., D // 2 :], x[..., : D // 2]), -1)
    return x * ang.cos()[:, None] + half * ang.sin()[:, None]


def _naive_gemma(state, cfg: M.YEncoderConfig, ids, mask):
    """float64 last_hidden_state [B, L, dim] from a Gemma3TextModel state dict, loops over
    batch and heads, the window rule |i - j| <= sliding_window // 2 and key padding."""
    sd = {k: v.double() for k, v in state.items()}
    B, L = ids.shape
    H, G, D = cfg.heads, cfg.kv_heads, cfg.head_dim
    eps = cfg.norm_eps
    x = sd["embed_tokens.weight"][ids] * float(torch.tensor(math.sqrt(cfg.dim)))
    pos = torch.arange(L)
    dist = (pos[:, None] - pos[None, :]).abs()
    for i, kind in enumerate(cfg.attention_types):
        p = f"layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, L, H, D)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, L, G, D)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, L, G, D)
        q = _rms(q, sd[p + "self_attn.q_norm.weight"], eps)
        k = _rms(k, sd[p + "self_attn.k_norm.weight"], eps)
        theta = cfg.rope_local_theta if kind == SLIDING else cfg.rope_theta
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        allowed = torch.ones(L, L, dtype=torch.bool)
        if kind == SLIDING:
            allowed = dist <= cfg.sliding_window // 2
        out = torch.zeros(B, L, H, D, dtype=torch.float64)
        for b in range(B):
            a = allowed & mask[b][None, :]
            for hh in range(H):
                g = hh // (H // G)
                s = (q[b, :, hh] @ k[b, :, g].T) * cfg.query_pre_attn_scalar**-0.5
                s = s.masked_fill(~a, -math.inf)
                w = torch.softmax(s, -1).nan_to_num(0.0)
                out[b, :, hh] = w @ v[b, :, g]
        o = out.reshape(B, L, H * D) @ sd[p + "self_attn.o_proj.weight"].T
        x = x + _rms(o, sd[p + "post_attention_layernorm.weight"], eps)
        h = _rms(x, sd[p + "pre_feedforward_layernorm.weight"], eps)
        gate = torch.nn.functional.gelu(h @ sd[p + "mlp.gate_proj.weight"].T, approximate="tanh")
        m = (gate * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
        x = x + _rms(m, sd[p + "post_feedforward_layernorm.weight"], eps)
    return _rms(x, sd["norm.weight"], eps)


def _st_reference(hidden, mask, dense, normalize):
    """sentence-transformers' mean Pooling -> Dense (identity) -> Normalize, in float64."""
    hidden, w = hidden.double(), mask.double()[..., None]
    x = (hidden * w).sum(1) / w.sum(1).clamp_min(1e-9)
    for weight, bias in dense:
        x = x @ weight.double().T + (0.0 if bias is None else bias.double())
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalize else x


# ------------------------------------------------------------------------------------------
# equal to transformers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, head_dim",
    [
        ("reference", 16),
        ("auto", 16),
        pytest.param("triton", 32, marks=pytest.mark.interpret),  # Triton: D in 32, 64, ...
    ],
)
def test_matches_transformers_gemma3_bidirectional(backend, head_dim):
    hf = _hf_model(head_dim=head_dim)
    assert hf.config.sliding_window == 5  # transformers halves it (+1) when bidirectional
    enc = _encoder(hf, backend=backend)
    assert enc.cfg.sliding_window == 8 and enc.cfg.window_size == (4, 4)
    assert [layer.self_attn.window_size for layer in enc.layers] == [(4, 4), (-1, -1), (4, 4)]
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        out = enc.last_hidden_state(ids, mask)
    assert out.dtype == torch.float32
    # PAD rows are nobody's output (they attend what their window holds); real rows must agree
    torch.testing.assert_close(out[mask], ref[mask], rtol=2e-5, atol=2e-5)
    # the window matters here: the same weights with global layers only give other outputs
    full = _encoder(hf, backend=backend, layer_types=(FULL, FULL, FULL))
    with torch.no_grad():
        assert (full.last_hidden_state(ids, mask) - ref)[mask].abs().max() > 1e-2


def test_gradients_match_transformers():
    hf = _hf_model(seed=3)
    enc = _encoder(hf)
    ids, mask = _batch(seed=4)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(*ids.shape, hf.config.hidden_size, generator=g) * mask[..., None]
    (hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state * weight).sum().backward()
    (enc.last_hidden_state(ids, mask) * weight).sum().backward()
    ours = dict(enc.named_parameters())
    for name, p in hf.named_parameters():
        assert ours[name].grad is not None, name
        scale = float(p.grad.abs().max())  # the embedding's gradients reach ~1e3
        torch.testing.assert_close(ours[name].grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert enc.embed_tokens.weight.grad[0].abs().max() == 0  # PAD row: no gradient (padding_idx)


def test_float64_matches_a_naive_gemma():
    hf = _hf_model(seed=6)
    enc = _encoder(hf).double()
    ids, mask = _batch(seed=7)
    ref = _naive_gemma(hf.state_dict(), enc.cfg, ids, mask)
    with torch.no_grad():
        out = enc.last_hidden_state(ids, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-10, atol=1e-10)


def test_causal_lm_prefix_and_the_round_trips_are_exact():
    hf = _hf_model(seed=8)
    enc = _encoder(hf, embed_dim=8, dense=(20, 12))
    # Gemma3ForCausalLM keys: model. prefix and a tied lm_head
    lm = transformers.Gemma3ForCausalLM(hf.config)
    lm.model.load_state_dict(hf.state_dict())
    prefixed = M.TextEncoder(enc.cfg, 8, "reference")
    found = M.load_gemma3_state_dict(prefixed, lm.state_dict())
    assert found == M.LoadResult("transformers", ("lm_head.weight",))
    for k, v in hf.state_dict().items():
        assert torch.equal(prefixed.state_dict()[k], v), k
    # the encoder's own state dict (dense and head included) round-trips exactly
    twin = M.TextEncoder(enc.cfg, 8, "reference")
    assert M.load_gemma3_state_dict(twin, enc.state_dict()) == M.LoadResult("vljepa_fast")
    mine, theirs = enc.state_dict(), twin.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids, mask = _batch(seed=9)
    with torch.no_grad():
        assert torch.equal(enc(ids, mask), twin(ids, mask))
    # and back into transformers: the backbone keys are Gemma3TextModel's
    back = transformers.Gemma3TextModel(hf.config).eval()
    back.load_state_dict({k: v for k, v in mine.items() if not k.startswith(("dense.", "head."))})
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        assert torch.equal(back(input_ids=ids, attention_mask=mask.long()).last_hidden_state, ref)
    # a backbone-only load keeps the encoder's dense and head
    before = {k: v.clone() for k, v in twin.state_dict().items() if k.startswith(("dense", "head"))}
    assert M.load_gemma3_state_dict(twin, hf.state_dict()).layout == "transformers"
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            lambda s: s.pop("layers.1.self_attn.k_norm.weight"),
            r"missing keys: layers\.1\.self_attn\.k_norm\.weight",
        ),
        (
            lambda s: s.update({"layers.0.self_attn.bias": torch.zeros(3)}),
            r"unexpected keys: layers\.0\.self_attn\.bias",
        ),
        (
            lambda s: s.update({"layers.3.mlp.up_proj.weight": torch.zeros(80, 48)}),
            r"unexpected keys: layers\.3\.mlp\.up_proj\.weight",
        ),
        (
            lambda s: s.update({"layers.2.mlp.up_proj.weight": torch.zeros(81, 48)}),
            r"shape mismatches: layers\.2\.mlp\.up_proj\.weight: "
            r"checkpoint \(81, 48\) vs expected \(80, 48\)",
        ),
        (
            lambda s: s.update({"dense.0.weight": torch.zeros(20, 48)}),
            r"\(vljepa_fast layout\).*missing keys: dense\.1\.weight, head\.bias, head\.weight",
        ),
    ],
)
def test_each_bad_key_is_named(edit, named):
    hf = _hf_model(seed=10)
    enc = M.TextEncoder(M.YEncoderConfig.from_gemma3_config(hf.config, dense=(20, 12)), 8)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    state = dict(hf.state_dict())
    edit(state)
    with pytest.raises(ValueError, match=named):
        M.load_gemma3_state_dict(enc, state)
    if "dense" not in named:  # Gemma3ForCausalLM's keys: named with their prefix
        prefixed = {f"model.{k}": v for k, v in state.items()} | {
            "lm_head.weight": state["norm.weight"]
        }
        with pytest.raises(ValueError, match=named.replace(": ", r": model\.", 1)):
            M.load_gemma3_state_dict(enc, prefixed)
    after = enc.state_dict()  # nothing was loaded on failure
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_an_unknown_layout_is_refused():
    hf = _hf_model(seed=11)
    enc = _encoder(hf)
    llama = transformers.LlamaModel(
        transformers.LlamaConfig(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
        )
    )
    for state, hint in [
        (llama.state_dict(), "unknown layout"),
        ({f"model.language_model.{k}": v for k, v in hf.state_dict().items()}, "multimodal"),
        ({}, "unknown layout"),
        (hf.state_dict() | {f"model.{k}": v for k, v in hf.state_dict().items()}, "both with"),
    ]:
        with pytest.raises(ValueError, match=hint):
            M.load_gemma3_state_dict(enc, state)
    with pytest.raises(ValueError, match="layout 'vljepa_fast' requested, the keys are 'transf"):
        M.load_gemma3_state_dict(enc, hf.state_dict(), layout="vljepa_fast")
    with pytest.raises(ValueError, match=r"^layout: expected 'auto' or one of"):
        M.load_gemma3_state_dict(enc, hf.state_dict(), layout="hub")
    assert M.load_gemma3_state_dict(enc, hf.state_dict(), layout="transformers").ignored == ()


# ------------------------------------------------------------------------------------------
# the sentence-transformers folder (EmbeddingGemma's layout), written here
# ------------------------------------------------------------------------------------------


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(60)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def _st_folder(root, hf, dims=(96, 40), bias=False, max_seq_length=40, pooling=None):
    """EmbeddingGemma's files: the transformer at the root (config.json, model.safetensors,
    tokenizer, sentence_bert_config.json), 1_Pooling, 2_Dense (safetensors), 3_Dense
    (pytorch_model.bin), 4_Normalize; returns the Dense (weight, bias) pairs."""
    hf.save_pretrained(root)
    _tokenizer().save_pretrained(root)
    (root / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (root / "1_Pooling").mkdir()
    pool = pooling or {
        "word_embedding_dimension": hf.config.hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "include_prompt": True,
    }
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    g = torch.Generator().manual_seed(12)
    dense, width = [], hf.config.hidden_size
    for i, out in enumerate(dims):
        name = f"{i + 2}_Dense"
        (root / name).mkdir()
        conf = {
            "in_features": width,
            "out_features": out,
            "bias": bias,
            "activation_function": "torch.nn.modules.linear.Identity",
        }
        (root / name / "config.json").write_text(json.dumps(conf))
        w = torch.randn(out, width, generator=g) / math.sqrt(width)
        b = torch.randn(out, generator=g) if bias else None
        state = {"linear.weight": w} | ({"linear.bias": b} if bias else {})
        if i % 2 == 0:
            safetensors_torch.save_file(state, str(root / name / "model.safetensors"))
        else:
            torch.save(state, root / name / "pytorch_model.bin")
        modules.append(
            {
                "idx": i + 2,
                "name": str(i + 2),
                "path": name,
                "type": "sentence_transformers.models.Dense",
            }
        )
        dense.append((w, b))
        width = out
    n = len(modules)
    modules.append(
        {
            "idx": n,
            "name": str(n),
            "path": f"{n}_Normalize",
            "type": "sentence_transformers.models.Normalize",
        }
    )
    (root / "modules.json").write_text(json.dumps(modules))
    return dense


@pytest.mark.parametrize("bias", [False, True])
def test_sentence_transformers_folder_loads_and_matches(tmp_path, bias):
    hf = _hf_model(seed=13)
    dense = _st_folder(tmp_path, hf, bias=bias)
    enc = M.load_gemma3_folder(tmp_path, 16, backend="reference")
    c = enc.cfg
    assert (c.dense, c.dense_bias, c.normalize, c.max_len) == ((96, 40), bias, True, 40)
    assert c.attention_types == (SLIDING, FULL, SLIDING) and c.window_size == (4, 4)
    assert enc.head.in_features == 40 and enc.head.out_features == 16
    ids, mask = _batch(L=30, seed=14)
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        ref = _st_reference(hidden, mask, dense, normalize=True)
        out = enc.embed(ids, mask)
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
        assert torch.equal(enc(ids, mask), enc.head(out))
    # the same folder in float64 against the float64 naive model: the whole stack
    enc64 = M.TextEncoder.from_pretrained(tmp_path, 16, backend="reference").double()
    ref64 = _st_reference(_naive_gemma(hf.state_dict(), c, ids, mask), mask, dense, True)
    with torch.no_grad():
        torch.testing.assert_close(enc64.embed(ids, mask), ref64, rtol=1e-10, atol=1e-10)


def test_hf_text_encoder_keeps_the_dense_stack_and_truncates(tmp_path):
    hf = _hf_model(seed=15)
    dense = _st_folder(tmp_path, hf, max_seq_length=12)
    y = M.HFTextEncoder.from_pretrained(tmp_path, 16)
    assert len(y.dense) == 2 and y.normalize and y.max_len == 12
    assert y.head.in_features == 40
    texts = ["w1 w2 w3", " ".join(f"w{i}" for i in range(20))]  # 3 and 20 tokens
    with pytest.warns(M.TruncationWarning, match=r"20 tokens, more than max_len \(12\)"):
        ids, mask = y.tokenize(texts)
    assert ids.shape == (2, 12) and mask.sum(1).tolist() == [3, 12]
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        ref = _st_reference(hidden, mask, dense, normalize=True)
        x = y.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        pooled = Y.masked_mean(x, mask)
        for layer in y.dense:
            pooled = layer(pooled)
        got = torch.nn.functional.normalize(pooled, dim=-1)
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(y(ids, mask), y.head(got), rtol=0, atol=0)
    strict = M.HFTextEncoder.from_pretrained(tmp_path, 16, truncation="error")
    with pytest.raises(ValueError, match=r"20 tokens, more than max_len \(12\)"):
        strict.tokenize(texts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert strict.tokenize(texts[:1])[0].shape == (1, 3)
    with pytest.raises(ValueError, match="longer than the maximum"):
        y(torch.ones(1, 13, dtype=torch.long))


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_a_transformers_folder_without_modules_json(tmp_path, shard):
    hf = _hf_model(seed=16)
    hf.save_pretrained(tmp_path, **({} if shard is None else {"max_shard_size": shard}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard is not None)
    enc = M.load_gemma3_folder(tmp_path, 8)
    assert enc.cfg.dense == () and not enc.cfg.normalize and enc.cfg.max_len == 64
    ids, mask = _batch(seed=17)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        torch.testing.assert_close(
            enc.embed(ids, mask).double(), _st_reference(ref, mask, [], False), rtol=2e-5, atol=2e-5
        )


def test_bad_folders_are_refused_by_name(tmp_path):
    hf = _hf_model(seed=18)
    with pytest.raises(ValueError, match="unknown layout"):
        M.load_gemma3_folder(tmp_path, 8)
    with pytest.raises(ValueError, match="expected a local folder"):
        M.load_gemma3_folder(tmp_path / "nope", 8)
    cases = {
        "cls": dict(pooling={"pooling_mode": "cls"}),
        "dense": {},
        "causal": {},
        "module": {},
    }
    for name, kw in cases.items():
        root = tmp_path / name
        root.mkdir()
        _st_folder(root, hf, **kw)
        if name == "dense":  # a Dense weight under another name
            w = safetensors_torch.load_file(str(root / "2_Dense" / "model.safetensors"))
            safetensors_torch.save_file(
                {"linear.kernel": w["linear.weight"]}, str(root / "2_Dense" / "model.safetensors")
            )
            match = r"2_Dense.*missing keys: linear\.weight; unexpected keys: linear\.kernel"
        elif name == "causal":
            conf = json.loads((root / "config.json").read_text())
            conf["use_bidirectional_attention"] = False
            (root / "config.json").write_text(json.dumps(conf))
            match = "use_bidirectional_attention is not true"
        elif name == "module":
            mods = json.loads((root / "modules.json").read_text())
            mods.insert(
                2,
                {
                    "idx": 9,
                    "name": "9",
                    "path": "x",
                    "type": "sentence_transformers.models.LayerNorm",
                },
            )
            (root / "modules.json").write_text(json.dumps(mods))
            match = r"modules \['sentence_transformers\.models\.LayerNorm'\] are not supported"
        else:
            match = r"pooling mode 'cls' is not implemented"
        with pytest.raises(ValueError, match=match):
            M.load_gemma3_folder(root, 8)


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------


def test_paper_preset_is_embeddinggemma_300m():
    cfg = M.YEncoderConfig.paper()
    hf_cfg = transformers.Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=768,
        intermediate_size=1152,
        num_hidden_layers=24,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=2048,
        query_pre_attn_scalar=256,
        sliding_window=512,
        use_bidirectional_attention=True,
        rms_norm_eps=1e-6,
    )
    loaded = M.YEncoderConfig.from_gemma3_config(hf_cfg, dense=(3072, 768), normalize=True)
    assert loaded.layer_types == tuple(hf_cfg.layer_types) == cfg.attention_types
    assert dataclasses.replace(loaded, layer_types=None) == cfg
    assert cfg.attention_types.count(FULL) == 4 and cfg.window_size == (256, 256)
    with torch.device("meta"):
        enc = M.TextEncoder(cfg, 1536)
        hf = transformers.Gemma3TextModel(hf_cfg)
    backbone = sum(
        p.numel() for n, p in enc.named_parameters() if not n.startswith(("dense", "head"))
    )
    assert backbone == sum(p.numel() for p in hf.parameters())
    assert sum(p.numel() for p in enc.dense.parameters()) == 2 * 768 * 3072
    assert sum(p.numel() for p in enc.head.parameters()) == 768 * 1536 + 1536


def test_tiny_preset_has_sliding_and_global_layers():
    cfg = M.VLJEPAConfig.tiny().y_encoder
    assert set(cfg.attention_types) == {SLIDING, FULL}
    assert (cfg.vocab_size, cfg.pad_id, cfg.max_len) == (260, 256, 48)
    assert 0 < cfg.window_size[0] < cfg.max_len


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(layer_types=(SLIDING,)), r"YEncoderConfig\.layer_types: expected a tuple of 24"),
        (
            dict(layers=2, layer_types=(SLIDING, "local")),
            r"layer_types: expected .* got \['local'\]",
        ),
        (dict(dense=(0,)), r"YEncoderConfig\.dense: expected a tuple of ints >= 1"),
        (dict(sliding_window=0), r"YEncoderConfig\.sliding_window: expected an int >= 1"),
        (dict(rope_local_theta=1.0), r"rope_local_theta: expected a finite number > 1"),
        (dict(pad_id=262144), r"YEncoderConfig\.pad_id"),
        (dict(heads=3, kv_heads=2), r"YEncoderConfig\.kv_heads"),
    ],
)
def test_config_checks(changes, message):
    with pytest.raises(ValueError, match=message):
        M.YEncoderConfig(**changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(attention_bias=True), "attention_bias=True is not implemented"),
        (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping=50.0 is not implemented"),
        (dict(hidden_activation="gelu"), "hidden_activation='gelu' is not implemented"),
        (
            dict(rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0}, SLIDING: {}}),
            r"rope_parameters\['full_attention'\] rope_type 'linear' is not implemented",
        ),
    ],
)
def test_unsupported_gemma3_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        M.YEncoderConfig.from_gemma3_config(_hf_config(**changes))


def test_the_model_trains_with_the_tiny_gemma_encoder():
    cfg = M.VLJEPAConfig.tiny()
    torch.manual_seed(19)
    enc = M.TextEncoder(cfg.y_encoder, cfg.embed_dim, "reference")
    ids = torch.randint(0, 256, (4, 40))
    ids[1, 30:] = cfg.y_encoder.pad_id
    out = enc(ids)  # the mask from pad_id
    assert out.shape == (4, cfg.embed_dim) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for n, p in enc.named_parameters() if "layers" in n)
