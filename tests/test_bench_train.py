"""bench/train_peers.py computes what our model computes (so bench/bench_train.py compares the
same function): the peers' predictor (transformers LlamaDecoderLayer under a dense additive mask)
and Y-encoder (transformers Gemma3TextModel) given our weights give our outputs, the eager
InfoNCE equals vljepa_fast.functional.infonce_loss, and the bench's tiny case runs one step of
every provider."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import train_peers  # noqa: E402

import vljepa_fast.models as M  # noqa: E402
from vljepa_fast import functional  # noqa: E402
from vljepa_fast.train.presets import preset  # noqa: E402

pytestmark = pytest.mark.cpu


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Weights of order one, norms included (default inits hide wrong mappings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def _tokens(B: int, L: int, vocab: int, pad: int, g: torch.Generator):
    """Right-padded ids [B, L] with lengths in [1, L] (one full row, one of length 1)."""
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0], lengths[-1] = L, 1
    mask = torch.arange(L)[None] < lengths[:, None]
    ids = torch.randint(0, vocab, (B, L), generator=g)
    ids = torch.where(mask, torch.where(ids == pad, (pad + 1) % vocab, ids), pad)
    return ids, mask


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_peers_predictor_equals_ours_given_our_weights(name):
    cfg = preset(name).model
    pc = cfg.predictor
    torch.manual_seed(0)
    ours = M.Predictor(pc, cfg.x_encoder.dim, cfg.embed_dim, backend="reference")
    _perturb(ours, 1)
    peers = train_peers.PeersPredictor(pc, cfg.x_encoder.dim, cfg.embed_dim)
    peers.load_state_dict(ours.state_dict(), strict=True)  # the names are transformers' already
    g = torch.Generator().manual_seed(2)
    B, N, L = 5, 12, min(pc.max_query_len, 9)
    visual = torch.randn(B, N, cfg.x_encoder.dim, generator=g)
    ids, mask = _tokens(B, L, pc.vocab_size, pc.pad_id, g)
    with torch.no_grad():
        want, got = ours(visual, ids, mask), peers(visual, ids, mask)
    assert got.shape == want.shape == (B, cfg.embed_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the test can fail: another layer's weights change the output
    with torch.no_grad():
        peers.layers[0].mlp.up_proj.weight.mul_(1.5)
        assert not torch.allclose(peers(visual, ids, mask), want, rtol=1e-5, atol=1e-5)


def test_peers_predictor_uses_the_paper_rope_scaling():
    """The paper's predictor config carries Llama-3's RoPE scaling; the transformers config
    must too (a plain RoPE would agree on short sequences only by chance)."""
    pc = M.VLJEPAConfig.paper().predictor
    config = train_peers.llama_config(pc)
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["rope_theta"] == pc.rope_theta


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_peers_text_encoder_equals_ours_given_our_weights(name):
    cfg = preset(name).model
    yc = cfg.y_encoder
    torch.manual_seed(3)
    ours = M.TextEncoder(yc, cfg.embed_dim, backend="reference")
    _perturb(ours, 4)
    peers = train_peers.PeersTextEncoder(yc, cfg.embed_dim)
    state = {
        (k if k.startswith(("dense.", "head.")) else "backbone." + k): v
        for k, v in ours.state_dict().items()
    }
    peers.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(5)
    ids, mask = _tokens(4, min(yc.max_len, 11), yc.vocab_size, yc.pad_id, g)
    with torch.no_grad():
        want, got = ours(ids, mask), peers(ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N, D", [(7, 5), (33, 16)])
def test_eager_infonce_equals_infonce_loss_float64(N, D):
    g = torch.Generator().manual_seed(N)
    pred = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0 + torch.rand((), generator=g).item(), dtype=torch.float64)
    scale.requires_grad_(True)
    got = train_peers.eager_infonce(pred, target, scale, 100.0)
    want = functional.infonce_loss(pred, target, temperature=1.0 / scale.exp(), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got, (pred, target, scale))
    g_want = torch.autograd.grad(want, (pred, target, scale))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the clamp of the scale, as VLJEPA.temperature clamps it
    big = torch.tensor(math.log(200.0), dtype=torch.float64)
    clamped = train_peers.eager_infonce(pred, target, big, 100.0)
    want = functional.infonce_loss(pred, target, temperature=0.01, backend="reference")
    torch.testing.assert_close(clamped, want, rtol=1e-12, atol=1e-12)


def test_peers_model_loads_ours_and_gives_our_loss():
    """The whole peers' model with our VLJEPA's weights gives VLJEPA's loss on a video batch."""
    p = preset("tiny")
    cfg = p.model
    torch.manual_seed(6)
    ours = M.VLJEPA(cfg, backend="reference", y_decoder=False)
    peers = train_peers.peers_from_ours(train_peers.PeersModel(cfg), ours)
    g = torch.Generator().manual_seed(7)
    B = 4
    video = torch.randn(B, 3, p.frames, p.image_size, p.image_size, generator=g)
    pc, yc = cfg.predictor, cfg.y_encoder
    q = _tokens(B, 8, pc.vocab_size, pc.pad_id, g)
    t = _tokens(B, 10, yc.vocab_size, yc.pad_id, g)
    with torch.no_grad():
        want = ours(video, q, t)
        got = peers(video, q, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    groups = train_peers.param_groups(peers, 1e-3)
    mine = ours.param_groups(1e-3)
    assert [len(x["params"]) for x in groups] == [len(x["params"]) for x in mine]
    assert [x["lr"] for x in groups] == [x["lr"] for x in mine]


def test_every_bench_preset_lists_train_cases_with_two_batches_per_config():
    """bench/report.py's memory fit needs two batches per config; a preset without train cases
    would silently bench nothing."""
    import bench_train
    import presets

    assert set(bench_train.CASES) == set(presets.PRESETS)
    for name in presets.PRESETS:
        cases = bench_train.CASES[name]
        assert cases, name
        for config in {c["config"] for c in cases}:
            assert len({c["B"] for c in cases if c["config"] == config}) >= 2, (name, config)


def test_memory_fit_extrapolates_from_two_points():
    import report

    a, b = 1000 + torch.randint(0, 1000, ()).item(), 7 + torch.randint(0, 50, ()).item()
    fit = report.memory_fit([(4, a + 4 * b), (16, a + 16 * b)], budget=a + 1000 * b + b // 2)
    assert fit["max_batch"] == 1000 and fit["batches"] == (4, 16)
    assert report.memory_fit([(4, 10)], budget=100) is None


@pytest.mark.parametrize("provider", ["peers", "vf", "vf+ckpt"])
def test_bench_tiny_case_runs_one_step_per_provider(provider, tmp_path):
    """The bench's runner of each provider builds and takes an optimizer step with a finite
    loss, at the smoke preset's smallest tiny batch (the loss of a random model on B
    samples is near log(B))."""
    import bench_train
    import train_memory

    B = min(c["B"] for c in bench_train.CASES["smoke"])
    cache = None
    if provider != "peers":
        train_memory.write_cache("tiny", B, torch.device("cpu"), tmp_path)
        cache = str(tmp_path)
    runner = train_memory.build(provider, "tiny", B, torch.device("cpu"), "fp32", cache)
    try:
        loss = runner.step()
    finally:
        runner.close()
    assert runner.batch == B and math.isfinite(loss) and 0 < loss < 4 * math.log(B) + 4
