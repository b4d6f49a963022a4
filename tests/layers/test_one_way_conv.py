"""OneWayConv equals nn.Conv with its reconstructed CP kernel; counts; init scale; errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.one_way_conv import OneWayConv, conv_flops, conv_param_count, one_way_kernel


@pytest.mark.parametrize(("k", "rank"), [(3, 1), (5, 2), (4, 3)])
def test_equals_a_full_conv_with_the_cp_kernel(k, rank):
    x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))
    layer = OneWayConv(5, k, rank=rank)
    v = layer.init(jax.random.key(1), x)
    p = v["params"]
    kernel = one_way_kernel(p["pointwise"], p["vertical"], p["horizontal"])
    assert kernel.shape == (k, k, 3, 5)
    want = nn.Conv(5, (k, k), padding="SAME").apply(
        {"params": {"kernel": kernel, "bias": p["bias"]}}, x
    )
    np.testing.assert_allclose(layer.apply(v, x), want, rtol=1e-5, atol=1e-5)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(p))
    assert n == conv_param_count(k, 3, 5, rank) + 5  # + bias


def test_counts_and_init_scale():
    assert conv_param_count(5, 32, 32) == 25600 and conv_param_count(5, 32, 32, 1) == 1344
    assert conv_flops(8, 8, 3, 4, 4, 2) == 2 * 64 * conv_param_count(3, 4, 4, 2)
    v = OneWayConv(64, 5, rank=2).init(jax.random.key(0), jnp.ones((1, 8, 8, 64)))
    p = v["params"]
    var = float(jnp.var(one_way_kernel(p["pointwise"], p["vertical"], p["horizontal"])))
    assert 0.5 < var / (2.0 / (25 * 64)) < 2.0  # He-normal's variance, in expectation


def test_errors():
    with pytest.raises(ValueError, match="kernel_size must be square"):
        OneWayConv(4, (3, 5)).init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
    with pytest.raises(ValueError, match="must be >= 1"):
        OneWayConv(4, 3, rank=0).init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"x must be NHWC"):
        OneWayConv(4, 3).init(jax.random.key(0), jnp.ones((8, 8, 2)))
