"""Train-step variants: gradient accumulation == one big batch, ConAdv, AGVM, mixed precision."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.train import loop
from jaxblocks.train import step as step_lib
from tests.train.helpers import conadv_started, run_steps, tiny_config, to_numpy


def test_gradient_accumulation_equals_big_batch():
    base, s1 = run_steps(tiny_config("mlp_tiny", mesh={"data": 4, "fsdp": 2}), 2)
    acc, s4 = run_steps(tiny_config("mlp_tiny", mesh={"data": 4, "fsdp": 2}, accum_steps=4), 2)
    np.testing.assert_allclose(acc, base, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(to_numpy(s4.params)), jax.tree.leaves(to_numpy(s1.params)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mixed_precision_keeps_fp32_params_and_optimizer_state():
    cfg = tiny_config("mlp_tiny", mixed_precision=True)
    losses, st = run_steps(cfg, 2)
    assert all(np.isfinite(losses))
    assert {a.dtype for a in jax.tree.leaves(st.params)} == {jnp.dtype(jnp.float32)}
    assert all(
        a.dtype == jnp.float32
        for a in jax.tree.leaves(st.opt_state)
        if jnp.issubdtype(a.dtype, jnp.floating)
    )
    tr = loop.build(cfg)
    assert tr.model.dtype == jnp.bfloat16


def test_conadv_step_uses_stale_params_and_aux_batchnorm():
    cfg = tiny_config("cnn_tiny", mesh={"data": 8})
    cfg.model.kwargs = {"channels": (4, 8), "aux_bn": True}
    cfg.conadv.enabled = True
    cfg.conadv.epsilon = 0.05
    with conadv_started(cfg) as (tr, steps, state, b0):
        before = to_numpy(state)
        new, m = steps["conadv"](state, b0)
        new = to_numpy(new)
        # x_adv for the next batch: FGSM at the params *before* this update (stale for step 1).
        loss_fn = step_lib.make_loss_fn(tr.model, tr.train_kwargs)
        want = step_lib.fgsm(
            loss_fn,
            before.params,
            before.collections,
            b0["x_next"],
            b0["y_next"],
            jax.random.key(0),
            0.05,
        )
        np.testing.assert_allclose(new.x_adv, np.asarray(want), atol=1e-6)
        np.testing.assert_allclose(
            np.abs(new.x_adv - np.asarray(b0["x_next"])).max(), 0.05, rtol=1e-5
        )
    m = jax.device_get(m)
    assert np.isfinite(m["adv_loss"]) and m["adv_loss"] >= m["loss"] - 1.0
    # The auxiliary BatchNorm saw the adversarial batch.
    for name in ("bn0", "bn1"):
        assert not np.allclose(
            new.batch_stats[f"{name}_aux"]["BatchNorm_0"]["mean"],
            before.batch_stats[f"{name}_aux"]["BatchNorm_0"]["mean"],
        )


def test_agvm_step_runs_and_refreshes_multipliers():
    cfg = tiny_config("mlp_tiny", mesh={"data": 8}, train_steps=4)
    cfg.model.kwargs = {"hidden": (16, 16)}
    cfg.agvm.enabled = True
    cfg.agvm.interval = 2
    tr = loop.build(cfg)
    with tr.mesh_context():
        state, sh, _ = tr.create_state()
        steps = loop.compile_steps(tr, sh)
        state, _ = steps["agvm"](state, loop._global_batch(tr, 0))
        mult = np.asarray(jax.device_get(state.opt_state.multipliers))
        state, m = steps["default"](state, loop._global_batch(tr, 1))
    assert mult.shape == (3,) and mult[0] == np.float32(1.0)
    assert not np.allclose(mult[1:], 1.0)
    assert np.isfinite(float(m["loss"]))


def test_step_time_counts_one_step(tmp_path, monkeypatch):
    # Steps dispatch asynchronously: the median step time must time one step, not also the
    # unlogged steps still queued before a logged one (it read ~log_every x the step on a TGN).
    # Each train step gets matmuls well above its dispatch time, so unlogged steps queue.
    compile_steps = loop.compile_steps
    seen = {}

    def slow_steps(*args, **kwargs):
        def slow(f):
            @jax.jit
            def step(state, batch):
                state, m = f(state, batch)
                x = jnp.full((384, 384), 1e-3) + m["loss"] * 1e-9
                x = jax.lax.fori_loop(0, 40, lambda _, x: jnp.tanh(x @ x), x)
                return state, {**m, "loss": m["loss"] + 0.0 * x[0, 0]}

            def spy(state, batch):
                seen["args"] = (state, batch)
                return step(state, batch)

            seen["step"] = step
            return spy

        steps = compile_steps(*args, **kwargs)
        return {**steps, "default": slow(steps["default"])}

    monkeypatch.setattr(loop, "compile_steps", slow_steps)
    cfg = tiny_config("mlp_tiny", train_steps=16, log_every=5, checkpoint__every_steps=100)
    res = loop.train(cfg, str(tmp_path), devices=jax.devices()[:1])
    one = []  # the same step, run one at a time
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(seen["step"](*seen["args"]))
        one.append(time.perf_counter() - t0)
    assert res.timings["step_s"] < 2.0 * np.median(one), (res.timings, one)
