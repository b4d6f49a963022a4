"""Synthetic action clips: a textured blob that moves, grows or shrinks over a noisy background.

For the temporal heads of TS-LSTM / Temporal-Inception (Ma et al., https://arxiv.org/abs/1703.10667):
the six classes come in time-reversed pairs (right/left, down/up, grow/shrink), so every single
frame, and any order-free pooling of per-frame features, is equally likely under both classes
of a pair; only the order of the frames tells them apart.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ACTIONS", "action_clips"]

ACTIONS = ("right", "left", "down", "up", "grow", "shrink")


def action_clips(
    num: int, *, frames: int = 8, size: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` clips ``[num, frames, size, size, 1]`` float32 in about [-1, 1] and labels
    ``[num]`` int32 indexing `ACTIONS`.

    Each clip: a fixed random background texture plus fresh noise per frame; a square blob with
    random intensity moves one pixel per frame (right/left/down/up, from a start drawn so the
    whole path stays inside) or changes its half-width by one pixel every other frame
    (grow/shrink between 1 and ``size // 3``). A class and its reverse draw the same set of
    frames reversed: e.g. "left" is a "right" clip played backwards.
    """
    if num < 0 or frames < 2 or size < 8:
        raise ValueError(f"action_clips: need num >= 0, frames >= 2, size >= 8; got {num=}, "
                         f"{frames=}, {size=}")  # fmt: skip
    rng = np.random.default_rng(seed)
    x = np.empty((num, frames, size, size, 1), np.float32)
    y = rng.integers(0, len(ACTIONS), num).astype(np.int32)
    yy, xx = np.mgrid[:size, :size]
    max_half = max(size // 3, 2)
    for n in range(num):
        background = 0.3 * rng.standard_normal((size, size)).astype(np.float32)
        amp = rng.uniform(0.8, 1.5)
        label = ACTIONS[y[n]]
        if label in ("grow", "shrink"):
            cy, cx = rng.integers(max_half, size - max_half, 2)
            halves = np.minimum(1 + np.arange(frames) // 2, max_half)
            path = [(cy, cx, h) for h in halves]
        else:
            h = int(rng.integers(1, 3))
            span = frames - 1
            lo, hi = h, size - 1 - h - span
            if hi < lo:
                raise ValueError(f"action_clips: size={size} too small for {frames} frames")
            a, b = rng.integers(lo, hi + 1), rng.integers(h, size - h)  # along / across motion
            along = a + np.arange(frames)
            path = [(b, s, h) if label in ("right", "left") else (s, b, h) for s in along]
        if label in ("left", "up", "shrink"):
            path = path[::-1]  # the reverse of right / down / grow
        for t, (cy, cx, h) in enumerate(path):
            blob = (np.abs(yy - cy) <= h) & (np.abs(xx - cx) <= h)
            frame = background + 0.1 * rng.standard_normal((size, size)) + amp * blob
            x[n, t, :, :, 0] = frame
    return x, y
