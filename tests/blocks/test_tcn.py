"""TCN and TCNCA: receptive field, causality, chunk locality, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.tcn import TCN, TCNCA, chunked_attention, tcn_receptive_field


def _input_grad(model, params, x, t):
    """|d y[:, t] / d x| summed over batch/channels: which inputs output t depends on."""
    g = jax.jit(jax.grad(lambda x: jnp.sum(model.apply(params, x)[:, t])))(x)
    return np.abs(np.asarray(g, np.float32)).sum(axis=(0, 2))


@pytest.mark.parametrize("kernel_size,levels,depthwise", [(3, 3, False), (2, 4, True)])
def test_tcn_receptive_field_and_causality(kernel_size, levels, depthwise):
    T, C = 64, 4
    x = jax.random.normal(jax.random.key(0), (2, T, C))
    tcn = TCN(features=C, kernel_size=kernel_size, num_levels=levels, depthwise=depthwise)
    # The structure, not one draw of ReLU masks: positive inputs, weights and biases keep every
    # ReLU open (the network is then linear), and |weights| ~ 0.5 instead of N(0, 0.01) keep
    # far-lag products from underflowing.
    x = jnp.abs(x)
    params = jax.tree.map(
        lambda p: jnp.abs(p) * 50.0 + 0.1, jax.jit(tcn.init)(jax.random.key(1), x)
    )
    rf = tcn_receptive_field(kernel_size, levels)
    assert tcn.receptive_field == rf == 1 + 2 * (kernel_size - 1) * (2**levels - 1)
    t = T - 1
    dep = _input_grad(tcn, params, x, t) > 0
    assert not dep[t + 1 :].any()  # causal (vacuous at the end; checked below mid-sequence)
    assert dep[t - rf + 1 : t + 1].all()
    assert dep[t - rf + 1] and dep[t]  # the field's two ends are reached
    assert not dep[: t - rf + 1].any()  # nothing beyond the receptive field
    mid = 30
    dep_mid = _input_grad(tcn, params, x, mid) > 0
    assert not dep_mid[mid + 1 :].any()


def test_tcn_future_inputs_do_not_change_the_past():
    x = jax.random.normal(jax.random.key(0), (2, 40, 3))
    tcn = TCN(features=(8, 8, 5), kernel_size=3)
    params = jax.jit(tcn.init)(jax.random.key(1), x)
    y = tcn.apply(params, x)
    y2 = tcn.apply(params, x.at[:, 25:].set(3.0))
    assert y.shape == (2, 40, 5)
    np.testing.assert_array_equal(y[:, :25], y2[:, :25])
    assert not np.allclose(y[:, 25:], y2[:, 25:])


def test_chunked_attention_matches_masked_full_attention():
    B, T, Z, c = 2, 10, 4, 4
    q, k, v = (jax.random.normal(kk, (B, T, Z)) for kk in jax.random.split(jax.random.key(0), 3))
    o = chunked_attention(q, k, v, c, causal=True)
    s = jnp.einsum("bqz,bkz->bqk", q, k) / 2.0
    i = jnp.arange(T)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] // c == i[:, None] // c)
    want = jnp.einsum("bqk,bkv->bqv", jax.nn.softmax(jnp.where(mask[None], s, -jnp.inf), -1), v)
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-6)
    o2 = chunked_attention(q, k, v, c, causal=False)  # padded keys masked (T=10, chunk 4)
    mask2 = i[None, :] // c == i[:, None] // c
    want2 = jnp.einsum("bqk,bkv->bqv", jax.nn.softmax(jnp.where(mask2[None], s, -jnp.inf), -1), v)
    np.testing.assert_allclose(o2, want2, rtol=1e-5, atol=1e-6)


def test_tcnca_causal_shapes_dtype_and_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 37, 8))
    block = TCNCA(z_dim=16, chunk_size=8, tcn_levels=2)
    params = jax.jit(block.init)(jax.random.key(1), x)
    y = block.apply(params, x)
    assert y.shape == x.shape
    y2 = block.apply(params, x.at[:, 20:].add(1.0))
    np.testing.assert_allclose(y[:, :20], y2[:, :20], atol=1e-6)
    g = jax.jit(jax.grad(lambda p: jnp.sum(block.apply(p, x) ** 2)))(params)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
    yb = TCNCA(z_dim=16, chunk_size=8, tcn_levels=2, dtype=jnp.bfloat16).apply(params, x)
    assert yb.dtype == jnp.bfloat16


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        TCN(features=4).init(jax.random.key(0), jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="depthwise needs"):
        TCN(features=6, depthwise=True).init(jax.random.key(0), jnp.ones((1, 5, 4)))
