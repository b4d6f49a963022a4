"""Order-flow images from a simulated market (Lensky & Hao, arXiv 2304.02472), generated here.

The paper turns one fixed interval of Bitcoin order flow (trade sizes and directions, limit
order book levels) into an image, one data type per colour channel on a time × price grid, and
predicts the next interval's realized volatility with a small CNN. Nothing can be downloaded
here, so `simulate_market` generates the order flow from a stochastic-volatility market:

* log mid-price returns ``r_t = σ_t ε_t`` per step, with ``log σ_t`` an AR(1) process around
  ``log σ̄`` (volatility clusters and mean-reverts; Student-t ε for fat tails);
* trades per step ~ Poisson(λ·σ_t/σ̄) (volume rises with volatility), each at the mid ± half the
  spread, its side agreeing with the step's return with probability 0.7, its size log-normal;
* the book: ``levels`` price levels per side one tick apart from the best quote, the spread
  proportional to σ_t, depths log-normal and thinner when σ_t is high.

`order_flow_images` rasterises every interval into ``[time_bins, price_bins, 4]``: buy volume,
sell volume, bid depth, ask depth, the price axis in ticks around the interval's opening mid,
each channel divided by its largest value in the interval (the paper scales to 0–255). The
target is the next interval's realized volatility ``sqrt(Σ r_t²)``; `aggregate_features` gives
the paper's hand-crafted supplement (current realized volatility, volume, order imbalance,
spread, book depth), and the naive forecast is the current interval's realized volatility.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "Market",
    "NUM_FEATURES",
    "aggregate_features",
    "fit_garch",
    "garch_forecast",
    "pack_features",
    "order_flow_dataset",
    "order_flow_images",
    "realized_volatility",
    "simulate_market",
]

CHANNELS = ("buy volume", "sell volume", "bid depth", "ask depth")
NUM_FEATURES = 5


@dataclasses.dataclass(frozen=True)
class Market:
    """A simulated market, ``n_steps`` steps.

    Attributes:
      returns: ``[n_steps]`` log mid-price returns.
      mid: ``[n_steps + 1]`` log mid price (starts at 0).
      sigma: ``[n_steps]`` the latent volatility of each step.
      trade_step, trade_price, trade_size, trade_side: per trade (side +1 buy, −1 sell; price as
        a log price).
      spread: ``[n_steps]`` quoted spread (log price units).
      bid_depth, ask_depth: ``[n_steps, levels]`` depth at each level from the best quote.
      tick: the tick size (log price units).
    """

    returns: np.ndarray
    mid: np.ndarray
    sigma: np.ndarray
    trade_step: np.ndarray
    trade_price: np.ndarray
    trade_size: np.ndarray
    trade_side: np.ndarray
    spread: np.ndarray
    bid_depth: np.ndarray
    ask_depth: np.ndarray
    tick: float


def simulate_market(
    n_steps: int,
    *,
    seed: int = 0,
    sigma_bar: float = 1e-3,
    persistence: float = 0.995,
    vol_of_vol: float = 0.08,
    trades_per_step: float = 3.0,
    levels: int = 10,
) -> Market:
    """Generate ``n_steps`` steps of order flow (see the module docstring for the model)."""
    if n_steps < 2 or levels < 1 or not 0 <= persistence < 1:
        raise ValueError(f"simulate_market: need n_steps >= 2, levels >= 1, 0 <= persistence < 1; "
                         f"got {n_steps}, {levels}, {persistence}")  # fmt: skip
    rng = np.random.default_rng(seed)
    h = np.empty(n_steps)  # log σ_t − log σ̄
    h[0] = rng.normal(0, vol_of_vol / np.sqrt(1 - persistence**2))
    shocks = rng.normal(0, vol_of_vol, n_steps)
    for t in range(1, n_steps):
        h[t] = persistence * h[t - 1] + shocks[t]
    sigma = sigma_bar * np.exp(h)
    eps = rng.standard_t(5, n_steps) / np.sqrt(5 / 3)  # unit variance, fat tails
    returns = sigma * eps
    mid = np.concatenate([[0.0], np.cumsum(returns)])
    tick = sigma_bar / 4
    spread = tick * np.maximum(1.0, np.round(2 * sigma / sigma_bar))
    counts = rng.poisson(trades_per_step * sigma / sigma_bar)
    trade_step = np.repeat(np.arange(n_steps), counts)
    agree = rng.random(len(trade_step)) < 0.7
    direction = np.sign(returns[trade_step]) + (returns[trade_step] == 0)
    side = np.where(agree, direction, -direction)
    price = mid[trade_step + 1] + side * spread[trade_step] / 2
    size = rng.lognormal(0.0, 1.0, len(trade_step))
    thin = (sigma_bar / sigma)[:, None]  # [n_steps, 1]: thinner books when volatile
    lv = np.arange(1, levels + 1)[None, :]
    bid = rng.lognormal(0.0, 0.5, (n_steps, levels)) * thin * np.sqrt(lv)
    ask = rng.lognormal(0.0, 0.5, (n_steps, levels)) * thin * np.sqrt(lv)
    return Market(returns, mid, sigma, trade_step, price, size, side, spread, bid, ask, tick)


def realized_volatility(returns: np.ndarray, interval: int) -> np.ndarray:
    """``sqrt(Σ r_t²)`` over consecutive intervals of ``interval`` steps (a partial tail is
    dropped): ``[n_steps // interval]``."""
    n = len(returns) // interval
    return np.sqrt(np.sum(returns[: n * interval].reshape(n, interval) ** 2, axis=1))


def order_flow_images(
    m: Market, interval: int, *, time_bins: int = 16, price_bins: int = 16
) -> np.ndarray:
    """``[n_intervals, time_bins, price_bins, 4]`` float32 images (channels `CHANNELS`).

    Rows are time bins of the interval, columns price bins of one tick each centred on the
    interval's opening mid (prices beyond the grid land in the edge bins). Trades add their size
    to the buy or sell channel at (time, price); the book adds each level's depth at its price,
    averaged over the steps of the time bin. Each channel is divided by its maximum in the
    interval (all-zero channels stay zero).
    """
    if interval < time_bins or interval % time_bins:
        raise ValueError(f"order_flow_images: interval={interval} must be a positive multiple "
                         f"of time_bins={time_bins}")  # fmt: skip
    n = len(m.returns) // interval
    half = price_bins // 2
    img = np.zeros((n, time_bins, price_bins, 4), np.float32)
    per_bin = interval // time_bins

    def col(price, base):
        return np.clip(np.round((price - base) / m.tick).astype(np.int64) + half, 0,
                       price_bins - 1)  # fmt: skip

    keep = m.trade_step < n * interval
    ts = m.trade_step[keep]
    iv, tb = ts // interval, (ts % interval) // per_bin
    c = col(m.trade_price[keep], m.mid[iv * interval])
    ch = np.where(m.trade_side[keep] > 0, 0, 1)
    np.add.at(img, (iv, tb, c, ch), m.trade_size[keep])
    steps = np.arange(n * interval)
    iv, tb = steps // interval, (steps % interval) // per_bin
    base = m.mid[iv * interval]
    best_bid = m.mid[steps + 1] - m.spread[steps] / 2
    best_ask = m.mid[steps + 1] + m.spread[steps] / 2
    for lvl in range(m.bid_depth.shape[1]):
        np.add.at(img, (iv, tb, col(best_bid - lvl * m.tick, base), 2),
                  m.bid_depth[steps, lvl] / per_bin)  # fmt: skip
        np.add.at(img, (iv, tb, col(best_ask + lvl * m.tick, base), 3),
                  m.ask_depth[steps, lvl] / per_bin)  # fmt: skip
    peak = img.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, img / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def aggregate_features(m: Market, interval: int) -> np.ndarray:
    """``[n_intervals, 5]`` hand-crafted features per interval: log realized volatility, log
    traded volume, order imbalance (buy − sell)/(buy + sell), mean spread in ticks, log mean
    book depth."""
    n = len(m.returns) // interval
    rv = realized_volatility(m.returns, interval)
    keep = m.trade_step < n * interval
    iv = m.trade_step[keep] // interval
    buy = np.bincount(iv, m.trade_size[keep] * (m.trade_side[keep] > 0), minlength=n)
    sell = np.bincount(iv, m.trade_size[keep] * (m.trade_side[keep] < 0), minlength=n)
    spread = m.spread[: n * interval].reshape(n, interval).mean(1) / m.tick
    depth = (m.bid_depth + m.ask_depth)[: n * interval].reshape(n, interval, -1).mean((1, 2))
    feats = [np.log(rv + 1e-12), np.log1p(buy + sell), (buy - sell) / np.maximum(buy + sell, 1e-9),
             spread, np.log(depth)]  # fmt: skip
    return np.stack(feats, axis=1).astype(np.float32)


def order_flow_dataset(
    n_intervals: int,
    *,
    interval: int = 64,
    time_bins: int = 16,
    price_bins: int = 16,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Images, features and next-interval targets of ``n_intervals`` usable intervals.

    Returns a dict: ``images [n, T, P, 4]``, ``features [n, 5]`` (the first being the log of
    ``naive``), ``target [n]`` (the next interval's realized volatility), ``naive [n]`` (this
    interval's), ``returns`` (all steps, for the GARCH baseline) and ``interval``. Volatilities
    and returns are divided by the simulator's ``sigma_bar · sqrt(interval)`` so typical
    targets are near 1.
    """
    m = simulate_market((n_intervals + 1) * interval, seed=seed)
    images = order_flow_images(m, interval, time_bins=time_bins, price_bins=price_bins)
    rv = realized_volatility(m.returns, interval)
    scale = 1e-3 * np.sqrt(interval)
    naive = (rv[:n_intervals] / scale).astype(np.float32)
    feats = aggregate_features(m, interval)[:n_intervals]
    feats[:, 0] = np.log(naive + 1e-12)  # the naive forecast, on the target's scale
    return {
        "images": images[:n_intervals],
        "features": feats,
        "target": (rv[1 : n_intervals + 1] / scale).astype(np.float32),
        "naive": naive,
        "returns": (m.returns / scale).astype(np.float64),
        "interval": np.asarray(interval),
    }


def pack_features(images: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Append a fifth channel holding each example's features in its first row (zeros
    elsewhere), so one array carries both inputs of CNN-Aggr through the trainer:
    ``[n, T, P, 4] + [n, F] -> [n, T, P, 5]`` (needs F <= P)."""
    n, t, p, _ = images.shape
    if features.shape[0] != n or features.shape[1] > p:
        raise ValueError(f"pack_features: features {features.shape} do not fit images "
                         f"{images.shape} (need [n, F <= {p}])")  # fmt: skip
    extra = np.zeros((n, t, p, 1), np.float32)
    extra[:, 0, : features.shape[1], 0] = features
    return np.concatenate([images, extra], axis=-1)


def _garch_variance(r2: np.ndarray, omega: float, alpha: float, beta: float) -> np.ndarray:
    """σ²_t = ω + α r²_{t−1} + β σ²_{t−1} from σ²_0 = the sample variance, as an IIR filter:
    σ²_t = ω (1 − βᵗ)/(1 − β) + α Σ_{k<t} βᵏ r²_{t−1−k} + βᵗ σ²_0."""
    from scipy.signal import lfilter

    start = float(np.mean(r2))
    forced = lfilter([alpha], [1.0, -beta], np.concatenate([[0.0], r2[:-1]]))
    bt = beta ** np.arange(len(r2))
    return omega * (1 - bt) / (1 - beta) + forced + bt * start


def fit_garch(returns: np.ndarray) -> tuple[float, float, float]:
    """GARCH(1,1) ``(ω, α, β)`` by Gaussian maximum likelihood with variance targeting
    (ω = var·(1 − α − β)); Nelder–Mead over an unconstrained map of 0 < α, 0 <= β, α + β < 1."""
    from scipy.optimize import minimize

    r2 = np.asarray(returns, np.float64) ** 2
    var = float(np.mean(r2))

    def unpack(z):
        persistence = 1 / (1 + np.exp(-z[0]))  # α + β in (0, 1)
        share = 1 / (1 + np.exp(-z[1]))  # α / (α + β)
        return persistence * share, persistence * (1 - share)

    def nll(z):
        a, b = unpack(z)
        s2 = np.maximum(_garch_variance(r2, var * (1 - a - b), a, b), 1e-300)
        return 0.5 * float(np.mean(np.log(s2) + r2 / s2))

    z0 = np.array([np.log(0.95 / 0.05), np.log(0.05 / 0.95)])  # α + β = 0.95, α = 0.05·0.95
    res = minimize(nll, z0, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-10})
    a, b = unpack(res.x)
    return var * (1 - a - b), float(a), float(b)


def garch_forecast(
    returns: np.ndarray, interval: int, params: tuple[float, float, float]
) -> np.ndarray:
    """Per interval i, the forecast realized volatility of interval i + 1 from the variance
    filtered through interval i: ``sqrt(Σ_{h=1..m} E[σ²_{t+h}])`` with
    ``E[σ²_{t+h}] = σ̄² + (α+β)^{h−1} (σ²_{t+1} − σ̄²)``."""
    omega, alpha, beta = params
    r2 = np.asarray(returns, np.float64) ** 2
    s2 = _garch_variance(r2, omega, alpha, beta)
    n = len(r2) // interval
    ends = np.arange(1, n + 1) * interval - 1  # last step of each interval
    nxt = omega + alpha * r2[ends] + beta * s2[ends]  # σ² of the first step after it
    lr = omega / (1 - alpha - beta)
    decay = (alpha + beta) ** np.arange(interval)
    return np.sqrt(interval * lr + (nxt - lr) * decay.sum())
