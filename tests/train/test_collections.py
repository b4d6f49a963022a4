"""Every non-parameter collection travels with the train state: PowerNorm (batch_stats plus its
backward-state collection ``power_norm_backward``) trained end to end by the loop, checkpointed
and restored; the model-call keyword rules of the single ConvBN mode key."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks import registry
from jaxblocks.layers import POWER_NORM_BACKWARD_COLLECTION, PowerNorm
from jaxblocks.train import loop
from jaxblocks.train import state as state_lib
from jaxblocks.train.checkpoint import Checkpointer
from tests.train.helpers import tiny_config, to_numpy

PN = POWER_NORM_BACKWARD_COLLECTION


class _PowerNormNet(nn.Module):
    """Pixels as tokens -> Dense -> PowerNorm -> mean over tokens -> classes."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        t = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, T, C]
        h = nn.Dense(8, name="proj")(t)
        h = PowerNorm(warmup_steps=0, group_num=None, name="pn")(h, use_running_average=not train)
        return nn.Dense(self.num_classes, name="head")(nn.relu(h).mean(1))


class _NoTrainArg(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.fixture
def powernorm_model(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "powernorm_probe", lambda **kw: _PowerNormNet(**kw))
    monkeypatch.setitem(registry._REGISTRY, "no_train_arg_probe", lambda **kw: _NoTrainArg(**kw))
    return "powernorm_probe"


def test_powernorm_trains_end_to_end_and_its_collections_checkpoint(tmp_path, powernorm_model):
    cfg = tiny_config(powernorm_model, train_steps=4, mesh={"data": -1})
    cfg.optimizer.learning_rate = 0.05
    devices = jax.devices()[:1]
    tr = loop.build(cfg, devices)
    assert tr.train_kwargs == {"train": True} and tr.eval_kwargs == {"train": False}
    with tr.mesh_context():
        fresh, sh, abstract = tr.create_state()
    assert set(fresh.collections) == {"batch_stats", PN}
    fresh = to_numpy(fresh)
    np.testing.assert_array_equal(fresh.collections[PN]["pn"]["nu"], 0.0)

    res = loop.train(cfg, str(tmp_path), devices=devices)
    assert res.final_step == 4
    assert all(np.isfinite(v) for v in res.train_losses.values())
    assert np.isfinite(res.eval_metrics["loss"])
    got = to_numpy(res.state)
    # ν is updated through the backward pass (its cotangent), ψ² and the step by the forward.
    nu = got.collections[PN]["pn"]["nu"]
    assert np.all(np.isfinite(nu)) and np.abs(nu).max() > 0
    assert int(got.batch_stats["pn"]["step"]) == 4
    assert got.batch_stats["pn"]["step"].dtype == np.int32
    assert not np.allclose(got.batch_stats["pn"]["psi2"], fresh.batch_stats["pn"]["psi2"])
    # ν is state, not a parameter: nothing of it is in the optimizer state.
    opt_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(got.opt_state)
    ]
    assert opt_paths and not any("'nu'" in p or PN in p for p in opt_paths)

    # The final checkpoint holds every collection and restores them exactly.
    ck = Checkpointer(os.path.join(str(tmp_path), "checkpoints"), 1, 2, async_save=False)
    try:
        restored, pos = ck.restore(state_lib.abstract_with_shardings(abstract, sh))
    finally:
        ck.close()
    assert pos["step"] == 4
    restored = to_numpy(restored)
    assert set(restored.collections) == {"batch_stats", PN}
    for a, b in zip(
        jax.tree.leaves(restored.collections), jax.tree.leaves(got.collections), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_powernorm_through_the_agvm_and_accumulation_steps(powernorm_model):
    # The AGVM step runs the two batch halves side by side: float state is averaged, the int32
    # step counter keeps its dtype; accumulation threads the state through the microbatches.
    cfg = tiny_config(powernorm_model, mesh={"data": 2}, accum_steps=2)
    cfg.agvm.enabled = True
    cfg.agvm.interval = 1
    tr = loop.build(cfg, jax.devices()[:2])
    with tr.mesh_context():
        state, sh, _ = tr.create_state()
        steps = loop.compile_steps(tr, sh)
        state, m = steps["agvm"](state, loop._global_batch(tr, 0))
        state, m2 = steps["default"](state, loop._global_batch(tr, 1))
    st = to_numpy(state)
    assert st.batch_stats["pn"]["step"].dtype == np.int32
    assert int(st.batch_stats["pn"]["step"]) == 2 + 2  # two microbatches per step
    assert np.abs(st.collections[PN]["pn"]["nu"]).max() > 0
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m2["loss"]))


def test_call_kwargs_follow_the_one_convbn_mode_key(powernorm_model):
    model = registry.create_model(powernorm_model)
    assert loop.call_kwargs(model, "", training=True) == {"train": True}
    assert loop.call_kwargs(model, "train", training=True) == {"train": True}
    assert loop.call_kwargs(model, "", training=False) == {"train": False}
    # A running-statistics mode: train=False defers to the convbn_mode context the loop enters.
    for mode in ("eval", "tune", "deploy"):
        assert loop.call_kwargs(model, mode, training=True) == {"train": False}
        assert loop.call_kwargs(model, mode, training=False) == {"train": False}
    # A model whose call takes no `train` gets nothing.
    other = registry.create_model("no_train_arg_probe")
    assert loop.call_kwargs(other, "", training=True) == {}


def test_tune_mode_resnet_training_keeps_running_statistics():
    # model.convbn_mode="tune": ConvBN layers run on their running statistics, which stay put;
    # the default "" trains with batch statistics and moves them.
    def stats_moved(mode):
        cfg = tiny_config("resnet18", mesh={"data": -1}, batch_size=8, eval_batch_size=8)
        cfg.model.kwargs = {"width": 4, "stem": "small", "stage_sizes": (1, 1)}
        cfg.model.convbn_mode = mode
        tr = loop.build(cfg, jax.devices()[:1])
        with tr.mesh_context():
            state, sh, _ = tr.create_state()
            before = to_numpy(state.batch_stats)
            step = loop.compile_steps(tr, sh)["default"]
            state, m = step(state, loop._global_batch(tr, 0))
        after = to_numpy(state.batch_stats)
        assert np.isfinite(float(m["loss"]))
        return any(
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        )

    assert stats_moved("")
    assert not stats_moved("tune")


def test_jnp_state_variables_merge_params_and_collections():
    st = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"a": jnp.ones(2)},
        collections={"batch_stats": {"m": jnp.zeros(2)}, PN: {"nu": jnp.ones(2)}},
        opt_state=(),
        rng=jnp.zeros(2, jnp.uint32),
    )
    assert set(st.variables) == {"params", "batch_stats", PN}
    assert st.batch_stats is st.collections["batch_stats"]
    assert state_lib.split_variables({"params": 1, "batch_stats": 2, "intermediates": 3}) == (
        1,
        {"batch_stats": 2},
    )
