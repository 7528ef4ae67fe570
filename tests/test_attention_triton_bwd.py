"""The Triton attention backward (kernels/attention_bwd.py), both paths, against float64.

interpret: CPU tensors through Triton's interpreter. The backward gets out and lse from the
float64 reference (so it is tested on its own, whatever the forward does), fresh random inputs,
lengths that are no multiple of the interpreter's 32 x 64 blocks. Every buffer the launcher
allocates is NaN-poisoned; padded keys hold NaN, and padded query rows (seqlens_q) hold NaN in
q, do, out and lse, so a kernel that reads a padded row, or leaves an element unwritten, fails.
Both paths are checked against float64 with the project's bound (2x the error of the same
eager attention in that dtype, plus a floor): the fast one (dq by fp32 atomics) and the
deterministic one (bit-identical across two runs); the fast dq is also held close to the
deterministic one. Padded query rows must get dq exactly 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

# attention first: it imports attention_bwd at its end (importing attention_bwd first is circular)
from vljepa_fast._kernels import attention as attn  # noqa: F401
from vljepa_fast._kernels import attention_bwd as attn_bwd

from tests.test_attention_triton import (
    FLOOR,
    assert_matches,
    eager_attention,
    eager_attention_varlen,
    randn,
    reference,
)

pytestmark = pytest.mark.interpret


def _nan_rows(x: Tensor, rows: Tensor) -> Tensor:
    """A copy of ``x`` ([B, T, H, D], or lse [B, H, T]) with NaN at the query rows ``rows``
    ([B, T] bool)."""
    x = x.clone()
    (x if x.dim() == 4 else x.transpose(1, 2))[rows] = float("nan")
    return x


def _check_paths(run_eager, inputs, do, dtype, backward, q_pad: Tensor | None = None):
    """Both paths of ``backward(deterministic)`` -> (dq, dk, dv) against float64 and eager in
    ``dtype``; the deterministic one twice (bit-identical); fast dq close to deterministic dq.
    ``q_pad``: bool mask of dq's padded rows (shape of dq without its last two dims), which must
    be exactly 0. Returns the float64 (out, lse)."""
    exact = reference(run_eager, inputs, do, torch.float64)
    eager = reference(run_eager, inputs, do, dtype)
    got = {}
    for det in (False, True):
        dq, dk, dv = backward(exact[0].to(dtype), exact[1].float(), det)
        assert dq.dtype == dk.dtype == dv.dtype == dtype
        for name, g, i in zip(("dq", "dk", "dv"), (dq, dk, dv), (2, 3, 4), strict=True):
            assert_matches(f"{name} (deterministic={det})", g, exact[i], eager[i], dtype)
        if q_pad is not None:
            assert torch.equal(dq[q_pad], torch.zeros_like(dq[q_pad])), "padded query: dq != 0"
        got[det] = (dq, dk, dv)
    again = backward(exact[0].to(dtype), exact[1].float(), True)
    for name, a, b in zip(("dq", "dk", "dv"), got[True], again, strict=True):
        assert torch.equal(a, b), f"deterministic {name} differs between two runs"
    # the fast dq: the same sums in another order
    err_eager = (eager[2].double() - exact[2]).abs().max().item()
    bound = 2 * err_eager + FLOOR[dtype] * max(1.0, exact[2].abs().max().item())
    diff = (got[False][0].double() - got[True][0].double()).abs().max().item()
    assert diff <= bound, f"fast dq differs from the deterministic one by {diff:.3g} > {bound:.3g}"


# (B, T, S, Hq, Hkv, D, causal, window, dtype, seqlens_k, seqlens_q)
DENSE = [
    pytest.param(2, 37, 70, 2, 2, 64, False, (-1, -1), torch.float32, None, None, id="g1-d64"),
    pytest.param(
        2, 37, 70, 4, 2, 32, False, (-1, -1), torch.bfloat16, [70, 7], [37, 20], id="g2-pad90-q"
    ),
    pytest.param(
        2, 45, 45, 4, 1, 64, True, (-1, -1), torch.float16, [45, 30], [45, 30], id="g4-causal-q"
    ),
    pytest.param(
        3,
        21,
        33,
        8,
        1,
        32,
        False,
        (-1, -1),
        torch.float32,
        [0, 33, 20],
        [21, 9, 0],
        id="g8-nokey-allpad",
    ),
    pytest.param(
        1, 33, 40, 3, 1, 128, False, (5, 3), torch.bfloat16, [38], [17], id="g3-d128-window-q"
    ),
    pytest.param(1, 40, 29, 2, 1, 96, True, (-1, -1), torch.float32, None, [33], id="d96-T>S-q"),
    pytest.param(
        2, 70, 70, 4, 4, 32, False, (10, -1), torch.bfloat16, [70, 50], [70, 50], id="left-q"
    ),
    pytest.param(
        1, 66, 70, 6, 2, 64, False, (-1, 2), torch.float16, [41], [66], id="g3-right-pad40"
    ),
]


@pytest.mark.parametrize("B, T, S, Hq, Hkv, D, causal, window, dtype, sk, sq", DENSE)
def test_dense_backward(poisoned, B, T, S, Hq, Hkv, D, causal, window, dtype, sk, sq):
    """GQA 1-8, head dims 32-128, key padding 0-90%, rows with no real key, seqlens_q padding
    (one batch entry all padding), causal, windows; both paths against float64."""
    scale = D**-0.5
    q = randn(B, T, Hq, D, dtype=dtype)
    k, v = randn(B, S, Hkv, D, dtype=dtype), randn(B, S, Hkv, D, dtype=dtype)
    do = randn(B, T, Hq, D, dtype=dtype)
    seqlens_k = None if sk is None else torch.tensor(sk, dtype=torch.int32)
    seqlens_q = None if sq is None else torch.tensor(sq, dtype=torch.int32)
    if seqlens_k is not None:
        pad = torch.arange(S)[None, :] >= seqlens_k[:, None]
        k[pad], v[pad] = float("nan"), float("nan")
    q_pad = torch.zeros(B, T, dtype=torch.bool)
    if seqlens_q is not None:
        q_pad = torch.arange(T)[None, :] >= seqlens_q[:, None]
        # the reference: padded rows computed with q = do = 0 pass no gradient (the same as
        # zeroing them afterwards); the kernels get NaN there and must never read it
        q[q_pad], do[q_pad] = 0, 0
    masking = dict(seqlens_k=seqlens_k, causal=causal, scale=scale, window_size=window)

    def backward(out, lse, det):
        return attn_bwd.attention_backward(
            _nan_rows(do, q_pad), _nan_rows(q, q_pad), k, v, _nan_rows(out, q_pad),
            _nan_rows(lse, q_pad), seqlens_q=seqlens_q, deterministic=det, **masking,
        )  # fmt: skip

    run_eager = lambda q, k, v: eager_attention(q, k, v, **masking)
    _check_paths(run_eager, (q, k, v), do, dtype, backward, q_pad if sq is not None else None)
    assert poisoned, "the launcher allocated nothing through torch.empty: poisoning is inert"


@pytest.mark.parametrize(
    "causal, window, dtype, Hq, Hkv, D",
    [
        pytest.param(False, (-1, -1), torch.float32, 4, 1, 64, id="g4-f32"),
        pytest.param(True, (-1, -1), torch.bfloat16, 4, 2, 32, id="g2-bf16-causal"),
        pytest.param(False, (6, 3), torch.float16, 2, 2, 64, id="g1-f16-window"),
    ],
)
def test_varlen_backward(poisoned, causal, window, dtype, Hq, Hkv, D):
    """Packed sequences, empty ones included (no queries; no keys: zero gradients), a single
    query, a single key; both paths against float64."""
    lq, lk = [1, 37, 0, 5, 12], [20, 1, 45, 0, 70]
    cu_q = [0, *torch.tensor(lq).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(lk).cumsum(0).tolist()]
    q = randn(cu_q[-1], Hq + 1, D, dtype=dtype)[:, :Hq]  # a strided view
    k, v = randn(cu_k[-1], Hkv, D, dtype=dtype), randn(cu_k[-1], Hkv, D, dtype=dtype)
    do = randn(cu_q[-1], Hq, D, dtype=dtype)
    masking = dict(
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
        max_seqlen_q=max(lq), max_seqlen_k=max(lk), causal=causal, scale=D**-0.5,
        window_size=window,
    )  # fmt: skip

    def backward(out, lse, det):
        return attn_bwd.attention_backward(do, q, k, v, out, lse, deterministic=det, **masking)

    def run_eager(q, k, v):
        return eager_attention_varlen(
            q, k, v, cu_q, cu_k, causal=causal, scale=D**-0.5, window_size=window
        )

    _check_paths(run_eager, (q, k, v), do, dtype, backward)
    assert poisoned, "the launcher allocated nothing through torch.empty: poisoning is inert"


def test_path_follows_deterministic_mode(monkeypatch):
    """deterministic=None follows torch.are_deterministic_algorithms_enabled(): the dQ kernel
    (no atomics) under torch.use_deterministic_algorithms(True), the fast kernel (DQ_ATOMIC)
    otherwise; seqlens_q with varlen inputs and a non-bool deterministic are refused."""
    launched = []
    real = attn_bwd.launch

    def record(kernel, grid, *args, **kwargs):
        launched.append((getattr(kernel, "fn", kernel).__name__, kwargs.get("DQ_ATOMIC")))
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(attn_bwd, "launch", record)
    q, k, do = torch.randn(1, 5, 2, 32), torch.randn(1, 7, 1, 32), torch.randn(1, 5, 2, 32)
    out, lse = eager_attention(q, k, k, seqlens_k=None, causal=False, scale=0.2)
    kernels = {}
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for mode in (False, True):
            torch.use_deterministic_algorithms(mode)
            launched.clear()
            kernels[mode] = attn_bwd.attention_backward(do, q, k, k, out, lse, scale=0.2)
            names = [n for n, _ in launched]
            atomic = [a for n, a in launched if n == "_attn_bwd_dkdv_kernel"]
            assert ("_attn_bwd_dq_kernel" in names) == mode and atomic == [not mode], launched
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(kernels[False], kernels[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="seqlens_q: dense only"):
        attn_bwd.attention_backward(
            do[0], q[0], k[0], k[0], out[0], lse[0], cu_seqlens_q=cu,
            cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32), max_seqlen_q=5,
            max_seqlen_k=7, seqlens_q=torch.tensor([3], dtype=torch.int32), scale=0.2,
        )  # fmt: skip
    with pytest.raises(ValueError, match="seqlens_q: expected a 1-D int32 tensor of 1 entries"):
        attn_bwd.attention_backward(
            do, q, k, k, out, lse, seqlens_q=torch.tensor([3, 4], dtype=torch.int32), scale=0.2
        )
    with pytest.raises(ValueError, match="deterministic: expected a bool"):
        attn_bwd.attention_backward(do, q, k, k, out, lse, deterministic=1, scale=0.2)


def test_seqlens_q_clamped():
    """seqlens_q values below 0 or above T are clamped to [0, T] (like seqlens_k): -3 pads
    every row, 100 none; nothing outside the tensors is read (the results stay finite)."""
    q, k, do = torch.randn(2, 9, 2, 32), torch.randn(2, 11, 2, 32), torch.randn(2, 9, 2, 32)
    out, lse = eager_attention(q, k, k, seqlens_k=None, causal=False, scale=0.2)
    for det in (False, True):
        dq, dk, dv = attn_bwd.attention_backward(
            do, q, k, k, out, lse, seqlens_q=torch.tensor([-3, 100], dtype=torch.int32),
            scale=0.2, deterministic=det,
        )  # fmt: skip
        full = attn_bwd.attention_backward(do, q, k, k, out, lse, scale=0.2, deterministic=det)
        assert torch.equal(dq[0], torch.zeros_like(dq[0]))
        assert torch.equal(dk[0], torch.zeros_like(dk[0]))
        assert torch.equal(dv[0], torch.zeros_like(dv[0]))
        for got, want in zip((dq, dk, dv), full, strict=True):
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
