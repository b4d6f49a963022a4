"""The MST-compression regulariser as a trainer option and the report's statistics."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.compress import binarize, count_ops, mst_plan
from jaxblocks.train.regularizers import build_regularizer, mst_kernels
from jaxblocks.train.reports import mst_statistics
from tests.train.helpers import run_steps, tiny_config

BNN = {"num_classes": 10, "stem": 8, "widths": (16, 16), "strides": (1, 2)}


def _cfg(**over):
    cfg = tiny_config("bnn_small", **over)
    cfg.model.kwargs = dict(BNN)
    cfg.data.name = "digits"
    cfg.data.image_size = 8
    cfg.data.channels = 1
    cfg.optimizer.name = "adamw"
    cfg.optimizer.learning_rate = 1e-2
    return cfg


def test_penalty_is_added_logged_and_lowered_by_training():
    cfg = _cfg(regularizers__mst_weight=0.01, regularizers__mst_temperature=0.5)
    _, start = run_steps(cfg, 0)
    assert mst_kernels(cfg, start.params) == ["binary_0/kernel", "binary_1/kernel"]
    reg = build_regularizer(cfg)
    p0, m0 = reg(start.params)
    np.testing.assert_allclose(p0, 0.01 * m0["mst_distance"], rtol=1e-6)
    losses, state = run_steps(cfg, 10)
    p1, _ = reg(state.params)
    assert float(p1) < float(p0)
    assert np.all(np.isfinite(losses))


def test_both_penalties_compose_and_off_is_none():
    assert build_regularizer(_cfg()) is None
    cfg = _cfg(regularizers__mst_weight=1.0)
    with pytest.raises(ValueError, match="mst_include=.*matches no kernel"):
        mst_kernels(cfg, {"dense": {"w": jnp.ones((3, 4))}})
    with pytest.raises(ValueError, match="mst_weight must be >= 0"):
        build_regularizer(_cfg(regularizers__mst_weight=-1.0))
    with pytest.raises(ValueError, match="mst_temperature must be > 0"):
        build_regularizer(_cfg(regularizers__mst_weight=1.0, regularizers__mst_temperature=0.0))


def test_statistics_match_the_planner():
    cfg = _cfg(regularizers__mst_weight=1.0)
    _, state = run_steps(cfg, 2)
    st = mst_statistics(cfg, state.params)
    dense = mst = length = 0
    for name in ("binary_0", "binary_1"):
        bk = np.asarray(binarize(state.params[name]["kernel"]))
        bk = bk.reshape(-1, bk.shape[-1])
        plan = mst_plan(bk)
        ops = count_ops(bk, plan)
        dense, mst, length = dense + ops["dense"], mst + ops["mst"], length + plan.total_distance
    assert st["ops_dense"] == dense and st["ops_mst"] == mst and st["mst_length"] == length
    assert st["ops_dense"] == 3 * 3 * 8 * 16 + 3 * 3 * 16 * 16  # n·cout per layer
    assert 0 < st["ops_ratio"] and st["mst_depth"] >= 1
