"""The project's 2-D wave solver: leapfrog against a separable standing-wave solution, energy
bounded, boundary held at zero; surrogate pairs; the field_regression task's metrics."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.data.wave import CFL, simulate, wave_pairs
from jaxblocks.train.tasks import get_task


def test_standing_mode_matches_the_discrete_dispersion_relation():
    n = 33
    x = np.arange(n) / (n - 1)
    mode = np.outer(np.sin(np.pi * x), np.sin(2 * np.pi * x))  # zero on the boundary
    traj = simulate(mode, 200)
    # the leapfrog scheme keeps the mode's shape and rotates it at the discrete frequency
    h = 1.0 / (n - 1)
    lam = 4 * (np.sin(np.pi * h / 2) ** 2 + np.sin(2 * np.pi * h / 2) ** 2)  # -Δ_h eigenvalue · h²
    omega = np.arccos(1 - CFL**2 * lam / 2)  # cos(ω) = 1 − r² λ / 2
    for t in (0, 37, 200):
        np.testing.assert_allclose(traj[t], np.cos(omega * t) * mode, atol=2e-3)
    assert np.all(traj[1:, 0, :] == 0) and np.all(traj[1:, :, -1] == 0)  # the solver holds it


def test_surrogate_pairs_and_metric():
    x, y = wave_pairs(40, 16, ahead=4, seed=0)
    assert x.shape == (40, 16, 16, 2) and y.shape == (40, 16, 16, 1)
    assert np.isfinite(x).all() and 0 < np.abs(x).max() < 5
    task = get_task("field_regression")
    m = task.metrics(jnp.asarray(y) * 1.1, jnp.asarray(y))
    np.testing.assert_allclose(m["rel_l2"], 0.1, rtol=1e-5)
    assert task.main_metric == "rel_l2" and not task.higher_is_better
    with pytest.raises(ValueError, match="does not match the target"):
        task.metrics(jnp.asarray(y)[:, :8], jnp.asarray(y))
