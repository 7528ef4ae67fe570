"""infonce_loss: validation, every CPU backend against the float64 reference (loss and the
gradients of pred, target and a tensor temperature), the distributed gloo path against the
single-process loss over the full batch, and torch.compile(fullgraph=True) over a training step."""

from __future__ import annotations

import math
import os
import re
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


FUSED_CPU = [b for b in _cpu_backends() if b != "reference"] + [
    pytest.param("triton", marks=pytest.mark.interpret)
]


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("symmetric", [True, False])
def test_op_passes_the_chunk_rule_to_the_kernels(monkeypatch, backend, symmetric):
    """The op layer computes chunk = ops.infonce.chunk_rows (the rule of ops/_chunks.py: here
    VLJEPA_FAST_CHUNK_BUDGET_MIB forces 37 rows of N = 127, 4 + 4 bytes per fp32 pair) and hands
    the same value to the forward and the backward kernels of every fused backend (the native
    ops' trailing ``chunk``, the Triton launchers' ``chunk=``); values and gradients stay exact."""
    from vljepa_fast.ops import infonce as ops

    N, D = 127, 16
    monkeypatch.setenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", repr((37 * N * 8 + 1) / 2**20))
    p, t = _inputs(N, D, seed=3)
    assert ops.chunk_rows(p, t) == 37
    seen = []
    kernels = ops._kernels

    def spy(impl):
        fwd, bwd = kernels(impl)

        def record(fn, name):
            def wrapped(*args, chunk):
                seen.append((name, chunk))
                return fn(*args, chunk=chunk)

            return wrapped

        return record(fwd, "fwd"), record(bwd, "bwd")

    monkeypatch.setattr(ops, "_kernels", spy)
    tau = torch.tensor(0.07, requires_grad=True)
    loss, grads = _run(backend, p, t, tau, symmetric=symmetric)
    assert seen == [("fwd", 37), ("bwd", 37)], seen
    eager, egrads = _run("reference", p, t, tau, symmetric=symmetric)
    x64 = [x.detach().double().requires_grad_(True) for x in (p, t, tau)]
    exact, xgrads = _run("reference", *x64, symmetric=symmetric)
    assert_close_2x(loss, eager, exact, torch.float32, "loss")
    for got, ea, ex, name in zip(grads, egrads, xgrads, ("dpred", "dtarget", "dtemperature")):
        assert_close_2x(got, ea, ex, torch.float32, name)


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
        ({"temperature": "hot"}, "temperature: expected a float or a 0-dim floating tensor"),
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


# ------------------------------------------------------------------------------ strides

#: every backend that serves CPU tensors here, Triton through its interpreter
ALL_CPU = _cpu_backends() + [pytest.param("triton", marks=pytest.mark.interpret)]

# Views of a fresh leaf: (leaf shape, view). Each gives an [N, D] = [6, 9] tensor that is not
# contiguous (or, for "offset", starts inside its storage).
LAYOUTS = {
    "transposed": ((9, 6), lambda x: x.T),
    "step": ((12, 9), lambda x: x[::2]),
    "expanded": ((1, 9), lambda x: x.expand(6, 9)),
    "offset": ((60,), lambda x: x[3 : 3 + 54].view(6, 9)),
    "columns": ((6, 20), lambda x: x[:, 5:14]),
}


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_any_strides_match_float64(backend, layout, symmetric):
    """Non-contiguous, transposed, expanded (stride 0) and offset inputs: every backend serves
    them (the fused ones copy), values and gradients of the leaves against float64."""
    _check_strides(backend, layout, symmetric, "cpu")


def _check_strides(backend, layout, symmetric, device):
    shape, view = LAYOUTS[layout]
    g = torch.Generator().manual_seed(len(layout) * 7 + symmetric)
    leaves = [torch.randn(shape, generator=g).to(device).requires_grad_(True) for _ in range(2)]
    tau = torch.tensor(0.1, device=device, requires_grad=True)
    w = torch.randn(6, generator=g)

    def run(be, p_leaf, t_leaf, temp):
        p, t = view(p_leaf), view(t_leaf)
        assert p.shape == (6, 9) and t.shape == (6, 9)
        loss = vf.infonce_loss(
            p, t, temperature=temp, symmetric=symmetric, reduction="none", backend=be
        )
        return loss, torch.autograd.grad((loss * w.to(loss)).sum(), (p_leaf, t_leaf, temp))

    assert not view(leaves[0]).is_contiguous() or layout == "offset"
    loss, grads = run(backend, *leaves, tau)
    eager, egrads = run("reference", *leaves, tau)
    x64 = [x.detach().double().requires_grad_(True) for x in (*leaves, tau)]
    exact, xgrads = run("reference", *x64)
    assert_close_2x(loss, eager, exact, torch.float32, "loss")
    for got, ea, ex, name in zip(grads, egrads, xgrads, ("dpred", "dtarget", "dtemperature")):
        assert_close_2x(got, ea, ex, torch.float32, name)


def test_auto_serves_non_contiguous_on_cpu():
    """auto never fails on CPU for inputs the reference serves (it raised 'a must be
    contiguous')."""
    p, t = torch.randn(9, 6).T, torch.randn(12, 9)[::2]
    want = reference.infonce_loss(p.double(), t.double())
    torch.testing.assert_close(vf.infonce_loss(p, t).double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ temperature

TAU_MIN = 2.0**-60  # vljepa_fast.ops.infonce.MIN_TEMPERATURE
BELOW = [
    math.nextafter(TAU_MIN, 0.0),
    1e-39,  # 1/temperature is infinite in float32: NaN (reference), "scale" error (cpu) before
    5e-324,
    torch.tensor(1e-39),  # a float32 subnormal
    torch.tensor(math.nextafter(TAU_MIN, 0.0), dtype=torch.float64),
    torch.tensor(2.0**-61, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("temperature", BELOW, ids=str)
def test_temperature_below_range_is_refused(backend, temperature):
    p, t = _inputs(4, 3)
    with pytest.raises(ValueError, match=r"temperature: expected a positive finite value >= 2\*"):
        vf.infonce_loss(p, t, temperature=temperature, backend=backend)


def test_ops_min_temperature_is_the_documented_bound():
    from vljepa_fast.ops import infonce as ops

    assert ops.MIN_TEMPERATURE == TAU_MIN


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("normalize", [True, False])
def test_smallest_temperature_is_served(backend, as_tensor, normalize):
    """At temperature = 2**-60 (|logits| up to 2**60) every backend stays finite and matches
    float64: the loss, the input gradients and a float32 tensor temperature's gradient."""
    _check_smallest_temperature(backend, as_tensor, normalize, "cpu")


def _check_smallest_temperature(backend, as_tensor, normalize, device):
    p, t = _inputs(8, 5, seed=31, device=device)
    tau = torch.tensor(TAU_MIN, device=device, requires_grad=True) if as_tensor else TAU_MIN
    loss, grads = _run(backend, p, t, tau, normalize=normalize)
    eager, egrads = _run("reference", p, t, tau, normalize=normalize)
    p64, t64 = (x.detach().double().requires_grad_(True) for x in (p, t))
    tau64 = (
        torch.tensor(TAU_MIN, dtype=torch.float64, device=device, requires_grad=True)
        if as_tensor
        else tau
    )
    exact, xgrads = _run("reference", p64, t64, tau64, normalize=normalize)
    assert exact.abs() > 2.0**50, "the case no longer has huge logits"
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert_close_2x(loss, eager, exact, torch.float32, "loss")
    for got, ea, ex, name in zip(grads, egrads, xgrads, ("dpred", "dtarget", "dtemperature")):
        assert_close_2x(got, ea, ex, torch.float32, name)


# ------------------------------------------------------------------------------ NaN rule

# (tensor, row, column, value): one non-finite entry planted in pred or target
NONFINITE = {
    "nan_pred": (0, 2, 3, float("nan")),
    "inf_pred": (0, 1, 0, float("inf")),
    "nan_target": (1, 4, 5, float("nan")),
    "neginf_target": (1, 3, 2, float("-inf")),
}


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("case", NONFINITE)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_nan_rule(backend, case, symmetric, normalize):
    """NaN / Inf propagate (functional.infonce_loss, NaN rule): the per-row terms that are
    non-finite are exactly the float64 reference's, the others match it, and mean/sum are
    non-finite."""
    _check_nan_rule(backend, case, symmetric, normalize, "cpu")


def _check_nan_rule(backend, case, symmetric, normalize, device):
    which, row, col, value = NONFINITE[case]
    g = torch.Generator().manual_seed(len(case))
    x = [torch.randn(7, 6, generator=g) for _ in range(2)]
    x[which][row, col] = value
    x = [y.to(device) for y in x]
    kw = dict(symmetric=symmetric, normalize=normalize)
    got = vf.infonce_loss(*x, reduction="none", backend=backend, **kw)
    want = reference.infonce_loss(*(y.double() for y in x), reduction="none", **kw)
    got, want = got.cpu(), want.cpu()
    finite = torch.isfinite(want)
    assert not finite.all(), "the case no longer produces a non-finite term"
    assert torch.equal(torch.isfinite(got), finite), f"{got} vs {want}"
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-5)
    for reduction in ("mean", "sum"):
        total = vf.infonce_loss(*x, reduction=reduction, backend=backend, **kw)
        assert not torch.isfinite(total), reduction


GPU_BACKENDS = [b.name for b in _backends.records("infonce_loss") if "cuda" in b.devices]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_strides_temperature_and_nan_rule(backend):
    """The CUDA-side backends under the same three contracts as the CPU ones above."""
    for layout in LAYOUTS:
        _check_strides(backend, layout, True, "cuda")
    for as_tensor in (False, True):
        _check_smallest_temperature(backend, as_tensor, True, "cuda")
    for case in NONFINITE:
        for symmetric in (True, False):
            for normalize in (True, False):
                _check_nan_rule(backend, case, symmetric, normalize, "cuda")


# ------------------------------------------------------------------------------ zero rows

# case: (pred rows, target rows) set to zero; "both" includes a positive pair of two zero rows
ZERO_ROWS = {"pred": ([0], []), "target": ([], [3]), "both": ([0, 4], [0, 6])}
# "tiny": (pred rows, target rows, entry size): rows below NORM_EPS (1e-20 entries, including a
# positive pair of two such rows) get zero gradients; rows of 1e-6 entries are regular rows
TINY_ROWS = [([2], [2], 1e-20), ([5], [7], 1e-6)]


def _normalized_loss64(p, t, tau, symmetric):
    """Per-row InfoNCE of float64 leaves, written out with reference.normalize_rows."""
    a, b = reference.normalize_rows(p), reference.normalize_rows(t)
    s = (a @ b.T) / tau
    diag = s.diagonal()
    per_row = s.logsumexp(1) - diag
    if symmetric:
        per_row = 0.5 * (per_row + (s.logsumexp(0) - diag))
    return per_row


def _check_zero_rows(backend, dtype, plant, symmetric, device, N=9, D=16):
    """plant: [(pred rows, target rows, entry size or 0.0)]. Rows with norm < NORM_EPS get an
    exactly zero, finite gradient (reference.normalize_rows' rule); every other row's gradient,
    the temperature's and the loss match float64 within 2x the eager error in the same dtype."""
    p, t = _inputs(N, D, dtype, seed=N + D + symmetric, device=device)
    g = torch.Generator().manual_seed(5)
    dead = {0: set(), 1: set()}  # rows below NORM_EPS, per tensor
    with torch.no_grad():
        for p_rows, t_rows, size in plant:
            for which, x, rows in ((0, p, p_rows), (1, t, t_rows)):
                for r in rows:
                    x[r] = (torch.randn(D, generator=g) * size).to(device, dtype)
                    if torch.linalg.vector_norm(x[r].double()) < reference.NORM_EPS:
                        dead[which].add(r)
    assert dead[0] or dead[1], "the case plants no row below NORM_EPS"
    tau = torch.tensor(0.07, device=device, requires_grad=True)
    kw = dict(symmetric=symmetric, reduction="none")
    loss, grads = _run(backend, p, t, tau, **kw)
    eager, egrads = _run("reference", p, t, tau, **kw)
    p64, t64 = (x.detach().double().requires_grad_(True) for x in (p, t))
    tau64 = tau.detach().double().requires_grad_(True)
    exact = _normalized_loss64(p64, t64, tau64, symmetric)
    w = torch.randn(exact.shape, generator=torch.Generator().manual_seed(9)).to(exact)
    xgrads = torch.autograd.grad((exact * w).sum(), (p64, t64, tau64))
    low = torch.float32 if dtype == torch.float32 else dtype
    assert_close_2x(loss, eager, exact, low, "loss")
    for which, name in ((0, "dpred"), (1, "dtarget")):
        got, ea, ex = grads[which], egrads[which], xgrads[which]
        assert torch.isfinite(got).all(), f"{name}: non-finite gradient {got}"
        for r in range(N):
            if r in dead[which]:
                assert ex[r].abs().max() == 0, f"{name}[{r}]: float64 oracle is not zero"
                assert got[r].abs().max() == 0, f"{name}[{r}] (norm < eps): {got[r]}"
            else:
                assert_close_2x(got[r], ea[r], ex[r], dtype, f"{name}[{r}]")
    assert_close_2x(grads[2], egrads[2], xgrads[2], dtype, "dtemperature")


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ZERO_ROWS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_rows_get_zero_gradients(backend, dtype, case, symmetric):
    """normalize=True: a zero row's gradient is 0 (it has no direction; F.normalize's 1/eps
    slope overflowed fp16), the other rows' match float64 (reference.normalize_rows' rule)."""
    _check_zero_rows(backend, dtype, [(*ZERO_ROWS[case], 0.0)], symmetric, "cpu")


@pytest.mark.parametrize("backend", ALL_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rows_below_eps_get_zero_gradients(backend, dtype, symmetric):
    """Non-zero rows below NORM_EPS (1e-20 entries) get zero gradients; rows of 1e-6 entries
    are regular (the gradient of x / |x|, of order 1e5)."""
    _check_zero_rows(backend, dtype, TINY_ROWS, symmetric, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("N,D", [(9, 16), (130, 72)])
def test_gpu_zero_rows_get_zero_gradients(backend, N, D):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for symmetric in (True, False):
            for case in ZERO_ROWS:
                plant = [(*ZERO_ROWS[case], 0.0)]
                _check_zero_rows(backend, dtype, plant, symmetric, "cuda", N, D)
            if dtype != torch.float16:
                _check_zero_rows(backend, dtype, TINY_ROWS, symmetric, "cuda", N, D)


# ------------------------------------------------------------------------------ distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


D_DIST = 7


def _global_batch(total: int):
    g = torch.Generator().manual_seed(100 + total)
    return (torch.randn(total, D_DIST, generator=g, dtype=torch.float64) for _ in range(2))


def _worker(rank, sizes, dims, port, backend, reduction, symmetric, out_q, temps=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes))
    try:
        P, T = _global_batch(sum(sizes))
        start = sum(sizes[:rank])
        rows, d = slice(start, start + sizes[rank]), dims[rank]
        p = P[rows, :d].float().clone().requires_grad_(True)
        t = T[rows, :d].float().clone().requires_grad_(True)
        tau = torch.tensor(0.1 if temps is None else temps[rank], requires_grad=True)
        try:
            loss = vf.infonce_loss(
                p,
                t,
                temperature=tau,
                symmetric=symmetric,
                reduction=reduction,
                group=dist.group.WORLD,
                backend=backend,
            )
        except ValueError as e:
            out_q.put((rank, "ValueError", str(e)))
            return
        objective = loss.mean() if reduction == "none" else loss
        gp, gt, gtau = torch.autograd.grad(objective, (p, t, tau))
        # numpy arrays travel by value (tensors would need the sender alive: shared memory)
        out_q.put((rank, *(x.detach().numpy() for x in (loss, gp, gt, gtau))))
    finally:
        dist.destroy_process_group()


def _spawn(sizes, backend, reduction="mean", symmetric=True, dims=None, temps=None):
    world = len(sizes)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    args = (sizes, dims or [D_DIST] * world, port, backend, reduction, symmetric, q, temps)
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
    for pr in procs:
        pr.start()
    results = sorted((q.get(timeout=180) for _ in range(world)), key=lambda r: r[0])
    for pr in procs:
        pr.join(timeout=60)
        assert pr.exitcode == 0
    return results


def _expected(sizes, reduction, symmetric):
    """What each rank must receive (ops/infonce.py module doc), from the single-process float64
    loss over the full batch: per rank (value, dpred rows, dtarget rows, dtemperature), and the
    DDP average of the temperature gradients."""
    world, total = len(sizes), sum(sizes)
    P, T = (x.requires_grad_(True) for x in _global_batch(total))
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    per_row = reference.infonce_loss(P, T, temperature=tau, symmetric=symmetric, reduction="none")
    starts = [sum(sizes[:r]) for r in range(world)]
    rows = [slice(s, s + n) for s, n in zip(starts, sizes)]
    if reduction == "none":
        # each rank takes the mean of its own rows; gradients are those of their sum over ranks
        own = [per_row[r].mean() for r in rows]
        objective = sum(own)
        values = [per_row[r] for r in rows]
    else:
        full = per_row.mean() if reduction == "mean" else per_row.sum()
        # L_r: the terms of rank r's rows of L; every gradient is world_size x its share
        own = [world * per_row[r].sum() / (total if reduction == "mean" else 1) for r in rows]
        objective = world * full
        values = [full] * world
    gP, gT = torch.autograd.grad(objective, (P, T), retain_graph=True)
    gtau = [torch.autograd.grad(o, tau, retain_graph=True)[0] for o in own]
    ddp_tau = torch.autograd.grad(objective / world, tau)[0]
    want = [(v.detach(), gP[r], gT[r], gt) for v, r, gt in zip(values, rows, gtau)]
    return want, ddp_tau


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize(
    "sizes,reduction,symmetric",
    [
        ([5, 5], "mean", True),
        ([5, 5], "none", True),
        ([5, 5, 5], "sum", True),
        ([5, 5, 5], "mean", False),
        # unequal local batches (gloo aborted with "Received data size doesn't match")
        ([3, 5], "mean", True),
        ([3, 5], "none", True),
        ([2, 6, 1], "sum", True),
        ([2, 6, 1], "mean", False),
        ([4, 1, 3], "none", False),
    ],
    ids=str,
)
def test_distributed_gloo_matches_single_process(sizes, backend, reduction, symmetric):
    _check_distributed(sizes, backend, reduction, symmetric)


@pytest.mark.interpret
def test_distributed_gloo_triton_unequal_sizes():
    _check_distributed([3, 5], "triton", "mean", True)


def _check_distributed(sizes, backend, reduction, symmetric):
    results = _spawn(sizes, backend, reduction, symmetric)
    assert all(len(r) == 5 for r in results), results
    want, ddp_tau = _expected(sizes, reduction, symmetric)
    tol = dict(rtol=1e-5, atol=1e-5)
    for (rank, *got), exp in zip(results, want):
        for name, g, e in zip(("loss", "dpred", "dtarget", "dtemperature"), got, exp):
            g = torch.from_numpy(g).double()
            where = f"rank {rank} {name}"
            torch.testing.assert_close(g, e, **tol, msg=lambda m, where=where: f"{where}: {m}")
    # DDP averages gradients over ranks: the replicated temperature's mean is the exact one
    mean_tau = sum(torch.from_numpy(r[4]).double() for r in results) / len(sizes)
    torch.testing.assert_close(mean_tau, ddp_tau, **tol)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize(
    "sizes,dims,match",
    [
        ([3, 0], None, "pred: expected at least one row on every rank of group, got local"),
        ([2, 0, 4], None, "pred: expected at least one row on every rank"),
        ([3, 3], [D_DIST, D_DIST - 1], "pred: expected the same feature size D on every rank"),
        # regression: each rank returned its own "global" loss
        ([3, 5], "temps", "temperature: expected the same value on every rank"),
    ],
    ids=str,
)
def test_distributed_mismatch_raises_on_every_rank(backend, sizes, dims, match):
    """A rank-dependent problem raises the same ValueError on every rank (no hang or abort)."""
    temps = [0.1, 0.2] if dims == "temps" else None
    results = _spawn(sizes, backend, dims=None if temps else dims, temps=temps)
    messages = {r[2] for r in results if r[1] == "ValueError"}
    assert len(messages) == 1 and all(r[1] == "ValueError" for r in results), results
    assert re.search(match, messages.pop())


# ------------------------------------------------------------------------------ compile


@pytest.mark.parametrize("backend", ALL_CPU)
def test_compile_fullgraph_training_step(backend):
    """One graph for the forward (the fused backends' custom op is opaque to dynamo; the
    triton one under the interpreter here), AOTAutograd's backward, the eager gradients."""
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
def test_gpu_no_n_squared_memory(monkeypatch, backend):
    """Peak extra memory of the bf16 loss forward + backward at D = 1536 is linear in N plus
    the chunk budget (64 MiB here, through VLJEPA_FAST_CHUNK_BUDGET_MIB).

    Within the documented memory (kernels/infonce.py, csrc/cuda/infonce.cu): the two gradients,
    the one fp32 [N, D] dB accumulator of the 16-bit backward, the [c, N] score and dS buffers
    (at most the budget, c = ops.infonce.chunk_rows), the fp32 [c, D] dA product and O(N)
    vectors; and doubling N at most doubles it (an N x N buffer, or partials [N / block, N],
    would grow 4x).
    """
    from vljepa_fast.ops import infonce as ops

    D, budget_mib = 1536, 64
    monkeypatch.setenv("VLJEPA_FAST_CHUNK_BUDGET_MIB", str(budget_mib))
    extras = {}
    for N in (8192, 16384):
        p, t = _inputs(N, D, torch.bfloat16, device="cuda")
        rows = ops.chunk_rows(p, t)
        assert rows * N * 6 <= budget_mib * 2**20 < N * N * 6, rows
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = vf.infonce_loss(p, t, backend=backend)
        loss.backward()
        torch.cuda.synchronize()
        extras[N] = torch.cuda.max_memory_allocated() - base
        budget = 2 * N * D * 2 + N * D * 4 + budget_mib * 2**20 + rows * D * 4 + 512 * N
        assert extras[N] < budget, f"N={N}: {extras[N] / 2**20:.1f} MiB > budget"
        del p, t, loss
    assert extras[16384] < 2.05 * extras[8192], f"extra memory grew {extras}"


def test_numpy_temperature_is_a_plain_number():
    """A numpy real temperature behaves as the Python float (it used to be refused, while the
    modules accepted it); a numpy bool is refused like a bool."""
    import numpy as np

    g = torch.Generator().manual_seed(31)
    p, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    want = vf.infonce_loss(p, t, temperature=0.25, backend="reference")
    got = vf.infonce_loss(p, t, temperature=np.float32(0.25), backend="reference")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="^temperature: "):
        vf.infonce_loss(p, t, temperature=np.bool_(True))
