"""Pallas TPU (Mosaic) `pointwise_conv_bn`: a tiled matmul whose reduction runs over an
"arbitrary" grid axis into a VMEM fp32 accumulator, with the BatchNorm fold in the prologue
(each weight tile scaled in fp32 before the MXU) and bias + activation in the epilogue (on the
last reduction step), plus a custom VJP with two backward kernels:

    forward  grid (M/bm, C_out/bn, C_in/bk):  acc += x_tile @ (w_tile * s).astype(dtype)
    dx       grid (M/bm, C_in/bk, C_out/bn):  acc += dz_tile @ w'_tile^T
    dw', db' grid (C_in/bk, C_out/bn, M/bm):  acc += x_tile^T @ dz_tile;  acc_b += sum_rows dz

with dz = dy * act'(pre) recomputed per tile from dy and the saved residual. Blocks obey the
(8, 128) tiling: bn and bk are multiples of 128, bm a multiple of 16 (bf16 packs 16 rows per
vreg); M, C_in and C_out are zero-padded to whole blocks, so any sizes work. The padding, the
custom VJP and the parameter gradients are `_common.make_pointwise_conv_bn`'s (shared with
``pallas_gpu``); this file holds the kernels, their tiling and their ``pallas_call`` wrappers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.conv_bn._common import (
    Backend,
    BlockSizes,
    Tiles,
    activate,
    block_sizes_reason,
    cost_estimate,
    dtype_reason,
    dz_tile,
    make_pointwise_conv_bn,
    resources_reason,
    tpu_tiles,
)
from jaxblocks.kernels.interpret import tpu_interpret

DTYPES = (jnp.float32, jnp.bfloat16)


def _params(*semantics: str):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _forward_kernel(
    x_ref, w_ref, s_ref, shift_ref, y_ref, *rest, activation, save_pre: bool, precision
):
    # x_ref [bm, bk], w_ref [bk, bn] fp32, s_ref/shift_ref [1, bn] fp32, y_ref [bm, bn];
    # rest = ([pre_ref [bm, bn]], acc_ref [bm, bn] fp32 VMEM).
    acc_ref = rest[-1]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # Fold prologue: w' = w * s in fp32, rounded once to the compute dtype (as xla.py).
    wf = (w_ref[...] * s_ref[...]).astype(x_ref.dtype)  # [bk, bn]
    # precision: HIGHEST = the multi-pass fp32 MXU algorithm for fp32 operands.
    acc_ref[...] += jnp.dot(
        x_ref[...], wf, preferred_element_type=jnp.float32, precision=precision
    )  # [bm, bn]

    @pl.when(k == pl.num_programs(2) - 1)
    def _epilogue():
        pre = acc_ref[...] + shift_ref[...]  # [bm, bn] fp32: folded bias
        y_ref[...] = activate(pre, activation).astype(y_ref.dtype)
        if save_pre:
            rest[0][...] = pre.astype(rest[0].dtype)


def _dx_kernel(dy_ref, *refs, activation, has_res: bool, precision):
    # dy_ref/res_ref [bm, bn], w_ref [bk, bn] fp32, s_ref [1, bn], dx_ref [bm, bk],
    # acc_ref [bm, bk] fp32 VMEM; the C_out axis (2) is the reduction.
    res_ref, (w_ref, s_ref, dx_ref, acc_ref) = (refs[0], refs[1:]) if has_res else (None, refs)
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dz = dz_tile(dy_ref[...], res_ref[...] if has_res else None, activation).astype(dx_ref.dtype)
    wf = (w_ref[...] * s_ref[...]).astype(dx_ref.dtype)  # [bk, bn], the fold again
    # dz @ w'^T: [bm, bn] x [bk, bn] -> [bm, bk]
    acc_ref[...] += jax.lax.dot_general(
        dz, wf, (((1,), (1,)), ((), ())), precision, preferred_element_type=jnp.float32
    )

    @pl.when(n == pl.num_programs(2) - 1)
    def _store():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


def _dw_kernel(x_ref, dy_ref, *refs, activation, has_res: bool, precision):
    # x_ref [bm, bk], dy_ref/res_ref [bm, bn], dwf_ref [bk, bn] fp32, db_ref [1, bn] fp32,
    # acc_ref [bk, bn] and accb_ref [1, bn] fp32 VMEM; the M axis (2) is the reduction.
    if has_res:
        res_ref, dwf_ref, db_ref, acc_ref, accb_ref = refs
    else:
        res_ref, (dwf_ref, db_ref, acc_ref, accb_ref) = None, refs
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        accb_ref[...] = jnp.zeros_like(accb_ref)

    dz = dz_tile(dy_ref[...], res_ref[...] if has_res else None, activation)  # [bm, bn] fp32
    xs = x_ref[...]  # [bm, bk]
    # x^T dz: [bm, bk] x [bm, bn] -> [bk, bn]
    acc_ref[...] += jax.lax.dot_general(
        xs,
        dz.astype(xs.dtype),
        (((0,), (0,)), ((), ())),
        precision,
        preferred_element_type=jnp.float32,
    )
    accb_ref[...] += jnp.sum(dz, axis=0, keepdims=True)  # [1, bn]

    @pl.when(t == pl.num_programs(2) - 1)
    def _store():
        dwf_ref[...] = acc_ref[...]
        db_ref[...] = accb_ref[...]


# --------------------------------------------------------------------------------------------
# pallas_call wrappers (inputs already padded to whole blocks)
# --------------------------------------------------------------------------------------------


def _forward_call(xp, wp, sp, shiftp, *, tiles: Tiles, activation, save_pre, precision):
    mp, kp = xp.shape
    np_ = wp.shape[1]
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    tile = pl.BlockSpec((bm, bn), lambda i, j, k: (i, j))
    out_shape = [jax.ShapeDtypeStruct((mp, np_), xp.dtype)] * (1 + save_pre)
    item = xp.dtype.itemsize
    kernel = functools.partial(
        _forward_kernel, activation=activation, save_pre=save_pre, precision=precision
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),  # x
            pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),  # w (fp32)
            pl.BlockSpec((1, bn), lambda i, j, k: (0, j)),  # s
            pl.BlockSpec((1, bn), lambda i, j, k: (0, j)),  # b'
        ],
        out_specs=[tile] * (1 + save_pre),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        cost_estimate=cost_estimate("fwd", mp, kp, np_, item, activation, save_pre=save_pre),
        interpret=tpu_interpret(),
        name="pointwise_conv_bn_fwd",
    )(xp, wp, sp[None, :], shiftp[None, :])  # vectors as [1, Np] rows for the (8, 128) tiling


def _dx_call(dyp, resp, wp, sp, *, tiles: Tiles, activation, precision):
    mp, np_ = dyp.shape
    kp = wp.shape[0]
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    has_res = resp is not None
    dy_spec = pl.BlockSpec((bm, bn), lambda i, j, n: (i, n))
    in_specs = [dy_spec] * (1 + has_res) + [
        pl.BlockSpec((bk, bn), lambda i, j, n: (j, n)),  # w (fp32)
        pl.BlockSpec((1, bn), lambda i, j, n: (0, n)),  # s
    ]
    item = dyp.dtype.itemsize
    args = (dyp,) + ((resp,) if has_res else ()) + (wp, sp[None, :])  # s as a [1, Np] row
    return pl.pallas_call(
        functools.partial(_dx_kernel, activation=activation, has_res=has_res, precision=precision),
        out_shape=jax.ShapeDtypeStruct((mp, kp), dyp.dtype),
        grid=(mp // bm, kp // bk, np_ // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bk), lambda i, j, n: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        cost_estimate=cost_estimate("dx", mp, kp, np_, item, activation, has_res=has_res),
        interpret=tpu_interpret(),
        name="pointwise_conv_bn_bwd_dx",
    )(*args)


def _dw_call(xp, dyp, resp, *, tiles: Tiles, activation, precision):
    mp, kp = xp.shape
    np_ = dyp.shape[1]
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    has_res = resp is not None
    in_specs = [pl.BlockSpec((bm, bk), lambda j, l, t: (t, j))]  # x
    in_specs += [pl.BlockSpec((bm, bn), lambda j, l, t: (t, l))] * (1 + has_res)  # dy, res
    item = xp.dtype.itemsize
    args = (xp, dyp) + ((resp,) if has_res else ())
    dwf, db = pl.pallas_call(
        functools.partial(_dw_kernel, activation=activation, has_res=has_res, precision=precision),
        out_shape=[
            jax.ShapeDtypeStruct((kp, np_), jnp.float32),  # dw'
            jax.ShapeDtypeStruct((kp // bk, 1, np_), jnp.float32),  # db', once per C_in block
        ],
        grid=(kp // bk, np_ // bn, mp // bm),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((bk, bn), lambda j, l, t: (j, l)),
            pl.BlockSpec((None, 1, bn), lambda j, l, t: (j, 0, l)),
        ],
        scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32), pltpu.VMEM((1, bn), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        cost_estimate=cost_estimate("dw", mp, kp, np_, item, activation, has_res=has_res),
        interpret=tpu_interpret(),
        name="pointwise_conv_bn_bwd_dw",
    )(*args)
    return dwf, db[0, 0]  # every C_in block summed the same dz columns: keep the first


# The custom VJP (fold, padding, residuals, parameter gradients) is `_common`'s.
_pointwise_conv_bn = make_pointwise_conv_bn(
    Backend("pallas_tpu", tpu_tiles, _forward_call, _dx_call, _dw_call)
)


def supports(
    x,
    w,
    scale,
    bias,
    mean,
    var,
    conv_bias=None,
    *,
    epsilon=1e-5,
    activation=None,
    block_sizes=None,
    precision=lax.Precision.HIGHEST,
):
    """None when the Mosaic kernels take these inputs and block sizes, else the reason (for
    a kernel whose `working_set` does not fit a TPU v5e's VMEM, naming the kernel)."""
    return (
        dtype_reason(x, DTYPES)
        or block_sizes_reason("pallas_tpu", block_sizes)
        or resources_reason("pallas_tpu", x, w, activation, block_sizes)
    )


def pointwise_conv_bn_pallas_tpu(
    x,
    w,
    scale,
    bias,
    mean,
    var,
    conv_bias=None,
    *,
    epsilon=1e-5,
    activation=None,
    block_sizes: BlockSizes | None = None,
    precision: lax.Precision = lax.Precision.HIGHEST,
):
    """Folded pointwise conv + BN + activation on ``x`` [M, C_in] with Mosaic TPU kernels
    (``block_sizes``: None for the TPU defaults; see `BlockSizes`; ``precision``: of the three
    kernels' dots, HIGHEST = multi-pass fp32, DEFAULT = one bf16 pass)."""
    return _pointwise_conv_bn(
        x,
        w,
        scale,
        bias,
        mean,
        var,
        conv_bias,
        epsilon=epsilon,
        activation=activation,
        block_sizes=block_sizes,
        precision=precision,
    )
