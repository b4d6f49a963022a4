"""Named shape/dtype cases for `fft_conv`, shared by the tests and the benchmark; the FLOP count
is the kernels' cost model (`_common.flops`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxblocks.kernels.long_conv._common import default_fft_size, kernel_fft_size
from jaxblocks.kernels.long_conv._common import flops as flops


@dataclasses.dataclass(frozen=True)
class FFTConvCase:
    """u [B, H, L], k [H, Lk]; ``gated`` adds pre/post gates and D."""

    B: int
    H: int
    L: int
    Lk: int
    dtype: jnp.dtype = jnp.float32
    gated: bool = True

    def make(self, key=None):
        """Random (never zero) inputs: u, k (decaying, as in FlashFFTConv's tests), D, gates."""
        key = jax.random.key(0) if key is None else key
        ks = jax.random.split(key, 5)
        u = jax.random.normal(ks[0], (self.B, self.H, self.L), jnp.float32).astype(self.dtype)
        decay = jnp.exp(-3.0 * jnp.arange(self.Lk, dtype=jnp.float32) / self.Lk)  # [Lk]
        k = jax.random.normal(ks[1], (self.H, self.Lk), jnp.float32) * decay[None, :]
        if not self.gated:
            return u, k, None, None, None
        D = jax.random.normal(ks[2], (self.H,), jnp.float32)
        gate = lambda kk: jax.nn.sigmoid(jax.random.normal(kk, u.shape, jnp.float32) * 2)
        return u, k, D, gate(ks[3]).astype(self.dtype), gate(ks[4]).astype(self.dtype)

    def flops(self, causal: bool = True) -> int:
        """FLOPs of the Monarch forward kernel at the default FFT size (`_common.flops`)."""
        n = kernel_fft_size(default_fft_size(self.L, self.Lk, causal), causal)
        return flops(self.B * self.H, n)


# The lengths; odd B/H; Lk both = L and < L.
TEST_CASES: dict[str, FFTConvCase] = {
    "L1": FFTConvCase(3, 5, 1, 1),
    "L7": FFTConvCase(3, 5, 7, 5),
    "L64": FFTConvCase(3, 5, 64, 64),
    "L1000": FFTConvCase(3, 5, 1000, 333),
    "L4096": FFTConvCase(1, 3, 4096, 4096),
    "L16384": FFTConvCase(1, 3, 16384, 16384),
    "L1000_bf16": FFTConvCase(3, 5, 1000, 1000, jnp.bfloat16),
}

# Small shapes for the Pallas interpreters (FFT sizes 256 and 1024, odd L).
INTERPRET_TEST_CASES: dict[str, FFTConvCase] = {
    "L7_N256": FFTConvCase(3, 3, 7, 7),
    "L1000_N1024": FFTConvCase(1, 3, 1000, 25),
    "L130_N256_bf16": FFTConvCase(2, 3, 130, 127, jnp.bfloat16),
}

# Realistic lowering shapes per backend (Lk = L, bf16 input): FFT sizes 4096 ... 65536 on TPU;
# on GPU 2048 and 4096, the largest whose one-row-per-program working set fits the registers
# (`_common.working_set`; larger N: implementation="xla").
LOWERING_CASES: dict[str, tuple[FFTConvCase, ...]] = {
    "pallas_gpu": tuple(FFTConvCase(2, 16, L, L, jnp.bfloat16) for L in (1024, 2048)),
    "pallas_tpu": tuple(FFTConvCase(2, 16, L, L, jnp.bfloat16) for L in (2048, 8192, 32768)),
}

# Benchmarks (ungated, Lk = L): FlashFFTConv's table uses B 64, H 768; the CPU runs B 1, H 16.
BENCHMARK_CASES: tuple[FFTConvCase, ...] = tuple(
    FFTConvCase(1, 16, L, L, gated=False) for L in (256, 1024, 4096, 16384, 65536)
)
QUICK_BENCHMARK_CASES: tuple[FFTConvCase, ...] = BENCHMARK_CASES[:3]
