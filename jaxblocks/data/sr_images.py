"""Super-resolution pairs from the photographs that ship with scikit-learn (nothing downloaded).

`sklearn.datasets.load_sample_images` holds two 427×640 RGB photographs, ``china.jpg`` and
``flower.jpg``. Training crops come from the left 384 columns of both and held-out test crops
from the remaining 256, so no test pixel was seen in training.
As in ESPCN (Shi et al. 2016) the networks work on the luminance:
Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601 weights, full range, in [0, 1]).
The low-resolution input is the high-resolution crop downscaled ``scale`` times with an
antialiased bicubic filter (`jax.image.resize`); bicubic upscaling of that input is the
baseline every SR model must beat.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["IMAGES", "luminance_images", "sr_pairs", "bicubic_upscale", "downscale"]

IMAGES = ("china", "flower")


@functools.lru_cache(maxsize=1)
def luminance_images() -> dict[str, np.ndarray]:
    """``{"china": [427, 640], "flower": [427, 640]}`` float32 luminance in [0, 1]."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    out = {}
    for name, img in zip(data.filenames, data.images, strict=True):
        stem = name.rsplit("/", 1)[-1].split(".")[0]
        rgb = np.asarray(img, np.float32) / 255.0
        out[stem] = (rgb @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.float32)
    return out


def downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """``[N, H, W, C]`` → ``[N, H/scale, W/scale, C]``, antialiased bicubic."""
    n, h, w, c = hr.shape
    if h % scale or w % scale:
        raise ValueError(f"downscale: size {(h, w)} not divisible by scale={scale}")
    out = jax.image.resize(jnp.asarray(hr), (n, h // scale, w // scale, c), "cubic")
    return np.asarray(out, np.float32)


def bicubic_upscale(lr: jax.Array, scale: int) -> jax.Array:
    """The baseline: ``[N, h, w, C]`` → ``[N, h·scale, w·scale, C]`` bicubic, clipped to [0, 1]."""
    n, h, w, c = lr.shape
    return jnp.clip(jax.image.resize(lr, (n, h * scale, w * scale, c), "cubic"), 0.0, 1.0)


# Training crops come from columns [0, 384) of both photographs, test crops from [384, 640).
SPLIT_COLUMNS = {"train": (0, 384), "test": (384, 640)}


def sr_pairs(
    split: str, num: int, patch_size: int, scale: int, seed: int, min_std: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` random crops as (low-res ``[N, p/s, p/s, 1]``, high-res ``[N, p, p, 1]``) float32
    pairs, ``p = patch_size`` a multiple of ``scale``, alternating between the two photographs.

    ``split`` picks the columns (`SPLIT_COLUMNS`: the test crops never overlap a training
    crop). Crops whose luminance standard deviation is below ``min_std`` (flat sky, the
    out-of-focus background of flower.jpg) are redrawn, so the PSNR measures detail.
    """
    if split not in SPLIT_COLUMNS:
        raise ValueError(f"sr_pairs: split must be one of {tuple(SPLIT_COLUMNS)}, got {split!r}")
    if patch_size % scale:
        raise ValueError(f"sr_pairs: patch_size={patch_size} not divisible by scale={scale}")
    lo, hi = SPLIT_COLUMNS[split]
    images = [luminance_images()[name] for name in IMAGES]
    if patch_size > min(hi - lo, images[0].shape[0]):
        raise ValueError(f"sr_pairs: patch_size={patch_size} larger than the split's columns")
    rng = np.random.default_rng(seed)
    crops = []
    while len(crops) < num:
        y = images[len(crops) % len(images)]
        r = int(rng.integers(0, y.shape[0] - patch_size + 1))
        c = int(rng.integers(lo, hi - patch_size + 1))
        crop = y[r : r + patch_size, c : c + patch_size]
        if crop.std() >= min_std:
            crops.append(crop)
    hr = np.stack(crops)[..., None].astype(np.float32)
    return downscale(hr, scale), hr
