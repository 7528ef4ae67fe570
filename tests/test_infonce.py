"""infonce_loss: validation, every CPU backend against the float64 reference (loss and the
gradients of pred, target and a tensor temperature), the distributed gloo path against the
single-process loss over the full batch, and torch.compile(fullgraph=True) over a training step."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vljepa_fast as vf
from tests._util import assert_close_2x
from vljepa_fast import _backends, reference


def _cpu_backends():
    return [
        b.name
        for b in _backends.records("infonce_loss")
        if "cpu" in b.devices and b.name != "triton"
    ]


def _inputs(N, D, dtype=torch.float32, seed=0, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(N, D, generator=g) * scale).to(device, dtype).requires_grad_(True)
    t = (torch.randn(N, D, generator=g) * scale).to(device, dtype).requires_grad_(True)
    return p, t


def _run(backend, p, t, tau, **kw):
    loss = vf.infonce_loss(p, t, temperature=tau, backend=backend, **kw)
    w = torch.randn(loss.shape, generator=torch.Generator().manual_seed(9)).to(loss)
    params = [p, t] + ([tau] if isinstance(tau, torch.Tensor) else [])
    return loss, torch.autograd.grad((loss * w).sum(), params)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,D", [(1, 1), (127, 72)])
def test_backends_vs_float64(backend, dtype, symmetric, normalize, reduction, N, D):
    p, t = _inputs(N, D, dtype, seed=N + D + symmetric)
    tau = torch.tensor(0.07, requires_grad=True)
    kw = dict(symmetric=symmetric, normalize=normalize, reduction=reduction)
    loss, grads = _run(backend, p, t, tau, **kw)
    eager, egrads = _run("reference", p, t, tau, **kw)
    p64, t64 = (x.detach().double().requires_grad_(True) for x in (p, t))
    tau64 = tau.detach().double().requires_grad_(True)
    exact, xgrads = _run("reference", p64, t64, tau64, **kw)
    assert loss.dtype == torch.float32
    assert_close_2x(loss, eager, exact, torch.float32 if dtype == torch.float32 else dtype, "loss")
    for got, ea, ex, name in zip(grads, egrads, xgrads, ("dpred", "dtarget", "dtemperature")):
        assert_close_2x(got, ea, ex, dtype, name)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_large_logits_and_duplicates_stay_finite(backend):
    p, t = _inputs(33, 16, scale=1e3, seed=4)
    with torch.no_grad():
        t[5] = t[6]
        p[7] = p[8]
    loss, grads = _run(backend, p, t, 0.01, normalize=False)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    p64, t64 = (x.detach().double().requires_grad_(True) for x in (p, t))
    exact, xgrads = _run("reference", p64, t64, 0.01, normalize=False)
    torch.testing.assert_close(
        loss.double(), exact, rtol=1e-4, atol=1e-2 * max(1, exact.abs().item())
    )


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"temperature": 0.0}, "temperature: expected a positive finite value"),
        ({"temperature": float("inf")}, "temperature: expected a positive finite value"),
        ({"temperature": torch.tensor(-1.0)}, "temperature: expected a positive finite value"),
        ({"temperature": torch.ones(2)}, "temperature: expected a 0-dim floating tensor"),
        ({"temperature": "hot"}, "temperature: expected a float or a 0-dim tensor"),
        ({"reduction": "max"}, "reduction: expected one of"),
        ({"symmetric": 1}, "symmetric: expected a bool"),
        ({"group": object()}, "group: a process group was given but torch.distributed is not init"),
    ],
)
def test_bad_arguments(kw, match):
    p, t = _inputs(4, 3)
    with pytest.raises(ValueError, match=match):
        vf.infonce_loss(p, t, **kw)


def test_bad_tensors():
    with pytest.raises(ValueError, match="target: expected the shape of pred"):
        vf.infonce_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="pred: expected at least one row"):
        vf.infonce_loss(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="target: expected the same dtype as pred"):
        vf.infonce_loss(torch.randn(4, 3), torch.randn(4, 3).half())
    with pytest.raises(ValueError, match="target: expected the same device as pred"):
        vf.infonce_loss(torch.randn(4, 3), torch.randn(4, 3, device="meta"))
    with pytest.raises(ValueError, match="pred: expected a 2-D tensor"):
        vf.infonce_loss(torch.randn(4), torch.randn(4))


# ------------------------------------------------------------------------------ distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, reduction, symmetric, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        n, D = 5, 7
        P = torch.randn(world * n, D, dtype=torch.float64)
        T = torch.randn(world * n, D, dtype=torch.float64)
        p = P[rank * n : (rank + 1) * n].float().clone().requires_grad_(True)
        t = T[rank * n : (rank + 1) * n].float().clone().requires_grad_(True)
        tau = torch.tensor(0.1, requires_grad=True)
        loss = vf.infonce_loss(
            p,
            t,
            temperature=tau,
            symmetric=symmetric,
            reduction=reduction,
            group=dist.group.WORLD,
            backend=backend,
        )
        target = loss.mean() if reduction == "none" else loss
        gp, gt, gtau = torch.autograd.grad(target, (p, t, tau))
        # numpy arrays travel by value (tensors would need the sender alive: shared memory)
        out_q.put((rank, *(x.detach().numpy() for x in (loss, gp, gt, gtau))))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize(
    "world,reduction,symmetric",
    [(2, "mean", True), (2, "none", True), (3, "sum", True), (3, "mean", False)],
)
def test_distributed_gloo_matches_single_process(world, backend, reduction, symmetric):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, backend, reduction, symmetric, q))
        for r in range(world)
    ]
    for pr in procs:
        pr.start()
    results = sorted((q.get(timeout=120) for _ in range(world)), key=lambda r: r[0])
    results = [(r[0], *(torch.from_numpy(x) for x in r[1:])) for r in results]
    for pr in procs:
        pr.join(timeout=60)
        assert pr.exitcode == 0
    torch.manual_seed(0)
    n, D = 5, 7
    P = torch.randn(world * n, D, dtype=torch.float64).requires_grad_(True)
    T = torch.randn(world * n, D, dtype=torch.float64).requires_grad_(True)
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    full = reference.infonce_loss(P, T, temperature=tau, symmetric=symmetric, reduction=reduction)
    # "none": each rank's local mean is world x its share of the global mean (module doc)
    objective = full.mean() if reduction == "none" else full
    gP, gT, gtau = torch.autograd.grad(objective, (P, T, tau))
    tol = dict(rtol=1e-5, atol=1e-5)
    for rank, loss, gp, gt, _ in results:
        rows = slice(rank * n, (rank + 1) * n)
        if reduction == "none":
            torch.testing.assert_close(loss.double(), full[rows].detach(), **tol)
        else:
            torch.testing.assert_close(loss.double(), full.detach(), **tol)
        torch.testing.assert_close(gp.double(), world * gP[rows], **tol)
        torch.testing.assert_close(gt.double(), world * gT[rows], **tol)
    # DDP averages the replicated temperature's gradient over ranks: that mean must be exact
    torch.testing.assert_close(sum(r[4] for r in results).double() / world, gtau, **tol)


# ------------------------------------------------------------------------------ compile


@pytest.mark.parametrize("backend", _cpu_backends())
def test_compile_fullgraph_training_step(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(12, 8)
    log_scale = torch.nn.Parameter(torch.tensor(2.0))
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 8, generator=g)

    def forward(x, y):
        return vf.infonce_loss(lin(x), y, temperature=torch.exp(-log_scale), backend=backend)

    eager = forward(x, y)
    eager.backward()
    want = [p.grad.clone() for p in (lin.weight, lin.bias, log_scale)]
    for p in (lin.weight, lin.bias, log_scale):
        p.grad = None
    # the whole forward in one graph; AOTAutograd compiles the matching backward
    got = torch.compile(forward, fullgraph=True, backend="aot_eager")(x, y)
    got.backward()
    torch.testing.assert_close(got, eager)
    for p, w in zip((lin.weight, lin.bias, log_scale), want):
        torch.testing.assert_close(p.grad, w)


# ------------------------------------------------------------------------------ gpu tier


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend", [b.name for b in _backends.records("infonce_loss") if "cuda" in b.devices]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D", [(127, 72), (4096, 1536)])
def test_gpu_backends_vs_float64(backend, dtype, N, D):
    p, t = _inputs(N, D, dtype, seed=N, device="cuda")
    tau = torch.tensor(0.07, device="cuda", requires_grad=True)
    loss, grads = _run(backend, p, t, tau)
    eager, egrads = _run("reference", p, t, tau)
    p64, t64 = (x.detach().double().requires_grad_(True) for x in (p, t))
    tau64 = tau.detach().double().requires_grad_(True)
    exact, xgrads = _run("reference", p64, t64, tau64)
    assert_close_2x(loss, eager, exact, dtype, "loss")
    for got, ea, ex, name in zip(grads, egrads, xgrads, ("dpred", "dtarget", "dtemperature")):
        assert_close_2x(got, ea, ex, dtype, name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_no_n_squared_memory(backend):
    """Peak extra memory of the bf16 loss forward + backward at D = 1536 is linear in N.

    Within the documented budget: the two gradients, the one fp32 [N, D] accumulator the 16-bit
    backward keeps (kernels/infonce.py, csrc/cuda/infonce.cu) and O(N) vectors; and doubling N
    at most doubles it (an N x N buffer, or partials [N / block, N], would grow 4x).
    """
    D = 1536
    extras = {}
    for N in (8192, 16384):
        p, t = _inputs(N, D, torch.bfloat16, device="cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = vf.infonce_loss(p, t, backend=backend)
        loss.backward()
        torch.cuda.synchronize()
        extras[N] = torch.cuda.max_memory_allocated() - base
        budget = 2 * N * D * 2 + N * D * 4 + 512 * N
        assert extras[N] < budget, f"N={N}: {extras[N] / 2**20:.1f} MiB > budget"
        del p, t, loss
    assert extras[16384] < 2.05 * extras[8192], f"extra memory grew {extras}"
