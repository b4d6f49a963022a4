"""Per-parameter-group learning rates and weight decay (``optimizer.param_groups``) against
hand-computed updates; clear errors; the long-conv config that uses them; AGVM's start step."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxblocks.train import config as config_lib
from jaxblocks.train import loop, optim
from tests.train.helpers import tiny_config

CONFIGS = os.path.join(os.path.dirname(config_lib.__file__), "..", "configs")


def _tree():
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    params = {"mixer0": {"kernel": r(2, 3)}, "dense": {"kernel": r(3, 2), "bias": r(2)}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    return params, grads


def _opt(cfg, params, num_steps=10, n_examples=320):
    schedule, groups = optim.make_schedules(cfg, num_steps, n_examples)
    return optim.make_optimizer(cfg, schedule, params=params, group_schedules=groups)


def _np(a):
    return np.asarray(a, np.float64)


def test_sgd_groups_match_hand_computed_updates():
    params, g = _tree()
    cfg = tiny_config()
    cfg.optimizer.name = "sgd"
    cfg.optimizer.momentum = 0.0
    cfg.optimizer.learning_rate = 0.5
    cfg.optimizer.weight_decay = 0.1
    cfg.optimizer.param_groups = ({"pattern": r"^mixer\d+/kernel$", "lr": 0.05, "weight_decay": 0},)
    tx = _opt(cfg, params)
    u, _ = tx.update(g, tx.init(params), params)
    w, gw = _np(params["mixer0"]["kernel"]), _np(g["mixer0"]["kernel"])
    np.testing.assert_allclose(u["mixer0"]["kernel"], -0.05 * gw, rtol=1e-6)
    w, gw = _np(params["dense"]["kernel"]), _np(g["dense"]["kernel"])
    np.testing.assert_allclose(u["dense"]["kernel"], -0.5 * (gw + 0.1 * w), rtol=1e-6)
    # Vectors never get decay (the decay mask), in or out of a group.
    np.testing.assert_allclose(u["dense"]["bias"], -0.5 * _np(g["dense"]["bias"]), rtol=1e-6)


def test_adamw_group_decay_only_and_first_match_wins():
    params, g = _tree()
    cfg = tiny_config()
    cfg.optimizer.name = "adamw"
    cfg.optimizer.learning_rate = 0.01
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.eps = 1e-6
    # Group 0 keeps the main lr and adds decay; group 1 would also match "dense/kernel" but
    # group 0 owns it; group 1 takes the bias.
    cfg.optimizer.param_groups = (
        {"pattern": "dense/kernel", "weight_decay": 0.5},
        {"pattern": "dense", "lr": 0.001},
    )
    tx = _opt(cfg, params)
    u, _ = tx.update(g, tx.init(params), params)

    def adam1(gr):  # first Adam step with bias correction: m̂ = g, v̂ = g²
        return gr / (np.abs(gr) + 1e-6)

    w, gw = _np(params["dense"]["kernel"]), _np(g["dense"]["kernel"])
    # atol: the Adam term (about ±1) and the decay term partly cancel in fp32.
    want = -0.01 * (adam1(gw) + 0.5 * w)
    np.testing.assert_allclose(u["dense"]["kernel"], want, rtol=1e-5, atol=1e-7)
    gb = _np(g["dense"]["bias"])
    np.testing.assert_allclose(u["dense"]["bias"], -0.001 * adam1(gb), rtol=1e-5)
    gm = _np(g["mixer0"]["kernel"])
    np.testing.assert_allclose(u["mixer0"]["kernel"], -0.01 * adam1(gm), rtol=1e-5)


def test_group_lr_follows_the_schedule_shape_and_scaling_rule():
    cfg = tiny_config(batch_size=512)
    cfg.optimizer.learning_rate = 0.1
    cfg.optimizer.base_batch_size = 128
    cfg.optimizer.lr_scaling = "linear"  # x4
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.warmup_steps = 2
    cfg.optimizer.param_groups = ({"pattern": "k", "lr": 0.01}, {"pattern": "b"})
    main, groups = optim.make_schedules(cfg, 10, 5120)
    assert groups[1] is None  # no "lr": the main schedule
    for s in (0, 1, 2, 5, 9):
        assert float(groups[0](s)) == pytest.approx(float(main(s)) * 0.1, rel=1e-5)
    assert float(groups[0](2)) == pytest.approx(0.04, rel=1e-5)


def test_param_group_errors_are_clear():
    params, _ = _tree()
    cfg = tiny_config()
    cfg.optimizer.param_groups = ({"pattern": "mixer"}, {"pattern": "nope"})
    with pytest.raises(ValueError, match=r"param_groups\[1\]: pattern 'nope' matches no param"):
        _opt(cfg, params)
    cfg.optimizer.param_groups = ({"pattern": "mixer"},)
    with pytest.raises(ValueError, match="needs the .abstract. params"):
        optim.make_optimizer(cfg, optax.constant_schedule(0.1))
    bad = [
        (({"pattern": "x", "lr": -1},), ValueError, r"param_groups\[0\]\['lr'\] must be"),
        (({"pattern": "x", "momentum": 0.5},), KeyError, "unknown keys .'momentum'."),
        (({"lr": 0.1},), TypeError, r"\['pattern'\] must be a non-empty regex"),
        (({"pattern": "("},), ValueError, "is not a valid regex"),
        (("x",), TypeError, "must be a dict"),
    ]
    for groups, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            config_lib.check_param_groups(groups)


def test_param_groups_from_the_command_line():
    cfg = config_lib.apply_overrides(
        config_lib.base_config(),
        ["optimizer.param_groups=({'pattern': 'head', 'lr': 0.5, 'weight_decay': 0.0},)"],
    )
    (g,) = cfg.optimizer.param_groups
    assert dict(g) == {"pattern": "head", "lr": 0.5, "weight_decay": 0.0}
    config_lib.validate(cfg)


def test_long_conv_config_gives_the_kernels_their_own_group(tmp_path):
    cfg = config_lib.load_config(os.path.join(CONFIGS, "char_lm.py"), "smoke,long_conv")
    cfg = config_lib.apply_overrides(cfg, ["progress=False", "plot=False", "tensorboard=False"])
    assert cfg.model.name == "long_conv_lm_tiny"
    tr = loop.build(cfg, jax.devices()[:1])
    params = jax.tree.map(lambda a: a, tr.boxed_variables["params"])
    labels = optim.param_group_labels(params, cfg.optimizer.param_groups)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in p): lab
        for p, lab in jax.tree_util.tree_leaves_with_path(labels)
    }
    assert {k for k, v in flat.items() if v == "group0"} == {"mixer0/kernel", "mixer1/kernel"}
    res = loop.train(cfg, str(tmp_path), devices=jax.devices()[:1])
    assert res.final_step == 3 and all(np.isfinite(v) for v in res.train_losses.values())


def test_agvm_starts_after_warmup_by_default():
    cfg = tiny_config()
    cfg.optimizer.warmup_steps = 3
    assert cfg.agvm.start_step == -1
    assert optim.agvm_start_step(cfg, 100, 640) == 3
    cfg.optimizer.regime_adaptation = True
    cfg.optimizer.regime_base_batch_size = 16  # factor ceil(32 / 16) = 2
    assert optim.agvm_start_step(cfg, 100, 640) == 6
    cfg.agvm.start_step = 0
    assert optim.agvm_start_step(cfg, 100, 640) == 0
    cfg.agvm.start_step = -2
    with pytest.raises(ValueError, match="agvm.start_step must be >= 0 or -1"):
        optim.agvm_start_step(cfg, 100, 640)


def test_agvm_multipliers_wait_for_the_warmup_in_the_loop():
    cfg = tiny_config("mlp_tiny", mesh={"data": 8}, train_steps=8)
    cfg.model.kwargs = {"hidden": (16, 16)}
    cfg.agvm.enabled = True
    cfg.agvm.interval = 1
    cfg.optimizer.warmup_steps = 2
    tr = loop.build(cfg)
    assert tr.agvm_start_step == 2
    with tr.mesh_context():
        state, sh, _ = tr.create_state()
        steps = loop.compile_steps(tr, sh)
        mults = []
        for s in range(3):
            state, _ = steps["agvm"](state, loop._global_batch(tr, s))
            mults.append(np.asarray(jax.device_get(state.opt_state.multipliers)))
    np.testing.assert_array_equal(mults[0], 1.0)  # warm-up: no refresh
    np.testing.assert_array_equal(mults[1], 1.0)
    assert not np.allclose(mults[2][1:], 1.0)  # step 2: the first refresh
