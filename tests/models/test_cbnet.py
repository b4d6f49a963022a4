"""CBNet composite backbones (arXiv 2107.00420): zero-init DHLC leaves the lead backbone equal
to a single ResNet on the same weights; perturbed DHLC equals a hand-written composition."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.conv_bn import DEFAULT_EPSILON
from jaxblocks.models.cbnet import (
    CBResNet,
    CBResNetConfig,
    CompositeBackbone,
    ResNetStages,
    nearest_resize,
)
from jaxblocks.models.resnet import ResNet

ARCH = dict(stage_sizes=(1, 1, 1), block="basic", width=8, stem="small")


def _perturb(tree, seed, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        x + scale * jnp.abs(jax.random.normal(k, x.shape)) if x.ndim == 1 else x
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    model = CBResNet(del_stages=1, **ARCH)
    v = nn.unbox(model.init(jax.random.key(1), x))
    # non-trivial backbone BN parameters and statistics; the DHLC stays zero-initialised
    v = {
        "params": {k: _perturb(p, 2) if k.startswith("backbone") else p
                   for k, p in v["params"].items()},
        "batch_stats": _perturb(v["batch_stats"], 3),
    }  # fmt: skip
    return model, v, x


def _lead_as_single(v, del_stages):
    """The lead backbone as one ResNet: stem (+ deleted stages) from backbone_0."""
    out = {}
    for col in ("params", "batch_stats"):
        b0, b1 = v[col]["backbone_0"], v[col]["backbone_1"]
        shared = ["conv1"] + [f"layer{i + 1}_0" for i in range(del_stages)]
        out[col] = {**{k: b0[k] for k in shared}, **b1}
    return out


def test_zero_init_lead_equals_single_backbone(setup):
    model, v, x = setup
    outs = model.apply(v, x, mode="eval")
    assert len(outs) == 2
    single = _lead_as_single(v, 1)
    # every lead stage equals a one-backbone composite (no DHLC) on the merged weights
    one = CBResNet(num_backbones=1, del_stages=0, **ARCH)
    ref_stages = one.apply({c: {"backbone_0": single[c]} for c in single}, x, mode="eval")[0]
    for got, want in zip(outs[-1], ref_stages, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the last stage, pooled, equals the project's ResNet on the same weights
    resnet = ResNet(num_classes=0, **ARCH)
    pooled = resnet.apply(single, x, mode="eval")
    np.testing.assert_allclose(outs[-1][-1].mean(axis=(1, 2)), pooled, rtol=1e-5, atol=1e-5)
    # the assisting backbone is a plain ResNet on its own weights
    b0 = {c: v[c]["backbone_0"] for c in v}
    np.testing.assert_allclose(outs[0][-1].mean(axis=(1, 2)), resnet.apply(b0, x, mode="eval"),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def _dhlc_by_hand(v, feats, i, j):
    """BN(Conv1x1(feats[i + j + 1])) upsampled to feats[i]'s size, in eval mode."""
    name = f"cb_linears_{i}_{j}"
    p, s = v["params"][name], v["batch_stats"][name]
    y = jnp.einsum("bhwc,cd->bhwd", feats[i + j + 1], p["kernel"][0, 0], precision="highest")
    y = (y - s["mean"][None, None, None]) / jnp.sqrt(s["var"][None, None, None] + DEFAULT_EPSILON)
    y = y * p["scale"][None, None, None] + p["bias"][None, None, None]
    factor = feats[i].shape[1] // y.shape[1]
    return jnp.repeat(jnp.repeat(y, factor, axis=1), factor, axis=2)


def test_perturbed_dhlc_equals_hand_written_composition(setup):
    model, v, x = setup
    v = {
        "params": {k: p if k.startswith("backbone") else _perturb(p, 4, 1.0)
                   for k, p in v["params"].items()},
        "batch_stats": _perturb(v["batch_stats"], 5),
    }  # fmt: skip
    outs = model.apply(v, x, mode="eval")
    zero = model.apply({**v, "params": {**v["params"], **{
        k: jax.tree.map(jnp.zeros_like, p) for k, p in v["params"].items()
        if k.startswith("cb_")}}}, x, mode="eval")  # fmt: skip
    assert float(jnp.max(jnp.abs(outs[-1][-1] - zero[-1][-1]))) > 1e-2

    stages = ResNetStages(**ARCH)
    bb = [{c: v[c][f"backbone_{k}"] for c in v} for k in range(2)]
    stem = stages.apply(bb[0], x, "eval", method=ResNetStages.forward_stem)

    def stage(k, i, h):
        return stages.apply(bb[k], h, method=lambda m, h: m.forward_stage(i, h, "eval"))

    feats = [stem]
    for i in range(3):
        feats.append(stage(0, i, feats[-1]))
    # lead: stage 0 is the assisting backbone's (del_stages=1); stage i >= 1 input gets
    # sum_{j} DHLC(out_{i+j} of the assisting backbone)
    h, lead = feats[1], [feats[1]]
    for i in (1, 2):
        feed = sum(_dhlc_by_hand(v, feats, i, j) for j in range(3 - i))
        h = stage(1, i, h + feed)
        lead.append(h)
    for got, want in zip(outs[-1], lead, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(outs[0], feats[1:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shapes_and_three_backbones():
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    model = CBResNet(num_backbones=3, del_stages=0, stage_sizes=(1, 1), block="bottleneck",
                     width=4, stem="imagenet")  # fmt: skip
    shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
    assert len(shapes) == 3
    for outs in shapes:
        assert [o.shape for o in outs] == [(1, 8, 8, 16), (1, 4, 4, 32)]
    # del_stages=0: every backbone has its stages but only the first has a stem
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert "conv1" in params["backbone_0"] and "conv1" not in params["backbone_2"]
    assert sorted(k for k in params if k.startswith("cb_")) == [
        "cb_linears_0_0", "cb_linears_0_1", "cb_linears_1_0"]  # fmt: skip
    assert nearest_resize(jnp.arange(6.0).reshape(1, 2, 3, 1), (4, 6))[0, :, :, 0].tolist() == [
        [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]  # fmt: skip


def test_bad_inputs_raise():
    x = jax.random.normal(jax.random.key(0), (16, 16, 3))
    with pytest.raises(ValueError, match=r"x must be NHWC.*\(16, 16, 3\)"):
        CBResNet(**ARCH).init(jax.random.key(0), x)
    x = x[None]
    with pytest.raises(ValueError, match=r"del_stages must be an int in \[0, 3\).*got 3"):
        CBResNet(del_stages=3, **ARCH).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_backbones must be an int >= 1, got 0"):
        CBResNet(num_backbones=0, **ARCH).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="backbone must be a factory"):
        CompositeBackbone().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="del_stages must be in"):
        CBResNetConfig(del_stages=4)
