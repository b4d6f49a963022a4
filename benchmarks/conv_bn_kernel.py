"""pointwise_conv_bn (1x1 conv + folded BatchNorm + activation): forward + backward per
implementation at ResNet-50 1x1 shapes, fp32 and bf16.

Achieved GFLOP/s use the kernels' `pl.CostEstimate` formulas (`specs.forward_flops` +
`specs.backward_flops`: three matmuls of 2*M*C_in*C_out). Pallas rows appear only on their own
platform (GPU: pallas_gpu, TPU: pallas_tpu); on CPU the table compares reference and xla.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.common import measure, table
from jaxblocks.kernels.conv_bn import specs
from jaxblocks.kernels.conv_bn.api import pointwise_conv_bn

BASELINE = "reference"


def _impls() -> list[str]:
    impls = ["reference", "xla"]
    platform = jax.default_backend()
    if platform == "gpu":
        impls.append("pallas_gpu")
    elif platform == "tpu":
        impls.append("pallas_tpu")
    return impls


def _step(impl: str, activation):
    def loss(x, w, scale, bias, mean, var):
        y = pointwise_conv_bn(
            x, w, scale, bias, mean, var, activation=activation, implementation=impl
        )
        return jnp.sum(y.astype(jnp.float32))

    # Gradients for x, w, scale, bias (mean/var are running statistics).
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def run(quick: bool) -> str:
    cases = specs.QUICK_BENCHMARK_CASES if quick else specs.BENCHMARK_CASES
    rows = []
    for base in cases:
        for dtype in ("float32", "bfloat16"):
            case = dataclasses.replace(base, dtype=dtype)
            x, w, scale, bias, mean, var, _ = case.make()
            args = (x, w, scale, bias, mean, var)
            flops = specs.forward_flops(case.m, case.c_in, case.c_out) + specs.backward_flops(
                case.m, case.c_in, case.c_out
            )
            name = f"{case.name} M={case.m} {case.c_in}->{case.c_out} {dtype}"
            for impl in _impls():
                r = measure(
                    name,
                    impl,
                    _step(impl, case.activation),
                    args,
                    warmup=1 if quick else 2,
                    iters=3 if quick else 10,
                    flops=flops,
                )
                r.extra["GFLOP/s"] = f"{flops / r.median_s / 1e9:.1f}"
                rows.append(r)
    note = (
        "Forward + backward (`value_and_grad` w.r.t. x, w, scale, bias) of `pointwise_conv_bn`; "
        "GFLOP from the CostEstimate formula 3 x 2·M·C_in·C_out."
    )
    return note + "\n\n" + table(rows, BASELINE)
