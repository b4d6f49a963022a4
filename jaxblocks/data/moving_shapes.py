"""A short synthetic RGB video for neural video representations (HNeRV, NeRV++): coloured shapes
(discs, squares, rings) moving and bouncing over a drifting striped texture.

Every frame is a pure function of ``(seed, frame index)``; values are float32 in [0, 1]. Used by
the ``moving_shapes_video`` data set of the trainer (`jaxblocks.train.data`), where each example
is ``(frame, frame)`` and the test set is the same frames: a video representation is fitted to
the one video it stores.
"""

from __future__ import annotations

import numpy as np

__all__ = ["moving_shapes_video"]

SHAPES = ("disc", "square", "ring")


def moving_shapes_video(frames: int = 32, size: int = 32, *, num_shapes: int = 3,
                        seed: int = 0) -> np.ndarray:  # fmt: skip
    """``[frames, size, size, 3]`` float32 video in [0, 1].

    Background: two sinusoidal gratings per channel (random frequencies, orientations and
    phases) drifting a little every frame. Foreground: ``num_shapes`` shapes of random colour
    and radius (size/8 to size/4) moving at a constant speed (0.5 to 1.5 pixels per frame) and
    bouncing off the borders; later shapes are drawn over earlier ones, with anti-aliased edges.
    """
    if frames < 1 or size < 8 or num_shapes < 0:
        raise ValueError(f"moving_shapes_video: need frames >= 1, size >= 8, num_shapes >= 0; "
                         f"got {frames=}, {size=}, {num_shapes=}")  # fmt: skip
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    freq = rng.uniform(1.0, 4.0, (3, 2)) * 2 * np.pi / size
    angle = rng.uniform(0, np.pi, (3, 2))
    phase = rng.uniform(0, 2 * np.pi, (3, 2))
    drift = rng.uniform(-0.3, 0.3, (3, 2))
    base = rng.uniform(0.25, 0.6, 3)
    kind = rng.integers(0, len(SHAPES), num_shapes)
    color = rng.uniform(0.0, 1.0, (num_shapes, 3))
    radius = rng.uniform(size / 8, size / 4, num_shapes)
    pos = rng.uniform(0, 1, (num_shapes, 2)) * (size - 2 * radius[:, None]) + radius[:, None]
    speed = rng.uniform(0.5, 1.5, num_shapes)
    heading = rng.uniform(0, 2 * np.pi, num_shapes)
    vel = np.stack([np.cos(heading), np.sin(heading)], -1) * speed[:, None]

    out = np.empty((frames, size, size, 3), np.float32)
    p = pos.copy()
    for t in range(frames):
        img = np.empty((size, size, 3), np.float32)
        for c in range(3):
            g = 0.0
            for k in range(2):
                u = np.cos(angle[c, k]) * xx + np.sin(angle[c, k]) * yy
                g = g + 0.12 * np.sin(freq[c, k] * u + phase[c, k] + drift[c, k] * t)
            img[..., c] = base[c] + g
        for i in range(num_shapes):
            dy, dx = yy - p[i, 0], xx - p[i, 1]
            if SHAPES[kind[i]] == "square":
                d = np.maximum(np.abs(dy), np.abs(dx)) - radius[i]
            elif SHAPES[kind[i]] == "disc":
                d = np.sqrt(dy**2 + dx**2) - radius[i]
            else:
                d = np.abs(np.sqrt(dy**2 + dx**2) - 0.7 * radius[i]) - 0.3 * radius[i]
            alpha = np.clip(0.5 - d, 0.0, 1.0)[..., None]  # one-pixel anti-aliased edge
            img = img * (1 - alpha) + color[i] * alpha
        out[t] = np.clip(img, 0.0, 1.0)
        # Move, then reflect off the walls so the whole shape stays inside.
        p = p + vel
        for i in range(num_shapes):
            for a in range(2):
                lo, hi = radius[i], size - radius[i]
                if p[i, a] < lo:
                    p[i, a], vel[i, a] = 2 * lo - p[i, a], -vel[i, a]
                elif p[i, a] > hi:
                    p[i, a], vel[i, a] = 2 * hi - p[i, a], -vel[i, a]
    return out
