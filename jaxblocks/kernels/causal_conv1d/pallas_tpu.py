"""Pallas TPU (Mosaic) `causal_conv1d`.

Grid (B, C/block_c, T/block_t), all parallel. Each step sees its own time tile and the previous
one (the input is padded on the left by one tile), copies both into a fp32 VMEM scratch and reads
the W shifted windows from it. Padding, the custom VJP and the gradients are in `_common`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.causal_conv1d import _common
from jaxblocks.kernels.interpret import tpu_interpret


def _short_conv_kernel(prev_ref, cur_ref, w_ref, b_ref, o_ref, buf_ref, *, taps, silu):
    """prev/cur: [bt, bc] time tiles i−1 and i; w: [taps, bc]; b: [1, bc]; buf: [2bt, bc]."""
    bt = cur_ref.shape[0]
    buf_ref[pl.ds(0, bt), :] = prev_ref[...].astype(jnp.float32)
    buf_ref[pl.ds(bt, bt), :] = cur_ref[...].astype(jnp.float32)
    acc = jnp.zeros(cur_ref.shape, jnp.float32) + b_ref[...].astype(jnp.float32)  # [bt, bc]
    for j in range(taps):
        # Tap j reads input t − (W − 1) + j: the window of buf starting W − 1 − j rows early.
        xs = buf_ref[pl.ds(bt - (taps - 1) + j, bt), :]  # [bt, bc]
        acc = acc + w_ref[pl.ds(j, 1), :].astype(jnp.float32) * xs
    if silu:
        acc = acc * jax.nn.sigmoid(acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _short_conv_call(x, w, bias, silu, blocks: _common.BlockSizes):
    B, T, C = x.shape
    taps = w.shape[0]
    # A multiple of 8 (the sublanes) >= taps - 1, so the previous tile holds every look-back.
    bt = min(blocks.block_t, _common.round_up(T, 8))
    bc = blocks.block_c
    nt = -(-T // bt)
    cp = _common.round_up(C, bc)
    xp = jnp.pad(x, ((0, 0), (bt, nt * bt - T), (0, cp - C)))  # [B, (nt + 1)·bt, Cp]
    wp = jnp.pad(w, ((0, 0), (0, cp - C)))  # [W, Cp]
    tile = lambda off: pl.BlockSpec((None, bt, bc), lambda b, c, t: (b, t + off, c))
    y = pl.pallas_call(
        functools.partial(_short_conv_kernel, taps=taps, silu=silu),
        out_shape=jax.ShapeDtypeStruct((B, nt * bt, cp), x.dtype),
        grid=(B, cp // bc, nt),
        in_specs=[
            tile(0),
            tile(1),
            pl.BlockSpec((taps, bc), lambda b, c, t: (0, c)),
            pl.BlockSpec((1, bc), lambda b, c, t: (0, c)),
        ],
        out_specs=pl.BlockSpec((None, bt, bc), lambda b, c, t: (b, t, c)),
        scratch_shapes=[pltpu.VMEM((2 * bt, bc), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        interpret=tpu_interpret(),
        cost_estimate=_common.cost_estimate(x, w, silu, x_reads=2),
        name=_common.KERNEL_NAMES["pallas_tpu"],
    )(xp, xp, wp, _common.bias_row(bias, cp))
    return y[:, :T, :C]


_causal_conv1d = _common.make_causal_conv1d(_short_conv_call)


def supports(x, w, bias=None, activation=None, *, block_sizes=None, precision=None):
    """None when the Mosaic kernel takes these block sizes, else the reason."""
    return _common.supports(
        "pallas_tpu", x, w, bias, activation, block_sizes=block_sizes, precision=precision
    )


def causal_conv1d_pallas_tpu(x, w, bias=None, activation=None, *, block_sizes=None, precision=None):
    """Depthwise causal conv on Mosaic TPU (``x`` [B, T, C], ``w`` [W, C]).

    The kernel is elementwise (W fp32 multiply-adds per output on the VPU, no matrix products):
    ``precision`` is accepted for the op's uniform signature and changes nothing.
    """
    del precision
    blocks = _common.default_block_sizes("pallas_tpu", block_sizes)
    return _causal_conv1d(x, w, bias, activation == "silu", blocks)
