"""MonotoneDBM model: shapes, observed pixels kept, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.monotone_dbm import MonotoneDBM, MonotoneDBMConfig, pack_observed

TINY = dict(pixel_levels=5, hidden=((8, 2), (16, 4)), max_iter=10)


def test_outputs_and_observed_pixels_are_kept():
    k1, k2 = jax.random.split(jax.random.key(0))
    image = jax.random.uniform(k1, (3, 8, 8, 1))
    mask = jax.random.bernoulli(k2, 0.4, (3, 8, 8, 1))
    x = pack_observed(image, mask)
    model = MonotoneDBM(**TINY)
    variables = jax.jit(model.init)(jax.random.key(1), x)
    completed, logits = jax.jit(model.apply)(variables, x)
    assert completed.shape == (3, 8, 8, 1) and logits.shape == (3, 10)
    np.testing.assert_allclose(np.where(mask, completed, 0), np.where(mask, image, 0), atol=1e-6)
    assert float(completed.min()) >= 0.0 and float(completed.max()) <= 1.0


def test_bad_input_raises():
    model = MonotoneDBM(**TINY)
    with pytest.raises(ValueError, match="x must be"):
        model.init(jax.random.key(0), jnp.ones((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="alpha"):
        MonotoneDBMConfig(alpha=0.0)
    with pytest.raises(ValueError, match="image_size"):
        MonotoneDBMConfig(image_size=6)
