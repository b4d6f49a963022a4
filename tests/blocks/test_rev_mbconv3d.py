"""Reversible couplings: exact inverse, gradients equal to autodiff, residuals independent of
depth; the 3-D MBConv stage built on them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.rev_mbconv3d import MBConv3D, ReversibleMBConv3DStage, _DepthwiseConv3D
from jaxblocks.layers.reversible import plain_sequence, reversible_inverse, reversible_sequence


def _f(p, x):
    return jnp.tanh(x @ p["w"] + p["b"][None, :])


def _g(p, x):
    return jax.nn.gelu(x @ p["w"]) * p["b"][None, :]


def _params(n, d, seed):
    ks = jax.random.split(jax.random.key(seed), 2 * n)
    mk = lambda k: {"w": jax.random.normal(k, (d, d)) / np.sqrt(d),  # noqa: E731
                    "b": jax.random.normal(jax.random.fold_in(k, 1), (d,))}  # fmt: skip
    return tuple(mk(k) for k in ks[:n]), tuple(mk(k) for k in ks[n:])


def test_inverse_and_gradients_equal_autodiff():
    fp, gp = _params(4, 6, 0)
    x1, x2 = jax.random.normal(jax.random.key(1), (2, 5, 6))
    y = reversible_sequence(_f, _g, fp, gp, x1, x2)
    want = plain_sequence(_f, _g, fp, gp, x1, x2)
    np.testing.assert_allclose(y[0], want[0], rtol=1e-6)
    r = reversible_inverse(_f, _g, fp, gp, *y)
    np.testing.assert_allclose(r[0], x1, atol=1e-5)
    np.testing.assert_allclose(r[1], x2, atol=1e-5)

    def loss(seq, fp, gp, x1, x2):
        y1, y2 = seq(_f, _g, fp, gp, x1, x2)
        return jnp.sum(jnp.sin(y1) * y2)

    got = jax.grad(lambda *a: loss(reversible_sequence, *a), argnums=(0, 1, 2, 3))(fp, gp, x1, x2)
    ref = jax.grad(lambda *a: loss(plain_sequence, *a), argnums=(0, 1, 2, 3))(fp, gp, x1, x2)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def _residual_bytes(seq, n):
    fp, gp = _params(n, 16, 2)
    x1, x2 = jax.random.normal(jax.random.key(3), (2, 64, 16))
    _, vjp = jax.vjp(lambda *a: seq(_f, _g, *a), fp, gp, x1, x2)
    params = sum(x.nbytes for x in jax.tree.leaves((fp, gp)))
    return sum(x.nbytes for x in jax.tree.leaves(vjp)) - params


def test_saved_activations_do_not_grow_with_depth():
    rev = [_residual_bytes(reversible_sequence, n) for n in (2, 8)]
    plain = [_residual_bytes(plain_sequence, n) for n in (2, 8)]
    assert rev[0] == rev[1] == 2 * 64 * 16 * 4  # the two outputs only
    assert plain[1] > 3 * plain[0] > 0  # autodiff keeps every block's activations


def test_stage_reversible_equals_plain_and_has_the_same_gradients():
    x = jax.random.normal(jax.random.key(4), (2, 5, 6, 7, 8))  # odd spatial sizes
    rev = ReversibleMBConv3DStage(num_blocks=2, expansion=2, groups=4)
    plain = ReversibleMBConv3DStage(num_blocks=2, expansion=2, groups=4, reversible=False)
    v = rev.init(jax.random.key(5), x)
    assert set(v["params"]) == {"f_0", "f_1", "g_0", "g_1"}
    np.testing.assert_allclose(rev.apply(v, x), plain.apply(v, x), rtol=1e-5, atol=1e-6)

    def grads(m):
        return jax.grad(lambda p, x: jnp.sum(m.apply({"params": p}, x) ** 2), argnums=(0, 1))(
            v["params"], x
        )

    for a, b in zip(jax.tree.leaves(grads(rev)), jax.tree.leaves(grads(plain)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_mbconv3d_shapes_and_errors():
    x = jax.random.normal(jax.random.key(6), (1, 4, 4, 4, 6))
    m = MBConv3D(expansion=3, groups=4)
    v = m.init(jax.random.key(7), x)
    assert m.apply(v, x).shape == x.shape
    assert v["params"]["depthwise"]["kernel"].shape == (3, 3, 3, 1, 18)
    with pytest.raises(ValueError, match="channels must be even"):
        ReversibleMBConv3DStage().init(jax.random.key(0), jnp.ones((1, 4, 4, 4, 5)))
    with pytest.raises(ValueError, match=r"must be \[B, D, H, W, C\]"):
        ReversibleMBConv3DStage().init(jax.random.key(0), jnp.ones((1, 4, 4, 6)))
    with pytest.raises(ValueError, match="0 F blocks but 1 G|1 F blocks but 0 G"):
        reversible_sequence(_f, _g, (), _params(1, 2, 0)[1], jnp.ones((1, 2)), jnp.ones((1, 2)))


@pytest.mark.parametrize("ks", [(3, 3, 3), (1, 3, 5)])
def test_depthwise_conv3d_equals_grouped_nn_conv(ks):
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 7, 6))
    layer = _DepthwiseConv3D(kernel_size=ks)
    v = layer.init(jax.random.key(1), x)
    assert v["params"]["kernel"].shape == (*ks, 1, 6)
    ref = nn.Conv(6, ks, padding="SAME", feature_group_count=6, use_bias=False)

    def f(kernel, x):
        return layer.apply({"params": {"kernel": kernel}}, x)

    def g(kernel, x):
        return ref.apply({"params": {"kernel": kernel}}, x)

    k = v["params"]["kernel"]
    np.testing.assert_allclose(f(k, x), g(k, x), rtol=1e-5, atol=1e-5)
    loss = lambda fn: lambda k, x: jnp.sum(jnp.sin(fn(k, x)))  # noqa: E731
    for a, b in zip(jax.grad(loss(f), (0, 1))(k, x), jax.grad(loss(g), (0, 1))(k, x),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
