"""attention: the VL-JEPA predictor's attention (GQA 32:8, head dim 64, bidirectional, key
padding), forward, backward and both.

Cases (bench/presets.py): the predictor's shapes (``what="predictor"``: B x (4096 visual + 512
query tokens) = T 4608, 32:8 heads, head dim 64, a fraction ``pad`` of the T positions padded
on average, ``mask_queries=True``: the padded positions are padded queries too, whose work the
kernels may skip), FA3's sweep (``what="sweep"``: 16k tokens per batch, B = 16384 / T for T
from 512 to 16k, no padding, 32:8 as the predictor and 32:32 as FA3's MHA), and the generic
cases of the small presets.

Providers, side by side in one benchmark group per shape and mode:

* ``reference``: the eager reference (materialises the [B, Hq, T, S] scores in fp32); and
  ``reference+compile`` (cases with ``compile``), ``torch.sdpa[math]``: only where those
  scores take at most :data:`EAGER_SCORES_MAX` bytes (else hours of a GPU run's budget).
* ``vf.<backend>``: every backend registered for ``attention`` with the [B, S] key padding mask
  (and the case's ``mask_queries``), and, on padded cases, ``vf.<backend>.varlen``: the
  ``attention_varlen`` backends on the same real tokens packed (packing outside the timing; on
  large cases the Triton and CUDA ones only); each skipped with its reasons where it cannot
  serve. Which of them ``auto`` picks: the first line of ``vf._backends.explain``, in the notes.
* ``torch.sdpa[mask]``: torch's scaled_dot_product_attention called the way public VL-JEPA code
  calls it, with a dense additive float [B, 1, T, S] mask (0 for real keys, the dtype's minimum
  for padding; all zeros on an unpadded case), built outside the timing; on the backend torch
  picks. ``torch.sdpa[nomask]``: the same without any mask (padding then attended as if it were
  real: the cost of the dense problem, not the same result); on padded cases only (unpadded,
  ``vf.sdpa`` is that call).
* ``flash_attn`` (flash-attn 2), ``flash_attn3`` (FlashAttention-3, ``flash_attn_interface``)
  and ``xformers``: their padded cases run on the packed real tokens (varlen functions, a
  block-diagonal mask: the real queries only, i.e. ``mask_queries``' semantics), their dense
  cases directly; skipped with "not importable ... pip install ..." where not installed.

FLOPs and bytes: :func:`attention_cost`. They count real tokens only, so a provider that
computes on padding shows a lower rate for the same result.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import _harness
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import vljepa_fast as vf
from vljepa_fast import _backends, reference
from vljepa_fast.ops import attention as attention_op

OP = "attention"

ATTENTION_FORMULA = (
    "flops per sequence of L real tokens: fwd 4*L*L*D*Hq (q k^T and p v; halved when causal); "
    "bwd 2.5x fwd for every provider (five GEMMs of L*L*D per head: s recomputed, dv, dp, dq, "
    "dk, FlashAttention's count of a backward that stores no L x L matrix; the Triton backward "
    "executes 3.5x, recomputing s and dp in both its dK/dV and dQ kernels, eager 2x from its "
    "stored probabilities); fwd+bwd 3.5x fwd; bytes per sequence: fwd (2*L*Hq + 2*L*Hkv)*D*s "
    "(read q, k, v; write o), bwd (4*L*Hq + 4*L*Hkv)*D*s (read q, o, do, k, v; write dq, dk, dv)"
)


def padded_lengths(B: int, T: int, pad: float) -> list[int]:
    """Real lengths of a batch with a fraction ``pad`` of padding on average.

    Lengths spread evenly from 0.5x to 1.5x the mean (1 - pad) * T, so the batch has both short
    and long sequences (as real batches do) and exactly the stated padding on average.
    """
    if pad <= 0:
        return [T] * B
    mean = (1.0 - pad) * T
    if B == 1:
        return [max(1, round(mean))]
    return [min(T, max(1, round(mean * (0.5 + b / (B - 1))))) for b in range(B)]


def visible_pairs(L: int, causal: bool, window: tuple[int, int]) -> int:
    """Query-key pairs a sequence of L tokens attends to under a sliding window (left, right;
    -1 unbounded; causal caps right at 0), counted exactly."""
    left, right = window
    i = torch.arange(L)
    lo = torch.zeros_like(i) if left < 0 else (i - left).clamp(min=0)
    hi_right = 0 if causal else right
    hi = torch.full_like(i, L - 1) if hi_right < 0 else (i + hi_right).clamp(max=L - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def attention_flops(
    lengths: Sequence[int],
    Hq: int,
    D: int,
    causal: bool,
    mode: str,
    window: tuple[int, int] = (-1, -1),
) -> int:
    """FLOPs of attention over sequences of the given real lengths, the same for every provider.

    Forward: per sequence of L real tokens and query head, two GEMMs of L*L*D multiply-adds
    (s = q k^T and o = p v), 4*L*L*D*Hq in all; halved when causal (the L*(L+1)/2 visible
    pairs, rounded to half). With a sliding ``window`` (vf.attention's ``window_size``) only the
    visible pairs count, exactly (:func:`visible_pairs`): 4*pairs*D*Hq; a window's kernels
    skip the key blocks outside it. Padding is not counted, whatever a provider computes on it.

    Backward: 2.5x the forward, five GEMMs of L*L*D per head: s recomputed from q and k, then
    dv = p^T do, dp = do v^T, dq = ds k, dk = ds^T q. This is FlashAttention's count, the
    least a backward that stores no L x L matrix does. What the providers execute differs: the
    Triton backward 3.5x (its dK/dV and dQ kernels each recompute s and dp, so that no atomics
    are needed), the eager reference 2x (it keeps p from the forward, at L*L memory per head).
    The softmax's exponentials are not counted.
    """
    if tuple(window) == (-1, -1):
        fwd = sum(4 * L * L * D * Hq for L in lengths)
        if causal:
            fwd //= 2
    else:
        fwd = sum(4 * visible_pairs(L, causal, tuple(window)) * D * Hq for L in lengths)
    return _harness.mode_total(fwd, fwd * 5 // 2, mode)


def attention_bytes(
    lengths: Sequence[int], Hq: int, Hkv: int, D: int, itemsize: int, mode: str
) -> int:
    """Compulsory traffic of the real tokens in bytes.

    Forward (2*L*Hq + 2*L*Hkv)*D*s per sequence: read q [L, Hq, D], k and v [L, Hkv, D], write
    o [L, Hq, D]. Backward twice that, (4*L*Hq + 4*L*Hkv)*D*s: read q, o, do, k, v, write dq,
    dk, dv. The forward's log-sum-exp (4 bytes per query row and head) and the key padding mask
    are not counted.
    """
    fwd = sum((2 * L * Hq + 2 * L * Hkv) * D * itemsize for L in lengths)
    return _harness.mode_total(fwd, 2 * fwd, mode)


def attention_cost(
    lengths: Sequence[int], Hq: int, Hkv: int, D: int, itemsize: int, causal: bool, mode: str
) -> _harness.Cost:
    """:func:`attention_flops` and :func:`attention_bytes` of one call in ``mode``."""
    return _harness.Cost(
        attention_flops(lengths, Hq, D, causal, mode),
        attention_bytes(lengths, Hq, Hkv, D, itemsize, mode),
        ATTENTION_FORMULA,
    )


#: most bytes of the [B, Hq, T, S] fp32 scores for the providers that materialise them
EAGER_SCORES_MAX = 2 << 30
#: the varlen backends of a large padded case (the others pad back to dense or repeat the peers)
LARGE_VARLEN = ("triton", "cuda")


def _label(c: dict) -> str:
    causal = " causal" if c["causal"] else ""
    what = f"{c['what']} " if c.get("what") else ""
    mq = " mask_queries" if c.get("mask_queries") else ""
    return (
        f"{c['mode']} {what}B{c['B']} T{c['T']} H{c['Hq']}:{c['Hkv']} hd{c['D']} "
        f"pad{round(100 * c['pad'])}%{mq}{causal} {c['dtype']}"
    )


def _eager_fits(c: dict) -> bool:
    return c["B"] * c["Hq"] * c["T"] * c["T"] * 4 <= EAGER_SCORES_MAX


def _providers(c: dict) -> list[str]:
    eager = _eager_fits(c)
    names = ["reference"] if eager else []
    if c.get("compile") and eager:
        names.append("reference+compile")
    names += [f"vf.{r.name}" for r in _backends.records("attention") if r.name != "reference"]
    if c["pad"] > 0:
        names += [
            f"vf.{r.name}.varlen"
            for r in _backends.records("attention_varlen")
            if r.name != "reference" and (eager or r.name in LARGE_VARLEN)
        ]
    names += ["torch.sdpa[math]"] if eager else []
    names += ["torch.sdpa[mask]"] + (["torch.sdpa[nomask]"] if c["pad"] > 0 else [])
    return names + ["flash_attn", "flash_attn3", "xformers"]


def pytest_generate_tests(metafunc):
    _harness.parametrize(metafunc, OP, _providers, _label)


@functools.cache
def _compiled_reference():
    return torch.compile(reference.attention)


def _pack(s: tuple, lengths: list[int]) -> tuple:
    """(q, k, v, mask) -> (q, k, v) of the real tokens, [total, H, D] leaves, and cu_seqlens."""
    q, k, v, mask = s
    packed = tuple(x.detach()[mask].requires_grad_(x.requires_grad) for x in (q, k, v))
    lens = torch.tensor([0, *lengths], device=q.device, dtype=torch.int32)
    return (*packed, torch.cumsum(lens, 0, dtype=torch.int32))


def _dense_mask(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, 1, T, S] additive float mask in q's dtype: 0 for real keys, the dtype's minimum for
    padding (all zeros without a mask), as a model that always passes an attention mask does."""
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    add = torch.zeros(B, S, dtype=q.dtype, device=q.device)
    if mask is not None:
        add.masked_fill_(~mask, torch.finfo(q.dtype).min)
    return add[:, None, None, :].expand(-1, 1, T, -1).contiguous()


def _sdpa_peer(s: tuple, causal: bool, math: bool, masked: bool = True):
    q, k, v, mask = s
    add = _dense_mask(q, k, mask) if masked else None
    gqa = q.shape[2] != k.shape[2]

    def run():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=add,
            is_causal=causal and add is None,
            enable_gqa=gqa,
        )
        return out.transpose(1, 2)

    if not math:
        return run

    def run_math():
        with sdpa_kernel(SDPBackend.MATH):
            return run()

    return run_math


def _check_half_cuda(name: str, q: torch.Tensor) -> None:
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise _harness.PeerMissing(
            f"{name} runs fp16/bf16 CUDA tensors, this case is {q.dtype} on {q.device.type}"
        )


def _flash_attn(s: tuple, lengths: list[int], padded: bool, causal: bool, fa3: bool = False):
    """flash-attn 2 (``flash_attn``) or FlashAttention-3 (``flash_attn_interface``, whose
    functions may return (out, lse): the output is taken)."""
    if fa3:
        fa = _harness.import_peer("flash_attn_interface", "flash-attention's hopper/ build")
    else:
        fa = _harness.import_peer("flash_attn", "flash-attn")
    _check_half_cuda("flash_attn_interface" if fa3 else "flash_attn", s[0])
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    if not padded:
        q, k, v, _ = s
        return lambda: first(fa.flash_attn_func(q, k, v, causal=causal))
    q, k, v, cu = s
    L = max(lengths)
    return lambda: first(fa.flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=causal))


def _xformers(s: tuple, lengths: list[int], padded: bool, causal: bool):
    xops = _harness.import_peer("xformers.ops", "xformers")
    _check_half_cuda("xformers", s[0])
    q, k, v = s[:3]
    Hq, Hkv, D = q.shape[-2], k.shape[-2], q.shape[-1]
    rep = Hq // Hkv
    if padded:  # packed real tokens as one batch entry with a block-diagonal mask
        bias_cls = (
            xops.fmha.attn_bias.BlockDiagonalCausalMask
            if causal
            else xops.fmha.attn_bias.BlockDiagonalMask
        )
        bias = bias_cls.from_seqlens(lengths)
        q, k, v = q[None], k[None], v[None]
    else:
        bias = xops.LowerTriangularMask() if causal else None
    B, T, S = q.shape[0], q.shape[1], k.shape[1]

    def run():  # GQA as xformers' 5-D layout [B, M, G, H, K], KV heads broadcast over H
        q5 = q.view(B, T, Hkv, rep, D)
        k5 = k.view(B, S, Hkv, 1, D).expand(B, S, Hkv, rep, D)
        v5 = v.view(B, S, Hkv, 1, D).expand(B, S, Hkv, rep, D)
        out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias)
        return out.reshape(B, T, Hq, D)

    return run


def test_attention(benchmark, case, provider):
    bench = _harness.Bench(benchmark, OP, case, provider)
    device, dtype = bench.device, bench.dtype
    B, T, Hq, Hkv, D = case["B"], case["T"], case["Hq"], case["Hkv"], case["D"]
    mode, causal, padded = case["mode"], case["causal"], case["pad"] > 0
    mask_queries = bool(case.get("mask_queries")) and padded
    grad = mode != "fwd"
    lengths = padded_lengths(B, T, case["pad"])

    def build(seed: int) -> tuple:
        g = torch.Generator(device=device).manual_seed(seed)
        q, k, v = (
            torch.randn(B, T, h, D, generator=g, device=device, dtype=dtype).requires_grad_(grad)
            for h in (Hq, Hkv, Hkv)
        )
        mask = None
        if padded:
            mask = (
                torch.arange(T, device=device)[None, :]
                < torch.tensor(lengths, device=device)[:, None]
            )
        return q, k, v, mask

    sets = _harness.input_sets((OP, case["label"].split(" ", 1)[1], grad), build, device)
    peers = ("flash_attn", "flash_attn3", "xformers")
    packs = provider.endswith(".varlen") or (padded and provider in peers)
    if packs:
        sets = [_pack(s, lengths) for s in sets]
    notes = ["padded providers run on the packed real tokens"] if packs else []

    if provider == "reference+compile":
        fn = _compiled_reference()

        def make(s):
            return lambda: fn(
                s[0], s[1], s[2], key_padding_mask=s[3], causal=causal, mask_queries=mask_queries
            )
    elif provider.startswith("torch.sdpa"):
        if provider == "torch.sdpa[nomask]":
            notes.append("no mask: the padding is attended as real tokens (the dense cost)")

        def make(s):
            math = provider == "torch.sdpa[math]"
            return _sdpa_peer(s, causal, math=math, masked=provider != "torch.sdpa[nomask]")
    elif provider in ("flash_attn", "flash_attn3"):

        def make(s):
            return _flash_attn(s, lengths, padded, causal, fa3=provider == "flash_attn3")
    elif provider == "xformers":

        def make(s):
            return _xformers(s, lengths, padded, causal)
    elif provider.endswith(".varlen"):
        name = provider.removeprefix("vf.").removesuffix(".varlen")
        L = max(lengths)

        def make(s):
            args = (s[0], s[1], s[2], s[3], s[3], L, L)
            # raises BackendUnavailableError with the backend's reasons: the case is skipped
            inputs = attention_op.varlen_inputs(*args, causal=causal)
            _backends.select("attention_varlen", name, inputs)
            return lambda: vf.attention_varlen(*args, causal=causal, backend=name)
    else:
        name = "reference" if provider == "reference" else provider.removeprefix("vf.")

        def make(s):
            q, k, v, mask = s
            kw = dict(key_padding_mask=mask, causal=causal, mask_queries=mask_queries)
            inputs = attention_op.attention_inputs(q, k, v, **kw)
            _backends.select("attention", name, inputs)
            if not notes:  # what auto would pick here, for checking its rule against the table
                notes.append(_backends.explain("attention", inputs).splitlines()[0].strip())
            return lambda: vf.attention(q, k, v, backend=name, **kw)

    bench.run(
        make,
        sets,
        attention_cost(lengths, Hq, Hkv, D, dtype.itemsize, causal, mode),
        compiled=provider == "reference+compile",
        notes=notes,
    )
