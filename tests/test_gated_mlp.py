"""The gated MLPs (SwiGLU, GeGLU) keep two of the four [tokens, hidden] tensors autograd
would: their value and every gradient must still be the eager expression's."""

from __future__ import annotations

import pytest
import torch

from vljepa_fast.models._layers import SwiGLU
from vljepa_fast.models.y_encoder import GeGLU

pytestmark = pytest.mark.cpu


def _eager(mlp, x):
    return mlp.down_proj(mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x))


@pytest.mark.parametrize("cls", [SwiGLU, GeGLU])
def test_value_and_gradients_equal_the_eager_expression_in_float64(cls):
    torch.manual_seed(0)
    mlp = cls(12, 37).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 12, dtype=torch.float64)
    out = mlp(x)
    grads = torch.autograd.grad(out, [x, *mlp.parameters()], dy)
    ref = _eager(mlp, x)
    ref_grads = torch.autograd.grad(ref, [x, *mlp.parameters()], dy)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: mlp(x), (x[:1, :2],))


def test_frozen_weights_and_no_grad_input():
    """A frozen MLP on an input that needs a gradient (a frozen layer mid-network), and a
    trainable one on a plain input: only the gradients asked for, the same as eager."""
    torch.manual_seed(1)
    mlp = SwiGLU(8, 16).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    mlp.requires_grad_(False)
    (gx,) = torch.autograd.grad(mlp(x).sum(), x)
    (rx,) = torch.autograd.grad(_eager(mlp, x).sum(), x)
    torch.testing.assert_close(gx, rx)
    mlp.requires_grad_(True)
    out = mlp(x.detach())
    out.sum().backward()
    assert all(p.grad is not None for p in mlp.parameters())


def test_bf16_autocast_matches_eager_autocast():
    """Under bf16 autocast: bf16 GEMMs, fp32 weight gradients, within bf16 rounding of the
    eager expression under the same autocast."""
    torch.manual_seed(2)
    mlp = SwiGLU(32, 64)
    x = torch.randn(6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = mlp(x), _eager(mlp, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out.float().sum(), [x, *mlp.parameters()])
    r = torch.autograd.grad(ref.float().sum(), [x, *mlp.parameters()])
    for a, b, p in zip(g, r, [x, *mlp.parameters()], strict=True):
        assert a.dtype == p.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_rmsnorm_keeps_less_and_equals_torch():
    """_layers.RMSNorm: torch.nn.RMSNorm's value, dtype and gradients (float64 and bf16
    inputs), keeping its input and rstd only."""
    from vljepa_fast.models._layers import RMSNorm

    torch.manual_seed(3)
    ours, ref = RMSNorm(24, eps=1e-5).double(), torch.nn.RMSNorm(24, eps=1e-5).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 7, 24, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        out = ours(x)
    assert sorted(saved) == sorted([x.shape, (2, 7, 1), (24,)])
    g = torch.autograd.grad(out, [x, ours.weight], dy)
    r = torch.autograd.grad(ref(x), [x, ref.weight], dy)
    torch.testing.assert_close(out, ref(x), rtol=1e-12, atol=1e-12)
    for a, b in zip(g, r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    xb = x.detach().bfloat16().requires_grad_()
    ours32, ref32 = ours.float(), ref.float()
    out_b = ours32(xb)
    assert out_b.dtype == torch.bfloat16
    torch.testing.assert_close(out_b, ref32(xb))
    (gb,) = torch.autograd.grad(out_b.float().sum(), xb)
    (rb,) = torch.autograd.grad(ref32(xb).float().sum(), xb)
    assert gb.dtype == torch.bfloat16
    torch.testing.assert_close(gb, rb, rtol=2e-2, atol=2e-2)


def test_gated_mlp_refuses_double_backward():
    """The fused backward is not itself differentiable: asking for a graph of the gradient
    (create_graph, a second derivative) raises instead of returning a wrong one."""
    mlp = SwiGLU(6, 10).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="has no second derivative"):
        torch.autograd.grad((mlp(x) ** 2).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad((mlp(x) ** 2).sum(), x)  # a first derivative still works
    assert g.shape == x.shape
