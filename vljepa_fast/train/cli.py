"""``python -m vljepa_fast.train [--preset tiny|small|paper] [--steps N] ...``: parse the
settings (:func:`~vljepa_fast.train.config.parse_args`), train, print a summary on rank 0.

Under torchrun every rank runs the same command, e.g.::

    torchrun --nproc_per_node 2 -m vljepa_fast.train --preset tiny --dist ddp --out runs/t
"""

from __future__ import annotations

import sys

from vljepa_fast.train.config import parse_args
from vljepa_fast.train.trainer import Trainer

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the training the flags describe; 0 on success, 2 on a refused setting."""
    cfg = parse_args(argv)
    try:
        trainer = Trainer(cfg)
    except ValueError as e:
        print(f"python -m vljepa_fast.train: error: {e}", file=sys.stderr)
        return 2
    try:
        try:
            rows = trainer.fit()
        except ValueError as e:  # bad data or a diverged loss found at a step
            print(f"python -m vljepa_fast.train: error: {e}", file=sys.stderr)
            return 2
        if trainer.dist.main and rows:
            last = rows[-1]
            where = f"; wrote {trainer.out}" if trainer.out is not None else ""
            print(
                f"[vljepa_fast.train] {cfg.preset}: steps {rows[0]['step']}-{last['step']} on "
                f"{trainer.dist.world} rank(s), loss {rows[0]['loss']:.4f} -> {last['loss']:.4f}, "
                f"{last['samples_per_s']:.1f} samples/s, peak memory "
                f"{last['peak_memory_bytes'] / 2**20:.0f} MiB{where}"
            )
    finally:
        trainer.close()
    return 0
