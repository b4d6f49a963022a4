"""Named shape/dtype cases for `pointwise_conv_bn`, shared by the tests and the benchmark, and
the FLOP/byte formulas of the kernels' `pl.CostEstimate` (defined in `_common.py`, re-exported
here for the benchmark's GFLOP/s)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxblocks.kernels.conv_bn._common import backward_bytes as backward_bytes
from jaxblocks.kernels.conv_bn._common import backward_flops as backward_flops
from jaxblocks.kernels.conv_bn._common import forward_bytes as forward_bytes
from jaxblocks.kernels.conv_bn._common import forward_flops as forward_flops
from jaxblocks.kernels.conv_bn._common import matmul_flops as matmul_flops


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration: x [*x_shape] (last dim C_in) -> [..., c_out]."""

    name: str
    x_shape: tuple[int, ...]
    c_out: int
    dtype: str = "float32"
    activation: str | None = None
    conv_bias: bool = False
    small_var: bool = False  # running variance ~1e-4: a folded scale of ~100

    @property
    def c_in(self) -> int:
        return self.x_shape[-1]

    @property
    def m(self) -> int:
        return math.prod(self.x_shape[:-1])

    def make(self, key=None):
        """Random (never zero) arguments: (x, w, scale, bias, mean, var, conv_bias)."""
        key = jax.random.key(0) if key is None else key
        k = jax.random.split(key, 7)
        dtype = jnp.dtype(self.dtype)
        c_in, c_out = self.c_in, self.c_out
        x = jax.random.normal(k[0], self.x_shape, jnp.float32).astype(dtype)
        w = (jax.random.normal(k[1], (c_in, c_out)) / math.sqrt(c_in)).astype(dtype)
        scale = 1.0 + 0.2 * jax.random.normal(k[2], (c_out,))
        bias = 0.1 * jax.random.normal(k[3], (c_out,))
        mean = 0.3 * jax.random.normal(k[4], (c_out,))
        if self.small_var:
            var = 1e-4 * jax.random.uniform(k[5], (c_out,), minval=0.5, maxval=1.5)
            mean = mean * 1e-2  # statistics of a conv output with ~1e-2 spread
        else:
            var = jnp.exp(0.5 * jax.random.normal(k[5], (c_out,)))
        cb = 0.1 * jax.random.normal(k[6], (c_out,)) if self.conv_bias else None
        if self.small_var and cb is not None:
            cb = cb * 1e-2
        return x, w, scale, bias, mean, var, cb


# Interpret-mode test cases: small, odd M, non-power-of-two channels, every activation.
TEST_CASES: tuple[Case, ...] = (
    Case("m37_24to40_relu_cb", (1, 37, 24), 40, "float32", "relu", conv_bias=True),
    Case("4d_3to17_silu", (2, 5, 7, 3), 17, "float32", "silu"),
    Case("m64_32to64_none", (64, 32), 64, "float32", None),
    Case("m37_24to40_gelu_smallvar", (1, 37, 24), 40, "float32", "gelu", small_var=True),
    Case("m37_24to40_relu6_cb", (37, 24), 40, "float32", "relu6", conv_bias=True),
    Case("bf16_4d_24to40_relu", (2, 5, 7, 24), 40, "bfloat16", "relu", conv_bias=True),
    Case("bf16_m64_32to64_silu_smallvar", (64, 32), 64, "bfloat16", "silu", small_var=True),
    Case("bf16_m37_3to17_gelu", (37, 3), 17, "bfloat16", "gelu"),
)

# Realistic shapes for the lowering checks (no execution) and the benchmark: ResNet-50 1x1.
LOWERING_CASES: tuple[Case, ...] = (
    Case("resnet50_56x56_256to64", (8 * 56 * 56, 256), 64, "bfloat16", "relu"),
    Case("resnet50_14x14_1024to256", (8, 14, 14, 1024), 256, "float32", "silu", conv_bias=True),
)

BENCHMARK_CASES: tuple[Case, ...] = (
    Case("r50_56x56_64to256", (16 * 56 * 56, 64), 256, "float32", None),
    Case("r50_56x56_256to64", (16 * 56 * 56, 256), 64, "float32", "relu"),
    Case("r50_14x14_1024to256", (16 * 14 * 14, 1024), 256, "float32", "relu"),
)

QUICK_BENCHMARK_CASES: tuple[Case, ...] = (
    Case("r50_56x56_64to256_b2", (2 * 56 * 56, 64), 256, "float32", None),
    Case("r50_56x56_256to64_b2", (2 * 56 * 56, 256), 64, "float32", "relu"),
    Case("r50_14x14_1024to256_b2", (2 * 14 * 14, 1024), 256, "float32", "relu"),
)
