"""Sparse 1×1 convolutions (Fast Sparse ConvNets): equal to the dense product of the kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.compress import magnitude_mask
from jaxblocks.compress.sparse_conv import (
    bcoo_pointwise,
    block_sparse_pointwise,
    ell_pointwise,
    pointwise_flops,
    to_block_sparse,
)


def _pruned(c_in, c_out, sparsity, block, seed=0):
    k = jax.random.normal(jax.random.key(seed), (c_in, c_out))
    return k * magnitude_mask(k, sparsity, (1, block))


@pytest.mark.parametrize(("block", "sparsity"), [(1, 0.7), (2, 0.9), (4, 0.95), (4, 0.0)])
def test_equals_dense_product(block, sparsity):
    k = _pruned(24, 36, sparsity, block)
    x = jax.random.normal(jax.random.key(1), (2, 5, 7, 24))  # odd spatial sizes
    sk = to_block_sparse(k[None, None], block)
    want = jnp.einsum("...i,io->...o", x, k, precision="highest")
    got = jax.jit(block_sparse_pointwise)(x, sk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bcoo_pointwise(x, k), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ell_pointwise(x, sk), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sk.to_dense(), k)
    # exactly the surviving blocks are stored
    assert sk.nnz_blocks * block == int(jnp.count_nonzero(k)) or sparsity == 0.0
    assert abs(sk.density - float(jnp.mean(k != 0))) < 1e-6


def test_an_all_zero_kernel_gives_zeros():
    sk = to_block_sparse(jnp.zeros((8, 8)), 4)
    assert sk.nnz_blocks == 0
    y = block_sparse_pointwise(jnp.ones((3, 8)), sk)
    assert y.shape == (3, 8) and not np.any(np.asarray(y))
    assert not np.any(np.asarray(ell_pointwise(jnp.ones((3, 8)), sk)))


def test_gradient_through_values_matches_dense():
    k = _pruned(16, 12, 0.8, 2, seed=3)
    x = jax.random.normal(jax.random.key(2), (9, 16))
    sk = to_block_sparse(k, 2)

    def loss_sparse(values):
        return jnp.sum(jnp.sin(block_sparse_pointwise(x, sk.__class__(
            values, sk.col, sk.row_block, sk.c_in, sk.c_out, sk.block))))  # fmt: skip

    g_sparse = jax.grad(loss_sparse)(sk.values)
    g_dense = jax.grad(lambda kk: jnp.sum(jnp.sin(x @ kk)))(k)
    want = np.asarray(g_dense).reshape(16, 6, 2)[np.asarray(sk.col), np.asarray(sk.row_block)]
    np.testing.assert_allclose(g_sparse, want, rtol=1e-5, atol=1e-5)


def test_flops():
    assert pointwise_flops(10, 4, 8) == 640.0
    assert pointwise_flops(10, 4, 8, density=0.25) == 160.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="1×1"):
        to_block_sparse(jnp.ones((3, 3, 4, 8)))
    with pytest.raises(ValueError, match="block=3 must be a positive divisor of C_out=8"):
        to_block_sparse(jnp.ones((4, 8)), 3)
    sk = to_block_sparse(jnp.ones((4, 8)))
    with pytest.raises(ValueError, match=r"x has shape \(2, 5\).*C_in=4"):
        block_sparse_pointwise(jnp.ones((2, 5)), sk)
    with pytest.raises(ValueError, match="C_in=4"):
        bcoo_pointwise(jnp.ones((2, 5)), jnp.ones((4, 8)))
