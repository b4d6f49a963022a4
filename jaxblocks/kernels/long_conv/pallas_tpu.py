"""Pallas TPU (Mosaic) long convolutions.

`fft_conv_pallas_tpu`: grid (B, H), both axes parallel; each step holds one row as an
[N1, N2] tile (the full trailing dims, so any power-of-two N obeys the (8, 128) rule) and runs the
fused Monarch-DFT convolution of `monarch.make_conv_kernel` on the MXU: 12 fp32 matmuls of
√N × √N blocks (N = 64K: 256 × 256, a good MXU shape), twiddles and the filter product on the VPU.
The backward reuses the kernel (conjugate filter) and the cross-correlation kernel.

`causal_conv1d_pallas_tpu`: grid (B, C/128, T/block_t). Each step sees its own time tile and
the previous one (the input is padded on the left by one tile), copies both into a fp32 VMEM
scratch and reads the W shifted windows from it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.interpret import tpu_interpret
from jaxblocks.kernels.long_conv import monarch
from jaxblocks.kernels.long_conv.pallas_gpu import make_causal_conv1d

LANES = 128
# N = 64K holds ~20 [256, 256] fp32 tiles (inputs double-buffered, factors, spectra): ~6 MiB.
VMEM_LIMIT_BYTES = 48 * 2**20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """causal_conv1d time tile ``block_t`` (a multiple of 8, ≥ the taps − 1)."""

    block_t: int = 256

    def __post_init__(self):
        if self.block_t % 8 or self.block_t < 8:
            raise ValueError(
                f"BlockSizes.block_t must be a positive multiple of 8, got {self.block_t}"
            )


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=VMEM_LIMIT_BYTES
    )


def _factor_specs(n: int):
    n1, n2 = monarch.split(n)
    full = lambda s: pl.BlockSpec(s, lambda b, h: (0, 0))
    return [full((n1, n1)), full((n1, n1)), full((n2, n2)), full((n2, n2))] + [full((n1, n2))] * 2


def _conv_call(u4, pre4, post4, d3, kr, ki, n, out_dtype):
    """Run the fused convolution kernel over rows [B, H, N1, N2]."""
    B, H, n1, n2 = u4.shape
    row = pl.BlockSpec((None, None, n1, n2), lambda b, h: (b, h, 0, 0))
    per_h = pl.BlockSpec((None, n1, n2), lambda b, h: (h, 0, 0))
    args, specs = [u4], [row]
    for g in (pre4, post4):
        if g is not None:
            args.append(g)
            specs.append(row)
    if d3 is not None:
        args.append(d3)
        specs.append(pl.BlockSpec((None, 1, n2), lambda b, h: (h, 0, 0)))
    args += [kr, ki, *monarch.factors(n)]
    specs += [per_h, per_h, *_factor_specs(n)]
    io = sum(a.size * a.dtype.itemsize for a in args[: len(args) - 6])
    io += B * H * n * jnp.dtype(out_dtype).itemsize
    kernel = monarch.make_conv_kernel(pre4 is not None, post4 is not None, d3 is not None)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(u4.shape, out_dtype),
        grid=(B, H),
        in_specs=specs,
        out_specs=row,
        compiler_params=_params(),
        interpret=tpu_interpret(),
        cost_estimate=pl.CostEstimate(transcendentals=0, **monarch.cost(B * H, n, 12, io)),
        name="fft_conv_monarch_tpu",
    )(*args)


def _xcorr_call(a4, b4, n):
    """Run the cross-correlation kernel over rows [B, H, N1, N2] -> fp32 (scaled by N)."""
    B, H, n1, n2 = a4.shape
    row = pl.BlockSpec((None, None, n1, n2), lambda b, h: (b, h, 0, 0))
    return pl.pallas_call(
        monarch.xcorr_kernel,
        out_shape=jax.ShapeDtypeStruct(a4.shape, jnp.float32),
        grid=(B, H),
        in_specs=[row, row, *_factor_specs(n)],
        out_specs=row,
        compiler_params=_params(),
        interpret=tpu_interpret(),
        cost_estimate=pl.CostEstimate(
            transcendentals=0, **monarch.cost(B * H, n, 18, 3 * B * H * n * 4)
        ),
        name="fft_xcorr_monarch_tpu",
    )(a4, b4, *monarch.factors(n))


_fft_conv = monarch.make_fft_conv(_conv_call, _xcorr_call)


def fft_conv_pallas_tpu(u, k, D=None, pregate=None, postgate=None, *, causal=True, fft_size):
    """Monarch-DFT fft_conv on Mosaic TPU (see `monarch`); N = ``fft_size``."""
    n = max(fft_size, monarch.MIN_FFT_SIZE) if causal else fft_size
    return _fft_conv(u, k, D, pregate, postgate, n)


def supports_fft_conv(u, k, D=None, pregate=None, postgate=None, *, causal=True, fft_size):
    n = max(fft_size, monarch.MIN_FFT_SIZE) if causal else fft_size
    if not monarch.is_supported_size(n):
        return (
            f"fft_size={n} must be a power of two in "
            f"[{monarch.MIN_FFT_SIZE}, {monarch.MAX_FFT_SIZE}]"
        )
    return None


# ---------------------------------------------------------------------------------------------
# causal_conv1d
# ---------------------------------------------------------------------------------------------


def _short_conv_kernel(prev_ref, cur_ref, w_ref, b_ref, o_ref, buf_ref, *, taps, silu):
    """prev/cur: [bt, 128] time tiles i−1 and i; w: [taps, 128]; b: [1, 128]; buf: [2bt, 128]."""
    bt = cur_ref.shape[0]
    buf_ref[pl.ds(0, bt), :] = prev_ref[...].astype(jnp.float32)
    buf_ref[pl.ds(bt, bt), :] = cur_ref[...].astype(jnp.float32)
    acc = jnp.zeros(cur_ref.shape, jnp.float32) + b_ref[...].astype(jnp.float32)  # [bt, 128]
    for j in range(taps):
        # Tap j reads input t − (W − 1) + j: the window of buf starting W − 1 − j rows early.
        xs = buf_ref[pl.ds(bt - (taps - 1) + j, bt), :]  # [bt, 128]
        acc = acc + w_ref[pl.ds(j, 1), :].astype(jnp.float32) * xs
    if silu:
        acc = acc * jax.nn.sigmoid(acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _short_conv_call(x, w, bias, silu, block_sizes: BlockSizes = BlockSizes()):
    B, T, C = x.shape
    taps = w.shape[0]
    bt = min(block_sizes.block_t, -(-T // 8) * 8)
    nt = -(-T // bt)
    cp = -(-C // LANES) * LANES
    xp = jnp.pad(x, ((0, 0), (bt, nt * bt - T), (0, cp - C)))  # [B, (nt + 1)·bt, Cp]
    wp = jnp.pad(w, ((0, 0), (0, cp - C)))  # [W, Cp]
    bp = (
        jnp.zeros((1, cp), jnp.float32)
        if bias is None
        else jnp.pad(bias[None], ((0, 0), (0, cp - C)))
    )
    tile = lambda off: pl.BlockSpec((None, bt, LANES), lambda b, c, t: (b, t + off, c))
    y = pl.pallas_call(
        functools.partial(_short_conv_kernel, taps=taps, silu=silu),
        out_shape=jax.ShapeDtypeStruct((B, nt * bt, cp), x.dtype),
        grid=(B, cp // LANES, nt),
        in_specs=[
            tile(0),
            tile(1),
            pl.BlockSpec((taps, LANES), lambda b, c, t: (0, c)),
            pl.BlockSpec((1, LANES), lambda b, c, t: (0, c)),
        ],
        out_specs=pl.BlockSpec((None, bt, LANES), lambda b, c, t: (b, t, c)),
        scratch_shapes=[pltpu.VMEM((2 * bt, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        interpret=tpu_interpret(),
        cost_estimate=pl.CostEstimate(
            flops=2 * B * T * C * taps,
            transcendentals=B * T * C if silu else 0,
            bytes_accessed=3 * x.size * x.dtype.itemsize + w.size * 4,
        ),
        name="causal_conv1d_tpu",
    )(xp, xp, wp, bp)
    return y[:, :T, :C]


_causal_conv1d = make_causal_conv1d(_short_conv_call)


def causal_conv1d_pallas_tpu(x, w, bias=None, activation=None):
    """Depthwise causal conv on Mosaic TPU (``x`` [B, T, C], ``w`` [W, C])."""
    return _causal_conv1d(x, w, bias, activation == "silu")
