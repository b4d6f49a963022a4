"""pixel_shuffle / pixel_unshuffle against torch's index formula, round trips and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers import PixelShuffle, pixel_shuffle, pixel_unshuffle


@pytest.mark.parametrize(("r", "c"), [(1, 3), (2, 1), (3, 2)])
def test_pixel_shuffle_index_formula(r, c):
    b, h, w = 2, 3, 5
    x = np.asarray(jax.random.normal(jax.random.key(0), (b, h, w, c * r * r)))
    y = np.asarray(pixel_shuffle(jnp.asarray(x), r))
    assert y.shape == (b, h * r, w * r, c)
    want = np.empty_like(y)
    for hh in range(h * r):
        for ww in range(w * r):
            i, j = hh % r, ww % r
            for cc in range(c):  # torch: output channel c at (i, j) <- input c*r^2 + i*r + j
                want[:, hh, ww, cc] = x[:, hh // r, ww // r, cc * r * r + i * r + j]
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(np.asarray(pixel_unshuffle(jnp.asarray(y), r)), x)
    np.testing.assert_array_equal(np.asarray(PixelShuffle(r).apply({}, jnp.asarray(x))), y)


def test_errors():
    with pytest.raises(ValueError, match=r"channels 5 .* not divisible by r²=4"):
        pixel_shuffle(jnp.zeros((1, 2, 2, 5)), 2)
    with pytest.raises(ValueError, match=r"spatial size \(3, 4\) of x not divisible by r=2"):
        pixel_unshuffle(jnp.zeros((1, 3, 4, 1)), 2)
    with pytest.raises(ValueError, match=r"x must be NHWC"):
        pixel_shuffle(jnp.zeros((2, 2, 4)), 2)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="upscale factor r must be a positive int"):
            pixel_shuffle(jnp.zeros((1, 2, 2, 4)), bad)
