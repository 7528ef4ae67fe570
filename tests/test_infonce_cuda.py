"""infonce_fwd / infonce_bwd CUDA kernels (csrc/cuda/infonce.cu) against the float64 reference.

gpu tier only. The oracle is ``reference.infonce_terms`` in float64 with autograd for the three
gradients; a kernel passes when its error is at most 2x that of the same reference run in the
input dtype, plus a floor (tests/_util.py). Every case draws fresh inputs with duplicate rows.
"""

from __future__ import annotations

import pytest
import torch

import vljepa_fast as vf
from tests._util import check_against_float64
from vljepa_fast import _ext, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# (N, M, D, offset): sizes inside one 64-row tile, M > N with and without an offset, the largest
# offset M - N, a single feature.
SMALL = [(1, 1, 1, 0), (1, 5, 72, 3), (5, 5, 72, 0), (5, 127, 1, 60), (5, 300, 72, 295)]
# Several row and column tiles, ragged last tiles, D = 72 (not a multiple of the 32-half
# k-step), D = 1536 (VL-JEPA), D = 100 (unaligned for fp16 16-byte packs).
LARGE = [
    (127, 127, 72, 0),
    (127, 300, 72, 100),
    (300, 300, 1, 0),
    (200, 260, 1536, 60),
    (130, 130, 100, 0),
    # More than 24 row blocks and column tiles: the forward's groups and splits span several
    # tiles each (partials merged inside a program and across programs), ragged at both ends.
    (3001, 3077, 40, 70),
]


@pytest.fixture(scope="module")
def cuda_lib():
    st = _ext.load("cuda")
    assert st.loaded, "native cuda library unavailable: " + "; ".join(st.reasons)


def _inputs(n, m, d, dtype, *, seed, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g) * magnitude
    b = torch.randn(m, d, generator=g) * magnitude
    if n >= 4:
        a[n - 1] = a[1]  # duplicate rows: equal logits must split softmax mass exactly
    if m >= 4:
        b[m - 1] = b[2]
        b[0] = b[1]
    return a.to("cuda", dtype), b.to("cuda", dtype)


def _poison_allocator():
    """NaN-fill cached blocks of both allocator pools, so that outputs the kernels allocate with
    at::empty start as NaN (best effort: the caching allocator hands freed blocks back as is)."""
    small = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(64)]  # 256 KiB
    large = torch.full((1 << 26,), float("nan"), device="cuda")  # 256 MiB
    del small, large


def _check(
    n,
    m,
    d,
    offset,
    dtype,
    normalize,
    col_stats,
    *,
    temperature=0.07,
    magnitude=1.0,
    seed=0,
    zero_rows=False,
):
    a, b = _inputs(n, m, d, dtype, seed=seed, magnitude=magnitude)
    if zero_rows:
        a[n // 2] = 0
        b[m // 3] = 0
    scale = torch.tensor(1.0 / temperature, dtype=torch.float32, device="cuda")
    g = torch.Generator().manual_seed(seed + 1)
    g_row = torch.randn(n, generator=g).cuda()
    g_col = torch.randn(m, generator=g).cuda() if col_stats else None

    _poison_allocator()
    out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, offset, normalize, col_stats)
    # The LSEs are float64 (the backward needs them to better than float), the positives float32.
    assert [t.dtype for t in out] == [torch.float64, torch.float64, torch.float32, torch.float32]
    assert all(t.is_cuda for t in out)
    if not col_stats:
        assert out[1].shape == (0,) and out[3].shape == (0,)
    got_terms = list(out) if col_stats else [out[0], out[2]]
    _poison_allocator()
    da, db, ds = torch.ops.vljepa_fast.infonce_bwd(
        a, b, scale, offset, normalize, out[0], out[1] if col_stats else None, g_row, g_col
    )
    torch.cuda.synchronize()
    assert da.dtype == dtype and db.dtype == dtype and ds.dtype == torch.float32 and ds.dim() == 0
    assert da.shape == a.shape and db.shape == b.shape

    check_against_float64(
        got_terms, (da, db, ds), a, b, scale, offset, normalize, col_stats, g_row, g_col
    )
    if zero_rows and normalize:  # zero-row rule: their gradients are exactly 0
        assert da[n // 2].abs().max() == 0 and db[m // 3].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("col_stats", [True, False], ids=["cols", "rows"])
@pytest.mark.parametrize("n,m,d,offset", SMALL)
def test_small_matches_float64(cuda_lib, n, m, d, offset, dtype, normalize, col_stats):
    _check(n, m, d, offset, dtype, normalize, col_stats, seed=n * 1000 + m + d + offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "normalize,col_stats",
    [(True, True), (False, True), (True, False)],
    ids=["norm-cols", "raw-cols", "norm-rows"],
)
@pytest.mark.parametrize("n,m,d,offset", LARGE)
def test_large_matches_float64(cuda_lib, n, m, d, offset, dtype, normalize, col_stats):
    _check(n, m, d, offset, dtype, normalize, col_stats, seed=n * 1000 + m + d + offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_huge_logits_stay_finite(cuda_lib, dtype, normalize):
    # temperature 0.01; raw inputs of norm about 3.4 * sqrt(72): |logits| up to about 1e4.
    _check(
        127,
        300,
        72,
        100,
        dtype,
        normalize,
        True,
        temperature=0.01,
        magnitude=1.0 if normalize else 3.4,
        seed=7,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_zero_rows_get_zero_gradients(cuda_lib, dtype):
    _check(70, 90, 40, 5, dtype, True, True, temperature=0.1, seed=3, zero_rows=True)


def test_deterministic(cuda_lib):
    a, b = _inputs(300, 333, 200, torch.bfloat16, seed=11)
    scale = torch.tensor(14.0, device="cuda")
    g_row, g_col = torch.rand(300, device="cuda"), torch.rand(333, device="cuda")
    runs = []
    for _ in range(2):
        out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, 0, True, True)
        runs.append(
            out
            + torch.ops.vljepa_fast.infonce_bwd(a, b, scale, 0, True, out[0], out[1], g_row, g_col)
        )
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_cpu_scale_gives_cpu_dscale(cuda_lib):
    # The Meta kernel puts dscale on scale's device; a cpu scale must work and agree.
    a, b = _inputs(40, 50, 24, torch.float32, seed=13)
    g_row, g_col = torch.randn(40, device="cuda"), torch.randn(50, device="cuda")
    results = []
    for scale in (torch.tensor(10.0), torch.tensor(10.0, device="cuda")):
        out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, 0, True, True)
        grads = torch.ops.vljepa_fast.infonce_bwd(
            a, b, scale, 0, True, out[0], out[1], g_row, g_col
        )
        assert grads[2].device == scale.device
        results.append([t.cpu() for t in out + grads])
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_no_n_by_m_buffer(cuda_lib):
    n = m = 8192
    a, b = _inputs(n, m, 64, torch.bfloat16, seed=5)
    scale = torch.tensor(14.0, device="cuda")
    g = torch.full((n,), 1.0 / n, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, 0, True, True)
    grads = torch.ops.vljepa_fast.infonce_bwd(a, b, scale, 0, True, out[0], out[1], g, g)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # dA, dB (bf16) and the fp32 accumulator: 8 N D bytes; the forward's lse partials
    # (192 (N + M) bytes) and the [N], [M] vectors: under 256 (N + M). An N x M fp32 buffer
    # would be 256 MiB; the old [N / 64, M] partials alone took 8 MiB.
    bound = 8 * n * 64 + 256 * (n + m)
    assert extra < bound, f"peak grew by {extra / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    assert all(torch.isfinite(t).all() for t in grads)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-way"])
def test_public_loss_with_learnable_temperature(cuda_lib, symmetric):
    g = torch.Generator().manual_seed(17)
    pred = torch.randn(150, 96, generator=g).cuda().requires_grad_(True)
    target = torch.randn(150, 96, generator=g).cuda().requires_grad_(True)
    temp = torch.tensor(0.05, device="cuda", requires_grad=True)
    loss = vf.infonce_loss(pred, target, temperature=temp, symmetric=symmetric, backend="cuda")
    grads = torch.autograd.grad(loss, (pred, target, temp))
    p64, t64, temp64 = (t.detach().double().requires_grad_(True) for t in (pred, target, temp))
    want = reference.infonce_loss(p64, t64, temperature=temp64, symmetric=symmetric)
    want_grads = torch.autograd.grad(want, (p64, t64, temp64))
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), exp, atol=1e-6, rtol=1e-4)


def _bad_args(case):
    """The arguments of one CUDA_BAD case, made at run time (no CUDA call at collection)."""
    cu = dict(device="cuda")
    args = dict(
        a=torch.randn(5, 4, **cu),
        b=torch.randn(7, 4, **cu),
        scale=torch.tensor(10.0, **cu),
        offset=2,
        row_lse=torch.randn(5, **cu),
        g_row=torch.randn(5, **cu),
    )
    bad = {
        "offset_wraps": dict(offset=2**63 - 3),
        "offset_max": dict(offset=2**63 - 1),
        "offset_min": dict(offset=-(2**63)),
        "offset_negative": dict(offset=-1),
        "offset_past": dict(offset=3),
        "a_transposed": dict(a=torch.randn(4, 5, **cu).T),
        "b_expanded": dict(b=torch.randn(1, 4, **cu).expand(7, 4)),
        "b_cpu": dict(b=torch.randn(7, 4)),
        "float64": dict(a=args["a"].double(), b=args["b"].double()),
        "b_3d": dict(b=torch.randn(1, 7, 4, **cu)),
        "scale_two": dict(scale=torch.ones(2, **cu)),
        "g_row_cpu": dict(g_row=torch.randn(5)),
        "row_lse_short": dict(row_lse=torch.randn(4, **cu)),
    }
    args.update(bad[case])
    return args


# n + offset used to wrap around and pass; int(offset) then handed the kernel a negative offset
CUDA_BAD = {
    "offset_wraps": "offset must be in",
    "offset_max": "offset must be in",
    "offset_min": "offset must be in",
    "offset_negative": "offset must be in",
    "offset_past": "offset must be in",
    "a_transposed": "a must be contiguous",
    "b_expanded": "b must be contiguous",
    "b_cpu": "b must be on cuda",
    "float64": "float32, float16 or bfloat16",
    "b_3d": "b must be 2-D",
    "scale_two": "one-element floating",
    "g_row_cpu": "g_row must be on cuda",
    "row_lse_short": "row_lse must be a floating",
}


@pytest.mark.parametrize("case", CUDA_BAD)
def test_bad_calls_raise(cuda_lib, case):
    """Direct calls through torch.ops.vljepa_fast: a RuntimeError naming the argument, never a
    kernel launch that reads outside a tensor."""
    match = CUDA_BAD[case]
    x = _bad_args(case)
    if "row_lse" not in case and "g_row" not in case:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.vljepa_fast.infonce_fwd(x["a"], x["b"], x["scale"], x["offset"], True, True)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vljepa_fast.infonce_bwd(
            x["a"], x["b"], x["scale"], x["offset"], True, x["row_lse"], None, x["g_row"], None
        )
    torch.cuda.synchronize()  # no asynchronous fault was left behind either
