"""Pallas GPU (Triton backend) `pointwise_conv_bn`: a tiled matmul with the BatchNorm fold in
its prologue and bias + activation in its epilogue, and a custom VJP with two backward kernels.

Forward (one program per [block_m, block_n] output tile, looping over C_in):
    acc = sum_k x[:, k] @ (w[k, :] * s).astype(x.dtype)      fold of the weight tile in fp32
    y   = act(acc + b')                                      epilogue in fp32
Backward (dz = dy * act'(pre), recomputed per tile from dy and the saved residual):
    dx  = dz @ w'^T           one program per [block_m, block_k] tile of dx, looping over C_out
    dw' = x^T @ dz, db' = sum_rows dz
                              one program per [block_k, block_n] tile of dw' and per M split,
                              looping over the split's rows; the splits are summed in XLA
then dw, dscale, dbias, dconv_bias from dw', db' (O(C_in*C_out), in XLA; see README.md).

Triton needs power-of-two tiles: M, C_in and C_out are padded with zeros to whole blocks
(any sizes work; zero rows/columns contribute nothing and are sliced off). The padding, the
custom VJP and the parameter gradients are `_common.make_pointwise_conv_bn`'s (shared with
``pallas_tpu``); this file holds the kernels, their tiling and their ``pallas_call`` wrappers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.conv_bn._common import (
    Backend,
    BlockSizes,
    Tiles,
    activate,
    block_sizes_reason,
    cost_estimate,
    dtype_reason,
    dz_tile,
    gpu_tiles,
    make_pointwise_conv_bn,
    resources_reason,
)
from jaxblocks.kernels.interpret import gpu_interpret

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _params(blocks: BlockSizes):
    return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _forward_kernel(
    x_ref, w_ref, s_ref, shift_ref, y_ref, *pre_ref, bk: int, activation, compute_dtype, precision
):
    # x_ref [bm, Kp], w_ref [Kp, bn] fp32, s_ref/shift_ref [bn] fp32, y_ref [bm, bn].
    bm, bn = y_ref.shape
    s = s_ref[...][None, :]  # [1, bn]

    def body(k, acc):  # one C_in step of the matmul: acc [bm, bn] fp32
        xs = x_ref[:, pl.ds(k * bk, bk)]  # [bm, bk]
        # Fold prologue: w' = w * s in fp32, rounded once to the compute dtype (as xla.py).
        wf = (w_ref[pl.ds(k * bk, bk), :] * s).astype(compute_dtype)  # [bk, bn]
        # precision: HIGHEST keeps fp32 operands in IEEE fp32 (Triton would use TF32).
        return acc + jnp.dot(xs, wf, preferred_element_type=jnp.float32, precision=precision)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // bk, body, jnp.zeros((bm, bn), jnp.float32))
    pre = acc + shift_ref[...][None, :]  # epilogue: folded bias, fp32
    y_ref[...] = activate(pre, activation).astype(y_ref.dtype)
    if pre_ref:
        pre_ref[0][...] = pre.astype(pre_ref[0].dtype)


def _dx_kernel(dy_ref, *refs, bn: int, activation, has_res: bool, precision):
    # dy_ref/res_ref [bm, Np], w_ref [bk, Np] fp32, s_ref [Np] fp32, dx_ref [bm, bk].
    res_ref, (w_ref, s_ref, dx_ref) = (refs[0], refs[1:]) if has_res else (None, refs)
    bm, bk = dx_ref.shape
    dtype = dx_ref.dtype

    def body(n, acc):  # one C_out step: acc [bm, bk] fp32
        cols = pl.ds(n * bn, bn)
        res = res_ref[:, cols] if has_res else None
        dz = dz_tile(dy_ref[:, cols], res, activation).astype(dtype)  # [bm, bn]
        wf = (w_ref[:, cols] * s_ref[cols][None, :]).astype(dtype)  # [bk, bn], fold again
        # dz @ wf^T: [bm, bn] x [bk, bn] -> [bm, bk]
        return acc + jax.lax.dot_general(
            dz, wf, (((1,), (1,)), ((), ())), precision, preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(0, dy_ref.shape[1] // bn, body, jnp.zeros((bm, bk), jnp.float32))
    dx_ref[...] = acc.astype(dx_ref.dtype)


def _dw_kernel(x_ref, dy_ref, *refs, bm: int, activation, has_res: bool, precision):
    # x_ref [Ms, bk], dy_ref/res_ref [Ms, bn], dwf_ref [bk, bn] fp32, db_ref [bn] fp32;
    # Ms = the rows of this program's M split.
    res_ref, (dwf_ref, db_ref) = (refs[0], refs[1:]) if has_res else (None, refs)
    bk, bn = dwf_ref.shape

    def body(t, carry):  # one block of rows: accumulate x^T dz and the column sums of dz
        dw, db = carry  # [bk, bn], [bn] fp32
        rows = pl.ds(t * bm, bm)
        res = res_ref[rows, :] if has_res else None
        dz = dz_tile(dy_ref[rows, :], res, activation)  # [bm, bn] fp32
        xs = x_ref[rows, :]  # [bm, bk]
        # x^T dz: [bm, bk] x [bm, bn] -> [bk, bn]
        dw = dw + jax.lax.dot_general(
            xs,
            dz.astype(xs.dtype),
            (((0,), (0,)), ((), ())),
            precision,
            preferred_element_type=jnp.float32,
        )
        return dw, db + jnp.sum(dz, axis=0)

    init = (jnp.zeros((bk, bn), jnp.float32), jnp.zeros((bn,), jnp.float32))
    dw, db = jax.lax.fori_loop(0, x_ref.shape[0] // bm, body, init)
    dwf_ref[...] = dw
    db_ref[...] = db


# --------------------------------------------------------------------------------------------
# pallas_call wrappers (inputs already padded to whole blocks)
# --------------------------------------------------------------------------------------------


def _forward_call(xp, wp, sp, shiftp, *, tiles: Tiles, activation, save_pre, precision):
    mp, kp = xp.shape
    np_ = wp.shape[1]
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    out_shape = [jax.ShapeDtypeStruct((mp, np_), xp.dtype)]
    out_specs = [pl.BlockSpec((bm, bn), lambda i, j: (i, j))]
    if save_pre:
        out_shape.append(jax.ShapeDtypeStruct((mp, np_), xp.dtype))
        out_specs.append(pl.BlockSpec((bm, bn), lambda i, j: (i, j)))
    item = xp.dtype.itemsize
    kernel = functools.partial(
        _forward_kernel,
        bk=bk,
        activation=activation,
        compute_dtype=xp.dtype,
        precision=precision,
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),  # x rows, all of C_in
            pl.BlockSpec((kp, bn), lambda i, j: (0, j)),  # w columns, all of C_in
            pl.BlockSpec((bn,), lambda i, j: (j,)),  # s
            pl.BlockSpec((bn,), lambda i, j: (j,)),  # b'
        ],
        out_specs=out_specs,
        compiler_params=_params(tiles.blocks),
        cost_estimate=cost_estimate("fwd", mp, kp, np_, item, activation, save_pre=save_pre),
        interpret=gpu_interpret(),
        name="pointwise_conv_bn_fwd",
    )(xp, wp, sp, shiftp)


def _dx_call(dyp, resp, wp, sp, *, tiles: Tiles, activation, precision):
    mp, np_ = dyp.shape
    kp = wp.shape[0]
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    has_res = resp is not None
    row_spec = pl.BlockSpec((bm, np_), lambda i, j: (i, 0))  # dy / residual rows, all of C_out
    in_specs = [row_spec] + [row_spec] * has_res
    in_specs += [
        pl.BlockSpec((bk, np_), lambda i, j: (j, 0)),  # w rows
        pl.BlockSpec((np_,), lambda i, j: (0,)),  # s
    ]
    item = dyp.dtype.itemsize
    kernel = functools.partial(
        _dx_kernel, bn=bn, activation=activation, has_res=has_res, precision=precision
    )
    args = (dyp,) + ((resp,) if has_res else ()) + (wp, sp)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, kp), dyp.dtype),
        grid=(mp // bm, kp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
        compiler_params=_params(tiles.blocks),
        cost_estimate=cost_estimate("dx", mp, kp, np_, item, activation, has_res=has_res),
        interpret=gpu_interpret(),
        name="pointwise_conv_bn_bwd_dx",
    )(*args)


def _dw_call(xp, dyp, resp, *, tiles: Tiles, activation, precision):
    mp, kp = xp.shape
    np_ = dyp.shape[1]
    bm, bn, bk, splits = tiles.bm, tiles.bn, tiles.bk, tiles.splits
    ms = mp // splits  # rows per split, a multiple of bm
    has_res = resp is not None
    in_specs = [pl.BlockSpec((ms, bk), lambda p, j, l: (p, j))]  # x: this split's rows
    in_specs += [pl.BlockSpec((ms, bn), lambda p, j, l: (p, l))] * (1 + has_res)  # dy, res
    item = xp.dtype.itemsize
    cost = cost_estimate("dw", mp, kp, np_, item, activation, has_res=has_res, splits=splits)
    kernel = functools.partial(
        _dw_kernel, bm=bm, activation=activation, has_res=has_res, precision=precision
    )
    args = (xp, dyp) + ((resp,) if has_res else ())
    dwf, db = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((splits, kp, np_), jnp.float32),  # partial dw' per split
            jax.ShapeDtypeStruct((splits, kp // bk, np_), jnp.float32),  # partial db'
        ],
        grid=(splits, kp // bk, np_ // bn),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bk, bn), lambda p, j, l: (p, j, l)),
            pl.BlockSpec((None, None, bn), lambda p, j, l: (p, j, l)),
        ],
        compiler_params=_params(tiles.blocks),
        cost_estimate=cost,
        interpret=gpu_interpret(),
        name="pointwise_conv_bn_bwd_dw",
    )(*args)
    # Every C_in block computed the same column sums of dz; keep the first.
    return jnp.sum(dwf, axis=0), jnp.sum(db[:, 0, :], axis=0)


# The custom VJP (fold, padding, residuals, parameter gradients) is `_common`'s.
_pointwise_conv_bn = make_pointwise_conv_bn(
    Backend("pallas_gpu", gpu_tiles, _forward_call, _dx_call, _dw_call)
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
    """None when the Triton kernels take these inputs and block sizes, else the reason (for
    a kernel whose `working_set` does not fit an H100 SM, naming the kernel)."""
    reason = dtype_reason(x, DTYPES) or block_sizes_reason("pallas_gpu", block_sizes)
    if reason is None and x.shape[0] * max(x.shape[1], w.shape[1]) >= 2**31:
        reason = f"M={x.shape[0]} rows are too many for 32-bit indexing"
    return reason or resources_reason("pallas_gpu", x, w, activation, block_sizes)


def pointwise_conv_bn_pallas_gpu(
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
    """Folded pointwise conv + BN + activation on ``x`` [M, C_in] with Triton-backend kernels
    (``block_sizes``: None for the GPU defaults; see `BlockSizes`; ``precision``: of the three
    kernels' dots, HIGHEST = IEEE fp32 for fp32 operands, DEFAULT = TF32)."""
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
