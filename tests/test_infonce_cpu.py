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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_rows_get_zero_gradients(dtype):
    """Zero rows keep the eps-clamped value (zero logits) and get a zero gradient (the rule of
    reference.normalize_rows), not the clamp's 1 / eps slope."""
    a, b = _inputs(9, 12, 16, dtype, seed=3)
    a[4] = 0
    b[7] = 0
    b[6] = 0  # the positive of the zero row a[4] (offset 2)
    scale = torch.tensor(10.0)
    out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, 2, True, True)
    g_row, g_col = torch.randn(9), torch.randn(12)
    grads = torch.ops.vljepa_fast.infonce_bwd(a, b, scale, 2, True, out[0], out[1], g_row, g_col)
    check_against_float64(out, grads, a, b, scale, 2, True, True, g_row, g_col)
    assert grads[0][4].abs().max() == 0 and grads[1][[6, 7]].abs().max() == 0


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


# Direct calls through torch.ops.vljepa_fast: every argument the schema accepts but the kernel
# cannot serve gets a RuntimeError naming it, never a read outside a tensor. Offsets near 2**63
# used to pass the range check by signed overflow (n + offset wrapped around).
_N, _M, _D = 5, 7, 4
FWD_BAD = {
    "offset_wraps": (dict(offset=2**63 - 3), "offset must be in"),
    "offset_max": (dict(offset=2**63 - 1), "offset must be in"),
    "offset_min": (dict(offset=-(2**63)), "offset must be in"),
    "offset_negative": (dict(offset=-1), "offset must be in"),
    "offset_past_m_minus_n": (dict(offset=_M - _N + 1), "offset must be in"),
    "b_fewer_rows": (dict(b=torch.randn(_N - 1, _D)), "offset must be in"),
    "b_dtype": (dict(b=torch.randn(_M, _D).double()), "must match a dtype"),
    "float64": (dict(a=torch.randn(_N, _D).double(), b=torch.randn(_M, _D).double()), "float32"),
    "int": (dict(a=torch.ones(_N, _D, dtype=torch.int32), b=torch.ones(_M, _D, dtype=torch.int32)),
            "float32, float16 or bfloat16"),
    "feature_size": (dict(b=torch.randn(_M, _D + 1)), "same feature size"),
    "no_features": (dict(a=torch.randn(_N, 0), b=torch.randn(_M, 0)), "at least one feature"),
    "no_rows": (dict(a=torch.randn(0, _D)), "at least one row"),
    "a_1d": (dict(a=torch.randn(_D)), "a must be 2-D"),
    "b_3d": (dict(b=torch.randn(1, _M, _D)), "b must be 2-D"),
    "a_transposed": (dict(a=torch.randn(_D, _N).T), "a must be contiguous"),
    "b_step": (dict(b=torch.randn(2 * _M, _D)[::2]), "b must be contiguous"),
    "b_expanded": (dict(b=torch.randn(1, _D).expand(_M, _D)), "b must be contiguous"),
    "scale_two": (dict(scale=torch.ones(2)), "scale must be a one-element floating"),
    "scale_int": (dict(scale=torch.tensor(10)), "scale must be a one-element floating"),
    "scale_inf": (dict(scale=torch.tensor(float("inf"))), "scale must be finite"),
    "scale_nan": (dict(scale=torch.tensor(float("nan"))), "scale must be finite"),
    "b_meta": (dict(b=torch.randn(_M, _D, device="meta")), "all tensors must be on one device"),
    "scale_meta": (dict(scale=torch.ones((), device="meta")), "all tensors must be on one device"),
}  # fmt: skip


def _fwd_args(**kw):
    args = dict(a=torch.randn(_N, _D), b=torch.randn(_M, _D), scale=torch.tensor(10.0), offset=2)
    args.update(kw)
    return args


@pytest.mark.parametrize("case", FWD_BAD)
def test_bad_forward_calls_raise(case):
    kw, match = FWD_BAD[case]
    x = _fwd_args(**kw)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vljepa_fast.infonce_fwd(x["a"], x["b"], x["scale"], x["offset"], True, True)
    lse, g = torch.randn(x["a"].shape[0]), torch.randn(x["a"].shape[0])
    with pytest.raises(RuntimeError, match=match):  # the backward checks the same arguments
        torch.ops.vljepa_fast.infonce_bwd(
            x["a"], x["b"], x["scale"], x["offset"], True, lse, None, g, None
        )


@pytest.mark.parametrize("case", ["offset_wraps", "offset_negative", "b_dtype", "a_transposed"])
def test_meta_kernels_check_like_the_cpu_kernels(case):
    """FakeTensor tracing (torch.compile) refuses what an eager call refuses."""
    kw, match = FWD_BAD[case]
    x = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in _fwd_args(**kw).items()}
    if case == "a_transposed":
        x["a"] = torch.empty(_D, _N, device="meta").T
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vljepa_fast.infonce_fwd(x["a"], x["b"], x["scale"], x["offset"], True, True)


BWD_BAD = {
    "row_lse_short": (dict(row_lse=torch.randn(_N - 1)), "row_lse must be a floating \\[5\\]"),
    "row_lse_2d": (dict(row_lse=torch.randn(_N, 1)), "row_lse must be a floating"),
    "g_row_int": (dict(g_row=torch.ones(_N, dtype=torch.int64)), "g_row must be a floating"),
    "g_row_long": (dict(g_row=torch.randn(_N + 1)), "g_row must be a floating \\[5\\]"),
    "col_lse_missing": (dict(col_lse=None), "col_lse is required"),
    "col_lse_short": (dict(col_lse=torch.randn(_M - 1)), "col_lse must be a floating \\[7\\]"),
    "g_col_short": (dict(g_col=torch.randn(_N)), "g_col must be a floating \\[7\\]"),
    "g_row_meta": (dict(g_row=torch.randn(_N, device="meta")), "all tensors must be on one"),
    "row_lse_meta": (dict(row_lse=torch.randn(_N, device="meta")), "all tensors must be on one"),
}  # fmt: skip


@pytest.mark.parametrize("case", BWD_BAD)
def test_bad_backward_vectors_raise(case):
    kw, match = BWD_BAD[case]
    x = _fwd_args(offset=0)
    v = dict(row_lse=torch.randn(_N), col_lse=torch.randn(_M), g_row=torch.randn(_N),
             g_col=torch.randn(_M))  # fmt: skip
    v.update(kw)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vljepa_fast.infonce_bwd(
            x["a"], x["b"], x["scale"], 0, True, v["row_lse"], v["col_lse"], v["g_row"], v["g_col"]
        )


def test_largest_offset_is_served():
    """offset = M - N, the boundary of the fixed check, still runs and matches float64."""
    _check(_N, _M, _D, _M - _N, torch.float32, True, True, seed=21)


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
