"""Pallas GPU (Triton backend) `causal_conv1d`.

One program per (batch, ``block_c``-channel block) walks time in tiles of ``block_t`` rows,
loading the W shifted windows of each tile straight from the input, zero-padded by `MAX_TAPS`
rows on the left. Padding, the custom VJP and the gradients are in `_common`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.causal_conv1d import _common
from jaxblocks.kernels.causal_conv1d._common import MAX_TAPS
from jaxblocks.kernels.interpret import gpu_interpret


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


def _short_conv_call(x, w, bias, silu, blocks: _common.BlockSizes):
    B, T, C = x.shape
    taps = w.shape[0]
    bt, bc = blocks.block_t, blocks.block_c
    num_tiles = -(-T // bt)
    tx = _common.next_pow2(MAX_TAPS + num_tiles * bt)  # Triton blocks are powers of two
    to = _common.next_pow2(num_tiles * bt)
    cp = _common.round_up(C, bc)
    xp = jnp.pad(x, ((0, 0), (MAX_TAPS, tx - MAX_TAPS - T), (0, cp - C)))  # [B, Tx, Cp]
    wp = jnp.pad(w, ((0, MAX_TAPS - taps), (0, cp - C)))  # [MAX_TAPS, Cp]
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
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
        interpret=gpu_interpret(),
        cost_estimate=_common.cost_estimate(x, w, silu, x_reads=1),
        name=_common.KERNEL_NAMES["pallas_gpu"],
    )(xp, wp, _common.bias_row(bias, cp))
    return y[:, :T, :C]


_causal_conv1d = _common.make_causal_conv1d(_short_conv_call)


def supports(x, w, bias=None, activation=None, *, block_sizes=None, precision=None):
    """None when the Triton kernel takes these block sizes, else the reason."""
    return _common.supports(
        "pallas_gpu", x, w, bias, activation, block_sizes=block_sizes, precision=precision
    )


def causal_conv1d_pallas_gpu(x, w, bias=None, activation=None, *, block_sizes=None, precision=None):
    """Depthwise causal conv on the Triton backend (``x`` [B, T, C], ``w`` [W, C]).

    The kernel is elementwise (W fp32 multiply-adds per output, no matrix products):
    ``precision`` is accepted for the op's uniform signature and changes nothing.
    """
    del precision
    blocks = _common.default_block_sizes("pallas_gpu", block_sizes)
    return _causal_conv1d(x, w, bias, activation == "silu", blocks)
