"""Pallas TPU (Mosaic) `fft_conv`.

Grid (B, H), both axes parallel; each step holds one row as an [N1, N2] tile (the full trailing
dims, so any power-of-two N obeys the (8, 128) rule) and runs the fused Monarch-DFT convolution
of `monarch.make_conv_kernel` on the MXU: 12 fp32 matmuls of √N × √N blocks (N = 64K: 256 × 256,
a good MXU shape; multi-pass bf16 at ``precision=HIGHEST``, the default, single-pass at
``DEFAULT``), twiddles and the filter product on the VPU. The backward reuses the kernel
(conjugate filter) and the cross-correlation kernel. The operands, block specs, custom VJP and
cost are in `_common`; this file adds the Mosaic compiler parameters.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.interpret import tpu_interpret
from jaxblocks.kernels.long_conv import _common


def _params(blocks: _common.BlockSizes) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=blocks.vmem_limit_bytes
    )


def _conv_call(u4, pre4, post4, d3, kr, ki, n, out_dtype, blocks, precision):
    """Run the fused convolution kernel over rows [B, H, N1, N2]."""
    launch = _common.conv_launch(u4, pre4, post4, d3, kr, ki, n, out_dtype, precision)
    return pl.pallas_call(
        launch.kernel,
        **launch.specs,
        compiler_params=_params(blocks),
        interpret=tpu_interpret(),
        name=_common.KERNEL_NAMES["pallas_tpu"][0],
    )(*launch.args)


def _xcorr_call(a4, b4, n, blocks, precision):
    """Run the cross-correlation kernel over rows [B, H, N1, N2] -> fp32 (scaled by N)."""
    launch = _common.xcorr_launch(a4, b4, n, precision)
    return pl.pallas_call(
        launch.kernel,
        **launch.specs,
        compiler_params=_params(blocks),
        interpret=tpu_interpret(),
        name=_common.KERNEL_NAMES["pallas_tpu"][1],
    )(*launch.args)


# Monarch-DFT fft_conv on Mosaic TPU (see `monarch`); N = ``fft_size``
# (raised to 256 when causal). Signature: (u, k, D=None, pregate=None, postgate=None, *,
# causal=True, fft_size, block_sizes=None, precision=HIGHEST); ``precision`` (a
# `jax.lax.Precision`) goes to every DFT matmul of the forward and backward kernels.
fft_conv_pallas_tpu = _common.make_fft_conv(_conv_call, _xcorr_call)
