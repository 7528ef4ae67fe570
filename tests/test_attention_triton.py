"""Triton flash attention kernels (kernels/attention.py) against a float64 eager softmax attention.

interpret: CPU tensors through Triton's interpreter, tiny shapes with lengths that are not
multiples of any block, forward (out, lse) and backward (dq, dk, dv). A low-precision result passes
when its error is at most 2x the error of the same eager attention run in that dtype, plus a
floor. Every buffer the launchers allocate is NaN-poisoned, and padded keys hold NaN, so an
unwritten element or a read past a sequence's keys cannot pass.
Memory safety (interpret): strided offsets, offsets past the tensors and strided inputs, with
inputs inside NaN margins and outputs inside guarded margins, so that a kernel touching memory
outside its tensors fails the test instead of corrupting the heap.
compile: the kernels compiled ahead of time for sm_80 and sm_90 (no GPU), both offset widths.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import triton
from torch import Tensor
from vljepa_fast._kernels import attention as attn
from vljepa_fast._kernels import attention_bwd as attn_bwd

import vljepa_fast as vf
from tests._aot import Launch, compile_launch, recorded_launches
from tests.test_attention import check_strided_dense, check_strided_varlen, nan_margins

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seqlens_k: Tensor | None,
    causal: bool,
    scale: float,
    window_size: tuple[int, int] = (-1, -1),
) -> tuple[Tensor, Tensor]:
    """Softmax attention in q's dtype. q [B, T, Hq, D], k/v [B, S, Hkv, D] -> out, lse [B, Hq, T].

    GQA by repeating K/V heads; padded keys are zeroed (they may hold NaN) and masked; causal is
    bottom-right aligned; window_size (left, right): key j visible to query i only if
    i + S - T - left <= j <= i + S - T + right (-1 unbounded, causal makes right 0); rows
    without keys give out 0, lse -inf, and zero gradients.
    """
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    o_s = torch.arange(S)
    valid = torch.ones(B, S, dtype=torch.bool)
    if seqlens_k is not None:
        valid = o_s[None, :] < seqlens_k[:, None].long()
    k = torch.where(valid[:, :, None, None], k, 0).repeat_interleave(Hq // Hkv, dim=2)
    v = torch.where(valid[:, :, None, None], v, 0).repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    mask = valid[:, None, None, :]
    diag = torch.arange(T)[:, None] + (S - T)
    left, right = window_size
    if causal:
        right = 0
    if right >= 0:
        mask = mask & (o_s[None, :] <= diag + right)
    if left >= 0:
        mask = mask & (o_s[None, :] >= diag - left)
    has_key = mask.any(-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s, dim=-1) * has_key
    out = torch.einsum("bhts,bshd->bthd", p, v)
    lse = torch.logsumexp(s, dim=-1).masked_fill(~has_key[..., 0], float("-inf"))
    return out, lse


def eager_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: list[int],
    cu_k: list[int],
    *,
    causal: bool,
    scale: float,
    window_size: tuple[int, int] = (-1, -1),
) -> tuple[Tensor, Tensor]:
    """Varlen version: packed [total, H, D] -> out [total_q, Hq, D], lse [Hq, total_q]."""
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        o, lse = eager_attention(
            q[cu_q[i] : cu_q[i + 1]][None],
            k[cu_k[i] : cu_k[i + 1]][None],
            v[cu_k[i] : cu_k[i + 1]][None],
            seqlens_k=None,
            causal=causal,
            scale=scale,
            window_size=window_size,
        )
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def reference(run, inputs: tuple[Tensor, ...], do: Tensor, dtype: torch.dtype):
    """(out, lse, dq, dk, dv) of ``run`` evaluated in ``dtype`` on copies of ``inputs``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out, lse = run(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(dtype))
    return (out.detach(), lse.detach(), *grads)


def assert_matches(name: str, got: Tensor, exact: Tensor, eager: Tensor, dtype: torch.dtype):
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or NaN)"
    err = (got.double() - exact).abs().max().item()
    err_eager = (eager.double() - exact).abs().max().item()
    bound = 2 * err_eager + FLOOR[dtype] * max(1.0, exact.abs().max().item())
    assert err <= bound, (
        f"{name}: max error {err:.3g} > {bound:.3g} (eager {dtype}: {err_eager:.3g})"
    )


def assert_lse_matches(got: Tensor, exact: Tensor):
    assert got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), torch.isneginf(exact)), "lse: -inf rows differ"
    assert not torch.isnan(got).any() and not torch.isposinf(got).any(), "lse: NaN or +inf"
    finite = torch.isfinite(exact)
    torch.testing.assert_close(got.double()[finite], exact[finite], rtol=1e-5, atol=1e-5)


def check(run_kernel, run_eager, inputs: tuple[Tensor, ...], do: Tensor, dtype: torch.dtype):
    """Compare kernel forward and backward with float64 and with eager in ``dtype``."""
    out, lse, dq, dk, dv = run_kernel(*inputs, do)
    exact = reference(run_eager, inputs, do, torch.float64)
    eager = reference(run_eager, inputs, do, dtype)
    assert out.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert_lse_matches(lse, exact[1])
    for name, got, i in zip(
        ("out", "dq", "dk", "dv"), (out, dq, dk, dv), (0, 2, 3, 4), strict=True
    ):
        assert_matches(name, got, exact[i], eager[i], dtype)


def randn(*shape: int, dtype: torch.dtype, transposed: bool = False) -> Tensor:
    """Fresh N(0, 1) values; ``transposed`` returns a [B, T, H, D] view of a [B, H, T, D] tensor."""
    if transposed:
        b, t, h, d = shape
        return torch.randn(b, h, t, d).to(dtype).transpose(1, 2)
    return torch.randn(*shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# interpret
# ---------------------------------------------------------------------------------------------

# (B, T, S, Hq, Hkv, D, causal, dtype, seqlens_k, transposed q)
DENSE_CASES = [
    pytest.param(2, 37, 101, 2, 2, 64, False, torch.float32, None, False, id="g1-d64-f32"),
    pytest.param(
        2, 37, 101, 4, 1, 64, True, torch.float32, [101, 1], True, id="g4-d64-causal-pad1"
    ),
    pytest.param(2, 37, 101, 4, 1, 64, False, torch.float16, [64, 37], False, id="g4-d64-f16-pad"),
    pytest.param(
        2, 21, 37, 4, 2, 32, False, torch.bfloat16, [0, 20], False, id="g2-d32-bf16-empty"
    ),
    pytest.param(1, 37, 37, 8, 1, 32, True, torch.float16, None, False, id="g8-d32-f16-causal"),
    pytest.param(1, 48, 33, 2, 1, 96, True, torch.float32, None, False, id="d96-causal-T-gt-S"),
    pytest.param(1, 37, 50, 2, 1, 128, False, torch.bfloat16, [45], False, id="d128-bf16-pad"),
    pytest.param(
        1, 128, 128, 2, 1, 64, True, torch.bfloat16, None, False, id="g2-d64-bf16-causal-aligned"
    ),
]


@pytest.mark.interpret
@pytest.mark.parametrize("B, T, S, Hq, Hkv, D, causal, dtype, seqlens, transposed", DENSE_CASES)
def test_dense(poisoned, B, T, S, Hq, Hkv, D, causal, dtype, seqlens, transposed):
    scale = D**-0.5
    q = randn(B, T, Hq, D, dtype=dtype, transposed=transposed)
    k, v = randn(B, S, Hkv, D, dtype=dtype), randn(B, S, Hkv, D, dtype=dtype)
    seqlens_k = None if seqlens is None else torch.tensor(seqlens, dtype=torch.int32)
    if seqlens_k is not None:
        # Padded keys hold NaN: the kernels must never let them reach a dot product.
        pad = torch.arange(S)[None, :] >= seqlens_k[:, None]
        k[pad], v[pad] = float("nan"), float("nan")
    do = randn(B, T, Hq, D, dtype=dtype)
    masking = dict(seqlens_k=seqlens_k, causal=causal, scale=scale)

    def run_kernel(q, k, v, do):
        out, lse = attn.attention_forward(q, k, v, **masking)
        return (out, lse, *attn.attention_backward(do, q, k, v, out, lse, **masking))

    check(run_kernel, lambda q, k, v: eager_attention(q, k, v, **masking), (q, k, v), do, dtype)
    assert poisoned, "the launchers allocated nothing through torch.empty: poisoning is inert"


# Lengths include a single query, a single key, and a sequence with no keys at all.
VARLEN_Q, VARLEN_K = [1, 37, 12, 5], [20, 1, 45, 0]


@pytest.mark.interpret
@pytest.mark.parametrize(
    "causal, dtype, Hq, Hkv",
    [
        pytest.param(False, torch.float32, 4, 1, id="g4-f32"),
        pytest.param(True, torch.bfloat16, 4, 1, id="g4-bf16-causal"),
        pytest.param(True, torch.float32, 2, 2, id="g1-f32-causal"),
    ],
)
def test_varlen(poisoned, causal, dtype, Hq, Hkv):
    D, scale = 64, 64**-0.5
    cu_q = [0, *torch.tensor(VARLEN_Q).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(VARLEN_K).cumsum(0).tolist()]
    # Views into wider packed buffers: strides differ from the contiguous ones.
    q = randn(cu_q[-1], Hq + 3, D, dtype=dtype)[:, :Hq]
    kv = randn(cu_k[-1], 2 * Hkv, D, dtype=dtype)
    k, v = kv[:, :Hkv], kv[:, Hkv:]
    do = randn(cu_q[-1], Hq, D, dtype=dtype)
    masking = dict(
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
        max_seqlen_q=max(VARLEN_Q),
        max_seqlen_k=max(VARLEN_K),
        causal=causal,
        scale=scale,
    )

    def run_kernel(q, k, v, do):
        out, lse = attn.attention_forward(q, k, v, **masking)
        return (out, lse, *attn.attention_backward(do, q, k, v, out, lse, **masking))

    def run_eager(q, k, v):
        return eager_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=scale)

    check(run_kernel, run_eager, (q, k, v), do, dtype)
    assert poisoned, "the launchers allocated nothing through torch.empty: poisoning is inert"


# (B, T, S, Hq, Hkv, D, causal, window, dtype, seqlens_k): several 32 x 64 interpreter blocks
# per sequence, lengths that are no multiple of them, T != S both ways, GQA, key padding.
WINDOW_DENSE_CASES = [
    pytest.param(2, 70, 150, 4, 2, 32, False, (9, 4), torch.float32, [150, 90], id="asym-pad"),
    pytest.param(1, 150, 70, 2, 1, 32, True, (20, -1), torch.float32, None, id="causal-T>S"),
    pytest.param(1, 97, 97, 4, 1, 64, False, (0, 0), torch.bfloat16, None, id="diag-bf16"),
    pytest.param(2, 45, 131, 2, 2, 32, False, (-1, 7), torch.float16, [131, 3], id="right-f16"),
    pytest.param(1, 131, 131, 2, 1, 96, False, (40, -1), torch.bfloat16, [77], id="left-d96"),
    pytest.param(1, 37, 53, 4, 2, 32, True, (500, 500), torch.float32, [50], id="wide-causal"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("B, T, S, Hq, Hkv, D, causal, window, dtype, seqlens", WINDOW_DENSE_CASES)
def test_window_dense(poisoned, B, T, S, Hq, Hkv, D, causal, window, dtype, seqlens):
    """Sliding windows, forward (out, lse) and backward, against float64 (bf16 and fp16 run
    the INTERPRET upcast path); padded keys hold NaN, allocations are NaN-poisoned."""
    scale = D**-0.5
    q = randn(B, T, Hq, D, dtype=dtype)
    k, v = randn(B, S, Hkv, D, dtype=dtype), randn(B, S, Hkv, D, dtype=dtype)
    seqlens_k = None if seqlens is None else torch.tensor(seqlens, dtype=torch.int32)
    if seqlens_k is not None:
        pad = torch.arange(S)[None, :] >= seqlens_k[:, None]
        k[pad], v[pad] = float("nan"), float("nan")
    do = randn(B, T, Hq, D, dtype=dtype)
    masking = dict(seqlens_k=seqlens_k, causal=causal, scale=scale, window_size=window)

    def run_kernel(q, k, v, do):
        out, lse = attn.attention_forward(q, k, v, **masking)
        return (out, lse, *attn.attention_backward(do, q, k, v, out, lse, **masking))

    check(run_kernel, lambda q, k, v: eager_attention(q, k, v, **masking), (q, k, v), do, dtype)
    assert poisoned, "the launchers allocated nothing through torch.empty: poisoning is inert"


@pytest.mark.interpret
@pytest.mark.parametrize(
    "causal, window, dtype",
    [
        (False, (5, 2), torch.float32),
        (True, (12, -1), torch.bfloat16),
        (False, (-1, 0), torch.float32),
    ],
)
def test_window_varlen(poisoned, causal, window, dtype):
    """Windows aligned to each packed sequence's own lengths (one with no key, a single query)."""
    D, scale, Hq, Hkv = 32, 32**-0.5, 4, 2
    lq, lk = [1, 70, 12, 5], [20, 66, 101, 0]
    cu_q = [0, *torch.tensor(lq).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(lk).cumsum(0).tolist()]
    q = randn(cu_q[-1], Hq, D, dtype=dtype)
    k, v = randn(cu_k[-1], Hkv, D, dtype=dtype), randn(cu_k[-1], Hkv, D, dtype=dtype)
    do = randn(cu_q[-1], Hq, D, dtype=dtype)
    masking = dict(
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
        max_seqlen_q=max(lq), max_seqlen_k=max(lk), causal=causal, scale=scale,
        window_size=window,
    )

    def run_kernel(q, k, v, do):
        out, lse = attn.attention_forward(q, k, v, **masking)
        return (out, lse, *attn.attention_backward(do, q, k, v, out, lse, **masking))

    def run_eager(q, k, v):
        return eager_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=scale,
                                      window_size=window)

    check(run_kernel, run_eager, (q, k, v), do, dtype)
    assert poisoned, "the launchers allocated nothing through torch.empty: poisoning is inert"


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
def test_window_skips_blocks_outside(causal):
    """Key blocks outside every row's window are never loaded, in all three kernels: NaN keys,
    values and queries far from a block's window leave its outputs and gradients finite and
    equal to the clean ones; a kernel visiting (and masking) a block outside the window would
    turn 0 * NaN into NaN there. Interpreter blocks: 32 queries x 64 keys, window (3, 3) (causal:
    (3, 0)), T = S = 512, NaN in q, k, v rows 0..19 and 492..511 (key blocks 0 and 7)."""
    T = 512
    g = torch.Generator().manual_seed(33)
    q, k, v, do = (torch.randn(1, T, h, 32, generator=g) for h in (2, 1, 1, 2))
    masking = dict(causal=causal, scale=32**-0.5, window_size=(3, 3))
    far = torch.cat([torch.arange(0, 20), torch.arange(T - 20, T)])
    qn, kn, vn = (x.clone() for x in (q, k, v))
    qn[:, far], kn[:, far], vn[:, far] = float("nan"), float("nan"), float("nan")
    clean = attn.attention_forward(q, k, v, **masking)
    dirty = attn.attention_forward(qn, kn, vn, **masking)
    clean_grads = attn.attention_backward(do, q, k, v, *clean, **masking)
    dirty_grads = attn.attention_backward(do, qn, kn, vn, *dirty, **masking)
    # Query blocks 0-2 and 13-15 legitimately meet NaN (they visit key blocks 0 and 7, whose
    # masked NaN values reach their tiles). Query blocks 3-12 (rows 96..415) see key blocks 1-6
    # only; key blocks 2-5 (keys 128..383) are seen by query blocks 3-12 only.
    rows, keys = slice(96, 416), slice(128, 384)
    for name, got, want in (
        ("out", dirty[0][:, rows], clean[0][:, rows]),
        ("lse", dirty[1][:, :, rows], clean[1][:, :, rows]),
        ("dq", dirty_grads[0][:, rows], clean_grads[0][:, rows]),
        ("dk", dirty_grads[1][:, keys], clean_grads[1][:, keys]),
        ("dv", dirty_grads[2][:, keys], clean_grads[2][:, keys]),
    ):
        assert torch.isfinite(got).all(), f"{name}: a block outside the window was visited"
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} differs")
    want = eager_attention(q.double(), k.double(), v.double(), seqlens_k=None, **masking)
    torch.testing.assert_close(clean[0].double(), want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
def test_no_key_rows_are_zero(poisoned):
    """Rows that see no key: out 0, lse -inf, zero gradients, never NaN (documented contract)."""
    q, k, v = (torch.randn(2, 5, 2, 32) for _ in range(3))
    seqlens_k = torch.tensor([0, 5], dtype=torch.int32)
    out, lse = attn.attention_forward(q, k, v, seqlens_k=seqlens_k, scale=0.2)
    dq, dk, dv = attn.attention_backward(
        torch.randn_like(out), q, k, v, out, lse, seqlens_k=seqlens_k, scale=0.2
    )
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    for g in (dq[0], dk[0], dv[0]):
        assert torch.equal(g, torch.zeros_like(g))
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


# ---------------------------------------------------------------------------------------------
# forward: GQA packing, query padding, TMA loads, scales of either sign
# ---------------------------------------------------------------------------------------------


def check_forward(q, k, v, *, seqlens_q=None, **masking):
    """The forward (out, lse) against float64 and eager in q's dtype; ``seqlens_q`` rows past
    each batch entry's query length must be out 0 and lse -inf."""
    out, lse = attn.attention_forward(q, k, v, seqlens_q=seqlens_q, **masking)
    exact = eager_attention(q.double(), k.double(), v.double(), **masking)
    eager = eager_attention(q, k, v, **masking)
    if seqlens_q is not None:
        padded = torch.arange(q.shape[1])[None, :] >= seqlens_q[:, None].long()  # [B, T]
        for o_, l_ in (exact, eager):
            o_[padded] = 0.0
            l_.masked_fill_(padded[:, None, :], float("-inf"))
    assert_lse_matches(lse, exact[1])
    assert_matches("out", out, exact[0], eager[0], q.dtype)
    return out, lse


@pytest.mark.interpret
@pytest.mark.parametrize("block_m, gp", [(32, 2), (64, 4), (128, 8)])
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (6, 3))])
def test_packed_query_heads(poisoned, monkeypatch, block_m, gp, causal, window):
    """GQA packing: one program serves GP heads of a KV group (rows = token x head); tiles of 32,
    64 and 128 rows give GP = 2, 4, 8 at G = 8, with key padding, causal and windows."""
    monkeypatch.setattr(attn, "_INTERPRET_CONFIG", attn._Config(block_m, 32, 1, 1))
    assert attn._heads_per_program(8, block_m) == gp
    B, T, S, Hq, Hkv, D = 2, 45, 45, 16, 2, 32
    q, k, v = randn(B, T, Hq, D, dtype=torch.float32), *(
        randn(B, S, Hkv, D, dtype=torch.float32) for _ in range(2)
    )
    seqlens_k = torch.tensor([S, 17], dtype=torch.int32)
    k[1, 17:], v[1, 17:] = float("nan"), float("nan")
    check_forward(q, k, v, seqlens_k=seqlens_k, causal=causal, window_size=window, scale=D**-0.5)


def test_heads_per_program():
    """GP: the largest power of two dividing G with at least 16 rows per head in the tile."""
    assert [attn._heads_per_program(g, 128) for g in (1, 2, 3, 4, 6, 8, 12, 16, 32)] == [
        1, 2, 1, 4, 2, 8, 4, 8, 8,
    ]
    assert attn._heads_per_program(4, 32) == 2 and attn._heads_per_program(4, 16) == 1


@pytest.mark.interpret
@pytest.mark.parametrize(
    "causal, window, dtype",
    [
        (False, (-1, -1), torch.float32),
        (True, (-1, -1), torch.bfloat16),
        (False, (5, 7), torch.float16),
    ],
    ids=["bidir-f32", "causal-bf16", "window-f16"],
)
def test_query_padding(poisoned, causal, window, dtype):
    """seqlens_q: padded query rows (their q rows hold NaN) give out 0 and lse -inf, real rows
    are those of the unpadded call; lengths 0, partial blocks, full, and out-of-range values
    (clamped to [0, T])."""
    B, T, Hq, Hkv, D = 4, 70, 8, 2, 64
    q = randn(B, T, Hq, D, dtype=dtype)
    k, v = randn(B, T, Hkv, D, dtype=dtype), randn(B, T, Hkv, D, dtype=dtype)
    lengths = torch.tensor([70, 33, 0, 1], dtype=torch.int32)
    padded = torch.arange(T)[None, :] >= lengths[:, None]
    q[padded], k[padded], v[padded] = float("nan"), float("nan"), float("nan")
    masking = dict(seqlens_k=lengths, causal=causal, window_size=window, scale=D**-0.5)
    check_forward(q, k, v, seqlens_q=lengths, **masking)
    # out-of-range lengths are clamped: -5 -> 0, T + 9 -> T
    wide = torch.tensor([T + 9, 33, -5, 1], dtype=torch.int32)
    out, lse = attn.attention_forward(q, k, v, seqlens_q=wide, **masking)
    want, want_lse = attn.attention_forward(q, k, v, seqlens_q=lengths, **masking)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.interpret
def test_query_padding_refusals():
    q = torch.randn(2, 8, 2, 32)
    with pytest.raises(ValueError, match="seqlens_q: dense only"):
        cu = torch.tensor([0, 8, 16], dtype=torch.int32)
        attn.attention_forward(
            q.flatten(0, 1), q.flatten(0, 1), q.flatten(0, 1), cu_seqlens_q=cu,
            cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8, seqlens_q=cu[:2], scale=1.0,
        )  # fmt: skip
    for bad in (torch.tensor([8, 8]), torch.tensor([8], dtype=torch.int32)):
        with pytest.raises(ValueError, match="seqlens_q: expected a 1-D int32 tensor of 2"):
            attn.attention_forward(q, q, q, seqlens_q=bad, scale=1.0)


@pytest.mark.interpret
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_tma_loads(poisoned, monkeypatch, varlen):
    """The Hopper path that reads the unmasked K/V blocks through TMA descriptors (forced on
    under the interpreter) gives the pointer path's results; descriptors over zeros change the
    result, so the descriptors are what those blocks read."""
    B, T, S, Hq, Hkv, D = 2, 100, 150, 4, 2, 64
    q = randn(B, T, Hq, D, dtype=torch.float32)
    k, v = randn(B, S, Hkv, D, dtype=torch.float32), randn(B, S, Hkv, D, dtype=torch.float32)
    lengths = torch.tensor([S, 97], dtype=torch.int32)
    if varlen:
        cu_q = torch.tensor([0, T, 2 * T], dtype=torch.int32)
        cu_k = torch.tensor([0, S, S + 97], dtype=torch.int32)
        keys = torch.cat([k[0], k[1, :97]]), torch.cat([v[0], v[1, :97]])
        args = (q.flatten(0, 1), *keys)
        masking = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=T, max_seqlen_k=S)
    else:
        args, masking = (q, k, v), dict(seqlens_k=lengths)
    plain = attn.attention_forward(*args, **masking, scale=D**-0.5)
    monkeypatch.setattr(attn, "_tma_ok", lambda k, v, interpret: True)
    tma = attn.attention_forward(*args, **masking, scale=D**-0.5)
    torch.testing.assert_close(tma[0], plain[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tma[1], plain[1], rtol=1e-6, atol=1e-6)
    real = attn._kv_descriptors
    monkeypatch.setattr(
        attn, "_kv_descriptors", lambda k, v, bn, bd: real(torch.zeros_like(k), v, bn, bd)
    )
    zeroed = attn.attention_forward(*args, **masking, scale=D**-0.5)
    assert not torch.allclose(zeroed[0], plain[0]), "the TMA descriptors were not read"


@pytest.mark.interpret
@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.5])
def test_any_scale(poisoned, scale):
    """Scales <= 0 take the scale-first path (the raw-max FMA needs scale > 0); both match."""
    q, k, v = (randn(2, 37, 4, 32, dtype=torch.float32) for _ in range(3))
    check_forward(q, k[:, :, :2], v[:, :, :2], seqlens_k=torch.tensor([37, 5], dtype=torch.int32),
                  causal=False, scale=scale)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# memory safety: offsets, strides, sizes
# ---------------------------------------------------------------------------------------------


class Guarded:
    """Floating tensors from torch.empty / empty_like are NaN-filled views into the middle of a
    larger NaN buffer, margins at least 4096 elements on both sides: a kernel writing past its
    output lands in a margin (detected by :meth:`check`) instead of corrupting the heap."""

    def __init__(self) -> None:
        self.buffers: list[tuple[Tensor, int, int]] = []

    def alloc(self, shape, dtype, device) -> Tensor:
        n = math.prod(shape)
        pad = max(4096, n)
        buf = torch.full((n + 2 * pad,), float("nan"), dtype=dtype, device=device)
        self.buffers.append((buf, pad, n))
        return buf[pad : pad + n].view(shape)

    def check(self) -> None:
        assert self.buffers, "the launchers allocated nothing through torch.empty"
        for buf, pad, n in self.buffers:
            for margin in (buf[:pad], buf[pad + n :]):
                assert margin.isnan().all(), f"a kernel wrote outside a {n}-element output"


@pytest.fixture
def guarded(monkeypatch) -> Guarded:
    g = Guarded()
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*size, dtype=None, device=None, **kw):
        dtype = dtype or torch.get_default_dtype()
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        if kw or not dtype.is_floating_point:
            return real_empty(*size, dtype=dtype, device=device, **kw)
        return g.alloc(shape, dtype, device)

    def empty_like(t, *, dtype=None, device=None, **kw):
        dtype = dtype or t.dtype
        if kw or not dtype.is_floating_point:
            return real_empty_like(t, dtype=dtype, device=device, **kw)
        return g.alloc(tuple(t.shape), dtype, device or t.device)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    return g


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
def test_backend_strided_varlen_cu_seqlens(guarded, causal):
    """vf.attention_varlen(backend="triton") with strided cu_seqlens (a column of a 2-D tensor)
    and offset/strided q, k, v: equal to the reference, nothing written outside the outputs
    (regression: the kernel read the cu buffer as contiguous, computed wrong values and wrote
    past the end of the output; the margins make that a failure, not heap corruption)."""
    check_strided_varlen("triton", causal)
    guarded.check()


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [False, True])
def test_backend_strided_dense(guarded, causal):
    """vf.attention(backend="triton") with offset/strided q, k, v and a non-contiguous
    key_padding_mask."""
    check_strided_dense("triton", causal)
    guarded.check()


@pytest.mark.interpret
def test_offsets_out_of_range_stay_inside(guarded):
    """Offsets no validation would pass (cu_seqlens past the totals, seqlens_k < 0 or > S)
    given to the launchers directly: the kernels clamp every sequence to the tensors, so nothing
    outside them is read (inputs sit in NaN margins) or written (outputs in guarded margins)."""
    D, scale = 32, 32**-0.5
    g = torch.Generator().manual_seed(21)
    # varlen: totals 7 and 8; the last sequence claims rows up to 30 and 40
    q, k, v = (nan_margins(torch.randn(n, h, D, generator=g)) for n, h in ((7, 4), (8, 2), (8, 2)))
    do = torch.randn(7, 4, D, generator=g)
    bad = dict(
        cu_seqlens_q=torch.tensor([0, 3, 30], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 5, 40], dtype=torch.int32),
        max_seqlen_q=30, max_seqlen_k=40, scale=scale,
    )
    out, lse = attn.attention_forward(q, k, v, **bad)
    grads = attn.attention_backward(do, q, k, v, out, lse, **bad)
    want = eager_attention_varlen(q, k, v, [0, 3, 7], [0, 5, 8], causal=False, scale=scale)
    torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)
    for got in grads:
        assert torch.isfinite(got).all(), "a kernel read outside its inputs (NaN margins)"
    # dense: lengths below 0 and above S
    q, k, v = (nan_margins(torch.randn(2, 5, h, D, generator=g)) for h in (2, 2, 2))
    seqlens = torch.tensor([-3, 100], dtype=torch.int32)
    out, lse = attn.attention_forward(q, k, v, seqlens_k=seqlens, scale=scale)
    grads = attn.attention_backward(torch.randn_like(out), q, k, v, out, lse, seqlens_k=seqlens,
                                    scale=scale)
    want = eager_attention(q, k, v, seqlens_k=torch.tensor([0, 5]), causal=False, scale=scale)
    torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
    for got in grads:
        assert torch.isfinite(got).all()
    guarded.check()


@pytest.mark.interpret
def test_launchers_check_offset_tensors():
    """Offsets of the wrong size or dtype are refused (the kernels index them blindly); strided
    ones are copied (seqlens_k as a column of a 2-D tensor gives the same result)."""
    q, k = torch.randn(2, 5, 2, 32), torch.randn(2, 6, 2, 32)
    with pytest.raises(ValueError, match="seqlens_k: expected a 1-D int32 tensor of 2 entries"):
        attn.attention_forward(q, k, k, seqlens_k=torch.tensor([3], dtype=torch.int32), scale=1.0)
    with pytest.raises(ValueError, match="seqlens_k: expected a 1-D int32"):
        attn.attention_forward(q, k, k, seqlens_k=torch.tensor([3, 4]), scale=1.0)
    lengths = torch.tensor([[3, 99], [6, 99]], dtype=torch.int32)[:, 0]
    got, _ = attn.attention_forward(q, k, k, seqlens_k=lengths, scale=0.2)
    want, _ = attn.attention_forward(q, k, k, seqlens_k=lengths.contiguous(), scale=0.2)
    assert torch.equal(got, want)
    qv, kv = torch.randn(5, 2, 32), torch.randn(6, 2, 32)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected a 1-D int32 tensor of 2 entries"):
        attn.attention_forward(qv, kv, kv, cu_seqlens_q=cu, max_seqlen_q=5, max_seqlen_k=6,
                               cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32), scale=1.0)
    with pytest.raises(ValueError, match="v: shape"):
        attn.attention_forward(q, k, k[:, :5], scale=1.0)
    out, lse = attn.attention_forward(q, k, k, scale=1.0)
    with pytest.raises(ValueError, match="lse: expected float32"):
        attn.attention_backward(out, q, k, k, out, lse[:, :, :4], scale=1.0)


@pytest.mark.interpret
def test_backend_reads_the_padding_mask_on_the_host_once(monkeypatch):
    """vf.attention(backend="triton") with a key_padding_mask: supports reads the mask's right
    padding on the host once per call (one device sync on GPU) and its plan, the key lengths,
    is what the launch gets (regression: the lengths were computed and synchronised twice)."""
    from vljepa_fast import _backends
    from vljepa_fast.ops import attention as ops

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, n, 2, 32, generator=g) for n in (5, 9, 9))
    mask = torch.arange(9)[None] < torch.tensor([9, 4])[:, None]
    x = ops.attention_inputs(q, k, v, key_padding_mask=mask)
    rec, plan = _backends.select("attention", "triton", x)
    assert rec.name == "triton" and torch.equal(plan, torch.tensor([9, 4], dtype=torch.int32))
    found, launched = [], []
    real_counts, real_fwd = ops._key_counts, ops._tri_fwd

    def counts(m):
        c = real_counts(m)
        found.append(c.lengths)
        return c

    def fwd(q, k, v, seqlens_k, *rest):
        launched.append(seqlens_k)
        return real_fwd(q, k, v, seqlens_k, *rest)

    monkeypatch.setattr(ops, "_key_counts", counts)
    monkeypatch.setattr(ops, "_tri_fwd", fwd)
    for _ in range(2):
        out = vf.attention(q, k, v, key_padding_mask=mask, backend="triton")
    assert len(found) == 2, f"{len(found)} host reads of the mask in 2 calls"
    assert launched[0] is found[0] and launched[1] is found[1]
    want = vf.attention(q, k, v, key_padding_mask=mask, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # no mask: nothing to read, plan None, no lengths given to the launch
    assert _backends.select("attention", "triton", ops.attention_inputs(q, k, v))[1] is None
    vf.attention(q, k, v, backend="triton")
    assert len(found) == 2 and launched[-1] is None


def test_row64_only_for_huge_offsets():
    """int64 in-sequence offsets exactly when an offset inside one batch entry can pass int32
    (a meta tensor: nothing is allocated)."""
    small = torch.empty(2, 1024, 32, 64, device="meta")
    lse = torch.empty(2, 32, 1024, device="meta")
    assert not attn._row64(False, lse, small)
    rows = 2**31 // (32 * 64)  # one sequence of 2**31 elements
    huge = torch.empty(1, rows, 32, 64, device="meta")
    assert attn._row64(False, torch.empty(1, 32, rows, device="meta"), huge)
    # a transposed view: the head stride is what grows
    heads = torch.empty(1, 32, rows, 64, device="meta").transpose(1, 2)
    assert attn._row64(False, torch.empty(1, 32, rows, device="meta"), heads)
    # varlen lse [Hq, total_q] of more than 2**31 entries
    assert attn._row64(True, torch.empty(64, 2**26, device="meta"), small[0])


@pytest.mark.interpret
@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 4, 2, 72), (1, 4, 2, 72)), "head dim 72"),
        (((1, 4, 3, 64), (1, 4, 2, 64)), "multiple"),
    ],
)
def test_rejects_unsupported(shapes, match):
    q, k = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    with pytest.raises(ValueError, match=match):
        attn.attention_forward(q, k, k, scale=1.0)


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------
# The launchers run on meta tensors (nothing allocated) with launch() recording instead of
# launching (tests/_aot.py): every kernel is compiled with exactly the constexprs, config and
# argument values its launcher gives it for that input, whatever constexprs the kernels grow.
# Shape: B 2, T = S = 1000 (T and lse strides not multiples of 16, as the JIT sees odd lengths;
# the others are), 32:8 heads (GQA 4:1), key padding.

_LABELS = {
    "_attn_bwd_preprocess_kernel": "pre",
    "_attn_bwd_dq_kernel": "dq",
}


def _label(launch: Launch) -> str:
    name = launch.kernel.fn.__name__
    if name == "_attn_bwd_dkdv_kernel":
        return "fast" if launch.kwargs.get("DQ_ATOMIC") else "dkdv"
    return _LABELS.get(name, "fwd")  # every kernel of the forward's launches


def attention_launches(
    which: str,
    arch: int,
    D: int,
    dtype: torch.dtype,
    *,
    row64: bool = False,
    left: bool = False,
    right: bool = False,
    varlen: bool = False,
    seqlens_q: bool = False,
) -> list[Launch]:
    """The launches of ``which`` ("fwd": the forward's; "fast", "pre": the fast backward's; "dq",
    "dkdv": the deterministic backward's) for one meta input on a GPU of ``arch``."""
    B, T, Hq, Hkv = 2, 1000, 32, 8
    if row64:  # one batch entry of just over 2**31 elements: int64 in-sequence offsets
        T = 2**31 // (Hq * D) + 8
    meta = dict(device="meta", dtype=dtype)
    window = (7 if left else -1, 5 if right else -1)
    if varlen:
        q, k = torch.empty(B * T, Hq, D, **meta), torch.empty(B * T, Hkv, D, **meta)
        lse = torch.empty(Hq, B * T, device="meta", dtype=torch.float32)
        cu = torch.empty(B + 1, device="meta", dtype=torch.int32)
        masking = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T)
    else:
        q, k = torch.empty(B, T, Hq, D, **meta), torch.empty(B, T, Hkv, D, **meta)
        lse = torch.empty(B, Hq, T, device="meta", dtype=torch.float32)
        lengths = torch.empty(B, device="meta", dtype=torch.int32)
        masking = dict(seqlens_k=lengths)
        if seqlens_q:  # the predictor's padded queries (mask_queries)
            masking["seqlens_q"] = lengths
    masking.update(window_size=window, scale=D**-0.5)
    # the launchers read the arch through attention._arch (None off CUDA, so meta tensors get
    # it from here)
    with (
        recorded_launches(attn, attn_bwd, arch=arch) as made,
        mock.patch.object(attn, "_arch", lambda device: arch),
        mock.patch.object(attn_bwd, "_arch", lambda device: arch),
    ):
        if which == "fwd":
            attn.attention_forward(q, k, k, **masking)
        else:
            det = which in ("dq", "dkdv")
            attn_bwd.attention_backward(q, q, k, k, q, lse, deterministic=det, **masking)
    found = [launch for launch in made if _label(launch) == which]
    assert found, f"no {which} launch among {[_label(m) for m in made]}"
    return found


def check_compiles(which: str, arch: int, D: int, dtype: torch.dtype, **variant) -> None:
    """Every ``which`` kernel compiles for ``arch`` without spills, within the arch's shared
    memory and register file; on sm_90a every 16-bit product is a wgmma (no mma.sync) at least
    min(64, D) wide."""
    for launch in attention_launches(which, arch, D, dtype, **variant):
        report = compile_launch(launch, arch=arch)
        print(f"triton {triton.__version__} {which}: {report.row()}")
        assert report.n_spills == 0, f"{report.name}: {report.n_spills} bytes spilled"
        assert report.shared <= report.shared_limit, f"{report.name}: {report.shared} B shared"
        assert report.n_regs * 32 * report.num_warps <= 65536, f"{report.name}: register file"
        if arch == 90 and dtype != torch.float32 and report.n_dots:
            assert report.n_mma_sync == 0, f"{report.name}: mma.sync on sm_90a"
            assert report.uses_wgmma, f"{report.name}: no wgmma on sm_90a"
            narrow = [n for n in report.wgmma_n() if n < min(64, D)]
            assert not narrow, f"{report.name}: wgmma {report.wgmma_shapes} narrower than 64"


_KINDS = ("fwd", "fast", "dq", "dkdv")
_ids = dict(ids=lambda x: str(x).replace("torch.", ""))


_MAIN = [
    (90, 64, torch.bfloat16),
    (80, 64, torch.float16),
    (90, 128, torch.bfloat16),
    (80, 128, torch.bfloat16),
    (80, 64, torch.float32),
    (90, 128, torch.float32),
]


@pytest.mark.compile
@pytest.mark.parametrize(
    "which, arch, D, dtype",
    # 16-bit head dim 128 on sm_90a has no fast kernel (test_no_fast_kernel_where_it_spills)
    [(w, *c) for c in _MAIN for w in _KINDS if (w, *c) != ("fast", 90, 128, torch.bfloat16)],
    **_ids,
)
def test_compiles(which, arch, D, dtype):
    """The predictor's case (GQA 4:1, key padding, bidirectional), every kernel."""
    check_compiles(which, arch, D, dtype)


@pytest.mark.compile
def test_no_fast_kernel_where_it_spills():
    """16-bit head dim 128 on sm_90a: the fast kernel spilled at every config tried, so the
    backward runs the deterministic kernels there (compiled by test_compiles), whatever
    ``deterministic`` says; sm_80 keeps its fast kernel."""
    launches = attention_launches("dq", 90, 128, torch.bfloat16)
    assert [_label(m) for m in launches] == ["dq"]
    with (
        recorded_launches(attn, attn_bwd, arch=90) as made,
        mock.patch.object(attn_bwd, "_arch", lambda device: 90),
    ):
        q = torch.empty(1, 100, 4, 128, device="meta", dtype=torch.bfloat16)
        lse = torch.empty(1, 4, 100, device="meta", dtype=torch.float32)
        attn_bwd.attention_backward(q, q, q, q, q, lse, scale=0.1, deterministic=False)
    assert [_label(m) for m in made] == ["pre", "dq", "dkdv"]
    assert attention_launches("fast", 80, 128, torch.bfloat16)


@pytest.mark.compile
@pytest.mark.parametrize("arch, dtype", [(90, torch.bfloat16), (80, torch.float16)], **_ids)
def test_compiles_prepass(arch, dtype):
    """The backward's delta pre-pass (no products: spills and shared memory only)."""
    check_compiles("pre", arch, 64, dtype)


@pytest.mark.compile
@pytest.mark.parametrize("which", _KINDS)
@pytest.mark.parametrize("arch, dtype", [(90, torch.bfloat16), (80, torch.float16)], **_ids)
def test_compiles_seqlens_q(which, arch, dtype):
    """Padded queries (seqlens_q, the predictor's mask_queries), head dim 64."""
    check_compiles(which, arch, 64, dtype, seqlens_q=True)


@pytest.mark.compile
@pytest.mark.parametrize("which", _KINDS)
@pytest.mark.parametrize("arch, D, dtype", [(90, 64, torch.bfloat16), (80, 128, torch.bfloat16)])
def test_compiles_row64(which, arch, D, dtype):
    """The int64-offset variant (inputs of over 2**31 elements per batch entry)."""
    check_compiles(which, arch, D, dtype, row64=True)


@pytest.mark.compile
@pytest.mark.parametrize("which", _KINDS)
@pytest.mark.parametrize("arch, dtype", [(90, torch.bfloat16), (80, torch.float16)], **_ids)
@pytest.mark.parametrize(
    "left, right", [(True, True), (True, False), (False, True)], ids=["both", "left", "right"]
)
def test_compiles_window(which, arch, dtype, left, right):
    """Sliding windows (both bounds, left only, right only = causal's), head dim 64."""
    check_compiles(which, arch, 64, dtype, left=left, right=right)


@pytest.mark.compile
@pytest.mark.parametrize("which", _KINDS)
def test_compiles_varlen(which):
    """Packed variable-length sequences on sm_90a, head dim 64, bf16."""
    check_compiles(which, 90, 64, torch.bfloat16, varlen=True)
