"""What the two Pallas backends of `flashrnn` share: block sizes, dtypes, the custom VJP, costs,
and the per-program resource estimate (`working_set`) that both backends' ``supports`` check.

Both backends run the same algorithm (R resident on chip, the states carried over time in fp32,
a reverse-time backward kernel that recomputes the gates from the stored states) in different
layouts: GPU ``[S, B, T, N, D]`` (time on axis 2, ``dR``/``db`` partial sums per batch tile on
axis 0), TPU ``[N, T, S, B, D]`` (time on axis 1, partial sums on axis 1). `make_flashrnn`
builds the `jax.custom_vjp` from a backend's ``pallas_call`` wrappers and those two axes;
input preparation (padding, transposes) stays in each backend.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxblocks.kernels import resources
from jaxblocks.kernels.resources import GpuWorkingSet, TpuWorkingSet
from jaxblocks.kernels.rnn.cells import CELLS as CELLS
from jaxblocks.kernels.rnn.cells import pointwise as pointwise
from jaxblocks.kernels.rnn.cells import pointwise_bwd as pointwise_bwd

MIN_BLOCK_B = 8  # TPU sublanes; the GPU kernel needs 16 (tl.dot), checked by its `supports`
MIN_TILE = 16  # tl.dot needs every matmul side >= 16
SUBLANES, LANES = 8, 128  # a TPU vreg / VMEM tile of 32-bit values


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas kernels; ``block_b=None`` takes the backend's default.

    Attributes:
      block_b: batch rows per program, a power of two ≥ 8. ``pallas_gpu`` pads B to a multiple
        of it and needs ≥ 16 (``tl.dot``), default 16; ``pallas_tpu`` tiles B by it when B
        exceeds it (else the whole batch is one tile), default 128.
      block_t: time steps per grid step (``pallas_tpu``; the GPU kernel loops over all of T in
        one program), default 16.
      num_warps, num_stages: Triton launch parameters of the forward kernel (``pallas_gpu``),
        default 4 and 1.
      num_warps_bwd: warps of the Triton backward kernel, default 8: it holds ``dR`` (fp32) next
        to ``R``, twice the forward's registers (see `working_set`).
    """

    block_b: int | None = None
    block_t: int = 16
    num_warps: int = 4
    num_stages: int = 1
    num_warps_bwd: int = 8

    def __post_init__(self):
        b = self.block_b
        if b is not None and (not _is_int(b) or b < MIN_BLOCK_B or b & (b - 1)):
            raise ValueError(
                f"BlockSizes.block_b must be None or a power of two >= 8 (a multiple of 8 for "
                f"TPU sublanes, a power of two for Triton tiles), got {b!r}"
            )
        for name in ("block_t", "num_warps", "num_stages", "num_warps_bwd"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive integer, got {v!r}")


DEFAULT_BLOCK_B = {"pallas_gpu": 16, "pallas_tpu": 128}


def default_block_sizes(backend: str, blocks: BlockSizes | None = None) -> BlockSizes:
    """``blocks`` (or the defaults) with ``block_b`` filled in for ``backend``."""
    blocks = BlockSizes() if blocks is None else blocks
    if blocks.block_b is None:
        blocks = dataclasses.replace(blocks, block_b=DEFAULT_BLOCK_B[backend])
    return blocks


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def padded_head_dim(D: int) -> int:
    """The GPU kernels' head dim: a power of two (Triton tiles) and >= 16 (``tl.dot``)."""
    return max(MIN_TILE, _next_pow2(D))


def tpu_tiling(B: int, T: int, blocks: BlockSizes) -> tuple[int, int]:
    """``(block_t, block_b)`` of the TPU kernels: at most T steps; the whole batch when it fits."""
    return min(blocks.block_t, T), (B if B <= blocks.block_b else blocks.block_b)


def dot_precision(dot_dtype, precision: jax.lax.Precision) -> jax.lax.Precision | None:
    """The ``precision=`` of a kernel product with operands in ``dot_dtype``: the requested one
    for fp32 operands (HIGHEST: IEEE fp32 on GPU, multi-pass bf16 on TPU; DEFAULT: TF32 /
    one bf16 pass); None for bf16 operands, which every setting multiplies exactly."""
    return precision if jnp.dtype(dot_dtype) == jnp.float32 else None


def matmul_dtype(R):
    """The matmul input dtype for ``R`` (an array or a dtype): R's own (bf16 stays bf16 on the
    MXU / tensor cores), fp32 accumulation."""
    dtype = jnp.dtype(getattr(R, "dtype", R))
    return jnp.float32 if dtype == jnp.float32 else dtype


def states_dtype(function: str, dtype):
    """sLSTM keeps its stored states in fp32: the backward recomputes exp(i − m') from them, and a
    bf16 m (|m| ~ 10 rounds by ~0.03) would change the recomputed gates by percents."""
    return jnp.float32 if function == "slstm" else dtype


# --- cost model (the kernels' pl.CostEstimate; specs.flops and the benchmark use it too) -------


def matmul_flops(function: str, B: int, T: int, N: int, D: int, backward: bool = False) -> int:
    """``2·B·T·N·D²·Gr`` for ``Ry = h R``; the backward has 3× (recompute, ``dR``, ``dh``)."""
    return 2 * B * T * N * D * D * CELLS[function].Gr * (3 if backward else 1)


def flops(function: str, B: int, T: int, N: int, D: int, backward: bool = False) -> int:
    """Matmul FLOPs plus ~``12·G`` pointwise FLOPs per element (twice that in the backward)."""
    pointwise_flops = B * T * N * D * 12 * CELLS[function].G * (2 if backward else 1)
    return matmul_flops(function, B, T, N, D, backward) + pointwise_flops


def transcendentals(function: str, B: int, T: int, N: int, D: int, backward: bool = False) -> int:
    return B * T * N * D * (CELLS[function].G + 1) * (2 if backward else 1)


def bytes_accessed(
    function: str, B: int, T: int, N: int, D: int, itemsize: int, backward: bool = False
) -> int:
    """Wx and the states over the sequence (3× in the backward) plus R once per head."""
    cell = CELLS[function]
    io = B * T * N * D * (cell.G + cell.S) * itemsize * (3 if backward else 1)
    return io + cell.Gr * N * D * D


def cost_estimate(
    function: str, B: int, T: int, N: int, D: int, itemsize: int, backward: bool = False
) -> pl.CostEstimate:
    return pl.CostEstimate(
        flops=flops(function, B, T, N, D, backward),
        transcendentals=transcendentals(function, B, T, N, D, backward),
        bytes_accessed=bytes_accessed(function, B, T, N, D, itemsize, backward),
    )


# --- per-program resources (`jaxblocks.kernels.resources`): what `supports` checks ----------


def _vmem_block_bytes(shape: tuple[int, ...], dtype) -> int:
    """VMEM of one block: its two minor dims occupy whole tiles of (8 · 4/itemsize, 128)."""
    itemsize = jnp.dtype(dtype).itemsize
    *lead, rows, cols = shape
    sublanes = SUBLANES * max(1, 4 // itemsize)  # bf16 packs 16 rows per tile
    return resources.nbytes((*lead, round_up(rows, sublanes), round_up(cols, LANES)), dtype)


def _gpu_working_set(function, B, T, D, dtype, r_dtype, blocks):
    # Triton keeps every block tensor of the loop in registers: R (and dR) for the whole sequence,
    # the fp32 state tiles, and one step's gate tiles. Counted (bB x Dp tiles, fp32):
    #   forward:  S carried states + Gr pre-activations (Wx + Ry + b, in place) + S new states
    #   backward: S carried cotangents + Gb db accumulators + S states before the step
    #             + G recomputed pre-activations + G gate cotangents + S state cotangents
    cell = CELLS[function]
    f32 = jnp.float32
    Dp, bB = padded_head_dim(D), blocks.block_b
    dot = matmul_dtype(r_dtype)
    r = resources.nbytes((cell.Gr, Dp, Dp), dot)  # resident R of one head
    bias = resources.nbytes((cell.Gb, Dp), f32)
    tile = resources.nbytes((bB, Dp), f32)
    # shared memory: Triton stages one dot's operands, (bB, Dp) and (Dp, Dp), per pipeline stage
    smem = blocks.num_stages * resources.nbytes((bB * Dp + Dp * Dp,), dot)
    fwd = GpuWorkingSet(
        f"flashrnn_{function}_fwd_gpu",
        live_bytes=r + bias + (2 * cell.S + cell.Gr) * tile,
        num_warps=blocks.num_warps,
        shared_memory_bytes=smem,
    )
    dr = resources.nbytes((cell.Gr, Dp, Dp), f32)  # the dR accumulator, also resident
    bwd = GpuWorkingSet(
        f"flashrnn_{function}_bwd_gpu",
        live_bytes=r + dr + bias + (3 * cell.S + cell.Gb + 2 * cell.G) * tile,
        num_warps=blocks.num_warps_bwd,
        shared_memory_bytes=smem,
    )
    return fwd, bwd


def _tpu_working_set(function, B, T, D, dtype, r_dtype, blocks):
    # Mosaic double-buffers every block (inputs and outputs) and holds the scratch once.
    cell = CELLS[function]
    f32 = jnp.float32
    bT, bB = tpu_tiling(B, max(T, 1), blocks)
    s_dtype = states_dtype(function, dtype)
    wx = _vmem_block_bytes((bT, cell.G, bB, D), dtype)
    r = _vmem_block_bytes((cell.Gr, D, D), r_dtype)
    bias = _vmem_block_bytes((cell.Gb, 1, D), r_dtype)
    seq = _vmem_block_bytes((bT, cell.S, bB, D), s_dtype)  # states over bT steps
    s_tile = _vmem_block_bytes((cell.S, bB, D), f32)
    fwd = TpuWorkingSet(
        f"flashrnn_{function}_fwd_tpu",
        block_bytes=wx + r + bias + _vmem_block_bytes((cell.S, bB, D), dtype) + seq,
        scratch_bytes=s_tile,  # the carried states
    )
    dr = _vmem_block_bytes((cell.Gr, D, D), f32)
    db = _vmem_block_bytes((cell.Gb, 1, D), f32)
    bwd = TpuWorkingSet(
        f"flashrnn_{function}_bwd_tpu",
        # wx in, dwx out; R, b; states before and cotangents; dR, db, d states0 out
        block_bytes=2 * wx + r + bias + 2 * seq + dr + db + s_tile,
        scratch_bytes=s_tile + dr + db,  # carried cotangents, dR and db accumulators
    )
    return fwd, bwd


def working_set(
    backend: str,
    function: str,
    B: int,
    T: int,
    D: int,
    dtype,
    block_sizes: BlockSizes | None = None,
    *,
    r_dtype=None,
) -> tuple[GpuWorkingSet, GpuWorkingSet] | tuple[TpuWorkingSet, TpuWorkingSet]:
    """Per-program footprint of ``backend``'s forward and backward kernels (one head, one tile).

    Args:
      backend: "pallas_gpu" (registers and shared memory of a Triton program at its
        ``num_warps``) or "pallas_tpu" (VMEM of one Mosaic grid step).
      function: the cell; B, T, D: batch, time, head dim (unpadded; N does not matter, every
        program holds one head); dtype: ``Wx``'s dtype; r_dtype: ``R``'s (default ``dtype``).
      block_sizes: as passed to `flashrnn` (None: the backend's defaults).

    Returns:
      ``(forward, backward)`` estimates, named as the kernels' ``pallas_call``s.
    """
    blocks = default_block_sizes(backend, block_sizes)
    r_dtype = dtype if r_dtype is None else r_dtype
    if backend == "pallas_gpu":
        return _gpu_working_set(function, B, T, D, dtype, r_dtype, blocks)
    if backend == "pallas_tpu":
        return _tpu_working_set(function, B, T, D, dtype, r_dtype, blocks)
    raise ValueError(f"working_set: backend must be pallas_gpu or pallas_tpu, got {backend!r}")


def check_working_set(backend: str, Wx, R, function: str, block_sizes: BlockSizes | None):
    """None when every kernel of ``backend`` fits `resources.H100` / `resources.TPU_V5E`, else
    the first kernel's reason with the shape and blocks that produced it."""
    B, T, _, _, D = Wx.shape
    blocks = default_block_sizes(backend, block_sizes)
    limits = resources.H100 if backend == "pallas_gpu" else resources.TPU_V5E
    for ws in working_set(backend, function, B, T, D, Wx.dtype, blocks, r_dtype=R.dtype):
        reason = ws.check(limits)
        if reason is not None:
            if backend == "pallas_gpu":
                return (
                    f"{reason} (head dim D={D} padded to {padded_head_dim(D)}, "
                    f"block_b={blocks.block_b}, {R.dtype} R): the kernel keeps R (and dR in the "
                    f"backward) in registers for the whole sequence; a smaller head dim or "
                    f"block_b or more warps fit, implementation='xla' takes any shape"
                )
            bT, bB = tpu_tiling(B, max(T, 1), blocks)
            return f"{reason} (D={D}, block_t={bT}, block_b={bB}); pass smaller block_sizes"
    return None


# --- the custom VJP around a backend's pallas_calls ----------------------------------------


# (wx, R, b, s0, function, tiling, precision) -> states_all
ForwardCall = Callable[..., jax.Array]
# (wx, R, b, s_prev, d_all, function, tiling, precision) -> (dwx, dR, db, ds0) partials
BackwardCall = Callable[..., tuple]


def make_flashrnn(
    forward_call: ForwardCall, backward_call: BackwardCall, *, time_axis: int, tile_axis: int
):
    """The `jax.custom_vjp` ``f(wx, R, b, s0, function, tiling, precision) -> states_all``.

    ``forward_call`` returns the states after every step (time on ``time_axis`` of its layout;
    ``s0`` is that layout without the time axis). ``backward_call`` gets the states before every
    step and the output cotangents and returns ``(dwx, dR, db, ds0)`` with ``dR``/``db`` as fp32
    partial sums over batch tiles on ``tile_axis``, summed here. ``function``, ``tiling`` (the
    backend's hashable tile configuration) and ``precision`` (the `jax.lax.Precision` of every
    fp32 product, forward and backward) are static.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
    def flashrnn_tiled(wx, R, b, s0, function, tiling, precision):
        return forward_call(wx, R, b, s0, function, tiling, precision)

    def fwd(wx, R, b, s0, function, tiling, precision):
        states_all = forward_call(wx, R, b, s0, function, tiling, precision)
        return states_all, (wx, R, b, s0, states_all)

    def bwd(function, tiling, precision, res, d_all):
        wx, R, b, s0, states_all = res
        # the states before each step: s0, then the outputs shifted by one step
        T = states_all.shape[time_axis]
        before = jax.lax.slice_in_dim(states_all, 0, T - 1, axis=time_axis)
        s_first = jnp.expand_dims(s0, time_axis).astype(states_all.dtype)
        s_prev = jnp.concatenate([s_first, before], axis=time_axis)
        dwx, dr, db, ds0 = backward_call(wx, R, b, s_prev, d_all, function, tiling, precision)
        return (
            dwx,
            jnp.sum(dr, axis=tile_axis).astype(R.dtype),
            jnp.sum(db, axis=tile_axis).astype(b.dtype),
            ds0.astype(s0.dtype),
        )

    flashrnn_tiled.defvjp(fwd, bwd)
    return flashrnn_tiled


def finish(states_all, dtype):
    """``states_all [S, B, T, N, D]`` cast to the input dtype, and the last step's states."""
    states_all = states_all.astype(dtype)
    return states_all, states_all[:, :, -1]
