"""AGVM with Adam-preconditioned half gradients (the official rule with Adam) against closed forms
computed in numpy, the config resolver and the trainer wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxblocks.train import agvm, loop
from jaxblocks.train import config as config_lib
from tests.train.helpers import tiny_config

GROUPS = ("backbone", "head")


def _np(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _expected_d(g_a, g_b, labels, nu=None, b2=0.999, eps=1e-8):
    """``D_i = 1 − cos`` per group in float64, of the raw or (with ``nu``) preconditioned halves."""
    a, b, lab = _np(g_a), _np(g_b), jax.tree.leaves(labels)
    if nu is not None:
        a = [x / (np.sqrt(b2 * v + (1 - b2) * x**2) + eps) for x, v in zip(a, nu, strict=True)]
        b = [x / (np.sqrt(b2 * v + (1 - b2) * x**2) + eps) for x, v in zip(b, nu, strict=True)]
    d = []
    for i in range(len(GROUPS)):
        fa = np.concatenate([x.ravel() for x, li in zip(a, lab, strict=True) if li == i])
        fb = np.concatenate([x.ravel() for x, li in zip(b, lab, strict=True) if li == i])
        d.append(1 - fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb)))
    return np.array(d)


def _mu(d):
    return np.sqrt(np.clip((d[0] + 1e-6) / (d + 1e-6), 0.5, 10.0))


def _random_tree(rng, shapes):
    return {
        k: {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in v.items()}
        for k, v in shapes.items()
    }


def test_adam_precondition_matches_closed_form_and_optax_nu():
    shapes = {"backbone": {"kernel": (3, 4), "bias": (4,)}, "head": {"kernel": (4, 2)}}
    rng = np.random.default_rng(0)
    params = _random_tree(rng, shapes)
    labels = agvm.group_labels(params, GROUPS)
    b2, eps, m = 0.95, 1e-8, 0.8
    tx = agvm.agvm(
        optax.adam(1e-3, b2=b2, eps=eps),
        labels,
        2,
        momentum=m,
        interval=1,
        precondition="adam",
        b2=b2,
        eps=eps,
    )
    ref = optax.adam(1e-3, b2=b2, eps=eps)
    st, ref_st = tx.init(params), ref.init(params)
    nu = [np.zeros(x.shape) for x in _np(params)]
    s = np.ones(2)
    for _ in range(3):
        g_a = _random_tree(rng, shapes)
        g_b = jax.tree.map(lambda x, y: 0.5 * x + y, g_a, _random_tree(rng, shapes))
        g = jax.tree.map(lambda x, y: (x + y) / 2, g_a, g_b)
        u, st = tx.update(g, st, params, half_grads=(g_a, g_b))
        u_ref, ref_st = ref.update(g, ref_st, params)
        # The statistic uses ν from before this step's update; then ν takes this step's gradient.
        s = m * s + (1 - m) * _mu(_expected_d(g_a, g_b, labels, nu, b2, eps))
        nu = [b2 * v + (1 - b2) * x**2 for v, x in zip(nu, _np(g), strict=True)]
        np.testing.assert_allclose(st.multipliers, s, rtol=1e-5)
        for a, b in zip(_np(st.nu), nu, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5)
        # ν is optax.adam's own second moment (no bias correction).
        adam_nu = next(x for x in ref_st if isinstance(x, optax.ScaleByAdamState)).nu
        for a, b in zip(jax.tree.leaves(st.nu), jax.tree.leaves(adam_nu), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
        # The applied update is Adam's scaled by the group's multiplier.
        for a, b, lab in zip(
            jax.tree.leaves(u), jax.tree.leaves(u_ref), jax.tree.leaves(labels), strict=True
        ):
            np.testing.assert_allclose(a, s[lab] * np.asarray(b), rtol=1e-5)
    assert not np.allclose(s, 1.0)


def test_precondition_changes_the_multipliers():
    # Raw cosines are equal (97/103) in both groups: the backbone's by one huge coordinate that
    # dominates the dot product while the other three disagree in sign; the head's with one
    # small disagreeing coordinate. After preconditioning the disagreeing coordinates count as
    # much as the huge one, so the backbone's D grows far more than the head's.
    params = {"backbone": {"a": jnp.zeros(2), "b": jnp.zeros(2)}, "head": {"w": jnp.zeros(4)}}
    labels = agvm.group_labels(params, GROUPS)
    f32 = lambda *x: jnp.asarray(x, jnp.float32)  # noqa: E731
    g_a = {"backbone": {"a": f32(10, 1), "b": f32(1, 1)}, "head": {"w": f32(1, 1, 1, -0.3)}}
    g_b = {"backbone": {"a": f32(10, -1), "b": f32(-1, -1)}, "head": {"w": f32(1, 1, 1, 0.3)}}
    g = jax.tree.map(lambda x, y: (x + y) / 2, g_a, g_b)
    np.testing.assert_allclose(_expected_d(g_a, g_b, labels), [6 / 103, 6 / 103], rtol=1e-6)
    m, b2, eps = 0.5, 0.999, 1e-8
    out = {}
    for pre in ("none", "adam"):
        tx = agvm.agvm(optax.adam(1e-3), labels, 2, momentum=m, interval=1, precondition=pre)
        st = tx.init(params)
        _, st = tx.update(g, st, params)  # step 0: no statistic; ν takes g
        _, st = tx.update(g, st, params, half_grads=(g_a, g_b))  # step 1 refreshes
        out[pre] = np.asarray(st.multipliers)
    nu = [(1 - b2) * x**2 for x in _np(g)]
    np.testing.assert_allclose(
        out["none"], m + (1 - m) * _mu(_expected_d(g_a, g_b, labels)), rtol=1e-5
    )
    np.testing.assert_allclose(out["none"], [1.0, 1.0], rtol=1e-5)
    d_adam = _expected_d(g_a, g_b, labels, nu, b2, eps)
    assert d_adam[0] > 2 * d_adam[1] > 0.5
    np.testing.assert_allclose(out["adam"], m + (1 - m) * _mu(d_adam), rtol=1e-5)
    assert out["adam"][1] > out["none"][1] + 0.1


def test_none_keeps_no_second_moment():
    params = {"backbone": jnp.ones((3,), jnp.bfloat16), "head": jnp.ones((2,))}
    labels = agvm.group_labels(params, GROUPS)
    inner = optax.adam(1e-3)
    st = agvm.agvm(inner, labels, 2).init(params)
    assert st.nu is None
    assert len(jax.tree.leaves(st)) == len(jax.tree.leaves(inner.init(params))) + 2
    st = agvm.agvm(inner, labels, 2, precondition="adam").init(params)
    assert jax.tree.structure(st.nu) == jax.tree.structure(params)
    assert {x.dtype for x in jax.tree.leaves(st.nu)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"precondition": "rmsprop"}, "precondition"),
        ({"precondition": "adam", "b2": 1.0}, "b2"),
        ({"precondition": "adam", "b2": -0.1}, "b2"),
        ({"precondition": "adam", "eps": 0.0}, "eps"),
        ({"precondition": "adam", "eps": -1e-8}, "eps"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    labels = {"backbone": 0, "head": 1}
    with pytest.raises(ValueError, match=name):
        agvm.agvm(optax.adam(1e-3), labels, 2, **kwargs)


@pytest.mark.parametrize(
    "optimizer, precondition, want",
    [
        ("adamw", "auto", "adam"),
        ("lamb", "auto", "adam"),
        ("sgd", "auto", "none"),
        ("lars", "auto", "none"),
        ("adamw", "none", "none"),
        ("sgd", "adam", "adam"),
    ],
)
def test_resolve_precondition(optimizer, precondition, want):
    cfg = config_lib.base_config()
    cfg.optimizer.name = optimizer
    cfg.agvm.precondition = precondition
    assert agvm.resolve_precondition(cfg) == want


def test_resolve_precondition_rejects_unknown():
    cfg = config_lib.base_config()
    cfg.agvm.precondition = "sgd"
    with pytest.raises(ValueError, match="precondition"):
        agvm.resolve_precondition(cfg)


def _adam_nu(opt_state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)).nu


def _agvm_config(optimizer):
    cfg = tiny_config("mlp_tiny", mesh={"data": 8})
    cfg.model.kwargs = {"hidden": (16, 16)}
    cfg.optimizer.name = optimizer
    cfg.optimizer.b2 = 0.9
    cfg.agvm.enabled = True
    cfg.agvm.interval = 1
    return cfg


def test_trainer_without_adam_keeps_no_second_moment():
    tr = loop.build(_agvm_config("sgd"))
    st = jax.eval_shape(tr.init_fn, jax.random.key_data(jax.random.key(0)))
    assert st.opt_state.nu is None


def test_trainer_step_preconditions_with_the_optimizers_second_moment():
    tr = loop.build(_agvm_config("adamw"))
    with tr.mesh_context():
        state, sh, _ = tr.create_state()
        steps = loop.compile_steps(tr, sh)
        state, _ = steps["agvm"](state, loop._global_batch(tr, 0))
        state, m = steps["agvm"](state, loop._global_batch(tr, 1))
    opt = jax.device_get(state.opt_state)
    # AGVM's ν follows the configured b2 (0.9, not the 0.999 default) like adamw's own.
    for a, b in zip(jax.tree.leaves(opt.nu), jax.tree.leaves(_adam_nu(opt.inner)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)
    assert np.isfinite(float(m["loss"])) and np.isfinite(opt.multipliers).all()
    assert not np.allclose(opt.multipliers[1:], 1.0)
