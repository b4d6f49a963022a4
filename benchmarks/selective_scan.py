"""selective_scan: chunked XLA vs the sequential token loop vs one `lax.associative_scan` over L,
forward and forward + backward, ratios to the sequential reference.

``assoc_scan`` materialises every state (``[batch, dim, L, N]``) and scans all of L in log depth;
``xla`` is the op's chunked form (associative scan inside chunks of 16, `lax.scan` over chunks,
remat per chunk); ``reference`` is the fp32 `lax.scan` over tokens. On a GPU the table adds
``pallas_gpu`` (Triton kernels), on a TPU ``pallas_tpu``, at the same cases (Mamba-130M-like
layer and a VMamba 4-direction stage-1 call). Throughput is tokens (batch·L) per second; GFLOP
uses the kernels' CostEstimate formula (7 / 22 FLOPs per state element fwd / bwd).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.common import measure, table
from jaxblocks.kernels.selective_scan import specs
from jaxblocks.kernels.selective_scan._common import finish, prepare
from jaxblocks.kernels.selective_scan.api import selective_scan

BASELINE = "reference"


def _assoc(u, delta, A, B, C, D, z, delta_bias):
    """The whole sequence in one associative scan (all states materialised)."""
    uf, dt, Af, Bf, Cf = prepare(u, delta, A, B, C, delta_bias, True)
    G = Af.shape[0]
    bG, H, L = uf.shape
    Arow = jnp.tile(Af, (bG // G, 1, 1))  # [bG, H, N]
    a = jnp.exp(dt[..., None] * Arow[:, :, None, :])  # [bG, H, L, N]
    x = (dt * uf.astype(jnp.float32))[..., None] * jnp.swapaxes(Bf, 1, 2)[:, None].astype(
        jnp.float32
    )

    def comb(l, r):
        return l[0] * r[0], r[0] * l[1] + r[1]

    _, hs = jax.lax.associative_scan(comb, (a, x), axis=2)
    y = jnp.einsum("bhln,bnl->bhl", hs, Cf.astype(jnp.float32))
    return finish(y, hs[:, :, -1], u, D, z)


def _fn(impl: str):
    if impl == "assoc_scan":
        return lambda *a: _assoc(*a)[0]
    return lambda *a: selective_scan(*a, delta_softplus=True, implementation=impl)


def _grad(impl: str):
    def loss(*a):
        return jnp.sum(_fn(impl)(*a).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))


def _impls() -> list[str]:
    impls = ["reference", "xla", "assoc_scan"]
    platform = jax.default_backend()
    if platform == "gpu":
        impls.append("pallas_gpu")
    elif platform == "tpu":
        impls.append("pallas_tpu")
    return impls


def run(quick: bool) -> str:
    cases = specs.QUICK_BENCHMARK_CASES if quick else specs.BENCHMARK_CASES
    rows = []
    for case in cases:
        args = specs.make_inputs(case)
        for mode, make in (("fwd", _fn), ("fwd+bwd", _grad)):
            name = f"{case.name} {mode}"
            flops = specs.flops(case) + (specs.flops(case, backward=True) if mode != "fwd" else 0)
            for impl in _impls():
                r = measure(
                    name, impl, make(impl), args, warmup=1, iters=3 if quick else 10, flops=flops
                )
                r.extra["Mtok/s"] = f"{case.tokens / r.median_s / 1e6:.3f}"
                rows.append(r)
    note = (
        "`selective_scan` with D, z, delta_bias and softplus; fwd+bwd = `value_and_grad` w.r.t. "
        "u, delta, A, B, C. Time ratio > 1 = slower than the sequential reference."
    )
    return note + "\n\n" + table(rows, BASELINE)
