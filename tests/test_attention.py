"""attention / attention_varlen: validation, and every backend that serves CPU inputs against the
float64 reference, forward and gradients (gpu tier: every CUDA backend)."""

from __future__ import annotations

import pytest
import torch

import vljepa_fast as vf
from tests._util import assert_close_2x
from vljepa_fast import _backends, reference


def _qkv(B, T, S, hq, hkv, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(True)
    return mk(B, T, hq, D), mk(B, S, hkv, D), mk(B, S, hkv, D)


def _padding(B, S, seed, all_but_one=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    if all_but_one:
        lengths[0] = 1
    return torch.arange(S)[None, :] < lengths[:, None]


def _grads(out, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return torch.autograd.grad(out, inputs, do)


def _cpu_backends(op):
    return [b.name for b in _backends.records(op) if "cpu" in b.devices and b.name != "triton"]


@pytest.mark.parametrize("backend", _cpu_backends("attention"))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize(
    "masked,causal", [(False, False), (True, False), (False, True), (True, True)]
)
@pytest.mark.parametrize("T,S", [(37, 37), (5, 101)])
def test_attention_backends_vs_float64(backend, hq, hkv, masked, causal, T, S):
    seed = hq + 10 * hkv + 100 * masked + 1000 * causal + T
    q, k, v = _qkv(2, T, S, hq, hkv, 16, seed=seed)
    mask = _padding(2, S, seed, all_but_one=True) if masked else None
    out = vf.attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    exact = reference.attention(q64, k64, v64, key_padding_mask=mask, causal=causal)
    eager = reference.attention(q, k, v, key_padding_mask=mask, causal=causal)
    assert_close_2x(out, eager, exact, torch.float32, "out")
    for got, ea, ex, name in zip(
        _grads(out, (q, k, v), 1),
        _grads(eager, (q, k, v), 1),
        _grads(exact, (q64, k64, v64), 1),
        "qkv",
    ):
        assert_close_2x(got, ea, ex, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", _cpu_backends("attention_varlen"))
@pytest.mark.parametrize("causal", [False, True])
def test_attention_varlen_backends_vs_float64(backend, causal):
    lq, lk = [1, 37, 5, 0], [1, 40, 101, 3]
    g = torch.Generator().manual_seed(3 + causal)
    q = torch.randn(sum(lq), 8, 32, generator=g).requires_grad_(True)
    k = torch.randn(sum(lk), 2, 32, generator=g).requires_grad_(True)
    v = torch.randn(sum(lk), 2, 32, generator=g).requires_grad_(True)
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32)
    args = (cu(lq), cu(lk), max(lq), max(lk))
    out = vf.attention_varlen(q, k, v, *args, causal=causal, backend=backend)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    exact = reference.attention_varlen(q64, k64, v64, *args, causal=causal)
    eager = reference.attention_varlen(q, k, v, *args, causal=causal)
    assert_close_2x(out, eager, exact, torch.float32, "out")
    for got, ea, ex, name in zip(
        _grads(out, (q, k, v), 2),
        _grads(eager, (q, k, v), 2),
        _grads(exact, (q64, k64, v64), 2),
        "qkv",
    ):
        assert_close_2x(got, ea, ex, torch.float32, f"d{name}")


def test_auto_uses_sdpa_on_cpu():
    q, k, v = _qkv(1, 4, 4, 2, 1, 8)
    assert _backends.select("attention", "auto", (q, k, v), {}).name == "sdpa"


def test_env_override_and_deterministic_refusal(monkeypatch):
    q, k, v = _qkv(1, 4, 4, 2, 1, 8)
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "reference")
    assert _backends.select("attention", "auto", (q, k, v), {}).name == "reference"
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        vf.attention(q, k, v)
    monkeypatch.delenv("VLJEPA_FAST_BACKEND_ATTENTION")
    monkeypatch.setenv("VLJEPA_FAST_BACKEND", "reference")
    assert _backends.select("attention", "auto", (q, k, v), {}).name == "reference"
    assert _backends.select("attention", "sdpa", (q, k, v), {}).name == "sdpa"


@pytest.mark.parametrize(
    "shapes,kw,match",
    [
        (((1, 4, 6, 8), (1, 4, 4, 8), (1, 4, 4, 8)), {}, "KV heads \\(4\\) must divide"),
        (((1, 4, 4, 8), (1, 4, 2, 16), (1, 4, 2, 16)), {}, "k: expected head dim 8"),
        (((1, 4, 4, 8), (1, 5, 2, 8), (1, 6, 2, 8)), {}, "v: expected the shape of k"),
        (((4, 4, 8), (4, 2, 8), (4, 2, 8)), {}, "q: expected a 4-D tensor"),
        (((2, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {}, "k: expected batch size 2"),
        (
            ((1, 4, 4, 8), (1, 5, 2, 8), (1, 5, 2, 8)),
            {"key_padding_mask": torch.ones(1, 4, dtype=torch.bool)},
            "key_padding_mask: expected shape",
        ),
        (
            ((1, 4, 4, 8), (1, 5, 2, 8), (1, 5, 2, 8)),
            {"key_padding_mask": torch.ones(1, 5)},
            "key_padding_mask: expected a bool tensor",
        ),
        (((1, 0, 4, 8), (1, 5, 2, 8), (1, 5, 2, 8)), {}, "q: expected at least one query"),
        (
            ((1, 4, 4, 8), (1, 5, 2, 8), (1, 5, 2, 8)),
            {"scale": float("nan")},
            "scale: expected a finite",
        ),
    ],
)
def test_attention_bad_input(shapes, kw, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        vf.attention(q, k, v, **kw)


def test_attention_dtype_device_layout_errors():
    q, k, v = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k: expected the same dtype as q"):
        vf.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="v: expected the same device as q"):
        vf.attention(q, k, v.to("meta"))
    with pytest.raises(ValueError, match="q: expected the last dimension contiguous"):
        vf.attention(torch.randn(1, 4, 8, 4).transpose(-1, -2), k, v)


def test_varlen_bad_cu_seqlens():
    q, k = torch.randn(6, 4, 8), torch.randn(7, 2, 8)
    good_q, good_k = (
        torch.tensor([0, 2, 6], dtype=torch.int32),
        torch.tensor([0, 3, 7], dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="cu_seqlens_q: expected a 1-D int32 tensor"):
        vf.attention_varlen(q, k, k, good_q.long(), good_k, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 0, non-decreasing"):
        vf.attention_varlen(q, k, k, good_q, torch.tensor([0, 5, 3], dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected 0, non-decreasing, ending at 6"):
        vf.attention_varlen(q, k, k, torch.tensor([0, 2, 5], dtype=torch.int32), good_k, 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_q: expected >= 4"):
        vf.attention_varlen(q, k, k, good_q, good_k, 3, 4)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 3 entries"):
        vf.attention_varlen(q, k, k, good_q, torch.tensor([0, 7], dtype=torch.int32), 4, 7)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend", [b.name for b in _backends.records("attention") if "cuda" in b.devices]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_attention_backends(backend, dtype, masked):
    q, k, v = _qkv(2, 300, 300, 32, 8, 64, dtype=dtype, device="cuda", seed=5)
    mask = _padding(2, 300, 5).cuda() if masked else None
    try:
        out = vf.attention(q, k, v, key_padding_mask=mask, backend=backend)
    except vf.BackendUnavailableError as e:
        pytest.skip(str(e))
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    exact = reference.attention(q64, k64, v64, key_padding_mask=mask)
    eager = reference.attention(q, k, v, key_padding_mask=mask)
    assert_close_2x(out, eager, exact, dtype, "out")
    for got, ea, ex, name in zip(
        _grads(out, (q, k, v), 1),
        _grads(eager, (q, k, v), 1),
        _grads(exact, (q64, k64, v64), 1),
        "qkv",
    ):
        assert_close_2x(got, ea, ex, dtype, f"d{name}")
