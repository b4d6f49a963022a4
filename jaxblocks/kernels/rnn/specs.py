"""Named shape/dtype cases for `flashrnn`, shared by the tests and benchmarks/rnn.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.kernels.rnn import _common
from jaxblocks.kernels.rnn.cells import CELLS


@dataclasses.dataclass(frozen=True)
class Case:
    """One `flashrnn` problem: cell, batch B, time T, heads N, head dim D, input dtype."""

    function: str
    B: int
    T: int
    N: int
    D: int
    dtype: object = jnp.float32

    @property
    def name(self) -> str:
        dt = jnp.dtype(self.dtype).name
        return f"{self.function}_B{self.B}_T{self.T}_N{self.N}_D{self.D}_{dt}"

    @property
    def tokens(self) -> int:
        return self.B * self.T


def make_inputs(case: Case, seed: int = 0, *, input_scale: float = 1.0):
    """Random ``(Wx, R, b, states)`` for ``case`` (never zeros); sLSTM's n starts ≥ 1."""
    cell = CELLS[case.function]
    B, T, N, D = case.B, case.T, case.N, case.D
    k = jax.random.split(jax.random.key(seed), 4)
    wx = input_scale * jax.random.normal(k[0], (B, T, cell.G, N, D), jnp.float32)
    r = jax.random.normal(k[1], (cell.Gr, N, D, D), jnp.float32) / np.sqrt(D)
    b = 0.5 * jax.random.normal(k[2], (cell.Gb, N, D), jnp.float32)
    s = jax.random.normal(k[3], (cell.S, B, N, D), jnp.float32)
    if case.function == "slstm":  # n is a normaliser (≥ 1 after any step)
        s = s.at[2].set(1.0 + jnp.abs(s[2]))
    return tuple(x.astype(case.dtype) for x in (wx, r, b, s))


def flops(case: Case, backward: bool = False) -> float:
    """Matmul + pointwise FLOPs of the recurrence (the kernels' `pl.CostEstimate` formula)."""
    return float(_common.flops(case.function, case.B, case.T, case.N, case.D, backward))


# The benchmark shapes: B=16, T=512, N=4, D=64 and N=1, D=256 (bf16 on accelerators).
BENCHMARK_CASES: tuple[Case, ...] = tuple(
    Case(f, 16, 512, n, d, jnp.float32) for f in CELLS for n, d in ((4, 64), (1, 256))
)
QUICK_BENCHMARK_CASES: tuple[Case, ...] = tuple(Case(f, 16, 64, 4, 64, jnp.float32) for f in CELLS)
# Realistic lowering shapes (no execution, so full size).
LOWERING_CASES: tuple[Case, ...] = tuple(Case(f, 16, 512, 4, 64, jnp.bfloat16) for f in CELLS)
