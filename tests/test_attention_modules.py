"""vf.nn.PredictorAttention against transformers' LlamaAttention, and the flash_attn / xformers
backend records (vljepa_fast/ops/attention_peers.py).

The module is compared with LlamaAttention holding the same weights: bidirectional (the VL-JEPA
predictor) against LlamaAttention run eagerly in float64 under a padding-only mask, causal against
LlamaAttention under transformers' own causal mask. A result passes at 2x the error of eager fp32
LlamaAttention plus a floor. torch.compile(fullgraph=True) traces a forward and backward.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import vljepa_fast as vf
from tests._util import assert_close_2x
from vljepa_fast import _backends
from vljepa_fast.ops import attention_peers, rotary
from vljepa_fast.ops.attention import attention_inputs, varlen_inputs

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention  # noqa: E402

HIDDEN, HQ, HKV, D = 128, 8, 2, 16


def llama_config() -> transformers.LlamaConfig:
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HQ,
        num_key_value_heads=HKV,
        head_dim=D,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": 500000.0, **rotary.LLAMA3_ROPE_SCALING},
    )
    config._attn_implementation = "eager"
    return config


def padded(B: int, L: int, lengths: list[int]) -> torch.Tensor:
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]


def module_pair() -> tuple[LlamaAttention, vf.nn.PredictorAttention]:
    llama = LlamaAttention(llama_config(), layer_idx=0)
    for p in llama.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = vf.nn.PredictorAttention(HIDDEN, HQ, HKV, D, max_position_embeddings=131072)
    ours.load_state_dict(llama.state_dict(), strict=True)
    return llama, ours


def llama_forward(llama, x, mask_2d, position_ids, *, causal: bool, dtype: torch.dtype):
    """LlamaAttention in ``dtype`` under transformers' mask; tables exact in float64 runs."""
    config = llama.config
    x = x.to(dtype)
    if causal:
        mask = create_causal_mask(config, x, mask_2d, None, position_ids=position_ids)
    else:
        mask = create_bidirectional_mask(config, x, mask_2d)
    cos, sin = rotary.rotary_cos_sin(position_ids, D, dtype=dtype)
    return llama.to(dtype)(x, (cos, sin), mask)[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [None, [21, 9, 1]])
def test_predictor_attention_matches_llama(causal, lengths):
    B, L = 3, 21
    llama, ours = module_pair()
    ours.causal = causal
    mask = None if lengths is None else padded(B, L, lengths)
    position_ids = torch.arange(L)[None].expand(B, L)
    x = torch.randn(B, L, HIDDEN, dtype=torch.float64)

    xg = x.float().requires_grad_()
    got = ours(xg, key_padding_mask=mask, position_ids=position_ids)
    g_out = torch.randn_like(got)
    (got_dx,) = torch.autograd.grad(got, xg, g_out)

    def run(dtype):
        xd = x.to(dtype).requires_grad_()
        out = llama_forward(llama, xd, mask, position_ids, causal=causal, dtype=dtype)
        return out, torch.autograd.grad(out, xd, g_out.to(dtype))[0]

    exact, exact_dx = run(torch.float64)
    eager, eager_dx = run(torch.float32)
    assert_close_2x(got, eager, exact, torch.float32, "out")
    assert_close_2x(got_dx, eager_dx, exact_dx, torch.float32, "d hidden")


def test_predictor_attention_defaults_are_llama_3_2_1b():
    m = vf.nn.PredictorAttention(device="meta")
    assert (m.num_heads, m.num_kv_heads, m.head_dim, m.causal) == (32, 8, 64, False)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (2048, 2048),
        "k_proj.weight": (512, 2048),
        "v_proj.weight": (512, 2048),
        "o_proj.weight": (2048, 2048),
    }


def test_predictor_attention_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        vf.nn.PredictorAttention(64, 6, 4, 16)
    with pytest.raises(ValueError, match="head_dim"):
        vf.nn.PredictorAttention(64, 4, 2, 15)
    m = vf.nn.PredictorAttention(64, 4, 2, 16, max_position_embeddings=8)
    with pytest.raises(ValueError, match="hidden"):
        m(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.randn(1, 9, 64))
    with pytest.raises(ValueError, match="position_ids"):
        m(torch.randn(2, 5, 64), position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(2, 5, 64), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "with_mask, with_positions", [(False, False), (True, False), (False, True)]
)
def test_predictor_attention_compiles_fullgraph(with_mask, with_positions):
    """The forward traces as one graph (custom ops with fake kernels, no host syncs: the
    position_ids value check stays out of it); its backward runs through AOT autograd; both
    match eager."""
    torch._dynamo.reset()
    B, L = 2, 13
    m = vf.nn.PredictorAttention(64, 4, 2, 16)
    mask = padded(B, L, [13, 6]) if with_mask else None
    positions = torch.randint(0, 1000, (B, L)) if with_positions else None
    x = torch.randn(B, L, 64)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    results = []
    for module in (compiled, m):
        xg = x.clone().requires_grad_()
        out = module(xg, key_padding_mask=mask, position_ids=positions)
        out.square().sum().backward()
        results.append((out.detach(), xg.grad, m.q_proj.weight.grad.clone()))
        m.zero_grad()
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"hidden_size": True}, "hidden_size"),
        ({"hidden_size": 64.0}, "hidden_size"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_kv_heads": -2}, "num_kv_heads"),
        ({"head_dim": 16.0}, "head_dim"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"max_position_embeddings": True}, "max_position_embeddings"),
        ({"rope_theta": "500000"}, "rope_theta"),  # was parsed by float()
        ({"rope_theta": True}, "rope_theta"),
        ({"rope_theta": NAN}, "rope_theta"),
        ({"rope_theta": INF}, "rope_theta"),
        ({"rope_theta": 1.0}, "rope_theta"),
        ({"rope_theta": None}, "rope_theta"),
        ({"rope_scaling": "llama3"}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3"}}, "rope_scaling"),  # was a KeyError
        ({"rope_scaling": {**rotary.LLAMA3_ROPE_SCALING, "factor": "32"}}, "rope_scaling"),
        ({"rope_scaling": {**rotary.LLAMA3_ROPE_SCALING, "factor": NAN}}, "rope_scaling"),
        ({"rope_scaling": {**rotary.LLAMA3_ROPE_SCALING, "factor": 0.0}}, "rope_scaling"),
        (
            {"rope_scaling": {**rotary.LLAMA3_ROPE_SCALING, "high_freq_factor": 1.0}},
            "rope_scaling",
        ),  # high == low: a division by zero
        ({"causal": "yes"}, "causal"),
        ({"causal": 1}, "causal"),
        ({"causal": None}, "causal"),
        ({"backend": "nope"}, "backend"),
        ({"backend": None}, "backend"),
        ({"backend": {"attn": "sdpa"}}, "backend"),
        ({"backend": {"attention": "nope"}}, "backend"),
        ({"window_size": (1,)}, "window_size"),
        ({"window_size": 3}, "window_size"),
        ({"window_size": (True, 0)}, "window_size"),
        ({"window_size": (2, -2)}, "window_size"),
        ({"window_size": (2.0, 1)}, "window_size"),
        ({"window_size": None}, "window_size"),
        ({"dtype": torch.int64}, "dtype"),
        ({"dtype": "float32"}, "dtype"),
        ({"device": "bogus"}, "device"),
        ({"device": 1.5}, "device"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v,
)
def test_predictor_attention_constructor_refuses_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        vf.nn.PredictorAttention(
            **{"hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, **kwargs}
        )


def _same_weights(a, b):
    b.load_state_dict(a.state_dict(), strict=True)
    return a, b


def test_predictor_attention_takes_numpy_ints_and_legacy_rope_scaling_keys():
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 9, 64)
    positions = torch.arange(5000, 5009)  # beyond 8192 / 4: where llama3 scaling matters
    want_m = vf.nn.PredictorAttention(64, 4, 2, 16)
    numpy_m = vf.nn.PredictorAttention(
        np.int64(64), np.int32(4), np.int64(2), np.int64(16), causal=np.bool_(False)
    )
    assert type(numpy_m.hidden_size) is int and numpy_m.causal is False
    legacy = {k if k != "rope_type" else "type": v for k, v in rotary.LLAMA3_ROPE_SCALING.items()}
    legacy_m = vf.nn.PredictorAttention(64, 4, 2, 16, rope_scaling=legacy)  # was: plain RoPE
    want = want_m(x, position_ids=positions)
    for m in (numpy_m, legacy_m):
        _same_weights(want_m, m)
        torch.testing.assert_close(m(x, position_ids=positions), want, rtol=0, atol=0)
    plain = _same_weights(want_m, vf.nn.PredictorAttention(64, 4, 2, 16, rope_scaling=None))[1]
    assert not torch.allclose(plain(x, position_ids=positions), want)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m: m(torch.randn(2, 5, 64, dtype=torch.float64)), "hidden"),  # was a matmul error
        (lambda m: m(torch.randn(2, 5, 64, dtype=torch.bfloat16)), "hidden"),
        (lambda m: m(torch.randn(2, 5, 64, device="meta")), "hidden"),
        (lambda m: m(torch.randn(2, 0, 64)), "hidden"),
        (lambda m: m(torch.randn(0, 5, 64)), "hidden"),
        (lambda m: m([[[0.0] * 64]]), "hidden"),
        (lambda m: m(torch.randn(2, 5, 64), position_ids=torch.arange(5.0)), "position_ids"),
        (lambda m: m(torch.randn(2, 5, 64), position_ids=-torch.arange(5)), "position_ids"),
        (lambda m: m(torch.randn(2, 5, 64), position_ids=torch.arange(5) + 4), "position_ids"),
        (lambda m: m(torch.randn(2, 5, 64), position_ids=[0, 1, 2, 3, 4]), "position_ids"),
        (
            lambda m: m(torch.randn(2, 5, 64), position_ids=torch.ones(5, dtype=torch.bool)),
            "position_ids",
        ),
        (
            lambda m: m(torch.randn(2, 5, 64), position_ids=torch.arange(5, device="meta")),
            "position_ids",
        ),
        (
            lambda m: m(torch.randn(2, 5, 64), position_ids=torch.zeros(3, 5, dtype=torch.long)),
            "position_ids",
        ),
    ],
    ids=[
        "hidden-float64",
        "hidden-bfloat16",
        "hidden-meta",
        "hidden-L0",
        "hidden-B0",
        "hidden-list",
        "positions-float",
        "positions-negative",
        "positions-too-large",
        "positions-list",
        "positions-bool",
        "positions-meta",
        "positions-shape",
    ],
)
def test_predictor_attention_forward_refuses_bad_arguments(call, name):
    m = vf.nn.PredictorAttention(64, 4, 2, 16, max_position_embeddings=8)
    with pytest.raises(ValueError, match=f"^{name}: "):
        call(m)


def test_predictor_attention_under_autocast_takes_the_autocast_dtype():
    """The dtype check stands aside under torch.autocast, where the projections cast."""
    m = vf.nn.PredictorAttention(64, 4, 2, 16)
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x.bfloat16())
        want = m(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_predictor_attention_position_ids_any_integer_dtype_and_the_last_position():
    m = vf.nn.PredictorAttention(64, 4, 2, 16, max_position_embeddings=8)
    x = torch.randn(2, 5, 64)
    want = m(x, position_ids=torch.arange(3, 8))  # 7 = max_position_embeddings - 1
    for dtype in (torch.int32, torch.int16, torch.uint8):
        got = m(x, position_ids=torch.arange(3, 8, dtype=dtype)[None].expand(2, 5))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "backend, want",
    [
        ("reference", [("rotary", "reference"), ("attention", "reference")]),
        ({"attention": "sdpa"}, [("rotary", "reference"), ("attention", "sdpa")]),
        ({"rotary": "reference"}, [("rotary", "reference"), ("attention", "sdpa")]),
    ],
    ids=["reference", "attention-mapping", "rotary-mapping"],
)
def test_predictor_attention_backend_reaches_rotary(backend, want):
    """The spec goes unchanged to both ops (the dispatch trace shows which backend ran)."""
    x = torch.randn(1, 3, 64)
    m = vf.nn.PredictorAttention(64, 4, 2, 16, backend=backend)
    with _backends.trace() as events:
        m(x)
    assert [(e.op, e.backend) for e in events] == want


@pytest.mark.parametrize("name, op", [("cpu", "attention"), ("sdpa", "rotary")])
def test_predictor_attention_a_name_an_op_lacks_is_refused_at_construction(name, op):
    """The module runs attention and rotary: a single name one of them lacks would fail at the
    first forward, so construction refuses it, naming the op and the way out (a mapping)."""
    refused = f"^backend: {op} has no backend '{name}'.*all of them have"
    with pytest.raises(ValueError, match=refused):
        vf.nn.PredictorAttention(64, 4, 2, 16, backend=name)
    with pytest.raises(ValueError, match=r"^backend\['attention'\]: expected 'auto' or one of"):
        vf.nn.PredictorAttention(64, 4, 2, 16, backend={"rotary": "reference", "attention": "cpu"})
    m = vf.nn.PredictorAttention(64, 4, 2, 16, backend={"attention": "sdpa"})
    with _backends.trace() as events:
        m(torch.randn(1, 3, 64))
    assert [(e.op, e.backend) for e in events] == [("rotary", "reference"), ("attention", "sdpa")]


# ------------------------------------------------------------------------ peer backends


@pytest.mark.parametrize("name, module", [("flash_attn", "flash_attn"), ("xformers", "xformers")])
def test_peer_records_are_registered_with_reasons(name, module, monkeypatch):
    for op in ("attention", "attention_varlen"):
        rec = next(b for b in _backends.records(op) if b.name == name)
        assert rec.devices == ("cuda",)
    monkeypatch.setattr(attention_peers, "_import_reasons", lambda m: [f"{m} is not installed"])
    rows = {(r.op, r.name): r for r in attention_peers._records()}
    # flash_attn runs flash-attn 2 or FlashAttention-3: unavailable when neither imports
    want = [f"{module} is not installed"]
    if name == "flash_attn":
        want.append("flash_attn_interface is not installed")
    for op in ("attention", "attention_varlen"):
        assert rows[(op, name)].available() == want
    fa3_only = lambda m: [f"{m} is not installed"] if m != "flash_attn_interface" else []  # noqa: E731
    monkeypatch.setattr(attention_peers, "_import_reasons", fa3_only)
    for op in ("attention", "attention_varlen"):
        assert (rows[(op, name)].available() == []) == (name == "flash_attn")


def test_peer_reasons_when_not_importable():
    for module in ("flash_attn", "xformers"):
        try:
            __import__(module)
        except ImportError:
            assert attention_peers._import_reasons(module) == [f"{module} is not installed"]
            q = torch.randn(1, 4, 2, 16)
            with pytest.raises(vf.BackendUnavailableError, match="does not run on cpu"):
                vf.attention(q, q, q, backend=module)


def _reasons(supports, *args, **kwargs) -> list[str]:
    """What a peer's supports says of these vf.attention (3 tensors) or vf.attention_varlen
    (7 arguments) inputs: its reasons, [] when it accepts."""
    build = attention_inputs if len(args) == 3 else varlen_inputs
    answer = supports(build(*args, **kwargs))
    return list(answer.reasons) if isinstance(answer, _backends.Refusal) else []


def test_flash_attn_supports_refuses_what_it_cannot_do():
    sup = attention_peers.flash_attn_supports
    q = torch.randn(2, 5, 4, 64, dtype=torch.float16)
    k = torch.randn(2, 7, 2, 64, dtype=torch.float16)
    assert _reasons(sup, q, k, k) == []
    assert any("float32" in r for r in _reasons(sup, q.float(), k.float(), k.float()))
    big = torch.randn(1, 3, 1, 320, dtype=torch.bfloat16)
    assert any("head dim 320" in r for r in _reasons(sup, big, big, big))
    mask = padded(2, 7, [7, 3])
    assert _reasons(sup, q, k, k, key_padding_mask=mask) == []
    assert any("causal" in r for r in _reasons(sup, q, k, k, key_padding_mask=mask, causal=True))
    empty = padded(2, 7, [7, 0])
    assert any("no key" in r for r in _reasons(sup, q, k, k, key_padding_mask=empty))


def test_xformers_supports_refuses_what_it_cannot_do():
    sup = attention_peers.xformers_supports
    q = torch.randn(2, 5, 4, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 7, 2, 64, dtype=torch.bfloat16)
    assert _reasons(sup, q, k, k) == [] and _reasons(sup, q.float(), k.float(), k.float()) == []
    assert any("float64" in r for r in _reasons(sup, q.double(), k.double(), k.double()))
    mask = padded(2, 7, [7, 3])
    assert any("causal" in r for r in _reasons(sup, q, k, k, key_padding_mask=mask, causal=True))
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 4], dtype=torch.int32)
    vq, vk = q.reshape(-1, 4, 64)[:5], k.reshape(-1, 2, 64)[:4]
    assert any(
        "no key" in r
        for r in _reasons(attention_peers.xformers_varlen_supports, vq, vk, vk, cu_q, cu_k, 3, 4)
    )
    cu_k = torch.tensor([0, 2, 4], dtype=torch.int32)
    assert _reasons(attention_peers.xformers_varlen_supports, vq, vk, vk, cu_q, cu_k, 3, 2) == []
    cu_q = torch.tensor([0, 5, 5], dtype=torch.int32)
    assert any(
        "no query" in r
        for r in _reasons(attention_peers.xformers_varlen_supports, vq, vk, vk, cu_q, cu_k, 5, 2)
    )
    assert _reasons(attention_peers.flash_attn_varlen_supports, vq.half(), vk.half(), vk.half(),
                    cu_q, cu_k, 5, 2) == []


def _no_host_reads(monkeypatch):
    """Make every way of reading a tensor on the host raise (a device sync on GPU)."""

    def read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("tolist", "item", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, read)


def test_peer_plans_read_the_host_once_and_runs_consume_them(monkeypatch):
    """A key_padding_mask is read on the host once, by supports (its plan: the key counts);
    the run unpads with the plan and reads nothing more; varlen inputs carry their lengths from
    validation, so the varlen supports read nothing (regression: the counts were read again
    by the run, cu_seqlens again by supports and by the xformers run)."""
    q = torch.randn(2, 5, 4, 64, dtype=torch.float16)
    k = torch.randn(2, 7, 2, 64, dtype=torch.float16)
    mask = padded(2, 7, [7, 3])
    x = attention_inputs(q, k, k, key_padding_mask=mask)
    plan = attention_peers.flash_attn_supports(x)
    assert isinstance(plan, attention_peers.KeyCounts) and plan.host == (7, 3)
    assert torch.equal(plan.lengths, torch.tensor([7, 3], dtype=torch.int32))
    assert attention_peers.flash_attn_supports(attention_inputs(q, k, k)) is None
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 4], dtype=torch.int32)
    y = varlen_inputs(q.reshape(-1, 4, 64)[:5], k.reshape(-1, 2, 64)[:4], k.reshape(-1, 2, 64)[:4],
                      cu_q, cu_k, 3, 2)
    seen = {}

    def varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        seen.update(k=k, cu_k=cu_k, max_k=max_k)
        return torch.zeros_like(q)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_varlen_func=varlen_func))
    with monkeypatch.context() as m:
        _no_host_reads(m)
        for sup in (attention_peers.flash_attn_varlen_supports,
                    attention_peers.xformers_varlen_supports):
            assert sup(y) is None
        out = attention_peers._flash(x, plan)
    assert out.shape == q.shape
    assert seen["max_k"] == 7 and torch.equal(seen["cu_k"], torch.tensor([0, 7, 10]).int())
    torch.testing.assert_close(seen["k"], torch.cat([k[0], k[1, :3]]), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash_attn", "xformers"])
@pytest.mark.parametrize("causal, lengths", [(False, None), (True, None), (False, [37, 11])])
def test_peer_matches_reference_on_gpu(name, causal, lengths):
    pytest.importorskip(name)
    B, T, S = 2, 37, 37
    q = torch.randn(B, T, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, S, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, S, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = None if lengths is None else padded(B, S, lengths).cuda()
    kw = dict(key_padding_mask=mask, causal=causal)
    out = vf.attention(q, k, v, backend=name, **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = vf.attention(*xs, backend="reference", **kw)
    exact_grads = torch.autograd.grad(exact, xs, g.double())
    xe = [t.detach().requires_grad_() for t in (q, k, v)]
    eager = vf.attention(*xe, backend="reference", **kw)
    eager_grads = torch.autograd.grad(eager, xe, g)
    assert_close_2x(out, eager, exact, torch.bfloat16, "out")
    for n, a, b, c in zip("qkv", grads, eager_grads, exact_grads):
        assert_close_2x(a, b, c, torch.bfloat16, f"d{n}")


def test_predictor_attention_float64_uses_float64_tables():
    """A float64 module is exact to float64 rounding (regression: its RoPE tables were float32,
    costing 1e-8)."""
    torch.manual_seed(5)
    m = vf.nn.PredictorAttention(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16).double()
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    pos = torch.arange(9000, 9007)
    got = m(x, position_ids=pos)
    cos, sin = vf.rotary_cos_sin(pos, 16, theta=m.rope_theta, rope_scaling=m.rope_scaling,
                                 dtype=torch.float64)
    q = m.q_proj(x).view(2, 7, 4, 16)
    k = m.k_proj(x).view(2, 7, 2, 16)
    v = m.v_proj(x).view(2, 7, 2, 16)
    q, k = vf.apply_rotary(q, k, cos, sin, backend="reference")
    want = m.o_proj(vf.attention(q, k, v, backend="reference").reshape(2, 7, 64))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Sliding windows: PredictorAttention(window_size=...) and transformers' sliding_window layers
# ---------------------------------------------------------------------------------------------


def band_mask(B, T, S, lengths, left, right, dtype):
    """[B, 1, T, S] additive mask built pair by pair: key j is visible to query i iff it is real
    and i + S - T - left <= j <= i + S - T + right (-1 unbounded); -1e30 elsewhere (finite in
    the fp32 softmax transformers' eager attention runs even on float64 inputs)."""
    m = torch.full((B, 1, T, S), -1e30, dtype=dtype)
    for b in range(B):
        for i in range(T):
            for j in range(S):
                real = lengths is None or j < lengths[b]
                lo_ok = left == -1 or j >= i + S - T - left
                hi_ok = right == -1 or j <= i + S - T + right
                if real and lo_ok and hi_ok:
                    m[b, 0, i, j] = 0
    return m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(3, 2), (0, 0), (5, -1), (-1, 4), (40, 40)])
def test_predictor_attention_window_matches_llama_under_a_band_mask(causal, window):
    """window_size is passed through: the module equals LlamaAttention (float64 eager) under a
    band mask written pair by pair, with key padding, values and the gradient of the input."""
    B, L, lengths = 3, 21, [21, 9, 1]
    llama, ours = module_pair()
    ours = vf.nn.PredictorAttention(
        HIDDEN, HQ, HKV, D, max_position_embeddings=131072, causal=causal, window_size=window
    )
    ours.load_state_dict(llama.state_dict(), strict=True)
    assert ours.window_size == window and f"window_size={window}" in repr(ours)
    mask = padded(B, L, lengths)
    position_ids = torch.arange(L)[None].expand(B, L)
    x = torch.randn(B, L, HIDDEN, dtype=torch.float64)
    xg = x.float().requires_grad_()
    got = ours(xg, key_padding_mask=mask, position_ids=position_ids)
    left, right = window[0], (0 if causal else window[1])
    # rows whose window holds no real key: zeros in vf.attention, a uniform average in eager
    # (an additive mask); compared where a key is seen, and no gradient from them
    seen = (band_mask(B, L, L, lengths, left, right, torch.float64) == 0).any(-1)[:, 0]
    g_out = torch.randn_like(got) * seen[..., None]
    (got_dx,) = torch.autograd.grad(got, xg, g_out)

    def run(dtype):
        xd = x.to(dtype).requires_grad_()
        cos, sin = rotary.rotary_cos_sin(position_ids, D, dtype=dtype)
        out = llama.to(dtype)(xd, (cos, sin), band_mask(B, L, L, lengths, left, right, dtype))[0]
        return out, torch.autograd.grad(out, xd, g_out.to(dtype))[0]

    exact, exact_dx = run(torch.float64)
    eager, eager_dx = run(torch.float32)
    assert_close_2x(got[seen], eager[seen], exact[seen], torch.float32, "out")
    assert torch.equal(got[~seen], torch.zeros_like(got[~seen]))  # o_proj has no bias
    assert_close_2x(got_dx, eager_dx, exact_dx, torch.float32, "d hidden")


def _spy_windows(monkeypatch) -> list:
    seen: list = []
    real = vf.functional.attention

    def spy(q, k, v, **kw):
        seen.append(kw.get("window_size"))
        return real(q, k, v, **kw)

    monkeypatch.setattr(vf.functional, "attention", spy)
    return seen


def _tiny(kind: str):
    torch.manual_seed(5)
    common = dict(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    )
    if kind == "mistral":
        config = transformers.MistralConfig(**common, num_hidden_layers=2, sliding_window=5)
        return transformers.MistralModel(config).eval()
    config = transformers.Gemma3TextConfig(
        **common, num_hidden_layers=3, sliding_window=4, use_bidirectional_attention=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return transformers.Gemma3TextModel(config).eval()


@pytest.mark.parametrize("kind", ["mistral", "gemma3-bidirectional"])
@pytest.mark.parametrize("padding", [False, True])
def test_transformers_sliding_window_layers_run_on_vf_attention(kind, padding, monkeypatch):
    """Sliding-window layers of transformers models (Mistral: causal, q - w < kv <= q; Gemma-3
    bidirectional: |q - kv| < w) run on vf.attention's window_size, no SDPA fallback (no
    warning), and equal the model under SDPA in float64 within 2x eager fp32's error."""
    import copy
    import warnings

    from vljepa_fast.integrations import transformers as vft

    model = _tiny(kind)
    ids = torch.randint(1, 97, (3, 19), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 19, dtype=torch.long)
    if padding:
        mask[1, 12:], mask[2, 3:] = 0, 0
    inputs = {"input_ids": ids, "attention_mask": mask}

    def run(m, impl, dtype):
        m = copy.deepcopy(m)
        m.set_attn_implementation(impl)
        with torch.no_grad():
            return m.to(dtype)(**inputs).last_hidden_state

    # float64 SDPA as the truth: transformers' float64 eager gives NaN on padded rows
    exact, eager = run(model, "sdpa", torch.float64), run(model, "eager", torch.float32)
    seen = _spy_windows(monkeypatch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="vljepa_fast attention")
        with vft.use_vljepa_fast(model), torch.no_grad():
            got = model(**inputs).last_hidden_state
    w = model.config.sliding_window
    want = [(w - 1, 0)] * 2 if kind == "mistral" else [(w - 1, w - 1), (-1, -1), (w - 1, w - 1)]
    assert seen == want
    real = mask.bool()
    assert_close_2x(got[real], eager[real], exact[real], torch.float32, "last_hidden_state")


def test_transformers_sliding_window_with_another_mask_falls_back(monkeypatch):
    """A sliding_window layer whose mask is not key padding & one of its bands (here: a random
    mask) runs on SDPA with a warning, and equals it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vljepa_fast.integrations import transformers as vft

    layer = _tiny("mistral").layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 9, 16, generator=g) for h in (4, 2, 2))
    m = torch.rand(2, 1, 9, 9, generator=g) < 0.7
    m[..., 0] = True
    seen = _spy_windows(monkeypatch)
    vft._warned.discard("sliding_window with a mask that is not key padding & a sliding window")
    with pytest.warns(RuntimeWarning, match="sliding_window with a mask"):
        got, _ = vft.attention_forward(layer, q, k, v, m, scaling=0.25, sliding_window=5)
    want, _ = sdpa_attention_forward(layer, q, k, v, m, scaling=0.25, sliding_window=5)
    torch.testing.assert_close(got, want)
    assert seen == []
    # the exact band (with padding) is served by vf.attention, equal to SDPA on that mask
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    keys = torch.arange(9) < torch.tensor([9, 6])[:, None]
    band = ((j > i - 5) & (j <= i))[None, None] & keys[:, None, None]
    got, _ = vft.attention_forward(layer, q, k, v, band, scaling=0.25, sliding_window=5)
    want, _ = sdpa_attention_forward(layer, q, k, v, band, scaling=0.25)
    torch.testing.assert_close(got, want)
    assert seen == [(4, 0)]
