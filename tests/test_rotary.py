"""Rotary embedding (vljepa_fast/ops/rotary.py, kernels/rotary.py, reference.apply_rotary).

cpu: the tables against independent float64 formulas (Llama 3 scaling written branch by branch
as its definition, V-JEPA 2's per-axis procedure), the eager reference against a dense per-token
rotation matrix, argument errors, the op's place in the registry (vf.backends(), every
BackendSpec and environment override, the triton record's refusals). interpret: the Triton
kernel (forward and the backward through autograd) on CPU tensors through the interpreter
against float64, with NaN-poisoned outputs; a low-precision result passes at 2x the error of
eager math in that dtype plus a floor.
compile: the kernel compiled ahead of time for sm_80 and sm_90 without spills.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor
from vljepa_fast._kernels import rotary as kernel

import vljepa_fast as vf
from tests._aot import aot_compile, pointer_type
from tests._util import assert_close_2x
from vljepa_fast import BackendUnavailableError, _backends, reference
from vljepa_fast.ops import _common
from vljepa_fast.ops.rotary import (
    LLAMA3_ROPE_SCALING,
    apply_rotary,
    rotary_cos_sin,
    rotary_inputs,
)


def pairs(D: int, layout: str) -> list[tuple[int, int]]:
    """(first, second) channel of every rotated pair."""
    if layout == "llama":
        return [(i, i + D // 2) for i in range(D // 2)]
    return [(2 * i, 2 * i + 1) for i in range(D // 2)]


def dense_rotation(cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    """[.., T, D, D] matrices M, out = M x: out_a = c_a x_a - s_a x_b, out_b = c_b x_b + s_b x_a."""
    D = cos.shape[-1]
    M = torch.zeros(*cos.shape, D, dtype=torch.float64)
    c, s = cos.double(), sin.double()
    for a, b in pairs(D, layout):
        M[..., a, a], M[..., a, b] = c[..., a], -s[..., a]
        M[..., b, b], M[..., b, a] = c[..., b], s[..., b]
    return M


def rotate_exact(x: Tensor, cos: Tensor, sin: Tensor, layout: str, dtype=torch.float64) -> Tensor:
    """x [B, T, H, D] rotated by tables [B or 1, T, D] with the dense matrices, in ``dtype``."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    M = dense_rotation(cos, sin, layout).to(dtype)
    return torch.einsum("btde,bthe->bthd", M, x.to(dtype))


def tables(B: int, T: int, D: int, layout: str, per_batch: bool) -> tuple[Tensor, Tensor]:
    if layout == "llama":
        pos = torch.randint(0, 9000, (B, T) if per_batch else (T,))
        return rotary_cos_sin(pos, D)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(4),
                                      indexing="ij"), -1).reshape(-1, 3)
    pos = grid[torch.randint(0, 64, (B, T) if per_batch else (T,))]
    return rotary_cos_sin(pos, D, layout="vjepa2")


# ------------------------------------------------------------------------------------- cpu


def test_llama3_tables_match_the_definition():
    D, theta = 64, 500000.0
    pos = torch.tensor([0, 1, 7, 100, 5000, 131071])
    cos, sin = rotary_cos_sin(pos, D, dtype=torch.float64)
    sc = LLAMA3_ROPE_SCALING
    lo_wl = sc["original_max_position_embeddings"] / sc["low_freq_factor"]
    hi_wl = sc["original_max_position_embeddings"] / sc["high_freq_factor"]
    for i in range(D // 2):
        f = theta ** (-2 * i / D)
        wl = 2 * math.pi / f
        if wl < hi_wl:
            g = f
        elif wl > lo_wl:
            g = f / sc["factor"]
        else:
            t = (sc["original_max_position_embeddings"] / wl - sc["low_freq_factor"]) / (
                sc["high_freq_factor"] - sc["low_freq_factor"])
            g = (1 - t) * f / sc["factor"] + t * f
        for j, p in enumerate(pos.tolist()):
            for c in (i, i + D // 2):
                assert math.isclose(cos[j, c].item(), math.cos(p * g), abs_tol=1e-12)
                assert math.isclose(sin[j, c].item(), math.sin(p * g), abs_tol=1e-12)
    plain_cos, _ = rotary_cos_sin(pos, D, rope_scaling=None, dtype=torch.float64)
    assert not torch.allclose(plain_cos, cos), "the llama3 scaling changed nothing"


def test_llama_tables_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=131072,
        rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE_SCALING},
    )
    pos = torch.randint(0, 20000, (2, 9))
    want_cos, want_sin = LlamaRotaryEmbedding(config)(torch.randn(2, 9, 256), pos)
    cos, sin = rotary_cos_sin(pos, 64)
    # transformers computes the angles in fp32: |error| <= position * 2^-24 or so
    torch.testing.assert_close(cos, want_cos, atol=3e-3, rtol=0)
    torch.testing.assert_close(sin, want_sin, atol=3e-3, rtol=0)
    small = torch.arange(40)[None]
    c_small, s_small = LlamaRotaryEmbedding(config)(torch.randn(1, 40, 256), small)
    # positions < 40: angles < 40 rad, fp32 angle error < 40 * 2^-23
    torch.testing.assert_close(rotary_cos_sin(small, 64)[0], c_small, atol=5e-6, rtol=0)
    torch.testing.assert_close(rotary_cos_sin(small, 64)[1], s_small, atol=5e-6, rtol=0)


def vjepa2_rotate(x: Tensor, pos: Tensor) -> Tensor:
    """V-JEPA 2's procedure in float64: x [N, H, 64], pos [N, 3] -> rotated x.

    Per axis (t, h, w) a group of 20 channels: frequencies 10000^(-i/10), i < 10, their sin/cos
    tiled twice over the group, adjacent channels rotated as (-x_odd, x_even); 4 channels left.
    """
    x = x.double()
    out, s = [], 0
    omega = 1.0 / 10000 ** (torch.arange(10, dtype=torch.float64) / 10)
    for a in range(3):
        xs = x[..., s : s + 20]
        freq = pos[:, a, None].double() * omega  # [N, 10]
        emb_sin, emb_cos = freq.sin().repeat(1, 2)[:, None], freq.cos().repeat(1, 2)[:, None]
        y = torch.stack((-xs[..., 1::2], xs[..., 0::2]), dim=-1).flatten(-2)
        out.append(xs * emb_cos + y * emb_sin)
        s += 20
    out.append(x[..., s:])
    return torch.cat(out, dim=-1)


def test_vjepa2_layout_matches_the_published_procedure():
    N, H = 50, 3
    pos = torch.randint(0, 16, (N, 3))
    q, k = torch.randn(1, N, H, 64, dtype=torch.float64), torch.randn(1, N, 1, 64,
                                                                      dtype=torch.float64)
    cos, sin = rotary_cos_sin(pos, 64, layout="vjepa2", dtype=torch.float64)
    assert (cos[:, 60:] == 1).all() and (sin[:, 60:] == 0).all()
    got_q, got_k = apply_rotary(q, k, cos, sin, layout="vjepa2", backend="reference")
    torch.testing.assert_close(got_q[0], vjepa2_rotate(q[0], pos), atol=1e-12, rtol=0)
    torch.testing.assert_close(got_k[0], vjepa2_rotate(k[0], pos), atol=1e-12, rtol=0)
    # the tiling quirk: the two channels of a pair turn by different angles
    assert not torch.allclose(cos[:, 0:20:2], cos[:, 1:20:2])


@pytest.mark.parametrize("layout", ["llama", "vjepa2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reference_matches_dense_rotation(layout, dtype):
    B, T, Hq, Hkv, D = 2, 13, 4, 2, 64
    cos, sin = tables(B, T, D, layout, per_batch=True)
    q, k = torch.randn(B, T, Hq, D).to(dtype), torch.randn(B, T, Hkv, D).to(dtype)
    got_q, got_k = apply_rotary(q, k, cos, sin, layout=layout, backend="reference")
    assert got_q.dtype == dtype
    for name, x, got in (("q", q, got_q), ("k", k, got_k)):
        eager, exact = rotate_exact(x, cos, sin, layout, dtype), rotate_exact(x, cos, sin, layout)
        assert_close_2x(got, eager, exact, dtype, name)


def test_bad_arguments_name_the_argument():
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = rotary_cos_sin(torch.arange(5), 8)
    cases = [
        ((q, k[:, :4], cos, sin), {}, "k:"),
        ((q, k.double(), cos, sin), {}, "k:"),
        ((q[..., :7], k[..., :7], cos[:, :7], sin[:, :7]), {}, "q:"),
        ((q, k, cos[:4], sin[:4]), {}, "cos:"),
        ((q, k, cos, sin[None].expand(3, 5, 8)), {}, "sin:"),
        ((q[0], k[0], cos, sin), {}, "q:"),
        ((torch.randn(2, 5, 4, 16)[..., ::2], k, cos, sin), {}, "q:"),
        ((q, k, cos, sin), {"layout": "gptj"}, "layout"),
        ((q, k, cos, sin), {"backend": "nope"}, "backend"),
        ((q, k, cos, sin), {"backend": {"rotary": "nope"}}, "backend"),
        ((q, k, cos, sin), {"backend": {"rotaryy": "reference"}}, "backend"),
    ]
    for args, kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            apply_rotary(*args, **kwargs)
    # a backend name of other ops that rotary does not have: named, so refused with reasons
    with pytest.raises(BackendUnavailableError, match="rotary: no backend 'cuda'"):
        apply_rotary(q, k, cos, sin, backend="cuda")
    with pytest.raises(ValueError, match="positions"):
        rotary_cos_sin(torch.arange(5)[:, None].expand(5, 2), 64, layout="vjepa2")
    with pytest.raises(ValueError, match="head_dim"):
        rotary_cos_sin(torch.arange(5), 63)


_L3 = dict(LLAMA3_ROPE_SCALING)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "^rope_scaling: expected rope_type"),
        ({"rope_scaling": dict(_L3, factor=0.0)}, r"^rope_scaling\['factor'\]"),
        ({"rope_scaling": dict(_L3, factor=-1.0)}, r"^rope_scaling\['factor'\]"),
        ({"rope_scaling": dict(_L3, factor="8")}, r"^rope_scaling\['factor'\]"),
        ({"rope_scaling": {k: v for k, v in _L3.items() if k != "low_freq_factor"}},
         "needs 'low_freq_factor'"),
        ({"rope_scaling": dict(_L3, high_freq_factor=0.5)}, "high_freq_factor > low_freq_factor"),
        ({"rope_scaling": dict(_L3, original_max_position_embeddings=0)},
         "original_max_position_embeddings"),
        ({"rope_scaling": [1, 2]}, "^rope_scaling: expected a mapping"),
        ({"dtype": torch.int32}, "^dtype: expected a floating"),
        ({"dtype": torch.bool}, "^dtype: expected a floating"),
        ({"dtype": "float32"}, "^dtype: expected a floating"),
        ({"theta": "1e4"}, "^theta: "),
        ({"theta": True}, "^theta: "),
    ],
    ids=str,
)
def test_tables_refuse_bad_arguments(kwargs, match):
    """Every argument of rotary_cos_sin is checked (regressions: the legacy key "type" was
    ignored, giving unscaled tables; a bad llama3 dict gave NaN tables or a KeyError; integer
    dtypes truncated the tables)."""
    with pytest.raises(ValueError, match=match):
        rotary_cos_sin(torch.arange(4), 8, **kwargs)


@pytest.mark.parametrize("positions", [torch.ones(4, dtype=torch.bool), torch.ones(4) * 1j])
def test_tables_refuse_bool_and_complex_positions(positions):
    with pytest.raises(ValueError, match="^positions: "):
        rotary_cos_sin(positions, 8)


def test_legacy_type_key_is_read_as_rope_type():
    legacy = {("type" if k == "rope_type" else k): v for k, v in _L3.items()}
    pos = torch.arange(9000, 9004)
    got = rotary_cos_sin(pos, 8, rope_scaling=legacy)
    want = rotary_cos_sin(pos, 8, rope_scaling=_L3)
    plain = rotary_cos_sin(pos, 8, rope_scaling=None)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(got[0], plain[0])


def test_named_triton_backend_explains_itself(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    cos, sin = rotary_cos_sin(torch.arange(3), 8)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        apply_rotary(q, k, cos, sin, backend="triton")
    auto_q, _ = apply_rotary(q, k, cos, sin)  # auto: the reference serves CPU tensors
    torch.testing.assert_close(auto_q, apply_rotary(q, k, cos, sin, backend="reference")[0])


def _small(dtype=torch.float32, tables_grad=False):
    q, k = torch.randn(1, 3, 2, 8).to(dtype), torch.randn(1, 3, 1, 8).to(dtype)
    cos, sin = rotary_cos_sin(torch.arange(3), 8)
    return q, k, cos.requires_grad_(tables_grad), sin.requires_grad_(tables_grad)


def test_rotary_is_an_op_of_the_registry(monkeypatch):
    """vf.backends() lists rotary's two backends with their machine-level reasons (regression:
    rotary had its own dispatch and was missing from the table)."""
    rows = [r for r in vf.backends() if r.op == "rotary"]
    assert [r.backend for r in rows] == ["triton", "reference"]
    for r in rows:
        assert isinstance(r.reasons, tuple) and r.available == (not r.reasons), r
    ref = next(r for r in rows if r.backend == "reference")
    assert ref.available and ref.reasons == ()
    monkeypatch.setattr(_common, "_TRITON_REASONS", ["triton is not importable: simulated"])
    tri = next(r for r in vf.backends() if (r.op, r.backend) == ("rotary", "triton"))
    assert not tri.available and tri.reasons == ("triton is not importable: simulated",)


@pytest.mark.parametrize(
    "env, backend",
    [
        ({"VLJEPA_FAST_BACKEND_ROTARY": "triton"}, "auto"),
        ({"VLJEPA_FAST_BACKEND": "triton"}, "auto"),
        ({}, "triton"),
        ({}, {"rotary": "triton"}),
        ({"VLJEPA_FAST_BACKEND_ROTARY": "reference"}, "triton"),  # an explicit name wins
    ],
    ids=["env-op", "env-all", "name", "mapping", "name-over-env"],
)
def test_every_backend_spec_reaches_rotary(monkeypatch, env, backend):
    """The environment overrides, a name and a per-op mapping all reach apply_rotary: each
    asks for the Triton backend here (CPU tensors, no interpreter), which refuses by name."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for var in ("VLJEPA_FAST_BACKEND", "VLJEPA_FAST_BACKEND_ROTARY"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(BackendUnavailableError, match="(?s)rotary: backend 'triton'.*"
                                                      "TRITON_INTERPRET"):
        apply_rotary(*_small(), backend=backend)


@pytest.mark.parametrize(
    "env, backend, want",
    [
        ({}, "auto", "reference"),
        ({"VLJEPA_FAST_BACKEND_ROTARY": "reference"}, "auto", "reference"),
        ({}, {"attention": "triton"}, "reference"),  # ops a mapping leaves out run auto
        ({}, {"rotary": "reference"}, "reference"),
    ],
)
def test_dispatch_trace_names_the_rotary_backend(monkeypatch, env, backend, want):
    for var in ("VLJEPA_FAST_BACKEND", "VLJEPA_FAST_BACKEND_ROTARY"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    q, k, cos, sin = _small()
    with _backends.trace() as events:
        got = apply_rotary(q, k, cos, sin, backend=backend)
    assert events == [_backends.TraceEvent("rotary", want, "cpu")]
    exact = rotate_exact(q, cos, sin, "llama")
    assert_close_2x(got[0], rotate_exact(q, cos, sin, "llama", torch.float32), exact,
                    torch.float32, "q")


def test_triton_refuses_tables_with_a_gradient_and_auto_takes_the_reference(monkeypatch):
    """The rule "tables that require a gradient go to the reference" is a refusal of the
    triton record with a readable reason (asked here as if the interpreter were on, so the
    device check passes; nothing is launched). The reference differentiates the tables."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, cos, sin = _small(tables_grad=True)
    inputs = rotary_inputs(q, k, cos, sin, layout="llama")
    triton = next(b for b in _backends.records("rotary") if b.name == "triton")
    assert _backends.reasons_for(triton, inputs) == [
        "cos/sin require a gradient (the fused op treats the tables as constants)"
    ]
    with pytest.raises(BackendUnavailableError, match="cos/sin require a gradient"):
        apply_rotary(q, k, cos, sin, backend="triton")
    f64 = rotary_inputs(*_small(torch.float64), layout="llama")
    assert _backends.reasons_for(triton, f64) == [
        "q dtype float64 not supported (serves float32, float16, bfloat16)"
    ]
    rec, plan = _backends.select("rotary", "auto", inputs)
    assert rec.name == "reference" and plan is None
    rq, _ = apply_rotary(q, k, cos, sin)
    gc, gs = torch.autograd.grad(rq.sum(), (cos, sin))
    c64, s64 = cos.detach().double().requires_grad_(), sin.detach().double().requires_grad_()
    wc, ws = torch.autograd.grad(rotate_exact(q, c64, s64, "llama").sum(), (c64, s64))
    torch.testing.assert_close(gc.double(), wc, rtol=0, atol=1e-5)
    torch.testing.assert_close(gs.double(), ws, rtol=0, atol=1e-5)


def test_rotary_inputs_pack_the_tables_as_batched():
    q, k, cos, sin = _small()
    inputs = rotary_inputs(q, k, cos, sin, layout="vjepa2")
    assert inputs.device == q.device and inputs.layout == "vjepa2"
    assert inputs.cos.shape == (1, 3, 8) and inputs.sin.shape == (1, 3, 8)
    assert inputs.q is q and inputs.k is k
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.layout = "llama"
    with pytest.raises(ValueError, match="^layout: "):
        rotary_inputs(q, k, cos, sin, layout="gptj")


@pytest.mark.parametrize("layout", ["llama", "vjepa2"])
def test_reference_takes_unbatched_tables(layout):
    """reference.apply_rotary (the spec) reads [T, D] tables as [1, T, D]."""
    cos, sin = tables(2, 13, 64, layout, per_batch=False)
    q, k = torch.randn(2, 13, 4, 64, dtype=torch.float64), torch.randn(2, 13, 2, 64,
                                                                     dtype=torch.float64)
    got = reference.apply_rotary(q, k, cos, sin, layout=layout)
    want = reference.apply_rotary(q, k, cos[None], sin[None], layout=layout)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], rotate_exact(q, cos, sin, layout), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- interpret


# (B, T, Hq, Hkv, D, layout, dtype, per-batch tables, q a strided head slice)
CASES = [
    pytest.param(2, 37, 4, 2, 64, "llama", torch.float32, False, False, id="llama-f32"),
    pytest.param(2, 37, 4, 1, 64, "llama", torch.bfloat16, True, True, id="llama-bf16-strided"),
    pytest.param(1, 21, 2, 2, 72, "llama", torch.float16, False, False, id="llama-d72-f16"),
    pytest.param(2, 37, 4, 2, 64, "vjepa2", torch.float32, True, False, id="vjepa2-f32"),
    pytest.param(1, 19, 3, 3, 64, "vjepa2", torch.bfloat16, False, True, id="vjepa2-bf16-strided"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("B, T, Hq, Hkv, D, layout, dtype, per_batch, strided", CASES)
def test_triton_matches_float64(poisoned, B, T, Hq, Hkv, D, layout, dtype, per_batch, strided):
    cos, sin = tables(B, T, D, layout, per_batch)
    if strided:  # q and k as head slices of one fused projection: strided rows
        qkv = torch.randn(B, T, Hq + 2 * Hkv, D).to(dtype)
        q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv]
    else:
        q, k = torch.randn(B, T, Hq, D).to(dtype), torch.randn(B, T, Hkv, D).to(dtype)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    got_q, got_k = apply_rotary(q, k, cos, sin, layout=layout, backend="triton")
    assert poisoned, "the launcher allocated nothing through torch.empty: poisoning is inert"
    dq_out, dk_out = torch.randn_like(got_q), torch.randn_like(got_k)
    gq, gk = torch.autograd.grad((got_q, got_k), (q, k), (dq_out, dk_out))

    def run(dt):
        xq, xk = q.detach().to(dt).requires_grad_(), k.detach().to(dt).requires_grad_()
        oq, ok = rotate_exact(xq, cos, sin, layout, dt), rotate_exact(xk, cos, sin, layout, dt)
        return (oq, ok, *torch.autograd.grad((oq, ok), (xq, xk), (dq_out.to(dt), dk_out.to(dt))))

    exact, eager = run(torch.float64), run(dtype)
    for name, got, i in zip(("q", "k", "dq", "dk"), (got_q, got_k, gq, gk), range(4)):
        assert got.dtype == dtype, name
        assert_close_2x(got, eager[i], exact[i], dtype, name)


@pytest.mark.interpret
def test_triton_backward_is_the_transpose_for_tiled_tables():
    """<R x, g> = <x, R^T g> in float64 terms, for V-JEPA 2's asymmetric pairs."""
    B, T, D = 1, 11, 64
    cos, sin = tables(B, T, D, "vjepa2", per_batch=False)
    x, g = torch.randn(B, T, 2, D), torch.randn(B, T, 2, D)
    rx, _ = kernel.rotary(x, x[:, :, :1], cos[None], sin[None], interleaved=True, transpose=False)
    rtg, _ = kernel.rotary(g, g[:, :, :1], cos[None], sin[None], interleaved=True, transpose=True)
    lhs, rhs = (rx.double() * g.double()).sum(), (x.double() * rtg.double()).sum()
    assert abs(lhs - rhs).item() < 1e-4 * max(1.0, abs(lhs).item())


@pytest.mark.interpret
def test_custom_op_registration_and_fullgraph_compile():
    """Fake kernel, autograd registration and schema pass opcheck; a compiled forward+backward
    through the Triton op (one graph) matches eager."""
    B, T, D = 1, 9, 32
    cos, sin = tables(B, T, D, "llama", per_batch=False)
    q = torch.randn(B, T, 4, D, requires_grad=True)
    k = torch.randn(B, T, 2, D, requires_grad=True)
    torch.library.opcheck(
        torch.ops.vljepa_fast.rotary_triton.default, (q, k, cos[None], sin[None], False, False),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )

    def step(q, k):
        rq, rk = apply_rotary(q, k, cos, sin, backend="triton")
        return rq.square().sum() + (rk * 3).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k), (q, k))
    want = torch.autograd.grad(step(q, k), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- compile


@pytest.mark.compile
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize(
    "dtype, interleaved, transpose",
    [(torch.bfloat16, False, False), (torch.float16, True, True), (torch.float32, False, True)],
)
def test_compiles(arch, dtype, interleaved, transpose):
    cfg = kernel.rotary_config(4096, 64)
    constexprs = {"D": 64, "INTERLEAVED": interleaved, "TRANSPOSE": transpose,
                  "BT": cfg["BT"], "BD": cfg["BD"]}
    sig = {}
    for name in kernel.rotary_kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("cos", "sin"):
            sig[name] = "*fp32"
        elif name in ("q", "k", "q_out", "k_out"):
            sig[name] = pointer_type(dtype)
        else:
            sig[name] = "i32"
    report = aot_compile(kernel.rotary_kernel, sig, constexprs, arch=arch,
                         num_warps=cfg["num_warps"], num_stages=1)
    assert report.n_spills == 0, f"{report.name}: {report.n_spills} bytes spilled"
    assert report.shared <= report.shared_limit
