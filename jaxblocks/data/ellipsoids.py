"""Synthetic 3-D segmentation volumes: labelled ellipsoids in noise (generated, nothing
downloaded), for the volumetric U-Net demos (STU-Net, the reversible MBConv U-Net).

Each volume holds one randomly placed and oriented-by-axes ellipsoid per foreground class; a
class's voxels have intensity ``c / (K − 1)`` plus Gaussian noise (σ = ``noise``), the
background 0 plus noise; later classes overwrite earlier ones where they overlap.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ellipsoid_volumes"]


def ellipsoid_volumes(
    n: int, size: int = 24, num_classes: int = 3, *, noise: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(x [n, S, S, S, 1] float32, y [n, S, S, S] int32)`` with labels in ``[0, K)``."""
    if n < 1 or size < 4 or num_classes < 2:
        raise ValueError(f"ellipsoid_volumes: need n >= 1, size >= 4, num_classes >= 2; got "
                         f"{n}, {size}, {num_classes}")  # fmt: skip
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(size),) * 3, indexing="ij"), axis=-1)  # [S,S,S,3]
    y = np.zeros((n, size, size, size), np.int32)
    for i in range(n):
        for c in range(1, num_classes):
            radii = rng.uniform(0.12, 0.3, 3) * size
            centre = rng.uniform(radii, size - radii)
            inside = np.sum(((grid - centre) / radii) ** 2, axis=-1) <= 1.0
            y[i][inside] = c
    x = y.astype(np.float32) / (num_classes - 1) + rng.normal(0, noise, y.shape).astype(np.float32)
    return x[..., None], y
