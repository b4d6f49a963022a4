"""Named shape/dtype cases for `chunk_gla`, shared by the tests and the benchmarks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxblocks.kernels.gla._common import flops


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: str = "float32"
    gate_normalizer: float = 1.0  # g = logsigmoid(x) / n: n = 0.1 strong decay, 10 weak

    def make(self, seed: int = 0, *, initial_state: bool = True):
        """Random inputs (never zeros): q, k, v ~ N(0, 1), g = logsigmoid(N(0,1)) / n, h0 ~ N."""
        kq, kk, kv, kg, kh = jax.random.split(jax.random.key(seed), 5)
        dt = jnp.dtype(self.dtype)
        B, T, H, K, V = self.B, self.T, self.H, self.K, self.V
        q = jax.random.normal(kq, (B, T, H, K)).astype(dt)
        k = jax.random.normal(kk, (B, T, H, K)).astype(dt)
        v = jax.random.normal(kv, (B, T, H, V)).astype(dt)
        g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H, K))) / self.gate_normalizer
        h0 = jax.random.normal(kh, (B, H, K, V)) if initial_state else None
        return q, k, v, g.astype(jnp.float32), h0

    def flops(self, backward: bool = False) -> float:
        """Chunked forward (or backward) FLOPs at chunk 64: the formula of the kernels'
        `pl.CostEstimate`, used for every implementation's GFLOP figure (XLA's cost analysis
        counts a loop body once, so it cannot be compared across lengths)."""
        return float(flops(self.B, self.T, self.H, self.K, self.V, chunk=64, backward=backward))


# The sweep: T = 1, 63, 64, 65, 1000; K, V in {60, 64, 100, 128}; H > 1; B > 1.
TEST_CASES: tuple[Case, ...] = (
    Case("t1", 2, 1, 2, 64, 64),
    Case("t63_k60_v100", 2, 63, 3, 60, 100),
    Case("t64_k100_v60", 2, 64, 2, 100, 60),
    Case("t65_k128_v64", 2, 65, 2, 128, 64),
    Case("t1000_k64_v128", 2, 1000, 2, 64, 128),
    Case("t1000_k100_v100", 1, 1000, 2, 100, 100),
)
GATE_TEST_CASES: tuple[Case, ...] = tuple(
    Case(f"t130_n{n}", 2, 130, 2, 32, 48, gate_normalizer=n) for n in (0.1, 1.0, 10.0)
)
# Interpret mode is slow: small odd shapes, non-power-of-two dims.
INTERPRET_TEST_CASES: tuple[Case, ...] = (
    Case("interp_t65_k32_v60", 2, 65, 2, 32, 60),
    Case("interp_t63_k60_v32", 1, 63, 2, 60, 32),
)
# Lowering (no execution): the realistic shape.
LOWERING_CASES: tuple[Case, ...] = (
    Case("lower_t2048_h8_d128", 1, 2048, 8, 128, 128, dtype="bfloat16"),
)

# Benchmarks. CPU: B2 H4 K=V=64 fp32, T 256..8192 (quick: 512..4096). GPU: fla's standard
# shapes (bf16; quick: the first two).
BENCHMARK_CASES: tuple[Case, ...] = tuple(
    Case(f"B2 T{T} H4 D64", 2, T, 4, 64, 64) for T in (256, 512, 1024, 2048, 4096, 8192)
)
QUICK_BENCHMARK_CASES: tuple[Case, ...] = tuple(
    c for c in BENCHMARK_CASES if c.T in (512, 1024, 2048, 4096)
)
GPU_BENCHMARK_CASES: tuple[Case, ...] = (
    Case("B4 T2048 H16 D128", 4, 2048, 16, 128, 128, "bfloat16"),
    Case("B2 T16384 H16 D128", 2, 16384, 16, 128, 128, "bfloat16"),
    Case("B8 T2048 H32 D256", 8, 2048, 32, 256, 256, "bfloat16"),
    Case("B1 T8192 H96 D128", 1, 8192, 96, 128, 128, "bfloat16"),
    Case("B4 T4096 H64 D128", 4, 4096, 64, 128, 128, "bfloat16"),
    Case("B8 T1024 H8 D64", 8, 1024, 8, 64, 64, "bfloat16"),
)
GPU_QUICK_BENCHMARK_CASES: tuple[Case, ...] = GPU_BENCHMARK_CASES[:2]
