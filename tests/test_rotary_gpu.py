"""vf.apply_rotary with the Triton kernel on CUDA (gpu tier; runs in scripts/gpu_run.sh): values
and gradients against float64, for both layouts (Llama rotate-half, V-JEPA 2 interleaved pairs
with tiled per-axis tables), [T, D] and per-batch [B, T, D] tables, q and k as strided head
slices of one fused projection, head dims 64, 72 and 128 and sequences up to T = 4096 + 37.

The float64 oracle is written here pair by pair (out_a = c_a x_a - s_a x_b, out_b = c_b x_b +
s_b x_a for each rotated pair (a, b)), independently of vljepa_fast.ops.rotary; the eager
reference (backend="reference") agrees with it in float64, and its run in the test's dtype sets
the 2x error bound (docs/DESIGN.md; tests/_util.assert_close_2x). The kernel's outputs (forward and
backward) are NaN-poisoned before it writes them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

import vljepa_fast as vf
from tests._util import assert_close_2x, poisoned_allocations

pytestmark = pytest.mark.gpu
#: where the cases run (a module constant: the checks can be tried through the interpreter too)
DEVICE = "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def pair_index(D: int, layout: str) -> tuple[Tensor, Tensor]:
    """(first, second) channel of every rotated pair: (i, i + D/2) llama, (2i, 2i + 1) vjepa2."""
    if layout == "llama":
        first = torch.arange(D // 2, device=DEVICE)
        return first, first + D // 2
    first = torch.arange(0, D, 2, device=DEVICE)
    return first, first + 1


def rotate64(x: Tensor, cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    """x [B, T, H, D] rotated in float64 by tables [B or 1, T, D], pair by pair."""
    x = x.double()
    c, s = cos.double()[:, :, None, :], sin.double()[:, :, None, :]
    a, b = pair_index(x.shape[-1], layout)
    xa, xb = x[..., a], x[..., b]
    ya = c[..., a] * xa - s[..., a] * xb
    yb = c[..., b] * xb + s[..., b] * xa
    order = torch.argsort(torch.cat((a, b)))
    return torch.cat((ya, yb), dim=-1)[..., order]


def make_tables(B: int, T: int, D: int, layout: str, per_batch: bool, seed: int):
    """cos, sin from vf.rotary_cos_sin at random positions ([T] / [B, T], or (t, h, w) grids)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (B, T) if per_batch else (T,)
    if layout == "llama":
        pos = torch.randint(0, 131072, shape, generator=g, device=DEVICE)
        return vf.rotary_cos_sin(pos, D)
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(n, device=DEVICE) for n in (8, 16, 16)), indexing="ij"), -1
    ).reshape(-1, 3)
    pos = grid[torch.randint(0, grid.shape[0], shape, generator=g, device=DEVICE)]
    return vf.rotary_cos_sin(pos, D, layout="vjepa2")


# (B, T, Hq, Hkv, D, layout, dtype, per-batch tables, q and k strided head slices)
CASES = [
    pytest.param(2, 37, 32, 8, 64, "llama", BF16, False, False, id="llama-bf16-32:8"),
    pytest.param(2, 4133, 32, 8, 64, "llama", BF16, True, True, id="llama-bf16-long-strided"),
    pytest.param(2, 300, 8, 2, 64, "llama", F32, False, False, id="llama-f32"),
    pytest.param(1, 257, 4, 4, 72, "llama", F16, True, False, id="llama-f16-d72"),
    pytest.param(1, 129, 16, 4, 128, "llama", F32, False, True, id="llama-f32-d128-strided"),
    pytest.param(2, 1024, 16, 16, 64, "vjepa2", BF16, False, True, id="vjepa2-bf16-strided"),
    pytest.param(2, 300, 4, 2, 64, "vjepa2", F32, True, False, id="vjepa2-f32-per-batch"),
    pytest.param(1, 4133, 4, 1, 64, "vjepa2", F16, False, False, id="vjepa2-f16-long"),
]


@pytest.mark.parametrize("B, T, Hq, Hkv, D, layout, dtype, per_batch, strided", CASES)
def test_gpu_triton_rotary_matches_float64(B, T, Hq, Hkv, D, layout, dtype, per_batch, strided):
    seed = B + T + Hq + D + per_batch
    cos, sin = make_tables(B, T, D, layout, per_batch, seed)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    rand = lambda *s: torch.randn(*s, generator=g, device=DEVICE).to(dtype)
    if strided:  # q and k as head slices of one fused projection: strided rows
        qkv = rand(B, T, Hq + 2 * Hkv, D)
        q, k = qkv[:, :, :Hq], qkv[:, :, Hq : Hq + Hkv]
    else:
        q, k = rand(B, T, Hq, D), rand(B, T, Hkv, D)
    gq, gk = rand(B, T, Hq, D), rand(B, T, Hkv, D)
    cos3, sin3 = (cos[None], sin[None]) if cos.dim() == 2 else (cos, sin)

    xq, xk = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    with poisoned_allocations() as made:
        got_q, got_k = vf.apply_rotary(xq, xk, cos, sin, layout=layout, backend="triton")
        got_dq, got_dk = torch.autograd.grad((got_q, got_k), (xq, xk), (gq, gk))
    assert made, "the launcher allocated nothing through torch.empty: poisoning is inert"

    def reference(dt):
        rq, rk = q.detach().to(dt).requires_grad_(True), k.detach().to(dt).requires_grad_(True)
        oq, ok = vf.apply_rotary(rq, rk, cos, sin, layout=layout, backend="reference")
        dq, dk = torch.autograd.grad((oq, ok), (rq, rk), (gq.to(dt), gk.to(dt)))
        return oq.detach(), ok.detach(), dq, dk

    rq, rk = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    eq, ek = rotate64(rq, cos3, sin3, layout), rotate64(rk, cos3, sin3, layout)
    exact = (eq.detach(), ek.detach(), *torch.autograd.grad((eq, ek), (rq, rk), (gq, gk)))
    # the eager reference is the spec: in float64 it is the pair formula
    for name, ref64, ex in zip(("q", "k", "dq", "dk"), reference(torch.float64), exact):
        torch.testing.assert_close(ref64, ex, rtol=0, atol=1e-12, msg=f"reference {name}")
    eager = reference(dtype)
    for name, got, ea, ex in zip(
        ("q", "k", "dq", "dk"), (got_q, got_k, got_dq, got_dk), eager, exact, strict=True
    ):
        assert got.dtype == dtype and got.shape == ex.shape, name
        assert_close_2x(got, ea, ex, dtype, name)
    # auto picks the same kernel for CUDA tensors: bitwise the same rotation
    auto_q, auto_k = vf.apply_rotary(q, k, cos, sin, layout=layout)
    assert torch.equal(auto_q, got_q) and torch.equal(auto_k, got_k)


def test_gpu_auto_rotary_dispatch():
    """auto on CUDA: the Triton kernel for low-precision tables without a gradient (dispatch
    trace); tables that require a gradient and float64 inputs go to the reference (the triton
    record refuses them with reasons), whose table gradients match float64."""
    from vljepa_fast import _backends

    B, T, D = 1, 33, 64
    cos, sin = make_tables(B, T, D, "llama", False, seed=5)
    g = torch.Generator(device=DEVICE).manual_seed(6)
    q = torch.randn(B, T, 4, D, generator=g, device=DEVICE)
    k = torch.randn(B, T, 2, D, generator=g, device=DEVICE)
    c, s = cos.clone().requires_grad_(True), sin.clone().requires_grad_(True)
    with _backends.trace() as events:
        vf.apply_rotary(q, k, cos, sin)
        with warnings.catch_warnings():  # the once-per-op note that auto ran the reference
            warnings.simplefilter("ignore", RuntimeWarning)
            rq, rk = vf.apply_rotary(q, k, c, s)
            vf.apply_rotary(q.double(), k.double(), cos, sin)
    assert [e.backend for e in events] == ["triton", "reference", "reference"]
    assert all(e.op == "rotary" and e.device == "cuda" for e in events)
    with pytest.raises(vf.BackendUnavailableError, match="cos/sin require a gradient"):
        vf.apply_rotary(q, k, c, s, backend="triton")
    gc, gs = torch.autograd.grad((rq.sum() + rk.sum()), (c, s))
    c64, s64 = (t.detach().double().requires_grad_(True) for t in (cos, sin))
    exact = rotate64(q, c64[None], s64[None], "llama").sum() + rotate64(
        k, c64[None], s64[None], "llama"
    ).sum()
    wc, ws = torch.autograd.grad(exact, (c64, s64))
    torch.testing.assert_close(gc.double(), wc, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gs.double(), ws, rtol=1e-5, atol=1e-4)
