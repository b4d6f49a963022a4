"""Filter banks as convolution initialisers — the families reviewed in Hirani & Abdulla, "On
filter design in deep convolutional neural networks", https://arxiv.org/abs/2410.21644.

Fixed banks (`gabor_bank`, `dct_bank`), banks learned from data patches without labels
(`pca_bank`: principal components; `kmeans_bank`: k-means centroids) and `bank_init`, which turns
any ``[k, k, C_in, C_out]`` bank into a Flax ``kernel_init``. Every bank is rescaled so each
filter has the squared norm He-normal initialisation gives on average (2: ``fan_in`` weights of
variance ``2 / fan_in``), so swapping the initialiser does not change the activations' scale.
`patches` extracts the training patches the data-driven banks learn from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BANKS",
    "bank_init",
    "dct_bank",
    "gabor_bank",
    "kmeans_bank",
    "named_init",
    "patches",
    "pca_bank",
]

# The initialisers `named_init` builds: Flax's He normal and orthogonal, and the filter banks.
BANKS = ("he_normal", "orthogonal", "gabor", "dct", "pca", "kmeans")

HE_FILTER_SQ_NORM = 2.0  # E‖w‖² of one He-normal filter: fan_in · (2 / fan_in)


def _unit_filters(bank: np.ndarray) -> np.ndarray:
    """Scale every output filter of ``[k, k, C_in, C_out]`` to squared norm 2 (He's average)."""
    norms = np.sqrt((bank**2).sum(axis=(0, 1, 2), keepdims=True))
    return (bank / np.maximum(norms, 1e-12) * math.sqrt(HE_FILTER_SQ_NORM)).astype(np.float32)


def _spread(filters_2d: np.ndarray, c_in: int) -> np.ndarray:
    """``[k, k, C_out]`` 2-D filters → ``[k, k, C_in, C_out]``, the same filter on every input
    channel (a colour-blind filter, as the classic fixed banks)."""
    return np.repeat(filters_2d[:, :, None, :], c_in, axis=2)


def gabor_bank(k: int, c_in: int, c_out: int, *, seed: int = 0) -> np.ndarray:
    """Gabor filters: orientations evenly spaced over π, wavelengths from 2 to k pixels, phase
    0 or π/2, σ = 0.5 · wavelength; cycled over the ``c_out`` filters."""
    yy, xx = np.mgrid[:k, :k].astype(np.float64) - (k - 1) / 2
    n_orient = max(1, min(8, c_out))
    wavelengths = np.geomspace(2.0, max(2.0, float(k)), num=max(1, math.ceil(c_out / n_orient)))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(c_out):
        theta = np.pi * (i % n_orient) / n_orient
        lam = wavelengths[(i // n_orient) % len(wavelengths)]
        phase = (np.pi / 2) * ((i // (n_orient * len(wavelengths))) % 2)
        xr = xx * np.cos(theta) + yy * np.sin(theta)
        yr = -xx * np.sin(theta) + yy * np.cos(theta)
        sigma = 0.5 * lam
        g = np.exp(-(xr**2 + yr**2) / (2 * sigma**2)) * np.cos(2 * np.pi * xr / lam + phase)
        g = g - g.mean() if k > 1 else g  # zero DC: an edge/texture detector
        out.append(g if np.abs(g).sum() > 0 else rng.standard_normal((k, k)))
    return _unit_filters(_spread(np.stack(out, -1), c_in))


def dct_bank(k: int, c_in: int, c_out: int) -> np.ndarray:
    """2-D DCT-II basis functions in zig-zag (low to high frequency) order, cycled over
    ``c_out``; orthogonal to each other for the first ``k²`` filters."""
    n = np.arange(k)
    basis_1d = np.cos(np.pi * (n[None, :] + 0.5) * n[:, None] / k)  # [freq, pixel]
    order = sorted(((u, v) for u in range(k) for v in range(k)), key=lambda t: (t[0] + t[1], t))
    out = [np.outer(basis_1d[u], basis_1d[v]) for u, v in order]
    return _unit_filters(_spread(np.stack([out[i % len(out)] for i in range(c_out)], -1), c_in))


def patches(images: np.ndarray, k: int, num: int, *, seed: int = 0) -> np.ndarray:
    """``num`` random ``k``×``k`` patches ``[num, k, k, C]`` of NHWC ``images``."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or min(images.shape[1:3]) < k:
        raise ValueError(f"patches: images must be NHWC with H, W >= k={k}, got {images.shape}")
    rng = np.random.default_rng(seed)
    n, h, w, _ = images.shape
    i, r, c = (
        rng.integers(0, n, num),
        rng.integers(0, h - k + 1, num),
        rng.integers(0, w - k + 1, num),
    )
    return np.stack([images[a, b : b + k, d : d + k] for a, b, d in zip(i, r, c, strict=True)])


def _flat_centred(p: np.ndarray) -> np.ndarray:
    flat = p.reshape(len(p), -1).astype(np.float64)
    return flat - flat.mean(axis=1, keepdims=True)  # each patch's DC removed (contrast only)


def pca_bank(data_patches: np.ndarray, c_out: int) -> np.ndarray:
    """The leading principal components of the (per-patch mean-removed) patches
    ``[N, k, k, C_in]``, as ``c_out`` filters (cycled past the patch dimension)."""
    n, k, _, c_in = data_patches.shape
    flat = _flat_centred(data_patches)
    flat = flat - flat.mean(axis=0, keepdims=True)  # centred over the patches too: a covariance
    cov = flat.T @ flat / max(n - 1, 1)
    vals, vecs = np.linalg.eigh(cov)  # ascending
    comps = vecs[:, np.argsort(vals)[::-1]].T  # [d, d], strongest first
    bank = np.stack([comps[i % len(comps)].reshape(k, k, c_in) for i in range(c_out)], -1)
    return _unit_filters(bank)


def kmeans_bank(
    data_patches: np.ndarray, c_out: int, *, iters: int = 30, seed: int = 0
) -> np.ndarray:
    """``c_out`` k-means centroids of the contrast-normalised patches ``[N, k, k, C_in]``
    (Lloyd's algorithm from random distinct patches, ``iters`` rounds; empty clusters keep their
    centroid)."""
    n, k, _, c_in = data_patches.shape
    if n < c_out:
        raise ValueError(f"kmeans_bank: {n} patches are fewer than c_out={c_out} clusters")
    x = _flat_centred(data_patches)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(n, c_out, replace=False)]
    for _ in range(iters):
        assign = np.argmax(x @ centres.T, axis=1)  # unit vectors: nearest = largest dot
        for j in range(c_out):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    bank = np.stack([c.reshape(k, k, c_in) for c in centres], -1)
    return _unit_filters(bank)


def bank_init(bank: np.ndarray) -> Callable[..., jax.Array]:
    """A Flax ``kernel_init`` returning ``bank`` (checked against the requested shape).

    Example:
      >>> conv = nn.Conv(8, (3, 3), kernel_init=bank_init(dct_bank(3, 1, 8)))
    """
    bank = np.asarray(bank, np.float32)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        del key
        if tuple(shape) != bank.shape:
            raise ValueError(f"bank_init: the layer asks for a kernel {tuple(shape)}, the bank "
                             f"is {bank.shape}")  # fmt: skip
        return jnp.asarray(bank, dtype)

    return init


def named_init(
    name: str, images: np.ndarray | None = None, *, num_patches: int = 4000, seed: int = 0
) -> Callable[..., jax.Array]:
    """A ``kernel_init`` for a ``[k, k, C_in, C_out]`` conv by name (one of `BANKS`); the bank is
    built for the shape the layer asks for, when it asks. ``"pca"`` and ``"kmeans"`` learn from
    ``num_patches`` k×k patches of ``images`` (NHWC, e.g. the training set).

    Example:
      >>> conv = nn.Conv(8, (3, 3), kernel_init=named_init("pca", train_images))
    """
    if name not in BANKS:
        raise ValueError(f"named_init: name must be one of {BANKS}, got {name!r}")
    if name in ("pca", "kmeans") and images is None:
        raise ValueError(f"named_init: {name!r} learns from data; pass images [N, H, W, C]")
    if name == "he_normal":
        return nn.initializers.he_normal()
    if name == "orthogonal":
        return nn.initializers.orthogonal(scale=np.sqrt(2.0))

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        del key
        if len(shape) != 4 or shape[0] != shape[1]:
            raise ValueError(f"named_init({name!r}): needs a square conv kernel "
                             f"[k, k, C_in, C_out], got {tuple(shape)}")  # fmt: skip
        k, c_in, c_out = shape[0], shape[2], shape[3]
        if name == "gabor":
            bank = gabor_bank(k, c_in, c_out, seed=seed)
        elif name == "dct":
            bank = dct_bank(k, c_in, c_out)
        else:
            data = patches(np.asarray(images, np.float32), k, num_patches, seed=seed)
            bank = pca_bank(data, c_out) if name == "pca" else kmeans_bank(data, c_out, seed=seed)
        return jnp.asarray(bank, dtype)

    return init
