"""SqueezeExcite vs its equation (numpy float64): shapes, dtypes, any spatial rank, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers import SqueezeExcite
from tests.kernels.harness import assert_close


def _np(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _reference(x, fc1, fc2):
    xn = _np(x)
    s = xn.mean(axis=tuple(range(1, xn.ndim - 1)))  # [B, C]
    gate = 1.0 / (1.0 + np.exp(-(np.maximum(s @ _np(fc1), 0.0) @ _np(fc2))))
    return xn * gate.reshape((xn.shape[0],) + (1,) * (xn.ndim - 2) + (xn.shape[-1],))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 24), (3, 9, 12), (1, 2, 3, 4, 10)])
def test_squeeze_excite_matches_equation(shape, dtype):
    x = (jax.random.normal(jax.random.key(0), shape) * 1.3 + 0.4).astype(dtype)
    se = SqueezeExcite(reduction=4, dtype=dtype)
    v = se.init(jax.random.key(1), x)
    p = v["params"]
    c = shape[-1]
    assert set(p) == {"fc1", "fc2"}  # no biases
    assert p["fc1"]["kernel"].shape == (c, c // 4) and p["fc2"]["kernel"].shape == (c // 4, c)
    assert p["fc1"]["kernel"].dtype == jnp.float32
    y = jax.jit(se.apply)(v, x)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, _reference(x, p["fc1"]["kernel"], p["fc2"]["kernel"]), dtype=dtype)
    g = jax.grad(lambda v: jnp.sum(jnp.sin(se.apply(v, x).astype(jnp.float32))))(v)
    assert all(
        np.all(np.isfinite(_np(leaf))) and np.any(_np(leaf) != 0) for leaf in jax.tree.leaves(g)
    )


def test_squeeze_excite_hidden_width_at_least_one():
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
    v = SqueezeExcite(reduction=16).init(jax.random.key(1), x)
    assert v["params"]["fc1"]["kernel"].shape == (4, 1)


def test_squeeze_excite_bad_inputs():
    with pytest.raises(ValueError, match=r"SqueezeExcite: x must be .*shape \(2, 8\)"):
        SqueezeExcite().init(jax.random.key(0), jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="reduction=0"):
        SqueezeExcite(reduction=0).init(jax.random.key(0), jnp.ones((2, 3, 3, 8)))
