"""Pruning schedule, magnitude masks (unstructured and 1×b blocks), random-graph masks, the
`prune` optax link keeping the target sparsity through training, and the Reber data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxblocks.compress import (
    barabasi_albert_mask,
    magnitude_mask,
    polynomial_sparsity,
    prune,
    sparsity_of,
    watts_strogatz_mask,
)
from jaxblocks.data.reber import PAD, SYMBOLS, embedded_reber_string, reber_lm_data


def test_zhu_gupta_schedule():
    s = lambda t: float(polynomial_sparsity(t, 0.8, begin=100, end=500, frequency=100))  # noqa: E731
    assert (
        s(0) == 0.0
        and s(99) == 0.0
        and s(500) == pytest.approx(0.8)
        and s(900) == pytest.approx(0.8)
    )
    assert s(300) == pytest.approx(0.8 - 0.8 * 0.5**3)  # cubic: 1 - (1 - 1/2)^3 of the way
    assert s(250) == s(200)  # only changes every `frequency` steps
    with pytest.raises(ValueError, match="0 <= initial <= final < 1"):
        polynomial_sparsity(0, 1.0)


def test_magnitude_masks():
    w = jax.random.normal(jax.random.key(0), (16, 32))
    m = magnitude_mask(w, 0.75)
    assert float(1 - m.mean()) == pytest.approx(0.75)
    kept, dropped = jnp.abs(w)[m == 1], jnp.abs(w)[m == 0]
    assert float(kept.min()) > float(dropped.max())  # the smallest magnitudes go
    mb = np.asarray(magnitude_mask(w, 0.5, block=(1, 4)))
    blocks = mb.reshape(16, 8, 4)
    assert np.all(blocks.min(-1) == blocks.max(-1))  # whole 1x4 blocks kept or dropped
    assert mb.mean() == pytest.approx(0.5)
    assert float(magnitude_mask(w, 0.0).min()) == 1.0
    with pytest.raises(ValueError, match="not a multiple of block 5"):
        magnitude_mask(w, 0.5, block=(1, 5))
    with pytest.raises(ValueError, match=r"block must be \(1, b\)"):
        magnitude_mask(w, 0.5, block=(2, 2))


def test_random_graph_masks():
    ws = watts_strogatz_mask(32, 48, k=6, p=0.0, seed=0)
    assert ws.shape == (32, 48) and np.all(ws.sum(1) == 6)  # a ring lattice: k per unit
    rewired = watts_strogatz_mask(32, 48, k=6, p=0.5, seed=0)
    assert np.all(rewired.sum(1) == 6) and (rewired != ws).any()
    ba = barabasi_albert_mask(64, 3, seed=0)
    assert np.array_equal(ba, ba.T) and np.all(np.diag(ba) == 0)
    degree = ba.sum(1)
    assert ba.sum() == 2 * (3 * 4 / 2 + 3 * (64 - 4))  # seed clique + m edges per new node
    assert degree.max() >= 4 * np.median(degree)  # preferential attachment makes hubs
    with pytest.raises(ValueError, match="k must be even"):
        watts_strogatz_mask(4, 4, k=3, p=0.1, seed=0)
    with pytest.raises(ValueError, match="need 1 <= m < n"):
        barabasi_albert_mask(3, 3, seed=0)


def test_prune_keeps_the_target_sparsity_through_training():
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (32, 16)),
                        "bias": jnp.ones(16)}}  # fmt: skip
    tx = optax.chain(optax.adam(1e-2), prune(0.9, begin=2, end=20, frequency=2))
    state = tx.init(params)
    x = jax.random.normal(jax.random.key(2), (64, 32))
    y = x @ jax.random.normal(jax.random.key(3), (32, 16))

    @jax.jit
    def step(p, s):
        g = jax.grad(
            lambda q: jnp.mean((x @ q["dense"]["kernel"] + q["dense"]["bias"][None] - y) ** 2)
        )(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    seen = []
    for _ in range(40):
        params, state = step(params, state)
        seen.append(sparsity_of(params["dense"]["kernel"]))
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(0.9, abs=0.01)
    assert all(b >= a - 1e-9 for a, b in zip(seen, seen[1:], strict=False))  # never regrows
    assert sparsity_of(params["dense"]["bias"]) == 0.0  # not matched by include
    with pytest.raises(ValueError, match="matches no parameter"):
        prune(0.5, include="nothing").init(params)


def test_embedded_reber_data():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = embedded_reber_string(rng)
        assert s[0] == "B" and s[-1] == "E" and s[1] == s[-2] and s[1] in "TP"
        assert s[2] == "B" and s[-3] == "E"
    x, y = reber_lm_data(64, 24, seed=0)
    assert x.shape == y.shape == (64, 24) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert x.max() <= PAD and (x[:, 0] == SYMBOLS.index("B")).all()
