"""Moving-digit token videos for the Next Block Prediction demo (generated, nothing downloaded).

A scikit-learn digit (8×8, 17 grey levels) is downsampled to 4×4, quantised to ``levels`` grey
levels and moved across an ``size``×``size`` black frame with a constant velocity in
{−1, 0, 1}² per frame, bouncing off the borders. Each frame is a block of ``size²`` tokens in
raster order, so "predict the next block" is "predict the next frame".
"""

from __future__ import annotations

import numpy as np

__all__ = ["moving_digit_videos"]


def _sprites(levels: int) -> np.ndarray:
    """[N, 4, 4] int sprites: the digits 2×2-average-pooled and quantised to ``levels``."""
    from sklearn.datasets import load_digits

    img = np.asarray(load_digits().images, np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    pooled = img.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))  # [N, 4, 4]
    return np.minimum((pooled * levels).astype(np.int32), levels - 1)


def moving_digit_videos(
    n: int, *, frames: int = 5, size: int = 8, levels: int = 4, seed: int = 0
) -> np.ndarray:
    """``[n, frames · size²]`` int32 token videos (values in ``[0, levels)``)."""
    if n < 1 or frames < 2 or size < 5 or levels < 2:
        raise ValueError(
            "moving_digit_videos: need n >= 1, frames >= 2, size >= 5 (room to move), "
            f"levels >= 2; got n={n}, frames={frames}, size={size}, levels={levels}"
        )
    rng = np.random.default_rng(seed)
    sprites = _sprites(levels)
    idx = rng.integers(0, len(sprites), n)
    pos = rng.integers(0, size - 4 + 1, (n, 2))  # top-left corner
    vel = rng.integers(-1, 2, (n, 2))
    out = np.zeros((n, frames, size, size), np.int32)
    for f in range(frames):
        for i in range(n):
            r, c = pos[i]
            out[i, f, r : r + 4, c : c + 4] = sprites[idx[i]]
        nxt = pos + vel
        bounce = (nxt < 0) | (nxt > size - 4)
        vel = np.where(bounce, -vel, vel)
        pos = pos + vel
    return out.reshape(n, frames * size * size)
