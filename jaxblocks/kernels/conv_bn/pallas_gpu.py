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

Triton needs power-of-two tiles: the wrapper pads M, C_in and C_out with zeros to whole blocks
(any sizes work; zero rows/columns contribute nothing and are sliced off).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.conv_bn import specs
from jaxblocks.kernels.conv_bn.xla import (
    activate,
    activation_grad,
    fold_vectors,
    param_grads,
    residual_kind,
)
from jaxblocks.kernels.interpret import gpu_interpret

MIN_BLOCK = 16  # Triton's dot needs every tile dim >= 16
# Aim for a few waves of programs on a 132-SM H100 when splitting the dw' reduction over M.
TARGET_PROGRAMS = 264
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two, >= 16; each is shrunk to the problem when larger).

    Attributes:
      block_m: rows of x per tile (forward, dx) and per reduction step (dw').
      block_n: output channels per tile (forward, dw') and per reduction step (dx).
      block_k: input channels per reduction step (forward) and per tile (dx, dw').
      num_warps, num_stages: Triton launch parameters.
      dw_splits: M splits of the dw' reduction (None: enough programs for ~2 waves).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    dw_splits: int | None = None

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or not _is_pow2(v) or v < MIN_BLOCK:
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {v!r}")
        for name in ("num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive integer, got {v!r}")
        if self.dw_splits is not None and (
            not isinstance(self.dw_splits, int) or self.dw_splits < 1
        ):
            raise ValueError(f"BlockSizes.dw_splits must be None or >= 1, got {self.dw_splits!r}")

    def fit(self, m: int, c_in: int, c_out: int) -> tuple[int, int, int]:
        """(bm, bn, bk) shrunk to the problem (never below 16)."""
        fit = lambda b, n: min(b, max(MIN_BLOCK, _pow2_at_least(n)))
        return fit(self.block_m, m), fit(self.block_n, c_out), fit(self.block_k, c_in)


def _auto_splits(m_blocks: int, tiles: int) -> int:
    """M splits of the dw' reduction: enough programs to fill the GPU, >= 4 row blocks each,
    preferably a divisor of the row-block count (then x, dy are not padded again)."""
    target = max(1, min(math.ceil(TARGET_PROGRAMS / tiles), m_blocks // 4))
    divisor = max(d for d in range(1, target + 1) if m_blocks % d == 0)
    return divisor if 2 * divisor >= target else target


def _params(blocks: BlockSizes):
    return pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _pad2(a, rows: int, cols: int):
    """Zero-pad a 2-D array to [rows, cols] (no copy when already that shape)."""
    pr, pc = rows - a.shape[0], cols - a.shape[1]
    return a if pr == 0 and pc == 0 else jnp.pad(a, ((0, pr), (0, pc)))


def _pad1(a, n: int):
    return a if a.shape[0] == n else jnp.pad(a, (0, n - a.shape[0]))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _forward_kernel(
    x_ref, w_ref, s_ref, shift_ref, y_ref, *pre_ref, bk: int, activation, compute_dtype
):
    # x_ref [bm, Kp], w_ref [Kp, bn] fp32, s_ref/shift_ref [bn] fp32, y_ref [bm, bn].
    bm, bn = y_ref.shape
    s = s_ref[...][None, :]  # [1, bn]

    def body(k, acc):  # one C_in step of the matmul: acc [bm, bn] fp32
        xs = x_ref[:, pl.ds(k * bk, bk)]  # [bm, bk]
        # Fold prologue: w' = w * s in fp32, rounded once to the compute dtype (as xla.py).
        wf = (w_ref[pl.ds(k * bk, bk), :] * s).astype(compute_dtype)  # [bk, bn]
        return acc + jnp.dot(xs, wf, preferred_element_type=jnp.float32)  # [bm, bn]

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // bk, body, jnp.zeros((bm, bn), jnp.float32))
    pre = acc + shift_ref[...][None, :]  # epilogue: folded bias, fp32
    y_ref[...] = activate(pre, activation).astype(y_ref.dtype)
    if pre_ref:
        pre_ref[0][...] = pre.astype(pre_ref[0].dtype)


def _dz(dy, res, activation):
    """dz = dy * act'(pre) in fp32 for one tile (res = None without an activation)."""
    dz = dy.astype(jnp.float32)
    if res is not None:
        dz = dz * activation_grad(res.astype(jnp.float32), activation)
    return dz


def _dx_kernel(dy_ref, *refs, bn: int, activation, has_res: bool):
    # dy_ref/res_ref [bm, Np], w_ref [bk, Np] fp32, s_ref [Np] fp32, dx_ref [bm, bk].
    res_ref, (w_ref, s_ref, dx_ref) = (refs[0], refs[1:]) if has_res else (None, refs)
    bm, bk = dx_ref.shape
    dtype = dx_ref.dtype

    def body(n, acc):  # one C_out step: acc [bm, bk] fp32
        cols = pl.ds(n * bn, bn)
        res = res_ref[:, cols] if has_res else None
        dz = _dz(dy_ref[:, cols], res, activation).astype(dtype)  # [bm, bn]
        wf = (w_ref[:, cols] * s_ref[cols][None, :]).astype(dtype)  # [bk, bn], fold again
        # dz @ wf^T: [bm, bn] x [bk, bn] -> [bm, bk]
        return acc + jax.lax.dot_general(
            dz, wf, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(0, dy_ref.shape[1] // bn, body, jnp.zeros((bm, bk), jnp.float32))
    dx_ref[...] = acc.astype(dx_ref.dtype)


def _dw_kernel(x_ref, dy_ref, *refs, bm: int, activation, has_res: bool):
    # x_ref [Ms, bk], dy_ref/res_ref [Ms, bn], dwf_ref [bk, bn] fp32, db_ref [bn] fp32;
    # Ms = the rows of this program's M split.
    res_ref, (dwf_ref, db_ref) = (refs[0], refs[1:]) if has_res else (None, refs)
    bk, bn = dwf_ref.shape

    def body(t, carry):  # one block of rows: accumulate x^T dz and the column sums of dz
        dw, db = carry  # [bk, bn], [bn] fp32
        rows = pl.ds(t * bm, bm)
        res = res_ref[rows, :] if has_res else None
        dz = _dz(dy_ref[rows, :], res, activation)  # [bm, bn] fp32
        xs = x_ref[rows, :]  # [bm, bk]
        # x^T dz: [bm, bk] x [bm, bn] -> [bk, bn]
        dw = dw + jax.lax.dot_general(
            xs, dz.astype(xs.dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return dw, db + jnp.sum(dz, axis=0)

    init = (jnp.zeros((bk, bn), jnp.float32), jnp.zeros((bn,), jnp.float32))
    dw, db = jax.lax.fori_loop(0, x_ref.shape[0] // bm, body, init)
    dwf_ref[...] = dw
    db_ref[...] = db


# --------------------------------------------------------------------------------------------
# pallas_call wrappers (inputs already padded to whole blocks)
# --------------------------------------------------------------------------------------------


def _forward_call(xp, wp, sp, shiftp, *, bm, bn, bk, activation, save_pre, blocks):
    mp, kp = xp.shape
    np_ = wp.shape[1]
    out_shape = [jax.ShapeDtypeStruct((mp, np_), xp.dtype)]
    out_specs = [pl.BlockSpec((bm, bn), lambda i, j: (i, j))]
    if save_pre:
        out_shape.append(jax.ShapeDtypeStruct((mp, np_), xp.dtype))
        out_specs.append(pl.BlockSpec((bm, bn), lambda i, j: (i, j)))
    item = xp.dtype.itemsize
    cost = pl.CostEstimate(
        flops=specs.forward_flops(mp, kp, np_),
        transcendentals=mp * np_ if activation in ("silu", "gelu") else 0,
        bytes_accessed=specs.forward_bytes(mp, kp, np_, item) + save_pre * mp * np_ * item,
    )
    kernel = functools.partial(
        _forward_kernel, bk=bk, activation=activation, compute_dtype=xp.dtype
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
        compiler_params=_params(blocks),
        cost_estimate=cost,
        interpret=gpu_interpret(),
        name="pointwise_conv_bn_fwd",
    )(xp, wp, sp, shiftp)


def _dx_call(dyp, resp, wp, sp, *, bm, bn, bk, activation, blocks):
    mp, np_ = dyp.shape
    kp = wp.shape[0]
    has_res = resp is not None
    row_spec = pl.BlockSpec((bm, np_), lambda i, j: (i, 0))  # dy / residual rows, all of C_out
    in_specs = [row_spec] + [row_spec] * has_res
    in_specs += [
        pl.BlockSpec((bk, np_), lambda i, j: (j, 0)),  # w rows
        pl.BlockSpec((np_,), lambda i, j: (0,)),  # s
    ]
    item = dyp.dtype.itemsize
    cost = pl.CostEstimate(
        flops=specs.matmul_flops(mp, np_, kp),
        transcendentals=mp * np_ if activation in ("silu", "gelu") else 0,
        bytes_accessed=(1 + has_res) * mp * np_ * item + kp * np_ * 4 + mp * kp * item,
    )
    kernel = functools.partial(_dx_kernel, bn=bn, activation=activation, has_res=has_res)
    args = (dyp,) + ((resp,) if has_res else ()) + (wp, sp)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, kp), dyp.dtype),
        grid=(mp // bm, kp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
        compiler_params=_params(blocks),
        cost_estimate=cost,
        interpret=gpu_interpret(),
        name="pointwise_conv_bn_bwd_dx",
    )(*args)


def _dw_call(xp, dyp, resp, *, bm, bn, bk, splits, activation, blocks):
    mp, kp = xp.shape
    np_ = dyp.shape[1]
    ms = mp // splits  # rows per split, a multiple of bm
    has_res = resp is not None
    in_specs = [pl.BlockSpec((ms, bk), lambda p, j, l: (p, j))]  # x: this split's rows
    in_specs += [pl.BlockSpec((ms, bn), lambda p, j, l: (p, l))] * (1 + has_res)  # dy, res
    item = xp.dtype.itemsize
    cost = pl.CostEstimate(
        flops=specs.matmul_flops(kp, mp, np_),
        transcendentals=mp * np_ if activation in ("silu", "gelu") else 0,
        bytes_accessed=(1 + has_res) * mp * np_ * item + mp * kp * item + splits * kp * np_ * 4,
    )
    kernel = functools.partial(_dw_kernel, bm=bm, activation=activation, has_res=has_res)
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
        compiler_params=_params(blocks),
        cost_estimate=cost,
        interpret=gpu_interpret(),
        name="pointwise_conv_bn_bwd_dw",
    )(*args)
    # Every C_in block computed the same column sums of dz; keep the first.
    return jnp.sum(dwf, axis=0), jnp.sum(db[:, 0, :], axis=0)


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
        _pad1(s, np_),
        _pad1(shift, np_),
        bm=bm,
        bn=bn,
        bk=bk,
        activation=activation,
        save_pre=save and kind == "pre",
        blocks=blocks,
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
    kp, np_ = _round_up(c_in, bk), _round_up(c_out, bn)
    m_blocks = _round_up(max(m, 1), bm) // bm
    splits = blocks.dw_splits
    if splits is None:
        splits = _auto_splits(m_blocks, (kp // bk) * (np_ // bn))
    splits = min(splits, m_blocks)
    mp = _round_up(max(m, 1), bm * splits)
    dyp = _pad2(dy.astype(x.dtype), mp, np_)
    resp = None if res is None else _pad2(res, mp, np_)
    wp = _pad2(w.astype(jnp.float32), kp, np_)
    sp = _pad1(s, np_)
    kw = dict(bm=bm, bn=bn, bk=bk, activation=activation, blocks=blocks)
    dx = _dx_call(dyp, resp, wp, sp, **kw)[:m, :c_in]
    dwf, dbp = _dw_call(_pad2(x, mp, kp), dyp, resp, splits=splits, **kw)
    dwf, dbp = dwf[:c_in, :c_out], dbp[:c_out]
    dw, dscale, dbias, dcb = param_grads(dwf, dbp, w, s, r, cbm, (w, scale0, bias0, cb0))
    dmean = jnp.zeros((c_out,), mean0.dtype)  # running statistics: constants of the step
    dvar = jnp.zeros((c_out,), var0.dtype)
    return dx, dw, dscale, dbias, dmean, dvar, dcb


_pointwise_conv_bn.defvjp(_fwd, _bwd)


def supports(x, w, scale, bias, mean, var, conv_bias=None, *, epsilon=1e-5, activation=None):
    """None when the Triton kernels take these inputs, else the reason."""
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in DTYPES]:
        return f"x dtype {jnp.dtype(x.dtype).name} is not one of float32, bfloat16, float16"
    if x.shape[0] * max(x.shape[1], w.shape[1]) >= 2**31:
        return f"M={x.shape[0]} rows are too many for 32-bit indexing"
    return None


def pointwise_conv_bn_pallas_gpu(
    x, w, scale, bias, mean, var, conv_bias=None, *, epsilon=1e-5, activation=None, blocks=None
):
    """Folded pointwise conv + BN + activation on ``x`` [M, C_in] with Triton-backend kernels."""
    blocks = BlockSizes() if blocks is None else blocks
    return _pointwise_conv_bn(
        x, w, scale, bias, mean, var, conv_bias, float(epsilon), activation, blocks
    )
