"""Filter banks as initialisers: DCT orthogonality, Gabor orientation selectivity, PCA against
NumPy's eigh, k-means lowering the within-cluster spread, He-scale norms, use in nn.Conv."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.data import load_digits
from jaxblocks.layers.filter_init import (
    bank_init,
    dct_bank,
    gabor_bank,
    kmeans_bank,
    patches,
    pca_bank,
)


def _norms(bank):
    return (bank**2).sum(axis=(0, 1, 2))


@pytest.fixture(scope="module")
def digit_patches():
    x, _ = load_digits("train", classes=tuple(range(10)), size=16, channels=1)
    return patches(x, 5, 2000, seed=0)


def test_fixed_banks():
    d = dct_bank(4, 1, 16)
    flat = d.reshape(16, 16)  # [k*k, C_out]
    gram = flat.T @ flat
    np.testing.assert_allclose(gram, 2.0 * np.eye(16), atol=1e-5)  # orthogonal, norm² 2
    assert np.allclose(d[..., 0], d[..., 0].flat[0])  # the first DCT filter is constant (DC)
    g = gabor_bank(7, 3, 8)
    assert g.shape == (7, 7, 3, 8) and np.allclose(_norms(g), 2.0, atol=1e-5)
    # the 0-rad filter responds most to vertical stripes, the π/2 one to horizontal stripes
    stripes = np.cos(2 * np.pi * np.arange(7) / 2.0)
    vertical, horizontal = np.tile(stripes, (7, 1)), np.tile(stripes[:, None], (1, 7))
    resp = lambda f, img: abs(float((f * img).sum()))  # noqa: E731
    f0, f90 = g[:, :, 0, 0], g[:, :, 0, 4]  # orientations 0 and 4·π/8
    assert resp(f0, vertical) > 5 * resp(f0, horizontal)
    assert resp(f90, horizontal) > 5 * resp(f90, vertical)


def test_pca_bank_matches_eigh(digit_patches):
    bank = pca_bank(digit_patches, 6)
    flat = digit_patches.reshape(len(digit_patches), -1).astype(np.float64)
    flat = flat - flat.mean(1, keepdims=True)
    vals, vecs = np.linalg.eigh(np.cov(flat, rowvar=False))
    top = vecs[:, np.argsort(vals)[::-1][:6]]
    got = bank.reshape(25, 6) / np.sqrt(2.0)
    np.testing.assert_allclose(got.T @ got, np.eye(6), atol=1e-5)  # orthonormal components
    # the same top-6 subspace (single vectors may rotate where eigenvalues nearly coincide)
    np.testing.assert_allclose(got @ got.T, top @ top.T, atol=1e-4)
    assert abs(float((got[:, 0] * top[:, 0]).sum())) > 1 - 1e-6  # the leading one exactly


def test_kmeans_bank_lowers_within_cluster_spread(digit_patches):
    bank = kmeans_bank(digit_patches, 8, iters=20)
    assert bank.shape == (5, 5, 1, 8) and np.allclose(_norms(bank), 2.0, atol=1e-4)
    x = digit_patches.reshape(len(digit_patches), -1)
    x = x - x.mean(1, keepdims=True)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)

    def spread(centres):
        c = centres / np.linalg.norm(centres, axis=0, keepdims=True)
        return float(np.mean(np.max(x @ c, axis=1)))  # mean cosine to the nearest centre

    random = np.random.default_rng(1).standard_normal((25, 8))
    assert spread(bank.reshape(25, 8)) > spread(random) + 0.2
    with pytest.raises(ValueError, match="fewer than c_out=8"):
        kmeans_bank(digit_patches[:5], 8)


def test_bank_init_in_a_conv():
    bank = dct_bank(3, 2, 4)
    conv = nn.Conv(4, (3, 3), kernel_init=bank_init(bank))
    v = conv.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
    np.testing.assert_array_equal(v["params"]["kernel"], bank)
    with pytest.raises(ValueError, match=r"asks for a kernel \(3, 3, 1, 4\)"):
        nn.Conv(4, (3, 3), kernel_init=bank_init(bank)).init(
            jax.random.key(0), jnp.ones((1, 8, 8, 1))
        )
    with pytest.raises(ValueError, match="images must be NHWC"):
        patches(np.ones((2, 3, 3, 1)), 5, 10)


def test_named_init_builds_each_bank_for_the_requested_shape():
    from jaxblocks.layers.filter_init import BANKS, dct_bank, named_init

    images = np.asarray(jax.random.uniform(jax.random.key(0), (20, 12, 12, 1)))
    shape = (3, 3, 1, 8)
    for name in BANKS:
        k = named_init(name, images)(jax.random.key(1), shape)
        assert k.shape == shape and bool(jnp.all(jnp.isfinite(k))), name
    np.testing.assert_allclose(named_init("dct")(jax.random.key(0), shape), dct_bank(3, 1, 8))
    with pytest.raises(ValueError, match="learns from data"):
        named_init("pca")
    with pytest.raises(ValueError, match="must be one of"):
        named_init("wavelet")
    with pytest.raises(ValueError, match="square conv kernel"):
        named_init("gabor")(jax.random.key(0), (3, 8))
