"""infonce_fwd / infonce_bwd CUDA kernels (csrc/cuda/infonce.cu: vendor GEMMs on row chunks of
a plus our epilogue kernels) against the float64 reference.

gpu: the oracle is ``reference.infonce_terms`` in float64 with autograd for the three gradients;
a kernel passes when its error is at most 2x that of the same reference run in the input dtype,
plus a floor (tests/_util.py). Every case draws fresh inputs with duplicate rows, and the CUDA
caching allocator is NaN-poisoned before each kernel call, so an output element the kernels
leave unwritten (or a buffer read before it is written) cannot pass. Odd shapes, every dtype,
normalize on/off, col_stats on/off, offsets past the diagonal, chunk sizes (passed directly as
the ops' ``chunk``) that do not divide N, a chunk of one row and one larger than N, the default
chunk, logits up to 1e4, zero rows, tiny upstream weights (the backward's power of two against
fp16 underflow), bit-identical repeats, and the extra memory of the chunked design.
compile (no GPU needed): the sm_90a code of the library's infonce kernels has no spills (cuobjdump
--dump-resource-usage) and no matrix-engine instruction (cuobjdump -sass): the products are
vendor GEMMs, no WMMA or FMA tile GEMM is left in infonce.cu.
"""

from __future__ import annotations

import re

import pytest
import torch

import vljepa_fast as vf
from tests._util import (
    assert_close_2x,
    assert_no_spills,
    check_against_float64,
    cuda_library_dump,
    dump_sections,
    infonce_terms_and_grads,
)
from vljepa_fast import _ext, reference

gpu = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# (N, M, D, offset): sizes inside one 64-row block, M > N with and without an offset, the largest
# offset M - N, a single feature.
SMALL = [(1, 1, 1, 0), (1, 5, 72, 3), (5, 5, 72, 0), (5, 127, 1, 60), (5, 300, 72, 295)]
# Several row blocks and 1024-column splits, ragged last blocks, M not a multiple of 4 or 8 (the
# epilogues' scalar path), D = 72, D = 1536 (VL-JEPA), D = 100.
LARGE = [
    (127, 127, 72, 0),
    (127, 300, 72, 100),
    (300, 300, 1, 0),
    (200, 260, 1536, 60),
    (130, 130, 100, 0),
    (3001, 3077, 40, 70),
    (1100, 2050, 24, 950),
]
# (N, M, D, offset, chunk): chunks that do not divide N (a short last chunk), one row per chunk,
# a chunk larger than N, 0 (the kernel's default).
CHUNKED = [
    (127, 300, 72, 100, 1),
    (127, 300, 72, 100, 5),
    (127, 300, 72, 100, 64),
    (127, 300, 72, 100, 100),
    (127, 300, 72, 100, 1000),
    (127, 300, 72, 100, 0),
    (300, 300, 40, 0, 7),
    (3001, 3077, 40, 70, 700),
    (1100, 2050, 24, 950, 129),
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
    """NaN-fill cached blocks of both allocator pools, so that outputs and work buffers the
    kernels allocate with at::empty start as NaN (best effort: the caching allocator hands freed
    blocks back as is)."""
    small = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(64)]  # 256 KiB
    large = torch.full((1 << 26,), float("nan"), device="cuda")  # 256 MiB
    del small, large


def _fwd(a, b, scale, offset, normalize, col_stats, chunk):
    _poison_allocator()
    return torch.ops.vljepa_fast.infonce_fwd(a, b, scale, offset, normalize, col_stats, chunk)


def _bwd(a, b, scale, offset, normalize, out, g_row, g_col, chunk):
    _poison_allocator()
    col_lse = out[1] if g_col is not None else None
    return torch.ops.vljepa_fast.infonce_bwd(
        a, b, scale, offset, normalize, out[0], col_lse, g_row, g_col, chunk
    )


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
    chunk=0,
    g_scale=1.0,
):
    a, b = _inputs(n, m, d, dtype, seed=seed, magnitude=magnitude)
    if zero_rows:
        a[n // 2] = 0
        b[m // 3] = 0
    scale = torch.tensor(1.0 / temperature, dtype=torch.float32, device="cuda")
    g = torch.Generator().manual_seed(seed + 1)
    g_row = (torch.randn(n, generator=g) * g_scale).cuda()
    g_col = (torch.randn(m, generator=g) * g_scale).cuda() if col_stats else None

    out = _fwd(a, b, scale, offset, normalize, col_stats, chunk)
    # The LSEs are float64 (the backward needs them to better than float), the positives float32.
    assert [t.dtype for t in out] == [torch.float64, torch.float64, torch.float32, torch.float32]
    assert all(t.is_cuda for t in out)
    if not col_stats:
        assert out[1].shape == (0,) and out[3].shape == (0,)
    got_terms = list(out) if col_stats else [out[0], out[2]]
    da, db, ds = _bwd(a, b, scale, offset, normalize, out, g_row, g_col, chunk)
    torch.cuda.synchronize()
    assert da.dtype == dtype and db.dtype == dtype and ds.dtype == torch.float32 and ds.dim() == 0
    assert da.shape == a.shape and db.shape == b.shape

    check_against_float64(
        got_terms, (da, db, ds), a, b, scale, offset, normalize, col_stats, g_row, g_col
    )
    if zero_rows and normalize:  # zero-row rule: their gradients are exactly 0
        assert da[n // 2].abs().max() == 0 and db[m // 3].abs().max() == 0


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("col_stats", [True, False], ids=["cols", "rows"])
@pytest.mark.parametrize("n,m,d,offset", SMALL)
def test_small_matches_float64(cuda_lib, n, m, d, offset, dtype, normalize, col_stats):
    _check(n, m, d, offset, dtype, normalize, col_stats, seed=n * 1000 + m + d + offset)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "normalize,col_stats",
    [(True, True), (False, True), (True, False)],
    ids=["norm-cols", "raw-cols", "norm-rows"],
)
@pytest.mark.parametrize("n,m,d,offset", LARGE)
def test_large_matches_float64(cuda_lib, n, m, d, offset, dtype, normalize, col_stats):
    _check(n, m, d, offset, dtype, normalize, col_stats, seed=n * 1000 + m + d + offset)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "normalize,col_stats",
    [(True, True), (False, True), (True, False)],
    ids=["norm-cols", "raw-cols", "norm-rows"],
)
@pytest.mark.parametrize("n,m,d,offset,chunk", CHUNKED)
def test_chunks_match_float64(cuda_lib, n, m, d, offset, chunk, dtype, normalize, col_stats):
    """Row chunks that do not divide N: row LSEs complete per chunk, column statistics and dB
    merged over chunks, dA written chunk by chunk."""
    seed = n * 1000 + m + d + offset + chunk
    _check(n, m, d, offset, dtype, normalize, col_stats, seed=seed, chunk=chunk)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("chunk", [0, 50])
def test_huge_logits_stay_finite(cuda_lib, dtype, normalize, chunk):
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
        chunk=chunk,
    )


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("chunk", [0, 16])
def test_zero_rows_get_zero_gradients(cuda_lib, dtype, chunk):
    _check(70, 90, 40, 5, dtype, True, True, temperature=0.1, seed=3, zero_rows=True, chunk=chunk)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("factor", [2.0**-24, 2.0**8], ids=["tiny-g", "large-g"])
def test_gradient_weights_far_from_one(cuda_lib, dtype, factor):
    """Upstream weights g * 2^-24 (dS far below fp16's range: the power of two 2^k must lift H)
    and g * 2^8 (H would overflow fp16 without it), at a batch where p ~ 1 / M. The gradients are
    linear in g: held to the tolerance rule on the problem rescaled by 1 / factor (the floor would
    hide anything at 2^-24 otherwise), and for fp32 / bf16 (no output underflow) bit for bit equal
    to factor times those at g, since 2^k absorbs the factor exactly."""
    n, m, d, chunk = 700, 1500, 64, 300
    a, b = _inputs(n, m, d, dtype, seed=21)
    scale = torch.tensor(20.0, device="cuda")
    gen = torch.Generator().manual_seed(22)
    g_row, g_col = (torch.randn(k, generator=gen).cuda() for k in (n, m))
    out = _fwd(a, b, scale, 0, True, True, chunk)
    base = _bwd(a, b, scale, 0, True, out, g_row, g_col, chunk)
    got = _bwd(a, b, scale, 0, True, out, g_row * factor, g_col * factor, chunk)
    gs = (g_row * factor, g_col * factor)
    _, exact = infonce_terms_and_grads(a, b, scale, 0, True, True, *gs, torch.float64)
    _, eager = infonce_terms_and_grads(a, b, scale, 0, True, True, *gs, torch.float32)
    for name, x, e, ex in zip(["da", "db", "dscale"], got, eager, exact):
        tol = dtype if name != "dscale" else torch.float32
        assert_close_2x(x.double() / factor, e.double() / factor, ex / factor, tol, name)
    if dtype != torch.float16:
        for name, x, y in zip(["da", "db", "dscale"], got, base):
            assert torch.equal(x.double(), y.double() * factor), name


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("chunk", [0, 37])
def test_deterministic(cuda_lib, dtype, chunk):
    """Repeats are bit-identical (fixed chunk order, fixed reduction trees, no atomics)."""
    a, b = _inputs(300, 3333, 200, dtype, seed=11)
    scale = torch.tensor(14.0, device="cuda")
    g_row, g_col = torch.rand(300, device="cuda"), torch.rand(3333, device="cuda")
    runs = []
    for _ in range(2):
        out = _fwd(a, b, scale, 0, True, True, chunk)
        runs.append(out + _bwd(a, b, scale, 0, True, out, g_row, g_col, chunk))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@gpu
def test_default_chunk_is_the_rule_floor(cuda_lib):
    """chunk = 0 takes 1 GiB / (M * bytes per pair) rows (the floor of vljepa_fast/ops/_chunks.py):
    all of a small N, so the results are those of chunk = N bit for bit (the same chunking)."""
    a, b = _inputs(200, 260, 64, torch.bfloat16, seed=19)
    scale = torch.tensor(14.0, device="cuda")
    g_row, g_col = torch.rand(200, device="cuda"), torch.rand(260, device="cuda")
    results = {}
    for chunk in (0, 200):
        out = _fwd(a, b, scale, 0, True, True, chunk)
        results[chunk] = out + _bwd(a, b, scale, 0, True, out, g_row, g_col, chunk)
    for x, y in zip(results[0], results[200]):
        assert torch.equal(x, y)


@gpu
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


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_no_n_by_m_buffer(cuda_lib, dtype):
    """Extra memory is the documented chunk buffers (csrc/cuda/infonce.cu header), never N x M."""
    n = m = 8192
    d, chunk = 64, 512
    a, b = _inputs(n, m, d, dtype, seed=5)
    scale = torch.tensor(14.0, device="cuda")
    g = torch.full((n,), 1.0 / n, device="cuda")
    # Warm-up: cuBLAS allocates its workspace through the caching allocator on first use.
    out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, 0, True, True, chunk)
    torch.ops.vljepa_fast.infonce_bwd(a, b, scale, 0, True, out[0], out[1], g, g, chunk)
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = torch.ops.vljepa_fast.infonce_fwd(a, b, scale, 0, True, True, chunk)
    grads = torch.ops.vljepa_fast.infonce_bwd(a, b, scale, 0, True, out[0], out[1], g, g, chunk)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    e = a.element_size()
    # Backward: [chunk, M] fp32 S + H in the GEMM dtype (none for fp32), [chunk, D] G (fp32) and
    # Â, E [M, D] fp32 (16-bit only), the outputs dA, dB; plus [N], [M] vectors (LSEs, hi/lo, g,
    # inverse norms, partials): under 256 (N + M) bytes. An N x M fp32 buffer alone is 256 MiB.
    h_bytes = 0 if dtype == torch.float32 else e
    e_bytes = 0 if dtype == torch.float32 else 4 * m * d
    bound = chunk * m * (4 + h_bytes) + e_bytes + chunk * d * (4 + e) + (n + m) * d * e
    bound += 256 * (n + m)
    assert extra < bound, f"peak grew by {extra / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    assert all(torch.isfinite(t).all() for t in grads)


@gpu
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
        chunk=0,
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
        "chunk_negative": dict(chunk=-1),
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
    "chunk_negative": "chunk must be >= 0",
}


@gpu
@pytest.mark.parametrize("case", CUDA_BAD)
def test_bad_calls_raise(cuda_lib, case):
    """Direct calls through torch.ops.vljepa_fast: a RuntimeError naming the argument, never a
    kernel launch that reads outside a tensor."""
    match = CUDA_BAD[case]
    x = _bad_args(case)
    if "row_lse" not in case and "g_row" not in case:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.vljepa_fast.infonce_fwd(
                x["a"], x["b"], x["scale"], x["offset"], True, True, x["chunk"]
            )
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vljepa_fast.infonce_bwd(
            x["a"],
            x["b"],
            x["scale"],
            x["offset"],
            True,
            x["row_lse"],
            None,
            x["g_row"],
            None,
            x["chunk"],
        )
    torch.cuda.synchronize()  # no asynchronous fault was left behind either


# The kernels of csrc/cuda/infonce.cu: nvcc names the anonymous namespace of a translation unit
# after its file, so every function of that file (the shared inverse-norm kernel's instances too)
# carries this tag in its mangled name.
INFONCE_TAG = "_infonce_cu_"
INFONCE_KERNELS = (
    "infonce_fwd_epilogue_kernel",
    "infonce_fwd_merge_kernel",
    "infonce_bwd_epilogue_kernel",
    "infonce_pow2_kernel",
    "infonce_sum_kernel",
    "infonce_scale_rows_kernel",
    "infonce_finalize_kernel",
    "inv_norm_kernel",
)
# Matrix-engine instructions (mma.sync / WMMA compile to HMMA, wgmma to HGMMA; integer and binary
# forms for completeness): the infonce products are vendor GEMMs, none may appear in our code.
MMA_OPCODES = re.compile(r"\b(HMMA|HGMMA|IMMA|IGMMA|BMMA|BGMMA|QMMA|QGMMA|DMMA)\b")


def _infonce_sections(text: str, header: str) -> dict[str, str]:
    """{mangled name: its section} of the infonce.cu functions in a cuobjdump listing."""
    found = dump_sections(text, header, INFONCE_TAG)
    for kernel in INFONCE_KERNELS:
        assert any(kernel in name for name in found), f"{kernel} missing from the sm_90a code"
    return found


@pytest.mark.compile
def test_sm90a_infonce_kernels_have_no_spills():
    """ptxas's resources of every infonce.cu kernel for sm_90a (the fatbin's arch-specific Hopper
    code): no stack frame and no local memory, i.e. no register spills."""
    text = cuda_library_dump("--dump-resource-usage", "-arch", "sm_90a")
    assert_no_spills(_infonce_sections(text, r"Function"), "sm_90a")


@pytest.mark.compile
def test_sm90a_infonce_kernels_have_no_gemm_loops():
    """No matrix-engine instruction in any infonce.cu kernel (the WMMA tile GEMM and the
    scalar-FMA gradient products are gone: cuBLAS does every O(N M D) product), and only the
    epilogue, merge and finalize kernels of the chunked design exist."""
    text = cuda_library_dump("-sass", "-arch", "sm_90a")
    sections = _infonce_sections(text, r"Function :")
    for name, body in sections.items():
        hit = MMA_OPCODES.search(body)
        assert hit is None, f"{name}: matrix instruction {hit.group(0)} in the sm_90a SASS"
        assert any(kernel in name for kernel in INFONCE_KERNELS), f"unexpected kernel {name}"
