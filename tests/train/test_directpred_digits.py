"""DirectPred on digits (paper 36) through the trainer: the ``self_supervised`` task, the
train step returning the EMA target and DirectPred state updated, and the config's smoke run
through the CLI with its ``linear_probe`` report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.directpred import DIRECTPRED_COLLECTION
from jaxblocks.models.byol import BYOL, TARGET_COLLECTION
from jaxblocks.train import cli
from jaxblocks.train import step as step_lib
from jaxblocks.train.tasks import get_task


def test_self_supervised_task_scores_the_model_loss():
    task = get_task("self_supervised")
    loss = jnp.array([0.0, 1.0, 4.0])
    m = task.metrics(loss, jnp.zeros(3, jnp.int32))
    np.testing.assert_allclose(m["loss"], loss)
    np.testing.assert_allclose(m["cosine"], [1.0, 0.5, -1.0])
    assert task.main_metric == "cosine" and task.higher_is_better
    with pytest.raises(ValueError, match=r"per-example loss \[B\], got shape \(3, 2\)"):
        task.metrics(jnp.ones((3, 2)), jnp.zeros(3))


def test_train_loss_fn_returns_updated_target_and_predictor_state():
    model = BYOL(encoder="mlp_tiny", encoder_kwargs={"hidden": (16,)}, feature_dim=8,
                 projection_hidden=16, projection_dim=6)  # fmt: skip
    x = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1))
    v = model.init(jax.random.key(1), x)
    params, coll = v["params"], {k: a for k, a in v.items() if k != "params"}
    loss_fn = step_lib.make_loss_fn(model, {"train": True}, task="self_supervised")
    grads, new, metrics = step_lib.grad_and_update(
        loss_fn, params, coll, x, jnp.zeros(8, jnp.int32), jax.random.key(2)
    )
    assert int(new[TARGET_COLLECTION]["step"]) == 1
    assert int(new[DIRECTPRED_COLLECTION]["predictor"]["step"]) == 1
    assert not np.allclose(new[DIRECTPRED_COLLECTION]["predictor"]["wp"],
                           coll[DIRECTPRED_COLLECTION]["predictor"]["wp"])  # fmt: skip
    assert 0.0 <= float(metrics["loss"]) <= 4.0
    assert float(metrics["cosine"]) == pytest.approx(1 - float(metrics["loss"]) / 2, abs=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


# tests/train/test_configs_smoke.py runs the same smoke config and its report through
# `loop.run` in the fast suite; this one also checks the CLI and the table (~25 s of CPU).
@pytest.mark.slow
def test_directpred_digits_smoke_cli_with_linear_probe(tmp_path, capsys):
    rc = cli.main(["--config", "directpred_digits:smoke", "--workdir", str(tmp_path),
                   "progress=False", "plot=False", "tensorboard=False"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "test cosine" in out and "linear-probe test accuracy" in out
    table = (tmp_path / "linear_probe.md").read_text().splitlines()
    rows = {ln.split("|")[1].strip(): ln for ln in table[2:]}
    assert len(rows) == 4, table
    assert "raw pixels" in rows and "cnn_tiny, untrained" in rows
    assert "| directpred |" in rows["cnn_tiny, as configured (2 steps)"]
    assert "| linear |" in rows["cnn_tiny, learned linear predictor (2 steps)"]
    for ln in rows.values():
        acc = float(ln.rstrip(" |").split("|")[-1])
        assert 0.0 <= acc <= 1.0
    assert (tmp_path / "variant_0" / "checkpoints" / "2").is_dir()
