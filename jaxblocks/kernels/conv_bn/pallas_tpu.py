"""Pallas TPU (Mosaic) `pointwise_conv_bn`: a tiled matmul whose reduction runs over an
"arbitrary" grid axis into a VMEM fp32 accumulator, with the BatchNorm fold in the prologue
(each weight tile scaled in fp32 before the MXU) and bias + activation in the epilogue (on the
last reduction step), plus a custom VJP with two backward kernels:

    forward  grid (M/bm, C_out/bn, C_in/bk):  acc += x_tile @ (w_tile * s).astype(dtype)
    dx       grid (M/bm, C_in/bk, C_out/bn):  acc += dz_tile @ w'_tile^T
    dw', db' grid (C_in/bk, C_out/bn, M/bm):  acc += x_tile^T @ dz_tile;  acc_b += sum_rows dz

with dz = dy * act'(pre) recomputed per tile from dy and the saved residual. Blocks obey the
(8, 128) tiling: bn and bk are multiples of 128, bm a multiple of 16 (bf16 packs 16 rows per
vreg); the wrapper zero-pads M, C_in and C_out to whole blocks, so any sizes work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.conv_bn import specs
from jaxblocks.kernels.conv_bn.xla import (
    activate,
    activation_grad,
    fold_vectors,
    param_grads,
    residual_kind,
)
from jaxblocks.kernels.interpret import tpu_interpret

LANE = 128  # last block dim: a multiple of the 128 lanes
SUBLANE = 16  # second-to-last block dim of row tiles: 8 sublanes x 2 (bf16 packing)
DTYPES = (jnp.float32, jnp.bfloat16)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes, each shrunk to the (padded) problem when larger.

    Attributes:
      block_m: rows per tile (a multiple of 16).
      block_n: output channels per tile (a multiple of 128).
      block_k: input channels per tile (a multiple of 128).
    """

    block_m: int = 256
    block_n: int = 256
    block_k: int = 512

    def __post_init__(self):
        for name, align in (("block_m", SUBLANE), ("block_n", LANE), ("block_k", LANE)):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % align:
                raise ValueError(
                    f"BlockSizes.{name} must be a positive multiple of {align}, got {v!r}"
                )

    def fit(self, m: int, c_in: int, c_out: int) -> tuple[int, int, int]:
        """(bm, bn, bk) shrunk to the problem, keeping the (16, 128) alignment."""
        bm = min(self.block_m, _round_up(max(m, 1), SUBLANE))
        bn = min(self.block_n, _round_up(c_out, LANE))
        bk = min(self.block_k, _round_up(c_in, LANE))
        return bm, bn, bk


def _pad2(a, rows: int, cols: int):
    """Zero-pad a 2-D array to [rows, cols] (no copy when already that shape)."""
    pr, pc = rows - a.shape[0], cols - a.shape[1]
    return a if pr == 0 and pc == 0 else jnp.pad(a, ((0, pr), (0, pc)))


def _params(*semantics: str):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _forward_kernel(x_ref, w_ref, s_ref, shift_ref, y_ref, *rest, activation, save_pre: bool):
    # x_ref [bm, bk], w_ref [bk, bn] fp32, s_ref/shift_ref [1, bn] fp32, y_ref [bm, bn];
    # rest = ([pre_ref [bm, bn]], acc_ref [bm, bn] fp32 VMEM).
    acc_ref = rest[-1]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # Fold prologue: w' = w * s in fp32, rounded once to the compute dtype (as xla.py).
    wf = (w_ref[...] * s_ref[...]).astype(x_ref.dtype)  # [bk, bn]
    acc_ref[...] += jnp.dot(x_ref[...], wf, preferred_element_type=jnp.float32)  # [bm, bn]

    @pl.when(k == pl.num_programs(2) - 1)
    def _epilogue():
        pre = acc_ref[...] + shift_ref[...]  # [bm, bn] fp32: folded bias
        y_ref[...] = activate(pre, activation).astype(y_ref.dtype)
        if save_pre:
            rest[0][...] = pre.astype(rest[0].dtype)


def _dz(dy, res, activation):
    """dz = dy * act'(pre) in fp32 for one tile (res = None without an activation)."""
    dz = dy.astype(jnp.float32)
    if res is not None:
        dz = dz * activation_grad(res.astype(jnp.float32), activation)
    return dz


def _dx_kernel(dy_ref, *refs, activation, has_res: bool):
    # dy_ref/res_ref [bm, bn], w_ref [bk, bn] fp32, s_ref [1, bn], dx_ref [bm, bk],
    # acc_ref [bm, bk] fp32 VMEM; the C_out axis (2) is the reduction.
    res_ref, (w_ref, s_ref, dx_ref, acc_ref) = (refs[0], refs[1:]) if has_res else (None, refs)
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dz = _dz(dy_ref[...], res_ref[...] if has_res else None, activation).astype(dx_ref.dtype)
    wf = (w_ref[...] * s_ref[...]).astype(dx_ref.dtype)  # [bk, bn], the fold again
    # dz @ w'^T: [bm, bn] x [bk, bn] -> [bm, bk]
    acc_ref[...] += jax.lax.dot_general(
        dz, wf, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(n == pl.num_programs(2) - 1)
    def _store():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


def _dw_kernel(x_ref, dy_ref, *refs, activation, has_res: bool):
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

    dz = _dz(dy_ref[...], res_ref[...] if has_res else None, activation)  # [bm, bn] fp32
    xs = x_ref[...]  # [bm, bk]
    # x^T dz: [bm, bk] x [bm, bn] -> [bk, bn]
    acc_ref[...] += jax.lax.dot_general(
        xs, dz.astype(xs.dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    accb_ref[...] += jnp.sum(dz, axis=0, keepdims=True)  # [1, bn]

    @pl.when(t == pl.num_programs(2) - 1)
    def _store():
        dwf_ref[...] = acc_ref[...]
        db_ref[...] = accb_ref[...]


# --------------------------------------------------------------------------------------------
# pallas_call wrappers (inputs already padded to whole blocks)
# --------------------------------------------------------------------------------------------


def _forward_call(xp, wp, sp, shiftp, *, bm, bn, bk, activation, save_pre):
    mp, kp = xp.shape
    np_ = wp.shape[1]
    tile = pl.BlockSpec((bm, bn), lambda i, j, k: (i, j))
    out_shape = [jax.ShapeDtypeStruct((mp, np_), xp.dtype)] * (1 + save_pre)
    item = xp.dtype.itemsize
    cost = pl.CostEstimate(
        flops=specs.forward_flops(mp, kp, np_),
        transcendentals=mp * np_ if activation in ("silu", "gelu") else 0,
        bytes_accessed=specs.forward_bytes(mp, kp, np_, item) + save_pre * mp * np_ * item,
    )
    kernel = functools.partial(_forward_kernel, activation=activation, save_pre=save_pre)
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
        cost_estimate=cost,
        interpret=tpu_interpret(),
        name="pointwise_conv_bn_fwd",
    )(xp, wp, sp, shiftp)


def _dx_call(dyp, resp, wp, sp, *, bm, bn, bk, activation):
    mp, np_ = dyp.shape
    kp = wp.shape[0]
    has_res = resp is not None
    dy_spec = pl.BlockSpec((bm, bn), lambda i, j, n: (i, n))
    in_specs = [dy_spec] * (1 + has_res) + [
        pl.BlockSpec((bk, bn), lambda i, j, n: (j, n)),  # w (fp32)
        pl.BlockSpec((1, bn), lambda i, j, n: (0, n)),  # s
    ]
    item = dyp.dtype.itemsize
    cost = pl.CostEstimate(
        flops=specs.matmul_flops(mp, np_, kp),
        transcendentals=mp * np_ if activation in ("silu", "gelu") else 0,
        bytes_accessed=(1 + has_res) * mp * np_ * item + kp * np_ * 4 + mp * kp * item,
    )
    args = (dyp,) + ((resp,) if has_res else ()) + (wp, sp)
    return pl.pallas_call(
        functools.partial(_dx_kernel, activation=activation, has_res=has_res),
        out_shape=jax.ShapeDtypeStruct((mp, kp), dyp.dtype),
        grid=(mp // bm, kp // bk, np_ // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bk), lambda i, j, n: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "arbitrary"),
        cost_estimate=cost,
        interpret=tpu_interpret(),
        name="pointwise_conv_bn_bwd_dx",
    )(*args)


def _dw_call(xp, dyp, resp, *, bm, bn, bk, activation):
    mp, kp = xp.shape
    np_ = dyp.shape[1]
    has_res = resp is not None
    in_specs = [pl.BlockSpec((bm, bk), lambda j, l, t: (t, j))]  # x
    in_specs += [pl.BlockSpec((bm, bn), lambda j, l, t: (t, l))] * (1 + has_res)  # dy, res
    item = xp.dtype.itemsize
    cost = pl.CostEstimate(
        flops=specs.matmul_flops(kp, mp, np_),
        transcendentals=mp * np_ if activation in ("silu", "gelu") else 0,
        bytes_accessed=(1 + has_res) * mp * np_ * item + mp * kp * item + kp * np_ * 4,
    )
    args = (xp, dyp) + ((resp,) if has_res else ())
    dwf, db = pl.pallas_call(
        functools.partial(_dw_kernel, activation=activation, has_res=has_res),
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
        cost_estimate=cost,
        interpret=tpu_interpret(),
        name="pointwise_conv_bn_bwd_dw",
    )(*args)
    return dwf, db[0, 0]  # every C_in block summed the same dz columns: keep the first


# --------------------------------------------------------------------------------------------
# custom_vjp
# --------------------------------------------------------------------------------------------


def _forward(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks, save):
    m, c_in = x.shape
    c_out = w.shape[1]
    bm, bn, bk = blocks.fit(m, c_in, c_out)
    mp, kp, np_ = _round_up(max(m, 1), bm), _round_up(c_in, bk), _round_up(c_out, bn)
    s, r, shift, cbm = fold_vectors(scale, bias, mean, var, conv_bias, epsilon)
    kind = residual_kind(activation)
    outs = _forward_call(
        _pad2(x, mp, kp),
        _pad2(w.astype(jnp.float32), kp, np_),
        _pad2(s[None, :], 1, np_),
        _pad2(shift[None, :], 1, np_),
        bm=bm,
        bn=bn,
        bk=bk,
        activation=activation,
        save_pre=save and kind == "pre",
    )
    y = outs[0][:m, :c_out]
    if not save:
        return y, None
    res = None if kind is None else (y if kind == "out" else outs[1][:m, :c_out])
    meta = (scale[:0], bias[:0], mean[:0], var[:0], None if conv_bias is None else conv_bias[:0])
    return y, ((x, w, s, r, cbm, res), meta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _pointwise_conv_bn(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks):
    return _forward(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks, False)[0]


def _fwd(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks):
    return _forward(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks, True)


def _bwd(epsilon, activation, blocks, residuals, dy):
    (x, w, s, r, cbm, res), (scale0, bias0, mean0, var0, cb0) = residuals
    m, c_in = x.shape
    c_out = w.shape[1]
    bm, bn, bk = blocks.fit(m, c_in, c_out)
    mp, kp, np_ = _round_up(max(m, 1), bm), _round_up(c_in, bk), _round_up(c_out, bn)
    dyp = _pad2(dy.astype(x.dtype), mp, np_)
    resp = None if res is None else _pad2(res, mp, np_)
    kw = dict(bm=bm, bn=bn, bk=bk, activation=activation)
    wp = _pad2(w.astype(jnp.float32), kp, np_)
    dx = _dx_call(dyp, resp, wp, _pad2(s[None, :], 1, np_), **kw)[:m, :c_in]
    dwf, dbp = _dw_call(_pad2(x, mp, kp), dyp, resp, **kw)
    dwf, dbp = dwf[:c_in, :c_out], dbp[:c_out]
    dw, dscale, dbias, dcb = param_grads(dwf, dbp, w, s, r, cbm, (w, scale0, bias0, cb0))
    dmean = jnp.zeros((c_out,), mean0.dtype)  # running statistics: constants of the step
    dvar = jnp.zeros((c_out,), var0.dtype)
    return dx, dw, dscale, dbias, dmean, dvar, dcb


_pointwise_conv_bn.defvjp(_fwd, _bwd)


def supports(x, w, scale, bias, mean, var, conv_bias=None, *, epsilon=1e-5, activation=None):
    """None when the Mosaic kernels take these inputs, else the reason."""
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in DTYPES]:
        return f"x dtype {jnp.dtype(x.dtype).name} is not one of float32, bfloat16"
    return None


def pointwise_conv_bn_pallas_tpu(
    x, w, scale, bias, mean, var, conv_bias=None, *, epsilon=1e-5, activation=None, blocks=None
):
    """Folded pointwise conv + BN + activation on ``x`` [M, C_in] with Mosaic TPU kernels."""
    blocks = BlockSizes() if blocks is None else blocks
    return _pointwise_conv_bn(
        x, w, scale, bias, mean, var, conv_bias, float(epsilon), activation, blocks
    )
