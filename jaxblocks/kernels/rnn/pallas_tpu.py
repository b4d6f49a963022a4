"""`flashrnn` as Pallas TPU (Mosaic) kernels: time is the innermost, sequential grid axis.

Grid ``(N, B / block_b, T / block_t)`` with dimension semantics (parallel, parallel, arbitrary).
The kernel layout is head-major and batch-last-but-one, so every block's two minor dims are
``(block_b, D)`` (TPU tiles are (8, 128); a full D or full batch is always legal):

    Wx  [N, T, G, B, D]   block (block_t, G, block_b, D)
    R   [N, Gr, D, D]     block (Gr, D, D)            same block for every t: DMA'd once per head
    b   [N, Gb, 1, D]     block (Gb, 1, D)
    s0  [N, S, B, D]      block (S, block_b, D)
    out [N, T, S, B, D]   block (block_t, S, block_b, D)

Each grid step runs ``block_t`` time steps in a loop; the states live in a VMEM scratch (fp32)
that is carried from one time block to the next (initialised at t-block 0). The backward grid
visits the time blocks in reverse and carries the state cotangents, ``dR`` and ``db`` in VMEM
scratch, writing ``dR``/``db`` (per batch tile, summed outside) and ``d states0`` at the end.
The wrapper pads T to a multiple of ``block_t`` (at the end: padded steps never influence real
ones, and get zero cotangents) and B to a multiple of ``block_b`` when B > ``block_b``.

Every product (forward ``h R``, backward ``hᵀ dRy`` and ``dRy Rᵀ``) takes the op's ``precision``
for fp32 operands: HIGHEST is Mosaic's multi-pass bf16 (fp32-accurate), DEFAULT ("tf32") one bf16
pass. ``supports`` rejects blocks whose VMEM (`_common.working_set`) exceeds 16 MiB, Mosaic's
default scoped-VMEM limit on v4/v5e (the kernels do not raise it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.interpret import tpu_interpret
from jaxblocks.kernels.rnn._common import (
    CELLS,
    BlockSizes,
    check_working_set,
    cost_estimate,
    default_block_sizes,
    dot_precision,
    finish,
    make_flashrnn,
    matmul_dtype,
    pointwise,
    pointwise_bwd,
    round_up,
    states_dtype,
    tpu_tiling,
)


def _mm(a, b, dims, dot_dtype, precision):
    """One product in ``dot_dtype`` with fp32 accumulation, at the op's ``precision`` (fp32)."""
    return jax.lax.dot_general(
        a.astype(dot_dtype),
        b.astype(dot_dtype),
        (dims, ((), ())),
        precision=dot_precision(dot_dtype, precision),
        preferred_element_type=jnp.float32,
    )


_NN = ((1,), (0,))  # a @ b
_TN = ((0,), (0,))  # aᵀ @ b
_NT = ((1,), (1,))  # a @ bᵀ


def _flashrnn_fwd_kernel(
    wx_ref, r_ref, b_ref, s0_ref, out_ref, s_scr, *, function, block_t, dot_dtype, precision
):
    # wx_ref: (bT, G, bB, D), r_ref: (Gr, D, D), b_ref: (Gb, 1, D), s0_ref: (S, bB, D)
    # out_ref: (bT, S, bB, D), s_scr: (S, bB, D) fp32, carried across the time grid axis
    cell = CELLS[function]
    f32 = jnp.float32

    @pl.when(pl.program_id(2) == 0)
    def _init():
        s_scr[...] = s0_ref[...].astype(f32)

    bias = [b_ref[g].astype(f32) for g in range(cell.Gb)]  # (1, D)

    def step(t, s):  # FlashRNN forward: Ry = h R per gate, then the pointwise cell
        ry = [
            _mm(s[0], r_ref[g], _NN, dot_dtype, precision) for g in range(cell.Gr)
        ]  # (bB,D)@(D,D)
        wx = [wx_ref[t, g].astype(f32) for g in range(cell.G)]  # (bB, D)
        new = pointwise(function, wx, ry, bias, s)
        for k in range(cell.S):
            out_ref[t, k] = new[k].astype(out_ref.dtype)
        return tuple(new)

    s = jax.lax.fori_loop(0, block_t, step, tuple(s_scr[k] for k in range(cell.S)))
    for k in range(cell.S):
        s_scr[k] = s[k]


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
    delta_scr,
    dr_scr,
    db_scr,
    *,
    function,
    block_t,
    dot_dtype,
    precision,
):
    # wx_ref/dwx_ref: (bT, G, bB, D); sprev_ref/dall_ref: (bT, S, bB, D); r_ref/dr_ref: (Gr, D, D)
    # b_ref/db_ref: (Gb, 1, D); ds0_ref: (S, bB, D); scratch: delta (S, bB, D), dR, db (fp32)
    cell = CELLS[function]
    f32 = jnp.float32
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        delta_scr[...] = jnp.zeros_like(delta_scr)
        dr_scr[...] = jnp.zeros_like(dr_scr)
        db_scr[...] = jnp.zeros_like(db_scr)

    bias = [b_ref[g].astype(f32) for g in range(cell.Gb)]

    def step(i, delta):  # reverse time inside the (already reversed) time block
        t = block_t - 1 - i
        sp = tuple(sprev_ref[t, k].astype(f32) for k in range(cell.S))  # s_{t-1}: (bB, D)
        delta = tuple(delta[k] + dall_ref[t, k].astype(f32) for k in range(cell.S))
        ry = [_mm(sp[0], r_ref[g], _NN, dot_dtype, precision) for g in range(cell.Gr)]  # recompute
        wx = [wx_ref[t, g].astype(f32) for g in range(cell.G)]
        d_wx, d_ry, d_b, d_sp = pointwise_bwd(function, wx, ry, bias, sp, delta)
        for g in range(cell.G):
            dwx_ref[t, g] = d_wx[g].astype(dwx_ref.dtype)
        dh = d_sp[0]
        for g in range(cell.Gr):
            dr_scr[g] += _mm(sp[0], d_ry[g], _TN, dot_dtype, precision)  # hᵀ dRy: (D,bB)@(bB,D)
            dh = dh + _mm(d_ry[g], r_ref[g], _NT, dot_dtype, precision)  # dRy Rᵀ: (bB,D)@(D,D)
        for g in range(cell.Gb):
            db_scr[g] += jnp.sum(d_b[g], axis=0, keepdims=True)  # (1, D)
        return (dh,) + tuple(d_sp[1:])

    delta = jax.lax.fori_loop(0, block_t, step, tuple(delta_scr[k] for k in range(cell.S)))
    for k in range(cell.S):
        delta_scr[k] = delta[k]

    @pl.when(j == pl.num_programs(2) - 1)
    def _finalize():
        dr_ref[...] = dr_scr[...]
        db_ref[...] = db_scr[...]
        ds0_ref[...] = delta_scr[...].astype(ds0_ref.dtype)


def _forward_call(wx, R, b, s0, function, tiling, precision):
    # wx [N, T, G, B, D], R [N, Gr, D, D], b [N, Gb, 1, D], s0 [N, S, B, D]
    bT, bB = tiling
    cell = CELLS[function]
    N, T, G, B, D = wx.shape
    kernel = functools.partial(
        _flashrnn_fwd_kernel,
        function=function,
        block_t=bT,
        dot_dtype=matmul_dtype(R),
        precision=precision,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((N, T, cell.S, B, D), states_dtype(function, wx.dtype)),
        grid=(N, B // bB, T // bT),
        in_specs=[
            pl.BlockSpec((None, bT, G, bB, D), lambda n, i, j: (n, j, 0, i, 0)),
            pl.BlockSpec((None, cell.Gr, D, D), lambda n, i, j: (n, 0, 0, 0)),
            pl.BlockSpec((None, cell.Gb, 1, D), lambda n, i, j: (n, 0, 0, 0)),
            pl.BlockSpec((None, cell.S, bB, D), lambda n, i, j: (n, 0, i, 0)),
        ],
        out_specs=pl.BlockSpec((None, bT, cell.S, bB, D), lambda n, i, j: (n, j, 0, i, 0)),
        scratch_shapes=[pltpu.VMEM((cell.S, bB, D), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=cost_estimate(function, B, T, N, D, wx.dtype.itemsize),
        interpret=tpu_interpret(),
        name=f"flashrnn_{function}_fwd_tpu",
    )(wx, R, b, s0)


def _backward_call(wx, R, b, s_prev, d_all, function, tiling, precision):
    bT, bB = tiling
    cell = CELLS[function]
    N, T, G, B, D = wx.shape
    nb, nt = B // bB, T // bT
    kernel = functools.partial(
        _flashrnn_bwd_kernel,
        function=function,
        block_t=bT,
        dot_dtype=matmul_dtype(R),
        precision=precision,
    )
    f32 = jnp.float32
    rev = lambda n, i, j: (n, nt - 1 - j, 0, i, 0)  # noqa: E731  time blocks in reverse
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(wx.shape, wx.dtype),
            jax.ShapeDtypeStruct((N, nb, cell.Gr, D, D), f32),
            jax.ShapeDtypeStruct((N, nb, cell.Gb, 1, D), f32),
            jax.ShapeDtypeStruct((N, cell.S, B, D), f32),
        ),
        grid=(N, nb, nt),
        in_specs=[
            pl.BlockSpec((None, bT, G, bB, D), rev),
            pl.BlockSpec((None, cell.Gr, D, D), lambda n, i, j: (n, 0, 0, 0)),
            pl.BlockSpec((None, cell.Gb, 1, D), lambda n, i, j: (n, 0, 0, 0)),
            pl.BlockSpec((None, bT, cell.S, bB, D), rev),
            pl.BlockSpec((None, bT, cell.S, bB, D), rev),
        ],
        out_specs=(
            pl.BlockSpec((None, bT, G, bB, D), rev),
            pl.BlockSpec((None, None, cell.Gr, D, D), lambda n, i, j: (n, i, 0, 0, 0)),
            pl.BlockSpec((None, None, cell.Gb, 1, D), lambda n, i, j: (n, i, 0, 0, 0)),
            pl.BlockSpec((None, cell.S, bB, D), lambda n, i, j: (n, 0, i, 0)),
        ),
        scratch_shapes=[
            pltpu.VMEM((cell.S, bB, D), f32),
            pltpu.VMEM((cell.Gr, D, D), f32),
            pltpu.VMEM((cell.Gb, 1, D), f32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=cost_estimate(function, B, T, N, D, wx.dtype.itemsize, backward=True),
        interpret=tpu_interpret(),
        name=f"flashrnn_{function}_bwd_tpu",
    )(wx, R, b, s_prev, d_all)


# time is axis 1 of [N, T, S, B, D]; dR/db partial sums per batch tile on axis 1
_flashrnn_tiled = make_flashrnn(_forward_call, _backward_call, time_axis=1, tile_axis=1)


def supports(
    Wx,
    R,
    b,
    states,
    function: str,
    block_sizes: BlockSizes | None = None,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
):
    """None when the Mosaic kernels' blocks fit a v5e core's scoped VMEM, else why not."""
    return check_working_set("pallas_tpu", Wx, R, function, block_sizes)


def flashrnn_pallas_tpu(
    Wx,
    R,
    b,
    states,
    function: str,
    blocks: BlockSizes | None = None,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
):
    """`flashrnn` with the Mosaic kernels: transposes to the kernel layout, pads T (and B)."""
    blocks = default_block_sizes("pallas_tpu", blocks)
    B, T, G, N, D = Wx.shape
    bT, bB = tpu_tiling(B, T, blocks)
    Tp, Bp = round_up(T, bT), round_up(B, bB)
    wx = jnp.transpose(Wx, (3, 1, 2, 0, 4))  # [N, T, G, B, D]
    wx = jnp.pad(wx, ((0, 0), (0, Tp - T), (0, 0), (0, Bp - B), (0, 0)))
    r = jnp.transpose(R, (1, 0, 2, 3))  # [N, Gr, D, D]
    bb = jnp.transpose(b, (1, 0, 2))[:, :, None]  # [N, Gb, 1, D]
    s0 = jnp.pad(jnp.transpose(states, (2, 0, 1, 3)), ((0, 0), (0, 0), (0, Bp - B), (0, 0)))
    out = _flashrnn_tiled(wx, r, bb, s0, function, (bT, bB), precision)  # [N, Tp, S, Bp, D]
    return finish(jnp.transpose(out[:, :T, :, :B], (2, 3, 1, 0, 4)), Wx.dtype)
