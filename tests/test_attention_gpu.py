"""vf.attention / vf.attention_varlen with backend="triton" on CUDA (gpu tier; runs in
scripts/gpu_run.sh) against the float64 eager reference, forward and every gradient.

Cases the older gpu test (tests/test_attention.py, fp16/bf16, non-causal, T = 300) leaves out:
packed varlen sequences (a single query, a single key, a sequence with no key), causal masks
(bottom-right aligned, T < S and T > S), float32 (tf32x3 dots), head dims 32, 96 and 128, a long
sequence (T = 4096 + 37: many KV blocks, a partial last block), and a batch entry whose
key_padding_mask is all False (out exactly 0, finite and exactly zero gradients).

Rule (docs/DESIGN.md): a result passes when its error against float64 is at most 2x the error of the
eager reference run in the same dtype, plus a floor per dtype (tests/_util.assert_close_2x).
Every floating tensor made by torch.empty / torch.empty_like while the Triton op runs (forward
and backward) is NaN-filled first, and padded keys and values hold NaN, so an unwritten output
element or a read past a sequence's keys cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import vljepa_fast as vf
from tests._util import assert_close_2x, poisoned_allocations
from vljepa_fast import reference

pytestmark = pytest.mark.gpu
#: where the cases run (a module constant: the checks can be tried through the interpreter too)
DEVICE = "cuda"

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def randn(*shape: int, dtype: torch.dtype, seed: int) -> Tensor:
    """Fresh N(0, 1) values on CUDA in ``dtype`` (a CUDA generator: large shapes stay cheap)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)


def reference_run(fn, inputs: tuple[Tensor, ...], do: Tensor, dtype: torch.dtype):
    """(out, grads) of the eager reference ``fn`` evaluated in ``dtype`` on copies of ``inputs``."""
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(dtype))
    return out.detach(), grads


def kernel_run(fn, inputs: tuple[Tensor, ...], do: Tensor):
    """(out, grads) of the Triton op ``fn``, with its forward and backward buffers poisoned."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    with poisoned_allocations() as made:
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, do)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert made, "the launchers allocated nothing through torch.empty: poisoning is inert"
    return out.detach(), grads


def check(got, inputs_kernel, inputs_ref, do, dtype, fn_ref):
    """Kernel (out, grads) against the reference in float64 and in ``dtype``."""
    out, grads = got
    exact_out, exact_grads = reference_run(fn_ref, inputs_ref, do, torch.float64)
    eager_out, eager_grads = reference_run(fn_ref, inputs_ref, do, dtype)
    assert out.dtype == dtype and out.shape == inputs_kernel[0].shape
    assert_close_2x(out, eager_out, exact_out, dtype, "out")
    for name, g, ea, ex in zip(("dq", "dk", "dv"), grads, eager_grads, exact_grads, strict=True):
        assert g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        assert_close_2x(g, ea, ex, dtype, name)


def padded_inputs(B, T, S, Hq, Hkv, D, dtype, lengths, seed):
    """q, k, v and the key mask; padded keys and values hold NaN for the kernel (the reference
    gets zeros there: masked keys must not contribute, so both describe the same attention)."""
    q = randn(B, T, Hq, D, dtype=dtype, seed=seed)
    k = randn(B, S, Hkv, D, dtype=dtype, seed=seed + 1)
    v = randn(B, S, Hkv, D, dtype=dtype, seed=seed + 2)
    if lengths is None:
        return (q, k, v), (q, k, v), None
    mask = torch.arange(S, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    pad = ~mask[:, :, None, None]
    k_nan, v_nan = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan"))
    k_ref, v_ref = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    return (q, k_nan, v_nan), (q, k_ref, v_ref), mask


# (B, T, S, Hq, Hkv, D, causal, dtype, key lengths or None)
DENSE = [
    pytest.param(2, 300, 300, 32, 8, 64, True, BF16, None, id="causal-bf16-32:8"),
    pytest.param(2, 300, 300, 32, 8, 64, True, F16, [300, 171], id="causal-f16-padded"),
    pytest.param(2, 37, 301, 8, 2, 64, True, BF16, [301, 100], id="causal-T<S-bf16-padded"),
    pytest.param(2, 301, 37, 8, 2, 64, True, F32, None, id="causal-T>S-f32"),
    pytest.param(2, 300, 300, 8, 2, 64, False, F32, [300, 171], id="f32-padded"),
    pytest.param(2, 200, 133, 4, 2, 32, False, F32, [133, 57], id="f32-d32-padded"),
    pytest.param(1, 300, 300, 4, 1, 128, True, F32, None, id="causal-f32-d128"),
    pytest.param(2, 129, 129, 4, 2, 96, True, F16, [129, 64], id="causal-f16-d96-padded"),
    pytest.param(1, 4133, 4133, 8, 2, 64, False, BF16, None, id="long-bf16"),
    pytest.param(1, 4133, 4133, 8, 2, 64, True, F32, None, id="long-causal-f32"),
    pytest.param(2, 4133, 4133, 8, 2, 64, False, F16, [4133, 2501], id="long-f16-padded"),
]


@pytest.mark.parametrize("B, T, S, Hq, Hkv, D, causal, dtype, lengths", DENSE)
def test_gpu_triton_attention_matches_float64(B, T, S, Hq, Hkv, D, causal, dtype, lengths):
    seed = B + T + 3 * S + Hq + D + 7 * causal
    kern, ref, mask = padded_inputs(B, T, S, Hq, Hkv, D, dtype, lengths, seed)
    do = randn(B, T, Hq, D, dtype=dtype, seed=seed + 3)
    kw = dict(key_padding_mask=mask, causal=causal)
    got = kernel_run(lambda q, k, v: vf.attention(q, k, v, backend="triton", **kw), kern, do)
    check(got, kern, ref, do, dtype, lambda q, k, v: reference.attention(q, k, v, **kw))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_triton_attention_row_without_real_key(dtype, causal):
    """Batch entry 1 has an all-False key_padding_mask: its output is exactly 0 and its
    gradients are finite and exactly 0; the other entries still match float64."""
    B, T, S, Hq, Hkv, D = 3, 129, 129, 8, 2, 64
    kern, ref, mask = padded_inputs(B, T, S, Hq, Hkv, D, dtype, [129, 0, 77], 11 + causal)
    assert not mask[1].any()
    do = randn(B, T, Hq, D, dtype=dtype, seed=17)
    kw = dict(key_padding_mask=mask, causal=causal)
    got = kernel_run(lambda q, k, v: vf.attention(q, k, v, backend="triton", **kw), kern, do)
    out, (dq, dk, dv) = got
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a query without keys must give 0"
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        assert torch.equal(g[1], torch.zeros_like(g[1])), f"{name}: batch entry 1 must be 0"
    check(got, kern, ref, do, dtype, lambda q, k, v: reference.attention(q, k, v, **kw))


# Packed sequences: a single query, a single key, the same length, no key at all, equal lengths.
VARLEN_Q = [1, 37, 300, 5, 64]
VARLEN_K = [20, 1, 300, 0, 64]


@pytest.mark.parametrize(
    "causal, dtype, Hq, Hkv, D",
    [
        pytest.param(False, BF16, 32, 8, 64, id="bf16-32:8"),
        pytest.param(True, BF16, 32, 8, 64, id="causal-bf16-32:8"),
        pytest.param(True, F16, 8, 2, 128, id="causal-f16-d128"),
        pytest.param(False, F32, 8, 2, 64, id="f32"),
        pytest.param(True, F32, 4, 4, 64, id="causal-f32-mha"),
    ],
)
def test_gpu_triton_attention_varlen_matches_float64(causal, dtype, Hq, Hkv, D):
    seed = 100 + Hq + D + causal
    cu_q = torch.tensor([0, *VARLEN_Q], device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *VARLEN_K], device=DEVICE).cumsum(0).to(torch.int32)
    total_q, total_k = sum(VARLEN_Q), sum(VARLEN_K)
    q = randn(total_q, Hq, D, dtype=dtype, seed=seed)
    k = randn(total_k, Hkv, D, dtype=dtype, seed=seed + 1)
    v = randn(total_k, Hkv, D, dtype=dtype, seed=seed + 2)
    do = randn(total_q, Hq, D, dtype=dtype, seed=seed + 3)
    lens = (cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K))

    def fused(q, k, v):
        return vf.attention_varlen(q, k, v, *lens, causal=causal, backend="triton")

    def eager(q, k, v):
        return reference.attention_varlen(q, k, v, *lens, causal=causal)

    got = kernel_run(fused, (q, k, v), do)
    check(got, (q, k, v), (q, k, v), do, dtype, eager)
    # the sequence with no key (index 3): its queries get 0
    out = got[0]
    rows = slice(int(cu_q[3]), int(cu_q[4]))
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))


# Sliding windows: (B, T, S, Hq, Hkv, D, causal, dtype, window_size, key lengths or None)
WINDOW = [
    pytest.param(2, 600, 600, 32, 8, 64, False, BF16, (64, 64), None, id="sym-bf16"),
    pytest.param(2, 600, 600, 8, 2, 64, True, F16, (128, -1), [600, 350], id="causal-f16-pad"),
    pytest.param(2, 37, 301, 8, 2, 64, False, BF16, (20, 5), [301, 100], id="T<S-bf16-pad"),
    pytest.param(2, 301, 37, 8, 2, 128, False, F32, (-1, 3), None, id="right-T>S-f32-d128"),
    pytest.param(1, 4133, 4133, 8, 2, 64, False, BF16, (256, 0), None, id="long-left-bf16"),
]


@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
@pytest.mark.parametrize("B, T, S, Hq, Hkv, D, causal, dtype, window, lengths", WINDOW)
def test_gpu_attention_window_matches_float64(
    backend, B, T, S, Hq, Hkv, D, causal, dtype, window, lengths
):
    """window_size on the CUDA backends that serve it (flash_attn: where installed and exact,
    i.e. without key padding), forward and every gradient against float64."""
    seed = B + T + 3 * S + Hq + D + 7 * causal + window[0]
    kern, ref, mask = padded_inputs(B, T, S, Hq, Hkv, D, dtype, lengths, seed)
    do = randn(B, T, Hq, D, dtype=dtype, seed=seed + 3)
    kw = dict(key_padding_mask=mask, causal=causal, window_size=window)
    try:
        vf.attention(*kern, backend=backend, **kw)
    except vf.BackendUnavailableError as e:
        if backend == "triton":
            raise
        pytest.skip(str(e))
    got = kernel_run(lambda q, k, v: vf.attention(q, k, v, backend=backend, **kw), kern, do)
    check(got, kern, ref, do, dtype, lambda q, k, v: reference.attention(q, k, v, **kw))


@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
@pytest.mark.parametrize("causal, window", [(False, (50, 7)), (True, (100, -1))])
def test_gpu_attention_varlen_window_matches_float64(backend, causal, window):
    dtype, Hq, Hkv, D = BF16, 8, 2, 64
    cu_q = torch.tensor([0, *VARLEN_Q], device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *VARLEN_K], device=DEVICE).cumsum(0).to(torch.int32)
    q = randn(sum(VARLEN_Q), Hq, D, dtype=dtype, seed=7)
    k = randn(sum(VARLEN_K), Hkv, D, dtype=dtype, seed=8)
    v = randn(sum(VARLEN_K), Hkv, D, dtype=dtype, seed=9)
    do = randn(sum(VARLEN_Q), Hq, D, dtype=dtype, seed=10)
    lens = (cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K))
    kw = dict(causal=causal, window_size=window)

    def fused(q, k, v):
        return vf.attention_varlen(q, k, v, *lens, backend=backend, **kw)

    try:
        fused(q, k, v)
    except vf.BackendUnavailableError as e:
        if backend == "triton":
            raise
        pytest.skip(str(e))
    got = kernel_run(fused, (q, k, v), do)
    check(got, (q, k, v), (q, k, v), do, dtype,
          lambda q, k, v: reference.attention_varlen(q, k, v, *lens, **kw))


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("window", [(-1, -1), (200, 200)], ids=["full", "window"])
def test_gpu_triton_tma_and_pointer_loads_agree(monkeypatch, dtype, window):
    """On Hopper the forward reads the unmasked K/V blocks through TMA descriptors; the pointer
    loads it takes elsewhere (forced here) give the same tiles, so the same result, and both
    match float64 (predictor heads 32:8, GQA packing GP = 4, key padding)."""
    from vljepa_fast._kernels import attention as attn

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("TMA descriptors: the Hopper path only")
    B, T, Hq, Hkv, D = 2, 1100, 32, 8, 64
    kern, ref, mask = padded_inputs(B, T, T, Hq, Hkv, D, dtype, [T, 613], 23)
    lengths = mask.sum(1, dtype=torch.int32)
    kw = dict(seqlens_k=lengths, window_size=window, scale=D**-0.5)
    with poisoned_allocations():
        tma_out, tma_lse = attn.attention_forward(*kern, **kw)
    monkeypatch.setattr(attn, "_tma_ok", lambda k, v, interpret: False)
    with poisoned_allocations():
        ptr_out, ptr_lse = attn.attention_forward(*kern, **kw)
    torch.testing.assert_close(tma_out, ptr_out, rtol=0, atol=0)
    torch.testing.assert_close(tma_lse, ptr_lse, rtol=0, atol=0)
    mkw = dict(key_padding_mask=mask, window_size=window)
    exact = reference.attention(*(t.double() for t in ref), **mkw)
    eager = reference.attention(*ref, **mkw)
    assert_close_2x(tma_out, eager, exact, dtype, "out")


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("padding", [0.0, 0.5, 0.9])
def test_gpu_triton_query_padding_matches_float64(dtype, padding):
    """seqlens_q at the predictor's heads (32:8, D = 64): padded query rows out 0 and lse -inf,
    their blocks skipped; real rows match float64 (the rows the skipped blocks did not write
    are poisoned, so a skipped store fails)."""
    from vljepa_fast._kernels import attention as attn

    B, T, Hq, Hkv, D = 3, 1000, 32, 8, 64
    lengths = [T, int(T * (1 - padding)), 1]
    kern, ref, mask = padded_inputs(B, T, T, Hq, Hkv, D, dtype, lengths, 31)
    lens = mask.sum(1, dtype=torch.int32)
    with poisoned_allocations() as made:
        out, lse = attn.attention_forward(*kern, seqlens_k=lens, seqlens_q=lens, scale=D**-0.5)
    assert made
    padded = ~mask  # [B, T]: the query rows past each length
    assert torch.equal(out[padded], torch.zeros_like(out[padded]))
    assert torch.isneginf(lse.transpose(1, 2)[padded]).all()
    exact = reference.attention(*(t.double() for t in ref), key_padding_mask=mask)
    eager = reference.attention(*ref, key_padding_mask=mask)
    real = mask
    assert_close_2x(out[real], eager[real], exact[real], dtype, "out")
