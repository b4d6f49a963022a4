"""LinearScope (arXiv 1908.05168): the x0-decided affine interpreter of any JAX function."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxblocks.analysis import (
    UnsupportedPrimitiveError,
    chord_slope,
    interpreter,
    interpreter_matrix,
    linear_map,
    linear_scope,
    transpose,
)

TOL = dict(rtol=2e-5, atol=2e-5)


def _close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


class PiecewiseCNN(nn.Module):
    """Conv → ReLU → max-pool → Conv → leaky ReLU → avg-pool → Dense: piecewise linear."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jax.nn.leaky_relu(nn.Conv(5, (3, 3), padding="VALID")(x), 0.1)
        x = nn.avg_pool(x, (2, 2))
        x = jnp.maximum(x, -0.2)  # a clamp at a nonzero constant: affine, not linear
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class SmoothNet(nn.Module):
    """Dense → LayerNorm → SiLU → Dense → tanh → GELU → Dense: smooth, so A(x0) ≠ Jacobian."""

    @nn.compact
    def __call__(self, x):
        x = nn.silu(nn.LayerNorm()(nn.Dense(8)(x)))
        x = nn.gelu(jnp.tanh(nn.Dense(6)(x)))
        return nn.Dense(3)(x)


@functools.cache
def _cnn():
    model = PiecewiseCNN()
    x0 = _normal(0, (2, 8, 8, 2))
    return functools.partial(model.apply, model.init(jax.random.key(1), x0)), x0


@functools.cache
def _smooth():
    model = SmoothNet()
    x0 = _normal(2, (2, 5))
    variables = model.init(jax.random.key(3), x0)
    # LayerNorm's γ, β away from 1, 0 so the rule is tested with them.
    p = dict(variables["params"])
    p["LayerNorm_0"] = {"scale": 1.0 + 0.3 * _normal(4, (8,)), "bias": 0.2 * _normal(5, (8,))}
    return functools.partial(model.apply, {"params": p}), x0


def test_cnn_y0_and_interpreter_reproduces_output():
    f, x0 = _cnn()
    y0, y1 = linear_scope(f, x0, _normal(7, x0.shape))
    _close(y0, f(x0), rtol=1e-6, atol=1e-6)
    assert y1.shape == y0.shape
    _close(interpreter(f, x0)(x0), f(x0))


def test_piecewise_linear_map_is_the_jacobian():
    f, x0 = _cnn()
    u = _normal(8, x0.shape)
    _, jvp = jax.linearize(f, x0)
    _close(linear_map(f, x0)(u), jvp(u))
    # The bias-free map equals the affine interpreter minus its value at 0.
    interp = interpreter(f, x0)
    _close(linear_map(f, x0)(u), interp(u) - interp(jnp.zeros_like(u)))


def test_affine_property():
    f, x0 = _smooth()
    interp = interpreter(f, x0)
    u, w = _normal(9, x0.shape), _normal(10, x0.shape)
    c = interp(jnp.zeros_like(u))
    a, b = 0.7, -1.3
    _close(interp(a * u + b * w) - c, a * (interp(u) - c) + b * (interp(w) - c))
    _close(linear_map(f, x0)(u), interp(u) - c)


def test_transpose_is_adjoint():
    f, x0 = _cnn()
    u = _normal(11, x0.shape)
    w = _normal(12, f(x0).shape)
    lhs = jnp.vdot(linear_map(f, x0)(u), w)
    rhs = jnp.vdot(u, transpose(f, x0)(w))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_interpreter_matrix_matches_interpreter():
    f, x0 = _smooth()
    a = interpreter_matrix(f, x0)
    assert a.shape == (f(x0).size, x0.size)
    interp = interpreter(f, x0)
    x1 = _normal(13, x0.shape)
    c = interp(jnp.zeros_like(x1)).ravel()
    _close(a @ x1.ravel() + c, interp(x1).ravel())
    _close(a @ x0.ravel() + c, f(x0).ravel())  # A(x0)·x0 + c(x0) = f(x0)


def test_smooth_net_interpreter_is_not_the_linearization():
    f, x0 = _smooth()
    _close(interpreter(f, x0)(x0), f(x0))
    u = _normal(14, x0.shape)
    _, jvp = jax.linearize(f, x0)
    diff = jnp.abs(linear_map(f, x0)(u) - jvp(u)).max()
    assert diff > 1e-2, diff


def test_gate_rules():
    """x·σ(x): the sigmoid is the gate; softmax attention: x0's weights on x1's values."""
    x0, x1 = _normal(15, (3, 4)), _normal(16, (3, 4))
    _close(linear_scope(jax.nn.silu, x0, x1)[1], jax.nn.sigmoid(x0) * x1)
    _close(linear_scope(lambda x: x * x, x0, x1)[1], x0 * x1)  # peers split symmetrically
    _close(linear_scope(jnp.tanh, x0, x1)[1], jnp.tanh(x0) / x0 * x1)  # the ratio f(u0)/u0

    wq, wk, wv = _normal(17, (4, 4)), _normal(18, (4, 4)), _normal(19, (4, 4))

    def attention(x):
        p = jax.nn.softmax((x @ wq) @ (x @ wk).T, axis=-1)
        return p @ (x @ wv)

    p0 = jax.nn.softmax((x0 @ wq) @ (x0 @ wk).T, axis=-1)
    _close(linear_scope(attention, x0, x1)[1], p0 @ (x1 @ wv))


def test_layernorm_rule():
    """x1 is centred with its own mean and divided by x0's σ: γ(x1 − mean x1)/σ(x0) + β."""
    x0, x1 = _normal(20, (3, 6)), _normal(21, (3, 6))
    scale, bias = 1.0 + _normal(22, (6,)), _normal(23, (6,))
    ln = nn.LayerNorm(epsilon=1e-5)
    f = functools.partial(ln.apply, {"params": {"scale": scale, "bias": bias}})
    sigma = jnp.sqrt(jnp.var(x0, axis=-1, keepdims=True) + 1e-5)
    want = (x1 - x1.mean(-1, keepdims=True)) / sigma * scale[None] + bias[None]
    _close(linear_scope(f, x0, x1)[1], want)
    # BatchNorm in eval mode is affine already: the interpreter is the layer itself.
    bn = nn.BatchNorm(use_running_average=True)
    v = bn.init(jax.random.key(0), x0)
    v = jax.tree.map(lambda a: a + 0.5, v)
    g = functools.partial(bn.apply, v)
    _close(linear_scope(g, x0, x1)[1], g(x1))


def test_control_flow():
    """scan (ReLU RNN), while (x0 decides the trip count) and cond match the JVP."""
    w = 0.5 * _normal(24, (4, 4))

    def rnn(xs):
        def step(h, x):
            h = jax.nn.relu(h @ w + x)
            return h, 2.0 * h

        h, ys = lax.scan(step, jnp.ones((4,)), xs)
        return h, ys

    def loop(x):
        return lax.while_loop(
            lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.maximum(c[1], 0.1) @ w), (0, x)
        )[1]

    def branch(x):
        return lax.cond(x.sum() > 0, lambda y: jax.nn.relu(y), lambda y: 2.0 * y, x)

    for fn, x0 in (
        (rnn, _normal(25, (5, 4))),
        (loop, _normal(26, (4,))),
        (branch, _normal(27, (4,))),
    ):
        u = _normal(28, x0.shape)
        _close(linear_scope(fn, x0, u)[0], fn(x0))
        _close(interpreter(fn, x0)(x0), fn(x0))
        _close(linear_map(fn, x0)(u), jax.jvp(fn, (x0,), (u,))[1])


def test_jit_and_chord_slope():
    f, x0 = _smooth()
    u = _normal(29, x0.shape)
    _close(jax.jit(functools.partial(linear_scope, f))(x0, u), linear_scope(f, x0, u))
    # a·u + f(0) = f(u), with the derivative as the limit at 0 (no 0/0, no cancellation).
    t = jnp.array([-3.0, -1e-3, 0.0, 1e-6, 0.5], jnp.float32)
    a = chord_slope(jax.nn.sigmoid, t)
    _close(a * t + 0.5, jax.nn.sigmoid(t), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a[2], 0.25, rtol=1e-6)


def test_unsupported_primitive_and_bad_input():
    x0 = _normal(30, (5,))
    with pytest.raises(UnsupportedPrimitiveError, match="'sort'"):
        linear_scope(jnp.sort, x0, x0)
    # The same primitive on values that do not depend on the input is just a constant.
    c = _normal(31, (5,))
    linear_scope(lambda x: x + jnp.sort(c), x0, x0)
    with pytest.raises(ValueError, match=r"x1 leaf 0 has shape \(4,\), expected .*\(5,\)"):
        linear_scope(jnp.tanh, x0, x0[:4])
    with pytest.raises(ValueError, match="max_size"):
        interpreter_matrix(jnp.tanh, x0, max_size=4)
