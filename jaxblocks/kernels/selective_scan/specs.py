"""Named shape/dtype cases for `selective_scan`, shared by the tests and benchmarks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxblocks.kernels.selective_scan import _common


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem: batch, dim, state N, length L, groups G (0 = ungrouped ``[batch, N, L]``)."""

    batch: int
    dim: int
    N: int
    L: int
    G: int = 0
    dtype: object = jnp.float32
    with_D: bool = True
    with_z: bool = True
    with_bias: bool = True
    softplus: bool = True

    @property
    def name(self) -> str:
        dt = jnp.dtype(self.dtype).name
        g = f"_G{self.G}" if self.G else ""
        return f"b{self.batch}_d{self.dim}_N{self.N}_L{self.L}{g}_{dt}"

    @property
    def tokens(self) -> int:
        return self.batch * self.L


def make_inputs(case: Case, seed: int = 0, *, abstract: bool = False):
    """``(u, delta, A, B, C, D, z, delta_bias)`` for ``case`` (random, never zeros; None where off).

    ``A = -exp(·)`` as in Mamba; Δ around softplus(-1.5 .. 1.5) so decays range from strong to
    weak. ``abstract=True`` gives `jax.ShapeDtypeStruct`s (for lowering).
    """
    b, d, N, L, G, dt = case.batch, case.dim, case.N, case.L, case.G, case.dtype
    bc = (b, N, L) if not G else (b, G, N, L)
    f32 = jnp.float32
    shapes = [
        ((b, d, L), dt),
        ((b, d, L), dt),
        ((d, N), f32),
        (bc, dt),
        (bc, dt),
        ((d,), f32) if case.with_D else None,
        ((b, d, L), dt) if case.with_z else None,
        ((d,), f32) if case.with_bias else None,
    ]
    if abstract:
        return tuple(None if s is None else jax.ShapeDtypeStruct(*s) for s in shapes)
    ks = jax.random.split(jax.random.key(seed), len(shapes))
    out = []
    for i, (k, s) in enumerate(zip(ks, shapes, strict=True)):
        if s is None:
            out.append(None)
            continue
        x = jax.random.normal(k, s[0], f32)
        if i == 1:  # delta (positive when no softplus follows, as Mamba's step sizes are)
            x = 0.5 * x if case.softplus else 0.02 + 0.2 * jnp.abs(x)
        elif i == 2:  # A = -exp(A_log)
            x = -jnp.exp(0.5 * x)
        elif i == 7:  # delta_bias spreads the channels' time scales
            x = jnp.linspace(-1.5, 1.0, d) + 0.1 * x
        out.append(x.astype(s[1]))
    return tuple(out)


def flops(case: Case, backward: bool = False) -> float:
    """Elementwise FLOPs of the scan (`_common.flops`, the kernels' `pl.CostEstimate` formula)."""
    return float(_common.flops(case.batch, case.dim, case.N, case.L, backward))


# Lowering (no execution, so full size): Mamba-130M-like layer and a VMamba 4-direction call.
LOWERING_CASES: tuple[Case, ...] = (
    Case(2, 768, 16, 1024, dtype=jnp.bfloat16),
    Case(2, 4 * 192, 1, 56 * 56, G=4, dtype=jnp.bfloat16),
)
BENCHMARK_CASES: tuple[Case, ...] = (
    Case(2, 768, 16, 1024),
    Case(8, 384, 16, 4096),
    Case(16, 4 * 96, 1, 56 * 56, G=4),
)
QUICK_BENCHMARK_CASES: tuple[Case, ...] = (Case(2, 128, 16, 512), Case(2, 4 * 48, 1, 28 * 28, G=4))
