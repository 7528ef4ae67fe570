"""One backend vocabulary from the ops to the models, proved by the dispatch trace.

For the tiny VL-JEPA on CPU, a training forward (the InfoNCE loss) and a retrieval run inside
``vljepa_fast._backends.trace()``; the test asserts which backend every op call used, in call
order, under ``backend="auto"``, ``"reference"``, per-op mappings and the
``VLJEPA_FAST_BACKEND`` / ``VLJEPA_FAST_BACKEND_<OP>`` overrides. Call order of one pass:
X-encoder 2 blocks, predictor 2 layers (each rotary then attention), then the loss; retrieval
embeds the texts (Y-encoder 2 blocks) and the videos, then searches (topk_similarity).
"""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

import vljepa_fast as vf
import vljepa_fast.models as M
from vljepa_fast import _backends
from vljepa_fast._backends import BackendUnavailableError

pytestmark = pytest.mark.cpu

CAPTIONS = ["a red square moves left", "a blue circle"]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """The overrides are set by the tests that use them, never inherited."""
    for name in list(os.environ):
        if name.startswith("VLJEPA_FAST_BACKEND"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _native_cpu(op: str) -> str:
    """What ``auto`` picks for ``op`` on CPU tensors: the native library when it is built."""
    rec = next(b for b in _backends.records(op) if b.name == "cpu")
    return "cpu" if not rec.available() else "reference"


def _run(model: M.VLJEPA) -> list[tuple[str, str]]:
    """(op, backend) of every dispatch of one loss forward and one retrieval."""
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 3, 4, 32, 32, generator=g)
    with _backends.trace() as events:
        loss = model(video, "what happens?", CAPTIONS)
        model.retrieve(CAPTIONS, video, "describe", k=2)
    assert torch.isfinite(loss)
    assert {e.device for e in events} == {"cpu"}
    return [(e.op, e.backend) for e in events]


def _expected(attention: str, rotary: str, infonce: str, topk: str) -> list[tuple[str, str]]:
    layers = [("rotary", rotary), ("attention", attention)] * 6  # 2 X-enc, 2 predictor, 2 Y-enc
    return layers + [("infonce_loss", infonce)] + layers + [("topk_similarity", topk)]


def _model(backend) -> M.VLJEPA:
    torch.manual_seed(0)
    return M.VLJEPA(M.VLJEPAConfig.tiny(), backend=backend)


def test_auto_on_cpu():
    """sdpa attention, the native loss and search when built, the eager rotary (Triton serves
    CPU tensors only when named)."""
    native = _native_cpu("infonce_loss"), _native_cpu("topk_similarity")
    assert _run(_model("auto")) == _expected("sdpa", "reference", *native)


def test_reference_reaches_every_op_rotary_included():
    assert _run(_model("reference")) == _expected(
        "reference", "reference", "reference", "reference"
    )


@pytest.mark.parametrize(
    "spec, ops",
    [
        (
            {"attention": "reference", "infonce_loss": "reference"},
            {"attention": "reference", "infonce_loss": "reference"},
        ),
        ({"topk_similarity": "reference"}, {"topk_similarity": "reference"}),
        ({"attention": "sdpa", "rotary": "reference"}, {}),
    ],
    ids=["attention+infonce", "topk", "attention+rotary"],
)
def test_a_mapping_picks_per_op_and_leaves_the_rest_at_auto(spec, ops):
    auto = {
        "attention": "sdpa",
        "rotary": "reference",
        "infonce_loss": _native_cpu("infonce_loss"),
        "topk_similarity": _native_cpu("topk_similarity"),
    }
    want = {**auto, **ops}
    model = _model(spec)
    assert model.backend == spec and model.predictor.layers[0].self_attn.backend == spec
    assert _run(model) == _expected(
        want["attention"], want["rotary"], want["infonce_loss"], want["topk_similarity"]
    )


def test_the_environment_reaches_every_op(monkeypatch):
    monkeypatch.setenv("VLJEPA_FAST_BACKEND", "reference")
    assert _run(_model("auto")) == _expected("reference", "reference", "reference", "reference")


def test_the_per_op_environment_reaches_its_op(monkeypatch):
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ROTARY", "reference")
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "reference")
    native = _native_cpu("infonce_loss"), _native_cpu("topk_similarity")
    assert _run(_model("auto")) == _expected("reference", "reference", *native)
    # on CPU "auto" rotary is the reference anyway: a name rotary lacks proves the variable
    # reaches it through the model
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ROTARY", "cpu")
    with pytest.raises(BackendUnavailableError, match="^rotary: no backend 'cpu'"):
        _run(_model("auto"))


def test_an_explicit_name_beats_the_environment(monkeypatch):
    monkeypatch.setenv("VLJEPA_FAST_BACKEND", "cpu")  # attention and rotary have no cpu
    model = _model(
        {
            "attention": "reference",
            "rotary": "reference",
            "infonce_loss": "reference",
            "topk_similarity": "reference",
        }
    )
    assert _run(model) == _expected("reference", "reference", "reference", "reference")


def test_a_name_an_op_lacks_is_refused_at_construction():
    """A single name every op of the model must have (else its first forward would fail), a
    mapping entry a name its op has: both refused when the model is built, never substituted."""
    with pytest.raises(ValueError, match="^backend: rotary has no backend 'sdpa'"):
        _model("sdpa")
    with pytest.raises(ValueError, match=r"^backend\['infonce_loss'\]: expected 'auto' or one"):
        _model({"infonce_loss": "sdpa"})
    for name in ("reference", "triton"):  # every op of the model has these two
        assert _model(name).backend == name


@pytest.mark.parametrize(
    "backend, message",
    [
        ("nope", r"^backend: expected 'auto' or one of"),
        (None, r"^backend: expected 'auto', a backend name or a mapping"),
        ({"attn": "sdpa"}, r"^backend: mapping key 'attn' is not an op"),
        ({"attention": "nope"}, r"^backend\['attention'\]: expected 'auto' or one of"),
    ],
)
def test_every_module_refuses_a_bad_spec_at_construction(backend, message):
    cfg = M.VLJEPAConfig.tiny()
    builds = [
        lambda: M.VLJEPA(cfg, backend=backend),
        lambda: M.XEncoder(cfg.x_encoder, backend),
        lambda: M.Predictor(cfg.predictor, 64, 32, backend),
        lambda: M.TextEncoder(cfg.y_encoder, 32, backend),
        lambda: M.YDecoder(cfg.y_decoder, 32, backend),
    ]
    for build in builds:
        with pytest.raises(ValueError, match=message):
            build()


def test_a_mapping_model_deep_copies_and_pickles():
    """The stored spec is a plain dict (check_spec's read-only mappingproxy cannot be copied:
    an EMA target encoder or torch.save of the model would fail)."""
    spec = {"attention": "reference", "rotary": "reference"}
    model = _model(spec)
    spec["attention"] = "sdpa"  # the model keeps its own copy
    assert model.backend == {"attention": "reference", "rotary": "reference"}
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.backend == model.backend
        assert other.x_encoder.blocks[0].attn.backend == model.backend


def test_the_y_decoder_honours_its_backend():
    cfg = M.VLJEPAConfig.tiny()
    torch.manual_seed(0)
    dec = M.YDecoder(cfg.y_decoder, cfg.embed_dim, backend={"attention": "reference"})
    ids = torch.tensor([[257, 65, 66, 258]])
    with _backends.trace() as events:
        dec.loss(torch.randn(1, cfg.embed_dim), ids)
    assert [(e.op, e.backend) for e in events] == [
        ("rotary", "reference"),
        ("attention", "reference"),
    ] * cfg.y_decoder.layers


def test_the_backend_is_fixed_at_construction():
    """Assigning another spec later would reach some op calls and not others (the submodules
    hold their own): refused, for the model and for the modules."""
    model = _model({"attention": "reference"})
    with pytest.raises(AttributeError, match="VLJEPA.backend is fixed at construction"):
        model.backend = "reference"
    for module in (vf.nn.InfoNCELoss(), vf.nn.PredictorAttention(64, 4, 2, 16), model.predictor):
        with pytest.raises(AttributeError, match="backend is fixed at construction"):
            module.backend = "reference"
    assert model.backend == {"attention": "reference"}


def test_a_misspelled_override_variable_is_reported(monkeypatch):
    """VLJEPA_FAST_BACKEND_INFONCE (the stem, not the op name infonce_loss) would be ignored
    silently: a warning at import names it and the real variables."""
    import subprocess
    import sys

    env = dict(os.environ, VLJEPA_FAST_BACKEND_INFONCE="reference")
    proc = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", "import vljepa_fast"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "VLJEPA_FAST_BACKEND_INFONCE names no op" in proc.stderr
    assert "VLJEPA_FAST_BACKEND_INFONCE_LOSS" in proc.stderr


def test_fullgraph_compile_before_any_eager_call(tmp_path):
    """In a fresh process the first call of every op may be a torch.compile(fullgraph=True)
    trace: the backends' availability probes (locks, the native library load) run outside the
    graph (regression: 'Unsupported context manager' until an op had run eagerly once)."""
    import subprocess
    import sys

    script = tmp_path / "first_call.py"
    script.write_text(
        "import torch, vljepa_fast as vf\n"
        "def f(q, k, v, m, p, t, temp, cos, sin):\n"
        "    o = vf.attention(q, k, v, key_padding_mask=m)\n"
        "    l = vf.infonce_loss(p, t, temperature=temp)\n"
        "    s, _ = vf.topk_similarity(p, t, 3)\n"
        "    r, _ = vf.apply_rotary(q, k, cos, sin, layout='llama')\n"
        "    return o.sum() + l + s.sum() + r.sum()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q = torch.randn(2, 5, 4, 16, generator=g, requires_grad=True)\n"
        "k, v = torch.randn(2, 5, 2, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g)\n"
        "m = torch.ones(2, 5, dtype=torch.bool); m[1, 3:] = False\n"
        "p, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)\n"
        "cos, sin = vf.rotary_cos_sin(torch.arange(5), 16)\n"
        "args = (q, k, v, m, p, t, torch.tensor(0.07), cos, sin)\n"
        "got = torch.compile(f, fullgraph=True)(*args)\n"
        "torch.testing.assert_close(got, f(*args))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_compiled_calls_do_not_recompile_and_trace_once(monkeypatch):
    """The dispatch bookkeeping (availability probes, trace events, the fallback warning) is
    kept out of compiled graphs: identical calls never recompile (regression: the second call
    recompiled, and every call inside trace() did, failing fullgraph after the cache limit),
    and a dispatch is recorded when its graph is traced."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    q, b = torch.randn(4, 8), torch.randn(20, 8)

    def search(q, b):
        return vf.topk_similarity(q, b, 3)[0]

    torch._dynamo.reset()
    f = torch.compile(search, fullgraph=True, backend="eager")
    with _backends.trace() as events:
        for _ in range(8):
            f(q, b)
    assert [(e.op, e.device) for e in events] == [("topk_similarity", "cpu")]
    for _ in range(3):
        torch.testing.assert_close(f(q, b), search(q, b))


def test_a_mapping_backend_cannot_change_in_place():
    """check_spec's mapping is read-only: the model and the submodules it handed it to cannot
    disagree later; it still deep-copies and pickles."""
    model = _model({"attention": "sdpa"})
    with pytest.raises(TypeError, match="fixed once checked"):
        model.backend["attention"] = "reference"
    with pytest.raises(TypeError):
        model.predictor.backend.update(rotary="reference")
    assert copy.deepcopy(model).backend == pickle.loads(pickle.dumps(model.backend))
    assert model.predictor.backend == {"attention": "sdpa"}


def test_a_module_pickled_before_the_attribute_was_fixed_still_works():
    """Whole-module pickles of earlier versions stored ``backend`` under its own name."""
    loss = vf.nn.InfoNCELoss(backend="reference")
    state = dict(loss.__dict__)
    state["backend"] = state.pop("_backend")
    old = vf.nn.InfoNCELoss.__new__(vf.nn.InfoNCELoss)
    old.__dict__.update(state)
    assert old.backend == "reference"
    p, t = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(old(p, t), loss(p, t))
