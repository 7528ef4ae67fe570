"""vf.attention(..., mask_queries=True): the key padding mask marks the padded queries too.

Every backend that runs here (reference, sdpa, auto on CPU; Triton through its interpreter) must
give the float64 reference computed without mask_queries with the padded query rows zeroed
afterwards (written here, not the library's path): values, and the gradients of q, k and v (a
padded query passes none: its dq row is exactly zero, and it adds nothing to dk, dv). Padded
query rows hold NaN where only values are checked (they are zeros whatever q holds). Arguments
mask_queries cannot serve are refused naming it; nn.PredictorAttention takes it in forward; the
VL-JEPA predictor passes it and its outputs and gradients are those of the model without it.
"""

from __future__ import annotations

import sys
import types
from typing import NamedTuple

import pytest
import torch

import vljepa_fast as vf
import vljepa_fast.models as M
from tests._util import assert_close_2x, poisoned_allocations
from vljepa_fast import functional, reference
from vljepa_fast.ops import attention as ops

BACKENDS = ["reference", "sdpa", "auto", pytest.param("triton", marks=pytest.mark.interpret)]


def _inputs(B, L, hq, hkv, D, lengths, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, L, h, D, generator=g).to(dtype).requires_grad_(True)  # noqa: E731
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return mk(hq), mk(hkv), mk(hkv), mask


def _zeroed(out, mask):
    """The rule written out: the padded query rows of ``out`` replaced by zeros."""
    return torch.where(mask[:, :, None, None], out, torch.zeros((), dtype=out.dtype))


def _grads(out, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g).to(out.dtype)
    return torch.autograd.grad(out, leaves, do)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "hq, hkv, lengths",
    [(4, 4, [37, 20, 1]), (8, 2, [37, 0, 33]), (8, 1, [5, 37, 36])],
    ids=["mha", "gqa4-empty-entry", "mqa"],
)
@pytest.mark.parametrize("causal", [False, True])
def test_mask_queries_is_the_reference_with_padded_rows_zeroed(backend, hq, hkv, lengths, causal):
    """Values and every gradient against float64 (2x the fp32 eager error plus a floor);
    every buffer torch allocates for the call poisoned with NaN; dq of a padded query is 0."""
    L, D, seed = 37, 32, hq + 10 * hkv + 100 * causal + lengths[0]
    q, k, v, mask = _inputs(len(lengths), L, hq, hkv, D, lengths, seed)
    with poisoned_allocations() as made:
        out = vf.attention(
            q, k, v, key_padding_mask=mask, causal=causal, mask_queries=True, backend=backend
        )
        grads = _grads(out, (q, k, v), seed)
    if backend == "triton":
        assert made, "poisoning reached no allocation"
    x64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    kw = dict(key_padding_mask=mask, causal=causal)
    exact = _zeroed(reference.attention(*x64, **kw), mask)
    eager = _zeroed(reference.attention(q, k, v, **kw), mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_2x(out, eager, exact, torch.float32, "out")
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask])), "a padded query row not zero"
    for got, ea, ex, name in zip(
        grads, _grads(eager, (q, k, v), seed), _grads(exact, x64, seed), "qkv"
    ):
        assert_close_2x(got, ea, ex, torch.float32, f"d{name}")
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask])), "dq of a padded row"


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_queries_are_zero_whatever_they_hold(backend):
    """A NaN or Inf in a padded query row (or padded key) reaches no output; the real rows are
    those of the same call with finite padding; a window on top keeps the rule."""
    q, k, v, mask = _inputs(2, 21, 4, 2, 32, [21, 9], seed=5)
    q, k, v = (t.detach() for t in (q, k, v))
    clean = vf.attention(q, k, v, key_padding_mask=mask, mask_queries=True, backend="reference")
    bad_q, bad_k = q.clone(), k.clone()
    bad_q[1, 9:] = float("nan")
    bad_q[1, 12, 0, 3] = float("inf")
    bad_k[1, 9:] = float("nan")
    for window in ((-1, -1), (3, 2)):
        kw = dict(key_padding_mask=mask, mask_queries=True, window_size=window)
        out = vf.attention(bad_q, bad_k, v, backend=backend, **kw)
        want = vf.attention(q, k, v, backend="reference", **kw)
        assert torch.isfinite(out).all()
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        vf.attention(bad_q, bad_k, v, key_padding_mask=mask, mask_queries=True, backend=backend),
        clean,
        rtol=1e-5,
        atol=1e-6,
    )


def test_float64_and_default_off():
    """float64 (reference and sdpa) equals the reference zeroed exactly enough; without
    mask_queries a padded query still attends to the real keys (the default is unchanged)."""
    q, k, v, mask = _inputs(2, 11, 4, 2, 16, [11, 4], seed=3, dtype=torch.float64)
    full = reference.attention(q, k, v, key_padding_mask=mask)
    for backend in ("reference", "sdpa"):
        got = vf.attention(q, k, v, key_padding_mask=mask, mask_queries=True, backend=backend)
        torch.testing.assert_close(got, _zeroed(full, mask), rtol=1e-12, atol=1e-12)
        off = vf.attention(q, k, v, key_padding_mask=mask, backend=backend)
        torch.testing.assert_close(off, full, rtol=1e-12, atol=1e-12)
        assert off[~mask].abs().sum() > 0


@pytest.mark.parametrize(
    "shapes, kw, match",
    [
        ((5, 5), dict(mask_queries=True), "mask_queries: True needs key_padding_mask"),
        ((5, 7), dict(mask_queries=True, key_padding_mask="mask"), "mask_queries: True needs as "
         "many queries as keys \\(T == S.*got T=5, S=7"),
        ((5, 5), dict(mask_queries=1, key_padding_mask="mask"), "mask_queries: expected a bool"),
        ((5, 5), dict(mask_queries=None), "mask_queries: expected a bool"),
    ],
)  # fmt: skip
def test_bad_mask_queries_is_refused_naming_it(shapes, kw, match):
    T, S = shapes
    q = torch.randn(2, T, 4, 16)
    k = torch.randn(2, S, 2, 16)
    if kw.get("key_padding_mask") == "mask":
        kw = dict(kw, key_padding_mask=torch.ones(2, S, dtype=torch.bool))
    for fn in (vf.attention, ops.attention_inputs):
        with pytest.raises(ValueError, match=match):
            fn(q, k, k, **kw)
    if kw.get("mask_queries") is True:  # the reference refuses the same (it is public)
        with pytest.raises(ValueError, match="mask_queries: True needs"):
            reference.attention(q, k, k, **kw)


def test_inputs_carry_mask_queries():
    q = torch.randn(2, 5, 4, 16)
    mask = torch.arange(5)[None] < torch.tensor([5, 2])[:, None]
    x = ops.attention_inputs(q, q[..., :2, :], q[..., :2, :], key_padding_mask=mask,
                             mask_queries=True)  # fmt: skip
    assert x.mask_queries is True and x.real_queries is mask
    y = ops.attention_inputs(q, q, q, key_padding_mask=mask)
    assert y.mask_queries is False and y.real_queries is None


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_predictor_attention_mask_queries(backend):
    """nn.PredictorAttention.forward(..., mask_queries=True): PAD rows are o_proj(0) = 0, the
    real rows equal the call without it, and PAD rows pass no gradient to the hidden states."""
    torch.manual_seed(0)
    attn = vf.nn.PredictorAttention(64, 8, 2, 8, backend={"attention": backend})
    hidden = torch.randn(2, 13, 64, requires_grad=True)
    mask = torch.arange(13)[None] < torch.tensor([13, 6])[:, None]
    on = attn(hidden, mask, mask_queries=True)
    off = attn(hidden, mask)
    assert torch.equal(on[~mask], torch.zeros_like(on[~mask]))
    torch.testing.assert_close(on[mask], off[mask], rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad((on * mask[..., None]).sum(), hidden)
    (want,) = torch.autograd.grad((off * mask[..., None]).sum(), hidden)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mask_queries: True needs key_padding_mask"):
        attn(hidden, None, mask_queries=True)


def _without_mask_queries(monkeypatch):
    real = functional.attention

    def attention(*args, mask_queries=False, **kw):
        calls.append(mask_queries)
        return real(*args, mask_queries=False, **kw)

    calls: list[bool] = []
    monkeypatch.setattr(functional, "attention", attention)
    return calls


def test_predictor_passes_mask_queries_and_its_outputs_do_not_change(monkeypatch):
    """The VL-JEPA predictor's layers call attention with mask_queries=True; its pooled output
    and every parameter gradient equal those of the same model computing the PAD queries
    (float64, so that the comparison is tight)."""
    torch.manual_seed(0)
    cfg = M.VLJEPAConfig.tiny().predictor
    pred = M.Predictor(cfg, 24, 16, backend={"attention": "reference"}).double()
    g = torch.Generator().manual_seed(1)
    visual = torch.randn(3, 5, 24, generator=g, dtype=torch.float64)
    ids = torch.randint(1, cfg.vocab_size, (3, 7), generator=g)
    query_mask = torch.arange(7)[None] < torch.tensor([7, 3, 1])[:, None]
    ids = ids.masked_fill(~query_mask, cfg.pad_id)

    def run():
        pred.zero_grad()
        out = pred(visual, ids, query_mask)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in pred.named_parameters()}

    with monkeypatch.context() as m:
        seen = []
        real = functional.attention
        m.setattr(functional, "attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
        out_on, grads_on = run()
    assert seen and all(kw["mask_queries"] is True for kw in seen), seen
    with monkeypatch.context() as m:
        calls = _without_mask_queries(m)
        out_off, grads_off = run()
    assert calls == [True] * cfg.layers
    torch.testing.assert_close(out_on, out_off, rtol=1e-12, atol=1e-12)
    for name, grad in grads_on.items():
        torch.testing.assert_close(grad, grads_off[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.interpret
def test_triton_hands_seqlens_q_and_deterministic_to_the_launchers(monkeypatch):
    """Once the launchers take them, the Triton record passes seqlens_q = the key lengths
    (mask_queries) and deterministic = torch.are_deterministic_algorithms_enabled() (stand-in
    launchers that record the keywords and compute the rule with the real ones)."""
    from vljepa_fast._kernels import attention as kernel

    seen: dict[str, list] = {"fwd": [], "bwd": []}
    real_fwd, real_bwd = kernel.attention_forward, kernel.attention_backward

    def rows(t, seqlens_q):
        return torch.arange(t.shape[1])[None, :] < seqlens_q[:, None]

    def fwd(q, k, v, *, seqlens_q=None, **kw):
        seen["fwd"].append(seqlens_q)
        out, lse = real_fwd(q, k, v, **kw)
        if seqlens_q is not None:
            out = out.masked_fill(~rows(q, seqlens_q)[..., None, None], 0.0)
        return out, lse

    def bwd(do, q, k, v, out, lse, *, seqlens_q=None, deterministic=None, **kw):
        seen["bwd"].append((seqlens_q, deterministic))
        if seqlens_q is not None:
            do = do.masked_fill(~rows(q, seqlens_q)[..., None, None], 0.0)
        return real_bwd(do, q, k, v, out, lse, **kw)

    monkeypatch.setattr(kernel, "attention_forward", fwd)
    monkeypatch.setattr(kernel, "attention_backward", bwd)
    q, k, v, mask = _inputs(2, 19, 4, 2, 32, [19, 7], seed=9)
    want = vf.attention(q, k, v, key_padding_mask=mask, mask_queries=True, backend="reference")
    for deterministic in (False, True):
        with monkeypatch.context() as m:
            m.setattr(torch, "are_deterministic_algorithms_enabled", lambda d=deterministic: d)
            out = vf.attention(q, k, v, key_padding_mask=mask, mask_queries=True, backend="triton")
            out.sum().backward()
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        assert seen["fwd"][-1].tolist() == [19, 7] and seen["fwd"][-1].dtype == torch.int32
        lengths, det = seen["bwd"][-1]
        assert lengths.tolist() == [19, 7] and det is deterministic
    vf.attention(q, k, v, key_padding_mask=mask, backend="triton").sum().backward()
    assert seen["fwd"][-1] is None and seen["bwd"][-1][0] is None  # no mask_queries: none


# ------------------------------------------------------------------ peers (fake libraries)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _fake_flash(calls, returns_lse):
    """A flash-attn module whose varlen function is the reference (and records its call)."""

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, softmax_scale=None, causal=False, **kw):
        calls.append(dict(q=q, k=k, cu_q=cu_q.tolist(), cu_k=cu_k.tolist(), max_q=max_q))
        out = reference.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                         scale=softmax_scale)  # fmt: skip
        return (out, None) if returns_lse else out

    def dense(*args, **kw):
        raise AssertionError("the dense function is not called with a key padding mask")

    return types.SimpleNamespace(flash_attn_varlen_func=varlen, flash_attn_func=dense)


def _fake_xformers(calls):
    """xformers.ops with fmha.memory_efficient_attention as the reference over the blocks of
    a BlockDiagonalMask (K/V broadcast over the groups, as the record passes them)."""

    class BlockDiagonalMask(NamedTuple):
        q_seqlen: list
        kv_seqlen: list

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen):
            return cls(list(q_seqlen), list(kv_seqlen))

    def memory_efficient_attention(q5, k5, v5, attn_bias=None, scale=None):
        calls.append(dict(q=q5, bias=attn_bias))
        _, N, Hkv, g, D = q5.shape
        q = q5.reshape(N, Hkv * g, D)
        k, v = k5[0, :, :, 0], v5[0, :, :, 0]
        lq, lk = attn_bias.q_seqlen, attn_bias.kv_seqlen
        out = reference.attention_varlen(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), scale=scale)
        return out.reshape(q5.shape)

    attn_bias = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask)
    fmha = types.SimpleNamespace(attn_bias=attn_bias,
                                 memory_efficient_attention=memory_efficient_attention)  # fmt: skip
    return types.SimpleNamespace(fmha=fmha)


@pytest.mark.parametrize("peer", ["flash_attn", "fa3", "xformers"])
def test_peers_unpad_the_queries_too(peer, monkeypatch):
    """flash_attn (flash-attn 2, or FlashAttention-3 where it serves) and xformers get only the
    real queries with mask_queries (their cost follows real tokens); the packed output goes
    back to [B, T, Hq, D] with zero padded rows, and gradients are the reference's."""
    from vljepa_fast.ops import attention_peers as peers

    lengths = [8, 4, 7]
    q, k, v, mask = _inputs(3, 9, 4, 2, 16, lengths, seed=11)
    calls: list[dict] = []
    if peer == "xformers":
        monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
        monkeypatch.setitem(sys.modules, "xformers.ops", _fake_xformers(calls))
        run = peers._xformers
    else:
        fa3 = peer == "fa3"
        monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash([], False))
        monkeypatch.setitem(sys.modules, peers.FA3, _fake_flash([], True))
        sys.modules[peers.FA3 if fa3 else "flash_attn"] = _fake_flash(calls, fa3)
        monkeypatch.setattr(peers, "fa3_serves", lambda x: [] if fa3 else ["not here"])
        run = peers._flash
    for mask_queries in (True, False):
        x = ops.attention_inputs(q, k, v, key_padding_mask=mask, mask_queries=mask_queries)
        out = run(x, x.key_counts())
        call = calls[-1]
        rows = call["q"].reshape(-1, 4, 16).shape[0]
        assert rows == (sum(lengths) if mask_queries else 27)
        if peer != "xformers":
            assert call["cu_q"] == (_cu(lengths).tolist() if mask_queries else [0, 9, 18, 27])
            assert call["max_q"] == (8 if mask_queries else 9)
        else:
            assert call["bias"].q_seqlen == (lengths if mask_queries else [9] * 3)
        want = reference.attention(q, k, v, key_padding_mask=mask)
        if mask_queries:
            want = _zeroed(want, mask)
            assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        got_grads = _grads(out, (q, k, v), 4)
        for got, ref, name in zip(got_grads, _grads(want, (q, k, v), 4), "qkv"):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"d{name}")


def test_peer_supports_with_mask_queries():
    """A batch entry with no real token has no query either under mask_queries: flash-attn
    takes the empty sequence, xformers refuses it (BlockDiagonalMask takes no empty block);
    causal with key padding stays refused."""
    from vljepa_fast import _backends
    from vljepa_fast.ops import attention_peers as peers

    def reasons(answer):
        return list(answer.reasons) if isinstance(answer, _backends.Refusal) else []

    q = torch.randn(2, 6, 4, 64, dtype=torch.float16)
    k = torch.randn(2, 6, 2, 64, dtype=torch.float16)
    empty = torch.arange(6)[None] < torch.tensor([6, 0])[:, None]
    x = ops.attention_inputs(q, k, k, key_padding_mask=empty, mask_queries=True)
    assert reasons(peers.flash_attn_supports(x)) == []
    assert any("no real token" in r for r in reasons(peers.xformers_supports(x)))
    off = ops.attention_inputs(q, k, k, key_padding_mask=empty)
    assert any("no key" in r for r in reasons(peers.flash_attn_supports(off)))
    causal = ops.attention_inputs(q, k, k, key_padding_mask=empty, mask_queries=True, causal=True)
    assert any("causal" in r for r in reasons(peers.flash_attn_supports(causal)))


def test_fa3_limits():
    """FlashAttention-3 serves Hopper, 16-bit, head dims that are multiples of 8 up to 256."""
    from vljepa_fast.ops import attention_peers as peers

    assert peers.fa3_limits((9, 0), torch.bfloat16, 64) == []
    assert peers.fa3_limits((9, 0), torch.float16, 256) == []
    assert any("Hopper" in r for r in peers.fa3_limits((8, 0), torch.bfloat16, 64))
    assert any("float32" in r for r in peers.fa3_limits((9, 0), torch.float32, 64))
    assert any("got 36" in r for r in peers.fa3_limits((9, 0), torch.bfloat16, 36))
    assert any("got 320" in r for r in peers.fa3_limits((9, 0), torch.bfloat16, 320))
    q = torch.randn(1, 4, 2, 64, dtype=torch.bfloat16)
    assert peers.fa3_serves(ops.attention_inputs(q, q, q))  # here: not installed, or CPU


def test_mask_queries_compiles_fullgraph():
    """nn.PredictorAttention with mask_queries traces as one graph (the zeroing is an
    elementwise masked_fill, the auto rule reads no tensor) and matches eager, backward too."""
    torch._dynamo.reset()
    m = vf.nn.PredictorAttention(64, 4, 2, 16)
    mask = torch.arange(13)[None] < torch.tensor([13, 6])[:, None]
    x = torch.randn(2, 13, 64)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    results = []
    for module in (compiled, m):
        xg = x.clone().requires_grad_()
        out = module(xg, mask, mask_queries=True)
        out.square().sum().backward()
        results.append((out.detach(), xg.grad, m.q_proj.weight.grad.clone()))
        m.zero_grad()
    assert torch.equal(results[0][0][~mask], torch.zeros_like(results[0][0][~mask]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
