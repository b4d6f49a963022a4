"""What the two Pallas backends of `causal_conv1d` share: block sizes, input padding, the custom
VJP, the weight and bias gradients and the cost model.

Both backends run one forward kernel over a ``[block_t, block_c]`` tile grid of the zero-padded
input; they differ in how a tile reaches the W − 1 rows before it (Triton: one program walks the
whole time axis of its channel block, padded by `MAX_TAPS` zeros on the left; Mosaic: each grid
step receives its own time tile and the previous one) and in their ``pallas_call`` wrappers.
`make_causal_conv1d` builds the `jax.custom_vjp` from a backend's launcher: the backward runs the
same launcher on the time-reversed gradient, and `param_grads` gives ``dw`` and ``dbias``.
`working_set` estimates what one program / grid step of each launch holds, and `supports`
refuses the launches that cannot fit (`jaxblocks.kernels.resources`). The kernels are
elementwise (W multiply-adds per output, no matrix products), so ``precision`` does not reach
them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxblocks.kernels import resources

MAX_TAPS = 8  # the short conv's widest kernel (Mamba uses 4); longer kernels: fft_conv
LANES = 128  # TPU: the last block dim is a multiple of the 128 lanes
MIN_TRITON_BLOCK = 16  # Triton blocks are powers of two; 16 is the smallest dot-friendly tile
BACKENDS = ("pallas_gpu", "pallas_tpu")
# The pallas_call names per backend.
KERNEL_NAMES: dict[str, str] = {
    "pallas_gpu": "causal_conv1d_gpu",
    "pallas_tpu": "causal_conv1d_tpu",
}

# Per-backend defaults of the tile sizes left None in `BlockSizes` (untuned: no GPU or TPU was
# available to time them).
DEFAULT_BLOCKS: dict[str, dict[str, int]] = {
    "pallas_gpu": dict(block_t=64, block_c=32),
    "pallas_tpu": dict(block_t=256, block_c=LANES),
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas kernels; a ``None`` tile size takes the backend's default.

    One object carries both backends' sizes, so a model can pass the same ``block_sizes`` on
    any platform. What each backend accepts: ``pallas_gpu`` (Triton) needs ``block_t`` and
    ``block_c`` powers of two >= 16; ``pallas_tpu`` (Mosaic) needs ``block_t`` a multiple of 8
    (shrunk to the sequence, rounded up to 8, when longer) and ``block_c`` a multiple of 128. A
    value that neither backend accepts is refused here; one that only the other backend accepts
    is refused by the backend's ``supports`` predicate (so `causal_conv1d` names it).

    Attributes:
      block_t: time rows per tile. Default 64 (GPU), 256 (TPU).
      block_c: channels per tile. Default 32 (GPU), 128 (TPU).
      num_warps: Triton launch parameter (``pallas_gpu`` only), a power of two; default 4.

    Example:
      >>> BlockSizes(block_t=128).block_c is None
      True
    """

    block_t: int | None = None
    block_c: int | None = None
    num_warps: int = 4

    def __post_init__(self):
        t = self.block_t
        if t is not None and (not _is_int(t) or t <= 0 or t % 8):
            raise ValueError(
                f"BlockSizes.block_t must be a positive multiple of 8 (pallas_gpu: a power of "
                f"two >= 16) or None (the backend's default), got {t!r}"
            )
        c = self.block_c
        if c is not None and (
            not _is_int(c)
            or c <= 0
            or not ((is_pow2(c) and c >= MIN_TRITON_BLOCK) or c % LANES == 0)
        ):
            raise ValueError(
                f"BlockSizes.block_c must be a power of two >= 16 (pallas_gpu) or a positive "
                f"multiple of 128 (pallas_tpu), or None (the backend's default), got {c!r}"
            )
        if not _is_int(self.num_warps) or not is_pow2(self.num_warps):
            raise ValueError(
                f"BlockSizes.num_warps must be a power of two (1, 2, 4, ...), "
                f"got {self.num_warps!r}"
            )


def default_block_sizes(backend: str, block_sizes: BlockSizes | None = None) -> BlockSizes:
    """``block_sizes`` (or the defaults) with every None tile size filled in for ``backend``."""
    blocks = BlockSizes() if block_sizes is None else block_sizes
    missing = {k: v for k, v in DEFAULT_BLOCKS[backend].items() if getattr(blocks, k) is None}
    return dataclasses.replace(blocks, **missing) if missing else blocks


def working_set(
    backend: str,
    x_shape: tuple[int, int, int],
    taps: int,
    block_sizes: BlockSizes | None = None,
    dtype=jnp.float32,
) -> tuple[resources.GpuWorkingSet | resources.TpuWorkingSet, ...]:
    """Per-program estimates of the op's two launches on x [B, T, C] with ``taps`` taps.

    One entry per ``pallas_call``: the forward (rows of ``dtype``; with silu its pre-activation)
    and the backward dx (the same kernel on the fp32 gradient). Taps and bias are counted in
    fp32 (their widest dtype).

    * ``pallas_gpu``: one time tile at a time in registers: the accumulator [bt, bc] in fp32 and
      the ``taps`` shifted input windows [bt, bc] (loads of an unrolled loop are issued ahead
      of their FMAs), the tap rows [taps, bc] and the bias [1, bc], over ``32·num_warps``
      threads. No dots, so no shared memory.
    * ``pallas_tpu``: the previous and current time tiles, the taps, the bias and the output
      tile of one grid step, double-buffered; the fp32 scratch [2·bt, bc] and the fp32
      accumulator and window [bt, bc] once. ``bt`` is shrunk to T (rounded up to 8) as the
      kernel does.
    """
    blocks = default_block_sizes(backend, block_sizes)
    T = x_shape[1]
    bc = blocks.block_c
    name = KERNEL_NAMES[backend]
    f32 = jnp.float32
    sets = []
    for label, dt in (("forward", dtype), ("backward dx", f32)):
        if backend == "pallas_gpu":
            bt = blocks.block_t
            live = (
                resources.nbytes((bt, bc), f32)  # acc
                + taps * resources.nbytes((bt, bc), dt)  # the shifted windows
                + resources.nbytes((taps + 1, bc), f32)  # taps and bias
            )
            sets.append(resources.GpuWorkingSet(f"{name} ({label})", live, blocks.num_warps))
        else:
            bt = min(blocks.block_t, round_up(T, 8))
            tiles = 3 * resources.nbytes((bt, bc), dt)  # previous, current, output
            block_bytes = tiles + resources.nbytes((taps + 1, bc), f32)
            scratch = resources.nbytes((2 * bt, bc), f32) + 2 * resources.nbytes((bt, bc), f32)
            sets.append(resources.TpuWorkingSet(f"{name} ({label})", block_bytes, scratch))
    return tuple(sets)


def supports(
    backend: str, x, w, bias=None, activation=None, *, block_sizes=None, precision=None
) -> str | None:
    """None when ``backend`` takes these block sizes (None fields: its defaults), else why not.

    Every shape the api accepts is supported by both kernels (time and channels are padded to
    whole tiles); the tile rules differ between the backends, and every launch's
    `working_set` must fit `resources.H100` / `resources.TPU_V5E`.
    """
    del bias, activation, precision  # the kernels are elementwise: no precision to apply
    reason = _tile_rule(backend, block_sizes)
    if reason is not None:
        return reason
    for ws in working_set(backend, x.shape, w.shape[0], block_sizes, x.dtype):
        reason = working_set_reason(ws)
        if reason is not None:
            return reason
    return None


def working_set_reason(ws) -> str | None:
    """None when ``ws`` fits `resources.H100` (registers per thread, the SM's register file,
    shared memory) / `resources.TPU_V5E`, else why (naming the kernel)."""
    if isinstance(ws, resources.TpuWorkingSet):
        return ws.check(resources.TPU_V5E)
    return ws.check(resources.H100)


def _tile_rule(backend: str, block_sizes: BlockSizes | None) -> str | None:
    blocks = default_block_sizes(backend, block_sizes)
    if backend == "pallas_gpu":
        for name in ("block_t", "block_c"):
            v = getattr(blocks, name)
            if not (is_pow2(v) and v >= MIN_TRITON_BLOCK):
                return f"BlockSizes.{name} must be a power of two >= 16 for pallas_gpu, got {v}"
    elif blocks.block_c % LANES:
        return (
            f"BlockSizes.block_c must be a multiple of 128 for pallas_tpu (the lanes), "
            f"got {blocks.block_c}"
        )
    return None


# --------------------------------------------------------------------------------------------
# Input preparation
# --------------------------------------------------------------------------------------------


def bias_row(bias, cp: int):
    """The bias as a [1, cp] row, zero-padded (zeros in fp32 without a bias)."""
    if bias is None:
        return jnp.zeros((1, cp), jnp.float32)
    return jnp.pad(bias[None], ((0, 0), (0, cp - bias.shape[0])))


# --------------------------------------------------------------------------------------------
# The custom VJP around a backend's launcher, and the gradients XLA computes
# --------------------------------------------------------------------------------------------


def silu_grad(g, pre):
    """g ⊙ silu'(pre) in fp32: silu'(p) = σ(p)·(1 + p·(1 − σ(p)))."""
    p = pre.astype(jnp.float32)
    s = jax.nn.sigmoid(p)
    return g * s * (1 + p * (1 - s))


def param_grads(g, x, w, bias):
    """dw [W, C] and dbias [C] (None without a bias) from g = dy ⊙ act'(pre) in fp32.

    dw[j] = Σ_{b,t} g[t] x[t − W + 1 + j] and dbias = Σ_{b,t} g: W + 1 small reductions.
    """
    W, T = w.shape[0], x.shape[1]
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (W - 1, 0), (0, 0)))  # [B, T + W - 1, C]
    dw = jnp.stack([jnp.sum(g * xp[:, j : j + T], axis=(0, 1)) for j in range(W)])  # [W, C]
    db = None if bias is None else jnp.sum(g, axis=(0, 1)).astype(bias.dtype)
    return dw.astype(w.dtype), db


def make_causal_conv1d(call: Callable) -> Callable:
    """custom_vjp around a backend's launcher ``call(x, w, bias, silu, blocks)``.

    ``blocks`` is a `BlockSizes` with every field filled in (`default_block_sizes`). Backward:
    with g = dy ⊙ act'(pre), dx[t] = Σ_j w[j] g[t + W − 1 − j] is the same causal convolution
    run on time-reversed g (``flip(call(flip(g), w))``); dw and dbias come from `param_grads`.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def fn(x, w, bias, silu, blocks):
        return call(x, w, bias, silu, blocks)

    def fn_fwd(x, w, bias, silu, blocks):
        pre = call(x, w, bias, False, blocks) if silu else None
        y = (
            call(x, w, bias, silu, blocks)
            if pre is None
            else (jax.nn.silu(pre.astype(jnp.float32))).astype(x.dtype)
        )
        return y, (x, w, bias, pre)

    def fn_bwd(silu, blocks, res, dy):
        x, w, bias, pre = res
        g = dy.astype(jnp.float32)
        if silu:
            g = silu_grad(g, pre)
        dx = jnp.flip(call(jnp.flip(g, 1), w.astype(jnp.float32), None, False, blocks), 1)
        dw, db = param_grads(g, x, w, bias)
        return dx.astype(x.dtype), dw, db

    fn.defvjp(fn_fwd, fn_bwd)
    return fn


# --------------------------------------------------------------------------------------------
# Cost model (the kernels' pl.CostEstimate; specs.py uses the same formulas)
# --------------------------------------------------------------------------------------------


def flops(B: int, T: int, C: int, W: int) -> int:
    """One multiply-add per tap, output element and channel."""
    return 2 * B * T * C * W


def transcendentals(B: int, T: int, C: int, silu: bool) -> int:
    """One sigmoid per output element with the silu activation."""
    return B * T * C if silu else 0


def bytes_accessed(B: int, T: int, C: int, W: int, itemsize: int, *, x_reads: int) -> int:
    """``x_reads`` passes over x and one output write in ``itemsize`` bytes, the fp32 taps."""
    return (x_reads + 1) * B * T * C * itemsize + W * C * 4


def cost_estimate(x, w, silu: bool, *, x_reads: int) -> pl.CostEstimate:
    """`pl.CostEstimate` of one forward kernel on x [B, T, C], w [W, C]."""
    (B, T, C), W = x.shape, w.shape[0]
    return pl.CostEstimate(
        flops=flops(B, T, C, W),
        transcendentals=transcendentals(B, T, C, silu),
        bytes_accessed=bytes_accessed(B, T, C, W, jnp.dtype(x.dtype).itemsize, x_reads=x_reads),
    )
