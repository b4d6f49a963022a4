"""TS-LSTM / Temporal-Inception heads, the frame classifier and the action clips they learn."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.temporal_heads import (
    TemporalAvgPoolHead,
    TemporalInceptionHead,
    TSLSTMHead,
    temporal_segments,
)
from jaxblocks.data.action_clips import ACTIONS, action_clips
from jaxblocks.layers.recurrent import LSTM
from jaxblocks.registry import create_model


@pytest.mark.parametrize(("t", "s"), [(8, 3), (7, 7), (5, 1), (9, 4)])
def test_temporal_segments_against_numpy(t, s):
    x = np.random.default_rng(0).standard_normal((2, t, 5)).astype(np.float32)
    want = np.stack([c.mean(1) for c in np.array_split(x, s, axis=1)], axis=1)
    np.testing.assert_allclose(temporal_segments(jnp.asarray(x), s), want, rtol=1e-6, atol=1e-6)


def test_heads_see_order_and_the_baseline_does_not():
    x = jax.random.normal(jax.random.key(0), (3, 8, 12))
    rev = x[:, ::-1]
    for head in (TSLSTMHead(6, num_segments=3, hidden=8), TemporalInceptionHead(6, widths=(4,))):
        y, v = head.init_with_output(jax.random.key(1), x)
        assert y.shape == (3, 6) and np.all(np.isfinite(y))
        assert float(jnp.max(jnp.abs(head.apply(v, rev) - y))) > 1e-4, type(head).__name__
    base = TemporalAvgPoolHead(6)
    y, v = base.init_with_output(jax.random.key(1), x)
    np.testing.assert_allclose(base.apply(v, rev), y, rtol=1e-5, atol=1e-6)


def test_ts_lstm_is_an_lstm_over_segment_means():
    x = jax.random.normal(jax.random.key(2), (2, 9, 6))
    head = TSLSTMHead(4, num_segments=3, hidden=5)
    v = head.init(jax.random.key(3), x)
    p = v["params"]
    # the same computation written out: segment means -> the head's LSTM -> mean -> Dense
    seg = temporal_segments(x, 3)
    h, _ = LSTM(features=5).apply({"params": p["lstm"]}, seg)
    want = h.mean(1) @ p["classifier"]["kernel"] + p["classifier"]["bias"][None]
    np.testing.assert_allclose(head.apply(v, x), want, rtol=1e-5, atol=1e-6)
    # frames inside a segment are averaged: permuting within segments changes nothing
    perm = jnp.array([2, 0, 1, 4, 5, 3, 8, 6, 7])
    np.testing.assert_allclose(head.apply(v, x[:, perm]), head.apply(v, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2, 7])
def test_temporal_inception_any_length(t):
    x = jax.random.normal(jax.random.key(4), (2, t, 6))
    y, _ = TemporalInceptionHead(3, widths=(4, 4), kernels=(3, 5)).init_with_output(
        jax.random.key(5), x
    )
    assert y.shape == (2, 3) and np.all(np.isfinite(y))


def test_errors():
    with pytest.raises(ValueError, match=r"x must be per-frame features \[B, T, F\]"):
        TSLSTMHead(3).init(jax.random.key(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"num_segments=5 must be in \[1, T=4\]"):
        temporal_segments(jnp.ones((1, 4, 2)), 5)
    with pytest.raises(ValueError, match=r"no frames"):
        TemporalAvgPoolHead(3).init(jax.random.key(0), jnp.ones((2, 0, 4)))
    with pytest.raises(ValueError, match="kernels must be >= 1"):
        TemporalInceptionHead(3, kernels=(0,)).init(jax.random.key(0), jnp.ones((2, 4, 3)))
    model = create_model("ts_lstm_clips")
    with pytest.raises(ValueError, match=r"x must be \[B, T, H, W, C\] clips"):
        model.init(jax.random.key(0), jnp.ones((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="head='gru'; expected one of"):
        create_model("ts_lstm_clips", head="gru").init(jax.random.key(0), jnp.ones((1, 2, 8, 8, 1)))


def test_frame_classifier_runs_the_backbone_per_frame():
    x = jax.random.normal(jax.random.key(6), (2, 5, 12, 12, 1))
    model = create_model("avg_pool_clips", backbone_kwargs={"channels": (4, 8)}, features=7)
    v = nn.unbox(model.init(jax.random.key(7), x))
    # frame features from the backbone alone, mean over frames, the head's Dense
    net = create_model("cnn_tiny", num_classes=7, channels=(4, 8))
    bb = {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}
    f = net.apply(bb, x.reshape(10, 12, 12, 1)).reshape(2, 5, 7)
    hp = v["params"]["head"]["classifier"]
    want = f.mean(1) @ hp["kernel"] + hp["bias"][None]
    np.testing.assert_allclose(model.apply(v, x), want, rtol=1e-5, atol=1e-5)
    # train=True reaches the backbone's BatchNorm (its statistics move)
    _, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved))


def test_action_clips_are_time_reversed_pairs():
    x, y = action_clips(60, frames=8, size=16, seed=3)
    assert x.shape == (60, 8, 16, 16, 1) and x.dtype == np.float32 and set(y) <= set(range(6))
    # the blob is the brightest structure: its centroid moves as the label says
    w = np.clip(x[..., 0] - 0.6, 0, None)
    yy, xx = np.mgrid[:16, :16]
    mass = w.sum((2, 3)) + 1e-6
    cy, cx = (w * yy).sum((2, 3)) / mass, (w * xx).sum((2, 3)) / mass
    area = (w > 0).sum((2, 3))
    for i, label in enumerate(y):
        dx, dy = cx[i, -1] - cx[i, 0], cy[i, -1] - cy[i, 0]
        da = int(area[i, -1]) - int(area[i, 0])
        name = ACTIONS[label]
        want = {"right": dx > 3, "left": dx < -3, "down": dy > 3, "up": dy < -3,
                "grow": da > 0, "shrink": da < 0}[name]  # fmt: skip
        assert want, (name, dx, dy, da)
    with pytest.raises(ValueError, match="frames >= 2"):
        action_clips(2, frames=1)
