"""Long convolutions: fft_conv (XLA FFT) vs the direct convolution; LongConv vs attention; the
short causal_conv1d (its own op) forward + backward.

CPU: ratios only. The Pallas Monarch kernels need a GPU/TPU to time (interpret mode measures
the interpreter); on a GPU this benchmark also times them against ``jnp.fft`` (``xla``).
FlashFFTConv's published H100 figure for the gated convolution at B 64, H 768, L 1K is
0.29 ms (7.93× PyTorch's FFT conv); it is quoted, not re-measured, in BENCHMARKS.md.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import measure, table
from jaxblocks.kernels import UnsupportedImplementationError
from jaxblocks.kernels.causal_conv1d import causal_conv1d
from jaxblocks.kernels.causal_conv1d import specs as short_specs
from jaxblocks.kernels.long_conv import fft_conv, specs
from jaxblocks.layers.long_conv import LongConv


def _conv_rows(quick: bool):
    rows = []
    cases = specs.QUICK_BENCHMARK_CASES if quick else specs.BENCHMARK_CASES
    impls = ["reference", "xla"]
    if jax.default_backend() == "gpu":
        impls.append("pallas_gpu")
    if jax.default_backend() == "tpu":
        impls.append("pallas_tpu")
    for case in cases:
        B, H, L = case.B, case.H, case.L
        u, k, *_ = case.make()
        name = f"B{B} H{H} L={L} Lk=L fwd"
        for impl in impls:
            fn = functools.partial(fft_conv, implementation=impl)
            # the direct convolution is O(L²): time it once at the largest lengths
            iters = 1 if (impl == "reference" and L >= 16384) else 5
            # the kernels' cost model for every implementation: XLA cannot see into the Pallas
            # kernels, and the same convolution is the same useful work whichever path runs it
            try:
                m = measure(name, impl, fn, [u, k], warmup=1, iters=iters, flops=case.flops())
            except UnsupportedImplementationError:
                continue  # FFT sizes the kernel cannot hold (its `supports`): the row is absent
            rows.append(m)
    return rows


class _Attention(nn.Module):
    """Single-head softmax self-attention of width H (causal), the LongConv's comparison."""

    @nn.compact
    def __call__(self, x):
        H = x.shape[-1]
        q, k, v = (nn.Dense(H, name=n)(x) for n in ("q", "k", "v"))
        o = jax.nn.dot_product_attention(
            q[:, :, None], k[:, :, None], v[:, :, None], is_causal=True
        )
        return nn.Dense(H, name="o")(o[:, :, 0])


def _layer_rows(quick: bool):
    rows = []
    B, H = 1, 64
    lengths = (1024, 4096) if quick else (1024, 4096, 8192, 16384)
    for L in lengths:
        x = jax.random.normal(jax.random.key(0), (B, L, H))
        for impl, mod in (("attention", _Attention()), ("long_conv", LongConv(l_max=L))):
            if impl == "attention" and L > 8192:
                continue  # O(L²) scores: 1 GiB+ per head at 16K on a shared 2-core machine
            params = mod.init(jax.random.key(1), x)

            def fwd_bwd(p, x, mod=mod):
                return jax.value_and_grad(lambda p: jnp.sum(mod.apply(p, x) ** 2))(p)

            rows.append(measure(f"B{B} H{H} L={L} fwd+bwd", impl, fwd_bwd, [params, x], iters=3))
    return rows


def _short_conv_rows(quick: bool):
    rows = []
    impls = ["reference", "xla"]
    if jax.default_backend() == "gpu":
        impls.append("pallas_gpu")
    if jax.default_backend() == "tpu":
        impls.append("pallas_tpu")
    for case in short_specs.QUICK_BENCHMARK_CASES if quick else short_specs.BENCHMARK_CASES:
        x, w, b = case.make()
        name = f"B{case.B} T={case.T} C={case.C} W={case.W} {jnp.dtype(case.dtype).name} fwd+bwd"
        for impl in impls:

            def fwd_bwd(x, w, b, impl=impl):
                f = lambda x, w, b: causal_conv1d(x, w, b, "silu", implementation=impl)
                loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
                return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b)

            flops = 3 * case.flops() if impl.startswith("pallas") else None  # fwd, dx, dw
            rows.append(measure(name, impl, fwd_bwd, [x, w, b], iters=5, flops=flops))
    return rows


def run(quick: bool) -> str:
    conv = _conv_rows(quick)
    layer = _layer_rows(quick)
    short = _short_conv_rows(quick)
    speed = []
    for r in conv:
        if r.impl == "xla":
            ref = next(x for x in conv if x.case == r.case and x.impl == "reference")
            speed.append(f"L={r.case.split('L=')[1].split()[0]}: {ref.median_s / r.median_s:.1f}×")
    gpu_note = (
        ""
        if jax.default_backend() in ("gpu", "tpu")
        else "No GPU/TPU in this run: the Pallas Monarch kernels are not timed (interpret mode "
        "times the interpreter). FlashFFTConv's published H100 figure for comparison on a GPU: "
        "gated conv B 64, H 768, L 1K, 0.29 ms (7.93× PyTorch's FFT conv).\n\n"
    )
    return (
        gpu_note
        + "fft_conv forward, u [B, H, L] fp32, k [H, L] (Lk = L, causal, FFT size 2L): `reference`"
        " is the direct O(L·Lk) depthwise convolution, `xla` is `jnp.fft.rfft/irfft`. "
        f"Direct / xla time: {', '.join(speed)}.\n\n"
        + table(conv, "reference")
        + "\n\nOne layer, forward + backward (`value_and_grad` of a sum of squares): "
        "`LongConv` (safari defaults, 2 channels, GLU) vs single-head causal softmax attention of "
        "the same width (q/k/v/o projections); attention is left out above L = 8K (O(L²) "
        "scores).\n\n"
        + table(layer, "attention")
        + "\n\n`causal_conv1d` (its own op, `jaxblocks.kernels.causal_conv1d`), silu, forward + "
        "backward (`value_and_grad` of a sum of squares over x, w, bias): `reference` is the "
        "fp32 tap loop, `xla` one grouped `conv_general_dilated`.\n\n" + table(short, "reference")
    )
