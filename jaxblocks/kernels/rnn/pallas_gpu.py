"""`flashrnn` as Pallas GPU kernels (Triton backend), after FlashRNN's fused kernel.

Grid ``(N, B / block_b)``: one program per head and batch tile. Each program loads the head's
recurrent matrices ``R[:, n]`` (Gr × D × D) and bias once and keeps them on chip for the whole
sequence, then loops over time inside the kernel, carrying the states in registers (fp32). The
backward kernel runs the same loop in reverse with R resident, recomputing the gate
pre-activations from the stored states, and accumulates ``dR`` and ``db`` for its batch tile in
fp32 (tiles are summed outside).

Triton needs power-of-two tiles and ``tl.dot`` needs each side ≥ 16, so the wrapper pads the head
dim to a power of two ≥ 16 and the batch to a multiple of ``block_b`` with zeros. Zero rows of R
keep padded lanes from reaching real ones; padded outputs are sliced off. Time needs no padding:
the kernel only ever loads one ``(block_b, D)`` tile of a step.

Every product (forward ``h R``, backward ``hᵀ dRy`` and ``dRy Rᵀ``) takes the op's ``precision``
for fp32 operands: HIGHEST lowers to ``tt.dot`` with ``inputPrecision = ieee`` (fp32 FMAs),
DEFAULT ("tf32") to TF32 tensor cores. bf16 operands are multiplied exactly either way.
Registers bound the head dim (`_common.working_set`): ``supports`` rejects a launch whose R
(plus dR in the backward) and state tiles exceed 255 registers per thread.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.interpret import gpu_interpret
from jaxblocks.kernels.rnn._common import (
    CELLS,
    MIN_TILE,
    BlockSizes,
    check_working_set,
    cost_estimate,
    default_block_sizes,
    dot_precision,
    finish,
    make_flashrnn,
    matmul_dtype,
    padded_head_dim,
    pointwise,
    pointwise_bwd,
    round_up,
    states_dtype,
)

_NN = ((1,), (0,))  # a @ b
_TN = ((0,), (0,))  # aᵀ @ b (Triton transposes a in registers)
_NT = ((1,), (1,))  # a @ bᵀ


def _mm(a, b, dims, dot_dtype, precision):
    """One product in ``dot_dtype`` with fp32 accumulation, at the op's ``precision`` (fp32)."""
    return jax.lax.dot_general(
        a.astype(dot_dtype),
        b.astype(dot_dtype),
        (dims, ((), ())),
        precision=dot_precision(dot_dtype, precision),
        preferred_element_type=jnp.float32,
    )


def _flashrnn_fwd_kernel(
    wx_ref, r_ref, b_ref, s0_ref, out_ref, *, function, T, dot_dtype, precision
):
    # wx_ref: (bB, T, G, D), r_ref: (Gr, D, D), b_ref: (Gb, D), s0_ref: (S, bB, D)
    # out_ref: (S, bB, T, D)
    cell = CELLS[function]
    f32 = jnp.float32
    r = [r_ref[g].astype(dot_dtype) for g in range(cell.Gr)]  # resident for all T: (D, D) each
    bias = [b_ref[g][None, :].astype(f32) for g in range(cell.Gb)]  # (1, D)
    s0 = tuple(s0_ref[k].astype(f32) for k in range(cell.S))  # (bB, D)

    def step(t, s):  # FlashRNN forward: Ry = h R (one dot per gate), then the pointwise cell
        ry = [_mm(s[0], r[g], _NN, dot_dtype, precision) for g in range(cell.Gr)]  # (bB,D)@(D,D)
        wx = [wx_ref[:, t, g, :].astype(f32) for g in range(cell.G)]  # (bB, D)
        new = pointwise(function, wx, ry, bias, s)
        for k in range(cell.S):
            out_ref[k, :, t, :] = new[k].astype(out_ref.dtype)
        return tuple(new)

    jax.lax.fori_loop(0, T, step, s0)


def _flashrnn_bwd_kernel(
    wx_ref,
    r_ref,
    b_ref,
    sprev_ref,
    dall_ref,
    dwx_ref,
    dr_ref,
    db_ref,
    ds0_ref,
    *,
    function,
    T,
    dot_dtype,
    precision,
):
    # wx_ref/dwx_ref: (bB, T, G, D); r_ref: (Gr, D, D); b_ref: (Gb, D)
    # sprev_ref: (S, bB, T, D) states before each step; dall_ref: (S, bB, T, D) cotangents
    # dr_ref: (Gr, D, D), db_ref: (Gb, D) partial sums of this batch tile; ds0_ref: (S, bB, D)
    cell = CELLS[function]
    f32 = jnp.float32
    r = [r_ref[g].astype(dot_dtype) for g in range(cell.Gr)]  # resident for all T
    bias = [b_ref[g][None, :].astype(f32) for g in range(cell.Gb)]
    bB, D = wx_ref.shape[0], wx_ref.shape[-1]
    delta0 = tuple(jnp.zeros((bB, D), f32) for _ in range(cell.S))
    dr0 = tuple(jnp.zeros((D, D), f32) for _ in range(cell.Gr))
    db0 = tuple(jnp.zeros((bB, D), f32) for _ in range(cell.Gb))

    def step(i, carry):  # reverse time: t = T-1 .. 0
        delta, dr, db = carry
        t = T - 1 - i
        sp = tuple(sprev_ref[k, :, t, :].astype(f32) for k in range(cell.S))  # s_{t-1}
        delta = tuple(delta[k] + dall_ref[k, :, t, :].astype(f32) for k in range(cell.S))
        ry = [_mm(sp[0], r[g], _NN, dot_dtype, precision) for g in range(cell.Gr)]  # recompute
        wx = [wx_ref[:, t, g, :].astype(f32) for g in range(cell.G)]
        d_wx, d_ry, d_b, d_sp = pointwise_bwd(function, wx, ry, bias, sp, delta)
        for g in range(cell.G):
            dwx_ref[:, t, g, :] = d_wx[g].astype(dwx_ref.dtype)
        # dR[g] += hᵀ dRy[g]: (D, bB) @ (bB, D);  dh += dRy[g] R[g]ᵀ: (bB, D) @ (D, D)
        dr = tuple(dr[g] + _mm(sp[0], d_ry[g], _TN, dot_dtype, precision) for g in range(cell.Gr))
        dh = d_sp[0]
        for g in range(cell.Gr):
            dh = dh + _mm(d_ry[g], r[g], _NT, dot_dtype, precision)
        db = tuple(db[g] + d_b[g] for g in range(cell.Gb))
        return (dh,) + tuple(d_sp[1:]), dr, db

    delta, dr, db = jax.lax.fori_loop(0, T, step, (delta0, dr0, db0))
    for g in range(cell.Gr):
        dr_ref[g] = dr[g]
    for g in range(cell.Gb):
        db_ref[g] = jnp.sum(db[g], axis=0)
    for k in range(cell.S):
        ds0_ref[k] = delta[k].astype(ds0_ref.dtype)


def _forward_call(wx, R, b, s0, function, blocks, precision):
    cell = CELLS[function]
    B, T, G, N, D = wx.shape
    bB = blocks.block_b
    kernel = functools.partial(
        _flashrnn_fwd_kernel, function=function, T=T, dot_dtype=matmul_dtype(R), precision=precision
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((cell.S, B, T, N, D), states_dtype(function, wx.dtype)),
        grid=(N, B // bB),
        in_specs=[
            pl.BlockSpec((bB, T, G, None, D), lambda n, i: (i, 0, 0, n, 0)),
            pl.BlockSpec((cell.Gr, None, D, D), lambda n, i: (0, n, 0, 0)),
            pl.BlockSpec((cell.Gb, None, D), lambda n, i: (0, n, 0)),
            pl.BlockSpec((cell.S, bB, None, D), lambda n, i: (0, i, n, 0)),
        ],
        out_specs=pl.BlockSpec((cell.S, bB, T, None, D), lambda n, i: (0, i, 0, n, 0)),
        compiler_params=pltriton.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        cost_estimate=cost_estimate(function, B, T, N, D, wx.dtype.itemsize),
        interpret=gpu_interpret(),
        name=f"flashrnn_{function}_fwd_gpu",
    )(wx, R, b, s0)


def _backward_call(wx, R, b, s_prev, d_all, function, blocks, precision):
    cell = CELLS[function]
    B, T, G, N, D = wx.shape
    bB = blocks.block_b
    nb = B // bB
    kernel = functools.partial(
        _flashrnn_bwd_kernel, function=function, T=T, dot_dtype=matmul_dtype(R), precision=precision
    )
    f32 = jnp.float32
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(wx.shape, wx.dtype),
            jax.ShapeDtypeStruct((nb, cell.Gr, N, D, D), f32),
            jax.ShapeDtypeStruct((nb, cell.Gb, N, D), f32),
            jax.ShapeDtypeStruct((cell.S, B, N, D), f32),
        ),
        grid=(N, nb),
        in_specs=[
            pl.BlockSpec((bB, T, G, None, D), lambda n, i: (i, 0, 0, n, 0)),
            pl.BlockSpec((cell.Gr, None, D, D), lambda n, i: (0, n, 0, 0)),
            pl.BlockSpec((cell.Gb, None, D), lambda n, i: (0, n, 0)),
            pl.BlockSpec((cell.S, bB, T, None, D), lambda n, i: (0, i, 0, n, 0)),
            pl.BlockSpec((cell.S, bB, T, None, D), lambda n, i: (0, i, 0, n, 0)),
        ],
        out_specs=(
            pl.BlockSpec((bB, T, G, None, D), lambda n, i: (i, 0, 0, n, 0)),
            pl.BlockSpec((None, cell.Gr, None, D, D), lambda n, i: (i, 0, n, 0, 0)),
            pl.BlockSpec((None, cell.Gb, None, D), lambda n, i: (i, 0, n, 0)),
            pl.BlockSpec((cell.S, bB, None, D), lambda n, i: (0, i, n, 0)),
        ),
        compiler_params=pltriton.CompilerParams(
            num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages
        ),
        cost_estimate=cost_estimate(function, B, T, N, D, wx.dtype.itemsize, backward=True),
        interpret=gpu_interpret(),
        name=f"flashrnn_{function}_bwd_gpu",
    )(wx, R, b, s_prev, d_all)


# time is axis 2 of [S, B, T, N, D]; dR/db partial sums per batch tile on axis 0
_flashrnn_padded = make_flashrnn(_forward_call, _backward_call, time_axis=2, tile_axis=0)


def supports(
    Wx,
    R,
    b,
    states,
    function: str,
    block_sizes: BlockSizes | None = None,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
):
    """None when the Triton kernels can take these inputs and fit an H100 SM, else why not."""
    blocks = default_block_sizes("pallas_gpu", block_sizes)
    if blocks.block_b < MIN_TILE:
        return f"block_b={blocks.block_b} < {MIN_TILE} (tl.dot needs >= 16 batch rows)"
    return check_working_set("pallas_gpu", Wx, R, function, blocks)


def flashrnn_pallas_gpu(
    Wx,
    R,
    b,
    states,
    function: str,
    blocks: BlockSizes | None = None,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
):
    """`flashrnn` with the Triton kernels; pads B and D, runs, slices back."""
    blocks = default_block_sizes("pallas_gpu", blocks)
    B, T, G, N, D = Wx.shape
    Dp = padded_head_dim(D)
    Bp = round_up(B, blocks.block_b)
    pd, pb = Dp - D, Bp - B
    wx = jnp.pad(Wx, ((0, pb), (0, 0), (0, 0), (0, 0), (0, pd)))
    r = jnp.pad(R, ((0, 0), (0, 0), (0, pd), (0, pd)))
    bb = jnp.pad(b, ((0, 0), (0, 0), (0, pd)))
    s0 = jnp.pad(states, ((0, 0), (0, pb), (0, 0), (0, pd)))
    states_all = _flashrnn_padded(wx, r, bb, s0, function, blocks, precision)
    return finish(states_all[:, :B, :, :, :D], Wx.dtype)
