"""Pallas GPU (Triton backend) long convolutions.

`fft_conv_pallas_gpu`: one program per (batch, channel) row runs the fused Monarch-DFT
convolution of `monarch.make_conv_kernel` (FFT as 12 fp32 matmuls of √N × √N blocks, twiddles,
complex as real pairs, pointwise multiply, inverse, gates and D skip, all in registers/SMEM).
The backward reuses the same kernel (conjugate filter) and the cross-correlation kernel.

`causal_conv1d_pallas_gpu`: one program per (batch, 32-channel block) walks time in tiles of
``block_t`` rows, loading the W shifted windows of each tile straight from the zero-padded input.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.interpret import gpu_interpret
from jaxblocks.kernels.long_conv import monarch

MAX_TAPS = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """causal_conv1d tiles: ``block_t`` time rows × ``block_c`` channels (powers of two)."""

    block_t: int = 64
    block_c: int = 32

    def __post_init__(self):
        for name in ("block_t", "block_c"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {v}")


def _num_warps(n: int) -> int:
    return 4 if n <= 4096 else 8


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
        compiler_params=pltriton.CompilerParams(num_warps=_num_warps(n), num_stages=1),
        interpret=gpu_interpret(),
        cost_estimate=pl.CostEstimate(transcendentals=0, **monarch.cost(B * H, n, 12, io)),
        name="fft_conv_monarch_gpu",
    )(*args)


def _xcorr_call(a4, b4, n):
    """Run the cross-correlation kernel over rows [B, H, N1, N2] -> fp32 (scaled by N)."""
    B, H, n1, n2 = a4.shape
    row = pl.BlockSpec((None, None, n1, n2), lambda b, h: (b, h, 0, 0))
    io = 3 * B * H * n * 4
    return pl.pallas_call(
        monarch.xcorr_kernel,
        out_shape=jax.ShapeDtypeStruct(a4.shape, jnp.float32),
        grid=(B, H),
        in_specs=[row, row, *_factor_specs(n)],
        out_specs=row,
        compiler_params=pltriton.CompilerParams(num_warps=_num_warps(n), num_stages=1),
        interpret=gpu_interpret(),
        cost_estimate=pl.CostEstimate(transcendentals=0, **monarch.cost(B * H, n, 18, io)),
        name="fft_xcorr_monarch_gpu",
    )(a4, b4, *monarch.factors(n))


_fft_conv = monarch.make_fft_conv(_conv_call, _xcorr_call)


def fft_conv_pallas_gpu(u, k, D=None, pregate=None, postgate=None, *, causal=True, fft_size):
    """Monarch-DFT fft_conv on the Triton backend (see `monarch`); N = ``fft_size``."""
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


def _short_conv_kernel(x_ref, w_ref, b_ref, o_ref, *, taps, block_t, num_tiles, silu):
    """x_ref: [Tx, bc] (MAX_TAPS zeros on the left), w_ref: [MAX_TAPS, bc], b_ref: [1, bc]."""
    bias = b_ref[...].astype(jnp.float32)  # [1, bc]

    def tile(i, carry):
        # Output rows [i·bt, (i+1)·bt) need inputs from W − 1 rows back: W shifted windows.
        acc = jnp.zeros((block_t, x_ref.shape[1]), jnp.float32) + bias  # [bt, bc]
        for j in range(taps):
            start = i * block_t + MAX_TAPS - (taps - 1) + j
            xs = x_ref[pl.ds(start, block_t), :].astype(jnp.float32)  # [bt, bc]
            acc = acc + w_ref[pl.ds(j, 1), :].astype(jnp.float32) * xs  # [1, bc] * [bt, bc]
        if silu:
            acc = acc * jax.nn.sigmoid(acc)
        o_ref[pl.ds(i * block_t, block_t), :] = acc.astype(o_ref.dtype)
        return carry

    jax.lax.fori_loop(0, num_tiles, tile, 0)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _short_conv_call(x, w, bias, silu, block_sizes: BlockSizes = BlockSizes()):
    B, T, C = x.shape
    taps = w.shape[0]
    bt, bc = block_sizes.block_t, block_sizes.block_c
    num_tiles = -(-T // bt)
    tx = _next_pow2(MAX_TAPS + num_tiles * bt)  # Triton blocks are powers of two
    to = _next_pow2(num_tiles * bt)
    cp = -(-C // bc) * bc
    xp = jnp.pad(x, ((0, 0), (MAX_TAPS, tx - MAX_TAPS - T), (0, cp - C)))  # [B, Tx, Cp]
    wp = jnp.pad(w, ((0, MAX_TAPS - taps), (0, cp - C)))  # [MAX_TAPS, Cp]
    bp = (
        jnp.zeros((1, cp), jnp.float32)
        if bias is None
        else jnp.pad(bias[None], ((0, 0), (0, cp - C)))
    )
    kernel = functools.partial(
        _short_conv_kernel, taps=taps, block_t=bt, num_tiles=num_tiles, silu=silu
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, to, cp), x.dtype),
        grid=(B, cp // bc),
        in_specs=[
            pl.BlockSpec((None, tx, bc), lambda b, c: (b, 0, c)),
            pl.BlockSpec((MAX_TAPS, bc), lambda b, c: (0, c)),
            pl.BlockSpec((1, bc), lambda b, c: (0, c)),
        ],
        out_specs=pl.BlockSpec((None, to, bc), lambda b, c: (b, 0, c)),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=gpu_interpret(),
        cost_estimate=pl.CostEstimate(
            flops=2 * B * T * C * taps,
            transcendentals=B * T * C if silu else 0,
            bytes_accessed=2 * x.size * x.dtype.itemsize + w.size * 4,
        ),
        name="causal_conv1d_gpu",
    )(xp, wp, bp)
    return y[:, :T, :C]


def make_causal_conv1d(call):
    """custom_vjp around a short-conv launcher ``call(x, w, bias, silu)``.

    Backward: with g = dy ⊙ act'(pre), dx[t] = Σ_j w[j] g[t + W − 1 − j] is the same causal
    convolution run on time-reversed g (``flip(call(flip(g), w))``); dw[j] = Σ g[t] x[t − W + 1 + j]
    and dbias = Σ g are W + 1 small reductions left to XLA.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def fn(x, w, bias, silu):
        return call(x, w, bias, silu)

    def fn_fwd(x, w, bias, silu):
        pre = call(x, w, bias, False) if silu else None
        y = (
            call(x, w, bias, silu)
            if pre is None
            else (jax.nn.silu(pre.astype(jnp.float32))).astype(x.dtype)
        )
        return y, (x, w, bias, pre)

    def fn_bwd(silu, res, dy):
        x, w, bias, pre = res
        g = dy.astype(jnp.float32)
        if silu:
            p = pre.astype(jnp.float32)
            s = jax.nn.sigmoid(p)
            g = g * s * (1 + p * (1 - s))
        dx = jnp.flip(call(jnp.flip(g, 1), w.astype(jnp.float32), None, False), 1)
        W, T = w.shape[0], x.shape[1]
        xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (W - 1, 0), (0, 0)))  # [B, T + W - 1, C]
        dw = jnp.stack([jnp.sum(g * xp[:, j : j + T], axis=(0, 1)) for j in range(W)])  # [W, C]
        db = None if bias is None else jnp.sum(g, axis=(0, 1)).astype(bias.dtype)
        return dx.astype(x.dtype), dw.astype(w.dtype), db

    fn.defvjp(fn_fwd, fn_bwd)
    return fn


_causal_conv1d = make_causal_conv1d(_short_conv_call)


def causal_conv1d_pallas_gpu(x, w, bias=None, activation=None):
    """Depthwise causal conv on the Triton backend (``x`` [B, T, C], ``w`` [W, C])."""
    return _causal_conv1d(x, w, bias, activation == "silu")
