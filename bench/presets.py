"""The shapes every bench file runs, by preset name (select with ``--preset``).

* ``smoke``: tiny shapes that only check that every provider and the report run (the dry run of
  scripts/gpu_run.sh); the numbers mean nothing.
* ``cpu``: CPU-sized versions of the VL-JEPA hot spots, the full run under 15 minutes on a
  2-core machine (the default without CUDA).
* ``gpu``: the paper shapes of docs/TARGETS.md, short timing, torch.compile on one shape per
  op, so that scripts/gpu_run.sh finishes in about 8 minutes (the default with CUDA); attention:
  the predictor's shapes (0/25/50% padding, mask_queries) and four points of FA3's sweep.
* ``paper``: the same shapes with torch.compile everywhere and longer timing; attention: FA3's
  whole sweep (512..16k, 32:8 and 32:32) and the generic cases too.

A case is a plain dict; the bench file of its op expands ``modes`` (one benchmark group per mode)
and reads ``dtype`` ("auto": bfloat16 on CUDA, float32 on CPU). ``compile`` adds the eager
reference under torch.compile as a provider (its compilation is slow on a small CPU, so it is
chosen per case).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Timing:
    """How long each (case, provider) is measured.

    Attributes:
        warmup: untimed calls before the rounds (the first one compiles torch.compile
            providers and autotunes Triton kernels).
        min_rounds: fewest timed rounds, whatever a call costs.
        max_rounds: most timed rounds, however cheap a call is.
        budget_s: timed seconds aimed at per (case, provider): rounds = budget / (one call).
    """

    warmup: int
    min_rounds: int
    max_rounds: int
    budget_s: float


@dataclass(frozen=True)
class Preset:
    """A named table of shapes for all ops, the device they run on and their timing."""

    name: str
    device: str  # "cpu", "cuda", or "auto" (CUDA when available)
    timing: Timing
    cases: dict[str, list[dict]] = field(default_factory=dict)


_ATTN_HEADS = {"Hq": 32, "Hkv": 8, "D": 64}  # the VL-JEPA predictor: GQA 32:8, head dim 64


def _attention(
    Ts: tuple[int, ...], dtype: str, compile_: bool, B: int | None = None, heads: dict = _ATTN_HEADS
) -> list[dict]:
    """Attention cases at each sequence length T, unpadded and with 50% padding, all modes.

    B: sequences per batch; None keeps 16k tokens per batch at every T (B = 16384 / T, rounded).
    """
    return [
        dict(
            B=B or max(1, round(16384 / T)),
            T=T,
            **heads,
            pad=pad,
            causal=False,
            dtype=dtype,
            modes=("fwd", "bwd", "fwd+bwd"),
            compile=compile_,
        )
        for T in Ts
        for pad in (0.0, 0.5)
    ]


#: the predictor's sequence as issue 15 states its shapes: 4096 visual + up to 512 query tokens
PREDICTOR_T = 4096 + 512


def _predictor_attention(
    B: int,
    pads: tuple[float, ...],
    dtype: str,
    compile_: bool,
    modes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    T: int = PREDICTOR_T,
    heads: dict = _ATTN_HEADS,
) -> list[dict]:
    """The predictor's attention: B sequences of T tokens, a fraction ``pad`` of the T
    positions padded on average (lengths spread 0.5x..1.5x the mean, bench_attention's
    padded_lengths), ``mask_queries``: the padded positions are padded queries too."""
    return [
        dict(
            what="predictor", B=B, T=T, **heads, pad=pad, mask_queries=True, causal=False,
            dtype=dtype, modes=modes, compile=compile_,
        )
        for pad in pads
    ]  # fmt: skip


#: FlashAttention-3's sweep: 16k tokens per batch, no padding, non-causal, head dim 64; the
#: predictor's 32:8 GQA and FA3's 32:32 MHA
_SWEEP_HEADS = (_ATTN_HEADS, {"Hq": 32, "Hkv": 32, "D": 64})


def _sweep(
    points: tuple[tuple[int, dict], ...],
    dtype: str,
    compile_: bool,
    modes: tuple[str, ...] = ("fwd", "bwd"),
    tokens: int = 16384,
) -> list[dict]:
    """FA3's sweep at the (T, heads) ``points``: B = tokens / T sequences, unpadded."""
    return [
        dict(
            what="sweep", B=max(1, tokens // T), T=T, **heads, pad=0.0, causal=False,
            dtype=dtype, modes=modes, compile=compile_,
        )
        for T, heads in points
    ]  # fmt: skip


_FA3_TS = (512, 1024, 2048, 4096, 8192, 16384)


def _topk(Qs: tuple[int, ...], N: int, D: int, ks: tuple[int, ...], dtype: str) -> list[dict]:
    """Top-k cases of every query batch Q and k on one bank [N, D], metric "ip"."""
    return [dict(Q=Q, N=N, D=D, k=k, metric="ip", dtype=dtype) for Q in Qs for k in ks]


def _infonce(
    Ns: tuple[int, ...], D: int, dtype: str, compile_at: tuple[int, ...] = ()
) -> list[dict]:
    """InfoNCE cases of every batch N at dimension D, fwd and fwd+bwd; torch.compile at the
    batches in ``compile_at`` (each compilation is slow, so it is chosen per batch)."""
    return [
        dict(N=N, D=D, dtype=dtype, modes=("fwd", "fwd+bwd"), compile=N in compile_at) for N in Ns
    ]


def _sigmoid(
    Ns: tuple[int, ...], D: int, dtype: str, compile_at: tuple[int, ...] = ()
) -> list[dict]:
    """Sigmoid (SigLIP) loss cases of every batch N at dimension D, fwd and fwd+bwd;
    torch.compile at the batches in ``compile_at``."""
    return [
        dict(N=N, D=D, dtype=dtype, modes=("fwd", "fwd+bwd"), compile=N in compile_at) for N in Ns
    ]


_ROTARY_PREDICTOR_HEADS = _ATTN_HEADS  # Llama-3.2 layers: GQA 32:8, head dim 64
_ROTARY_X_HEADS = {"Hq": 16, "Hkv": 16, "D": 64}  # the V-JEPA 2 ViT-L: 16 heads of 64


def _rotary(
    B: int,
    grid: tuple[int, int, int],
    query: int,
    dtype: str,
    compile_: tuple[str, ...] = (),
    heads: tuple[dict, dict] = (_ROTARY_PREDICTOR_HEADS, _ROTARY_X_HEADS),
) -> list[dict]:
    """Rotary cases of the two models that call it, fwd and fwd+bwd, tables [T, D] float32.

    The predictor ("llama" layout) rotates the visual tokens of a (t, h, w) token grid plus
    ``query`` query tokens; the X-encoder ("vjepa2" layout) the grid's tokens alone, with their
    (t, h, w) coordinates. torch.compile for the models named in ``compile_`` ("predictor",
    "x_encoder").
    """
    visual = grid[0] * grid[1] * grid[2]
    shapes = (
        dict(what="predictor", T=visual + query, layout="llama", **heads[0]),
        dict(what="x_encoder", T=visual, grid=grid, layout="vjepa2", **heads[1]),
    )
    return [
        dict(B=B, **s, dtype=dtype, modes=("fwd", "fwd+bwd"), compile=s["what"] in compile_)
        for s in shapes
    ]


_PAPER_TOPK = _topk((16, 1024), 1_000_000, 1536, (10, 100), "bfloat16")
_PAPER_ATTENTION_T = (512, 1024, 4608)
_SMOKE_HEADS = {"Hq": 4, "Hkv": 2, "D": 32}
#: the gpu preset's points of FA3's sweep (the paper preset runs all of them)
_GPU_SWEEP = (
    (16384, _SWEEP_HEADS[0]),
    (16384, _SWEEP_HEADS[1]),
    (4096, _SWEEP_HEADS[0]),
    (1024, _SWEEP_HEADS[0]),
)
_PAPER_INFONCE_N = (4096, 32768, 65536)
#: siglip-kernel's reference shape (docs/TARGETS.md: B = 65,536 bf16 fwd+bwd, 48.8 ms on an
#: H100): B = 65,536 pairs of D = 768 (the width of its published usage example)
_PAPER_SIGMOID = dict(Ns=(65536,), D=768, dtype="bfloat16")
#: VL-JEPA paper sizes (models/config.py): batch 16 of 16-frame 256 px clips, tubelet 2 and
#: 16 px patches (8 x 16 x 16 = 2048 visual tokens), 64 query tokens
_PAPER_ROTARY = dict(B=16, grid=(8, 16, 16), query=64, dtype="bfloat16")

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "smoke",
        "auto",
        Timing(warmup=1, min_rounds=2, max_rounds=5, budget_s=0.05),
        {
            "topk_similarity": _topk((8,), 4096, 64, (10,), "auto"),
            "infonce": _infonce((256, 512), 64, "auto"),
            "sigmoid_loss": _sigmoid((256,), 64, "auto"),
            # each kind of case once: generic, the predictor's (mask_queries), FA3's sweep
            "attention": _attention((64,), "auto", False, B=2, heads=dict(Hq=4, Hkv=2, D=32))
            + _predictor_attention(
                2, (0.25,), "auto", False, modes=("fwd+bwd",), T=64, heads=_SMOKE_HEADS
            )
            + _sweep(((32, _SMOKE_HEADS),), "auto", False, modes=("fwd",), tokens=64),
            "rotary": _rotary(
                2, (2, 4, 4), 8, "auto", heads=(dict(Hq=4, Hkv=2, D=32), dict(Hq=4, Hkv=4, D=32))
            ),
        },
    ),
    "cpu": Preset(
        "cpu",
        "cpu",
        Timing(warmup=1, min_rounds=2, max_rounds=10, budget_s=1.5),
        {
            "topk_similarity": _topk((256,), 200_000, 768, (10,), "float32"),
            # N=2048 beside N=8192 shows the eager loss's memory growing with N^2
            # torch.compile at N=8192 only: each compilation costs about a minute on 2 cores
            "infonce": _infonce((2048, 8192), 1536, "float32", compile_at=(8192,)),
            "sigmoid_loss": _sigmoid((4096,), 1152, "float32"),
            "attention": _attention((512,), "float32", False, B=4)
            + _predictor_attention(4, (0.5,), "float32", False, T=512),
            "rotary": _rotary(2, (8, 16, 16), 64, "float32"),  # the paper's, batch 2
        },
    ),
    "gpu": Preset(
        "gpu",
        "cuda",
        Timing(warmup=2, min_rounds=5, max_rounds=50, budget_s=0.3),
        {
            "topk_similarity": _PAPER_TOPK,
            "infonce": _infonce(_PAPER_INFONCE_N, 1536, "bfloat16", compile_at=(32768,)),
            "sigmoid_loss": _sigmoid(**_PAPER_SIGMOID, compile_at=(65536,)),
            # in order of what matters when --bench-deadline cuts the tail: the predictor at
            # 50% padding (target: >= 3x the dense-mask SDPA), unpadded, 25%; then FA3's sweep
            # at 16k tokens (targets: fwd >= 450, bwd >= 400 TFLOP/s), 4k and 1k
            "attention": _predictor_attention(4, (0.5, 0.0, 0.25), "bfloat16", False)
            + _sweep(_GPU_SWEEP, "bfloat16", False),
            "rotary": _rotary(**_PAPER_ROTARY, compile_=("predictor",)),
        },
    ),
    "paper": Preset(
        "paper",
        "cuda",
        Timing(warmup=3, min_rounds=10, max_rounds=200, budget_s=2.0),
        {
            "topk_similarity": _PAPER_TOPK,
            "infonce": _infonce(_PAPER_INFONCE_N, 1536, "bfloat16", compile_at=_PAPER_INFONCE_N),
            "sigmoid_loss": _sigmoid(**_PAPER_SIGMOID, compile_at=(65536,)),
            "attention": _predictor_attention(
                4, (0.0, 0.25, 0.5), "bfloat16", True, modes=("fwd", "bwd", "fwd+bwd")
            )
            + _sweep(
                tuple((T, h) for h in _SWEEP_HEADS for T in _FA3_TS),
                "bfloat16",
                False,
                modes=("fwd", "bwd", "fwd+bwd"),
            )
            + _attention(_PAPER_ATTENTION_T, "bfloat16", True),
            "rotary": _rotary(**_PAPER_ROTARY, compile_=("predictor", "x_encoder")),
        },
    ),
}


def default_preset(cuda_available: bool) -> str:
    """The preset that fits the machine: ``gpu`` with a CUDA device, else ``cpu``."""
    return "gpu" if cuda_available else "cpu"


def get(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def cases(name: str, op: str) -> list[dict]:
    """The cases of ``op`` in preset ``name``, one per mode (``mode`` set, ``modes`` removed)."""
    out = []
    for c in get(name).cases.get(op, []):
        modes = c.get("modes", ("fwd",))
        for mode in modes:
            one = {key: val for key, val in c.items() if key != "modes"}
            one["mode"] = mode
            out.append(one)
    return out
