"""LMU: the exact (A, B), its discretisation, recurrent ≡ parallel, spiking LIF, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import cont2discrete

from jaxblocks.layers.lmu import (
    LMU,
    lif,
    lmu_discrete,
    lmu_impulse_response,
    lmu_state_space,
    spike,
)


def test_state_space_matches_the_paper():
    a, b = lmu_state_space(4, 2.0)
    # Voelker et al.: A_ij = (2i+1)/θ · (−1 if i<j else (−1)^(i−j+1)); B_i = (2i+1)/θ (−1)^i
    want_a = (
        np.array([[-1, -1, -1, -1], [3, -3, -3, -3], [-5, 5, -5, -5], [7, -7, 7, -7]], np.float64)
        / 2.0
    )
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(b[:, 0], np.array([1, -3, 5, -7]) / 2.0)


def test_discretisation_matches_scipy_cont2discrete():
    a, b = lmu_state_space(6, 10.0)
    ad, bd, *_ = cont2discrete((a, b, np.ones((1, 6)), np.zeros((1,))), dt=1.0, method="zoh")
    a2, b2 = lmu_discrete(6, 10.0)
    np.testing.assert_allclose(a2, ad, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b2, bd, rtol=1e-12, atol=1e-14)
    h = lmu_impulse_response(6, 10.0, 5)
    np.testing.assert_allclose(h[:, 3], np.linalg.matrix_power(ad, 3) @ bd[:, 0], rtol=1e-10)


def test_memory_reconstructs_a_delayed_input():
    """The LMU's point: Legendre readout of m_t approximates u(t − θ')."""
    d, theta, T = 12, 30.0, 200
    t = np.arange(T)
    u = np.sin(2 * np.pi * t / 60.0)
    h = lmu_impulse_response(d, theta, T)
    m = np.stack([np.convolve(u, h[i])[:T] for i in range(d)], 1)  # [T, d]
    # Readout of the full delay θ: the Legendre basis evaluated at the window's end is all ones.
    delayed = m @ np.ones(d)
    err = np.abs(delayed[100:] - u[100 - int(theta) : T - int(theta)]).max()
    assert err < 0.1


@pytest.mark.parametrize("spiking", [False, True])
def test_recurrent_equals_parallel(spiking):
    x = jax.random.normal(jax.random.key(0), (2, 37, 5))
    lmu = LMU(hidden_size=6, memory_size=8, theta=37.0, spiking=spiking)
    params = jax.jit(lmu.init)(jax.random.key(1), x)
    yp = lmu.apply(params, x, mode="parallel")
    yr = lmu.apply(params, x, mode="recurrent")
    assert yp.shape == (2, 37, 6)
    if spiking:
        assert set(np.unique(np.asarray(yp))) <= {0.0, 1.0}
        assert np.mean(np.asarray(yp) == np.asarray(yr)) > 0.99  # threshold ties may flip
    else:
        np.testing.assert_allclose(yp, yr, rtol=1e-4, atol=1e-5)
    m = jax.random.normal(jax.random.key(2), (3, 37))
    np.testing.assert_allclose(
        lmu.memory(m, "parallel"), lmu.memory(m, "recurrent"), rtol=1e-4, atol=1e-5
    )


def test_gradients_flow_and_modes_agree():
    x = jax.random.normal(jax.random.key(0), (2, 20, 4))
    lmu = LMU(hidden_size=4, memory_size=6, theta=20.0)
    params = jax.jit(lmu.init)(jax.random.key(1), x)
    loss = lambda p, mode: jnp.sum(lmu.apply(p, x, mode=mode) ** 2)
    gp = jax.jit(jax.grad(loss), static_argnums=1)(params, "parallel")
    gr = jax.jit(jax.grad(loss), static_argnums=1)(params, "recurrent")
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gr), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        lmu.apply(params, x, mode="fft")


def test_lif_dynamics_and_surrogate_gradient():
    x = jnp.full((1, 6, 1), 1.5)
    s = lif(x, tau=2.0, v_threshold=1.0)
    # v: 0.75 -> 1.125 (spike, reset 0) -> 0.75 -> 1.125 (spike) ...
    np.testing.assert_array_equal(s[0, :, 0], [0, 1, 0, 1, 0, 1])
    g = jax.jit(jax.grad(lambda z: jnp.sum(spike(z))))(jnp.array([0.0, 2.0]))
    np.testing.assert_allclose(g, [1.0, 4 * jax.nn.sigmoid(8.0) * (1 - jax.nn.sigmoid(8.0))])


def test_spiking_trains_batch_stats():
    x = jax.random.normal(jax.random.key(0), (2, 16, 4))
    lmu = LMU(hidden_size=4, memory_size=8, theta=16.0, spiking=True)
    v = jax.jit(lmu.init)(jax.random.key(1), x)
    apply = jax.jit(lambda v, x: lmu.apply(v, x, train=True, mutable=["batch_stats"]))
    y, upd = apply(v, x)
    assert "batch_stats" in upd and y.shape == (2, 16, 4)
    assert not np.allclose(upd["batch_stats"]["bn_u"]["mean"], v["batch_stats"]["bn_u"]["mean"])
    g = jax.jit(jax.grad(lambda p: jnp.sum(apply({**v, "params": p}, x)[0])))(v["params"])
    assert any(np.abs(np.asarray(a)).sum() > 0 for a in jax.tree.leaves(g))
