"""The shapes every bench file runs, by preset name (select with ``--preset``).

* ``smoke``: tiny shapes that only check that every provider and the report run (the dry run of
  scripts/gpu_run.sh); the numbers mean nothing.
* ``cpu``: CPU-sized versions of the VL-JEPA hot spots, the full run under 15 minutes on a
  2-core machine (the default without CUDA).
* ``gpu``: the paper shapes of docs/TARGETS.md, short timing, torch.compile on one shape per
  op, so that scripts/gpu_run.sh finishes in about 8 minutes (the default with CUDA).
* ``paper``: the same shapes with torch.compile everywhere and longer timing.

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


def _attention_gpu(compile_: bool) -> list[dict]:
    # 16k tokens per batch at every sequence length (B = 16384 / T, rounded)
    return [
        dict(
            B=max(1, round(16384 / T)),
            T=T,
            **_ATTN_HEADS,
            pad=pad,
            causal=False,
            dtype="bfloat16",
            modes=("fwd", "bwd", "fwd+bwd"),
            compile=compile_,
        )
        for T in (512, 1024, 4608)
        for pad in (0.0, 0.5)
    ]


def _topk_gpu() -> list[dict]:
    return [
        dict(Q=Q, N=1_000_000, D=1536, k=k, metric="ip", dtype="bfloat16")
        for Q in (16, 1024)
        for k in (10, 100)
    ]


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "smoke",
        "auto",
        Timing(warmup=1, min_rounds=2, max_rounds=5, budget_s=0.05),
        {
            "topk_similarity": [dict(Q=8, N=4096, D=64, k=10, metric="ip", dtype="auto")],
            "infonce": [
                dict(N=N, D=64, dtype="auto", modes=("fwd", "fwd+bwd"), compile=False)
                for N in (256, 512)
            ],
            "attention": [
                dict(
                    B=2,
                    T=64,
                    Hq=4,
                    Hkv=2,
                    D=32,
                    pad=pad,
                    causal=False,
                    dtype="auto",
                    modes=("fwd", "bwd", "fwd+bwd"),
                    compile=False,
                )
                for pad in (0.0, 0.5)
            ],
        },
    ),
    "cpu": Preset(
        "cpu",
        "cpu",
        Timing(warmup=1, min_rounds=2, max_rounds=10, budget_s=1.5),
        {
            "topk_similarity": [dict(Q=256, N=200_000, D=768, k=10, metric="ip", dtype="float32")],
            # N=2048 beside N=8192 shows the eager loss's memory growing with N^2
            # torch.compile at N=8192 only: each compilation costs about a minute on 2 cores
            "infonce": [
                dict(N=N, D=1536, dtype="float32", modes=("fwd", "fwd+bwd"), compile=N == 8192)
                for N in (2048, 8192)
            ],
            "attention": [
                dict(
                    B=4,
                    T=512,
                    **_ATTN_HEADS,
                    pad=pad,
                    causal=False,
                    dtype="float32",
                    modes=("fwd", "bwd", "fwd+bwd"),
                    compile=False,
                )
                for pad in (0.0, 0.5)
            ],
        },
    ),
    "gpu": Preset(
        "gpu",
        "cuda",
        Timing(warmup=2, min_rounds=5, max_rounds=50, budget_s=0.3),
        {
            "topk_similarity": _topk_gpu(),
            "infonce": [
                dict(N=N, D=1536, dtype="bfloat16", modes=("fwd", "fwd+bwd"), compile=N == 32768)
                for N in (4096, 32768, 65536)
            ],
            "attention": _attention_gpu(compile_=False),
        },
    ),
    "paper": Preset(
        "paper",
        "cuda",
        Timing(warmup=3, min_rounds=10, max_rounds=200, budget_s=2.0),
        {
            "topk_similarity": _topk_gpu(),
            "infonce": [
                dict(N=N, D=1536, dtype="bfloat16", modes=("fwd", "fwd+bwd"), compile=True)
                for N in (4096, 32768, 65536)
            ],
            "attention": _attention_gpu(compile_=True),
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
