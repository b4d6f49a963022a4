"""Poincaré ResNet (https://arxiv.org/abs/2303.14027): the official models' parameter counts,
the residual block's Möbius skip (both the paper's channel axis and the official code's width
axis), stage features, and bad-input errors. (Init, jit, gradients and bf16 of the presets' tiny
models run in tests/models/test_registry.py; its gradient check of the tiny model is slow, so a
block's gradient is checked here.)"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.poincare_resnet import PoincareResidualBlock, poincare_skip
from jaxblocks.layers.norm.poincare import PoincareBatchNorm
from jaxblocks.layers.poincare import PoincareConv2d, expmap0, logmap0, mobius_add
from jaxblocks.models.poincare_resnet import (
    HYPERBOLIC_RESNET_PRESETS,
    HyperbolicResNet,
    HyperbolicResNetConfig,
    hyperbolic_resnet_param_count,
)


def _count(model, x):
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(shapes)["params"]))


# Trainable parameters of the official torch HyperbolicResNet built by
# parse_model_from_name("hyperbolic-8-16-32-resnet-{20,32}", classes), counted with torch.
OFFICIAL_COUNTS = {(3, 10): 68_757, (5, 10): 117_601, (3, 100): 71_727, (5, 100): 120_571}


@pytest.mark.parametrize("depth, classes", sorted(OFFICIAL_COUNTS))
def test_param_count_matches_official(depth, classes):
    cfg = HyperbolicResNetConfig(depths=(depth,) * 3, num_classes=classes)
    n = _count(HyperbolicResNet.from_config(cfg), jnp.zeros((1, 32, 32, 3)))
    assert n == hyperbolic_resnet_param_count(cfg) == OFFICIAL_COUNTS[(depth, classes)]


def test_presets_and_stage_features():
    assert HYPERBOLIC_RESNET_PRESETS["hyperbolic_resnet20"].depths == (3, 3, 3)
    assert HYPERBOLIC_RESNET_PRESETS["hyperbolic_resnet32"].depths == (5, 5, 5)
    model = HyperbolicResNet()
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), variables, x)
    assert [f.shape for f in feats] == [(2, 32, 32, 8), (2, 16, 16, 16), (2, 8, 8, 32)]
    pooled = jax.eval_shape(model.clone(num_classes=0).apply, variables, x)
    assert pooled.shape == (2, 32)
    params = nn.unbox(variables)["params"]
    assert "downsample" in params["group2_0"] and "downsample" not in params["group1_0"]
    assert params["fc"]["kernel"].shape == (32, 10)
    assert "batch_stats" not in variables  # batch statistics always, as the official code


def test_skip_axes_and_order(key):
    kh, kr = jax.random.split(key)
    h, r = jax.random.normal(kh, (2, 3, 4, 5)), 0.5 * jax.random.normal(kr, (2, 3, 4, 5))

    def channel_skip(h, r):  # f(x) ⊕ r of each pixel's channel vector
        return logmap0(mobius_add(expmap0(h, 0.1), expmap0(r, 0.1), 0.1), 0.1)

    t = lambda a: jnp.transpose(a, (0, 3, 1, 2))  # noqa: E731  NHWC -> NCHW
    np.testing.assert_allclose(poincare_skip(h, r, 0.1), channel_skip(h, r), atol=1e-6)
    # the official dim=-1 on NCHW tensors: the rows along the width are the points
    width = poincare_skip(h, r, 0.1, skip_axis="width")
    np.testing.assert_allclose(t(width), channel_skip(t(h), t(r)), atol=1e-6)
    assert float(jnp.max(jnp.abs(width - poincare_skip(h, r, 0.1)))) > 1e-3
    # "fr" and "rf" differ: Möbius addition does not commute
    assert float(jnp.max(jnp.abs(poincare_skip(h, r, 0.1) - poincare_skip(h, r, 0.1, "rf")))) > 1e-4


@pytest.mark.slow
def test_block_matches_its_layers_and_skip_axes(key):
    kx, kp = jax.random.split(key)
    x = jax.random.normal(kx, (2, 6, 4, 3))
    block = PoincareResidualBlock(5, stride=2, c=0.1)
    params = nn.unbox(block.init(kp, x))["params"]
    # off the identity init so that every layer matters
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(kp, len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )

    def conv(name, k, s, p, h):
        return PoincareConv2d(5, k, s, p, c=0.1).apply({"params": params[name]}, h)

    def bn(name, h):
        return PoincareBatchNorm(c=0.1).apply({"params": params[name]}, h)

    h = jax.nn.relu(bn("bn1", conv("conv1", (3, 3), 2, 1, x)))
    h = bn("bn2", conv("conv2", (3, 3), 1, 1, h))
    r = conv("downsample", (1, 1), 2, 0, x)

    def channel_skip(h, r):  # f(x) ⊕ r of each pixel's channel vector
        return logmap0(mobius_add(expmap0(h, 0.1), expmap0(r, 0.1), 0.1), 0.1)

    def width_skip(h, r):  # the official dim=-1 of NCHW: rows along the width are the points
        t = lambda a: jnp.transpose(a, (0, 3, 1, 2))  # noqa: E731
        return jnp.transpose(channel_skip(t(h), t(r)), (0, 2, 3, 1))

    y = block.apply({"params": params}, x)
    np.testing.assert_allclose(y, jax.nn.relu(channel_skip(h, r)), atol=1e-5)
    y_width = block.clone(skip_axis="width").apply({"params": params}, x)
    np.testing.assert_allclose(y_width, jax.nn.relu(width_skip(h, r)), atol=1e-5)
    assert float(jnp.max(jnp.abs(y - y_width))) > 1e-3
    # "fr" and "rf" differ: Möbius addition does not commute
    h, r = x[:, ::2, ::2], 0.5 * x[:, 1::2, 1::2]
    assert float(jnp.max(jnp.abs(poincare_skip(h, r, 0.1) - poincare_skip(h, r, 0.1, "rf")))) > 1e-4


def test_block_gradients_are_finite_and_reach_every_layer(key):
    """The jitted gradient of one residual block (the whole tiny model's gradient compiles for
    ~40 s at -O0 and runs in the registry check under `make test-slow`)."""
    kx, kp = jax.random.split(key)
    x = jax.random.normal(kx, (2, 6, 4, 3))
    block = PoincareResidualBlock(5, stride=2, c=0.1)
    params = nn.unbox(block.init(kp, x))["params"]

    @jax.jit
    def grads(params, x):
        return jax.grad(lambda p, x: jnp.sum(block.apply({"params": p}, x) ** 2), (0, 1))(params, x)

    gp, gx = grads(params, x)
    for path, g in jax.tree_util.tree_leaves_with_path(gp):
        assert np.all(np.isfinite(g)), path
    # every layer (both convs, both norms, the downsample) gets a gradient
    for layer in ("conv1", "conv2", "bn1", "bn2", "downsample"):
        assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(gp[layer])), layer
    assert np.all(np.isfinite(gx)) and float(jnp.max(jnp.abs(gx))) > 0


def test_bad_inputs(key):
    model = HyperbolicResNet(channels=(2, 2, 2), depths=(1, 1, 1), image_size=8)
    with pytest.raises(
        ValueError, match=r"x must be NHWC images \[batch, 8, 8, 3\].*\(1, 8, 8, 1\)"
    ):
        model.init(key, jnp.ones((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"c=-0.1 must be > 0"):
        HyperbolicResNetConfig(c=-0.1)
    with pytest.raises(ValueError, match=r"one entry per group"):
        HyperbolicResNetConfig(channels=(8, 16), depths=(3, 3, 3))
    block = PoincareResidualBlock(4)
    with pytest.raises(ValueError, match=r"PoincareResidualBlock: x must be NHWC.*rank 3"):
        block.init(key, jnp.ones((8, 8, 4)))
    with pytest.raises(ValueError, match=r"PoincareResidualBlock: c=0.0 must be > 0"):
        block.clone(c=0.0).init(key, jnp.ones((1, 8, 8, 4)))
    with pytest.raises(ValueError, match=r"skip_axis='height'"):
        poincare_skip(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3)), 0.1, skip_axis="height")
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 3\) but the residual has shape"):
        poincare_skip(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 4)), 0.1)
