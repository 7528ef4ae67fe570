"""Local checkpoint files: read_state_dict and load_pretrained (no hub).

Tiny random transformers models (LlamaModel, VJEPA2Model, Gemma3TextModel) are saved as a user
finds them on disk: ``save_pretrained`` folders (one safetensors file, and sharded with a small
``max_shard_size``), torch files, a sharded ``pytorch_model.bin.index.json`` set, V-JEPA 2's
original training checkpoint and Meta's ``consolidated.00.pth`` folder (both written here), and
an EmbeddingGemma-style sentence-transformers folder. Every read equals the state dict exactly;
``load_pretrained`` gives modules whose outputs equal (exactly) those of modules loaded in
memory from the same state dicts; every bad file or config is refused with its path named.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import vljepa_fast.models as M
from vljepa_fast.ops import rotary

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SLIDING, FULL = "sliding_attention", "full_attention"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Weights of order one, norms included (the default init hides wrong mappings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


# ------------------------------------------------------------------------------ the models


def _llama() -> transformers.LlamaModel:
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": 500000.0, **rotary.LLAMA3_ROPE_SCALING},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).eval()
    _perturb(model, 1)
    return model


def _vjepa2() -> transformers.VJEPA2Model:
    config = transformers.VJEPA2Config(
        patch_size=8, crop_size=32, frames_per_clip=4, tubelet_size=2, hidden_size=64,
        num_attention_heads=4, num_hidden_layers=2, mlp_ratio=2.0, pred_hidden_size=32,
        pred_num_attention_heads=2, pred_num_hidden_layers=1, pred_num_mask_tokens=2,
    )  # fmt: skip
    torch.manual_seed(2)
    model = transformers.VJEPA2Model(config).eval()
    _perturb(model, 3)
    return model


def _gemma() -> transformers.Gemma3TextModel:
    config = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        query_pre_attn_scalar=12, sliding_window=9, layer_types=[SLIDING, FULL],
        use_bidirectional_attention=True, pad_token_id=0, rms_norm_eps=1e-6,
        rope_parameters={
            FULL: {"rope_type": "default", "rope_theta": 1e6},
            SLIDING: {"rope_type": "default", "rope_theta": 1e4},
        },
    )  # fmt: skip
    torch.manual_seed(4)
    model = transformers.Gemma3TextModel(config).eval()
    _perturb(model, 5)
    return model


@pytest.fixture(scope="module")
def models():
    return {"llama": _llama(), "vjepa2": _vjepa2(), "gemma": _gemma()}


def _xcfg() -> M.XEncoderConfig:
    return M.XEncoderConfig(
        dim=64, depth=2, heads=4, mlp_dim=128, patch=8, tubelet=2, image_size=32, max_frames=16
    )


def _config(models, **predictor_changes) -> M.VLJEPAConfig:
    tiny = M.VLJEPAConfig.tiny()
    predictor = dict(
        dim=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=128, vocab_size=300,
        pad_id=0, max_query_len=32, first_llama_layer=2,
    )  # fmt: skip
    predictor.update(predictor_changes)
    return tiny.replace(
        x_encoder=_xcfg(),
        predictor=M.PredictorConfig(**predictor),
        y_encoder=M.YEncoderConfig.from_gemma3_config(
            models["gemma"].config, dense=(40,), normalize=True, max_len=48
        ),
        embed_dim=16,
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------- files on disk


def _torch_shards(state: dict, folder: Path, n: int = 3) -> None:
    """transformers' pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(n):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: state[k] for k in keys[i::n]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows -> Meta's interleaved RoPE pairs (inverse of meta_rope_rows)."""
    rows, dim = w.shape
    return w.view(heads, 2, rows // heads // 2, dim).transpose(1, 2).reshape(rows, dim)


_META = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}  # fmt: skip


def _meta_folder(llama, folder: Path) -> None:
    """Meta's original download: consolidated.00.pth + params.json."""
    folder.mkdir(parents=True, exist_ok=True)
    c = llama.config
    out = {}
    for key, value in _state(llama).items():
        if key == "embed_tokens.weight":
            out["tok_embeddings.weight"] = value
        elif key == "norm.weight":
            out[key] = value
        else:
            _, i, rest = key.split(".", 2)
            mod = rest.removesuffix(".weight")
            if mod == "self_attn.q_proj":
                value = _interleave(value, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                value = _interleave(value, c.num_key_value_heads)
            out[f"layers.{i}.{_META[mod]}.weight"] = value.contiguous()
    out["output.weight"] = torch.randn(c.vocab_size, c.hidden_size)
    torch.save(out, folder / "consolidated.00.pth")
    params = dict(
        dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, norm_eps=c.rms_norm_eps,
        rope_theta=500000.0, use_scaled_rope=True, multiple_of=64, ffn_dim_multiplier=1.0,
    )  # fmt: skip
    (folder / "params.json").write_text(json.dumps(params))


def _vjepa2_original(vjepa2, path: Path) -> None:
    """facebookresearch/vjepa2's training checkpoint: encoder / target_encoder under
    module.backbone., plus a predictor and bookkeeping (all plain types: weights_only)."""
    enc = M.XEncoder(_xcfg())
    M.load_vjepa2_state_dict(enc, _state(vjepa2))
    own = M.vjepa2_state_dict(enc, "original")
    wrapped = {f"module.backbone.{k}": v for k, v in own.items()}
    noisy = {k: v + 1.0 for k, v in wrapped.items()}  # the online encoder: not the one loaded
    ckpt = {
        "encoder": noisy,
        "target_encoder": wrapped,
        "predictor": {"module.predictor_embed.weight": torch.randn(4, 4)},
        "epoch": 3,
        "loss": 0.25,
    }
    torch.save(ckpt, path)


def _st_folder(gemma, root: Path, sub: str = "") -> tuple[torch.Tensor, ...]:
    """EmbeddingGemma's layout: the transformer at the root (or in the folder ``sub``, as
    older sentence-transformers saves: 0_Transformer), 1_Pooling (mean), 2_Dense (bias-free,
    identity activation), 3_Normalize. Returns the Dense weight."""
    gemma.save_pretrained(root / sub)
    (root / sub / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40}))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 48, "pooling_mode_mean_tokens": True})
    )
    (root / "2_Dense").mkdir()
    conf = {"in_features": 48, "out_features": 40, "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity"}  # fmt: skip
    (root / "2_Dense" / "config.json").write_text(json.dumps(conf))
    w = torch.randn(40, 48, generator=torch.Generator().manual_seed(6)) / 7.0
    safetensors_torch.save_file({"linear.weight": w}, str(root / "2_Dense" / "model.safetensors"))
    modules = [
        {"idx": 0, "name": "0", "path": sub, "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]  # fmt: skip
    (root / "modules.json").write_text(json.dumps(modules))
    return (w,)


def _write(kind: str, models, root: Path) -> Path:
    """One checkpoint on disk; returns the path to pass."""
    llama, vjepa2 = models["llama"], models["vjepa2"]
    if kind == "llama-folder":
        llama.save_pretrained(root / kind)
        return root / kind
    if kind == "llama-sharded":
        llama.save_pretrained(root / kind, max_shard_size="100KB")
        assert len(list((root / kind).glob("model-*.safetensors"))) > 2
        return root / kind
    if kind == "llama-bin-sharded":
        _torch_shards(_state(llama), root / kind)
        return root / kind
    if kind == "llama-meta":
        _meta_folder(llama, root / kind)
        return root / kind
    if kind == "llama-pt":
        torch.save(_state(llama), root / "llama.pt")
        return root / "llama.pt"
    if kind == "vjepa2-folder":
        vjepa2.save_pretrained(root / kind)
        return root / kind
    if kind == "vjepa2-sharded":
        vjepa2.save_pretrained(root / kind, max_shard_size="60KB")
        assert len(list((root / kind).glob("model-*.safetensors"))) > 2
        return root / kind
    if kind == "vjepa2-safetensors":
        safetensors_torch.save_file(_state(vjepa2), str(root / "v.safetensors"))
        return root / "v.safetensors"
    if kind == "vjepa2-bin":
        torch.save(_state(vjepa2), root / "pytorch_model.bin")
        return root / "pytorch_model.bin"
    if kind == "vjepa2-original":
        _vjepa2_original(vjepa2, root / "vitl.pt")
        return root / "vitl.pt"
    raise AssertionError(kind)


# --------------------------------------------------------------------------- read_state_dict


@pytest.mark.parametrize(
    "kind",
    ["llama-folder", "llama-sharded", "llama-bin-sharded", "llama-pt", "vjepa2-folder",
     "vjepa2-sharded", "vjepa2-safetensors", "vjepa2-bin"],
)  # fmt: skip
def test_read_state_dict_equals_the_saved_state_dict(tmp_path, models, kind):
    path = _write(kind, models, tmp_path)
    _equal(M.read_state_dict(path), _state(models[kind.split("-")[0]]))
    _equal(M.read_state_dict(str(path)), _state(models[kind.split("-")[0]]))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_every_torch_suffix_is_read(tmp_path, suffix):
    state = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(state, tmp_path / f"w{suffix}")
    _equal(M.read_state_dict(tmp_path / f"w{suffix}"), state)


def test_meta_folder_and_training_checkpoints_come_back_as_saved(tmp_path, models):
    path = _write("llama-meta", models, tmp_path)
    got = M.read_state_dict(path)
    _equal(got, torch.load(path / "consolidated.00.pth", weights_only=True))
    assert "tok_embeddings.weight" in got and "layers.3.attention.wq.weight" in got
    ckpt = M.read_state_dict(_write("vjepa2-original", models, tmp_path))
    assert sorted(ckpt) == ["encoder", "epoch", "loss", "predictor", "target_encoder"]
    assert ckpt["epoch"] == 3  # nothing unwrapped: the loader does that


# --------------------------------------------------------------------------- load_pretrained


def _video(seed: int = 7) -> torch.Tensor:
    return torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def _queries(seed: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    ids[~mask] = 0
    return ids, mask


def _check_x_encoder(model, vjepa2) -> None:
    ref = M.XEncoder(model.config.x_encoder, "reference").eval()
    M.load_vjepa2_state_dict(ref, _state(vjepa2))
    with torch.no_grad():
        assert torch.equal(model.x_encoder(_video()), ref(_video()))


def _check_predictor(model, llama) -> None:
    c = model.config
    ref = M.Predictor(c.predictor, c.x_encoder.dim, c.embed_dim, "reference").eval()
    M.load_llama_layers(ref, _state(llama))
    with torch.no_grad():  # visual_proj and head are not Llama's: the model's own
        ref.visual_proj.load_state_dict(model.predictor.visual_proj.state_dict())
        ref.head.load_state_dict(model.predictor.head.state_dict())
        visual = torch.randn(2, 5, c.x_encoder.dim, generator=torch.Generator().manual_seed(9))
        assert torch.equal(model.predictor(visual, *_queries()), ref(visual, *_queries()))


def _check_y_encoder_folder(model, gemma, dense) -> None:
    ref = M.TextEncoder(model.config.y_encoder, model.config.embed_dim, "reference").eval()
    M.load_gemma3_state_dict(ref, _state(gemma))
    with torch.no_grad():
        ref.dense[0].weight.copy_(dense[0])
        ids, mask = _queries(10)
        assert torch.equal(model.y_encoder.embed(ids, mask), ref.embed(ids, mask))


CASES = [  # (x_encoder file, predictor file, layouts)
    ("vjepa2-folder", "llama-folder", ("transformers", "transformers")),
    ("vjepa2-sharded", "llama-sharded", ("transformers", "transformers")),
    ("vjepa2-bin", "llama-bin-sharded", ("transformers", "transformers")),
    ("vjepa2-original", "llama-meta", ("original", "meta")),
    ("vjepa2-safetensors", "llama-pt", ("transformers", "transformers")),
]


@pytest.mark.parametrize(("x_kind", "p_kind", "layouts"), CASES)
def test_load_pretrained_equals_loading_in_memory(tmp_path, models, x_kind, p_kind, layouts):
    x_path = _write(x_kind, models, tmp_path)
    p_path = _write(p_kind, models, tmp_path)
    dense = _st_folder(models["gemma"], tmp_path / "gemma")
    model, report = M.load_pretrained(
        _config(models), x_encoder=x_path, predictor=p_path, y_encoder=tmp_path / "gemma",
        backend="reference",
    )  # fmt: skip
    model.eval()
    _check_x_encoder(model, models["vjepa2"])
    _check_predictor(model, models["llama"])
    _check_y_encoder_folder(model, models["gemma"], dense)
    assert (report.x_encoder.path, report.predictor.path) == (x_path, p_path)
    assert (report.x_encoder.layout, report.predictor.layout) == layouts
    assert report.y_encoder.layout == "sentence-transformers"
    # ignored: V-JEPA 2's own predictor (or the training checkpoint's other entries), the
    # Llama layers before first_llama_layer (and Meta's output layer)
    if layouts[0] == "original":
        assert report.x_encoder.ignored == ("encoder", "epoch", "loss", "predictor")
    else:
        assert report.x_encoder.ignored and all(
            k.startswith("predictor.") for k in report.x_encoder.ignored
        )
    llama_ignored = set(report.predictor.ignored)
    assert {k for k in llama_ignored if "layers." not in k} <= {"output.weight"}
    assert {k.split("layers.")[1].split(".")[0] for k in llama_ignored if "layers." in k} == {
        "0", "1",
    }  # fmt: skip
    assert any("visual_proj and head" in n for n in report.predictor.notes)
    assert all(report[name].loaded for name in ("x_encoder", "predictor", "y_encoder"))
    assert "random init (no path given)" not in str(report)


def test_modules_without_a_path_keep_their_random_init(tmp_path, models):
    x_path = _write("vjepa2-folder", models, tmp_path)
    cfg = _config(models)
    torch.manual_seed(11)
    model, report = M.load_pretrained(cfg, x_encoder=x_path, backend="reference")
    torch.manual_seed(11)
    fresh = M.VLJEPA(cfg, "reference")
    _equal(_state(model.predictor), _state(fresh.predictor))
    _equal(_state(model.y_encoder), _state(fresh.y_encoder))
    assert not report.predictor.loaded and report.predictor.layout is None
    assert not report.y_encoder.loaded and report["y_encoder"].notes == (
        "random init (no path given)",
    )
    assert report.x_encoder.loaded and report.x_encoder.layout == "transformers"
    assert "predictor: random init (no path given)" in str(report)


def test_a_gemma3_state_dict_file_loads_the_builtin_y_encoder(tmp_path, models):
    gemma = models["gemma"]
    path = tmp_path / "gemma.safetensors"
    safetensors_torch.save_file(_state(gemma), str(path))
    model, report = M.load_pretrained(_config(models), y_encoder=path, backend="reference")
    ref = M.TextEncoder(model.config.y_encoder, 16, "reference")
    M.load_gemma3_state_dict(ref, _state(gemma))
    ids, mask = _queries(12)
    with torch.no_grad():
        got = model.y_encoder.eval().last_hidden_state(ids, mask)
        assert torch.equal(got, ref.eval().last_hidden_state(ids, mask))
    assert report.y_encoder.layout == "transformers"
    assert {"dense keeps its random init", "head keeps its random init"} <= set(
        report.y_encoder.notes
    )


# ------------------------------------------------------------------- bad files, each named


class _Evil:
    """Unpickling this would create a file: weights_only must refuse before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad(kind: str, root: Path, models) -> tuple[Path, str]:
    """(path, what the error must say) for each kind of bad checkpoint."""
    if kind == "missing":
        return root / "nope.safetensors", "not found"
    if kind == "suffix":
        (root / "w.txt").write_text("hello")
        return root / "w.txt", "not a checkpoint file"
    if kind == "empty-folder":
        (root / "empty").mkdir()
        (root / "empty" / "notes.md").write_text("x")
        return root / "empty", "no checkpoint in the folder; expected one of model.safetensors"
    good = root / "good.safetensors"
    safetensors_torch.save_file({"a": torch.ones(4, 4)}, str(good))
    raw = good.read_bytes()
    if kind == "safetensors-header":
        (root / "h.safetensors").write_bytes(b"\xff" * 8 + raw[8:])
        return root / "h.safetensors", "not a valid safetensors file"
    if kind == "safetensors-truncated":
        (root / "t.safetensors").write_bytes(raw[:-8])
        return root / "t.safetensors", "not a valid safetensors file"
    if kind == "safetensors-in-folder":
        (root / "f").mkdir()
        (root / "f" / "model.safetensors").write_bytes(raw[:20])
        return root / "f" / "model.safetensors", "not a valid safetensors file"
    if kind == "pickled-object":
        torch.save({"a": torch.ones(2), "obj": _Evil(root / "pwned")}, root / "evil.pt")
        return root / "evil.pt", "needs weights_only=False"
    if kind == "torch-junk":
        (root / "junk.pth").write_bytes(b"definitely not a checkpoint")
        return root / "junk.pth", "not a readable torch checkpoint"
    if kind == "torch-truncated":
        torch.save({"a": torch.ones(64)}, root / "ok.bin")
        (root / "cut.bin").write_bytes((root / "ok.bin").read_bytes()[:200])
        return root / "cut.bin", "not a readable torch checkpoint"
    if kind == "torch-tensor":
        torch.save(torch.ones(3), root / "tensor.pt")
        return root / "tensor.pt", "expected a state dict"
    if kind == "torch-int-keys":
        torch.save({0: torch.ones(3)}, root / "ints.pt")
        return root / "ints.pt", "non-str keys"
    if kind in ("shard-missing", "shard-unlisted", "shard-not-found", "shard-moved"):
        folder = root / kind
        models["llama"].save_pretrained(folder, max_shard_size="100KB")
        index = folder / "model.safetensors.index.json"
        meta = json.loads(index.read_text())
        shards = sorted(set(meta["weight_map"].values()))
        wm = meta["weight_map"]
        if kind == "shard-missing":
            (folder / shards[1]).unlink()
            return folder, f"shard files missing from {folder}: {shards[1]}"
        key = sorted(wm)[0]
        if kind == "shard-unlisted":
            del wm[key]
            what = f"in a shard but not in the weight_map: {key}"
        elif kind == "shard-not-found":
            wm["layers.9.mlp.up_proj.weight"] = shards[0]
            what = "in the weight_map but in no shard: layers.9.mlp.up_proj.weight"
        else:
            other = next(s for s in shards if s != wm[key])
            what = f"{key} (listed in {other}, found in {wm[key]})"
            wm[key] = other
        index.write_text(json.dumps(meta))
        return folder, what
    if kind == "index-not-json":
        (root / "i").mkdir()
        (root / "i" / "pytorch_model.bin.index.json").write_text("{not json")
        return root / "i" / "pytorch_model.bin.index.json", "not a readable JSON file"
    if kind == "index-no-weight-map":
        (root / "i").mkdir()
        (root / "i" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
        return root / "i" / "model.safetensors.index.json", "'weight_map'"
    if kind == "index-escaping-shard":
        (root / "i").mkdir()
        index = {"weight_map": {"a": "../good.safetensors"}}
        (root / "i" / "model.safetensors.index.json").write_text(json.dumps(index))
        return root / "i" / "model.safetensors.index.json", "plain file names"
    if kind == "meta-two-shards":
        (root / "m").mkdir()
        for i in range(2):
            shard = {"tok_embeddings.weight": torch.ones(2, 2)}
            torch.save(shard, root / "m" / f"consolidated.0{i}.pth")
        return root / "m", "model-parallel consolidated.*.pth shards"
    raise AssertionError(kind)


BAD = [
    "missing", "suffix", "empty-folder", "safetensors-header", "safetensors-truncated",
    "safetensors-in-folder", "pickled-object", "torch-junk", "torch-truncated", "torch-tensor",
    "torch-int-keys", "shard-missing", "shard-unlisted", "shard-not-found", "shard-moved",
    "index-not-json", "index-no-weight-map", "index-escaping-shard", "meta-two-shards",
]  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_each_bad_file_is_refused_by_name(tmp_path, models, kind):
    path, what = _bad(kind, tmp_path, models)
    arg = path.parent if kind == "safetensors-in-folder" or kind.startswith("index-") else path
    with pytest.raises(ValueError) as err:
        M.read_state_dict(arg)
    assert str(path) in str(err.value) and what in str(err.value), str(err.value)
    assert not (tmp_path / "pwned").exists()  # nothing unpickled ran
    with pytest.raises(ValueError) as err:  # the same through load_pretrained
        M.load_pretrained(_config(models), predictor=arg, backend="reference")
    msg = str(err.value)
    assert msg.startswith("predictor: ") and str(path) in msg and what in msg


def test_the_pickled_object_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"obj": _Evil(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="weights_only=False"):
        M.read_state_dict(tmp_path / "evil.ckpt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the payload is real
    assert marker.exists()


def test_a_path_of_another_type_is_refused(models):
    with pytest.raises(ValueError, match="path: expected a local file or folder path"):
        M.read_state_dict(3)
    with pytest.raises(ValueError, match="x_encoder: expected a local file or folder path"):
        M.load_pretrained(_config(models), x_encoder={"a": torch.ones(1)})
    with pytest.raises(ValueError, match="config: expected a VLJEPAConfig"):
        M.load_pretrained(M.XEncoderConfig())


def test_a_checkpoint_of_another_module_names_the_module_and_path(tmp_path, models):
    llama, vjepa = _write("llama-pt", models, tmp_path), _write("vjepa2-bin", models, tmp_path)
    with pytest.raises(ValueError) as err:
        M.load_pretrained(_config(models), x_encoder=llama, backend="reference")
    msg = str(err.value)  # Llama's norm.weight alone does not make it V-JEPA 2's layout
    assert msg.startswith(f"x_encoder ({llama}): V-JEPA 2 state dict: no encoder keys"), msg
    with pytest.raises(ValueError) as err:
        M.load_pretrained(_config(models), predictor=vjepa, backend="reference")
    assert f"predictor ({vjepa})" in str(err.value) and "no Llama keys" in str(err.value)
    folder = _write("llama-folder", models, tmp_path)  # its config.json tells first
    with pytest.raises(ValueError) as err:
        M.load_pretrained(_config(models), x_encoder=folder, backend="reference")
    assert f"x_encoder ({folder}): {folder / 'config.json'} disagrees" in str(err.value)
    assert "model_type 'llama' is not 'vjepa2'" in str(err.value)
    with pytest.raises(ValueError) as err:  # a key missing: named with the path
        state = _state(models["llama"])
        del state["layers.3.mlp.up_proj.weight"]
        torch.save(state, tmp_path / "cut.pt")
        M.load_pretrained(_config(models), predictor=tmp_path / "cut.pt", backend="reference")
    assert f"predictor ({tmp_path / 'cut.pt'})" in str(err.value)
    assert "missing keys: layers.3.mlp.up_proj.weight" in str(err.value)


# ------------------------------------------------------- config files next to the weights


def test_llama_config_json_that_disagrees_is_refused_under_strict(tmp_path, models):
    """heads 8 x head_dim 8 has the shapes of heads 4 x head_dim 16: only config.json tells."""
    path = _write("llama-folder", models, tmp_path)
    cfg = _config(models, heads=8, kv_heads=4, head_dim=8)
    with pytest.raises(ValueError) as err:
        M.load_pretrained(cfg, predictor=path, backend="reference")
    msg = str(err.value)
    assert str(path / "config.json") in msg
    assert "heads = 8 but the file's num_attention_heads = 4" in msg
    assert "kv_heads = 4 but the file's num_key_value_heads = 2" in msg
    assert "head_dim = 8 but the file's head_dim = 16" in msg
    model, report = M.load_pretrained(cfg, predictor=path, backend="reference", strict=False)
    assert report.predictor.layout == "transformers"
    assert any("num_attention_heads = 4" in n for n in report.predictor.notes)
    assert model.predictor.layers[0].self_attn.num_heads == 8  # the config's, as asked


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (dict(rope_theta=10000.0), "rope_theta = 10000.0 but the file's rope_theta = 500000.0"),
        (dict(rms_eps=1e-6), "rms_eps = 1e-06 but the file's rms_norm_eps = 1e-05"),
        (dict(rope_scaling=None), "rope_scaling = None but the file's RoPE type is 'llama3'"),
        (dict(first_llama_layer=3), "num_hidden_layers = 4"),
    ],
)
def test_llama_config_fields_are_each_checked(tmp_path, models, changes, named):
    path = _write("llama-folder", models, tmp_path)
    with pytest.raises(ValueError, match="disagrees with the model config") as err:
        M.load_pretrained(_config(models, **changes), predictor=path, backend="reference")
    assert named in str(err.value)


def test_meta_params_json_is_checked(tmp_path, models):
    path = _write("llama-meta", models, tmp_path)
    with pytest.raises(ValueError) as err:
        M.load_pretrained(
            _config(models, heads=8, kv_heads=4, head_dim=8), predictor=path, backend="reference"
        )
    msg = str(err.value)
    assert str(path / "params.json") in msg and "heads = 8 but the file's n_heads = 4" in msg
    assert "head_dim = 8 but the file's dim / n_heads = 16" in msg
    with pytest.raises(ValueError, match="use_scaled_rope = True"):
        M.load_pretrained(_config(models, rope_scaling=None), predictor=path, backend="reference")


def test_vjepa2_config_json_is_checked(tmp_path, models):
    path = _write("vjepa2-folder", models, tmp_path)
    cfg = _config(models)
    bad = cfg.replace(x_encoder=M.XEncoderConfig(**{
        **{f: getattr(cfg.x_encoder, f) for f in ("dim", "depth", "mlp_dim", "patch", "tubelet")},
        "heads": 8, "image_size": 64, "norm_eps": 1e-5,
    }))  # fmt: skip
    with pytest.raises(ValueError) as err:
        M.load_pretrained(bad, x_encoder=path, backend="reference")
    msg = str(err.value)
    for named in ("heads = 8 but the file's num_attention_heads = 4",
                  "image_size = 64 but the file's crop_size = 32",
                  "norm_eps = 1e-05 but the file's layer_norm_eps = 1e-06"):  # fmt: skip
        assert named in msg
    _, report = M.load_pretrained(bad, x_encoder=path, backend="reference", strict=False)
    assert len(report.x_encoder.notes) == 3


LLAMA_32_1B = {  # meta-llama/Llama-3.2-1B config.json (the fields the check reads)
    "model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
    "num_hidden_layers": 16, "vocab_size": 128256, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "tie_word_embeddings": True,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}  # fmt: skip
LLAMA_32_1B_META = {  # its original/params.json
    "dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
    "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
    "use_scaled_rope": True,
}  # fmt: skip
VJEPA2_VITL = {  # facebook/vjepa2-vitl-fpc64-256 config.json
    "model_type": "vjepa2", "hidden_size": 1024, "num_attention_heads": 16,
    "num_hidden_layers": 24, "mlp_ratio": 4.0, "patch_size": 16, "tubelet_size": 2,
    "crop_size": 256, "layer_norm_eps": 1e-06, "in_chans": 3,
}  # fmt: skip


def test_the_released_configs_agree_with_the_paper_preset(tmp_path):
    """strict=True must not refuse the real checkpoints the paper preset is for (the
    transformers v4 config.json spelling with rope_scaling, and Meta's params.json)."""
    from vljepa_fast.models import pretrained as P

    paper = M.VLJEPAConfig.paper()
    assert P._check_llama_config(Path("config.json"), LLAMA_32_1B, paper.predictor) == []
    assert P._check_llama_config(Path("params.json"), LLAMA_32_1B_META, paper.predictor) == []
    assert P._check_vjepa2_config(VJEPA2_VITL, paper.x_encoder) == []
    v5 = {k: v for k, v in LLAMA_32_1B.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 500000.0, **LLAMA_32_1B["rope_scaling"]}
    assert P._check_llama_config(Path("config.json"), v5, paper.predictor) == []
    off = {**LLAMA_32_1B, "rope_scaling": {**LLAMA_32_1B["rope_scaling"], "factor": 8.0}}
    assert P._check_llama_config(Path("config.json"), off, paper.predictor) == [
        "rope_scaling['factor'] = 32.0 but the file's factor = 8.0"
    ]


def test_layer_types_spelled_out_equal_the_pattern_rule(tmp_path, models):
    """EmbeddingGemma's config.json lists its 24 layer types; the paper preset spells them by
    the pattern rule: strict=True must accept that (and refuse other kinds)."""
    from vljepa_fast.models import pretrained as P

    hf_cfg = transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=768, intermediate_size=1152, num_hidden_layers=24,
        num_attention_heads=3, num_key_value_heads=1, head_dim=256, max_position_embeddings=2048,
        query_pre_attn_scalar=256, sliding_window=512, use_bidirectional_attention=True,
        rms_norm_eps=1e-6,
    )  # fmt: skip
    folder = M.YEncoderConfig.from_gemma3_config(hf_cfg, dense=(3072, 768), normalize=True)
    assert folder.layer_types is not None and M.YEncoderConfig.paper().layer_types is None
    assert P._y_encoder_diffs(M.YEncoderConfig.paper(), folder) == []
    _st_folder(models["gemma"], tmp_path / "g")
    cfg = _config(models)
    by_rule = dataclasses.replace(cfg.y_encoder, layer_types=None, sliding_window_pattern=2)
    assert by_rule.attention_types == (SLIDING, FULL)
    M.load_pretrained(cfg.replace(y_encoder=by_rule), y_encoder=tmp_path / "g")
    all_full = dataclasses.replace(by_rule, sliding_window_pattern=1)
    with pytest.raises(ValueError, match="attention_types = \\('full_attention', 'full_at"):
        M.load_pretrained(cfg.replace(y_encoder=all_full), y_encoder=tmp_path / "g")


def test_y_encoder_folder_config_strict_or_taken(tmp_path, models):
    _st_folder(models["gemma"], tmp_path / "g")
    cfg = _config(models)
    other = cfg.replace(y_encoder=M.YEncoderConfig.from_gemma3_config(
        models["gemma"].config, dense=(40,), normalize=False, max_len=48, norm_eps=1e-5,
    ))  # fmt: skip
    with pytest.raises(ValueError) as err:
        M.load_pretrained(other, y_encoder=tmp_path / "g", backend="reference")
    msg = str(err.value)
    assert f"y_encoder ({tmp_path / 'g'})" in msg
    assert "normalize = False but the folder's is True" in msg
    assert "norm_eps = 1e-05 but the folder's is 1e-06" in msg
    model, report = M.load_pretrained(
        other, y_encoder=tmp_path / "g", backend="reference", strict=False
    )
    assert model.config.y_encoder == cfg.y_encoder  # the folder's (max_len: the config's)
    assert model.y_encoder.cfg == cfg.y_encoder
    assert sum("replaced by the folder's" in n for n in report.y_encoder.notes) == 2


def test_a_y_encoder_folder_of_another_model_names_the_path(tmp_path, models):
    folder = _write("llama-folder", models, tmp_path)
    with pytest.raises(ValueError) as err:
        M.load_pretrained(_config(models), y_encoder=folder, backend="reference")
    assert str(err.value).startswith(f"y_encoder ({folder}): Gemma-3 config: expected model_type")


# ------------------------------------------------------------- tokenizers in the folders


def _word_tokenizer(words: int = 60):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(words)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>"
    )


def _ids(tok, texts):
    rows = [tok.encode(t) for t in texts]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    return ids, mask


def test_a_tokenizer_in_the_checkpoint_folder_is_used(tmp_path, models):
    llama = _write("llama-folder", models, tmp_path)
    _word_tokenizer().save_pretrained(llama)
    _st_folder(models["gemma"], tmp_path / "g")
    _word_tokenizer(40).save_pretrained(tmp_path / "g")
    model, report = M.load_pretrained(
        _config(models), predictor=llama, y_encoder=tmp_path / "g", backend="reference"
    )
    assert f"query_tokenizer: the tokenizer in {llama} (pass query_tokenizer= for another)" in (
        report.predictor.notes
    )
    assert any(n.startswith("text_tokenizer: the tokenizer in") for n in report.y_encoder.notes)
    texts = ["w1 w2 w3 w57", "w4"]
    visual = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(13))
    ids, mask = _ids(_word_tokenizer(), texts)
    with torch.no_grad():
        got = model.eval().predict(None, texts, x_features=visual)
        assert torch.equal(got, model.predictor(visual, ids, mask))
        ids, mask = _ids(_word_tokenizer(40), texts[1:])
        assert torch.equal(model.encode_text(texts[1:]), model.y_encoder(ids, mask))
    given = M.ByteTokenizer(8)  # an explicit tokenizer wins (and is checked by the model)
    with pytest.raises(ValueError, match="query_tokenizer: a ByteTokenizer"):
        M.load_pretrained(_config(models), predictor=llama, query_tokenizer=given)

    def mine(texts):
        return _ids(_word_tokenizer(), texts)

    model, report = M.load_pretrained(
        _config(models), predictor=llama, query_tokenizer=mine, backend="reference"
    )
    assert model.query_tokenizer is mine
    assert not any(n.startswith(("query_tokenizer", "decoder_tokenizer")) for n in (
        report.predictor.notes
    ))  # fmt: skip


def test_a_folder_tokenizer_that_does_not_fit_is_named(tmp_path, models):
    llama = _write("llama-folder", models, tmp_path)
    _word_tokenizer(400).save_pretrained(llama)  # ids up to 401: the predictor has 300
    with pytest.raises(ValueError) as err:
        M.load_pretrained(_config(models), predictor=llama, backend="reference")
    msg = str(err.value)
    assert msg.startswith("query_tokenizer: its ids reach 401")
    assert f"query_tokenizer is the tokenizer found in {llama}" in msg


def test_the_strict_argument_is_checked(models):
    with pytest.raises(ValueError, match="strict: expected a bool"):
        M.load_pretrained(_config(models), strict="yes")


def test_os_pathlike_is_accepted(tmp_path, models):
    path = _write("llama-pt", models, tmp_path)

    class P(os.PathLike):
        def __fspath__(self):
            return str(path)

    _equal(M.read_state_dict(P()), _state(models["llama"]))


def test_the_decoder_takes_the_predictor_folders_tokenizer_when_it_shares_the_vocabulary(
    tmp_path, models
):
    """The paper's Y-decoder speaks Llama's vocabulary: a loaded model decodes with the
    predictor folder's tokenizer unless told otherwise; a decoder with another vocabulary
    does not take it."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]
    tk = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
    )  # fmt: skip
    llama = _write("llama-folder", models, tmp_path)
    tok.save_pretrained(llama)
    cfg = _config(models)
    shared = cfg.replace(
        y_decoder=M.YDecoderConfig(
            dim=32, layers=1, heads=2, mlp_dim=64, prefix_tokens=2, vocab_size=300, bos_id=2,
            eos_id=3, max_len=16,
        )  # fmt: skip
    )
    model, report = M.load_pretrained(shared, predictor=llama, backend="reference")
    assert model.decoder_tokenizer is not None
    assert any(n.startswith("decoder_tokenizer: the tokenizer in") for n in report.predictor.notes)
    texts = model.eval().decode(torch.randn(2, shared.embed_dim), max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    model, report = M.load_pretrained(cfg, predictor=llama, backend="reference")  # 260 ids
    assert not any(n.startswith("decoder_tokenizer") for n in report.predictor.notes)


# ------------------------------------------- review 13: config files next to files, tokenizers


def test_the_config_file_next_to_a_checkpoint_file_is_checked(tmp_path, models):
    """A checkpoint FILE has its folder's config.json (params.json) checked, as a folder has;
    the notes say which config file was checked, or that none was found."""
    folder = _write("llama-folder", models, tmp_path)
    file = folder / "model.safetensors"
    bad = _config(models, heads=8, kv_heads=4, head_dim=8)
    with pytest.raises(ValueError) as err:
        M.load_pretrained(bad, predictor=file, backend="reference")
    msg = str(err.value)
    assert msg.startswith(f"predictor ({file}): {folder / 'config.json'} disagrees"), msg
    assert "heads = 8 but the file's num_attention_heads = 4" in msg
    _, report = M.load_pretrained(bad, predictor=file, backend="reference", strict=False)
    assert sum(n.startswith(f"{folder / 'config.json'} disagrees") for n in (
        report.predictor.notes
    )) == 3  # fmt: skip
    model, report = M.load_pretrained(_config(models), predictor=file, backend="reference")
    assert f"{folder / 'config.json'} checked: agrees with the config" in report.predictor.notes
    _check_predictor(model.eval(), models["llama"])
    meta = _write("llama-meta", models, tmp_path) / "consolidated.00.pth"  # Meta's params.json
    with pytest.raises(ValueError, match="heads = 8 but the file's n_heads = 4") as err:
        M.load_pretrained(bad, predictor=meta, backend="reference")
    assert str(meta.parent / "params.json") in str(err.value)
    vjepa = _write("vjepa2-folder", models, tmp_path) / "model.safetensors"
    cfg = _config(models)
    x_bad = cfg.replace(x_encoder=dataclasses.replace(cfg.x_encoder, norm_eps=1e-5))
    with pytest.raises(ValueError, match="norm_eps = 1e-05 but the file's layer_norm_eps") as err:
        M.load_pretrained(x_bad, x_encoder=vjepa, backend="reference")
    assert str(vjepa.parent / "config.json") in str(err.value)
    _, report = M.load_pretrained(cfg, x_encoder=vjepa, backend="reference")
    assert report.x_encoder.notes == (f"{vjepa.parent / 'config.json'} checked: agrees with the "
                                      "config",)  # fmt: skip
    alone = _write("llama-pt", models, tmp_path)  # nothing next to it
    _, report = M.load_pretrained(bad, predictor=alone, backend="reference")
    assert f"no config file checked: no config.json or params.json in {tmp_path}" in (
        report.predictor.notes
    )


def test_the_config_json_next_to_a_bare_gemma_file_is_checked(tmp_path, models):
    models["gemma"].save_pretrained(tmp_path / "g")
    file = tmp_path / "g" / "model.safetensors"
    cfg = _config(models)
    model, report = M.load_pretrained(cfg, y_encoder=file, backend="reference")
    assert f"{tmp_path / 'g' / 'config.json'} checked: agrees with the config" in (
        report.y_encoder.notes
    )
    other = cfg.replace(y_encoder=dataclasses.replace(cfg.y_encoder, norm_eps=1e-5, rope_theta=1e4))
    with pytest.raises(ValueError) as err:
        M.load_pretrained(other, y_encoder=file, backend="reference")
    msg = str(err.value)
    assert msg.startswith(f"y_encoder ({file}): {tmp_path / 'g' / 'config.json'} disagrees"), msg
    assert "norm_eps = 1e-05 but the file's is 1e-06" in msg
    assert "rope_theta = 10000.0 but the file's is 1000000.0" in msg
    model, report = M.load_pretrained(other, y_encoder=file, backend="reference", strict=False)
    assert model.config.y_encoder == other.y_encoder  # the config's, as asked
    assert sum("disagrees with the config" in n for n in report.y_encoder.notes) == 2
    causal = {**json.loads((tmp_path / "g" / "config.json").read_text()),
              "use_bidirectional_attention": False}  # fmt: skip
    (tmp_path / "g" / "config.json").write_text(json.dumps(causal))
    with pytest.raises(ValueError, match="disagrees .* use_bidirectional_attention is not true"):
        M.load_pretrained(cfg, y_encoder=file, backend="reference")
    (tmp_path / "g" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"y_encoder \\({file}\\): .*expected a JSON object"):
        M.load_pretrained(cfg, y_encoder=file, backend="reference")


def test_meta_params_json_without_use_scaled_rope_means_no_scaling(tmp_path, models):
    """Meta's ModelArgs reads an absent use_scaled_rope as False: against a config with llama3
    RoPE scaling that is a disagreement, as a transformers config.json without scaling is."""
    from vljepa_fast.models import pretrained as P

    paper = M.VLJEPAConfig.paper().predictor
    plain = {k: v for k, v in LLAMA_32_1B_META.items() if k != "use_scaled_rope"}
    assert P._check_llama_config(Path("params.json"), plain, paper) == [
        f"rope_scaling = {paper.rope_scaling!r} but the file's use_scaled_rope = False "
        "(absent: Meta's default)"
    ]
    folder = _write("llama-meta", models, tmp_path)
    params = json.loads((folder / "params.json").read_text())
    del params["use_scaled_rope"]
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="rope_scaling = .* use_scaled_rope = False \\(absent"):
        M.load_pretrained(_config(models), predictor=folder, backend="reference")
    _, report = M.load_pretrained(
        _config(models), predictor=folder, backend="reference", strict=False
    )
    assert any("disagrees with the config: rope_scaling" in n for n in report.predictor.notes)
    _, report = M.load_pretrained(
        _config(models, rope_scaling=None), predictor=folder, backend="reference"
    )
    assert f"{folder / 'params.json'} checked: agrees with the config" in report.predictor.notes


def _shared_vocab(cfg: M.VLJEPAConfig) -> M.VLJEPAConfig:
    """A Y-decoder with the predictor's vocabulary: it takes the predictor folder's tokenizer."""
    return cfg.replace(
        y_decoder=M.YDecoderConfig(
            dim=32, layers=1, heads=2, mlp_dim=64, prefix_tokens=2, vocab_size=300, bos_id=0,
            eos_id=1, max_len=16,
        )  # fmt: skip
    )


def test_the_tokenizer_error_blames_only_a_tokenizer_that_was_found(tmp_path, models):
    llama = _write("llama-folder", models, tmp_path)
    _word_tokenizer().save_pretrained(llama)
    cfg = _shared_vocab(_config(models))
    with pytest.raises(ValueError) as err:  # the user's own query_tokenizer fails
        M.load_pretrained(cfg, predictor=llama, query_tokenizer=M.ByteTokenizer(8))
    msg = str(err.value)
    assert msg.startswith("query_tokenizer: a ByteTokenizer"), msg
    assert "found in" not in msg and "decoder_tokenizer" not in msg, msg
    _word_tokenizer(400).save_pretrained(llama)  # both found, the query one fails
    with pytest.raises(ValueError) as err:
        M.load_pretrained(cfg, predictor=llama, backend="reference")
    msg = str(err.value)
    assert msg.startswith("query_tokenizer: its ids reach 401"), msg
    assert msg.endswith(
        f"(query_tokenizer is the tokenizer found in {llama}: pass query_tokenizer= to choose)"
    ), msg


def test_a_tokenizer_in_the_transformer_module_folder_is_found(tmp_path, models):
    """sentence-transformers keeps the Transformer module (weights, config, tokenizer) in a
    subfolder when modules.json says so (``"path": "0_Transformer"``)."""
    root = tmp_path / "st"
    dense = _st_folder(models["gemma"], root, sub="0_Transformer")
    _word_tokenizer(40).save_pretrained(root / "0_Transformer")
    model, report = M.load_pretrained(_config(models), y_encoder=root, backend="reference")
    sub = root / "0_Transformer"
    assert f"text_tokenizer: the tokenizer in {sub} (pass text_tokenizer= for another)" in (
        report.y_encoder.notes
    )
    assert f"{sub / 'config.json'} checked: agrees with the config" in report.y_encoder.notes
    model.eval()
    _check_y_encoder_folder(model, models["gemma"], dense)
    texts = ["w1 w2 w39", "w4"]
    ids, mask = _ids(_word_tokenizer(40), texts)
    with torch.no_grad():
        assert torch.equal(model.encode_text(texts), model.y_encoder(ids, mask))


def test_rope_scaling_is_compared_by_what_the_model_does(tmp_path, models):
    """{"rope_type": "default"} scales nothing, as None: it agrees with Meta's absent or false
    use_scaled_rope and disagrees with true; a use_scaled_rope that is not a bool is named."""
    from vljepa_fast.models import pretrained as P

    default = _config(models, rope_scaling={"rope_type": "default"}).predictor
    llama3 = M.VLJEPAConfig.paper().predictor
    base = {k: v for k, v in LLAMA_32_1B_META.items() if k != "use_scaled_rope"}
    f = Path("params.json")
    pick = {"dim", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta"}
    mine = {k: v for k, v in base.items() if k not in pick}  # only the RoPE question left
    assert P._check_llama_config(f, mine, default) == []
    assert P._check_llama_config(f, {**mine, "use_scaled_rope": False}, default) == []
    assert P._check_llama_config(f, {**mine, "use_scaled_rope": True}, default) == [
        "rope_scaling = {'rope_type': 'default'} but the file's use_scaled_rope = True"
    ]
    assert P._check_llama_config(f, {**base, "use_scaled_rope": True}, llama3) == []
    assert P._check_llama_config(f, {**base, "use_scaled_rope": "false"}, llama3) == [
        "use_scaled_rope: expected a JSON bool, got 'false'"
    ]
    hf = {"model_type": "llama", "rope_scaling": None}  # transformers: no scaling either
    assert P._check_llama_config(Path("config.json"), hf, default) == []


def test_meta_weights_are_checked_against_params_json_not_a_stray_config_json(tmp_path, models):
    folder = _write("llama-meta", models, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 999}))
    _, report = M.load_pretrained(_config(models), predictor=folder, backend="reference")
    assert f"{folder / 'params.json'} checked: agrees with the config" in report.predictor.notes


def test_an_unreadable_config_file_is_a_note_without_strict(tmp_path, models):
    llama = _write("llama-folder", models, tmp_path)
    weights = llama / "model.safetensors"
    for junk in ("{not json", "[1, 2]"):
        (llama / "config.json").write_text(junk)
        with pytest.raises(ValueError, match="config.json.*strict=False"):
            M.load_pretrained(_config(models), predictor=weights, backend="reference")
        _, report = M.load_pretrained(
            _config(models), predictor=weights, backend="reference", strict=False
        )
        assert report.predictor.loaded
        assert any(n.startswith("config file not checked:") for n in report.predictor.notes)


def test_a_gemma_folder_refuses_max_len_beyond_its_positions(tmp_path, models):
    _st_folder(models["gemma"], tmp_path / "g")
    limit = models["gemma"].config.max_position_embeddings
    M.load_gemma3_folder(tmp_path / "g", 16, backend="reference", max_len=limit)
    with pytest.raises(ValueError, match=f"max_len: {limit + 1}, more than the model's max_pos"):
        M.load_gemma3_folder(tmp_path / "g", 16, backend="reference", max_len=limit + 1)
