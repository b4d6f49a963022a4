"""Monotone DBM layer: the coupling's monotonicity, the proximal softmax, the solvers and the
implicit gradient (Feng, Winston & Kolter, TMLR 2023)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers import monotone_dbm
from jaxblocks.layers.monotone_dbm import (
    CouplingStructure,
    SolverConfig,
    Tier,
    damped_step,
    fixed_point,
    forward_backward_solve,
    monotone_coupling,
    monotone_coupling_params,
    prox_softmax,
    prox_softmax_argmin,
    uniform_start,
)

STRUCT = CouplingStructure(
    (Tier(3, 4, 4, 1), Tier(4, 2, 2, 2), Tier(3, 1, 1, 1)),
    ((3, 0, 0), (3, 3, 0), (0, 2, 1)),
)
ALPHA = 0.25


def _kernels(seed=0, scale=0.6):
    keys = jax.random.split(jax.random.key(seed), len(STRUCT.kernel_shapes))
    return [
        scale * jax.random.normal(k, s) for k, s in zip(keys, STRUCT.kernel_shapes, strict=True)
    ]


def _dense_w(kernels, m):
    apply = monotone_coupling(STRUCT, kernels, m)
    n = STRUCT.size
    return np.asarray(STRUCT.merge(apply(STRUCT.split(jnp.eye(n))))).T  # column i = W e_i


@pytest.mark.parametrize("m", [0.01, 0.3])
def test_coupling_is_symmetric_hollow_and_monotone(m):
    w = _dense_w(_kernels(), m)
    assert np.abs(w - w.T).max() < 1e-5
    assert np.linalg.eigvalsh(np.eye(len(w)) - 0.5 * (w + w.T)).min() >= m - 1e-4
    off = 0
    for t in STRUCT.tiers:  # no coupling inside a categorical variable
        for p in range(t.height * t.width):
            for g in range(t.groups):
                idx = off + p * t.channels + g * t.group_size + np.arange(t.group_size)
                assert np.abs(w[np.ix_(idx, idx)]).max() < 1e-5
        off += t.size


@pytest.mark.parametrize("alpha", [0.125, 0.5, 1.0])
def test_prox_softmax_matches_argmin_and_softmax(alpha):
    y = 2.0 * jax.random.normal(jax.random.key(1), (4, 5))
    p = np.asarray(prox_softmax(y, alpha))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    for row, yr in zip(p, np.asarray(y), strict=True):
        np.testing.assert_allclose(row, prox_softmax_argmin(yr, alpha), atol=2e-4)
    if alpha == 1.0:
        np.testing.assert_allclose(p, jax.nn.softmax(y, -1), atol=1e-6)


def test_prox_softmax_stops_at_convergence(monkeypatch):
    # The tolerance stop gives what running every capped iteration gives, on inputs from tiny to
    # large spreads and group sizes 2 to 256.
    ys = [
        s * jax.random.normal(jax.random.key(n), (16, n))
        for s in (0.1, 3.0, 100.0)
        for n in (2, 11, 256)
    ]
    stopped = [np.asarray(prox_softmax(y, a)) for y in ys for a in (0.125, 0.9)]

    def every_iteration(step, x0, max_iters):
        return jax.lax.fori_loop(0, max_iters, lambda _, x: step(x), x0)

    monkeypatch.setattr(monotone_dbm, "_until_converged", every_iteration)
    capped = [np.asarray(prox_softmax(y, a)) for y in ys for a in (0.125, 0.9)]
    for a, b in zip(stopped, capped, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6)


def test_prox_softmax_vjp_matches_finite_differences():
    y = jax.random.normal(jax.random.key(2), (5,), jnp.float32)
    v = jax.random.normal(jax.random.key(3), (5,))
    g = jax.grad(lambda y: jnp.dot(prox_softmax(y, 0.25), v))(y)
    eps = 1e-3
    e = np.eye(5, dtype=np.float32)
    fd = [
        (
            jnp.dot(prox_softmax(y + eps * e[i], 0.25), v)
            - jnp.dot(prox_softmax(y - eps * e[i], 0.25), v)
        )
        / (2 * eps)
        for i in range(5)
    ]
    np.testing.assert_allclose(g, np.array(fd), atol=2e-3)


def _problem(seed=0, batch=2):
    kernels = _kernels(seed)
    k1, k2, k3 = jax.random.split(jax.random.key(seed + 10), 3)
    t0 = STRUCT.tiers[0]
    biases = [
        jax.random.normal(jax.random.fold_in(k1, i), t.shape) for i, t in enumerate(STRUCT.tiers)
    ]
    mask = jnp.broadcast_to(
        jax.random.bernoulli(k2, 0.5, (batch, t0.height, t0.width, 1)).astype(jnp.float32),
        (batch, *t0.shape),
    )
    obs = jax.nn.one_hot(jax.random.randint(k3, (batch, t0.height, t0.width), 0, 3), 3)
    return kernels, biases, mask, obs


STEP = functools.partial(damped_step, STRUCT, ALPHA)


def _params(kernels, biases, mask, obs, m=0.1):
    return (monotone_coupling_params(STRUCT, kernels, m), biases, mask, obs)


# ~30 s of CPU each; the implicit-gradient test below also solves to 1e-6 with Anderson.
@pytest.mark.slow
@pytest.mark.parametrize("anderson", [False, True])
def test_solver_converges_to_a_unique_fixed_point(anderson):
    params = _params(*_problem())
    cfg = SolverConfig(tol=1e-5, max_iter=400, anderson=anderson)
    f = functools.partial(STEP, params)
    z0 = uniform_start(STRUCT, 2)
    z, k, res = forward_backward_solve(f, z0, cfg)
    assert float(res.max()) < 1e-5 and int(k) < 400
    assert float(jnp.max(jnp.abs(f(z) - z))) < 1e-4
    # another start: random probabilities in every group
    parts = []
    for i, t in enumerate(STRUCT.tiers):
        r = jax.random.normal(
            jax.random.key(50 + i), (2, t.height, t.width, t.groups, t.group_size)
        )
        parts.append(jax.nn.softmax(3 * r, -1).reshape(2, -1))
    z2, _, _ = forward_backward_solve(f, jnp.concatenate(parts, 1), cfg)
    np.testing.assert_allclose(z2, z, atol=1e-4)


def _loss_fn(solve):
    v = jax.random.normal(jax.random.key(7), (2, STRUCT.size))

    def loss(kernels, biases, mask, obs):
        z = solve(_params(kernels, biases, mask, obs), uniform_start(STRUCT, 2))
        return jnp.sum(z * v)

    return loss


def _implicit(params, z0):
    return fixed_point(STEP, params, z0, SolverConfig(tol=1e-6, max_iter=300, anderson=True))


def _unrolled(params, z0, n=300):
    return jax.lax.fori_loop(0, n, lambda _, z: STEP(params, z), z0)


def test_implicit_gradient_matches_unrolled_autodiff_and_finite_differences():
    kernels, biases, mask, obs = _problem()
    g_imp = jax.jit(jax.grad(_loss_fn(_implicit), argnums=(0, 1)))(kernels, biases, mask, obs)
    g_unr = jax.jit(jax.grad(_loss_fn(_unrolled), argnums=(0, 1)))(kernels, biases, mask, obs)
    for a, b in zip(jax.tree.leaves(g_imp), jax.tree.leaves(g_unr), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3 * (1 + float(jnp.abs(b).max())))
    # finite differences along a random direction of the first kernel
    loss = jax.jit(_loss_fn(_implicit))
    d = jax.random.normal(jax.random.key(9), kernels[0].shape)
    eps = 1e-2

    def at(t):
        return loss([kernels[0] + t * d, *kernels[1:]], biases, mask, obs)

    fd = (at(eps) - at(-eps)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(g_imp[0][0] * d)), float(fd), rtol=2e-2, atol=2e-3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="alpha"):
        prox_softmax(jnp.ones(3), 0.0)
    with pytest.raises(ValueError, match="m must be"):
        monotone_coupling(STRUCT, _kernels(), 1.0)
    with pytest.raises(ValueError, match="kernels must have shapes"):
        monotone_coupling(STRUCT, [k[:1] for k in _kernels()], 0.1)
    with pytest.raises(ValueError, match="Tier.groups"):
        Tier(5, 2, 2, 2)
    with pytest.raises(ValueError, match="kernels must be 2×2"):
        CouplingStructure((Tier(2, 2, 2), Tier(2, 1, 1)), ((3,),))
    with pytest.raises(ValueError, match="tol"):
        SolverConfig(tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        SolverConfig(max_iter=0)
    with pytest.raises(ValueError, match="z0"):
        forward_backward_solve(lambda z: z, jnp.ones(3), SolverConfig())
