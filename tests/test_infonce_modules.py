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


# --------------------------------------------------------------------- argument checks

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": True}, "temperature"),  # was taken as 1.0
        ({"temperature": False}, "temperature"),
        ({"temperature": "0.07"}, "temperature"),
        ({"temperature": None}, "temperature"),
        ({"temperature": NAN}, "temperature"),
        ({"temperature": INF}, "temperature"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": torch.tensor(0.07)}, "temperature"),
        ({"learnable_temperature": "yes"}, "learnable_temperature"),
        ({"learnable_temperature": 1}, "learnable_temperature"),
        ({"learnable_temperature": None}, "learnable_temperature"),
        ({"max_logit_scale": "100"}, "max_logit_scale"),  # was a bare TypeError
        ({"max_logit_scale": True}, "max_logit_scale"),
        ({"max_logit_scale": NAN}, "max_logit_scale"),
        ({"max_logit_scale": 0.0}, "max_logit_scale"),
        ({"max_logit_scale": -100.0}, "max_logit_scale"),
        ({"max_logit_scale": None}, "max_logit_scale"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"symmetric": 1}, "symmetric"),
        ({"reduction": "avg"}, "reduction"),
        ({"reduction": None}, "reduction"),
        ({"backend": "nope"}, "backend"),
        ({"backend": None}, "backend"),
        ({"backend": {"infonce": "cpu"}}, "backend"),  # not an op name
        ({"backend": {"infonce_loss": "nope"}}, r"backend\['infonce_loss'\]"),
        # a learnable start below 1 / max_logit_scale would be clamped to another value at once
        ({"temperature": 0.001, "learnable_temperature": True}, "temperature"),
        # below the range vf.infonce_loss serves: refused at construction, not at forward
        ({"temperature": 1e-30}, "temperature"),
        ({"temperature": 1e-300, "learnable_temperature": True, "max_logit_scale": INF},
         "temperature"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v,
)
def test_infonce_module_refuses_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        vf.nn.InfoNCELoss(**kwargs)


def test_infonce_module_takes_numpy_scalars_and_an_unbounded_clamp():
    np = pytest.importorskip("numpy")
    p, t = _feats(12, 8, seed=2)
    fixed = vf.nn.InfoNCELoss(np.float32(0.25), symmetric=np.bool_(False))
    assert fixed.temperature == float(np.float32(0.25)) and fixed.symmetric is False
    want = vf.infonce_loss(
        p, t, temperature=fixed.temperature, symmetric=False, backend="reference"
    )
    torch.testing.assert_close(fixed(p, t), want, rtol=1e-5, atol=1e-6)
    learn = vf.nn.InfoNCELoss(0.001, learnable_temperature=True, max_logit_scale=float("inf"))
    torch.testing.assert_close(learn.current_temperature(), torch.tensor(0.001))
    capped = vf.nn.InfoNCELoss(0.05, learnable_temperature=True, max_logit_scale=np.int64(50))
    assert capped.max_logit_scale == 50.0


def test_infonce_module_forward_names_a_non_tensor_pred():
    """The learnable temperature was moved to pred.device first: AttributeError on a list."""
    _, t = _feats(4, 3)
    loss_fn = vf.nn.InfoNCELoss(learnable_temperature=True)
    with pytest.raises(ValueError, match="^pred: "):
        loss_fn([[1.0, 0.0, 0.0]] * 4, t)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"local_loss": "no"}, "local_loss"),
        ({"gather_with_grad": 1}, "gather_with_grad"),
        ({"cache_labels": None}, "cache_labels"),
        ({"use_horovod": "False"}, "use_horovod: expected a bool"),  # a truthy string
        ({"rank": -1}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 1}, "rank"),  # >= world_size
        ({"rank": 0.0}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"world_size": 2.0}, "world_size"),
        ({"world_size": "2"}, "world_size"),
        ({"backend": "nope"}, "backend"),
        ({"backend": None}, "backend"),
        ({"backend": {"attn": "sdpa"}}, "backend"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v.split(":")[0],
)
def test_clip_loss_constructor_refuses_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        ClipLoss(**kwargs)


@pytest.mark.parametrize("make", [vf.nn.InfoNCELoss, ClipLoss], ids=["InfoNCELoss", "ClipLoss"])
def test_loss_modules_pass_the_backend_spec_unchanged(make):
    """A name, or a per-op mapping, reaches vf.infonce_loss (the dispatch trace shows it); a
    name the op lacks is refused at construction, naming the op."""
    p, t = _feats(8, 4)
    args = (p, t) if make is vf.nn.InfoNCELoss else (p, t, 10.0)
    for spec in ("reference", {"infonce_loss": "reference", "attention": "sdpa"}):
        with vf._backends.trace() as events:
            make(backend=spec)(*args)
        assert [(e.op, e.backend) for e in events] == [("infonce_loss", "reference")]
    with pytest.raises(ValueError, match="^backend: infonce_loss has no backend 'sdpa'"):
        make(backend="sdpa")


@pytest.mark.parametrize(
    "scale",
    [
        0.0,  # was ZeroDivisionError
        -1.0,
        NAN,
        INF,
        1e-310,  # 1 / scale overflows
        1e30,  # 1 / scale below the smallest temperature vf.infonce_loss serves
        True,
        "10",
        None,
        torch.tensor(0.0),
        torch.tensor(-2.0),
        torch.tensor(NAN),
        torch.ones(2),
        torch.tensor(10),
        torch.tensor(10.0, device="meta"),
    ],
    ids=repr,
)
def test_clip_loss_refuses_bad_logit_scales(scale):
    img, txt = _feats(4, 3)
    with pytest.raises(ValueError, match="^logit_scale: "):
        ClipLoss()(img, txt, scale)


def test_clip_loss_takes_numpy_and_one_element_logit_scales():
    np = pytest.importorskip("numpy")
    img, txt = _feats(9, 5, seed=3)
    want = _open_clip_formula(img.detach().double(), txt.detach().double(), 7.0)
    torch.testing.assert_close(
        ClipLoss()(img, txt, np.float32(7.0)).double(), want, rtol=1e-5, atol=1e-6
    )
    scale = torch.full((1,), 7.0, requires_grad=True)  # open_clip broadcasts a [1] scale too
    got = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got, scale)
    s64 = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    (w,) = torch.autograd.grad(
        _open_clip_formula(img.detach().double(), txt.detach().double(), s64), s64
    )
    assert g.shape == (1,)
    torch.testing.assert_close(g.double(), w.reshape(1), rtol=1e-4, atol=1e-6)


def test_clip_loss_forward_refuses_bad_arguments():
    img, txt = _feats(4, 3)
    cases = [
        (([[1.0]], txt, 10.0), {}, "image_features"),
        ((img, txt[None], 10.0), {}, "text_features"),
        ((img, txt[:3], 10.0), {}, "text_features"),
        ((img, txt.double(), 10.0), {}, "text_features"),
        ((img, txt, 10.0, "abc"), {}, "logit_bias"),
        ((img, txt, 10.0, NAN), {}, "logit_bias"),
        ((img, txt, 10.0, True), {}, "logit_bias"),
        ((img, txt, 10.0, torch.tensor(1)), {}, "logit_bias"),
        ((img, txt, 10.0, torch.zeros(2)), {}, "logit_bias"),
        ((img, txt, 10.0), {"output_dict": "yes"}, "output_dict"),
    ]
    for args, kwargs, name in cases:
        with pytest.raises(ValueError, match=f"^{name}: "):
            ClipLoss()(*args, **kwargs)
    ok = ClipLoss()(img, txt, 10.0, -2.5)  # a finite number bias cancels
    torch.testing.assert_close(ok, ClipLoss()(img, txt, 10.0))


def test_clip_loss_checks_rank_and_world_size_against_the_process_group(monkeypatch):
    import torch.distributed as dist

    img, txt = _feats(4, 3)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(ValueError, match="^world_size: 4 given, but .* 2 ranks"):
        ClipLoss(rank=0, world_size=4)(img, txt, 10.0)
    with pytest.raises(ValueError, match="^rank: 1 given, but this process is rank 0"):
        ClipLoss(rank=1, world_size=2)(img, txt, 10.0)
