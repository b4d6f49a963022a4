"""ConvFirst and its MBConv baseline (arXiv 2404.03617) against a lax/NumPy formulation of
their definitions, the paper's MAC/parameter comparison by hand, and the small networks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxblocks.blocks.convfirst import (
    ConvFirstBlock,
    MBConvBaselineBlock,
    block_macs,
    block_params,
)
from jaxblocks.layers.conv_bn import DEFAULT_EPSILON
from jaxblocks.models.convfirst import ConvFirstNet, ConvFirstNetConfig

BLOCKS = {"convfirst": ConvFirstBlock, "mbconv": MBConvBaselineBlock}


def _perturbed(variables, seed):
    """Random BN affine parameters and running statistics (init has 1/0/0/1)."""
    leaves, treedef = jax.tree.flatten(nn.unbox(variables))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        x + 0.3 * jnp.abs(jax.random.normal(k, x.shape)) if x.ndim == 1 else x
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)


def _conv(x, w, stride, groups):
    p = w.shape[0] // 2
    return lax.conv_general_dilated(
        x, w, (stride, stride), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups, precision=lax.Precision.HIGHEST,
    )  # fmt: skip


def _bn(y, p, s, train):
    if train:
        mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))  # biased, as Flax
    else:
        mean, var = s["mean"], s["var"]
    mean, var, scale, bias = (a.reshape(1, 1, 1, -1) for a in (mean, var, p["scale"], p["bias"]))
    return (y - mean) / jnp.sqrt(var + DEFAULT_EPSILON) * scale + bias


def _reference(kind, v, x, stride, out, gw, train):
    """The block's definition, layer by layer (blocks.md section 18 / spio profile_block.py)."""
    p, s = v["params"], v["batch_stats"]
    c = x.shape[-1]

    def layer(name, h, stride=1, groups=1):
        return _bn(_conv(h, p[name]["kernel"], stride, groups), p[name], s[name], train)

    if kind == "convfirst":
        y = layer("conv", x, stride, c // gw)  # grouped conv on the narrow tensor, no act
        y = jax.nn.silu(layer("expand", y))
    else:
        y = jax.nn.silu(layer("expand", x))
        y = jax.nn.silu(layer("conv", y, stride, 4 * c // gw))  # grouped conv on the wide one
    y = layer("project", y)
    return y + x if stride == 1 and c == out else y


@pytest.mark.parametrize("kind", ["convfirst", "mbconv"])
@pytest.mark.parametrize(
    "c, out, stride, size, train",
    [(16, 16, 1, 7, False), (8, 24, 2, 9, True)],
)
def test_block_matches_its_definition(kind, c, out, stride, size, train):
    x = jax.random.normal(jax.random.key(1), (2, size, size, c))
    block = BLOCKS[kind](out, strides=stride)
    v = _perturbed(block.init(jax.random.key(2), x), seed=3)
    mode = "train" if train else "eval"
    got, _ = block.apply(v, x, mode=mode, mutable=["batch_stats"])
    want = _reference(kind, v, x, stride, out, 8, train)
    assert got.shape == (2, (size - 1) // stride + 1, (size - 1) // stride + 1, out)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the spatial conv is grouped with group width 8, on C (ConvFirst) or 4C (MBConv) channels
    width = c if kind == "convfirst" else 4 * c
    assert v["params"]["conv"]["kernel"].shape == (3, 3, 8, width)


def test_block_macs_by_hand():
    # 16 -> 32 channels, 9x9 input, stride 2 (5x5 output), k=3, group width 8, expansion 4.
    cf = block_macs("convfirst", 16, 32, 9, 9, strides=2)
    mb = block_macs("mbconv", 16, 32, 9, 9, strides=2)
    assert cf == {"conv": 5 * 5 * 9 * 8 * 16, "expand": 5 * 5 * 16 * 64,
                  "project": 5 * 5 * 64 * 32, "total": 28800 + 25600 + 51200}  # fmt: skip
    # MBConv expands at the input resolution, then convolves 4x more channels.
    assert mb == {"conv": 5 * 5 * 9 * 8 * 64, "expand": 9 * 9 * 16 * 64,
                  "project": 5 * 5 * 64 * 32, "total": 115200 + 82944 + 51200}  # fmt: skip
    same = block_macs("mbconv", 64, 64, 8, 8), block_macs("convfirst", 64, 64, 8, 8)
    assert same[0]["conv"] == 4 * same[1]["conv"] and same[0]["expand"] == same[1]["expand"]


@pytest.mark.parametrize("kind", ["convfirst", "mbconv"])
def test_block_params_count_the_initialized_block(kind):
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 16))
    params = nn.unbox(jax.eval_shape(BLOCKS[kind](24, kernel_size=5).init, jax.random.key(0), x))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["params"]))
    assert n == block_params(kind, 16, 24, kernel_size=5)
    # by hand: ConvFirst 25*8*16 + 2*16 + 16*64 + 2*64 + 64*24 + 2*24
    if kind == "convfirst":
        assert n == 3200 + 32 + 1024 + 128 + 1536 + 48


def test_bad_inputs_raise():
    block = ConvFirstBlock(16)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=12.*group_width=8"):
        block.init(jax.random.key(0), jax.random.normal(jax.random.key(1), (1, 4, 4, 12)))
    with pytest.raises(ValueError, match=r"x must be NHWC.*\(4, 4, 16\)"):
        block.init(jax.random.key(0), jax.random.normal(jax.random.key(1), (4, 4, 16)))
    with pytest.raises(ValueError, match="kind must be one of"):
        block_macs("convnext", 16, 16, 4, 4)
    with pytest.raises(ValueError, match="strides must be a positive int"):
        block_macs("mbconv", 16, 16, 4, 4, strides=0)
    with pytest.raises(ValueError, match="widths .* multiples of group_width=8"):
        ConvFirstNetConfig(widths=(12, 64, 128, 256))
    with pytest.raises(ValueError, match="block must be one of"):
        ConvFirstNetConfig(block="fused")
    with pytest.raises(ValueError, match=r"x must be NHWC.*\(32, 32, 3\)"):
        ConvFirstNet().init(jax.random.key(0), jnp.ones((32, 32, 3)) * 0.5)


TINY = dict(stem_width=16, widths=(16, 32), depths=(2, 1), strides=(1, 2), num_classes=10)


def test_networks_differ_only_in_their_blocks():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    counts, stages = {}, {}
    for kind in ("convfirst", "mbconv"):
        model = ConvFirstNet(block=kind, **TINY)
        v = model.init(jax.random.key(1), x)
        counts[kind] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))
        stages[kind] = model.apply(v, x, mode="eval", features=True)
        assert model.apply(v, x, mode="eval").shape == (2, 10)
    # blocks: 16->16, 16->16, 16->32 (stride 2)
    geometry = [(16, 16), (16, 16), (16, 32)]
    diff = sum(block_params("mbconv", i, o) - block_params("convfirst", i, o) for i, o in geometry)
    assert counts["mbconv"] - counts["convfirst"] == diff
    for kind in stages:
        assert [s.shape for s in stages[kind]] == [(2, 8, 8, 16), (2, 4, 4, 32)]
