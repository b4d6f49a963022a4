"""Named shape/dtype cases for the long-convolution ops, shared by tests and benchmarks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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


# The lengths; odd B/H; Lk both = L and < L.
FFT_CONV_CASES: dict[str, FFTConvCase] = {
    "L1": FFTConvCase(3, 5, 1, 1),
    "L7": FFTConvCase(3, 5, 7, 5),
    "L64": FFTConvCase(3, 5, 64, 64),
    "L1000": FFTConvCase(3, 5, 1000, 333),
    "L4096": FFTConvCase(1, 3, 4096, 4096),
    "L16384": FFTConvCase(1, 3, 16384, 16384),
    "L1000_bf16": FFTConvCase(3, 5, 1000, 1000, jnp.bfloat16),
}

# Small shapes for the Pallas interpreters (FFT sizes 256 and 1024, odd L).
PALLAS_INTERPRET_CASES: dict[str, FFTConvCase] = {
    "L7_N256": FFTConvCase(3, 3, 7, 7),
    "L1000_N1024": FFTConvCase(1, 3, 1000, 25),
    "L130_N256_bf16": FFTConvCase(2, 3, 130, 127, jnp.bfloat16),
}

# Realistic lowering shapes: FFT sizes 4096 ... 65536.
LOWERING_LENGTHS = (2048, 8192, 32768)

# Benchmarks: FlashFFTConv's table uses B 64, H 768; the CPU runs use B 1, H 64.
BENCH_LENGTHS = (256, 1024, 4096, 16384, 65536)
BENCH_LENGTHS_QUICK = (256, 1024, 4096)


@dataclasses.dataclass(frozen=True)
class ShortConvCase:
    B: int
    T: int
    C: int
    W: int
    dtype: jnp.dtype = jnp.float32

    def make(self, key=None):
        key = jax.random.key(1) if key is None else key
        ks = jax.random.split(key, 3)
        x = jax.random.normal(ks[0], (self.B, self.T, self.C), jnp.float32).astype(self.dtype)
        w = jax.random.normal(ks[1], (self.W, self.C), jnp.float32) / self.W**0.5
        b = jax.random.normal(ks[2], (self.C,), jnp.float32)
        return x, w, b


SHORT_CONV_CASES: dict[str, ShortConvCase] = {
    "W4": ShortConvCase(2, 37, 20, 4),
    "W1": ShortConvCase(1, 9, 3, 1),
    "W8_long": ShortConvCase(1, 300, 33, 8),
    "W4_bf16": ShortConvCase(2, 37, 20, 4, jnp.bfloat16),
}
