"""Optimizers vs closed forms, masks, LR scaling rules, schedules, regime adaptation, AGVM."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxblocks.train import agvm, optim
from tests.train.helpers import tiny_config


def _tree():
    rng = np.random.default_rng(0)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(4), jnp.float32),
        },
        "head": {"kernel": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)},
    }
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    return params, grads


def _np(t):
    return jax.tree.map(np.asarray, t)


def test_lars_matches_closed_form_two_steps():
    params, g = _tree()
    lr, wd, eta, mom = 0.5, 1e-2, 1e-3, 0.9
    tx = optim.lars(lr, weight_decay=wd, trust_coefficient=eta, momentum=mom)
    st = tx.init(params)
    u1, st = tx.update(g, st, params)
    p1 = optax.apply_updates(params, u1)
    u2, st = tx.update(g, st, p1)
    w, gw = np.asarray(params["dense"]["kernel"]), np.asarray(g["dense"]["kernel"])

    def scaled(w, gw):
        u = gw + wd * w
        return eta * np.linalg.norm(w) / np.linalg.norm(u) * u

    v1 = scaled(w, gw)
    np.testing.assert_allclose(u1["dense"]["kernel"], -lr * v1, rtol=1e-5)
    w1 = w - lr * v1
    np.testing.assert_allclose(p1["dense"]["kernel"], w1, rtol=1e-5)
    v2 = mom * v1 + scaled(w1, gw)
    np.testing.assert_allclose(u2["dense"]["kernel"], -lr * v2, rtol=1e-5)
    # Bias: no weight decay and no trust ratio -> plain momentum SGD.
    b, gb = np.asarray(params["dense"]["bias"]), np.asarray(g["dense"]["bias"])
    np.testing.assert_allclose(u1["dense"]["bias"], -lr * gb, rtol=1e-6)
    np.testing.assert_allclose(u2["dense"]["bias"], -lr * (mom * gb + gb), rtol=1e-6)
    del b


def test_lamb_matches_closed_form_first_step():
    params, g = _tree()
    lr, wd, eps = 0.1, 0.01, 1e-6
    tx = optim.lamb(lr, weight_decay=wd, eps=eps)
    u, _ = tx.update(g, tx.init(params), params)
    w, gw = np.asarray(params["head"]["kernel"]), np.asarray(g["head"]["kernel"])
    r = gw / (np.abs(gw) + eps)  # bias-corrected Adam moments at step 1: m = g, v = g^2
    d = r + wd * w
    want = -lr * np.linalg.norm(w) / np.linalg.norm(d) * d
    np.testing.assert_allclose(u["head"]["kernel"], want, rtol=1e-5)
    gb = np.asarray(g["dense"]["bias"])  # masked: no decay, no trust ratio
    np.testing.assert_allclose(u["dense"]["bias"], -lr * gb / (np.abs(gb) + eps), rtol=1e-5)


def test_decay_mask_excludes_vectors():
    params, _ = _tree()
    m = optim.decay_mask(params)
    assert m == {"dense": {"kernel": True, "bias": False}, "head": {"kernel": True}}


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_rules(rule, factor):
    cfg = tiny_config(batch_size=1024)
    cfg.optimizer.learning_rate = 0.1
    cfg.optimizer.base_batch_size = 256
    cfg.optimizer.lr_scaling = rule
    assert math.isclose(optim.scaled_learning_rate(cfg), 0.1 * factor)


def test_schedule_durations_warmup_cosine_step_and_regime_adaptation():
    cfg = tiny_config(batch_size=64)
    cfg.train_steps = -1
    cfg.train_epochs = 2.0
    n = optim.total_steps(cfg, num_train_examples=640)  # 10 steps/epoch
    assert n == 20
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.warmup_epochs = 0.5
    cfg.optimizer.learning_rate = 1.0
    s = optim.make_schedule(cfg, n, 640)
    assert float(s(0)) == 0.0 and math.isclose(float(s(5)), 1.0, rel_tol=1e-6)
    assert float(s(2)) == pytest.approx(0.4)
    assert float(s(20)) == pytest.approx(0.0, abs=1e-6)
    cfg.optimizer.schedule = "step"
    cfg.optimizer.warmup_epochs = -1.0
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.step_boundaries = (0.5,)
    s = optim.make_schedule(cfg, n, 640)
    assert float(s(9)) == pytest.approx(1.0) and float(s(10)) == pytest.approx(0.1)
    # Hoffer et al.: ceil(B / B_small) times more steps.
    cfg.optimizer.regime_adaptation = True
    cfg.optimizer.regime_base_batch_size = 16
    assert optim.total_steps(cfg, 640) == 80
    cfg.train_epochs = -1.0
    cfg.train_examples = 640
    cfg.optimizer.regime_adaptation = False
    assert optim.total_steps(cfg, 640) == 10
    cfg.train_steps = 5
    with pytest.raises(ValueError, match="exactly one"):
        optim.total_steps(cfg, 640)


def test_unknown_optimizer_is_a_clear_error():
    cfg = tiny_config()
    cfg.optimizer.name = "adagradx"
    with pytest.raises(ValueError, match="unknown optimizer 'adagradx'"):
        optim.make_optimizer(cfg, optax.constant_schedule(0.1))


def test_bn_only_freezes_everything_but_batchnorm():
    from jaxblocks.registry import create_model

    model = create_model("cnn_tiny", channels=(4,))
    v = model.init(jax.random.key(0), jnp.ones((2, 8, 8, 1)))
    params = nn.meta.unbox(v["params"])
    cfg = tiny_config("cnn_tiny")
    cfg.optimizer.freeze = "bn_only"
    tx = optim.make_optimizer(cfg, optax.constant_schedule(0.1), params=params)
    g = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(g, tx.init(params), params)
    assert float(jnp.abs(u["conv0"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(u["head"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(u["bn0"]["BatchNorm_0"]["scale"]).min()) > 0.0
    assert float(jnp.abs(u["bn0"]["BatchNorm_0"]["bias"]).min()) > 0.0
    init = optim.bn_only_init(params, jax.random.key(1), "uniform")
    s = np.asarray(init["bn0"]["BatchNorm_0"]["scale"])
    assert (s >= 0).all() and (s <= 1).all() and s.std() > 0


def test_agvm_multipliers_match_closed_form():
    params, g = _tree()
    rng = np.random.default_rng(1)
    g_a = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), jnp.float32), g)
    g_b = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), jnp.float32), g)
    labels = agvm.group_labels(params, ("dense", "head"))
    assert labels == {"dense": {"kernel": 0, "bias": 0}, "head": {"kernel": 1}}
    tx = agvm.agvm(optax.sgd(1.0), labels, 2, momentum=0.97, interval=2, start_step=0)
    st = tx.init(params)
    u, st = tx.update(g, st, params, half_grads=(g_a, g_b))

    def flat(t, keys):
        return np.concatenate([np.asarray(t[k1][k2]).ravel() for k1, k2 in keys])

    def d(keys):
        a, b = flat(g_a, keys), flat(g_b, keys)
        return 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    d0 = d([("dense", "kernel"), ("dense", "bias")])
    d1 = d([("head", "kernel")])
    mu = np.sqrt(np.clip((d0 + 1e-6) / (np.array([d0, d1]) + 1e-6), 0.5, 10.0))
    s = 0.97 + 0.03 * mu
    np.testing.assert_allclose(st.multipliers, s, rtol=1e-5)
    np.testing.assert_allclose(
        u["head"]["kernel"], -s[1] * np.asarray(g["head"]["kernel"]), rtol=1e-5
    )
    # Step 1 is not a refresh step (interval 2): multipliers stay, updates still scaled.
    u2, st2 = tx.update(g, st, params, half_grads=(g_b, g_b))
    np.testing.assert_allclose(st2.multipliers, s, rtol=1e-6)
    # A step without half-batch gradients only applies the multipliers.
    u3, st3 = tx.update(g, st2, params)
    np.testing.assert_allclose(
        u3["dense"]["bias"], -s[0] * np.asarray(g["dense"]["bias"]), rtol=1e-5
    )


def test_blocks4_switch_prunes_whole_1x4_blocks_of_output_channels():
    # sparse_mobilenet_digits's ``blocks4`` switch through `pruning_transform` (the smoke run of
    # that switch compiles MobileNetV2 again and is `slow`): after the schedule's end, a 1x1 conv
    # kernel matched by the config's pattern is pruned to the final level in whole 1x4 blocks of
    # output channels, and a depthwise kernel the pattern leaves out stays dense.
    from jaxblocks.compress import sparsity_of
    from jaxblocks.train import config as config_lib

    cfg = config_lib.load_config("sparse_mobilenet_digits", "blocks4")
    cfg.optimizer.pruning.frequency = 1  # as in its smoke mode: 40 steps, not 1,500
    num_steps = 40
    tx = optax.chain(optax.sgd(1e-2), optim.pruning_transform(cfg, num_steps))
    k = jax.random.split(jax.random.key(0), 2)
    params = {
        "features_3": {
            "project": {"kernel": jax.random.normal(k[0], (1, 1, 24, 32))},
            "depthwise": {"kernel": jax.random.normal(k[1], (3, 3, 1, 24))},
        }
    }
    state = tx.init(params)
    grad_fn = jax.grad(lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p)))

    @jax.jit
    def step(p, s):
        u, s = tx.update(grad_fn(p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(num_steps):
        params, state = step(params, state)
    kernel = np.asarray(params["features_3"]["project"]["kernel"])
    nonzero = (kernel != 0).reshape(24, 8, 4)
    assert np.all(nonzero.min(-1) == nonzero.max(-1)), "blocks of 4 output channels split"
    assert sparsity_of(kernel) == pytest.approx(cfg.optimizer.pruning.final, abs=1 / 192)
    assert sparsity_of(params["features_3"]["depthwise"]["kernel"]) == 0.0
