"""What the two Pallas backends of `flashrnn` share: block sizes, dtypes, the custom VJP, costs.

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

from jaxblocks.kernels.rnn.cells import CELLS as CELLS
from jaxblocks.kernels.rnn.cells import pointwise as pointwise
from jaxblocks.kernels.rnn.cells import pointwise_bwd as pointwise_bwd

MIN_BLOCK_B = 8  # TPU sublanes; the GPU kernel needs 16 (tl.dot), checked by its `supports`


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
      num_warps, num_stages: Triton launch parameters (``pallas_gpu``), default 4 and 1.
    """

    block_b: int | None = None
    block_t: int = 16
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        b = self.block_b
        if b is not None and (not _is_int(b) or b < MIN_BLOCK_B or b & (b - 1)):
            raise ValueError(
                f"BlockSizes.block_b must be None or a power of two >= 8 (a multiple of 8 for "
                f"TPU sublanes, a power of two for Triton tiles), got {b!r}"
            )
        for name in ("block_t", "num_warps", "num_stages"):
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


def matmul_dtype(R):
    """The matmul input dtype: R's own (bf16 stays bf16 on the MXU / tensor cores), fp32 accum."""
    return jnp.float32 if R.dtype == jnp.float32 else R.dtype


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


# --- the custom VJP around a backend's pallas_calls ----------------------------------------


ForwardCall = Callable[..., jax.Array]  # (wx, R, b, s0, function, tiling) -> states_all
BackwardCall = Callable[..., tuple]  # (wx, R, b, s_prev, d_all, function, tiling) -> partials


def make_flashrnn(
    forward_call: ForwardCall, backward_call: BackwardCall, *, time_axis: int, tile_axis: int
):
    """The `jax.custom_vjp` ``f(wx, R, b, s0, function, tiling) -> states_all`` of a backend.

    ``forward_call`` returns the states after every step (time on ``time_axis`` of its layout;
    ``s0`` is that layout without the time axis). ``backward_call`` gets the states before every
    step and the output cotangents and returns ``(dwx, dR, db, ds0)`` with ``dR``/``db`` as fp32
    partial sums over batch tiles on ``tile_axis``, summed here. ``function`` and ``tiling``
    (the backend's hashable tile configuration) are static.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def flashrnn_tiled(wx, R, b, s0, function, tiling):
        return forward_call(wx, R, b, s0, function, tiling)

    def fwd(wx, R, b, s0, function, tiling):
        states_all = forward_call(wx, R, b, s0, function, tiling)
        return states_all, (wx, R, b, s0, states_all)

    def bwd(function, tiling, res, d_all):
        wx, R, b, s0, states_all = res
        # the states before each step: s0, then the outputs shifted by one step
        T = states_all.shape[time_axis]
        before = jax.lax.slice_in_dim(states_all, 0, T - 1, axis=time_axis)
        s_first = jnp.expand_dims(s0, time_axis).astype(states_all.dtype)
        s_prev = jnp.concatenate([s_first, before], axis=time_axis)
        dwx, dr, db, ds0 = backward_call(wx, R, b, s_prev, d_all, function, tiling)
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
