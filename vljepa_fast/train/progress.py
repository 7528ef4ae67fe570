"""A one-line progress bar on stderr (rank 0): steps, loss, samples/s, the time left."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Shows ``[####....] step/total loss samples/s eta`` when ``mode`` is "on", or "auto" and
    stderr is a terminal; ``main`` False (ranks other than 0) shows nothing."""

    def __init__(self, total: int, start: int, mode: str = "auto", main: bool = True) -> None:
        show = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.enabled = main and show
        self.total, self.first, self.t0 = total, start, time.perf_counter()

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        done = int(30 * step / self.total)
        rate = (time.perf_counter() - self.t0) / max(1, step - self.first)
        eta = rate * (self.total - step)
        sys.stderr.write(
            f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} loss {m['loss']:.4f} "
            f"{m['samples_per_s']:.1f} samples/s eta {eta:5.0f}s "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
