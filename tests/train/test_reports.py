"""Reports that retrain a finished run (`jaxblocks.train.reports`), with the training stubbed:
which runs they start and what they tabulate."""

import types

import jax.numpy as jnp
import pytest

from jaxblocks.configs import sparse_rnn_reber
from jaxblocks.train import loop, reports


def _result(sparsity: float, accuracy: float):
    """A finished run whose pruned kernel has the given fraction of zeros (of 20 entries)."""
    n_zero = round(20 * sparsity)
    kernel = jnp.concatenate([jnp.zeros(n_zero), jnp.ones(20 - n_zero)]).reshape(4, 5)
    state = types.SimpleNamespace(params={"rnn_0": {"kernel": kernel}, "head": jnp.ones(3)})
    return types.SimpleNamespace(state=state, eval_metrics={"accuracy": accuracy, "loss": 1.0})


def test_pruning_sweep_reuses_the_finished_run_at_the_configured_sparsity(monkeypatch, tmp_path):
    cfg = sparse_rnn_reber.get_config()
    cfg.optimizer.pruning.final = 0.9
    cfg.optimizer.pruning.sweep = (0.0, 0.5, 0.9)
    started = []

    def fake_train(c, workdir, description=""):
        level = float(c.optimizer.pruning.final)
        started.append((level, workdir))
        return _result(level, accuracy=1.0 - level / 10)

    monkeypatch.setattr(loop, "train", fake_train)
    table = reports.pruning_sweep(cfg, str(tmp_path), [("", _result(0.9, accuracy=0.5))])
    # 0.9 is the finished run: only 0.0 and 0.5 are retrained, each in its own directory
    assert [lv for lv, _ in started] == [0.0, 0.5]
    assert started[1][1] == str(tmp_path / "sparsity_0.5")
    rows = table.splitlines()[2:]
    assert rows == [
        "| 0.00 | 0.000 | 1.0000 | 1.0000 |",
        "| 0.50 | 0.500 | 0.9500 | 1.0000 |",
        "| 0.90 | 0.900 | 0.5000 | 1.0000 |",  # the finished run's accuracy, not a retrain's
    ]
    with pytest.raises(ValueError, match="needs a finished run"):
        reports.pruning_sweep(cfg, str(tmp_path), [])
