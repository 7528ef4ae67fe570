"""sigmoid_loss (SigLIP): every CPU backend against a float64 eager formula written here (values
and the gradients of pred, target, logit_scale and logit_bias), argument errors, dispatch
messages, the module, the open_clip drop-in against open_clip's SigLipLoss, and the 2-rank gloo
distributed path against the single-process float64 loss.

The helpers (``check_backend``, ``spawn_distributed``, ``check_distributed``) are shared with
tests/test_sigmoid_loss_triton.py, which runs them on the triton backend under the interpreter.
"""

from __future__ import annotations

import math
import os
import re
import socket
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

import vljepa_fast as vf
from tests._util import assert_close_2x
from vljepa_fast import _backends
from vljepa_fast.ops import sigmoid_loss as sig_ops

EPS = 1e-12  # the documented normalisation floor
NAMES = ("loss", "dpred", "dtarget", "dscale", "dbias")


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def normalize_rows(x: Tensor) -> Tensor:
    """x / max(|x|, eps) per row, zero gradient below eps (the documented rule), in fp32 for
    16-bit x (eps underflows fp16)."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    y = x.float() if low else x
    n = y.norm(dim=-1, keepdim=True)
    out = torch.where(n >= EPS, y / n.clamp_min(EPS), y.detach() / EPS)
    return out.to(x.dtype) if low else out


def eager(p, t, scale, bias, normalize: bool, reduction: str, offset: int = 0) -> Tensor:
    """-sum_ij log sigmoid(z_ij x_ij) in the inputs' dtype, z = +1 at column i + offset."""
    if normalize:
        p, t = normalize_rows(p), normalize_rows(t)
    x = scale * (p @ t.T) + bias
    n, m = x.shape
    z = torch.where(torch.arange(m)[None, :] == torch.arange(n)[:, None] + offset, 1.0, -1.0).to(
        x.dtype
    )
    rows = -F.logsigmoid(z * x).sum(dim=1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / n


def cpu_backends() -> list[str]:
    """Records that serve CPU tensors in the cpu tier (triton runs in the interpret tier)."""
    return [
        r.name
        for r in _backends.records("sigmoid_loss")
        if "cpu" in r.devices and r.name != "triton"
    ]


def check_backend(
    backend: str,
    N: int,
    D: int,
    dtype: torch.dtype,
    normalize: bool,
    reduction: str,
    kinds: tuple[bool, bool] = (True, True),
    zero_rows: tuple[int, ...] = (),
    scale: float = 4.0,
    bias: float = -2.5,
    device: str = "cpu",
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """vf.sigmoid_loss(backend=...) against the float64 eager formula, every gradient; kinds:
    (logit_scale a tensor, logit_bias a tensor). Returns (loss, grads) for repeat checks."""
    g = _gen(backend, N, D, dtype, normalize, reduction, kinds, zero_rows)
    magnitude = 1.0 if normalize else 0.3
    p = (torch.randn(N, D, generator=g) * magnitude).to(dtype)
    t = (torch.randn(N, D, generator=g) * magnitude).to(dtype)
    for r in zero_rows:
        p[r] = 0
        t[(r + 1) % N] = 0
    shape = (N,) if reduction == "none" else ()
    cot = torch.randn(shape, generator=g)

    def leaves(dt, dev="cpu"):
        pl = p.to(dt).to(dev).requires_grad_(True)
        tl = t.to(dt).to(dev).requires_grad_(True)
        s = torch.tensor(scale, dtype=torch.float32 if dt != torch.float64 else dt, device=dev)
        b = torch.tensor(bias, dtype=s.dtype, device=dev)
        s = s.requires_grad_(True) if kinds[0] else scale
        b = b.requires_grad_(True) if kinds[1] else bias
        return pl, tl, s, b

    pg, tg, sg, bg = leaves(dtype, device)
    loss = vf.sigmoid_loss(
        pg,
        tg,
        logit_scale=sg,
        logit_bias=bg,
        normalize=normalize,
        reduction=reduction,
        backend=backend,
    )
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == shape and loss.dtype == want_dtype
    wrt = [x for x in (pg, tg, sg, bg) if isinstance(x, Tensor)]
    got = [x.cpu() for x in torch.autograd.grad(loss, wrt, cot.to(loss.dtype).to(device))]
    loss = loss.cpu()

    results = {}
    for dt in (torch.float64, dtype):
        xs = leaves(dt)
        lo = eager(*xs, normalize, reduction)
        ws = [x for x in xs if isinstance(x, Tensor)]
        results[dt] = (lo.detach(), torch.autograd.grad(lo, ws, cot.to(lo.dtype)))
    exact, ref = results[torch.float64], results[dtype]
    assert_close_2x(loss.detach(), ref[0], exact[0], want_dtype, "loss")
    names = ["dpred", "dtarget"] + [n for n, k in zip(("dscale", "dbias"), kinds) if k]
    for name, gv, ev, xv in zip(names, got, ref[1], exact[1]):
        assert gv.dtype == (
            dtype
            if name in ("dpred", "dtarget")
            else torch.float32
            if dtype != torch.float64
            else torch.float64
        ), name
        assert_close_2x(gv, ev, xv, dtype if name in ("dpred", "dtarget") else want_dtype, name)
    if normalize:
        for r in zero_rows:
            assert torch.all(got[0][r] == 0), f"dpred: zero row {r} got a non-zero gradient"
            assert torch.all(got[1][(r + 1) % N] == 0), "dtarget: a zero row got a gradient"
    return loss.detach(), got


# ------------------------------------------------------------------------------ values


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backend_matches_float64(backend, dtype, normalize, reduction):
    check_backend(backend, 13, 7, dtype, normalize, reduction, zero_rows=(2,))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kinds", [(False, False), (True, False), (False, True)], ids=str)
def test_float_and_tensor_scale_bias(backend, kinds):
    check_backend(backend, 9, 5, torch.float32, True, "mean", kinds=kinds)


def test_numpy_scalars_are_plain_numbers():
    p, t = torch.randn(5, 3), torch.randn(5, 3)
    a = vf.sigmoid_loss(p, t, logit_scale=np.float32(3.0), logit_bias=np.float64(-1.0))
    b = vf.sigmoid_loss(p, t, logit_scale=3.0, logit_bias=-1.0)
    torch.testing.assert_close(a, b)


def test_mean_is_sum_over_batch_size_not_pairs():
    """open_clip's convention: the N x N sum divided by N."""
    p, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    kw = dict(logit_scale=10.0, logit_bias=-10.0)
    mean = vf.sigmoid_loss(p, t, **kw)
    total = vf.sigmoid_loss(p, t, reduction="sum", **kw)
    rows = vf.sigmoid_loss(p, t, reduction="none", **kw)
    torch.testing.assert_close(mean, total / 6)
    torch.testing.assert_close(rows.sum(), total)


# ------------------------------------------------------------------------------ errors


def _good(**over):
    kw = dict(pred=torch.randn(4, 3), target=torch.randn(4, 3), logit_scale=10.0, logit_bias=-10.0)
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(pred=torch.randn(4)), r"pred: expected .*2"),
        (dict(target=torch.randn(5, 3)), r"target: expected the shape of pred"),
        (dict(target=torch.randn(4, 3, dtype=torch.float64)), r"target"),
        (
            dict(pred=torch.randn(0, 3), target=torch.randn(0, 3)),
            r"pred: expected at least one row",
        ),
        (
            dict(pred=torch.randn(4, 0), target=torch.randn(4, 0)),
            r"pred: expected at least one col",
        ),
        (dict(pred=torch.randint(0, 3, (4, 3)), target=torch.randint(0, 3, (4, 3))), r"pred"),
        (dict(logit_scale=math.nan), r"logit_scale: expected a finite value"),
        (dict(logit_scale=math.inf), r"logit_scale: expected a finite value"),
        (dict(logit_scale=2.0**61), r"logit_scale: expected a finite value with \|logit_scale\|"),
        (dict(logit_scale=True), r"logit_scale: expected a float or a 0-dim"),
        (dict(logit_scale="10"), r"logit_scale: expected a float or a 0-dim"),
        (dict(logit_scale=torch.ones(2)), r"logit_scale: expected a 0-dim floating tensor"),
        (dict(logit_scale=torch.tensor(3)), r"logit_scale: expected a 0-dim floating tensor"),
        (dict(logit_scale=torch.tensor(math.nan)), r"logit_scale: expected a finite value"),
        (dict(logit_bias=-math.inf), r"logit_bias: expected a finite value"),
        (dict(logit_bias=torch.zeros(1)), r"logit_bias: expected a 0-dim floating tensor"),
        (dict(logit_bias=None), r"logit_bias: expected a float or a 0-dim"),
        (dict(normalize=1), r"normalize: expected a bool"),
        (dict(reduction="avg"), r"reduction: expected one of"),
        (dict(group=object()), r"group: a process group was given but torch.distributed"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments(over, match):
    with pytest.raises(ValueError, match=match):
        vf.sigmoid_loss(**_good(**over))


def test_backend_errors_say_what_the_op_has():
    with pytest.raises(
        vf.BackendUnavailableError,
        match=r"sigmoid_loss: no backend 'cuda' \(this op has: triton, reference\)",
    ):
        vf.sigmoid_loss(**_good(), backend="cuda")
    with pytest.raises(ValueError, match=r"backend: expected 'auto' or one of"):
        vf.sigmoid_loss(**_good(), backend="fast")
    # cpu tier (no interpreter): triton refuses CPU tensors, with or without a GPU
    with pytest.raises(vf.BackendUnavailableError, match=r"sigmoid_loss: backend 'triton'"):
        vf.sigmoid_loss(**_good(), backend="triton")


def test_tables_list_the_op():
    """vf.backends() and ``python -m vljepa_fast.info`` walk _backends.OPS (their every-op
    tests are in tests/test_native_build.py); here: the op is there with its two records."""
    assert "sigmoid_loss" in _backends.OPS
    recs = _backends.records("sigmoid_loss")
    assert [r.name for r in recs] == ["triton", "reference"]
    assert recs[-1].available() == []


def test_auto_on_cpu_runs_the_reference():
    with _backends.trace() as events:
        vf.sigmoid_loss(**_good())
    assert events == [_backends.TraceEvent("sigmoid_loss", "reference", "cpu")]


# ------------------------------------------------------------------------------ module


def test_module_siglip_init_and_gradients():
    m = vf.nn.SigmoidLoss()
    assert isinstance(m.logit_scale, torch.nn.Parameter)
    torch.testing.assert_close(m.logit_scale.detach(), torch.tensor(math.log(10.0)))
    torch.testing.assert_close(m.logit_bias.detach(), torch.tensor(-10.0))
    p = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 5, dtype=torch.float64)
    loss = m(p, t)
    loss.backward()
    s64 = m.logit_scale.detach().double().requires_grad_(True)
    b64 = m.logit_bias.detach().double().requires_grad_(True)
    p64 = p.detach().clone().requires_grad_(True)
    want = eager(p64, t, s64.exp(), b64, True, "mean")
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(p.grad, p64.grad)
    torch.testing.assert_close(m.logit_scale.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.logit_bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)


def test_module_fixed_values_are_buffers():
    m = vf.nn.SigmoidLoss(
        init_logit_scale=0.5, init_logit_bias=1.0, learnable=False, reduction="sum"
    )
    assert list(m.parameters()) == []
    assert set(m.state_dict()) == {"logit_scale", "logit_bias"}
    p, t = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(
        m(p, t), vf.sigmoid_loss(p, t, logit_scale=math.exp(0.5), logit_bias=1.0, reduction="sum")
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(init_logit_scale=math.nan), "init_logit_scale"),
        (dict(init_logit_scale=50.0), r"init_logit_scale: expected exp"),
        (dict(init_logit_bias=math.inf), "init_logit_bias"),
        (dict(learnable=1), "learnable: expected a bool"),
        (dict(reduction="avg"), "reduction"),
        (dict(backend="cuda"), r"backend: sigmoid_loss has no backend 'cuda'"),
    ],
)
def test_module_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        vf.nn.SigmoidLoss(**kw)


# ------------------------------------------------------------------------------ open_clip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bias_kind", ["tensor", "none"])
def test_open_clip_siglip_drop_in(dtype, bias_kind):
    open_clip = pytest.importorskip("open_clip")
    from vljepa_fast.integrations.open_clip import SigLipLoss

    g = _gen("open_clip", dtype, bias_kind)
    img = F.normalize(torch.randn(11, 8, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(11, 8, generator=g, dtype=dtype), dim=-1)
    results = []
    for loss_fn in (open_clip.loss.SigLipLoss(), SigLipLoss()):
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        scale = torch.tensor(math.log(10.0), dtype=dtype, requires_grad=True)
        bias = (
            torch.tensor(-10.0, dtype=dtype, requires_grad=True) if bias_kind == "tensor" else None
        )
        out = loss_fn(i, t, scale.exp(), bias, output_dict=True)["contrastive_loss"]
        wrt = [i, t, scale] + ([bias] if bias is not None else [])
        results.append((out.detach(), torch.autograd.grad(out, wrt)))
    (want, want_g), (got, got_g) = results
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got.to(dtype), want, **tol)
    for name, a, b in zip(("dimage", "dtext", "dscale", "dbias"), got_g, want_g):
        torch.testing.assert_close(a.to(dtype), b, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_open_clip_siglip_drop_in_bad_arguments():
    from vljepa_fast.integrations.open_clip import SigLipLoss

    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank: expected in"):
        SigLipLoss(rank=1)
    with pytest.raises(ValueError, match="logit_scale: expected a number or"):
        SigLipLoss()(x, x, None, None)
    with pytest.raises(ValueError, match="logit_bias: expected None or a floating one-element"):
        SigLipLoss()(x, x, 10.0, torch.zeros(2))
    with pytest.raises(ValueError, match="text_features: expected the shape"):
        SigLipLoss()(x, torch.randn(2, 4), 10.0, -10.0)
    with pytest.raises(ValueError, match="world_size: > 1 but torch.distributed"):
        SigLipLoss(rank=0, world_size=2)(x, x, 10.0, -10.0)


# ------------------------------------------------------------------------------ distributed

D_DIST = 6
SCALE, BIAS = 5.0, -3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(total: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(300 + total)
    return tuple(torch.randn(total, D_DIST, generator=g, dtype=torch.float64) for _ in range(2))


def _worker(rank, sizes, port, backend, reduction, normalize, scales, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes))
    try:
        P, T = _global_batch(sum(sizes))
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        p = P[rows].float().clone().requires_grad_(True)
        t = T[rows].float().clone().requires_grad_(True)
        s = torch.tensor(scales[rank], requires_grad=True)
        b = torch.tensor(BIAS, requires_grad=True)
        try:
            loss = vf.sigmoid_loss(
                p,
                t,
                logit_scale=s,
                logit_bias=b,
                normalize=normalize,
                reduction=reduction,
                group=dist.group.WORLD,
                backend=backend,
            )
        except ValueError as e:
            out_q.put((rank, "ValueError", str(e)))
            return
        objective = loss.mean() if reduction == "none" else loss
        grads = torch.autograd.grad(objective, (p, t, s, b))
        out_q.put((rank, *(x.detach().numpy() for x in (loss, *grads))))
    finally:
        dist.destroy_process_group()


def spawn_distributed(sizes, backend, reduction="mean", normalize=True, scales=None):
    world = len(sizes)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = (sizes, _free_port(), backend, reduction, normalize, scales or [SCALE] * world, q)
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
    for pr in procs:
        pr.start()
    results = sorted((q.get(timeout=240) for _ in range(world)), key=lambda r: r[0])
    for pr in procs:
        pr.join(timeout=60)
        assert pr.exitcode == 0
    return results


def _expected(sizes, reduction, normalize):
    """Per rank (value, dpred rows, dtarget rows, dscale, dbias) from the single-process float64
    loss over the full batch (ops/sigmoid_loss.py module doc), and DDP's (dscale, dbias)."""
    world, total = len(sizes), sum(sizes)
    P, T = (x.requires_grad_(True) for x in _global_batch(total))
    s = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    per_row = eager(P, T, s, b, normalize, "none")
    starts = [sum(sizes[:r]) for r in range(world)]
    rows = [slice(st, st + n) for st, n in zip(starts, sizes)]
    if reduction == "none":
        own = [per_row[r].mean() for r in rows]
        objective, values = sum(own), [per_row[r] for r in rows]
    else:
        div = total if reduction == "mean" else 1
        own = [world * per_row[r].sum() / div for r in rows]
        objective, values = world * per_row.sum() / div, [per_row.sum() / div] * world
    gP, gT = torch.autograd.grad(objective, (P, T), retain_graph=True)
    shares = [torch.autograd.grad(o, (s, b), retain_graph=True) for o in own]
    ddp = torch.autograd.grad(objective / world, (s, b))
    want = [(v.detach(), gP[r], gT[r], *sh) for v, r, sh in zip(values, rows, shares)]
    return want, ddp


def check_distributed(sizes, backend, reduction, normalize=True):
    results = spawn_distributed(sizes, backend, reduction, normalize)
    assert all(len(r) == 6 for r in results), results
    want, ddp = _expected(sizes, reduction, normalize)
    tol = dict(rtol=1e-5, atol=1e-5)
    for (rank, *got), exp in zip(results, want):
        for name, gv, ev in zip(NAMES, got, exp):
            gv = torch.from_numpy(np.asarray(gv)).double()
            torch.testing.assert_close(
                gv, ev, **tol, msg=lambda m, w=f"rank {rank} {name}": f"{w}: {m}"
            )
    for i, name in ((4, "dscale"), (5, "dbias")):
        mean = sum(torch.from_numpy(np.asarray(r[i])).double() for r in results) / len(sizes)
        torch.testing.assert_close(mean, ddp[i - 4], **tol, msg=lambda m, n=name: f"DDP {n}: {m}")


@pytest.mark.parametrize(
    "sizes, reduction, normalize",
    [([3, 5], "mean", True), ([4, 4], "sum", False), ([2, 3], "none", True)],
    ids=str,
)
def test_distributed_gloo_reference(sizes, reduction, normalize):
    check_distributed(sizes, "reference", reduction, normalize)


def test_distributed_different_scales_raise_on_every_rank():
    results = spawn_distributed([2, 3], "reference", scales=[5.0, 6.0])
    messages = {r[2] for r in results if r[1] == "ValueError"}
    assert len(messages) == 1 and all(r[1] == "ValueError" for r in results), results
    assert re.search(r"logit_scale: expected the same value on every rank", messages.pop())


def test_ops_module_names():
    """The builder and inputs the op's layer promises (docs/sigmoid_loss.md)."""
    x = sig_ops.sigmoid_inputs(
        torch.randn(3, 2), torch.randn(3, 2), logit_scale=2.0, logit_bias=0.0
    )
    assert isinstance(x, sig_ops.SigmoidInputs) and x.device.type == "cpu"
    with pytest.raises(AttributeError):
        x.normalize = False  # frozen


# ------------------------------------------------------------------------------ bench cost


def _bench_module():
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    import bench_sigmoid_loss

    return bench_sigmoid_loss


def test_bench_cost_matches_the_kernel_header(monkeypatch):
    """bench/bench_sigmoid_loss.py's model against the kernel header's paper-shape numbers for
    the fused 16-bit design (B = 65,536, D = 768, bf16: 6 N^2 D flops, 31.3 GB, 25.1 ms +
    7.3 ms; forward alone 0.8 GB) and a term-by-term recount at a budget that gives 3 chunks of
    a small batch, 16-bit (fused: 6 bytes per pair of H traffic) and fp32 (vendor GEMM: the
    fp32 block's 8 bytes per pair plus H's 12)."""
    monkeypatch.delenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", raising=False)
    b = _bench_module()
    N, D, s = 65536, 768, 2
    assert b.sigmoid_flops(N, D, "fwd+bwd") == 6 * N * N * D
    train = b.sigmoid_model_bytes(N, D, s, "fwd+bwd")
    assert round(train / 1e8) == 313
    assert round(b.sigmoid_model_bytes(N, D, s, "fwd") / 1e8) == 8
    cost = b.sigmoid_cost(N, D, s, "fwd+bwd", "vf.triton")
    assert cost.predicted_s == pytest.approx(25.052e-3 + 7.273e-3, rel=1e-3)
    assert cost.predicted_s < 40e-3  # the target
    assert b.sigmoid_cost(N, D, s, "fwd+bwd", "reference").predicted_s is None
    n, d, bn = 320, 64, 128
    slots = 8 * n * -(-n // bn)
    # 16-bit: the budget of 128 rows of H (2 bytes per pair); forward alone 1 byte per pair
    monkeypatch.setenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", str(128 * n * 2 / 2**20))
    chunks_train, chunks_fwd = 3, 2  # 128-row chunks; 256-row chunks
    fwd = n * d * s * (1 + chunks_fwd) + slots
    train = (
        6 * n * n + slots + 2 * n * d * s * chunks_train + n * d * s + 8 * n * d * chunks_train
        + 3 * n * d * s
    )  # fmt: skip
    assert b.sigmoid_model_bytes(n, d, s, "fwd") == fwd
    assert b.sigmoid_model_bytes(n, d, s, "fwd+bwd") == train
    # fp32: 4 bytes per pair forward alone, 4 + 4 with gradients
    s = 4
    monkeypatch.setenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", str(128 * n * 8 / 2**20))
    fwd = 8 * n * n + n * d * s * (1 + 2)
    train = (
        20 * n * n + 2 * n * d * s * 3 + n * d * s + 8 * n * d * 3 + 3 * n * d * s
    )  # fmt: skip
    assert b.sigmoid_model_bytes(n, d, s, "fwd") == fwd
    assert b.sigmoid_model_bytes(n, d, s, "fwd+bwd") == train


def test_env_override_names_the_op(monkeypatch):
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_SIGMOID_LOSS", "cuda")
    with pytest.raises(vf.BackendUnavailableError, match="VLJEPA_FAST_BACKEND_SIGMOID_LOSS"):
        vf.sigmoid_loss(**_good())
    monkeypatch.setenv("VLJEPA_FAST_BACKEND_SIGMOID_LOSS", "reference")
    vf.sigmoid_loss(**_good())
