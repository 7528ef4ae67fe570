"""infonce_fwd / infonce_bwd C++ CPU kernels (csrc/cpu/infonce.cpp) against the float64 reference.

The oracle is ``reference.infonce_terms`` in float64 with autograd for the three gradients; a
kernel passes when its error is at most 2x that of the same reference run in the input dtype,
plus a floor (tests/_util.py). Every case draws fresh inputs with duplicate rows.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests._util import check_against_float64
from vljepa_fast import _ext

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, M, D, offset): odd sizes, M > N with and without an offset, the largest offset M - N.
SMALL = [(1, 1, 1, 0), (1, 5, 72, 3), (5, 5, 72, 0), (5, 127, 1, 60), (5, 300, 72, 295)]
# Several row blocks' worth of columns; every option in fp32, the symmetric loss in fp16/bf16.
LARGE = [(127, 127, 72, 0), (127, 300, 72, 100), (300, 300, 1, 0), (300, 300, 72, 0)]


@pytest.fixture(scope="module", autouse=True)
def _native_cpu():
    st = _ext.load("cpu")
    assert st.loaded, "native cpu library unavailable: " + "; ".join(st.reasons)


def _inputs(n, m, d, dtype, *, seed, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g) * magnitude
    b = torch.randn(m, d, generator=g) * magnitude
    if n >= 4:
        a[n - 1] = a[1]  # duplicate rows: equal logits must split softmax mass exactly
    if m >= 4:
        b[m - 1] = b[2]
        b[0] = b[1]
    return a.to(dtype), b.to(dtype)


def _check(
    n, m, d, offset, dtype, normalize, col_stats, *, temperature=0.07, magnitude=1.0, seed=0
):
    a, b = _inputs(n, m, d, dtype, seed=seed, magnitude=magnitude)
    scale = torch.tensor(1.0 / temperature, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    g_row = torch.randn(n, generator=g)
    g_col = torch.randn(m, generator=g) if col_stats else None

    out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, offset, normalize, col_stats)
    # The LSEs are float64 (the backward needs them to better than float), the positives float32.
    assert [t.dtype for t in out] == [torch.float64, torch.float64, torch.float32, torch.float32]
    if not col_stats:
        assert out[1].shape == (0,) and out[3].shape == (0,)
    got_terms = [t for t in out if t.numel()] if col_stats else [out[0], out[2]]
    da, db, ds = torch.ops.vljepa_fast.infonce_bwd(
        a, b, scale, offset, normalize, out[0], out[1] if col_stats else None, g_row, g_col
    )
    assert da.dtype == dtype and db.dtype == dtype and ds.dtype == torch.float32 and ds.dim() == 0

    check_against_float64(
        got_terms, (da, db, ds), a, b, scale, offset, normalize, col_stats, g_row, g_col
    )


DTYPE_IDS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("col_stats", [True, False], ids=["cols", "rows"])
@pytest.mark.parametrize("n,m,d,offset", SMALL)
def test_small_matches_float64(n, m, d, offset, dtype, normalize, col_stats):
    _check(n, m, d, offset, dtype, normalize, col_stats, seed=n * 1000 + m + d + offset)


@pytest.mark.parametrize(
    "dtype,normalize,col_stats",
    [(torch.float32, nrm, col) for nrm in (True, False) for col in (True, False)]
    + [(torch.float16, True, True), (torch.bfloat16, True, True)],
    ids=lambda v: DTYPE_IDS.get(v, str(v)),
)
@pytest.mark.parametrize("n,m,d,offset", LARGE)
def test_large_matches_float64(n, m, d, offset, dtype, normalize, col_stats):
    _check(n, m, d, offset, dtype, normalize, col_stats, seed=n * 1000 + m + d + offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_huge_logits_stay_finite(dtype, normalize):
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


def test_zero_rows_use_the_clamped_norm():
    a, b = _inputs(9, 12, 16, torch.float32, seed=3)
    a[4] = 0
    b[7] = 0
    scale = torch.tensor(10.0)
    out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, 2, True, True)
    g_row, g_col = torch.randn(9), torch.randn(12)
    grads = torch.ops.vljepa_fast.infonce_bwd(a, b, scale, 2, True, out[0], out[1], g_row, g_col)
    check_against_float64(out, grads, a, b, scale, 2, True, True, g_row, g_col)


def test_deterministic():
    a, b = _inputs(300, 300, 72, torch.float32, seed=11)
    scale = torch.tensor(14.0)
    g_row, g_col = torch.rand(300), torch.rand(300)
    runs = []
    for _ in range(2):
        out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, 0, True, True)
        runs.append(
            out
            + torch.ops.vljepa_fast.infonce_bwd(a, b, scale, 0, True, out[0], out[1], g_row, g_col)
        )
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_no_n_by_m_buffer():
    n = m = 4096
    a, b = _inputs(n, m, 32, torch.float32, seed=5)
    scale = torch.tensor(14.0)
    g = torch.full((n,), 1.0 / n)
    out = torch.ops.vljepa_fast.infonce_fwd(a[:64], b[:64], scale, 0, True, True)  # warm-up
    torch.ops.vljepa_fast.infonce_bwd(
        a[:64], b[:64], scale, 0, True, out[0], out[1], g[:64], g[:64]
    )
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _vm_hwm_kib()
    out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, 0, True, True)
    grads = torch.ops.vljepa_fast.infonce_bwd(a, b, scale, 0, True, out[0], out[1], g, g)
    extra_mib = (_vm_hwm_kib() - base) / 1024
    one_matrix_mib = n * m * 4 / 2**20  # 64 MiB
    assert extra_mib < one_matrix_mib / 3, f"peak grew by {extra_mib:.1f} MiB"
    assert all(torch.isfinite(t).all() for t in grads)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda a, b, s: (a, b.double(), s, 0, True, True), "must match a dtype"),
        (lambda a, b, s: (a, b[:, :3].contiguous(), s, 0, True, True), "same feature size"),
        (lambda a, b, s: (a, b[:4], s, 0, True, True), "offset must be in"),
        (lambda a, b, s: (a, b, s, 2, True, True), "offset must be in"),
        (lambda a, b, s: (a.T, b, s, 0, True, True), "contiguous"),
        (lambda a, b, s: (a.int(), b.int(), s, 0, True, True), "float32, float16 or bfloat16"),
        (lambda a, b, s: (a, b, s * float("inf"), 0, True, True), "scale must be finite"),
        (lambda a, b, s: (a[:0], b, s, 0, True, True), "at least one row"),
    ],
)
def test_bad_calls_raise(call, match):
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    if "contiguous" in match:
        a = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vljepa_fast.infonce_fwd(*call(a, b, torch.tensor(10.0)))


def test_bad_backward_calls_raise():
    a, b, s = torch.randn(5, 4), torch.randn(6, 4), torch.tensor(10.0)
    row_lse, col_lse = torch.randn(5), torch.randn(6)
    with pytest.raises(RuntimeError, match="col_lse is required"):
        torch.ops.vljepa_fast.infonce_bwd(
            a, b, s, 0, True, row_lse, None, torch.randn(5), torch.randn(6)
        )
    with pytest.raises(RuntimeError, match="g_row must be a floating \\[5\\]"):
        torch.ops.vljepa_fast.infonce_bwd(
            a, b, s, 0, True, row_lse, col_lse, torch.randn(4), torch.randn(6)
        )
