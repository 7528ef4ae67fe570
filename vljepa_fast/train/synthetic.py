"""Synthetic captioned clips: a coloured shape moving over a noisy background.

48 classes: 4 shapes (square, circle, triangle, cross) x 3 colours (red, green, blue) x 4
motions (left, right, up, down), captioned "a red circle moving left". At the reference size
(32 x 32 pixels, 4 frames) the shape's radius is 4..6 pixels and it moves 3 pixels a frame; at
other sizes the radius scales with ``size / 32`` and the per-frame step with
``size / 32 * 4 / frames``, so the shape and its whole travel take the same share of the frame
at every (size, frames) of a preset.

* :func:`render` draws a batch from a caller's generator (``examples/train_tiny.py``);
* :func:`sample` draws sample ``index`` of a dataset as a pure function of ``(seed, index)``
  (its own ``numpy.random.default_rng([seed, index])``), so any rank, worker or resumed run
  sees the same clip for the same index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CAPTIONS", "CLASSES", "COLORS", "MOTIONS", "SHAPES", "geometry", "render", "sample"]

SHAPES = ("square", "circle", "triangle", "cross")
COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0)}
MOTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
#: (shape, colour, motion) of each class index
CLASSES = [(s, c, m) for s in SHAPES for c in COLORS for m in MOTIONS]
CAPTIONS = [f"a {c} {s} moving {m}" for s, c, m in CLASSES]
NOISE_STD = 0.15


def _shape_mask(shape: str, r: int) -> np.ndarray:
    """[2r+1, 2r+1] bool footprint of ``shape`` with radius ``r``."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    if shape == "square":
        return np.ones_like(yy, dtype=bool)
    if shape == "circle":
        return yy**2 + xx**2 <= r * r
    if shape == "triangle":
        return (yy >= -r) & (np.abs(xx) <= (yy + r) / 2)
    return (np.abs(yy) <= r // 3) | (np.abs(xx) <= r // 3)


def geometry(size: int, frames: int) -> tuple[int, int, int]:
    """(r_lo, r_hi, step): radii drawn from [r_lo, r_hi), pixels moved per frame.

    (4, 7, 3) at 32 x 32 and 4 frames (the example's clips). ValueError when the clip is too
    small for a shape to travel inside it.
    """
    for name, v in (("size", size), ("frames", frames)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    r_lo, r_hi = max(1, round(4 * size / 32)), max(2, round(7 * size / 32))
    step = max(1, round(3 * size * 4 / (32 * frames)))
    if size - 2 * (r_hi - 1) - 1 - step * (frames - 1) < 0 or r_lo >= r_hi:
        raise ValueError(
            f"size: a {size} x {size} clip of {frames} frames is too small for the moving "
            f"shapes (radius up to {r_hi - 1}, travel {step * (frames - 1)} pixels)"
        )
    return r_lo, r_hi, step


def _paint(video: np.ndarray, labels: Sequence[int], rng: np.random.Generator) -> None:
    """Draw each clip's shape into ``video`` [B, 3, T, S, S] float32 in place (per clip: its
    radius, then its start row and column, from ``rng``)."""
    frames, size = video.shape[2], video.shape[3]
    r_lo, r_hi, step = geometry(size, frames)
    travel = step * (frames - 1)
    for b, label in enumerate(labels):
        shape, color, motion = CLASSES[label]
        r = int(rng.integers(r_lo, r_hi))
        mask = _shape_mask(shape, r)
        dy, dx = MOTIONS[motion]
        lo_y = r + (travel if dy < 0 else 0)
        hi_y = size - r - 1 - (travel if dy > 0 else 0)
        lo_x = r + (travel if dx < 0 else 0)
        hi_x = size - r - 1 - (travel if dx > 0 else 0)
        y0, x0 = int(rng.integers(lo_y, hi_y + 1)), int(rng.integers(lo_x, hi_x + 1))
        rgb = np.array(COLORS[color], dtype=np.float32)[:, None]  # [3, 1]
        for t in range(frames):
            y, x = y0 + dy * step * t, x0 + dx * step * t
            video[b, :, t, y - r : y + r + 1, x - r : x + r + 1][:, mask] = rgb


def render(
    labels: Sequence[int] | np.ndarray, rng: np.random.Generator, size: int = 32, frames: int = 4
) -> Tensor:
    """[B, 3, frames, size, size] float32 clips of the class indices ``labels`` (into
    :data:`CLASSES`), drawn from ``rng``: the background noise (N(0, 0.15), float64 draws)
    first, then per clip its radius and start position."""
    geometry(size, frames)
    labels = [int(v) for v in labels]
    bad = [v for v in labels if not 0 <= v < len(CLASSES)]
    if bad:
        raise ValueError(f"labels: expected class indices in [0, {len(CLASSES)}), got {bad[:8]}")
    shape = (len(labels), 3, frames, size, size)
    video = rng.normal(0.0, NOISE_STD, size=shape).astype(np.float32)
    _paint(video, labels, rng)
    return torch.from_numpy(video)


def sample(seed: int, index: int, size: int, frames: int) -> tuple[np.ndarray, int]:
    """Sample ``index`` of the synthetic dataset ``seed``: (clip [3, frames, size, size] float32,
    class index), a pure function of its arguments.

    The generator is ``numpy.random.default_rng([seed, index])``; it draws the class, then the
    noise (float32 draws, 4x faster than :func:`render`'s at the paper's 16 x 256^2), then the
    shape's radius and position.
    """
    for name, v in (("seed", seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    geometry(size, frames)
    rng = np.random.default_rng([int(seed), int(index)])
    label = int(rng.integers(len(CLASSES)))
    video = rng.standard_normal((1, 3, frames, size, size), dtype=np.float32)
    video *= NOISE_STD
    _paint(video, [label], rng)
    return video[0], label
