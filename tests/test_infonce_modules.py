"""cpu tier: vf.nn.InfoNCELoss and the open_clip ClipLoss drop-in against written-out formulas
and against open_clip itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vljepa_fast as vf
from vljepa_fast.integrations.open_clip import ClipLoss


def _feats(N=33, D=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    return a.float().requires_grad_(True), b.float().requires_grad_(True)


def _open_clip_formula(img, txt, scale):
    """open_clip ClipLoss, world_size 1: mean of the two cross-entropies over scale*img@txt^T."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_clip_loss_matches_open_clip_formula_and_gradients():
    img, txt = _feats()
    scale = torch.tensor(14.0, requires_grad=True)
    got = ClipLoss()(img, txt, scale)
    i64, t64, s64 = (x.detach().double().requires_grad_(True) for x in (img, txt, scale))
    want = _open_clip_formula(i64, t64, s64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in zip(
        torch.autograd.grad(got, (img, txt, scale)), torch.autograd.grad(want, (i64, t64, s64))
    ):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)
    out = ClipLoss()(img, txt, 14.0, output_dict=True)
    assert set(out) == {"contrastive_loss"}


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_clip_loss_matches_the_real_open_clip(with_bias):
    """The drop-in against open_clip.loss.ClipLoss itself (installed by the test extra), float64:
    the loss, the gradients of both features, logit_scale and logit_bias, and output_dict."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt = (x.detach().double() for x in _feats(29, 20, seed=4))
    args = [img, txt, torch.tensor(11.0, dtype=torch.float64)]
    if with_bias:
        args.append(torch.tensor(-3.5, dtype=torch.float64))
    results = []
    for loss_fn in (ClipLoss(), open_clip_loss.ClipLoss()):
        inputs = [a.clone().requires_grad_(True) for a in args]
        out = loss_fn(*inputs, **({} if with_bias else {"logit_bias": None}), output_dict=True)
        assert set(out) == {"contrastive_loss"}
        loss = out["contrastive_loss"]
        results.append((loss, torch.autograd.grad(loss, inputs)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, g, w in zip(("image", "text", "logit_scale", "logit_bias"), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_clip_loss_errors():
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    img, txt = _feats(4, 3)
    with pytest.raises(ValueError, match="world_size"):
        ClipLoss(world_size=2)(img, txt, 10.0)
    with pytest.raises(ValueError, match="logit_bias"):
        ClipLoss()(img, txt, 10.0, torch.zeros(4))


def test_infonce_module_learnable_temperature_clamps_and_learns():
    p, t = _feats(16, 8, seed=1)
    loss_fn = vf.nn.InfoNCELoss(temperature=0.07, learnable_temperature=True, max_logit_scale=100)
    assert torch.allclose(loss_fn.logit_scale.exp(), torch.tensor(1 / 0.07))
    loss = loss_fn(p, t)
    want = vf.infonce_loss(p, t, temperature=0.07, backend="reference")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert loss_fn.logit_scale.grad is not None and torch.isfinite(loss_fn.logit_scale.grad)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(10.0)  # exp(10) > 100: the clamp holds the scale at 100
    torch.testing.assert_close(
        loss_fn(p, t),
        vf.infonce_loss(p, t, temperature=0.01, backend="reference"),
        rtol=1e-5,
        atol=1e-6,
    )
    fixed = vf.nn.InfoNCELoss(temperature=0.2, reduction="none")
    assert fixed(p, t).shape == (16,) and fixed.logit_scale is None
    with pytest.raises(ValueError, match="temperature"):
        vf.nn.InfoNCELoss(temperature=-1.0)
