"""A synthetic temporal interaction graph for link prediction (PRES demo, paper 39).

Nodes belong to latent communities that drift: each event picks a source (uniformly), which may
first switch community (probability ``drift``); the source then repeats its *current partner*
with probability ``p_repeat`` (a bursty session: it talks to the same node again and again until
it switches partner, probability ``p_switch`` per event), else picks a node of its own community
(``p_community``), else any node. Times are a Poisson process (rate 1); each event carries
``edge_dim`` features: a noisy code of the source's community.

Recent history therefore predicts the next links (current partner, community), which is what a
memory-based model (TGN) learns — and what goes stale when a temporal batch is long, because the
events of one batch do not see each other.

`temporal_windows` cuts the stream into windows of ``window`` consecutive events; one window is
one trainer example ``[window, 4 + edge_dim]`` (source, destination, negative destination, time
from the window's start, features), so batches of windows keep each window's time order while the
trainer samples windows i.i.d. Negatives are uniform random nodes (TGN's ``RandEdgeSampler``),
fixed per event.
"""

from __future__ import annotations

import numpy as np

__all__ = ["temporal_events", "temporal_windows"]


def temporal_events(
    num_events: int,
    num_nodes: int = 64,
    num_communities: int = 4,
    edge_dim: int = 4,
    *,
    p_repeat: float = 0.6,
    p_switch: float = 0.25,
    p_community: float = 0.8,
    drift: float = 0.01,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One stream: ``{"src", "dst", "t", "feat"}`` in time order (ids int32, fp32 else)."""
    if num_nodes < 2 or num_communities < 1 or num_events < 1 or edge_dim < 0:
        raise ValueError(f"temporal_events: need num_nodes >= 2, num_communities >= 1, "
                         f"num_events >= 1 and edge_dim >= 0, got {num_nodes}, "
                         f"{num_communities}, {num_events}, {edge_dim}")  # fmt: skip
    rng = np.random.default_rng(seed)
    comm = rng.integers(0, num_communities, num_nodes)
    partner = np.full(num_nodes, -1)
    codes = rng.standard_normal((num_communities, edge_dim))
    src = rng.integers(0, num_nodes, num_events)
    dst = np.empty(num_events, np.int64)
    feat = np.empty((num_events, edge_dim), np.float32)
    u = rng.random((num_events, 4))
    for e in range(num_events):
        i = src[e]
        if u[e, 0] < drift:
            comm[i] = rng.integers(0, num_communities)
            partner[i] = -1
        if partner[i] >= 0 and u[e, 1] < p_repeat:
            j = partner[i]
        else:
            if u[e, 2] < p_community:
                cand = np.flatnonzero((comm == comm[i]) & (np.arange(num_nodes) != i))
                j = rng.choice(cand) if len(cand) else rng.integers(0, num_nodes)
            else:
                j = rng.integers(0, num_nodes)
            if partner[i] < 0 or u[e, 3] < p_switch:
                partner[i] = j
        dst[e] = j
        feat[e] = codes[comm[i]] + 0.5 * rng.standard_normal(edge_dim)
    t = np.cumsum(rng.exponential(1.0, num_events))
    return {
        "src": src.astype(np.int32),
        "dst": dst.astype(np.int32),
        "t": t.astype(np.float32),
        "feat": feat,
    }


def temporal_windows(
    num_windows: int, window: int, num_nodes: int = 64, edge_dim: int = 4, seed: int = 0, **kw
) -> tuple[np.ndarray, np.ndarray]:
    """``(x [num_windows, window, 4 + edge_dim], y [num_windows, window])`` from one stream cut
    into consecutive windows; ``y`` is the 0/1 weight of each event's prediction (all 1)."""
    if num_windows < 1 or window < 1:
        raise ValueError(f"temporal_windows: num_windows and window must be >= 1, got "
                         f"{num_windows}, {window}")  # fmt: skip
    ev = temporal_events(num_windows * window, num_nodes, edge_dim=edge_dim, seed=seed, **kw)
    neg = np.random.default_rng((seed, 1)).integers(0, num_nodes, num_windows * window)
    t = ev["t"].reshape(num_windows, window)
    t = t - t[:, :1]
    cols = [ev["src"], ev["dst"], neg]
    ids = np.stack(cols, -1).reshape(num_windows, window, 3).astype(np.float32)
    feat = ev["feat"].reshape(num_windows, window, edge_dim)
    x = np.concatenate([ids, t[..., None], feat], -1).astype(np.float32)
    return x, np.ones((num_windows, window), np.float32)
