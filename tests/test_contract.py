"""One contract test per op, run for every implementation registered for it.

Each test calls the public function (``vf.<op>(..., backend=name)``) for every backend that
``vljepa_fast._backends.records(op)`` lists, on fresh random inputs at odd sizes, and compares
the forward result and every gradient with a float64 eager computation written here (not the
package's reference, which is itself one of the implementations under test), within the
tolerance rule of docs/DESIGN.md (tests/_util.py: at most twice the error of the same eager
computation in the input dtype, plus a floor). Allocations through torch.empty / empty_like are
NaN-poisoned, so an output element a backend fails to write cannot pass.

Tiers: reference, sdpa and cpu run here on CPU tensors (``cpu``), triton on CPU tensors through
Triton's interpreter (``interpret``, its own process), and every backend that serves CUDA
tensors runs again on them (``gpu``). A third-party peer (flash_attn, xformers) may refuse a
case it does not serve (the skip gives its reasons); the project's own backends must serve
every case.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import vljepa_fast as vf
from tests._util import assert_close_2x
from vljepa_fast import _backends

#: the tier of each backend on CPU tensors (None: it does not run on the CPU)
CPU_TIER = {
    "reference": "cpu",
    "sdpa": "cpu",
    "cpu": "cpu",
    "triton": "interpret",
    "cuda": None,
    "flash_attn": None,
    "xformers": None,
}
#: third-party libraries: may refuse inputs they do not serve (the project's backends may not)
PEERS = {"flash_attn", "xformers"}
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-12  # the documented normalisation floor (max(norm, 1e-12))


def implementations(op: str) -> list:
    """pytest params (backend, device) for every record of ``op``, each marked with its tier."""
    params = []
    for rec in _backends.records(op):
        if "cpu" in rec.devices:
            tier = CPU_TIER.get(rec.name, "cpu")
            params.append(
                pytest.param(rec.name, "cpu", marks=getattr(pytest.mark, tier), id=f"{rec.name}")
            )
        if "cuda" in rec.devices:
            params.append(
                pytest.param(rec.name, "cuda", marks=pytest.mark.gpu, id=f"{rec.name}-cuda")
            )
    return params


def test_every_backend_name_has_a_tier():
    assert set(_backends.BACKENDS) == set(CPU_TIER), "CPU_TIER must name every backend"


def call(op: str, backend: str, fn):
    """``fn()`` (a call of the public op with ``backend=backend``), after availability checks."""
    rec = next(r for r in _backends.records(op) if r.name == backend)
    why = rec.available()
    if why:
        pytest.skip(f"{op}/{backend} not available here: {'; '.join(why)}")
    try:
        return fn()
    except vf.BackendUnavailableError as e:
        if backend in PEERS:
            pytest.skip(f"{backend} does not serve this case: {e}")
        raise


def gen(seed: str) -> torch.Generator:
    """A generator seeded from the case (inputs fresh per case, independent of test order)."""
    return torch.Generator().manual_seed(sum(ord(c) * 131**i for i, c in enumerate(seed)) % 2**31)


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype, device: str) -> Tensor:
    return torch.randn(shape, generator=g).to(dtype).to(device)


def leaves(*xs: Tensor, dtype: torch.dtype | None = None) -> list[Tensor]:
    return [x.detach().to(dtype or x.dtype).requires_grad_(True) for x in xs]


def grads(out: Tensor, inputs, cotangent: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(out, inputs, cotangent.to(out.dtype))


def check(name: str, got: Tensor, eager: Tensor, exact: Tensor, dtype: torch.dtype) -> None:
    assert_close_2x(got.cpu(), eager.cpu(), exact.cpu(), dtype, name)


def normalize_rows(x: Tensor) -> Tensor:
    """x / max(|x|, eps) per row; rows with norm < eps get a zero gradient (the documented rule)."""
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n >= EPS, x / n.clamp_min(EPS), x.detach() / EPS)


# ---------------------------------------------------------------------------------- attention


def eager_attention(q, k, v, keep, causal, scale):
    """softmax(q k^T * scale) v per head, GQA, keys with keep=False masked; no key -> zeros.

    q [B, T, Hq, D], k and v [B, S, Hkv, D], keep [B, S] bool or None; causal bottom-right.
    """
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
        # padded keys take no part whatever they hold: their values never enter the sums
        k = torch.where(keep[:, :, None, None], k, torch.zeros((), dtype=k.dtype, device=k.device))
        v = torch.where(keep[:, :, None, None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    if causal:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        allowed = allowed & (j <= i + S - T)
    g = Hq // Hkv
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    has_key = allowed.any(dim=-1, keepdim=True)
    s = s.masked_fill(~allowed, -math.inf).masked_fill(~has_key, 0.0)
    p = torch.softmax(s, dim=-1) * has_key
    return torch.einsum("bhts,bshd->bthd", p, vv)


# (id, B, T, S, Hq, Hkv, D, causal, key lengths or None)
ATTENTION_CASES = [
    pytest.param(2, 13, 19, 4, 2, 32, False, None, id="gqa2"),
    pytest.param(1, 19, 13, 2, 1, 32, True, None, id="causal-T-gt-S"),
    pytest.param(2, 13, 19, 4, 1, 64, False, [19, 7], id="padded-gqa4"),
    pytest.param(2, 11, 19, 2, 2, 32, True, [5, 0], id="padded-causal-no-key"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, T, S, Hq, Hkv, D, causal, lengths", ATTENTION_CASES)
@pytest.mark.parametrize("backend, device", implementations("attention"))
def test_attention_contract(poisoned, backend, device, B, T, S, Hq, Hkv, D, causal, lengths, dtype):
    g = gen(f"attention{B}{T}{S}{Hq}{Hkv}{D}{causal}{lengths}{dtype}")
    q = randn(g, B, T, Hq, D, dtype=dtype, device=device)
    k = randn(g, B, S, Hkv, D, dtype=dtype, device=device)
    v = randn(g, B, S, Hkv, D, dtype=dtype, device=device)
    do = randn(g, B, T, Hq, D, dtype=torch.float32, device=device)
    keep = None
    if lengths is not None:
        keep = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
        keep = keep.to(device)
        pad = ~keep[:, :, None, None]
        k, v = k.masked_fill(pad, math.nan), v.masked_fill(pad, math.inf)  # must take no part
    scale = 1.0 / math.sqrt(D)

    qg, kg, vg = leaves(q, k, v)
    out = call(
        "attention",
        backend,
        lambda: vf.attention(qg, kg, vg, key_padding_mask=keep, causal=causal, backend=backend),
    )
    assert out.shape == q.shape and out.dtype == dtype
    got_grads = grads(out, (qg, kg, vg), do)

    with torch.no_grad():
        k0 = k if keep is None else k.masked_fill(~keep[:, :, None, None], 0)
        v0 = v if keep is None else v.masked_fill(~keep[:, :, None, None], 0)
    results = {}
    for dt in (torch.float64, dtype):
        x = leaves(q, k0, v0, dtype=dt)
        o = eager_attention(*x, keep, causal, scale)
        results[dt] = (o.detach(), grads(o, x, do))
    exact, eager = results[torch.float64], results[dtype]
    check("out", out.detach(), eager[0], exact[0], dtype)
    for name, got, ea, ex in zip(("dq", "dk", "dv"), got_grads, eager[1], exact[1], strict=True):
        check(name, got, ea, ex, dtype)

    # queries with no key get exact zeros; padded keys and values get exact zero gradients
    no_key = exact[0].abs().amax(dim=-1) == 0
    assert torch.all(out.detach()[no_key] == 0), "out: a query with no key is not zero"
    if keep is not None:
        padded = ~keep
        for name, got in (("dk", got_grads[1]), ("dv", got_grads[2])):
            assert torch.all(got[padded] == 0), f"{name}: padded keys get a non-zero gradient"


# (id, lengths of queries, lengths of keys, Hq, Hkv, D, causal)
VARLEN_CASES = [
    pytest.param([5, 13, 1], [7, 11, 3], 4, 2, 32, False, id="three-seqs"),
    pytest.param([5, 13, 1], [7, 11, 3], 4, 1, 64, True, id="three-seqs-causal"),
    pytest.param([5, 0, 13, 2], [7, 3, 11, 0], 2, 2, 32, True, id="empty-q-and-no-key"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq, lk, Hq, Hkv, D, causal", VARLEN_CASES)
@pytest.mark.parametrize("backend, device", implementations("attention_varlen"))
def test_attention_varlen_contract(poisoned, backend, device, lq, lk, Hq, Hkv, D, causal, dtype):
    g = gen(f"varlen{lq}{lk}{Hq}{Hkv}{D}{causal}{dtype}")
    tq, tk = sum(lq), sum(lk)
    q = randn(g, tq, Hq, D, dtype=dtype, device=device)
    k = randn(g, tk, Hkv, D, dtype=dtype, device=device)
    v = randn(g, tk, Hkv, D, dtype=dtype, device=device)
    do = randn(g, tq, Hq, D, dtype=torch.float32, device=device)
    cu_q = torch.tensor([0] + lq, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    cu_k = torch.tensor([0] + lk, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    scale = 1.0 / math.sqrt(D)

    qg, kg, vg = leaves(q, k, v)
    out = call(
        "attention_varlen",
        backend,
        lambda: vf.attention_varlen(
            qg, kg, vg, cu_q, cu_k, max(lq), max(lk), causal=causal, backend=backend
        ),
    )
    assert out.shape == q.shape and out.dtype == dtype
    got_grads = grads(out, (qg, kg, vg), do)

    results = {}
    for dt in (torch.float64, dtype):
        x = leaves(q, k, v, dtype=dt)
        parts, a, b = [], 0, 0
        for n_q, n_k in zip(lq, lk):
            sl = (x[0][a : a + n_q], x[1][b : b + n_k], x[2][b : b + n_k])
            parts.append(eager_attention(*(t[None] for t in sl), None, causal, scale)[0])
            a, b = a + n_q, b + n_k
        o = torch.cat(parts)
        results[dt] = (o.detach(), grads(o, x, do))
    exact, eager = results[torch.float64], results[dtype]
    check("out", out.detach(), eager[0], exact[0], dtype)
    for name, got, ea, ex in zip(("dq", "dk", "dv"), got_grads, eager[1], exact[1], strict=True):
        check(name, got, ea, ex, dtype)
    # a sequence with no key: its queries get exact zeros
    a = 0
    for n_q, n_k in zip(lq, lk):
        if n_k == 0:
            assert torch.all(out.detach()[a : a + n_q] == 0), "out: queries with no key not zero"
        a += n_q


# -------------------------------------------------------------------------------------- infonce


def eager_infonce(p, t, tau, symmetric, normalize, reduction):
    """logits = norm(p) norm(t)^T / tau; per row lse(row) - diag (mean with the column term)."""
    if normalize:
        p, t = normalize_rows(p), normalize_rows(t)
    logits = p @ t.T / tau
    pos = logits.diagonal()
    loss = torch.logsumexp(logits, dim=1) - pos
    if symmetric:
        loss = 0.5 * (loss + torch.logsumexp(logits, dim=0) - pos)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


# (N, D, symmetric, normalize, reduction, tensor temperature, a zero row in pred)
INFONCE_CASES = [
    pytest.param(29, 72, True, True, "mean", True, True, id="sym-norm-mean-zero-row"),
    pytest.param(29, 72, False, True, "none", True, False, id="one-way-none"),
    pytest.param(17, 40, True, False, "sum", False, False, id="unnormalized-sum-float-tau"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, D, symmetric, normalize, reduction, tau_tensor, zero", INFONCE_CASES)
@pytest.mark.parametrize("backend, device", implementations("infonce_loss"))
def test_infonce_contract(
    poisoned, backend, device, N, D, symmetric, normalize, reduction, tau_tensor, zero, dtype
):
    g = gen(f"infonce{N}{D}{symmetric}{normalize}{reduction}{tau_tensor}{zero}{dtype}")
    magnitude = 1.0 if normalize else 0.25  # unnormalized logits of moderate size
    p = (randn(g, N, D, dtype=torch.float32, device="cpu") * magnitude).to(dtype).to(device)
    t = (randn(g, N, D, dtype=torch.float32, device="cpu") * magnitude).to(dtype).to(device)
    if zero:
        p[3] = 0
    tau = torch.tensor(0.1, device=device)
    shape = (N,) if reduction == "none" else ()
    cot = randn(g, *shape, dtype=torch.float32, device=device)

    pg, tg = leaves(p, t)
    taug = tau.clone().requires_grad_(True) if tau_tensor else 0.1
    loss = call(
        "infonce_loss",
        backend,
        lambda: vf.infonce_loss(
            pg,
            tg,
            temperature=taug,
            symmetric=symmetric,
            normalize=normalize,
            reduction=reduction,
            backend=backend,
        ),
    )
    assert loss.shape == shape and loss.dtype == torch.float32
    inputs = (pg, tg, taug) if tau_tensor else (pg, tg)
    got_grads = grads(loss, inputs, cot)

    results = {}
    for dt in (torch.float64, dtype):
        x = leaves(p, t, dtype=dt)
        tau_dt = tau.to(dt).requires_grad_(True) if tau_tensor else 0.1
        lo = eager_infonce(*x, tau_dt, symmetric, normalize, reduction)
        results[dt] = (lo.detach(), grads(lo, (*x, tau_dt) if tau_tensor else x, cot))
    exact, eager = results[torch.float64], results[dtype]
    check("loss", loss.detach(), eager[0], exact[0], torch.float32)
    for name, got, ea, ex in zip(("dpred", "dtarget", "dtau"), got_grads, eager[1], exact[1]):
        check(name, got, ea, ex, dtype if name != "dtau" else torch.float32)
    if zero and normalize:
        assert torch.all(got_grads[0][3] == 0), "dpred: a zero row gets a non-zero gradient"


# ---------------------------------------------------------------------------- topk_similarity


def eager_scores(queries: Tensor, bank: Tensor, metric: str) -> Tensor:
    if metric == "cosine":
        queries, bank = normalize_rows(queries), normalize_rows(bank)
    return queries @ bank.T


# (Q, N, D, k, metric)
TOPK_CASES = [
    pytest.param(13, 203, 40, 7, "ip", id="ip"),
    pytest.param(13, 203, 40, 7, "cosine", id="cosine"),
    pytest.param(3, 50, 24, 50, "ip", id="k-equals-N"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Q, N, D, k, metric", TOPK_CASES)
@pytest.mark.parametrize("backend, device", implementations("topk_similarity"))
def test_topk_similarity_contract(poisoned, backend, device, Q, N, D, k, metric, dtype):
    g = gen(f"topk{Q}{N}{D}{k}{metric}{dtype}")
    queries = randn(g, Q, D, dtype=dtype, device=device)
    bank = randn(g, N, D, dtype=dtype, device=device)
    bank[N - 3] = bank[N // 7]  # an exact tie: the lower index comes first
    bank[N // 2] = 0  # a zero row scores exactly 0 (cosine: never NaN)
    if metric == "cosine":
        queries[1] = 0  # every score 0: indices 0..k-1
    cot = randn(g, Q, k, dtype=torch.float32, device=device)

    qg, bg = leaves(queries, bank)
    scores, idx = call(
        "topk_similarity",
        backend,
        lambda: vf.topk_similarity(qg, bg, k, metric=metric, backend=backend),
    )
    assert scores.shape == (Q, k) and scores.dtype == torch.float32
    assert idx.shape == (Q, k) and idx.dtype == torch.int64 and not idx.requires_grad

    # the order: descending scores, equal scores lowest index first
    full64 = eager_scores(queries.double(), bank.double(), metric).cpu()
    order = torch.sort(-full64, dim=1, stable=True).indices[:, :k]  # ties keep index order
    assert torch.equal(idx.cpu(), order), f"indices differ from the float64 order:\n{idx}\n{order}"
    got_grads = grads(scores, (qg, bg), cot)

    results = {}
    for dt in (torch.float64, dtype):
        x = leaves(queries, bank, dtype=dt)
        s = eager_scores(*x, metric).gather(1, order.to(device))
        if dt != torch.float64:
            s = s.float()  # scores are fp32 whatever the input dtype
        results[dt] = (s.detach(), grads(s, x, cot))
    exact, eager = results[torch.float64], results[dtype]
    check("scores", scores.detach(), eager[0], exact[0], dtype)
    for name, got, ea, ex in zip(("dqueries", "dbank"), got_grads, eager[1], exact[1]):
        check(name, got, ea, ex, dtype)
    if metric == "cosine":
        assert torch.all(scores.detach()[1] == 0), "a zero query scores non-zero"
        assert torch.all(got_grads[0][1] == 0), "dqueries: a zero row gets a non-zero gradient"


# -------------------------------------------------------------------------------------- rotary


def eager_rotary(x: Tensor, cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    """x[.., c] cos[t, c] + s(c) x[.., p(c)] sin[t, c]; x [B, T, H, D], tables [B or 1, T, D]."""
    D = x.shape[-1]
    c = torch.arange(D, device=x.device)
    if layout == "llama":  # c pairs with c + D/2
        partner = (c + D // 2) % D
        sign = torch.where(c < D // 2, -1.0, 1.0)
    else:  # "vjepa2": 2i pairs with 2i + 1
        partner = c ^ 1
        sign = torch.where(c % 2 == 0, -1.0, 1.0)
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return x * cos + sign.to(x.dtype) * x[..., partner] * sin


# (B, T, Hq, Hkv, D, layout, per-batch tables)
ROTARY_CASES = [
    pytest.param(2, 13, 4, 2, 72, "llama", False, id="llama-d72"),
    pytest.param(2, 13, 3, 1, 64, "llama", True, id="llama-per-batch"),
    pytest.param(2, 13, 4, 2, 64, "vjepa2", False, id="vjepa2-d64"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, T, Hq, Hkv, D, layout, per_batch", ROTARY_CASES)
@pytest.mark.parametrize("backend, device", implementations("rotary"))
def test_rotary_contract(poisoned, backend, device, B, T, Hq, Hkv, D, layout, per_batch, dtype):
    g = gen(f"rotary{B}{T}{Hq}{Hkv}{D}{layout}{per_batch}{dtype}")
    q = randn(g, B, T, Hq, D, dtype=dtype, device=device)
    k = randn(g, B, T, Hkv, D, dtype=dtype, device=device)
    if layout == "vjepa2":
        positions = torch.randint(0, 16, (T, 3), generator=g).to(device)
    elif per_batch:
        positions = torch.randint(0, 4096, (B, T), generator=g).to(device)
    else:
        positions = (torch.arange(T) * 37 + 5).to(device)
    cos, sin = vf.rotary_cos_sin(positions, D, layout=layout)
    assert cos.shape[-1] == D and cos.dtype == torch.float32
    tables = (cos, sin) if cos.dim() == 3 else (cos[None], sin[None])
    do_q = randn(g, B, T, Hq, D, dtype=torch.float32, device=device)
    do_k = randn(g, B, T, Hkv, D, dtype=torch.float32, device=device)

    qg, kg = leaves(q, k)
    q_rot, k_rot = call(
        "rotary",
        backend,
        lambda: vf.apply_rotary(qg, kg, cos, sin, layout=layout, backend=backend),
    )
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    assert q_rot.dtype == dtype and k_rot.dtype == dtype
    got_dq, got_dk = torch.autograd.grad((q_rot, k_rot), (qg, kg), (do_q.to(dtype), do_k.to(dtype)))

    results = {}
    for dt in (torch.float64, dtype):
        x, y = leaves(q, k, dtype=dt)
        tab = [t.to(torch.float64) if dt == torch.float64 else t for t in tables]
        qr, kr = eager_rotary(x, *tab, layout), eager_rotary(y, *tab, layout)
        dx, dy = torch.autograd.grad((qr, kr), (x, y), (do_q.to(dt), do_k.to(dt)))
        results[dt] = (qr.detach(), kr.detach(), dx, dy)
    exact, eager = results[torch.float64], results[dtype]
    for i, (name, got) in enumerate(
        (("q_rot", q_rot.detach()), ("k_rot", k_rot.detach()), ("dq", got_dq), ("dk", got_dk))
    ):
        check(name, got, eager[i], exact[i], dtype)


# ------------------------------------------------- the tiers: Triton's interpreter is per process


def _copy_kernel():
    """A tiny ``@triton.jit`` kernel, decorated now (compiled or interpreted, as the process)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    def copy_twice(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2)

    return triton.jit(copy_twice)


def _kernel_functions(kind: type) -> dict[str, list[str]]:
    """Per kernel module, the names of its module-level objects of type ``kind``."""
    import importlib

    out = {}
    for name in ("attention", "infonce", "rotary", "topk_similarity"):
        module = importlib.import_module(f"vljepa_fast._kernels.{name}")
        out[name] = [k for k, v in vars(module).items() if isinstance(v, kind)]
    return out


@pytest.mark.cpu
def test_compiled_kernels_refuse_cpu_tensors():
    """Without TRITON_INTERPRET the kernels are compiled and nothing reroutes CPU tensors
    through the interpreter (no patching of Triton): launch says how to run them instead."""
    from triton.runtime.jit import JITFunction
    from vljepa_fast._kernels import _common

    for module, jitted in _kernel_functions(JITFunction).items():
        assert jitted, f"{module}: no compiled JITFunction"
    assert not hasattr(_common, "aot_compile"), "AOT tooling belongs to tests/_aot.py"
    x = torch.arange(16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _common.launch(_copy_kernel(), (1,), x, torch.empty_like(x), N=16)


@pytest.mark.interpret
def test_interpreter_process_interprets_every_kernel(poisoned):
    """Under TRITON_INTERPRET=1 the package's kernels are interpreted functions (decorated so,
    not patched), kernel[grid] takes CPU tensors, and the compile tooling refuses them."""
    from triton.runtime.jit import JITFunction
    from vljepa_fast._kernels import _common, rotary

    from tests._aot import aot_compile

    for module, jitted in _kernel_functions(JITFunction).items():
        assert not jitted, f"{module}: compiled JITFunctions under the interpreter: {jitted}"
    x = torch.arange(16, dtype=torch.float32)
    y = torch.empty_like(x)
    assert poisoned and y.isnan().all()
    _common.launch(_copy_kernel(), (1,), x, y, N=16)
    assert torch.equal(y, 2 * x)
    assert _common.interpreting(x)
    with pytest.raises(TypeError, match="TRITON_INTERPRET=1"):
        aot_compile(rotary.rotary_kernel, {}, {})
