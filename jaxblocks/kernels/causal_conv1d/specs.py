"""Named shape/dtype cases for `causal_conv1d`, shared by the tests and the benchmark; the FLOP
count is the kernels' cost model (`_common.flops`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxblocks.kernels.causal_conv1d._common import flops as flops


@dataclasses.dataclass(frozen=True)
class Case:
    """x [B, T, C], taps w [W, C], bias [C]."""

    B: int
    T: int
    C: int
    W: int
    dtype: jnp.dtype = jnp.float32

    def make(self, key=None):
        """Random (never zero) inputs: x, w (scaled by 1/√W), bias."""
        key = jax.random.key(1) if key is None else key
        ks = jax.random.split(key, 3)
        x = jax.random.normal(ks[0], (self.B, self.T, self.C), jnp.float32).astype(self.dtype)
        w = jax.random.normal(ks[1], (self.W, self.C), jnp.float32) / self.W**0.5
        b = jax.random.normal(ks[2], (self.C,), jnp.float32)
        return x, w, b

    def flops(self) -> int:
        """Forward FLOPs (the kernels' `pl.CostEstimate`)."""
        return flops(self.B, self.T, self.C, self.W)


# Odd T and C (padded to whole tiles), one tap, the widest kernel, bf16.
TEST_CASES: dict[str, Case] = {
    "W4": Case(2, 37, 20, 4),
    "W1": Case(1, 9, 3, 1),
    "W8_long": Case(1, 300, 33, 8),
    "W4_bf16": Case(2, 37, 20, 4, jnp.bfloat16),
}

# A realistic layer (Mamba-size channels) for the cuda / tpu lowering check.
LOWERING_CASES: dict[str, Case] = {
    "T4096_C512_bf16": Case(4, 4096, 512, 4, jnp.bfloat16),
}

# Benchmarks: Mamba's short conv (W 4) at a small model's width; CPU runs use the quick ones.
BENCHMARK_CASES: tuple[Case, ...] = (
    Case(4, 2048, 768, 4),
    Case(4, 2048, 768, 4, jnp.bfloat16),
    Case(2, 8192, 1536, 4),
)
QUICK_BENCHMARK_CASES: tuple[Case, ...] = (Case(2, 1024, 256, 4),)
