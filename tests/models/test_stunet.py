"""STU-Net's structure, the segmentation task's Dice and the ellipsoid volumes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.data.ellipsoids import ellipsoid_volumes
from jaxblocks.models.stunet import BasicResBlock, STUNet
from jaxblocks.train.tasks import get_task


def test_deep_supervision_outputs_and_block_layout():
    m = STUNet(depth=(2, 1, 1), dims=(4, 8, 8), num_classes=3, deep_supervision=True)
    x = jax.random.normal(jax.random.key(0), (1, 8, 12, 4, 1))
    v = m.init(jax.random.key(1), x)
    outs = m.apply(v, x)
    assert [o.shape for o in outs] == [(1, 8, 12, 4, 3), (1, 4, 6, 2, 3)]
    p = v["params"]
    # first block of a stage has the 1x1x1 skip conv (strided below the top), the others not
    assert "conv3" in p["context_0_0"] and "conv3" not in p["context_0_1"]
    assert p["context_1_0"]["conv3"]["kernel"].shape == (1, 1, 1, 4, 8)
    assert p["localization_1_0"]["conv1"]["kernel"].shape == (3, 3, 3, 8, 4)  # concat: 2×4 in
    assert m.apply(v, x).__len__() == 2
    np.testing.assert_allclose(
        STUNet(depth=(2, 1, 1), dims=(4, 8, 8), num_classes=3).apply(v, x), outs[0], rtol=1e-6
    )


def test_basic_res_block_is_residual_with_leaky_relu():
    b = BasicResBlock(6)
    x = jax.random.normal(jax.random.key(2), (1, 4, 4, 4, 6))
    v = b.init(jax.random.key(3), x)
    zero = jax.tree.map(jnp.zeros_like, v)  # conv2 and norm2's scale 0: y = leaky(0 + x)
    zero["params"]["norm1"] = v["params"]["norm1"]
    np.testing.assert_allclose(b.apply(zero, x), jax.nn.leaky_relu(x, 0.01), rtol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        STUNet(depth=(1, 1, 1), dims=(4, 8, 8)).init(jax.random.key(0), jnp.ones((1, 6, 8, 8, 1)))
    with pytest.raises(ValueError, match="equal lengths"):
        STUNet(depth=(1, 1), dims=(4, 8, 8)).init(jax.random.key(0), jnp.ones((1, 8, 8, 8, 1)))


def test_segmentation_dice_and_accuracy():
    labels = jnp.array([[0, 1, 1, 2], [0, 0, 0, 0]])
    pred = jnp.array([[0, 1, 2, 2], [0, 0, 0, 1]])
    logits = jax.nn.one_hot(pred, 3) * 10.0
    m = get_task("segmentation").metrics(logits, labels)
    # example 0: class 1 dice 2·1/(1+2), class 2 dice 2·1/(2+1); example 1: class 1 0, class 2 1
    np.testing.assert_allclose(m["dice"], [2 / 3, 0.5], rtol=1e-6)
    np.testing.assert_allclose(m["voxel_accuracy"], [0.75, 0.75])
    assert m["loss"].shape == (2,)
    with pytest.raises(ValueError, match="do not match labels"):
        get_task("segmentation").metrics(logits[:, :3], labels)


def test_ellipsoid_volumes():
    x, y = ellipsoid_volumes(3, 16, 3, seed=1)
    assert x.shape == (3, 16, 16, 16, 1) and y.shape == (3, 16, 16, 16)
    assert set(np.unique(y)) == {0, 1, 2}
    # intensity follows the label
    assert x[..., 0][y == 2].mean() > x[..., 0][y == 1].mean() > x[..., 0][y == 0].mean()
