"""What the two Pallas backends of `pointwise_conv_bn` share: block sizes, padding, the custom
VJP, gradient assembly and the cost model.

Both backends run the same three kernels (forward with the fold prologue and bias + activation
epilogue, ``dx = dz w'^T``, ``dw' = x^T dz`` with ``db' = sum_rows dz``) on inputs zero-padded to
whole blocks; they differ in tiling (Triton: power-of-two tiles and in-kernel loops; Mosaic:
(16, 128)-aligned tiles and "arbitrary" grid axes into VMEM accumulators) and in their
``pallas_call`` wrappers. `make_pointwise_conv_bn` builds the `jax.custom_vjp` from a `Backend`
(its tiling rule and its three ``pallas_call`` wrappers); everything around the calls (the fold
vectors, padding, slicing, residuals, ``dw, dscale, dbias, dconv_bias`` from ``dw', db'``) is
here, once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxblocks.kernels import resources
from jaxblocks.kernels.conv_bn.xla import activate as activate
from jaxblocks.kernels.conv_bn.xla import activation_grad as activation_grad
from jaxblocks.kernels.conv_bn.xla import fold_vectors as fold_vectors
from jaxblocks.kernels.conv_bn.xla import param_grads as param_grads
from jaxblocks.kernels.conv_bn.xla import residual_kind as residual_kind

MIN_BLOCK = 16  # Triton's dot needs every tile dim >= 16; bf16 packs 16 rows per TPU vreg
LANE = 128  # TPU: the last block dim is a multiple of the 128 lanes
SUBLANE = 16  # TPU: second-to-last dim of row tiles: 8 sublanes x 2 (bf16 packing)
# Aim for a few waves of programs on a 132-SM H100 when splitting the dw' reduction over M.
TARGET_PROGRAMS = 264
KERNELS = ("pointwise_conv_bn_fwd", "pointwise_conv_bn_bwd_dx", "pointwise_conv_bn_bwd_dw")
BACKENDS = ("pallas_gpu", "pallas_tpu")

# Per-backend defaults of the tile sizes left None in `BlockSizes`. Untuned on GPU (there was no
# GPU to measure on): the largest square-ish tiles whose `working_set` fits an H100 SM at fp32
# with a saved residual and 3 pipeline stages (128-row tiles do not: the dx kernel holds dy, the
# residual and dz for a [block_m, block_n] tile). On TPU about 3.3 MiB of VMEM (see README.md).
DEFAULT_BLOCKS: dict[str, dict[str, int]] = {
    "pallas_gpu": dict(block_m=64, block_n=64, block_k=32),
    "pallas_tpu": dict(block_m=256, block_n=256, block_k=512),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas kernels; a ``None`` tile size takes the backend's default.

    Each tile size is shrunk to the (padded) problem when larger. What each backend accepts:
    ``pallas_gpu`` (Triton) needs powers of two >= 16; ``pallas_tpu`` (Mosaic) needs ``block_m``
    a multiple of 16 and ``block_n``, ``block_k`` multiples of 128. A value that neither backend
    accepts is refused here; one that only the other backend accepts is refused by the backend's
    ``supports`` predicate (so `pointwise_conv_bn` names it).

    Attributes:
      block_m: rows of x per tile (forward, dx) and per reduction step of dw'. Default 64 (GPU),
        256 (TPU).
      block_n: output channels per tile (forward, dw') and per reduction step of dx. Default 64
        (GPU), 256 (TPU).
      block_k: input channels per reduction step of the forward and per tile of dx, dw'. Default
        32 (GPU), 512 (TPU).
      num_warps, num_stages: Triton launch parameters (``pallas_gpu`` only), default 4 and 3.
      dw_splits: M splits of the dw' reduction (``pallas_gpu`` only; None: enough programs for
        about two waves).

    Example:
      >>> BlockSizes(block_m=64).block_m
      64
    """

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    dw_splits: int | None = None

    def __post_init__(self):
        m = self.block_m
        if m is not None and (not _is_int(m) or m <= 0 or m % MIN_BLOCK):
            raise ValueError(
                f"BlockSizes.block_m must be a positive multiple of 16 (pallas_gpu: a power of "
                f"two) or None (the backend's default), got {m!r}"
            )
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v is not None and (
                not _is_int(v) or v <= 0 or not ((is_pow2(v) and v >= MIN_BLOCK) or v % LANE == 0)
            ):
                raise ValueError(
                    f"BlockSizes.{name} must be a power of two >= 16 (pallas_gpu) or a positive "
                    f"multiple of 128 (pallas_tpu), or None (the backend's default), got {v!r}"
                )
        for name in ("num_warps", "num_stages"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive integer, got {v!r}")
        if self.dw_splits is not None and (not _is_int(self.dw_splits) or self.dw_splits < 1):
            raise ValueError(f"BlockSizes.dw_splits must be None or >= 1, got {self.dw_splits!r}")


def default_block_sizes(backend: str, block_sizes: BlockSizes | None = None) -> BlockSizes:
    """``block_sizes`` (or the defaults) with every None tile size filled in for ``backend``."""
    blocks = BlockSizes() if block_sizes is None else block_sizes
    missing = {k: v for k, v in DEFAULT_BLOCKS[backend].items() if getattr(blocks, k) is None}
    return dataclasses.replace(blocks, **missing) if missing else blocks


def block_sizes_reason(backend: str, block_sizes: BlockSizes | None) -> str | None:
    """None when ``backend`` takes these block sizes (None fields: its defaults), else why not."""
    blocks = default_block_sizes(backend, block_sizes)
    if backend == "pallas_gpu":
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(blocks, name)
            if not is_pow2(v):
                return f"BlockSizes.{name} must be a power of two >= 16 for pallas_gpu, got {v}"
    else:
        for name in ("block_n", "block_k"):
            v = getattr(blocks, name)
            if v % LANE:
                return (
                    f"BlockSizes.{name} must be a positive multiple of 128 for pallas_tpu "
                    f"(the (8, 128) tiling), got {v}"
                )
    return None


def dtype_reason(x, dtypes) -> str | None:
    """None when ``x.dtype`` is one of ``dtypes``, else the reason."""
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        return f"x dtype {jnp.dtype(x.dtype).name} is not one of {names}"
    return None


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One problem's tiling: the tile sizes fitted to it and the sizes it is padded to.

    Attributes:
      bm, bn, bk: tile sizes over M, C_out, C_in.
      mp, kp, np_: M, C_in, C_out padded (M to whole ``bm * splits`` row blocks).
      blocks: the `BlockSizes` asked for (launch parameters).
      splits: M splits of the dw' reduction (1: one reduction over all of M).
    """

    bm: int
    bn: int
    bk: int
    mp: int
    kp: int
    np_: int
    blocks: BlockSizes
    splits: int = 1


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _auto_splits(m_blocks: int, tiles: int) -> int:
    """M splits of the dw' reduction: enough programs to fill the GPU, >= 4 row blocks each,
    preferably a divisor of the row-block count (then x, dy are not padded again)."""
    target = max(1, min(math.ceil(TARGET_PROGRAMS / tiles), m_blocks // 4))
    divisor = max(d for d in range(1, target + 1) if m_blocks % d == 0)
    return divisor if 2 * divisor >= target else target


def gpu_tiles(blocks: BlockSizes, m: int, c_in: int, c_out: int, backward: bool) -> Tiles:
    """Triton: power-of-two tiles shrunk to the problem (never below 16); the backward also
    splits the dw' reduction over M (``blocks.dw_splits`` or `_auto_splits`) and pads M to
    whole splits."""
    fit = lambda b, n: min(b, max(MIN_BLOCK, _pow2_at_least(n)))
    bm, bn, bk = fit(blocks.block_m, m), fit(blocks.block_n, c_out), fit(blocks.block_k, c_in)
    kp, np_ = round_up(c_in, bk), round_up(c_out, bn)
    m_blocks = round_up(max(m, 1), bm) // bm
    splits = 1
    if backward:
        splits = blocks.dw_splits
        if splits is None:
            splits = _auto_splits(m_blocks, (kp // bk) * (np_ // bn))
        splits = min(splits, m_blocks)
    return Tiles(bm, bn, bk, round_up(max(m, 1), bm * splits), kp, np_, blocks, splits)


def tpu_tiles(blocks: BlockSizes, m: int, c_in: int, c_out: int, backward: bool) -> Tiles:
    """Mosaic: tiles shrunk to the padded problem, keeping the (16, 128) alignment; one dw'
    reduction over all of M (a grid axis), forward and backward alike."""
    del backward
    bm = min(blocks.block_m, round_up(max(m, 1), SUBLANE))
    bn = min(blocks.block_n, round_up(c_out, LANE))
    bk = min(blocks.block_k, round_up(c_in, LANE))
    return Tiles(
        bm, bn, bk, round_up(max(m, 1), bm), round_up(c_in, bk), round_up(c_out, bn), blocks
    )


# --------------------------------------------------------------------------------------------
# Resource budgets (see jaxblocks/kernels/resources.py and README.md §3)
# --------------------------------------------------------------------------------------------


def _gpu_working_set(t: Tiles, item: int, has_res: bool) -> tuple[resources.GpuWorkingSet, ...]:
    """The three Triton programs at tiles ``t``. Shared memory: every load of a loop step is
    pipelined into ``num_stages`` buffers (the Triton matmul autotuner's rule), plus one buffer
    per dot operand computed in registers (the folded weight, dz), which reaches the dot through
    a layout conversion in shared memory. Registers: the fp32 accumulator, the step's loaded
    tiles and the operands computed from them, all taken as live at once."""
    bm, bn, bk, f32 = t.bm, t.bn, t.bk, 4
    warps, stages = t.blocks.num_warps, t.blocks.num_stages
    r = 1 + has_res  # dy (and the residual) tiles
    ws = resources.GpuWorkingSet
    # fwd, one C_in step: x [bm, bk], w [bk, bn] fp32 loaded; w' [bk, bn] computed.
    fwd = ws(
        KERNELS[0],
        live_bytes=bm * bn * f32 + bm * bk * item + bk * bn * (f32 + item),
        num_warps=warps,
        shared_memory_bytes=stages * (bm * bk * item + bk * bn * f32) + bk * bn * item,
    )
    # dx, one C_out step: dy (+ res) [bm, bn], w [bk, bn] fp32, s [bn] loaded; dz [bm, bn] in
    # fp32 and in the compute dtype, w' [bk, bn] computed; accumulator [bm, bk].
    dx = ws(
        KERNELS[1],
        live_bytes=bm * bk * f32 + bm * bn * (r * item + f32 + item) + bk * bn * (f32 + item),
        num_warps=warps,
        shared_memory_bytes=stages * (r * bm * bn * item + bk * bn * f32 + bn * f32)
        + (bm + bk) * bn * item,
    )
    # dw', one row step: x [bm, bk], dy (+ res) [bm, bn] loaded; dz [bm, bn] fp32 and cast;
    # accumulators [bk, bn] and [bn].
    dw = ws(
        KERNELS[2],
        live_bytes=(bk + 1) * bn * f32 + bm * bk * item + bm * bn * (r * item + f32 + item),
        num_warps=warps,
        shared_memory_bytes=stages * (bm * bk * item + r * bm * bn * item) + bm * bn * item,
    )
    return fwd, dx, dw


def _tpu_working_set(
    t: Tiles, item: int, has_res: bool, save_pre: bool
) -> tuple[resources.TpuWorkingSet, ...]:
    """The three Mosaic grid steps at tiles ``t``: double-buffered blocks plus the fp32 VMEM
    accumulators; a [1, bn] vector occupies a whole (8, bn) fp32 tile."""
    bm, bn, bk, f32 = t.bm, t.bn, t.bk, 4
    r = 1 + has_res
    vec = 8 * bn * f32
    ws = resources.TpuWorkingSet
    fwd = ws(  # x [bm, bk], w [bk, bn] fp32, s and b' rows; y (+ pre) [bm, bn]
        KERNELS[0],
        block_bytes=bm * bk * item + bk * bn * f32 + 2 * vec + (1 + save_pre) * bm * bn * item,
        scratch_bytes=bm * bn * f32,
    )
    dx = ws(  # dy (+ res) [bm, bn], w [bk, bn] fp32, s row; dx [bm, bk]
        KERNELS[1],
        block_bytes=r * bm * bn * item + bk * bn * f32 + vec + bm * bk * item,
        scratch_bytes=bm * bk * f32,
    )
    dw = ws(  # x [bm, bk], dy (+ res) [bm, bn]; dw' [bk, bn] fp32, db' row
        KERNELS[2],
        block_bytes=bm * bk * item + r * bm * bn * item + bk * bn * f32 + vec,
        scratch_bytes=bk * bn * f32 + vec,
    )
    return fwd, dx, dw


def working_set(
    backend: str,
    m: int,
    c_in: int,
    c_out: int,
    dtype,
    activation=None,
    block_sizes: BlockSizes | None = None,
) -> tuple[resources.GpuWorkingSet, ...] | tuple[resources.TpuWorkingSet, ...]:
    """Estimated per-program resources of the forward, dx and dw' kernels (in that order) of
    ``backend`` for ``x [m, c_in] -> [m, c_out]`` in ``dtype`` with ``activation`` (which
    decides the saved residual) at ``block_sizes`` (None fields: the backend's defaults)."""
    blocks = default_block_sizes(backend, block_sizes)
    item = jnp.dtype(dtype).itemsize
    kind = residual_kind(activation)
    if backend == "pallas_gpu":
        return _gpu_working_set(gpu_tiles(blocks, m, c_in, c_out, True), item, kind is not None)
    t = tpu_tiles(blocks, m, c_in, c_out, True)
    return _tpu_working_set(t, item, kind is not None, kind == "pre")


def resources_reason(backend: str, x, w, activation, block_sizes) -> str | None:
    """None when every kernel's `working_set` fits an H100 SM / a TPU v5e core, else the
    first kernel's reason (it names the kernel)."""
    limits = resources.H100 if backend == "pallas_gpu" else resources.TPU_V5E
    sets = working_set(backend, *x.shape, w.shape[1], x.dtype, activation, block_sizes)
    return next((r for r in (s.check(limits) for s in sets) if r is not None), None)


# --------------------------------------------------------------------------------------------
# Input preparation and the per-tile gradient
# --------------------------------------------------------------------------------------------


def pad2(a, rows: int, cols: int):
    """Zero-pad a 2-D array to [rows, cols] (no copy when already that shape)."""
    pr, pc = rows - a.shape[0], cols - a.shape[1]
    return a if pr == 0 and pc == 0 else jnp.pad(a, ((0, pr), (0, pc)))


def pad1(a, n: int):
    """Zero-pad a 1-D array to [n] (no copy when already that size)."""
    return a if a.shape[0] == n else jnp.pad(a, (0, n - a.shape[0]))


def dz_tile(dy, res, activation):
    """dz = dy * act'(pre) in fp32 for one tile (res = None without an activation)."""
    out = dy.astype(jnp.float32)
    if res is not None:
        out = out * activation_grad(res.astype(jnp.float32), activation)
    return out


# --------------------------------------------------------------------------------------------
# Cost model (the kernels' pl.CostEstimate; specs.py and the benchmark use the same formulas)
# --------------------------------------------------------------------------------------------


def matmul_flops(m: int, k: int, n: int) -> int:
    """2*M*K*N: one [M, K] @ [K, N]."""
    return 2 * m * k * n


def forward_flops(m: int, c_in: int, c_out: int) -> int:
    """Forward: the matmul (the fold and epilogue are O(C_in*C_out + M*C_out), not counted)."""
    return matmul_flops(m, c_in, c_out)


def backward_flops(m: int, c_in: int, c_out: int) -> int:
    """Backward: dx = dz w'^T and dw' = x^T dz, two matmuls of the forward's size."""
    return 2 * matmul_flops(m, c_in, c_out)


def forward_bytes(m: int, c_in: int, c_out: int, itemsize: int) -> int:
    """x read, w read (fp32), y written."""
    return m * c_in * itemsize + c_in * c_out * 4 + m * c_out * itemsize


def backward_bytes(m: int, c_in: int, c_out: int, itemsize: int) -> int:
    """dy and the residual read twice (dx and dw' kernels), x read, w read, dx and dw' written."""
    return 4 * m * c_out * itemsize + 2 * m * c_in * itemsize + 2 * c_in * c_out * 4


def transcendentals(m: int, c_out: int, activation) -> int:
    """One exp or tanh per output element for silu/gelu, none otherwise."""
    return m * c_out if activation in ("silu", "gelu") else 0


def cost_estimate(
    kernel: str,
    m: int,
    c_in: int,
    c_out: int,
    itemsize: int,
    activation,
    *,
    save_pre: bool = False,
    has_res: bool = False,
    splits: int = 1,
) -> pl.CostEstimate:
    """`pl.CostEstimate` of one kernel ("fwd", "dx" or "dw") on padded sizes.

    fwd: `forward_flops`, `forward_bytes` plus the saved pre-activation; dx: dy (and the
    residual), w (fp32) read, dx written; dw: dy (and the residual), x read, one fp32 dw'
    partial per M split written.
    """
    if kernel == "fwd":
        flops = forward_flops(m, c_in, c_out)
        nbytes = forward_bytes(m, c_in, c_out, itemsize) + save_pre * m * c_out * itemsize
    elif kernel == "dx":
        flops = matmul_flops(m, c_out, c_in)
        nbytes = (1 + has_res) * m * c_out * itemsize + c_in * c_out * 4 + m * c_in * itemsize
    elif kernel == "dw":
        flops = matmul_flops(c_in, m, c_out)
        nbytes = (
            (1 + has_res) * m * c_out * itemsize + m * c_in * itemsize + splits * c_in * c_out * 4
        )
    else:
        raise ValueError(f"cost_estimate: kernel must be 'fwd', 'dx' or 'dw', got {kernel!r}")
    return pl.CostEstimate(
        flops=flops,
        transcendentals=transcendentals(m, c_out, activation),
        bytes_accessed=nbytes,
    )


# --------------------------------------------------------------------------------------------
# The custom VJP around a backend's pallas_calls
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
    """One Pallas backend: its tiling rule and its three ``pallas_call`` wrappers.

    Attributes:
      name: "pallas_gpu" or "pallas_tpu" (picks the default block sizes and their rules).
      tiles: ``(blocks, m, c_in, c_out, backward) -> Tiles`` for a problem of that size.
      forward_call: ``(xp [mp, kp], wp [kp, np_] fp32, sp [np_], shiftp [np_], *, tiles,
        activation, save_pre, precision) -> [y [mp, np_]] (+ [pre [mp, np_]] when save_pre)``.
      dx_call: ``(dyp [mp, np_], resp [mp, np_] | None, wp, sp, *, tiles, activation,
        precision) -> dx [mp, kp]``.
      dw_call: ``(xp, dyp, resp, *, tiles, activation, precision) -> (dw' [kp, np_],
        db' [np_])``, fp32, summed over the M splits.
    """

    name: str
    tiles: Callable[..., Tiles]
    forward_call: Callable[..., list]
    dx_call: Callable[..., jax.Array]
    dw_call: Callable[..., tuple[jax.Array, jax.Array]]


def make_pointwise_conv_bn(backend: Backend):
    """``f(x [M, C_in], w, scale, bias, mean, var, conv_bias=None, *, epsilon, activation,
    block_sizes=None, precision=HIGHEST) -> y [M, C_out]`` on ``backend``'s kernels, with a
    custom VJP; ``precision`` (a `jax.lax.Precision`) goes to every dot of the three kernels."""

    def forward(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks, prec, save):
        m, c_in = x.shape
        c_out = w.shape[1]
        t = backend.tiles(blocks, m, c_in, c_out, False)
        s, r, shift, cbm = fold_vectors(scale, bias, mean, var, conv_bias, epsilon)
        kind = residual_kind(activation)
        outs = backend.forward_call(
            pad2(x, t.mp, t.kp),
            pad2(w.astype(jnp.float32), t.kp, t.np_),
            pad1(s, t.np_),
            pad1(shift, t.np_),
            tiles=t,
            activation=activation,
            save_pre=save and kind == "pre",
            precision=prec,
        )
        y = outs[0][:m, :c_out]
        if not save:
            return y, None
        res = None if kind is None else (y if kind == "out" else outs[1][:m, :c_out])
        # The primals below are only read for their dtypes (zero-size views keep them cheap).
        meta = (
            scale[:0],
            bias[:0],
            mean[:0],
            var[:0],
            None if conv_bias is None else conv_bias[:0],
        )
        return y, ((x, w, s, r, cbm, res), meta)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
    def conv_bn(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks, prec):
        args = (x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks, prec)
        return forward(*args, False)[0]

    def fwd(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks, prec):
        args = (x, w, scale, bias, mean, var, conv_bias, epsilon, activation, blocks, prec)
        return forward(*args, True)

    def bwd(epsilon, activation, blocks, prec, residuals, dy):
        (x, w, s, r, cbm, res), (scale0, bias0, mean0, var0, cb0) = residuals
        m, c_in = x.shape
        c_out = w.shape[1]
        t = backend.tiles(blocks, m, c_in, c_out, True)
        dyp = pad2(dy.astype(x.dtype), t.mp, t.np_)
        resp = None if res is None else pad2(res, t.mp, t.np_)
        wp = pad2(w.astype(jnp.float32), t.kp, t.np_)
        kw = dict(tiles=t, activation=activation, precision=prec)
        dx = backend.dx_call(dyp, resp, wp, pad1(s, t.np_), **kw)[:m, :c_in]
        dwf, dbp = backend.dw_call(pad2(x, t.mp, t.kp), dyp, resp, **kw)
        dwf, dbp = dwf[:c_in, :c_out], dbp[:c_out]
        dw, dscale, dbias, dcb = param_grads(dwf, dbp, w, s, r, cbm, (w, scale0, bias0, cb0))
        dmean = jnp.zeros((c_out,), mean0.dtype)  # running statistics: constants of the step
        dvar = jnp.zeros((c_out,), var0.dtype)
        return dx, dw, dscale, dbias, dmean, dvar, dcb

    conv_bn.defvjp(fwd, bwd)

    def pointwise_conv_bn(
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
        reason = block_sizes_reason(backend.name, block_sizes)
        if reason is not None:
            raise ValueError(f"pointwise_conv_bn[{backend.name}]: {reason}")
        blocks = default_block_sizes(backend.name, block_sizes)
        args = (x, w, scale, bias, mean, var, conv_bias, float(epsilon), activation, blocks)
        return conv_bn(*args, lax.Precision(precision))

    return pointwise_conv_bn
