"""The ``cuda`` backend of vf.attention / vf.attention_varlen (csrc/cuda/attention*.cu, CuTe flash
attention; vljepa_fast/ops/attention_cuda.py).

gpu: forward and every gradient against the float64 eager reference (a result passes when its
error is at most 2x that of the reference run in the same dtype plus a floor: tests/_util.py):
GQA ratios 1, 4 and 8, head dims 64 and 128, fp16 and bf16, key padding from 0 to 90%, a batch
entry with no real key (exactly zero output and gradients), causal with T < S and T > S, sliding
windows, packed varlen sequences with empty ones, padded queries (seqlens_q: rows zeroed, no
gradient), both backward paths (fp32 atomics; deterministic, bit-identical across runs). The CUDA
caching allocator is NaN-filled before every kernel call and padded keys/values hold NaN, so an
output the kernels leave unwritten or a read past a sequence cannot pass.
cpu: the records refuse with readable reasons (no GPU here; wrong dtype, head dim, scale), the
native checks (shared by the CUDA kernels and the Meta functions) refuse bad direct calls with
messages, the CUTLASS headers are found (or the message says what to install or carry), and the
staging command copies what the build needs.
compile: the built library's attention kernels, for sm_80 and sm_90a, have no register spills
(cuobjdump --dump-resource-usage: no stack, no local memory) and run their products on tensor
cores (HMMA, i.e. mma.sync, in the SASS); no extra nvcc compile, the library CI builds is read.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

import vljepa_fast as vf
from tests._util import assert_no_spills, cuda_library_dump, dump_sections
from tests.test_attention_gpu import check, padded_inputs, randn
from vljepa_fast import _backends, _ext, reference
from vljepa_fast.ops import attention_cuda
from vljepa_fast.ops.attention import attention_inputs, varlen_inputs

gpu = pytest.mark.gpu
F16, BF16 = torch.float16, torch.bfloat16
ATTENTION_KERNELS = (
    "attention_fwd_kernel",
    "attention_delta_kernel",
    "attention_dkdv_kernel",
    "attention_dq_kernel",
)
#: the kernels whose products must be tensor-core MMAs
MMA_KERNELS = ("attention_fwd_kernel", "attention_dkdv_kernel", "attention_dq_kernel")


# ------------------------------------------------------------------------------ gpu helpers


def poison_allocator() -> None:
    """NaN-fill cached blocks of both allocator pools, so that tensors the native code allocates
    with at::empty start as NaN (the caching allocator hands freed blocks back as they are)."""
    small = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(64)]
    large = torch.full((1 << 26,), float("nan"), device="cuda")
    del small, large


def run_cuda(fn, inputs: tuple[Tensor, ...], do: Tensor):
    """(out, grads) of ``fn`` on copies of ``inputs``, the allocator poisoned before the forward
    and before the backward."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    poison_allocator()
    out = fn(*leaves)
    poison_allocator()
    grads = torch.autograd.grad(out, leaves, do)
    torch.cuda.synchronize()
    return out.detach(), grads


# (B, T, S, Hq, Hkv, D, causal, dtype, window, key lengths or None)
DENSE = [
    pytest.param(2, 300, 300, 8, 8, 64, False, BF16, (-1, -1), None, id="mha-bf16"),
    pytest.param(2, 300, 300, 32, 8, 64, False, F16, (-1, -1), [300, 171], id="gqa4-f16-pad43"),
    pytest.param(2, 257, 257, 16, 2, 128, False, BF16, (-1, -1), [257, 26], id="gqa8-d128-pad90"),
    pytest.param(3, 129, 129, 8, 2, 64, False, BF16, (-1, -1), [129, 0, 77], id="no-real-key"),
    pytest.param(2, 300, 300, 32, 8, 64, True, BF16, (-1, -1), None, id="causal-bf16"),
    pytest.param(2, 37, 301, 8, 2, 64, True, F16, (-1, -1), [301, 100], id="causal-T<S-pad"),
    pytest.param(2, 301, 37, 8, 2, 128, True, BF16, (-1, -1), None, id="causal-T>S-d128"),
    pytest.param(2, 600, 600, 32, 8, 64, False, BF16, (64, 64), None, id="window-sym"),
    pytest.param(2, 600, 600, 8, 2, 64, True, F16, (128, -1), [600, 350], id="window-causal-pad"),
    pytest.param(2, 37, 301, 8, 2, 64, False, BF16, (20, 5), [301, 100], id="window-T<S-pad"),
    pytest.param(2, 301, 37, 8, 2, 128, False, F16, (-1, 3), None, id="window-right-T>S"),
    pytest.param(1, 4133, 4133, 8, 2, 64, False, BF16, (-1, -1), [4133], id="long-bf16"),
    pytest.param(1, 4133, 4133, 8, 2, 64, False, F16, (256, 0), None, id="long-window-left"),
]


@gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize("B, T, S, Hq, Hkv, D, causal, dtype, window, lengths", DENSE)
def test_gpu_cuda_attention_matches_float64(
    B, T, S, Hq, Hkv, D, causal, dtype, window, lengths, deterministic
):
    seed = B + T + 3 * S + Hq + D + 7 * causal + window[0]
    kern, ref, mask = padded_inputs(B, T, S, Hq, Hkv, D, dtype, lengths, seed)
    do = randn(B, T, Hq, D, dtype=dtype, seed=seed + 3)
    kw = dict(key_padding_mask=mask, causal=causal, window_size=window)
    with torch.use_deterministic_algorithms(deterministic):
        got = run_cuda(lambda q, k, v: vf.attention(q, k, v, backend="cuda", **kw), kern, do)
    check(got, kern, ref, do, dtype, lambda q, k, v: reference.attention(q, k, v, **kw))
    if lengths is not None and 0 in lengths:
        b = lengths.index(0)
        out, grads = got
        assert torch.equal(out[b], torch.zeros_like(out[b])), "a query without keys must give 0"
        for name, g in zip(("dq", "dk", "dv"), grads):
            assert torch.equal(g[b], torch.zeros_like(g[b])), f"{name}: entry {b} must be 0"
    if lengths is not None:  # padded keys get exactly zero gradients
        for name, g in zip(("dk", "dv"), got[1][1:]):
            assert torch.equal(g[~mask], torch.zeros_like(g[~mask])), f"{name}: padded keys"


# Packed sequences: a single query, a single key, a sequence with queries and no key, one with
# keys and no query, equal lengths.
VARLEN_Q = [1, 37, 300, 5, 0, 64]
VARLEN_K = [20, 1, 300, 0, 10, 64]


@gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic"])
@pytest.mark.parametrize(
    "causal, window, dtype, Hq, Hkv, D",
    [
        pytest.param(False, (-1, -1), BF16, 32, 8, 64, id="bf16-gqa4"),
        pytest.param(True, (-1, -1), F16, 8, 1, 128, id="causal-f16-gqa8-d128"),
        pytest.param(False, (50, 7), BF16, 8, 2, 64, id="window"),
        pytest.param(True, (100, -1), F16, 4, 4, 64, id="causal-window-mha"),
    ],
)
def test_gpu_cuda_attention_varlen_matches_float64(
    causal, window, dtype, Hq, Hkv, D, deterministic
):
    seed = 100 + Hq + D + causal + window[0]
    cu_q = torch.tensor([0, *VARLEN_Q], device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *VARLEN_K], device="cuda").cumsum(0).to(torch.int32)
    q = randn(sum(VARLEN_Q), Hq, D, dtype=dtype, seed=seed)
    k = randn(sum(VARLEN_K), Hkv, D, dtype=dtype, seed=seed + 1)
    v = randn(sum(VARLEN_K), Hkv, D, dtype=dtype, seed=seed + 2)
    do = randn(sum(VARLEN_Q), Hq, D, dtype=dtype, seed=seed + 3)
    lens = (cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K))
    kw = dict(causal=causal, window_size=window)

    def fused(q, k, v):
        return vf.attention_varlen(q, k, v, *lens, backend="cuda", **kw)

    with torch.use_deterministic_algorithms(deterministic):
        got = run_cuda(fused, (q, k, v), do)
    check(got, (q, k, v), (q, k, v), do, dtype,
          lambda q, k, v: reference.attention_varlen(q, k, v, *lens, **kw))  # fmt: skip
    rows = slice(int(cu_q[3]), int(cu_q[4]))  # the sequence with queries and no key
    assert torch.equal(got[0][rows], torch.zeros_like(got[0][rows]))
    keys = slice(int(cu_k[4]), int(cu_k[5]))  # the sequence with keys and no query
    for name, g in zip(("dk", "dv"), got[1][1:]):
        assert torch.equal(g[keys], torch.zeros_like(g[keys])), name


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_cuda_attention_padded_queries(causal):
    """seqlens_q (what mask_queries passes): query rows past a batch entry's length give 0 and
    no gradient, the rest equal float64 attention over the real keys (the reference computes
    every row and zeroes the padded ones)."""
    B, T, Hq, Hkv, D, dtype = 3, 333, 16, 4, 64, BF16
    lengths = [333, 200, 1]
    kern, ref, mask = padded_inputs(B, T, T, Hq, Hkv, D, dtype, lengths, 41 + causal)
    kern = (kern[0].masked_fill(~mask[:, :, None, None], float("nan")), *kern[1:])
    do = randn(B, T, Hq, D, dtype=dtype, seed=45)
    lens = torch.tensor(lengths, device="cuda", dtype=torch.int32)
    scale = D**-0.5

    def fused(q, k, v):
        return attention_cuda._fwd(q, k, v, lens, lens, None, None, 0, 0, causal, -1, -1, scale)[0]

    def eager(q, k, v):
        out = reference.attention(q, k, v, key_padding_mask=mask, causal=causal)
        return out * mask[:, :, None, None]

    got = run_cuda(fused, kern, do)
    ref_q = ref[0].masked_fill(~mask[:, :, None, None], 0.0)
    check(got, kern, (ref_q, *ref[1:]), do, dtype, eager)
    out, (dq, _, _) = got
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert torch.equal(dq[~mask], torch.zeros_like(dq[~mask]))


@gpu
def test_gpu_cuda_attention_deterministic_is_bit_identical():
    """Under torch.use_deterministic_algorithms(True) two runs give the same bits, GQA and
    padding included (no atomics anywhere); the atomic path agrees with it to rounding."""
    kern, _, mask = padded_inputs(2, 700, 700, 32, 8, 64, BF16, [700, 333], 5)
    do = randn(2, 700, 32, 64, dtype=BF16, seed=9)

    def fn(q, k, v):
        return vf.attention(q, k, v, key_padding_mask=mask, backend="cuda")

    with torch.use_deterministic_algorithms(True):
        first = run_cuda(fn, kern, do)
        second = run_cuda(fn, kern, do)
    assert torch.equal(first[0], second[0])
    for name, a, b in zip(("dq", "dk", "dv"), first[1], second[1]):
        assert torch.equal(a, b), f"{name}: deterministic mode is not bit-identical"
    fast = run_cuda(fn, kern, do)
    for name, a, b in zip(("dq", "dk", "dv"), first[1], fast[1]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)


@gpu
def test_gpu_cuda_attention_native_checks():
    """A direct call of the native op with bad sizes is refused before any kernel runs."""
    q = torch.zeros(1, 8, 4, 64, device="cuda", dtype=F16)
    k = torch.zeros(1, 8, 3, 64, device="cuda", dtype=F16)
    with pytest.raises(RuntimeError, match="must divide the number of query heads"):
        torch.ops.vljepa_fast.flash_attention_fwd(
            q, k, k, None, None, None, None, 0, 0, False, -1, -1, 0.125
        )
    bad = torch.zeros(2, device="cuda", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="seqlens_k: expected a 1-D int32 tensor of 1"):
        torch.ops.vljepa_fast.flash_attention_fwd(
            q, q, q, bad, None, None, None, 0, 0, False, -1, -1, 0.125
        )


# ------------------------------------------------------------------------------- cpu tier


def test_cuda_records_report_availability():
    rows = {(r.op, r.backend): r for r in vf.backends()}
    for op in ("attention", "attention_varlen"):
        row = rows[(op, "cuda")]
        if torch.cuda.is_available():
            assert row.available, row.reasons
        else:
            assert not row.available
            assert any("no CUDA device" in r for r in row.reasons), row.reasons


def test_cuda_record_refuses_cpu_tensors_by_name():
    q = torch.randn(1, 8, 2, 64)
    with pytest.raises(vf.BackendUnavailableError, match="cuda"):
        vf.attention(q, q, q, backend="cuda")


def test_supports_names_what_it_does_not_serve():
    q = torch.randn(1, 8, 2, 32)
    why = attention_cuda._supports(attention_inputs(q, q, q, scale=-1.0))
    assert isinstance(why, _backends.Refusal)
    text = " | ".join(why.reasons)
    assert "dtype float32 not supported" in text
    assert "head dim 32 not compiled" in text
    assert "scale -1.0 is not a positive finite number" in text
    for bad in (0.0, -0.0):  # attention_inputs refuses non-finite scales itself
        why = attention_cuda._supports(attention_inputs(q.half(), q.half(), q.half(), scale=bad))
        assert isinstance(why, _backends.Refusal), bad
        assert "not a positive finite number" in " | ".join(why.reasons), bad
    qh = torch.randn(1, 8, 2, 64).half()
    plan = attention_cuda._supports(attention_inputs(qh, qh, qh))
    assert plan == attention_cuda._Plan(None, None)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    q3 = torch.randn(8, 2, 96).bfloat16()
    why = attention_cuda._varlen_supports(varlen_inputs(q3, q3, q3, cu, cu, 8, 8))
    assert isinstance(why, _backends.Refusal) and "head dim 96" in why.reasons[0]


def test_supports_plans_right_padding_and_refuses_other_masks():
    q = torch.randn(2, 6, 2, 64).bfloat16()
    right = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    plan = attention_cuda._supports(attention_inputs(q, q, q, key_padding_mask=right))
    assert plan.seqlens_k.tolist() == [6, 2] and plan.seqlens_q is None
    holes = torch.tensor([[True] * 6, [False, True] + [False] * 4])
    why = attention_cuda._supports(attention_inputs(q, q, q, key_padding_mask=holes))
    assert isinstance(why, _backends.Refusal) and "not right padding" in why.reasons[0]


@pytest.fixture(scope="module")
def cpu_lib():
    st = _ext.load("cpu")
    assert st.loaded, "native cpu library unavailable: " + "; ".join(st.reasons)


def _meta(*shape, dtype=F16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_meta_functions_give_shapes(cpu_lib):
    q, k = _meta(2, 5, 8, 64), _meta(2, 7, 2, 64)
    out, lse = torch.ops.vljepa_fast.flash_attention_fwd(
        q, k, k, None, None, None, None, 0, 0, True, -1, -1, 0.125
    )
    assert out.shape == q.shape and lse.shape == (2, 8, 5) and lse.dtype == torch.float32
    dq, dk, dv = torch.ops.vljepa_fast.flash_attention_bwd(
        q, q, k, k, out, lse, None, None, None, None, 0, 0, True, -1, -1, 0.125, True
    )
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
    cu = torch.empty(3, device="meta", dtype=torch.int32)
    out, lse = torch.ops.vljepa_fast.flash_attention_fwd(
        _meta(9, 8, 128), _meta(4, 4, 128), _meta(4, 4, 128), None, None, cu, cu, 5, 3, False,
        3, 2, 0.1,
    )  # fmt: skip
    assert out.shape == (9, 8, 128) and lse.shape == (8, 9)


@pytest.mark.parametrize(
    "q, k, msg",
    [
        ((2, 5, 8, 32), (2, 7, 2, 32), "head dim 32 not compiled"),
        ((2, 5, 8, 64), (2, 7, 3, 64), "must divide the number of query heads"),
        ((2, 5, 8, 64), (3, 7, 2, 64), "k: expected batch 2"),
        ((2, 5, 8, 64), (2, 7, 2, 128), "k: expected head dim 64"),
        ((5, 8, 64), (7, 2, 64), "q: expected 4 dims"),
    ],
)
def test_native_checks_refuse_bad_shapes(cpu_lib, q, k, msg):
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.vljepa_fast.flash_attention_fwd(
            _meta(*q), _meta(*k), _meta(*k), None, None, None, None, 0, 0, False, -1, -1, 0.125
        )


def test_native_checks_refuse_bad_options(cpu_lib):
    q, k = _meta(2, 5, 8, 64), _meta(2, 7, 2, 64)
    fwd = torch.ops.vljepa_fast.flash_attention_fwd
    with pytest.raises(RuntimeError, match="q: expected float16 or bfloat16"):
        fwd(_meta(2, 5, 8, 64, dtype=torch.float32), k, k, None, None, None, None, 0, 0,
            False, -1, -1, 0.1)  # fmt: skip
    with pytest.raises(RuntimeError, match="window_left, window_right: expected ints >= -1"):
        fwd(q, k, k, None, None, None, None, 0, 0, False, -2, -1, 0.1)
    lens = torch.empty(3, device="meta", dtype=torch.int32)
    with pytest.raises(RuntimeError, match="seqlens_q: expected a 1-D int32 tensor of 2"):
        fwd(q, k, k, None, lens, None, None, 0, 0, False, -1, -1, 0.1)
    strided = _meta(2, 5, 8, 72)[..., :64]  # row stride 8 * 72, head stride 72: fine
    fwd(strided, k, k, None, None, None, None, 0, 0, False, -1, -1, 0.1)
    odd = _meta(2, 5, 8, 68)[..., :64]  # head stride 68: not a multiple of 8
    with pytest.raises(RuntimeError, match="q: expected strides that are multiples of 8"):
        fwd(odd, k, k, None, None, None, None, 0, 0, False, -1, -1, 0.1)
    out, lse = fwd(q, k, k, None, None, None, None, 0, 0, False, -1, -1, 0.1)
    with pytest.raises(RuntimeError, match=r"lse: expected \[B, Hq, T\]"):
        torch.ops.vljepa_fast.flash_attention_bwd(
            q, q, k, k, out, lse[:, :4], None, None, None, None, 0, 0, False, -1, -1, 0.1, False
        )


def test_aligned_copies_only_what_the_kernels_cannot_load():
    x = torch.randn(2, 5, 8, 64)
    assert attention_cuda._aligned(x) is x
    assert attention_cuda._aligned(x[:, :, :4]) is not None
    odd = torch.randn(2, 5, 8, 68)[..., :64]
    fixed = attention_cuda._aligned(odd)
    assert fixed.is_contiguous() and torch.equal(fixed, odd)
    shifted = torch.randn(1 + 2 * 5 * 8 * 64)[1:].view(2, 5, 8, 64)  # 4-byte aligned start
    assert attention_cuda._aligned(shifted).data_ptr() % 16 == 0


def test_cuda_library_lists_the_attention_kernels():
    """The host side and the four (dtype, head dim) kernel units are built."""
    names = {p.name for p in _ext.sources("cuda")}
    units = {f"attention_{t}_hd{d}.cu" for t in ("f16", "bf16") for d in (64, 128)}
    assert {"attention.cu", *units} <= names


def test_cutlass_headers_found_or_said_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(_ext.CUTLASS_ENV, raising=False)
    folder, where = _ext.cutlass_include()
    assert folder is not None and (folder / "cute" / "tensor.hpp").is_file(), where
    monkeypatch.setenv(_ext.CUTLASS_ENV, str(tmp_path))
    folder, why = _ext.cutlass_include()
    assert folder is None and _ext.CUTLASS_ENV in why
    monkeypatch.delenv(_ext.CUTLASS_ENV)
    monkeypatch.setattr(_ext, "repo_root", lambda: tmp_path)
    monkeypatch.setattr(_ext, "package_cutlass_include", lambda: None)
    folder, why = _ext.cutlass_include()
    assert folder is None and _ext.CUTLASS_PIN in why and "--stage-cutlass" in why


def test_stage_cutlass_copies_what_the_build_includes(tmp_path):
    dest, n, size = _ext.stage_cutlass(tmp_path / "include")
    assert (dest / "cute" / "tensor.hpp").is_file() and (dest / "cutlass" / "cutlass.h").is_file()
    assert n == sum(1 for p in dest.rglob("*") if p.is_file())
    assert 0 < size < 32 * 2**20, f"{size / 2**20:.1f} MiB staged: too much for the GPU carry"
    assert _ext.CUTLASS_PIN in (tmp_path / "STAGED.txt").read_text()


def test_stage_cutlass_refuses_its_own_folder_and_a_bad_variable(tmp_path, monkeypatch):
    """Staging replaces its destination: from the staged copy into itself it would delete its
    source (review finding), and a variable naming no headers is refused, not ignored."""
    dest, _, _ = _ext.stage_cutlass(tmp_path / "include")
    monkeypatch.setenv(_ext.CUTLASS_ENV, str(dest))
    with pytest.raises(RuntimeError, match="the same folder"):
        _ext.stage_cutlass(dest)
    assert (dest / "cute" / "tensor.hpp").is_file(), "the staged headers were deleted"
    monkeypatch.setenv(_ext.CUTLASS_ENV, str(tmp_path / "nothing"))
    with pytest.raises(RuntimeError, match=_ext.CUTLASS_ENV):
        _ext.stage_cutlass(tmp_path / "other")


def test_cutlass_is_needed_to_build_not_to_load(monkeypatch, tmp_path):
    """Without CUTLASS headers the cuda library cannot be built, but locating (and loading) one
    already built needs none (review finding: the infonce and topk cuda kernels went missing)."""
    monkeypatch.setenv(_ext.CUTLASS_ENV, str(tmp_path))
    if torch.version.cuda is not None and _ext.find_cuda_home() is not None:
        assert _ext._prebuild_reasons("cuda", building=False) == []
        why = _ext._prebuild_reasons("cuda")
        assert len(why) == 1 and _ext.CUTLASS_ENV in why[0]


# --------------------------------------------------------------------------- compile tier

MMA_OPCODES = re.compile(r"\bHMMA\.16816\.F32\b")


def _sections(text: str, header: str) -> dict[str, str]:
    found = {}
    for kernel in ATTENTION_KERNELS:
        mine = dump_sections(text, header, kernel)
        # 2 dtypes x 2 head dims of every kernel
        assert len(mine) == 4, f"{kernel}: {len(mine)} instantiations, expected 4"
        found.update(mine)
    return found


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_attention_kernels_have_no_spills(arch):
    text = cuda_library_dump("--dump-resource-usage", "-arch", arch)
    assert_no_spills(_sections(text, r"Function"), arch)


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_attention_products_are_tensor_core_mmas(arch):
    sections = _sections(cuda_library_dump("-sass", "-arch", arch), r"Function :")
    for name, body in sections.items():
        if any(k in name for k in MMA_KERNELS):
            assert MMA_OPCODES.search(body), f"{arch} {name}: no HMMA.16816.F32 (mma.sync)"
            assert "LDSM" in body, f"{arch} {name}: no ldmatrix"
            assert "LDGSTS" in body, f"{arch} {name}: no cp.async"
