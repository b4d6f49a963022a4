"""LongConv: squash/smooth properties, causality, the convolution itself, dtypes, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.long_conv import LongConv, smooth_kernel, squash_kernel


def test_squash_is_a_soft_threshold():
    k = jnp.array([-0.5, -0.003, -0.001, 0.0, 0.002, 0.004, 1.0])
    np.testing.assert_allclose(
        squash_kernel(k, 0.003), [-0.497, 0.0, 0.0, 0.0, 0.0, 0.001, 0.997], atol=1e-7
    )
    x = jax.random.normal(jax.random.key(0), (1000,)) * 0.01
    s = squash_kernel(x, 0.003)
    assert np.all(np.abs(s) <= np.abs(x))  # shrinks
    assert np.all(np.sign(s)[s != 0] == np.sign(x)[s != 0])  # keeps the sign
    assert np.mean(s == 0) > 0.2  # sparsifies


def test_smoothing_is_a_moving_average_that_smooths():
    k = jax.random.normal(jax.random.key(1), (3, 50))
    s = smooth_kernel(k, 7)
    assert s.shape == k.shape
    np.testing.assert_allclose(s[:, 10], k[:, 7:14].mean(-1), rtol=1e-5)
    np.testing.assert_allclose(s[:, 0], k[:, :4].sum(-1) / 7, rtol=1e-5)  # zero pad counted
    tv = lambda a: float(jnp.abs(jnp.diff(a, axis=-1)).sum())
    assert tv(s) < 0.5 * tv(k)
    with pytest.raises(ValueError, match="window must be odd"):
        smooth_kernel(k, 6)


def _layer_out(layer, x, params, **kw):
    return layer.apply(params, x, **kw)


def test_forward_is_a_causal_long_convolution_with_skip_and_glu():
    B, L, H, c = 2, 40, 3, 2
    x = jax.random.normal(jax.random.key(0), (B, L, H))
    layer = LongConv(l_max=L, channels=c, lam=0.0, kernel_dropout=0.0, kernel_init_scale=0.3)
    params = jax.jit(layer.init)(jax.random.key(1), x)
    p = params["params"]
    # Independent oracle: numpy direct convolution, per channel.
    k = np.asarray(p["kernel"], np.float64)  # [c, H, L]
    D = np.asarray(p["D"], np.float64)
    xn = np.asarray(x, np.float64)
    y = np.zeros((B, L, c, H))
    for ci in range(c):
        for h in range(H):
            for b in range(B):
                y[b, :, ci, h] = np.convolve(xn[b, :, h], k[ci, h])[:L] + D[ci, h] * xn[b, :, h]
    y = y.reshape(B, L, c * H)
    g = 0.5 * y * (1 + jax.scipy.special.erf(y / np.sqrt(2)))
    w, bias = (np.asarray(p["output_linear"][n], np.float64) for n in ("kernel", "bias"))
    z = np.asarray(g) @ w + bias
    want = z[..., :H] * (1 / (1 + np.exp(-z[..., H:])))
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_causality_and_bidirectional(bidirectional):
    L = 32
    x = jax.random.normal(jax.random.key(0), (1, L, 4))
    layer = LongConv(l_max=L, bidirectional=bidirectional, kernel_init_scale=0.1, lam=0.0)
    params = jax.jit(layer.init)(jax.random.key(1), x)
    y = layer.apply(params, x)
    y2 = layer.apply(params, x.at[:, 20:].add(5.0))
    same_past = np.allclose(y[:, :20], y2[:, :20], atol=1e-6)
    assert same_past != bidirectional  # causal: past untouched; bidirectional: it sees ahead


def test_shorter_inputs_kernel_dropout_and_dtype():
    layer = LongConv(l_max=64, smoothing=True, dtype=jnp.bfloat16, kernel_init_scale=0.1)
    x = jax.random.normal(jax.random.key(0), (2, 48, 8))
    params = jax.jit(layer.init)(jax.random.key(1), x)
    assert params["params"]["kernel"].shape == (2, 8, 64)
    assert params["params"]["kernel"].dtype == jnp.float32
    y = layer.apply(params, x)
    assert y.shape == (2, 48, 8) and y.dtype == jnp.bfloat16
    ya = layer.apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
    yb = layer.apply(params, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(np.asarray(ya, np.float32), np.asarray(yb, np.float32))
    g = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2)))(params)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g))


def test_bad_inputs():
    layer = LongConv(l_max=16)
    with pytest.raises(ValueError, match="exceeds l_max=16"):
        jax.jit(layer.init)(jax.random.key(0), jnp.ones((1, 17, 4)))
    with pytest.raises(ValueError, match=r"\[B, L, H\]"):
        jax.jit(layer.init)(jax.random.key(0), jnp.ones((17, 4)))
    with pytest.raises(ValueError, match="channels must be >= 1"):
        LongConv(l_max=16, channels=0).init(jax.random.key(0), jnp.ones((1, 8, 4)))


def test_pallas_kernels_inside_the_layer():
    """The layer with the Monarch Pallas kernel (TPU interpreter) equals the XLA FFT path."""
    from jaxblocks.kernels import interpret

    x = jax.random.normal(jax.random.key(0), (1, 50, 4))
    ref = LongConv(l_max=50, kernel_init_scale=0.1, implementation="xla")
    params = jax.jit(ref.init)(jax.random.key(1), x)
    loss = lambda m: jax.value_and_grad(lambda p: jnp.sum(m.apply(p, x) ** 2))
    want = jax.jit(loss(ref))(params)
    with interpret():
        got = jax.jit(loss(ref.clone(implementation="pallas_tpu")))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
