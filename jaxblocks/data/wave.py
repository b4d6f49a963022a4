"""A 2-D wave-equation simulator written here, for surrogate-model data (paper 61's setting:
CNN forecasts of a wave field, trained on solver output; nothing is downloaded).

u_tt = c² (u_xx + u_yy) on the unit square with u = 0 on the boundary, solved by the explicit
second-order leapfrog scheme on an n×n grid (CFL number c·Δt/Δx = 0.5, stable below 1/√2).
Initial displacements are sums of random Gaussian bumps, initial velocity zero.
"""

from __future__ import annotations

import numpy as np

__all__ = ["simulate", "wave_pairs"]

CFL = 0.5


def simulate(u0: np.ndarray, steps: int) -> np.ndarray:
    """Leapfrog trajectory ``[steps + 1, n, n]`` from displacement ``u0`` at rest (float64)."""
    u0 = np.asarray(u0, np.float64)
    r2 = CFL**2
    prev = u0.copy()
    lap = np.zeros_like(u0)
    lap[1:-1, 1:-1] = (
        u0[2:, 1:-1] + u0[:-2, 1:-1] + u0[1:-1, 2:] + u0[1:-1, :-2] - 4 * u0[1:-1, 1:-1]
    )
    cur = u0 + 0.5 * r2 * lap  # first step of a field at rest (Taylor, u_t = 0)
    cur[0, :] = cur[-1, :] = cur[:, 0] = cur[:, -1] = 0.0
    out = [prev, cur]
    for _ in range(steps - 1):
        lap[1:-1, 1:-1] = (
            cur[2:, 1:-1] + cur[:-2, 1:-1] + cur[1:-1, 2:] + cur[1:-1, :-2] - 4 * cur[1:-1, 1:-1]
        )
        nxt = 2 * cur - prev + r2 * lap
        nxt[0, :] = nxt[-1, :] = nxt[:, 0] = nxt[:, -1] = 0.0
        prev, cur = cur, nxt
        out.append(cur)
    return np.stack(out[: steps + 1])


def _bumps(n: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] / (n - 1)
    u = np.zeros((n, n))
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        w = rng.uniform(0.04, 0.1)
        u += rng.uniform(-1, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w**2))
    u[0, :] = u[-1, :] = u[:, 0] = u[:, -1] = 0.0
    return u


def wave_pairs(
    num: int, n: int = 32, *, ahead: int = 4, steps: int = 60, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Surrogate training pairs: x ``[num, n, n, 2]`` = (u(t − 1), u(t)) and y ``[num, n, n, 1]``
    = u(t + ``ahead``) (solver steps), from random initial fields and random t (float32)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    per = 8  # samples per simulated trajectory
    while len(xs) < num:
        traj = simulate(_bumps(n, rng), steps)
        for t in rng.integers(1, steps - ahead, per):
            xs.append(np.stack([traj[t - 1], traj[t]], -1))
            ys.append(traj[t + ahead][..., None])
    return np.asarray(xs[:num], np.float32), np.asarray(ys[:num], np.float32)
