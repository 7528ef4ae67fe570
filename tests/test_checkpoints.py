"""Checkpoint loaders against tiny random transformers models, and the parameter breakdown.

* V-JEPA 2: transformers' ``VJEPA2Model`` and the original repository's layout load into
  :class:`XEncoder`, detected; outputs match ``VJEPA2Model`` (position_mode "transformers") at
  any resolution and a float64 oracle written here from facebookresearch/vjepa2's rule
  (position_mode "original"); both modes agree at the crop size only.
* Llama: Meta's ``consolidated.pth`` layout (built here from a random ``LlamaModel`` by the
  inverse of transformers' q/k row permutation) loads into :class:`Predictor` and matches the
  transformers layers run bidirectionally.
* Every bad key is named; nothing is loaded when a key is bad.
* :func:`parameter_breakdown` equals ``sum(p.numel())`` of a built model, part by part.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vljepa_fast.models as M
from tests._util import assert_close_2x
from vljepa_fast.models.params import parameter_breakdown
from vljepa_fast.models.x_encoder import vjepa2_state_dict
from vljepa_fast.ops import rotary

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import create_bidirectional_mask  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights of order one (the default init leaves attention nearly uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2
            is_norm_weight = name.endswith("weight") and p.dim() == 1
            p.copy_(noise + 1.0 if is_norm_weight else noise)


def _state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ V-JEPA 2

CROP, PATCH, TUBELET, DIM, HEADS = 32, 8, 2, 64, 4


def _xcfg(mode: str = "original") -> M.XEncoderConfig:
    return M.XEncoderConfig(
        dim=DIM, depth=2, heads=HEADS, mlp_dim=128, patch=PATCH, tubelet=TUBELET,
        image_size=CROP, max_frames=16, position_mode=mode,
    )  # fmt: skip


def _vjepa2_model(seed: int = 0, cls=None):
    config = transformers.VJEPA2Config(
        patch_size=PATCH, crop_size=CROP, frames_per_clip=4, tubelet_size=TUBELET,
        hidden_size=DIM, num_attention_heads=HEADS, num_hidden_layers=2, mlp_ratio=2.0,
        pred_hidden_size=32, pred_num_attention_heads=2, pred_num_hidden_layers=1,
        pred_num_mask_tokens=2, num_pooler_layers=1, num_labels=3,
    )  # fmt: skip
    # sdpa: transformers' eager attention takes its softmax in float32 even for float64 inputs
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = (cls or transformers.VJEPA2Model)(config).eval()
    _perturb(model, seed)
    return model


def _hf_encode(model, video: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' encoder output; its input is [B, T, C, H, W]."""
    with torch.no_grad():
        out = model.to(dtype).encoder(pixel_values_videos=video.to(dtype).permute(0, 2, 1, 3, 4))
    model.float()
    return out.last_hidden_state


def _original_oracle(state: dict, video: torch.Tensor) -> torch.Tensor:
    """float64 V-JEPA 2 encoder written from facebookresearch/vjepa2 (VisionTransformer with
    use_rope and handle_nonsquare_inputs, RoPEAttention, rotate_queries_or_keys): positions
    from the input's own grid, per-axis frequencies 10000^(-i / (G/2)) tiled over the group."""
    w = {k: v.double() for k, v in state.items()}
    x = F.conv3d(video.double(), w["patch_embed.proj.weight"], w["patch_embed.proj.bias"],
                 stride=(TUBELET, PATCH, PATCH))  # fmt: skip
    _, _, Tp, Hp, Wp = x.shape
    x = x.flatten(2).transpose(1, 2)
    B, N, C = x.shape
    D = C // HEADS
    ids = torch.arange(N)
    t, h = ids // (Hp * Wp), (ids % (Hp * Wp)) // Wp
    wpos = ids - Hp * Wp * t - Wp * h
    G = 2 * ((D // 3) // 2)

    def rotate(z, pos):  # z [B, H, N, G]
        omega = 1.0 / 10000 ** (torch.arange(G // 2, dtype=torch.float64) / (G / 2))
        freq = pos.double()[:, None] * omega  # [N, G/2]
        sin, cos = freq.sin().repeat(1, 2), freq.cos().repeat(1, 2)  # tiled, as released
        pairs = z.unflatten(-1, (-1, 2))
        turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return z * cos + turned * sin

    def rope(z):
        parts = [rotate(z[..., a * G : (a + 1) * G], p) for a, p in enumerate((t, h, wpos))]
        return torch.cat([*parts, z[..., 3 * G :]], dim=-1)

    for i in range(2):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (C,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
        q, k, v = qkv.unflatten(-1, (3, HEADS, D)).permute(2, 0, 3, 1, 4)
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(y, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        y = F.layer_norm(x, (C,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
                     w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])  # fmt: skip
        x = x + y
    return F.layer_norm(x, (C,), w["norm.weight"], w["norm.bias"], eps=1e-6)


def _encoder(mode: str, state: dict) -> M.XEncoder:
    enc = M.XEncoder(_xcfg(mode)).eval()
    M.load_vjepa2_state_dict(enc, state)
    return enc


def test_vjepa2_transformers_layout_detected_and_matches_vjepa2model():
    hf = _vjepa2_model()
    state = hf.state_dict()
    enc = M.XEncoder(_xcfg()).eval()
    result = M.load_vjepa2_state_dict(enc, state)
    assert result.layout == "transformers"
    predictor_keys = sorted(k for k in state if k.startswith("predictor."))
    assert predictor_keys and result.ignored == tuple(predictor_keys)
    video = torch.randn(2, 3, 4, CROP, CROP)
    with torch.no_grad():
        got = enc(video)
        got64 = enc.double()(video.double())
    exact = _hf_encode(hf, video, torch.float64)
    assert_close_2x(got, _hf_encode(hf, video, torch.float32), exact, torch.float32, "encoder")
    torch.testing.assert_close(got64, exact, atol=1e-10, rtol=0)
    # at the crop size the two position rules are one
    a, b = M.XEncoder(_xcfg("original")), M.XEncoder(_xcfg("transformers"))
    pos = [m.grid_positions(4, CROP, CROP, "cpu") for m in (a, b)]
    assert torch.equal(pos[0], pos[1])
    oracle = _original_oracle(vjepa2_state_dict(enc), video)
    torch.testing.assert_close(oracle, exact, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("frames", "size"), [(4, (48, 48)), (2, (16, 40)), (6, (24, 32))])
def test_vjepa2_off_crop_resolution_each_mode_matches_its_oracle(frames, size):
    hf = _vjepa2_model(seed=1)
    state = hf.state_dict()
    H, W = size
    video = torch.randn(2, 3, frames, H, W)
    hf_exact = _hf_encode(hf, video, torch.float64)
    hf_eager = _hf_encode(hf, video, torch.float32)
    with torch.no_grad():
        got_t = _encoder("transformers", state)(video)
        enc_o = _encoder("original", state)
        got_o = enc_o(video)
        got_o_eager = enc_o.double()(video.double()).float()  # our own float64, rounded
    assert_close_2x(got_t, hf_eager, hf_exact, torch.float32, "transformers mode")
    orig_exact = _original_oracle(vjepa2_state_dict(enc_o), video)
    assert_close_2x(got_o, got_o_eager, orig_exact, torch.float32, "original mode")
    torch.testing.assert_close(got_o, orig_exact.float(), atol=1e-4, rtol=0)
    # the two rules really differ here (the test could not tell them apart otherwise)
    assert (orig_exact - hf_exact).abs().max() > 1e-2


def test_vjepa2_round_trips_are_exact_in_both_layouts():
    hf = _vjepa2_model(seed=2)
    state = hf.state_dict()
    enc = M.XEncoder(_xcfg())
    M.load_vjepa2_state_dict(enc, state)
    encoder_part = {k: v for k, v in state.items() if k.startswith("encoder.")}
    _state_equal(vjepa2_state_dict(enc, "transformers"), encoder_part)
    original = vjepa2_state_dict(enc, "original")
    _state_equal(original, enc.state_dict())
    ckpt = {
        "encoder": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in original.items()},
        "target_encoder": {f"module.backbone.{k}": v for k, v in original.items()},
        "predictor": {"module.backbone.mask_tokens.0": torch.zeros(1, 1, 8)},
        "epoch": 3,
    }
    other = M.XEncoder(_xcfg())
    result = M.load_vjepa2_state_dict(other, ckpt)
    assert result.layout == "original" and result.ignored == ("encoder", "epoch", "predictor")
    _state_equal(other.state_dict(), enc.state_dict())
    result = M.load_vjepa2_state_dict(other, vjepa2_state_dict(enc, "transformers"))
    assert result.layout == "transformers" and result.ignored == ()


def test_vjepa2_video_classification_checkpoint_loads_its_encoder():
    clf = _vjepa2_model(seed=3, cls=transformers.VJEPA2ForVideoClassification)
    state = clf.state_dict()
    enc = M.XEncoder(_xcfg())
    result = M.load_vjepa2_state_dict(enc, state)
    assert result.layout == "transformers"
    not_ours = sorted(k for k in state if not k.startswith("vjepa2.encoder."))
    assert any(k.startswith("pooler.") for k in not_ours) and "classifier.weight" in not_ours
    assert result.ignored == tuple(not_ours)
    want = {k.removeprefix("vjepa2."): v for k, v in state.items() if k.startswith("vjepa2.enc")}
    _state_equal(vjepa2_state_dict(enc, "transformers"), want)


def test_vjepa2_bad_keys_are_named_and_nothing_loads():
    state = dict(_vjepa2_model(seed=4).state_dict())
    enc = M.XEncoder(_xcfg())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    del state["encoder.layer.1.attention.key.bias"]
    state["encoder.layernorm.weight"] = torch.ones(7)
    state["encoder.layer.0.attention.query.weight"] = torch.ones(DIM, DIM + 1)
    state["encoder.layer.0.attention.extra.weight"] = torch.ones(3)
    with pytest.raises(ValueError) as e:
        M.load_vjepa2_state_dict(enc, state)
    msg = str(e.value)
    assert "transformers VJEPA2Model layout" in msg
    assert "missing keys: encoder.layer.1.attention.key.bias" in msg
    assert "unexpected keys: encoder.layer.0.attention.extra.weight" in msg
    assert "encoder.layernorm.weight: checkpoint (7,) vs expected (64,)" in msg
    assert "encoder.layer.0.attention.query.weight: checkpoint (64, 65) vs expected (64, 64)" in msg
    _state_equal(enc.state_dict(), before)
    original = {f"module.{k}": v for k, v in vjepa2_state_dict(enc).items()}
    original["module.blocks.0.attn.q_bias"] = torch.zeros(DIM)
    with pytest.raises(ValueError, match=r"original layout.*unexpected keys: blocks\.0\.attn\.q_b"):
        M.load_vjepa2_state_dict(enc, original)


def test_vjepa2_layout_detection_refusals():
    enc = M.XEncoder(_xcfg())
    hf = vjepa2_state_dict(enc, "transformers")
    orig = vjepa2_state_dict(enc, "original")
    with pytest.raises(ValueError, match="mixes the original layout"):
        M.load_vjepa2_state_dict(enc, {**hf, "blocks.0.norm1.weight": torch.ones(DIM)})
    with pytest.raises(ValueError, match="no encoder keys of either layout"):
        M.load_vjepa2_state_dict(enc, {"foo.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="layout 'original' requested, the keys are 'trans"):
        M.load_vjepa2_state_dict(enc, hf, layout="original")
    with pytest.raises(ValueError, match="layout: expected 'auto'"):
        M.load_vjepa2_state_dict(enc, orig, layout="hf")
    with pytest.raises(ValueError, match="'norm.bias' and 'module.norm.bias' both name 'norm.b"):
        M.load_vjepa2_state_dict(enc, {**orig, "module.norm.bias": orig["norm.bias"]})
    with pytest.raises(ValueError, match="state: expected a mapping"):
        M.load_vjepa2_state_dict(enc, [1, 2])
    with pytest.raises(ValueError, match="layout: expected 'original' or 'transformers'"):
        vjepa2_state_dict(enc, "meta")
    with pytest.raises(ValueError, match=r"XEncoderConfig\.position_mode: expected one of"):
        _xcfg("hf")


# ---------------------------------------------------------------------------------- Llama

LDIM, LHEADS, LKV, LHD, LVOCAB = 64, 4, 2, 16, 300


def _llama(seed: int = 0) -> transformers.LlamaModel:
    config = transformers.LlamaConfig(
        vocab_size=LVOCAB, hidden_size=LDIM, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=LHEADS, num_key_value_heads=LKV, head_dim=LHD,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 500000.0, **rotary.LLAMA3_ROPE_SCALING},
    )  # fmt: skip
    config._attn_implementation = "sdpa"  # eager takes its softmax in float32 in float64 runs
    torch.manual_seed(seed)
    model = transformers.LlamaModel(config).eval()
    _perturb(model, seed)
    return model


def _pcfg() -> M.PredictorConfig:
    return M.PredictorConfig(
        dim=LDIM, layers=2, heads=LHEADS, kv_heads=LKV, head_dim=LHD, mlp_dim=128,
        vocab_size=LVOCAB, pad_id=0, max_query_len=32, first_llama_layer=2,
    )  # fmt: skip


def _to_meta(state: dict) -> dict:
    """transformers LlamaModel keys -> Meta's consolidated.pth, q/k rows re-interleaved (the
    inverse of convert_llama_weights_to_hf's permute: row s * D/2 + i of a head -> 2i + s)."""

    def interleave(w, heads):
        rows, dim = w.shape
        return w.view(heads, 2, rows // heads // 2, dim).transpose(1, 2).reshape(rows, dim)

    names = {
        "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
    }  # fmt: skip
    out = {}
    for key, value in state.items():
        if key == "embed_tokens.weight":
            out["tok_embeddings.weight"] = value.clone()
        elif key == "norm.weight":
            out[key] = value.clone()
        elif key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            mod = rest.removesuffix(".weight")
            if mod == "self_attn.q_proj":
                value = interleave(value, LHEADS)
            elif mod == "self_attn.k_proj":
                value = interleave(value, LKV)
            out[f"layers.{i}.{names[mod]}.weight"] = value.clone()
    out["output.weight"] = torch.randn(LVOCAB, LDIM)
    out["rope.freqs"] = torch.randn(LHD // 2)
    return out


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def _hf_predict(llama, pred: M.Predictor, visual, ids, mask, dtype) -> torch.Tensor:
    """The predictor's rule on transformers' own modules (layers 2, 3 and the norm of a
    LlamaModel) run bidirectionally. float32: the decoder layers as they are. float64 (the
    exact run): their attention and MLP with exact RoPE tables and float64 RMSNorms
    (LlamaRMSNorm computes in float32 whatever the input)."""
    llama, head, proj = llama.to(dtype), pred.head.to(dtype), pred.visual_proj.to(dtype)
    with torch.no_grad():
        x = torch.cat((proj(visual.to(dtype)), llama.embed_tokens(ids)), dim=1)
        full = torch.cat((torch.ones(ids.shape[0], visual.shape[1], dtype=torch.bool), mask), 1)
        positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        att_mask = create_bidirectional_mask(llama.config, x, full)
        if dtype == torch.float64:
            cos_sin = rotary.rotary_cos_sin(positions, LHD, dtype=dtype)
            for layer in llama.layers[2:]:
                h = _rms(x, layer.input_layernorm)
                x = x + layer.self_attn(h, position_embeddings=cos_sin, attention_mask=att_mask)[0]
                x = x + layer.mlp(_rms(x, layer.post_attention_layernorm))
            x = _rms(x, llama.norm)
        else:
            cos_sin = llama.rotary_emb(x, position_ids=positions)
            for layer in llama.layers[2:]:
                x = layer(x, attention_mask=att_mask, position_ids=positions,
                          position_embeddings=cos_sin)  # fmt: skip
            x = llama.norm(x)
        w = full.to(dtype)[..., None]
        out = head((x * w).sum(1) / w.sum(1))
    llama.float(), head.float(), proj.float()
    return out


def test_llama_meta_layout_detected_and_matches_transformers_layers():
    llama = _llama()
    state = llama.state_dict()
    meta = _to_meta(state)
    pred = M.Predictor(_pcfg(), visual_dim=24, embed_dim=16).eval()
    result = M.load_llama_layers(pred, meta)
    assert result.layout == "meta"
    skipped = sorted(k for k in meta if k.startswith(("layers.0.", "layers.1.")))
    assert result.ignored == tuple(sorted([*skipped, "output.weight", "rope.freqs"]))
    # the row permutation is the exact inverse: every weight equals transformers' own
    for key, value in pred.state_dict().items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            assert torch.equal(value, state[f"layers.{2 + int(i)}.{rest}"]), key
        elif not key.startswith(("visual_proj", "head")):
            assert torch.equal(value, state[key]), key
    g = torch.Generator().manual_seed(5)
    visual = torch.randn(3, 7, 24, generator=g)
    ids = torch.randint(1, LVOCAB, (3, 9), generator=g)
    mask = torch.arange(9)[None] < torch.tensor([9, 4, 1])[:, None]
    ids = ids.masked_fill(~mask, 0)
    with torch.no_grad():
        got = pred(visual, ids, mask)
    exact = _hf_predict(llama, pred, visual, ids, mask, torch.float64)
    eager = _hf_predict(llama, pred, visual, ids, mask, torch.float32)
    assert_close_2x(got, eager, exact, torch.float32, "predictor (meta layout)")
    with torch.no_grad():
        got64 = pred.double()(visual.double(), ids, mask)
    pred.float()
    torch.testing.assert_close(got64, exact, atol=1e-10, rtol=0)
    other = M.Predictor(_pcfg(), visual_dim=24, embed_dim=16).eval()
    other.load_state_dict(pred.state_dict())
    res_hf = M.load_llama_layers(other, {f"model.{k}": v for k, v in state.items()})
    assert res_hf.layout == "transformers"
    assert res_hf.ignored == tuple(sorted(f"model.{k}" for k in state if k[7] in "01"))
    _state_equal(other.state_dict(), pred.state_dict())


def test_llama_bad_keys_are_named_in_either_layout():
    meta = _to_meta(_llama(seed=1).state_dict())
    pred = M.Predictor(_pcfg(), visual_dim=24, embed_dim=16)
    before = {k: v.clone() for k, v in pred.state_dict().items()}
    del meta["layers.3.feed_forward.w3.weight"]
    meta["norm.weight"] = torch.ones(3)
    meta["layers.2.attention.wq.weight"] = torch.ones(LDIM + 2, LDIM)
    meta["layers.2.attention.wz.weight"] = torch.ones(2)
    with pytest.raises(ValueError) as e:
        M.load_llama_layers(pred, meta)
    msg = str(e.value)
    assert "meta layout, layers 2..3" in msg
    assert "missing keys: layers.3.feed_forward.w3.weight" in msg
    assert "unexpected keys: layers.2.attention.wz.weight" in msg
    assert "norm.weight: checkpoint (3,) vs expected (64,)" in msg
    assert "layers.2.attention.wq.weight: checkpoint (66, 64) vs expected (64, 64)" in msg
    _state_equal(pred.state_dict(), before)
    hf = {f"model.{k}": v for k, v in _llama(seed=1).state_dict().items()}
    hf["model.layers.3.self_attn.q_norm.weight"] = torch.ones(LHD)
    with pytest.raises(ValueError, match=r"unexpected keys: model\.layers\.3\.self_attn\.q_norm"):
        M.load_llama_layers(pred, hf)
    with pytest.raises(ValueError, match="mixes Meta's consolidated layout"):
        M.load_llama_layers(pred, {**hf, "tok_embeddings.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="no Llama keys of either layout"):
        M.load_llama_layers(pred, {"x": torch.ones(1)})
    with pytest.raises(ValueError, match="layout 'meta' requested, the keys are 'transformers'"):
        M.load_llama_layers(pred, hf, layout="meta")
    with pytest.raises(ValueError, match="first_layer: expected an int >= 0"):
        M.load_llama_layers(pred, hf, first_layer=-1)


def test_meta_rope_rows_is_transformers_permute():
    # a head's rows (2i, 2i + 1) -> (i, i + D/2), written out by hand for D = 4, 2 heads
    w = torch.arange(8.0)[:, None].expand(8, 3)
    got = M.meta_rope_rows(w, heads=2)
    assert torch.equal(got[:, 0], torch.tensor([0.0, 2, 1, 3, 4, 6, 5, 7]))


# ------------------------------------------------------------------- parameter breakdown


@pytest.mark.parametrize("freeze", [False, True])
def test_parameter_breakdown_equals_a_built_model(freeze):
    config = M.VLJEPAConfig.tiny().replace(freeze_x_encoder=freeze)
    got = parameter_breakdown(config)
    model = M.VLJEPA(config)
    assert got["total"] == sum(p.numel() for p in model.parameters())
    assert got["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if not n:
            continue
        entry = got["modules"][name]
        assert entry["total"] == n, name
        trainable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        assert entry["trainable"] == trainable, name
        for part, sub in child.named_children():
            k = sum(p.numel() for p in sub.parameters())
            assert entry["parts"].get(part, 0) == k, f"{name}.{part}"
    x_entry = got["modules"]["x_encoder"]
    assert x_entry["trainable"] == (0 if freeze else x_entry["total"])
    with pytest.raises(ValueError, match="config: expected a VLJEPAConfig"):
        parameter_breakdown(config.x_encoder)


def test_parameter_breakdown_paper_predictor_follows_llama_shapes():
    cfg = M.VLJEPAConfig.paper()
    p = cfg.predictor
    parts = parameter_breakdown(cfg)["modules"]["predictor"]["parts"]
    attn = p.dim * p.heads * p.head_dim * 2 + p.dim * p.kv_heads * p.head_dim * 2
    per_layer = attn + 3 * p.dim * p.mlp_dim + 2 * p.dim
    assert parts["layers"] == p.layers * per_layer
    assert parts["embed_tokens"] == p.vocab_size * p.dim
    assert parts["visual_proj"] == cfg.x_encoder.dim * p.dim + p.dim
    assert parts["head"] == p.dim * cfg.embed_dim + cfg.embed_dim


@pytest.mark.cpu
def test_a_state_dict_of_another_model_is_not_taken_for_vjepa2():
    """A Llama state dict shares only "norm.weight" with V-JEPA 2's original keys: it must be
    refused as "no encoder keys", not detected as the original layout and loaded key by key."""
    enc = M.XEncoder(M.VLJEPAConfig.tiny().x_encoder, backend="reference")
    state = {
        "norm.weight": torch.ones(64),
        "layers.0.self_attn.q_proj.weight": torch.zeros(64, 64),
        "embed_tokens.weight": torch.zeros(260, 64),
    }
    with pytest.raises(ValueError, match="no encoder keys"):
        M.load_vjepa2_state_dict(enc, state)
