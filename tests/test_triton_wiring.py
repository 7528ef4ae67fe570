"""interpret tier: the public ops with backend="triton" on CPU tensors through Triton's
interpreter, so the custom ops, fake functions and autograd wiring over the kernels are checked
end to end against the float64 reference (the kernels' own tests cover their corner cases)."""

from __future__ import annotations

import pytest
import torch

import vljepa_fast as vf
from tests._util import assert_close_2x, check_topk
from vljepa_fast import reference

pytestmark = pytest.mark.interpret


def _grads(out, inputs):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return torch.autograd.grad((out * w).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_triton_through_public_api(dtype, masked):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 37, 4, 32, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(2, 45, 2, 32, generator=g).to(dtype).requires_grad_(True)
    v = torch.randn(2, 45, 2, 32, generator=g).to(dtype).requires_grad_(True)
    mask = torch.arange(45)[None] < torch.tensor([[45], [7]]) if masked else None
    out = vf.attention(q, k, v, key_padding_mask=mask, backend="triton")
    x64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    exact = reference.attention(*x64, key_padding_mask=mask)
    eager = reference.attention(q, k, v, key_padding_mask=mask)
    assert_close_2x(out, eager, exact, dtype, "out")
    for got, ea, ex, n in zip(
        _grads(out, (q, k, v)), _grads(eager, (q, k, v)), _grads(exact, x64), "qkv"
    ):
        assert_close_2x(got, ea, ex, dtype, f"d{n}")


def test_attention_triton_refuses_left_padding():
    q = torch.randn(1, 4, 2, 32)
    mask = torch.tensor([[False, True, True, True]])
    with pytest.raises(vf.BackendUnavailableError, match="not right padding"):
        vf.attention(q, q, q, key_padding_mask=mask, backend="triton")


def test_attention_varlen_triton_through_public_api():
    g = torch.Generator().manual_seed(4)
    lq = [1, 20, 9]
    cu = torch.tensor([0, 1, 21, 30], dtype=torch.int32)
    q = torch.randn(30, 4, 32, generator=g).requires_grad_(True)
    k = torch.randn(30, 1, 32, generator=g).requires_grad_(True)
    out = vf.attention_varlen(q, k, k, cu, cu, max(lq), max(lq), causal=True, backend="triton")
    x64 = [t.detach().double().requires_grad_(True) for t in (q, k)]
    exact = reference.attention_varlen(x64[0], x64[1], x64[1], cu, cu, 20, 20, causal=True)
    eager = reference.attention_varlen(q, k, k, cu, cu, 20, 20, causal=True)
    assert_close_2x(out, eager, exact, torch.float32, "out")
    for got, ea, ex, n in zip(_grads(out, (q, k)), _grads(eager, (q, k)), _grads(exact, x64), "qk"):
        assert_close_2x(got, ea, ex, torch.float32, f"d{n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_infonce_triton_through_public_api(dtype, symmetric):
    g = torch.Generator().manual_seed(5)
    p = torch.randn(37, 72, generator=g).to(dtype).requires_grad_(True)
    t = torch.randn(37, 72, generator=g).to(dtype).requires_grad_(True)
    tau = torch.tensor(0.05, requires_grad=True)
    loss = vf.infonce_loss(p, t, temperature=tau, symmetric=symmetric, backend="triton")
    p64, t64, tau64 = (x.detach().double().requires_grad_(True) for x in (p, t, tau))
    exact = reference.infonce_loss(p64, t64, temperature=tau64, symmetric=symmetric)
    eager = reference.infonce_loss(p, t, temperature=tau, symmetric=symmetric)
    assert_close_2x(loss, eager, exact, dtype, "loss")
    for got, ea, ex, n in zip(
        torch.autograd.grad(loss, (p, t, tau)),
        torch.autograd.grad(eager, (p, t, tau)),
        torch.autograd.grad(exact, (p64, t64, tau64)),
        ("dp", "dt", "dtau"),
    ):
        assert_close_2x(got, ea, ex, dtype, n)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_topk_triton_through_public_api(metric):
    g = torch.Generator().manual_seed(6)
    q, b = torch.randn(5, 72, generator=g), torch.randn(127, 72, generator=g)
    scores, idx = vf.topk_similarity(q, b, 10, metric=metric, backend="triton")
    check_topk(scores, idx, q, b, 10, metric, 1e-4)


def test_auto_never_picks_triton_on_cpu():
    from vljepa_fast import _backends
    from vljepa_fast.ops.attention import attention_inputs
    from vljepa_fast.ops.infonce import infonce_inputs

    q = torch.randn(1, 4, 2, 32)
    assert _backends.select("attention", "auto", attention_inputs(q, q, q))[0].name == "sdpa"
    p = torch.randn(4, 8)
    assert _backends.select("infonce_loss", "auto", infonce_inputs(p, p))[0].name != "triton"


@pytest.mark.parametrize(
    "call",
    [
        lambda x: vf.topk_similarity(x, x, 2),
        lambda x: vf.infonce_loss(x, x),
        lambda x: vf.attention(x[None, :, None], x[None, :, None], x[None, :, None]),
    ],
    ids=["topk_similarity", "infonce_loss", "attention"],
)
def test_auto_on_a_device_no_backend_serves_lists_the_reasons(call):
    """Meta tensors under auto: a BackendUnavailableError with every backend's reasons, not an
    AssertionError (regression)."""
    x = torch.randn(6, 4, device="meta")
    with pytest.raises(vf.BackendUnavailableError, match="does not run on meta tensors"):
        call(x)
