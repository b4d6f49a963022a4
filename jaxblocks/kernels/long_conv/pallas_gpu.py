"""Pallas GPU (Triton backend) `fft_conv`.

One program per (batch, channel) row runs the fused Monarch-DFT convolution of
`monarch.make_conv_kernel` (FFT as 12 fp32 matmuls of √N × √N blocks, twiddles, complex as real
pairs, pointwise multiply, inverse, gates and D skip, all in registers). The DFT matmuls are IEEE
fp32 FMAs on CUDA cores at ``precision=HIGHEST`` (the default) and TF32 tensor-core products at
``DEFAULT`` ("tf32"). A program holds one whole row and the DFT factors in registers, so N is at
most 4096 (`_common.working_set`). The backward reuses the same kernel (conjugate filter) and the
cross-correlation kernel. The operands, block specs, custom VJP and cost are in `_common`; this
file adds the Triton launch parameters.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.interpret import gpu_interpret
from jaxblocks.kernels.long_conv import _common


def _params(n: int, blocks: _common.BlockSizes) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(
        num_warps=_common.num_warps(n, blocks), num_stages=blocks.num_stages
    )


def _conv_call(u4, pre4, post4, d3, kr, ki, n, out_dtype, blocks, precision):
    """Run the fused convolution kernel over rows [B, H, N1, N2]."""
    launch = _common.conv_launch(u4, pre4, post4, d3, kr, ki, n, out_dtype, precision)
    return pl.pallas_call(
        launch.kernel,
        **launch.specs,
        compiler_params=_params(n, blocks),
        interpret=gpu_interpret(),
        name=_common.KERNEL_NAMES["pallas_gpu"][0],
    )(*launch.args)


def _xcorr_call(a4, b4, n, blocks, precision):
    """Run the cross-correlation kernel over rows [B, H, N1, N2] -> fp32 (scaled by N)."""
    launch = _common.xcorr_launch(a4, b4, n, precision)
    return pl.pallas_call(
        launch.kernel,
        **launch.specs,
        compiler_params=_params(n, blocks),
        interpret=gpu_interpret(),
        name=_common.KERNEL_NAMES["pallas_gpu"][1],
    )(*launch.args)


# Monarch-DFT fft_conv on the Triton backend (see `monarch`); N = ``fft_size``
# (raised to 256 when causal). Signature: (u, k, D=None, pregate=None, postgate=None, *,
# causal=True, fft_size, block_sizes=None, precision=HIGHEST); ``precision`` (a
# `jax.lax.Precision`) goes to every DFT matmul of the forward and backward kernels.
fft_conv_pallas_gpu = _common.make_fft_conv(_conv_call, _xcorr_call)
