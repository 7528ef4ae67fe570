"""The chunk rule of the chunked pairwise ops (infonce_loss, sigmoid_loss, topk_similarity's
GEMM path): how many rows of the left operand one vendor GEMM and its fused epilogue take.

The chunked ops never hold the N x M score matrix. They cut the left operand into row chunks
of ``c`` rows; per chunk a vendor GEMM writes the [c, M] block of scores (plus the ops' own
[c, M] work buffers, e.g. dS in the GEMM dtype) and our epilogue kernels reduce it. The extra
memory is therefore ``c * M * bytes_per_pair`` bytes, which the rule bounds by a budget:

    budget = max(1 GiB, 10% of the bytes of the op's inputs)

or exactly ``VLJEPA_FAST_CHUNK_BUDGET_MIB`` mebibytes when that environment variable is set (a
positive number, fractions allowed; read at every call). Why 1 GiB: the traffic that repeats
per chunk (the GEMM's read of the other operand, and InfoNCE's fp32 dB accumulator, read and
written once per chunk) falls with the number of chunks. At the paper shape (N = M = 32768,
D = 1536, bf16, 6 bytes per pair) 1 GiB gives 5440-row chunks, 7 of them, and the chunked
InfoNCE's HBM traffic of 29 GB (23.5 ms predicted on an H200 with the 16.7 ms of GEMMs); 256 MiB
would give 25 chunks and 42 GB (26.4 ms). 1 GiB is under 1% of an H200's memory and 4% of a
24 GB card's; each GEMM stays large (5440 x 32768 x 1536 is 548 GFLOP, 0.7 ms), so launch gaps
are negligible. The 10% term lets the chunk grow with the batch so the chunk count stays bounded.

Rows are rounded down to a multiple of 64 (the GEMM's tile height: a ragged chunk wastes a
partial tile per chunk only once) when the budget allows more than 64, and are at least 1.
"""

from __future__ import annotations

import math
import os

ENV = "VLJEPA_FAST_CHUNK_BUDGET_MIB"
DEFAULT_BUDGET_BYTES = 2**30
INPUT_FRACTION = 0.10
ROW_MULTIPLE = 64


def budget_bytes(input_bytes: int) -> int:
    """The chunk budget in bytes for an op whose inputs take ``input_bytes`` bytes (see module
    doc). Raises ValueError naming the environment variable when it is set but malformed."""
    raw = os.environ.get(ENV, "").strip()
    if raw:  # empty: unset (as every VLJEPA_FAST_* variable)
        try:
            mib = float(raw)
        except ValueError:
            mib = math.nan
        if not math.isfinite(mib) or mib <= 0:
            raise ValueError(
                f"environment variable {ENV}: expected a positive number of MiB, got {raw!r}"
            )
        return max(1, int(mib * 2**20))
    return max(DEFAULT_BUDGET_BYTES, int(INPUT_FRACTION * input_bytes))


def chunk_rows(rows: int, cols: int, bytes_per_pair: int, input_bytes: int) -> int:
    """Rows per chunk (1 <= result <= max(rows, 1)) so that ``result * cols * bytes_per_pair``
    stays within :func:`budget_bytes` (``input_bytes``): the rule of the module doc."""
    rows, cols = max(int(rows), 1), max(int(cols), 1)
    fit = budget_bytes(input_bytes) // (cols * max(int(bytes_per_pair), 1))
    if fit > ROW_MULTIPLE:
        fit -= fit % ROW_MULTIPLE
    return max(1, min(rows, fit))
