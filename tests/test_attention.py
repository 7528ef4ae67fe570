"""attention / attention_varlen: validation, and every backend that serves CPU inputs against the
float64 reference, forward and gradients (gpu tier: every CUDA backend); the NaN rule and key
padding contract of vf.attention's docstring on every backend (Triton through the interpreter)
against a pair-by-pair float64 oracle; strided, offset and non-contiguous arguments."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import vljepa_fast as vf
from tests._util import assert_close_2x, poisoned_allocations
from vljepa_fast import _backends, reference
from vljepa_fast.ops.attention import attention_inputs, varlen_inputs


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
    rec, plan = _backends.select("attention", "auto", attention_inputs(q, k, v))
    assert rec.name == "sdpa" and plan is None


def test_env_override_and_deterministic_refusal(monkeypatch):
    q, k, v = _qkv(1, 4, 4, 2, 1, 8)
    inputs = attention_inputs(q, k, v)
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "reference")
    assert _backends.select("attention", "auto", inputs)[0].name == "reference"
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "bogus")
    # the error names the variable, not the backend argument the caller left at "auto"
    with pytest.raises(
        ValueError, match="^environment variable VLJEPA_FAST_BACKEND_ATTENTION: expected 'auto'"
    ):
        vf.attention(q, k, v)
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "")  # empty: unset, for every variable
    monkeypatch.setenv("VLJEPA_FAST_BACKEND", "")
    assert _backends.select("attention", "auto", inputs)[0].name == "sdpa"
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_ATTENTION", "auto")  # the most specific one wins
    monkeypatch.setenv("VLJEPA_FAST_BACKEND", "reference")
    assert _backends.select("attention", "auto", inputs)[0].name == "sdpa"
    monkeypatch.delenv("VLJEPA_FAST_BACKEND")
    monkeypatch.delenv("VLJEPA_FAST_BACKEND_ATTENTION")
    monkeypatch.setenv("VLJEPA_FAST_BACKEND", "reference")
    assert _backends.select("attention", "auto", inputs)[0].name == "reference"
    assert _backends.select("attention", "sdpa", inputs)[0].name == "sdpa"


def test_inputs_objects_carry_the_validated_arguments():
    """The builders return what vf.attention / vf.attention_varlen hand every backend: the
    arguments as given (numpy scalars as Python numbers) and, for varlen, the sequence lengths
    read by the validation."""
    q, k, v = _qkv(2, 3, 5, 4, 2, 8)
    mask = _padding(2, 5, 0)
    x = attention_inputs(q, k, v, key_padding_mask=mask, causal=True, scale=np.float32(0.5))
    assert (x.q, x.k, x.v, x.key_padding_mask) == (q, k, v, mask)
    assert x.causal is True and type(x.scale) is float and x.scale == 0.5
    assert x.device == q.device
    qv, kv = q.detach().reshape(6, 4, 8), k.detach().reshape(10, 2, 8)
    cu_q = torch.tensor([0, 1, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 10], dtype=torch.int32)
    y = varlen_inputs(qv, kv, kv, cu_q, cu_k, np.int64(5), 10)
    assert y.lengths_q == (1, 5) and y.lengths_k == (0, 10)
    assert type(y.max_seqlen_q) is int and y.max_seqlen_q == 5
    assert y.cu_seqlens_q is cu_q and y.cu_seqlens_k is cu_k and y.scale is None
    with pytest.raises(ValueError, match="max_seqlen_q: expected >= 5 \\(the longest"):
        varlen_inputs(qv, kv, kv, cu_q, cu_k, 4, 10)


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


# ---------------------------------------------------------------------------------------------
# Non-finite inputs and padded keys (the rule in vf.attention's docstring), every backend
# ---------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
# every backend that serves CPU tensors, "auto" (sdpa here), and Triton through its interpreter
RULE_BACKENDS = [
    *_cpu_backends("attention"),
    "auto",
    pytest.param("triton", marks=pytest.mark.interpret),
]


def _allowed_pairs(B, T, S, key_padding_mask, causal):
    """[B, 1, T, S] bool: query i attends to key j."""
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T))
    return allowed


def plain_attention(q, k, v, key_padding_mask=None, causal=False):
    """Float64 softmax attention evaluated pair by pair over the allowed (query, key) pairs only:
    the oracle of the NaN rule (no 0 * NaN from masked pairs, no shortcut for -inf maxima)."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qf = q.detach().double()
    kf = k.detach().double().repeat_interleave(g, dim=2)
    vf = v.detach().double().repeat_interleave(g, dim=2)
    allowed = _allowed_pairs(B, T, S, key_padding_mask, causal)
    s = torch.einsum("bthd,bshd->bhts", qf, kf) * D**-0.5
    p = torch.softmax(s.masked_fill(~allowed, -INF), dim=-1)  # [B, H, T, S]
    terms = p[..., None] * vf.permute(0, 2, 1, 3)[:, :, None]  # [B, H, T, S, D]
    out = torch.where(allowed[..., None], terms, 0.0).sum(dim=3)
    out = torch.where(allowed.any(-1, keepdim=True), out, 0.0)  # no key: zeros
    return out.transpose(1, 2)


def _check_rule(got, want, hidden=None):
    """Non-finite exactly where the oracle is (``hidden`` [B, T, Hq]: rows where extra
    non-finite values are allowed), finite values equal to it."""
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    missing = bad_want & ~bad_got
    assert not missing.any(), f"{int(missing.sum())} outputs finite where plain math is not"
    extra = bad_got & ~bad_want
    if hidden is not None:
        extra = extra & ~hidden[..., None]
    assert not extra.any(), f"{int(extra.sum())} outputs non-finite where plain math is finite"
    ok = ~bad_got & ~bad_want
    torch.testing.assert_close(got.double()[ok], want[ok], rtol=1e-4, atol=1e-5)


B_, T_, S_, HQ_, HKV_, D_ = 2, 7, 9, 4, 2, 32
# (T, S, Hq, Hkv): GQA with T != S, and T == S without GQA; short sequences (T <= 7) take the
# path of torch's CPU SDPA kernel that turned a NaN query into zeros
RULE_SHAPES = [(5, 7, 4, 2), (7, 7, 2, 2)]


def _rule_inputs(seed, T, S, hq, hkv, masked):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B_, n, h, D_, generator=g) for n, h in ((T, hq), (S, hkv), (S, hkv)))
    mask = (torch.arange(S)[None] < torch.tensor([S, 6])[:, None]) if masked else None
    return q, k, v, mask


@pytest.mark.parametrize("backend", RULE_BACKENDS)
@pytest.mark.parametrize("T, S, hq, hkv", RULE_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_nan_rule_matches_plain_math(backend, T, S, hq, hkv, masked, causal, value, target):
    """A NaN/Inf in a query row, a real key or a real value reaches exactly the outputs plain
    math sends it to (regression: sdpa turned a NaN query into finite outputs)."""
    q, k, v, mask = _rule_inputs(11, T, S, hq, hkv, masked)
    j = 5  # a real key of sequence 1, hidden under causal from the queries i < j - (S - T)
    if target == "q":
        q[1, 3, hq - 1, 5] = value
    else:
        (k if target == "k" else v)[1, j, hkv - 1, 4] = value
    got = vf.attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    want = plain_attention(q, k, v, mask, causal)
    hidden = None
    if causal and target != "q":
        # documented exception: with causal, a non-finite real key/value may also reach the
        # queries of its sequence the mask hides it from
        hidden = torch.zeros(B_, T, hq, dtype=torch.bool)
        group = hq // hkv
        hidden[1, : max(j - (S - T), 0), hq - group :] = True
    _check_rule(got, want, hidden)


@pytest.mark.parametrize("backend", RULE_BACKENDS)
@pytest.mark.parametrize("T, S, hq, hkv", RULE_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["all-scores-minus-inf", "all-keys-nan"])
def test_nan_rule_when_no_score_is_finite(backend, T, S, hq, hkv, masked, causal, kind):
    """Every score of sequence 1 is -inf (or NaN): plain softmax gives NaN (0 / 0), not the zeros
    of a kernel that takes a -inf running max for 'no key' (regression: sdpa and triton)."""
    q, k, v, mask = _rule_inputs(12, T, S, hq, hkv, masked)
    if kind == "all-scores-minus-inf":
        q[1, :, :, 7] = q[1, :, :, 7].abs() + 0.5
        k[1, :, :, 7] = -INF
    else:
        k[1, :, :, 3] = NAN
    got = vf.attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    want = plain_attention(q, k, v, mask, causal)
    assert not torch.isfinite(want[1]).any()
    _check_rule(got, want)


@pytest.mark.parametrize(
    "backend, pattern",
    [(b, p) for b in RULE_BACKENDS[:-1] for p in ("right", "scattered")]
    # triton serves right padding only (it refuses other patterns)
    + [pytest.param("triton", "right", marks=pytest.mark.interpret)],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_padded_keys_take_no_part(backend, pattern, causal, value):
    """NaN/Inf in padded keys and values changes nothing, forward or backward (regression:
    reference and sdpa returned NaN everywhere); padded k/v get zero gradients."""
    q, k, v = _qkv(B_, T_, S_, HQ_, HKV_, D_, seed=13)
    if pattern == "right":
        mask = torch.arange(S_)[None] < torch.tensor([S_, 4])[:, None]
    else:
        mask = torch.rand(B_, S_, generator=torch.Generator().manual_seed(14)) < 0.6
        mask[:, -1] = True  # every query keeps a key under causal too
    pad = ~mask
    k_bad, v_bad = (x.detach().clone() for x in (k, v))
    k_bad[pad], v_bad[pad] = value, -value
    k_bad.requires_grad_(True)
    v_bad.requires_grad_(True)
    clean = vf.attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    out = vf.attention(q, k_bad, v_bad, key_padding_mask=mask, causal=causal, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    want = reference.attention(
        *(x.detach().double() for x in (q, k, v)), key_padding_mask=mask, causal=causal
    )
    assert_close_2x(clean, reference.attention(q, k, v, key_padding_mask=mask, causal=causal),
                    want, torch.float32, "out")
    grads = _grads(out, (q, k_bad, v_bad), 15)
    clean_grads = _grads(clean, (q, k, v), 15)
    for name, got, ref in zip("qkv", grads, clean_grads):
        assert torch.isfinite(got).all(), f"d{name}: non-finite"
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"d{name} differs")
    for name, got in (("dk", grads[1]), ("dv", grads[2])):
        assert torch.equal(got[pad], torch.zeros_like(got[pad])), f"{name}: padded keys nonzero"


VARLEN_RULE_BACKENDS = [
    *_cpu_backends("attention_varlen"),
    "auto",
    pytest.param("triton", marks=pytest.mark.interpret),
]


@pytest.mark.parametrize("backend", VARLEN_RULE_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("target", ["q", "k", "v", "all-k"])
def test_varlen_nan_rule_stays_in_its_sequence(backend, causal, target):
    """A NaN in sequence 0 reaches only what plain math sends it to inside sequence 0; the other
    sequences are untouched (regression: sdpa's padded gather copied row 0 of the pack, NaN
    included, into the padding of every other sequence)."""
    lq, lk = [3, 5, 2], [4, 6, 3]
    g = torch.Generator().manual_seed(16)
    q = torch.randn(sum(lq), 4, 32, generator=g)
    k, v = (torch.randn(sum(lk), 2, 32, generator=g) for _ in range(2))
    if target == "q":
        q[0, 1, 3] = NAN
    elif target == "all-k":
        k[: lk[0], :, 3] = NAN
    else:
        (k if target == "k" else v)[0, 1, 3] = NAN
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)
    cu_q, cu_k = cu(lq), cu(lk)
    got = vf.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                              backend=backend)
    want = torch.cat([
        plain_attention(q[None, cu_q[b] : cu_q[b + 1]], k[None, cu_k[b] : cu_k[b + 1]],
                        v[None, cu_k[b] : cu_k[b + 1]], None, causal)[0]
        for b in range(len(lq))
    ])
    hidden = None
    if causal and target in ("k", "v"):  # key 0 is seen by every query of sequence 0
        hidden = torch.zeros(sum(lq), 4, dtype=torch.bool)
    _check_rule(got, want, hidden)
    assert torch.isfinite(got[lq[0] :]).all(), "a NaN of sequence 0 reached another sequence"


@pytest.mark.parametrize("backend", VARLEN_RULE_BACKENDS)
def test_varlen_nan_gradient_stays_in_its_sequence(backend):
    """A NaN key of the last sequence makes only that sequence's gradients NaN (regression: sdpa
    fed its padding query slots with row 0 of the pack, a real query of sequence 0, and their
    gradient, NaN from meeting the NaN key, flowed back into q row 0)."""
    cu_q = torch.tensor([0, 3, 3, 7, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 5, 5, 10], dtype=torch.int32)
    g = torch.Generator().manual_seed(17)
    q = torch.randn(9, 2, 32, generator=g)
    k, v = (torch.randn(10, 2, 32, generator=g) for _ in range(2))
    k[6, 0, 0] = NAN  # a key of the last sequence (query rows 7, 8) only
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = vf.attention_varlen(q, k, v, cu_q, cu_k, 4, 5, backend=backend)
    assert torch.isfinite(out[:7]).all()
    out[:7].sum().backward()  # sequences 0-2 only
    # rows 7, 8 may be NaN (their zero upstream gradient meets the NaN score: 0 * NaN)
    assert torch.isfinite(q.grad[:7]).all(), "a NaN of the last sequence reached another's dq"
    assert torch.isfinite(k.grad[:5]).all() and torch.isfinite(v.grad[:5]).all()
    # float64 truth: sequences 0-2 alone (they hold no NaN) through the eager reference
    q64, k64, v64 = (x.detach()[:n].double().requires_grad_() for x, n in ((q, 7), (k, 5), (v, 5)))
    want = vf.attention_varlen(q64, k64, v64, cu_q[:4], cu_k[:4], 4, 3, backend="reference")
    want.sum().backward()
    torch.testing.assert_close(q.grad[:7].double(), q64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k.grad[:5].double(), k64.grad, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Strided, offset and non-contiguous arguments (every argument, every backend)
# ---------------------------------------------------------------------------------------------


def nan_margins(x: torch.Tensor, pad: int = 4096) -> torch.Tensor:
    """A copy of ``x`` (same strides) living inside a NaN buffer with ``pad`` elements of margin
    on both sides: a kernel reading past the tensor reads NaN."""
    extent = 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
    buf = torch.full((extent + 2 * pad,), float("nan"), dtype=x.dtype)
    view = buf.as_strided(x.shape, x.stride(), pad)
    view.copy_(x)
    return view


def strided_dense_inputs(seed, B=2, T=37, S=45, hq=4, hkv=2, D=32):
    """q, k, v views with storage offsets and foreign strides, and a non-contiguous right-padding
    key_padding_mask (a transposed [S, B] tensor)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T + 3, hq + 2, D, generator=g)[:, 2 : 2 + T, 1 : 1 + hq]
    k = torch.randn(B, hkv, S, D, generator=g).transpose(1, 2)
    v = torch.randn(S, B, 2 * hkv, D, generator=g).transpose(0, 1)[:, :, hkv:]
    q, k, v = (nan_margins(x) for x in (q, k, v))
    mask = (torch.arange(S)[:, None] < torch.tensor([S, 20])[None, :]).T
    assert not any(x.is_contiguous() for x in (q, k, v, mask)) and q.storage_offset() > 0
    return tuple(x.requires_grad_(True) for x in (q, k, v)) + (mask,)


def strided_varlen_inputs(seed, hq=4, hkv=2, D=32):
    """Packed q, k, v views with offsets and foreign strides (inside NaN margins), and
    cu_seqlens that are strided views (a column of a [B + 1, 2] tensor, as in the issue)."""
    lq, lk = [3, 5, 12, 0], [9, 2, 19, 4]
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)
    # column 0 of [[c0, x], [c1, x], ...]: stride 2, and column 1 holds total + 1, so a kernel
    # that reads the buffer as contiguous sees sequences running one row past the tensors
    col = lambda ls: torch.full((len(ls) + 1,), sum(ls) + 1, dtype=torch.int32)
    cu_q = torch.stack([cu(lq), col(lq)], 1)[:, 0]
    cu_k = torch.stack([cu(lk), col(lk)], 1)[:, 0]
    assert cu_q.stride(0) == 2 and cu_k.stride(0) == 2
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq + 2, 2 * hq, D, generator=g)[1 : 1 + tq, ::2]
    k = torch.randn(hkv, tk, D, generator=g).transpose(0, 1)
    v = torch.randn(tk + 1, 2 * hkv, D, generator=g)[1:, hkv:]
    qkv = tuple(nan_margins(x).requires_grad_(True) for x in (q, k, v))
    return qkv + (cu_q, cu_k, max(lq), max(lk))


def _strided_grads(outs, inputs, seed):
    """Gradients of each out (with its inputs) for one upstream gradient that is a transposed,
    non-contiguous view."""
    g = torch.Generator().manual_seed(seed)
    shape = outs[0].shape
    do = torch.randn(shape[0], shape[2], shape[1], *shape[3:], generator=g).transpose(1, 2)
    assert not do.is_contiguous()
    return [torch.autograd.grad(o, x, do.to(o.dtype)) for o, x in zip(outs, inputs)]


def check_strided_dense(backend, causal):
    q, k, v, mask = strided_dense_inputs(17 + causal)
    out = vf.attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
    leaves = [x.detach().contiguous().requires_grad_(True) for x in (q, k, v)]
    leaves64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    kw = dict(key_padding_mask=mask.contiguous(), causal=causal)
    eager, exact = reference.attention(*leaves, **kw), reference.attention(*leaves64, **kw)
    assert_close_2x(out, eager, exact, torch.float32, "out")
    grads = _strided_grads((out, eager, exact), ((q, k, v), leaves, leaves64), 18)
    for name, got, ea, ex in zip("qkv", *grads):
        assert_close_2x(got, ea, ex, torch.float32, f"d{name}")


def check_strided_varlen(backend, causal):
    q, k, v, cu_q, cu_k, mq, mk = strided_varlen_inputs(19 + causal)
    out = vf.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, backend=backend)
    leaves = [x.detach().contiguous().requires_grad_(True) for x in (q, k, v)]
    leaves64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    args = (cu_q.contiguous(), cu_k.contiguous(), mq, mk)
    eager = reference.attention_varlen(*leaves, *args, causal=causal)
    exact = reference.attention_varlen(*leaves64, *args, causal=causal)
    assert_close_2x(out, eager, exact, torch.float32, "out")
    grads = _strided_grads((out, eager, exact), ((q, k, v), leaves, leaves64), 20)
    for name, got, ea, ex in zip("qkv", *grads):
        assert_close_2x(got, ea, ex, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", [*_cpu_backends("attention"), "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs_dense(backend, causal):
    check_strided_dense(backend, causal)


@pytest.mark.parametrize("backend", [*_cpu_backends("attention_varlen"), "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_strided_inputs_varlen(backend, causal):
    check_strided_varlen(backend, causal)


def test_numpy_scalars_are_plain_numbers():
    """numpy integers for max_seqlen_* and numpy reals for scale behave as Python numbers;
    numpy bools are refused like bools."""
    g = torch.Generator().manual_seed(18)
    q = torch.randn(5, 2, 8, generator=g)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    want = vf.attention_varlen(q, q, q, cu, cu, 3, 3, scale=0.3, backend="reference")
    got = vf.attention_varlen(
        q, q, q, cu, cu, np.int64(3), np.int32(3), scale=np.float64(0.3), backend="reference"
    )
    assert torch.equal(got, want)
    dense = vf.attention(q[None], q[None], q[None], scale=np.float32(0.5), backend="reference")
    assert torch.equal(dense, vf.attention(q[None], q[None], q[None], scale=0.5,
                                           backend="reference"))
    with pytest.raises(ValueError, match="max_seqlen_q: expected an int"):
        vf.attention_varlen(q, q, q, cu, cu, np.bool_(True), 3)


def test_the_mask_is_read_on_the_host_once_per_call(monkeypatch):
    """Every record auto asks (triton, flash_attn, xformers) takes the key counts from one
    host read cached on the inputs object, and a record that refuses for another reason
    (dtype, head dim) reads nothing (regression: up to three syncs per call under auto)."""
    from vljepa_fast.ops import attention as ops

    reads = []
    real = ops._key_counts
    monkeypatch.setattr(ops, "_key_counts", lambda m: reads.append(1) or real(m))
    q, k = torch.randn(2, 3, 4, 32, dtype=torch.float64), torch.randn(2, 5, 2, 32)
    mask = torch.arange(5)[None] < torch.tensor([5, 2])[:, None]
    tri = next(b for b in _backends.records("attention") if b.name == "triton")
    refused = tri.supports(ops.attention_inputs(q, q, q, key_padding_mask=mask[:, :3]))
    assert isinstance(refused, _backends.Refusal) and not reads
    x = ops.attention_inputs(k.new_empty(2, 3, 4, 32).normal_(), k, k, key_padding_mask=mask)
    first, again = x.key_counts(), x.key_counts()
    assert first is again and len(reads) == 1
    assert first.host == (5, 2) and first.right and first.lengths.tolist() == [5, 2]
    holes = ops.attention_inputs(q, q, q, key_padding_mask=torch.tensor([[1, 0, 1]] * 2).bool())
    assert not holes.key_counts().right and holes.key_counts().host == (2, 2)


# ---------------------------------------------------------------------------------------------
# Sliding-window (local) attention: window_size=(left, right), every backend
# ---------------------------------------------------------------------------------------------


def window_pairs(T, S, key_padding_mask, causal, window_size, B=None):
    """[B, 1, T, S] bool, built pair by pair from the documented rule (written here, not the
    library's): query i attends key j iff the key is real and
    i + S - T - left <= j <= i + S - T + right, -1 unbounded, causal making right 0."""
    left, right = window_size
    if causal:
        right = 0
    B = key_padding_mask.shape[0] if key_padding_mask is not None else (B or 1)
    allowed = torch.zeros(B, 1, T, S, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(S):
                ok = key_padding_mask is None or bool(key_padding_mask[b, j])
                ok = ok and (left == -1 or j >= i + S - T - left)
                ok = ok and (right == -1 or j <= i + S - T + right)
                allowed[b, 0, i, j] = ok
    return allowed


def window_oracle(q, k, v, allowed, dtype=torch.float64):
    """Softmax attention over the ``allowed`` pairs in ``dtype`` (differentiable); a query with
    no allowed key gets zeros."""
    Hq, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    qf = q.to(dtype)
    kf = k.to(dtype).repeat_interleave(Hq // Hkv, dim=2)
    vf_ = v.to(dtype).repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bthd,bshd->bhts", qf, kf) * D**-0.5
    has = allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed, -INF).masked_fill(~has, 0.0)
    p = torch.softmax(s, dim=-1) * has
    return torch.einsum("bhts,bshd->bthd", p, vf_).to(q.dtype)


WINDOW_BACKENDS = [*_cpu_backends("attention"), "auto"]
# Triton runs a subset here (each interpreted case costs the interpret tier, which CI runs on 2
# cores): padding with left-only, asymmetric GQA T < S, causal with a right bound, several
# blocks skipped; tests/test_attention_triton.py covers the kernels' windows in every dtype.
TRITON_WINDOW_CASES = ("left-only-pad", "asym-T<S-gqa4-pad", "causal-right-ignored-pad",
                       "blocks-asym-pad")  # fmt: skip
# (T, S, hq, hkv, masked, causal, window_size): odd lengths (not multiples of any block), T != S
# both ways, GQA, right key padding (entry 0 keeps one real key: most of its windows hold only
# padding), causal combined; the last two span several Triton blocks (32 x 64 under the
# interpreter), so that whole blocks outside the window are skipped and both edges are masked.
WINDOW_CASES = [
    pytest.param(37, 37, 4, 2, False, False, (0, 0), id="diagonal-only"),
    pytest.param(37, 37, 4, 2, True, False, (5, -1), id="left-only-pad"),
    pytest.param(37, 37, 4, 4, False, False, (-1, 3), id="right-only"),
    pytest.param(29, 45, 4, 1, True, False, (2, 7), id="asym-T<S-gqa4-pad"),
    pytest.param(45, 29, 4, 2, True, True, (6, -1), id="causal-left-T>S-pad"),
    pytest.param(37, 53, 4, 2, True, True, (3, 5), id="causal-right-ignored-pad"),
    pytest.param(21, 33, 2, 1, True, False, (100, 100), id="wider-than-seq-pad"),
    pytest.param(40, 37, 4, 2, False, True, (0, -1), id="causal-diag-T>S"),
    pytest.param(70, 150, 4, 2, True, False, (9, 4), id="blocks-asym-pad"),
    pytest.param(150, 70, 2, 1, False, True, (20, -1), id="blocks-causal-left"),
]


def _window_param_sets():
    for case in WINDOW_CASES:
        for backend in WINDOW_BACKENDS:
            yield pytest.param(backend, *case.values, id=f"{case.id}-{backend}")
        if case.id in TRITON_WINDOW_CASES:
            yield pytest.param("triton", *case.values, id=f"{case.id}-triton",
                               marks=pytest.mark.interpret)  # fmt: skip


@pytest.mark.parametrize("backend, T, S, hq, hkv, masked, causal, window", _window_param_sets())
def test_window_matches_float64_oracle(backend, T, S, hq, hkv, masked, causal, window):
    """Values and gradients of q, k, v equal the float64 pair-by-pair window oracle (every
    buffer torch allocates for the call poisoned with NaN)."""
    seed = T + 7 * S + 31 * window[0] + 131 * window[1] + 1000 * causal
    q, k, v = _qkv(2, T, S, hq, hkv, 32, seed=seed)
    mask = _padding(2, S, seed, all_but_one=True) if masked else None
    allowed = window_pairs(T, S, mask, causal, window, B=2)
    with poisoned_allocations() as made:
        out = vf.attention(
            q, k, v, key_padding_mask=mask, causal=causal, window_size=window, backend=backend
        )
        grads = _grads(out, (q, k, v), seed)
    if backend == "triton":
        assert made, "poisoning reached no allocation"
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    exact = window_oracle(q64, k64, v64, allowed)
    eager = window_oracle(q, k, v, allowed, torch.float32)
    assert_close_2x(out, eager, exact, torch.float32, "out")
    no_key = ~allowed.any(-1).transpose(1, 2)  # [B, T, 1]
    if no_key.any():  # the rule: a query whose window holds no real key gets zeros
        assert torch.equal(out * no_key[..., None], torch.zeros_like(out))
    for got, ea, ex, name in zip(
        grads, _grads(eager, (q, k, v), seed), _grads(exact, (q64, k64, v64), seed), "qkv"
    ):
        assert_close_2x(got, ea, ex, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", _cpu_backends("attention"))
@pytest.mark.parametrize("causal", [False, True])
def test_window_with_scattered_padding(backend, causal):
    """Padding anywhere (not only at the end) inside and around the windows; float64 inputs."""
    g = torch.Generator().manual_seed(41 + causal)
    q, k, v = (torch.randn(2, n, h, 16, generator=g, dtype=torch.float64).requires_grad_(True)
               for n, h in ((19, 4), (23, 2), (23, 2)))
    mask = torch.rand(2, 23, generator=g) < 0.5
    window = (4, 2)
    out = vf.attention(q, k, v, key_padding_mask=mask, causal=causal, window_size=window,
                       backend=backend)
    want = window_oracle(q, k, v, window_pairs(19, 23, mask, causal, window))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for got, ref in zip(_grads(out, (q, k, v), 3), _grads(want, (q, k, v), 3)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


VARLEN_WINDOWS = [(False, (3, 1)), (True, (5, -1)), (False, (-1, 0)), (False, (0, 0))]


@pytest.mark.parametrize(
    "backend, causal, window",
    [(b, c, w) for b in (*_cpu_backends("attention_varlen"), "auto") for c, w in VARLEN_WINDOWS]
    + [pytest.param("triton", c, w, marks=pytest.mark.interpret) for c, w in VARLEN_WINDOWS[:2]],
)
def test_window_varlen_matches_float64_oracle(backend, causal, window):
    """Each packed sequence gets the window aligned to its own lengths (a single query, a
    single key, a sequence with no key, one with no query, T > S and T < S), values and
    gradients against the float64 oracle run sequence by sequence."""
    lq, lk = [1, 37, 5, 0, 20, 70], [1, 40, 101, 3, 0, 66]
    g = torch.Generator().manual_seed(5 + causal + 3 * window[0])
    q = torch.randn(sum(lq), 4, 32, generator=g).requires_grad_(True)
    k = torch.randn(sum(lk), 2, 32, generator=g).requires_grad_(True)
    v = torch.randn(sum(lk), 2, 32, generator=g).requires_grad_(True)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)
    cq, ck = cu(lq), cu(lk)
    with poisoned_allocations():
        out = vf.attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal,
                                  window_size=window, backend=backend)
        grads = _grads(out, (q, k, v), 9)

    def oracle(q, k, v, dtype):
        parts = []
        for b in range(len(lq)):
            qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            allowed = window_pairs(lq[b], lk[b], None, causal, window)
            parts.append(window_oracle(q[None, qs], k[None, ks], v[None, ks], allowed, dtype)[0])
        return torch.cat(parts)

    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    exact, eager = oracle(q64, k64, v64, torch.float64), oracle(q, k, v, torch.float32)
    assert_close_2x(out, eager, exact, torch.float32, "out")
    for got, ea, ex, name in zip(
        grads, _grads(eager, (q, k, v), 9), _grads(exact, (q64, k64, v64), 9), "qkv"
    ):
        assert_close_2x(got, ea, ex, torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", RULE_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_window_nan_rule(backend, causal):
    """The NaN rule inside windows: a query whose window keys all score -inf gets NaN (plain
    softmax 0 / 0), not zeros; a NaN value reaches the queries whose window holds it (and may
    reach the hidden queries of its batch entry, as documented); others are untouched."""
    T, S, window = 9, 11, (1, 1)
    q, k, v, mask = _rule_inputs(43 + causal, T, S, 4, 2, True)
    q[1, :, :, 7] = q[1, :, :, 7].abs() + 0.5
    k[1, 3:6, :, 7] = -INF  # keys 3..5 of entry 1 (real: entry 1 keeps 6 keys)
    v[0, 8, 1, 2] = NAN  # a real key of entry 0, KV head 1
    got = vf.attention(q, k, v, key_padding_mask=mask, causal=causal, window_size=window,
                       backend=backend)
    allowed = window_pairs(T, S, mask, causal, window)
    want = plain_window_attention(q, k, v, allowed)
    assert not torch.isfinite(want[1, 4 - (S - T)]).any(), "the all -inf window row"
    hidden = torch.zeros(2, T, 4, dtype=torch.bool)
    hidden[0, :, 2:] = True  # entry 0, the query heads of KV head 1
    _check_rule(got, want, hidden)


def plain_window_attention(q, k, v, allowed):
    """:func:`plain_attention` (the pair-by-pair NaN oracle) over the given allowed pairs."""
    B, T, Hq, D = q.shape
    g = Hq // k.shape[2]
    qf = q.detach().double()
    kf = k.detach().double().repeat_interleave(g, dim=2)
    vf_ = v.detach().double().repeat_interleave(g, dim=2)
    s = torch.einsum("bthd,bshd->bhts", qf, kf) * D**-0.5
    p = torch.softmax(s.masked_fill(~allowed, -INF), dim=-1)
    terms = p[..., None] * vf_.permute(0, 2, 1, 3)[:, :, None]
    out = torch.where(allowed[..., None], terms, 0.0).sum(dim=3)
    out = torch.where(allowed.any(-1, keepdim=True), out, 0.0)
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    "window, match",
    [
        ((1,), "window_size: expected a \\(left, right\\) tuple or list"),
        ([1, 2, 3], "window_size: expected a \\(left, right\\)"),
        (3, "window_size: expected a \\(left, right\\)"),
        (None, "window_size: expected a \\(left, right\\)"),
        ("ab", "window_size: expected a \\(left, right\\)"),
        ((True, 0), "window_size: expected ints >= -1 .*True as the left bound"),
        ((0, np.bool_(False)), "window_size: expected ints >= -1 .*as the right bound"),
        ((-2, 0), "window_size: expected ints >= -1 .*-2 as the left bound"),
        ((0, -5), "window_size: expected ints >= -1 .*-5 as the right bound"),
        ((1.0, 2), "window_size: expected ints >= -1 .*1.0 as the left bound"),
        ((torch.tensor(1), 2), "window_size: expected ints >= -1"),
    ],
)
def test_window_size_bad_values(window, match):
    q = torch.randn(1, 4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        vf.attention(q, q, q, window_size=window)
    with pytest.raises(ValueError, match=match):
        vf.attention_varlen(q[0], q[0], q[0], cu, cu, 4, 4, window_size=window)
    with pytest.raises(ValueError, match=match):
        vf.attention(q, q, q, window_size=window, backend="reference")


def test_window_size_accepted_forms():
    """Lists, numpy integers and the unbounded default; the inputs carry the plain pair and
    the effective window (causal folded in, None when nothing beyond causal is hidden)."""
    q = torch.randn(1, 4, 2, 8)
    x = attention_inputs(q, q, q, window_size=[np.int64(2), np.int32(-1)])
    assert x.window_size == (2, -1) and all(type(w) is int for w in x.window_size)
    assert x.window == (2, -1)
    assert attention_inputs(q, q, q).window is None
    assert attention_inputs(q, q, q, causal=True, window_size=(-1, 4)).window is None
    assert attention_inputs(q, q, q, causal=True, window_size=(3, 4)).window == (3, 0)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    y = varlen_inputs(q[0], q[0], q[0], cu, cu, 4, 4, window_size=(0, 0))
    assert y.window_size == (0, 0) and y.window == (0, 0)
    same = vf.attention(q, q, q, window_size=(-1, -1), backend="reference")
    assert torch.equal(same, vf.attention(q, q, q, backend="reference"))


def test_window_refused_by_peers_with_a_reason(monkeypatch):
    """The peers serve a window only where it is exact, and refuse with a reason naming
    window_size otherwise, never ignore it: xformers always; flash_attn with key padding (the
    window would follow packed positions) or without window_size (flash-attn < 2.3). A fake
    flash_attn module stands in for the CUDA library here."""
    import types

    from vljepa_fast.ops import attention_peers as peers

    def reasons(r):
        return r.reasons if isinstance(r, _backends.Refusal) else ()

    q = torch.randn(1, 4, 2, 8, dtype=torch.float16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    dense = attention_inputs(q, q, q, window_size=(2, 2))
    padded = attention_inputs(
        q, q, q, key_padding_mask=torch.ones(1, 4, dtype=torch.bool), window_size=(2, 2)
    )
    packed = varlen_inputs(q[0], q[0], q[0], cu, cu, 4, 4, window_size=(2, -1))
    for x in (dense, padded):
        assert any("window_size" in w for w in reasons(peers.xformers_supports(x)))
    assert any("window_size" in w for w in reasons(peers.xformers_varlen_supports(packed)))
    # nothing but the window is refused on these inputs by the xformers record
    assert reasons(peers.xformers_supports(attention_inputs(q, q, q))) == ()

    def with_window(q, k, v, *args, window_size=(-1, -1), **kw):
        raise AssertionError("not called")

    def without_window(q, k, v, *args, causal=False, **kw):
        raise AssertionError("not called")

    monkeypatch.setattr(peers, "_import_reasons", lambda module: [])
    for fn, refused in ((with_window, False), (without_window, True)):
        fake = types.ModuleType("flash_attn")
        fake.flash_attn_func = fake.flash_attn_varlen_func = fn
        fake.__version__ = "2.x-test"
        monkeypatch.setitem(sys.modules, "flash_attn", fake)
        peers._flash_window_reasons.cache_clear()
        try:
            for supports, x in (
                (peers.flash_attn_supports, dense),
                (peers.flash_attn_varlen_supports, packed),
            ):
                got = [w for w in reasons(supports(x)) if "window_size" in w]
                assert bool(got) == refused, (fn.__name__, got)
            padded_why = reasons(peers.flash_attn_supports(padded))
            assert any("window_size with key_padding_mask" in w for w in padded_why)
        finally:
            peers._flash_window_reasons.cache_clear()
    assert peers._flash_window(dense) == {"window_size": (2, 2)}
    causal = attention_inputs(q, q, q, causal=True, window_size=(3, 5))
    assert peers._flash_window(causal) == {"window_size": (3, 0)}
    assert peers._flash_window(attention_inputs(q, q, q, causal=True)) == {}
