"""BN-only training (Frankle et al. 2021): the mask, the labels, the optimizer wrapper and the
re-initialisation, on hand-built trees and by training a small BN net and a registry ResNet."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxblocks.train import bn_only as N
from tests.kernels.harness import leaves_changed


def _x(shape, dtype=jnp.float32, seed=0, shift=0.5):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 1.5 + shift
    return x.astype(dtype)


def _np(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


class _SmallConvNet(nn.Module):
    """Conv -> BatchNorm -> ReLU twice, then a Dense head (BN-only training test bed)."""

    @nn.compact
    def __call__(self, x, train: bool):
        for i, f in enumerate((8, 8)):
            x = nn.Conv(f, (3, 3), use_bias=True, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
            x = nn.relu(x)
        return nn.Dense(3, name="head")(x.mean((1, 2)))


def _train_bn_only(model, variables, x, y, steps=25, lr=0.05, **mask_kw):
    params = N.bn_only_init(variables["params"], jax.random.key(1))
    tx = N.bn_only_optimizer(optax.adam(lr), params, **mask_kw)
    opt = tx.init(params)
    bs = variables.get("batch_stats", {})

    def loss_fn(p, bs):
        logits, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    @jax.jit
    def step(p, opt, bs):
        (l, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(p, bs)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, upd["batch_stats"], l

    p0 = params
    losses = []
    for _ in range(steps):
        params, opt, bs, l = step(params, opt, bs)
        losses.append(float(l))
    return p0, params, losses


def test_bn_only_mask_selects_norm_affine_only():
    params = {
        "conv0": {"kernel": 1.0, "bias": 2.0},
        "bn0": {"scale": 1.0, "bias": 0.0},
        "block": {"ConvBN_0": {"kernel": 1.0, "scale": 1.0, "bias": 0.0}},
        "head": {"kernel": 1.0, "bias": 0.0},
    }
    mask = N.bn_only_mask(params)
    assert mask == {
        "conv0": {"kernel": False, "bias": False},
        "bn0": {"scale": True, "bias": True},
        "block": {"ConvBN_0": {"kernel": False, "scale": True, "bias": True}},
        "head": {"kernel": False, "bias": False},
    }
    mask_h = N.bn_only_mask(params, extra_trainable=("^head/",))
    assert mask_h["head"] == {"kernel": True, "bias": True}
    init = N.bn_only_init(
        jax.tree.map(lambda a: jnp.full((16,), a), params), jax.random.key(0), "uniform"
    )
    g = _np(init["bn0"]["scale"])
    assert np.all((g >= 0) & (g <= 1)) and g.std() > 0
    assert np.all(_np(init["bn0"]["bias"]) == 0) and np.all(_np(init["conv0"]["bias"]) == 2)
    assert np.all(_np(init["block"]["ConvBN_0"]["kernel"]) == 1)
    with pytest.raises(ValueError, match="scheme"):
        N.bn_only_init(params, jax.random.key(0), "normal")
    # logically partitioned (boxed) params: a box is one leaf; mask and init keep the boxes
    boxed = {
        "conv": {"kernel": nn.Partitioned(jnp.ones((3, 2)), names=(None, "c"))},
        "bn": {"scale": nn.Partitioned(jnp.ones((2,)), names=("c",)), "bias": jnp.ones((2,))},
    }
    assert N.bn_only_mask(boxed) == {"conv": {"kernel": False}, "bn": {"scale": True, "bias": True}}
    bi = N.bn_only_init(boxed, jax.random.key(0))
    assert isinstance(bi["bn"]["scale"], nn.Partitioned) and bi["bn"]["scale"].names == ("c",)
    assert float(bi["bn"]["bias"].sum()) == 0.0


def test_bn_only_training_changes_only_bn_params():
    x = _x((16, 6, 6, 3))
    y = jnp.asarray(np.arange(16) % 3)
    x = x + 0.8 * y[:, None, None, None].astype(jnp.float32)  # learnable signal
    model = _SmallConvNet()
    v = model.init(jax.random.key(0), x, train=True)
    p0, p1, losses = _train_bn_only(model, v, x, y)
    assert losses[-1] < 0.9 * losses[0]
    mask = N.bn_only_mask(p0)
    changed = leaves_changed(p0, p1)
    assert changed == mask  # exactly the BN scale/bias moved, everything else is bit-identical


def test_bn_only_training_on_registry_resnet():
    from jaxblocks.registry import create_model

    x = _x((8, 8, 8, 3))
    # the mask on the full registry ResNet-18 (abstract init, logically-partitioned params)
    full = create_model("resnet18", num_classes=3, width=8, stem="small")
    boxed = jax.eval_shape(full.init, jax.random.key(0), x)["params"]
    flat = {"/".join(map(str, k)): m for k, m in _flat(N.bn_only_mask(boxed))}
    assert flat["layer1_0/conv1/scale"] and flat["layer1_0/conv1/bias"]
    assert not flat["layer1_0/conv1/kernel"] and not flat["fc/kernel"] and not flat["fc/bias"]
    assert sum(flat.values()) == 2 * 20  # 20 ConvBN layers in ResNet-18 (incl. 3 downsamples)
    # BN-only training of the same registry ResNet at one block per stage (CI-sized)
    model = create_model("resnet18", num_classes=3, width=8, stem="small", stage_sizes=(1, 1, 1, 1))
    y = jnp.asarray(np.arange(8) % 3)
    x = x + 0.8 * y[:, None, None, None].astype(jnp.float32)
    v = model.init(jax.random.key(0), x)
    v = {**v, "params": nn.meta.unbox(v["params"])}
    p0, p1, losses = _train_bn_only(model, v, x, y, steps=8)
    assert losses[-1] < losses[0]
    changed = leaves_changed(p0, p1)
    assert changed == N.bn_only_mask(p0)
    assert sum(jax.tree.leaves(changed)) == 2 * 12  # stem + 4 blocks x 2 + 3 downsamples


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(getattr(k, "key", k) for k in path), leaf) for path, leaf in leaves]


def test_bn_only_labels_and_frozen_updates_are_zero():
    params = {"conv": {"kernel": jnp.ones((2, 2))}, "bn": {"scale": jnp.ones(2)}}
    assert N.bn_only_labels(params) == {"conv": {"kernel": "frozen"}, "bn": {"scale": "trainable"}}
    tx = N.bn_only_optimizer(optax.sgd(0.5), params)
    g = {"conv": {"kernel": jnp.full((2, 2), 3.0)}, "bn": {"scale": jnp.asarray([1.0, -2.0])}}
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(u["conv"]["kernel"]), 0.0)
    np.testing.assert_allclose(np.asarray(u["bn"]["scale"]), [-0.5, 1.0])
