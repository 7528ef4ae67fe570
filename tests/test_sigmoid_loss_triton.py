"""The triton backend of sigmoid_loss (kernels/sigmoid_loss.py on the chunked machinery).

interpret: CPU tensors through Triton's interpreter at odd shapes (N in {1, 7, 37, 150}, D in
{1, 20, 70}), fp32 (vendor GEMM + epilogue) and fp16/bf16 (the fused GEMM-plus-epilogue kernel,
with the interpreter's small tile and with the sm_90 tile), every reduction, normalize on/off,
float and tensor scale/bias, chunk sizes that do not divide N (VLJEPA_FAST_CHUNK_BUDGET_MIB),
rectangular blocks with positives off the block (the kernels called directly), zero rows and
rows below the norm floor, every allocation NaN-poisoned, bit-identical repeats, which path runs
for which dtype, and the 2-rank gloo distributed path; values and all four gradients against
the float64 eager formula of tests/test_sigmoid_loss.py.
compile: the fused kernel compiled ahead of time for sm_90 (wgmma, instruction N >= 64) and
sm_80 (mma.sync) in fp16 and bf16, every variant, with no spills; the fp32 path's epilogue and
the small kernels for sm_80 and sm_90 with no spills; shared memory within the arch's limit.
"""

from __future__ import annotations

import pytest
import torch

import vljepa_fast as vf
from tests._util import assert_close_2x, poisoned_allocations
from tests.test_sigmoid_loss import check_backend, check_distributed, eager
from vljepa_fast import reference
from vljepa_fast.ops import _chunks
from vljepa_fast.ops import sigmoid_loss as sig_ops

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _kernels():
    from vljepa_fast._kernels import sigmoid_loss as K

    return K


def _budget_for(monkeypatch, rows: int, cols: int, dtype: torch.dtype) -> None:
    """Set the chunk budget so that the gradient pass on ``dtype`` takes ``rows`` rows per
    chunk (the kernels' bytes per pair: kernels/sigmoid_loss.pair_bytes)."""
    per_pair = _kernels().pair_bytes(dtype.itemsize, True)
    monkeypatch.setenv(_chunks.ENV, repr((rows * cols * per_pair + 1) / 2**20))
    assert _chunks.chunk_rows(10**6, cols, per_pair, 0) == rows


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_matches_float64_chunked(monkeypatch, dtype, normalize, reduction):
    """37 rows in chunks of 5 (gradient pass) and of 7 or 10 (forward alone): boundaries that
    do not divide N, several epilogue programs per chunk."""
    _budget_for(monkeypatch, 5, 37, dtype)
    a = torch.empty(37, 20, dtype=dtype)
    assert sig_ops._chunk(a, a, True) == 5 and 37 % sig_ops._chunk(a, a, False) != 0
    with poisoned_allocations() as made:
        check_backend("triton", 37, 20, dtype, normalize, reduction, zero_rows=(3,))
    assert made, "nothing was poisoned"


@pytest.mark.interpret
@pytest.mark.parametrize("N, D", [(1, 1), (7, 1), (7, 20), (37, 1)])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_triton_odd_shapes_default_chunk(N, D, dtype):
    check_backend("triton", N, D, dtype, True, "mean")
    check_backend("triton", N, D, dtype, False, "none")


@pytest.mark.interpret
@pytest.mark.parametrize("kinds", [(False, False), (True, False), (False, True)], ids=str)
def test_triton_float_and_tensor_scale_bias(kinds):
    check_backend("triton", 9, 5, F32, True, "mean", kinds=kinds)
    check_backend("triton", 9, 5, F32, True, "none", kinds=kinds)


@pytest.mark.interpret
def test_triton_only_bias_learnable_takes_the_one_pass_path():
    """pred and target without gradients, a learnable bias: the one-pass training path still
    runs (the bias wants a gradient) and gives the exact d logit_bias."""
    p, t = torch.randn(11, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    b = torch.tensor(-4.0, requires_grad=True)
    b64 = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    loss = vf.sigmoid_loss(p.float(), t.float(), logit_scale=6.0, logit_bias=b, backend="triton")
    (gb,) = torch.autograd.grad(loss, b)
    want = eager(p, t, 6.0, b64, True, "mean")
    (gb64,) = torch.autograd.grad(want, b64)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb.double(), gb64, rtol=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_triton_no_grad_forward_matches():
    p, t = torch.randn(13, 9), torch.randn(13, 9)
    with torch.no_grad():
        got = vf.sigmoid_loss(p, t, logit_scale=10.0, logit_bias=-10.0, backend="triton")
    want = eager(p.double(), t.double(), 10.0, -10.0, True, "mean")
    assert_close_2x(got, want, want, F32, "loss")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_triton_rows_below_eps_get_zero_gradients(dtype):
    """A zero row (every dtype) and, where the dtype holds it, a row of norm ~1e-15 < eps: its
    logits use the clamped value x / eps, its gradient is zero, the others stay exact."""
    tiny = 1e-15 if dtype != F16 else 0.0  # fp16 cannot hold a nonzero row below 1e-12
    g = torch.Generator().manual_seed(5)
    p = torch.randn(9, 16, generator=g)
    t = torch.randn(9, 16, generator=g)
    p[2] = torch.randn(16, generator=g) * tiny
    t[5] = 0
    p, t = p.to(dtype), t.to(dtype)
    pl, tl = p.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = vf.sigmoid_loss(pl, tl, logit_scale=5.0, logit_bias=-2.0, backend="triton")
    gp, gt = torch.autograd.grad(loss, (pl, tl))
    assert torch.all(gp[2] == 0) and torch.all(gt[5] == 0)
    p64, t64 = p.double().requires_grad_(True), t.double().requires_grad_(True)
    want = reference.sigmoid_loss(p64, t64, logit_scale=5.0, logit_bias=-2.0)
    w = torch.autograd.grad(want, (p64, t64))
    pe, te = p.float().requires_grad_(True), t.float().requires_grad_(True)
    ref = reference.sigmoid_loss(pe, te, logit_scale=5.0, logit_bias=-2.0)
    e = torch.autograd.grad(ref, (pe, te))
    assert_close_2x(loss, ref, want, F32, "loss")
    assert_close_2x(gp, e[0], w[0], dtype, "dpred")
    assert_close_2x(gt, e[1], w[1], dtype, "dtarget")


@pytest.mark.interpret
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_repeats_are_bit_identical(monkeypatch, reduction):
    _budget_for(monkeypatch, 5, 23, BF16)
    first = check_backend("triton", 23, 10, BF16, True, reduction)
    second = check_backend("triton", 23, 10, BF16, True, reduction)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(x, y) for x, y in zip(first[1], second[1]))


@pytest.mark.interpret
def test_triton_non_contiguous_inputs():
    base = torch.randn(20, 14)
    p, t = base[::2, ::2], base[1::2, 1::2].T.contiguous().T  # a step and a transposed copy
    pl, tl = p.clone().requires_grad_(True), t.clone().requires_grad_(True)
    got = vf.sigmoid_loss(p, t, logit_scale=3.0, logit_bias=-1.0, backend="triton")
    want = vf.sigmoid_loss(pl, tl, logit_scale=3.0, logit_bias=-1.0, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_triton_compile_fullgraph_training_step():
    """torch.compile(fullgraph=True) traces through the custom ops (fake functions) and gives the
    eager call's value and gradients bit for bit."""
    p, t = torch.randn(11, 6, requires_grad=True), torch.randn(11, 6, requires_grad=True)
    s = torch.tensor(2.3, requires_grad=True)
    b = torch.tensor(-5.0, requires_grad=True)

    def f(p, t, s, b):
        return vf.sigmoid_loss(p, t, logit_scale=s.exp(), logit_bias=b, backend="triton")

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(p, t, s, b)
    got = torch.autograd.grad(out, (p, t, s, b))
    ref = f(p, t, s, b)
    want = torch.autograd.grad(ref, (p, t, s, b))
    assert torch.equal(out, ref)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_16bit_inputs_take_the_fused_kernel(monkeypatch, dtype):
    """fp16/bf16: the logits and the epilogue in ONE kernel (_fused_kernel), no vendor GEMM for
    the logits and no [c, M] fp32 buffer; fp32: the vendor GEMM and _epilogue_kernel."""
    K = _kernels()
    ran: list[str] = []
    real_launch, real_gemm = K.launch, K._gemm_nt

    def spy_launch(kernel, grid, *args, **kwargs):
        ran.append(getattr(getattr(kernel, "fn", kernel), "__name__", "?"))
        return real_launch(kernel, grid, *args, **kwargs)

    def spy_gemm(x, y, out):
        ran.append("gemm_nt")
        return real_gemm(x, y, out)

    monkeypatch.setattr(K, "launch", spy_launch)
    monkeypatch.setattr(K, "_gemm_nt", spy_gemm)
    N = 37
    _budget_for(monkeypatch, 5, N, dtype)
    with poisoned_allocations() as made:
        check_backend("triton", N, 20, dtype, True, "mean")
        with torch.no_grad():
            vf.sigmoid_loss(torch.randn(N, 20).to(dtype), torch.randn(N, 20).to(dtype),
                            logit_scale=3.0, logit_bias=-1.0, backend="triton")  # fmt: skip
    block = [t for t in made if t.dtype == F32 and t.dim() == 2 and t.shape[1] == N]
    if dtype == F32:
        assert "_fused_kernel" not in ran and "gemm_nt" in ran and "_epilogue_kernel" in ran
        assert block, "the fp32 path lost its score block"
    else:
        assert "_fused_kernel" in ran, ran
        assert "gemm_nt" not in ran and "_epilogue_kernel" not in ran, ran
        assert not block, f"an fp32 [c, M] buffer was allocated: {[t.shape for t in block]}"


def _direct_case(N, M, D, dtype, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    magnitude = 1.0 if normalize else 0.3
    a = (torch.randn(N, D, generator=g) * magnitude).to(dtype)
    b = (torch.randn(M, D, generator=g) * magnitude).to(dtype)
    a[N // 2] = 0  # a zero row on each side
    b[M // 3] = 0
    g_row = torch.randn(N, generator=g)
    return a, b, g_row


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("offset", [-3, 0, 20])
def test_fused_rectangular_offsets_against_float64(dtype, normalize, offset):
    """The kernels called directly on a rectangular problem (37 rows against 50 columns, as a
    rank of the distributed path sees it), positives at column i + offset (off the block for
    some rows: offset -3 and 20), per-row upstream gradients, chunks of 10 rows: row sums and
    the four gradients against float64, the loss-and-gradient pass equal to the separate ones
    bit for bit."""
    K = _kernels()
    N, M, D = 37, 50, 20
    scale, bias = 4.0, -2.5
    a, b, g_row = _direct_case(N, M, D, dtype, normalize, 11 + offset)
    params = torch.tensor([scale, bias])
    eps = reference.NORM_EPS
    with poisoned_allocations() as made:
        rows = K.sigmoid_forward(a, b, params, offset, normalize, eps=eps, chunk=10)
        both = K.sigmoid_backward(a, b, params, offset, normalize, g_row, eps=eps, chunk=10,
                                  with_loss=True)  # fmt: skip
        grads = K.sigmoid_backward(a, b, params, offset, normalize, g_row, eps=eps, chunk=10)
    assert made
    assert torch.equal(both[0], rows) and grads[0] is None
    assert all(torch.equal(x, y) for x, y in zip(both[1:], grads[1:]))
    results = {}
    for dt in (torch.float64, dtype):
        p = a.to(dt).requires_grad_(True)
        t = b.to(dt).requires_grad_(True)
        sd = torch.float64 if dt == torch.float64 else F32
        s = torch.tensor(scale, dtype=sd, requires_grad=True)
        bb = torch.tensor(bias, dtype=sd, requires_grad=True)
        r = eager(p, t, s, bb, normalize, "none", offset=offset)
        gr = torch.autograd.grad(r, (p, t, s, bb), g_row.to(r.dtype))
        results[dt] = (r.detach(), gr)
    exact, ref = results[torch.float64], results[dtype]
    assert_close_2x(rows, ref[0], exact[0], F32, "rows")
    da, db, dp = grads[1:]
    assert da.dtype == dtype and db.dtype == dtype and dp.dtype == F32
    assert_close_2x(da, ref[1][0], exact[1][0], dtype, "dpred")
    assert_close_2x(db, ref[1][1], exact[1][1], dtype, "dtarget")
    assert_close_2x(dp[0], ref[1][2], exact[1][2], F32, "dscale")
    assert_close_2x(dp[1], ref[1][3], exact[1][3], F32, "dbias")
    if normalize:
        assert torch.all(da[N // 2] == 0) and torch.all(db[M // 3] == 0)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype, reduction", [(BF16, "mean"), (F16, "none")], ids=str)
def test_fused_sm90_tile_under_the_interpreter(monkeypatch, dtype, reduction):
    """The GPU's 128 x 128 x 64 tile itself (not the interpreter's small one): 150 rows in
    chunks of 64 (64 + 64 + 22), D = 70 (a full and a ragged K step), two column blocks, a
    zero row, NaN-poisoned allocations."""
    K = _kernels()
    monkeypatch.setattr(K, "FUSED_INTERPRET", K.FUSED_HOPPER)
    assert K.fused_config(torch.empty(1)) == K.FUSED_HOPPER
    _budget_for(monkeypatch, 64, 150, dtype)
    with poisoned_allocations() as made:
        check_backend("triton", 150, 70, dtype, True, reduction, zero_rows=(3,))
    assert made


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_fused_inf_row_stays_in_its_row(dtype):
    """The NaN rule on the fused path (docs/sigmoid_loss.md): without normalize a pred row
    holding Inf has a non-finite row sum (NaN: Inf x 0 in the tile's padding columns), and
    every other row is exact (37 columns: the second column block is mostly padding)."""
    g = torch.Generator().manual_seed(3)
    p = (torch.randn(37, 20, generator=g) * 0.3).to(dtype)
    t = (torch.randn(37, 20, generator=g) * 0.3).to(dtype)
    p[2, 0] = float("inf")
    with torch.no_grad():
        got = vf.sigmoid_loss(p, t, logit_scale=4.0, logit_bias=-2.5, normalize=False,
                              reduction="none", backend="triton")  # fmt: skip
    assert not torch.isfinite(got[2])
    keep = torch.arange(37) != 2
    want = eager(p.double(), t.double(), 4.0, -2.5, False, "none")
    ref = eager(p, t, 4.0, -2.5, False, "none")
    assert_close_2x(got[keep], ref[keep], want[keep], F32, "rows")


@pytest.mark.interpret
def test_distributed_gloo_triton():
    check_distributed([3, 5], "triton", "mean")


@pytest.mark.interpret
def test_distributed_gloo_triton_none():
    check_distributed([2, 3], "triton", "none", normalize=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_triton_matches_float64_chunked(monkeypatch, dtype, reduction):
    """The CUDA path (16-bit: the compiled fused kernel, fp32: torch.mm and the epilogue; the
    gradient GEMMs torch.mm / addmm into fp32): 777 rows in chunks of 128 (gradient pass),
    zero rows, against the float64 formula."""
    _budget_for(monkeypatch, 128, 777, dtype)
    check_backend("triton", 777, 136, dtype, True, reduction, zero_rows=(5,), device="cuda")
    check_backend("triton", 777, 136, dtype, False, reduction, device="cuda")


@pytest.mark.gpu
def test_gpu_triton_repeats_are_bit_identical():
    first = check_backend("triton", 1000, 64, BF16, True, "mean", device="cuda")
    second = check_backend("triton", 1000, 64, BF16, True, "mean", device="cuda")
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(x, y) for x, y in zip(first[1], second[1]))


# ------------------------------------------------------------------------------ compile


def _signature(kernel, dtype: torch.dtype, constexprs: dict, inputs: tuple[str, ...]):
    from tests._aot import pointer_type

    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in inputs:
            sig[name] = pointer_type(dtype)
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _compile(kernel, dtype, arch, constexprs, inputs=(), num_warps=4, num_stages=3):
    from tests._aot import aot_compile

    sig = _signature(kernel, dtype, constexprs, inputs)
    aligned = [n for n, ty in sig.items() if ty.startswith("*") or n in ("D", "M")]
    report = aot_compile(
        kernel,
        sig,
        constexprs,
        arch=arch,
        divisible_by_16=aligned,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    assert report.n_spills == 0, f"{report.name} sm_{arch}: {report.n_spills} bytes spilled"
    assert report.shared <= report.shared_limit, f"{report.name}: {report.shared} B shared"
    return report


_VARIANTS = [(True, False), (False, True), (True, True)]  # (LOSS, GRAD)


@pytest.mark.compile
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("loss, grad", _VARIANTS)
def test_fused_kernel_sm90_uses_wide_wgmma_without_spills(dtype, loss, grad):
    """The sm_90 tile (FUSED_HOPPER): the K-loop's tl.dot is wgmma with instruction N >= 64
    (m64n128k16 for the 128-column tile), and the register epilogue does not spill."""
    import re

    K = _kernels()
    cfg = K.FUSED_HOPPER
    for normalize in (True, False):
        flags = dict(NORMALIZE=normalize, LOSS=loss, GRAD=grad, INTERPRET=False, BM=cfg.BM,
                     BN=cfg.BN, BK=cfg.BK)  # fmt: skip
        report = _compile(K._fused_kernel, dtype, 90, flags, inputs=("a_ptr", "b_ptr", "h_ptr"),
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
        assert report.uses_wgmma, f"{report.name}: no wgmma on sm_90"
        widths = {int(n) for n in re.findall(r"wgmma\.mma_async\S*\.m64n(\d+)k", report.ptx)}
        assert widths and min(widths) >= 64, f"{report.name}: wgmma instruction N {widths}"
        assert widths == {cfg.BN}, widths
        assert "WGMMA" in report.sass.upper() or "HGMMA" in report.sass.upper()


@pytest.mark.compile
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_fused_kernel_sm80_compiles_without_spills(dtype):
    """The sm_80 tile (FUSED_AMPERE): mma.sync, no spill, in every variant."""
    K = _kernels()
    cfg = K.FUSED_AMPERE
    for (loss, grad), normalize in [(v, n) for v in _VARIANTS for n in (True, False)]:
        flags = dict(NORMALIZE=normalize, LOSS=loss, GRAD=grad, INTERPRET=False, BM=cfg.BM,
                     BN=cfg.BN, BK=cfg.BK)  # fmt: skip
        report = _compile(K._fused_kernel, dtype, 80, flags, inputs=("a_ptr", "b_ptr", "h_ptr"),
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
        assert "mma.sync" in report.ptx and not report.uses_wgmma


@pytest.mark.compile
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("loss, grad", _VARIANTS)
def test_epilogue_compiles_without_spills(arch, loss, grad):
    """The fp32 path's epilogue (16-bit inputs take the fused kernel instead)."""
    from vljepa_fast._kernels import sigmoid_loss as K

    BR, BC = K.EPILOGUE_BLOCK
    for normalize in (True, False):
        flags = dict(NORMALIZE=normalize, LOSS=loss, GRAD=grad, BR=BR, BC=BC)
        _compile(
            K._epilogue_kernel, F32, arch, flags, inputs=("h_ptr",), num_warps=K._EPILOGUE_WARPS
        )


@pytest.mark.compile
@pytest.mark.parametrize("arch", [80, 90])
def test_small_kernels_compile_without_spills(arch):
    from vljepa_fast._kernels import sigmoid_loss as K

    BR, BD = K._ROW_BLOCK
    for dtype in (F32, F16, BF16):
        _compile(
            K._inv_norm_kernel,
            dtype,
            arch,
            dict(EPS=reference.NORM_EPS, BR=BR, BD=BD),
            inputs=("x_ptr",),
        )
        _compile(K._scale_rows_kernel, dtype, arch, dict(BR=BR, BD=BD), inputs=("x_ptr", "out_ptr"))
        for normalize in (True, False):
            _compile(
                K._finalize_kernel,
                dtype,
                arch,
                dict(NORMALIZE=normalize, BR=BR, BD=BD),
                inputs=("x_ptr", "out_ptr"),
            )
    _compile(K._sum_parts_kernel, F32, arch, dict(BL=K._SUM_BLOCK))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_triton_mean_gradients_are_formed_at_the_losss_scale(dtype):
    """Regression (new-user review): the one-pass "mean" path held the gradient of the bare sum
    (N x the loss's) in the input dtype, which overflowed fp16 to inf where the true gradient
    fits (near-identical targets, tiny pred rows: |dpred| ~ 4e3), and rounded bf16 twice. It now
    forms the gradients at 1 / N: within twice the eager formula's error in the input dtype."""
    g = torch.Generator().manual_seed(7)
    N, D = 64, 16
    v = torch.randn(1, D, generator=g)
    p = (torch.randn(N, D, generator=g) * 1e-5).to(dtype)
    t = (v + 0.01 * torch.randn(N, D, generator=g)).to(dtype)
    grads = {}
    for dt, backend in ((dtype, "triton"), (torch.float64, None), (dtype, None)):
        pl, tl = p.to(dt).requires_grad_(), t.to(dt).requires_grad_()
        if backend:
            loss = vf.sigmoid_loss(pl, tl, logit_scale=10.0, logit_bias=-10.0, backend=backend)
        else:
            loss = eager(pl, tl, 10.0, -10.0, True, "mean")
        grads[(dt, backend)] = (loss.detach(), *torch.autograd.grad(loss, (pl, tl)))
    got, exact, ref = grads[(dtype, "triton")], grads[(torch.float64, None)], grads[(dtype, None)]
    # the loss's gradient fits fp16, the bare sum's (N x larger) would not
    assert exact[1].abs().max() < 6e4 < N * exact[1].abs().max()
    assert_close_2x(got[0], ref[0].float(), exact[0], torch.float32, "loss")
    for i, name in ((1, "dpred"), (2, "dtarget")):
        assert torch.isfinite(got[i]).all(), name
        assert_close_2x(got[i], ref[i], exact[i], dtype, name)


@pytest.mark.interpret
@pytest.mark.parametrize("chunk", [0, -1, 2.0, True])
def test_kernel_refuses_a_chunk_that_is_not_a_positive_int(chunk):
    """Regression (new-user review): chunk 0 or -1 ran silently as 1."""
    from vljepa_fast._kernels import sigmoid_loss as kernel

    a = torch.randn(5, 4)
    params = torch.tensor([10.0, -10.0])
    with pytest.raises(ValueError, match="chunk: expected an int >= 1"):
        kernel.sigmoid_forward(a, a, params, 0, True, eps=reference.NORM_EPS, chunk=chunk)
