"""cpu tier: the eager reference (the spec) against naive float64 loops written from the math."""

from __future__ import annotations

import math

import pytest
import torch

from vljepa_fast import reference


def naive_attention(q, k, v, mask=None, causal=False, scale=None):
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(T):
                keys = [
                    j
                    for j in range(S)
                    if (mask is None or mask[b, j]) and (not causal or j <= i + S - T)
                ]
                if not keys:
                    continue
                s = torch.stack([q[b, i, h].double() @ k[b, j, kh].double() * scale for j in keys])
                p = torch.softmax(s, 0)
                out[b, i, h] = sum(p[n] * v[b, j, kh].double() for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1), (4, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_naive(hq, hkv, causal, masked):
    g = torch.Generator().manual_seed(hq * 10 + hkv + 100 * causal + 1000 * masked)
    B, T, S, D = 2, 5, 7, 8
    q = torch.randn(B, T, hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, hkv, D, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(B, S, generator=g) > 0.4
        mask[1] = False  # a batch entry with no real key: zeros by definition
        mask[1, 6] = True if causal else False
    got = reference.attention(q, k, v, key_padding_mask=mask, causal=causal, scale=0.3)
    torch.testing.assert_close(got, naive_attention(q, k, v, mask, causal, 0.3))


def test_attention_low_precision_keeps_dtype():
    q = torch.randn(1, 3, 2, 4, dtype=torch.bfloat16)
    k = torch.randn(1, 5, 1, 4, dtype=torch.bfloat16)
    out = reference.attention(q, k, k)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), naive_attention(q, k, k), atol=2e-2, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_varlen_matches_naive(causal):
    g = torch.Generator().manual_seed(7 + causal)
    lq, lk = [3, 1, 0, 4], [2, 5, 3, 4]
    hq, hkv, D = 4, 2, 8
    q = torch.randn(sum(lq), hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lk), hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lk), hkv, D, generator=g, dtype=torch.float64)
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    got = reference.attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal)
    for b in range(len(lq)):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lq[b]:
            want = naive_attention(q[None, qs], k[None, ks], v[None, ks], causal=causal)[0]
            torch.testing.assert_close(got[qs], want)


def naive_infonce(p, t, tau, symmetric, normalize):
    p, t = p.double(), t.double()
    if normalize:
        p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = p.shape[0]
    losses = []
    for i in range(n):
        row = [float(p[i] @ t[j]) / tau for j in range(n)]
        col = [float(p[j] @ t[i]) / tau for j in range(n)]
        lr = math.log(sum(math.exp(x - max(row)) for x in row)) + max(row) - row[i]
        lc = math.log(sum(math.exp(x - max(col)) for x in col)) + max(col) - col[i]
        losses.append(0.5 * (lr + lc) if symmetric else lr)
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infonce_matches_naive(symmetric, normalize, reduction):
    g = torch.Generator().manual_seed(3 + symmetric + 2 * normalize)
    p = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    got = reference.infonce_loss(
        p, t, temperature=0.3, symmetric=symmetric, normalize=normalize, reduction=reduction
    )
    per = naive_infonce(p, t, 0.3, symmetric, normalize)
    want = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(got, want)


def test_infonce_tensor_temperature_gradient():
    g = torch.Generator().manual_seed(11)
    p = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda tau: reference.infonce_loss(p, t, temperature=tau), (tau,)
    )
    loss = reference.infonce_loss(p, t, temperature=tau)
    torch.testing.assert_close(loss, naive_infonce(p, t, 0.2, True, True).mean())


def test_infonce_zero_row_and_large_logits_finite():
    p = torch.randn(4, 3, dtype=torch.float64) * 1e3
    t = p.clone()
    p[2] = 0
    loss = reference.infonce_loss(p, t, temperature=0.01, normalize=False)
    assert torch.isfinite(loss)
    loss_n = reference.infonce_loss(p, t, temperature=0.01)
    assert torch.isfinite(loss_n)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_topk_matches_naive(metric):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b = torch.randn(9, 6, generator=g, dtype=torch.float64)
    b[3] = 0
    scores, idx = reference.topk_similarity(q, b, 4, metric=metric)
    for r in range(4):
        sims = []
        for j in range(9):
            s = float(q[r] @ b[j])
            if metric == "cosine":
                s = s / max(q[r].norm().item() * 1, 1e-12) / max(b[j].norm().item(), 1e-12)
            sims.append((s, j))
        sims.sort(reverse=True)
        torch.testing.assert_close(
            scores[r], torch.tensor([s for s, _ in sims[:4]], dtype=torch.float64)
        )
        assert idx[r].tolist() == [j for _, j in sims[:4]]
    assert not torch.isnan(scores).any()
