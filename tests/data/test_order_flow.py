"""Order-flow images, the simulated market, the GARCH baseline and the volatility CNNs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.data.order_flow import (
    _garch_variance,
    aggregate_features,
    fit_garch,
    garch_forecast,
    order_flow_dataset,
    order_flow_images,
    pack_features,
    realized_volatility,
    simulate_market,
)
from jaxblocks.registry import create_model
from jaxblocks.train.tasks import get_task


def test_market_has_volatility_clustering_and_volume_follows_volatility():
    m = simulate_market(40_000, seed=1)
    a = np.abs(m.returns)
    lag = np.corrcoef(a[:-10], a[10:])[0, 1]
    assert lag > 0.1  # |r| is autocorrelated: clusters
    counts = np.bincount(m.trade_step, minlength=len(m.returns))
    assert np.corrcoef(counts, m.sigma)[0, 1] > 0.3
    assert np.all(m.spread >= m.tick) and np.all(m.bid_depth > 0)


def test_images_account_for_every_trade_and_the_book():
    m = simulate_market(64 * 5, seed=2)
    img = order_flow_images(m, 64, time_bins=8, price_bins=12)
    assert img.shape == (5, 8, 12, 4) and img.dtype == np.float32
    assert np.all(img >= 0) and np.all(img <= 1)
    np.testing.assert_allclose(img.max(axis=(1, 2)), 1.0)  # every channel scaled to its max
    # un-normalised buy volume of interval 0 equals the sum of its buy trades
    raw = simulate_market(64 * 5, seed=2)
    first = (raw.trade_step < 64) & (raw.trade_side > 0)
    sizes = raw.trade_size[first]
    t0 = raw.trade_step[first] // 8
    per_bin = np.bincount(t0, sizes, minlength=8)
    scale = per_bin.max() / img[0, :, :, 0].sum(axis=1).max()  # the normalisation
    np.testing.assert_allclose(img[0, :, :, 0].sum(axis=1) * scale, per_bin, rtol=1e-5)


def test_dataset_targets_features_and_packing():
    d = order_flow_dataset(20, interval=32, time_bins=8, price_bins=8, seed=3)
    rv = realized_volatility(d["returns"], 32)
    np.testing.assert_allclose(d["target"], rv[1:21], rtol=1e-5)
    np.testing.assert_allclose(d["naive"], rv[:20], rtol=1e-5)
    np.testing.assert_allclose(np.exp(d["features"][:, 0]), d["naive"], rtol=1e-4)
    x = pack_features(d["images"], d["features"])
    assert x.shape == (20, 8, 8, 5)
    np.testing.assert_array_equal(x[:, 0, :5, 4], d["features"])
    assert not np.any(x[:, 1:, :, 4]) and not np.any(x[:, 0, 5:, 4])
    assert aggregate_features(simulate_market(64, seed=0), 32).shape == (2, 5)
    with pytest.raises(ValueError, match="do not fit"):
        pack_features(d["images"], np.ones((20, 9), np.float32))
    with pytest.raises(ValueError, match="multiple of time_bins"):
        order_flow_images(simulate_market(64), 30, time_bins=8)


def _simulate_garch(n, omega, alpha, beta, seed=0):
    rng = np.random.default_rng(seed)
    r = np.empty(n)
    s2 = omega / (1 - alpha - beta)
    for t in range(n):
        r[t] = np.sqrt(s2) * rng.standard_normal()
        s2 = omega + alpha * r[t] ** 2 + beta * s2
    return r


def test_garch_fit_recovers_parameters_and_the_filter_is_the_recursion():
    r = _simulate_garch(30_000, 0.05, 0.1, 0.85)
    omega, alpha, beta = fit_garch(r)
    assert abs(alpha - 0.1) < 0.03 and abs(beta - 0.85) < 0.04
    s2 = _garch_variance(r[:50] ** 2, 0.05, 0.1, 0.85)
    want = [float(np.mean(r[:50] ** 2))]
    for t in range(1, 50):
        want.append(0.05 + 0.1 * r[t - 1] ** 2 + 0.85 * want[-1])
    np.testing.assert_allclose(s2, want, rtol=1e-10)
    # the forecast's first term is the one-step-ahead variance; long horizons tend to ω/(1-α-β)
    f = garch_forecast(r[:64], 64, (0.05, 0.1, 0.85))
    nxt = 0.05 + 0.1 * r[63] ** 2 + 0.85 * _garch_variance(r[:64] ** 2, 0.05, 0.1, 0.85)[63]
    lr = 0.05 / 0.05
    np.testing.assert_allclose(f[0] ** 2, 64 * lr + (nxt - lr) * sum(0.95**h for h in range(64)))


def test_cnn_aggr_reads_the_packed_features_and_cnn_ignores_them():
    d = order_flow_dataset(4, interval=32, time_bins=8, price_bins=8, seed=4)
    x = jnp.asarray(pack_features(d["images"], d["features"]))
    x2 = x.at[:, 0, :5, 4].add(1.0)
    for name, differs in (("order_flow_cnn", False), ("order_flow_cnn_aggr", True)):
        model = create_model(name, widths=(4, 8, 8), hidden=8)
        v = model.init(jax.random.key(0), x)
        a, b = model.apply(v, x), model.apply(v, x2)
        assert a.shape == (4,)
        assert bool(jnp.any(a != b)) == differs, name
    with pytest.raises(ValueError, match="packed features"):
        create_model("order_flow_cnn_aggr").init(jax.random.key(0), x[..., :4])


def test_volatility_task_is_the_percentage_error():
    m = get_task("volatility").metrics(jnp.log(jnp.array([1.5, 1.0])), jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(m["mspe"], [0.25, 0.25], rtol=1e-6)
    np.testing.assert_allclose(m["ape"], [0.5, 0.5], rtol=1e-6)
