"""What both Pallas backends share: block sizes, input preparation, the scan core's custom VJP,
gradient assembly and the cost model.

`prepare` applies ``delta_bias`` and softplus to Δ in fp32 and flattens groups into the batch:
channel ``d = g·H + h`` of a grouped problem (``H = dim / G``) reads ``B[:, g]``, so
``[batch, G·H, L]`` is the batch-``batch·G`` problem ``[batch·G, H, L]`` whose ``A`` is
``[G, H, N]`` indexed by ``row % G``. `finish` adds ``D·u``, gates with ``silu(z)`` and casts.
Autodiff of these elementwise steps (fused XLA) gives the gradients of ``D``, ``z`` and
``delta_bias`` (and the softplus chain rule); the scan core built by `make_scan` carries the
custom VJP for ``u, Δ, A, B, C``. A backend supplies its two ``pallas_call`` wrappers and its own
padding (`scan_core`); `selective_scan_with` runs prepare -> scan core -> finish.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxblocks.kernels import resources

# TPU tiling: channels on the 128 lanes, tokens on the 8 sublanes of a vreg.
LANES, SUBLANES = 128, 8
MAX_GPU_CHUNK = 64  # tokens unrolled per GPU loop iteration (compile time grows with it)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the two Pallas kernels; each backend reads its own fields.

    One object carries both backends' sizes, so a model can pass the same ``block_sizes`` on
    any platform (``implementation=None``). The defaults are untuned (no GPU or TPU was
    available when the kernels were written).

    Attributes:
      gpu_block_d: channels per Triton program (a power of two; the ``[gpu_block_d, N]`` state
        lives in registers).
      gpu_chunk: tokens per loop iteration of the Triton kernels, unrolled (1 to 64).
      num_warps, num_stages: Triton launch parameters (positive).
      tpu_block_d: channels per Mosaic tile (a multiple of 128: the lanes).
      tpu_chunk: tokens per grid step of the Mosaic kernels (a multiple of 8: the sublanes;
        shrunk to the sequence, rounded up to 8, when the sequence is shorter).
      checkpoint_every: tokens between the states the forward saves for the backward (both
        kernels; rounded up to whole chunks of the backend, at most the sequence). None: about
        ``sqrt(L · chunk)`` tokens (`checkpoint_chunks`), which keeps the saved states and the
        backward's per-program workspace both at ``~sqrt(L / chunk)`` states per channel while
        the backward still recomputes every state only once.

    Example:
      >>> BlockSizes(gpu_block_d=64, tpu_chunk=128).gpu_chunk
      8
    """

    gpu_block_d: int = 32
    gpu_chunk: int = 8
    num_warps: int = 4
    num_stages: int = 1
    tpu_block_d: int = 128
    tpu_chunk: int = 64
    checkpoint_every: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            v = getattr(self, field.name)
            if field.name == "checkpoint_every" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise TypeError(
                    f"BlockSizes.{field.name} must be an int, got {type(v).__name__} {v!r}"
                )
        if self.gpu_block_d <= 0 or self.gpu_block_d & (self.gpu_block_d - 1):
            raise ValueError(
                f"BlockSizes.gpu_block_d must be a power of two, got {self.gpu_block_d}"
            )
        if not 1 <= self.gpu_chunk <= MAX_GPU_CHUNK:
            raise ValueError(
                f"BlockSizes.gpu_chunk must be in [1, {MAX_GPU_CHUNK}], got {self.gpu_chunk}"
            )
        for name in ("num_warps", "num_stages"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BlockSizes.{name} must be positive, got {getattr(self, name)}")
        if self.tpu_block_d <= 0 or self.tpu_block_d % LANES:
            raise ValueError(
                f"BlockSizes.tpu_block_d must be a multiple of {LANES}, got {self.tpu_block_d}"
            )
        if self.tpu_chunk <= 0 or self.tpu_chunk % SUBLANES:
            raise ValueError(
                f"BlockSizes.tpu_chunk must be a multiple of {SUBLANES}, got {self.tpu_chunk}"
            )
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(
                f"BlockSizes.checkpoint_every must be None or positive, got {self.checkpoint_every}"
            )


def checkpoint_chunks(blocks: BlockSizes, chunk: int, L: int) -> int:
    """Chunks of ``chunk`` tokens between saved states (a "segment"), for ``L`` tokens.

    ``blocks.checkpoint_every`` rounded up to whole chunks, or by default ``ceil(sqrt(nc))``
    of the ``nc = ceil(L / chunk)`` chunks: the forward then saves ``ceil(nc / k) ~ sqrt(nc)``
    states per (row, channel) and the backward's workspace holds ``k ~ sqrt(nc)`` (instead of
    the ``nc`` states a save per chunk costs; a divisor of ``nc`` up to ``2·sqrt(nc)`` when
    there is one, so that no chunk is padded). Always in ``[1, nc]``.
    """
    nc = max(1, -(-L // chunk))
    if blocks.checkpoint_every is not None:
        return max(1, min(nc, -(-blocks.checkpoint_every // chunk)))
    root = math.isqrt(nc - 1) + 1  # ceil(sqrt(nc))
    # Prefer a divisor of nc up to twice the root: the last segment is then not padded.
    return next((k for k in range(root, 2 * root + 1) if nc % k == 0), root)


def segments(blocks: BlockSizes, chunk: int, L: int) -> tuple[int, int]:
    """``(k, nseg)``: chunks per segment and segments; the kernels pad L to ``nseg·k·chunk``
    (padded tokens have Δ = 0 and carry the state through)."""
    k = checkpoint_chunks(blocks, chunk, L)
    return k, -(-max(1, -(-L // chunk)) // k)


def saved_state_bytes(rows: int, dim: int, N: int, L: int, chunk: int, k: int) -> int:
    """fp32 bytes of the states the forward saves: one ``[rows, dim, N]`` per segment."""
    segments = -(-max(1, -(-L // chunk)) // k)
    return rows * segments * dim * N * 4


def default_block_sizes() -> BlockSizes:
    """The block sizes used when none are given (the same for every shape; untuned)."""
    return BlockSizes()


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def tpu_chunk(blocks: BlockSizes, L: int) -> int:
    """Mosaic tokens per grid step: ``tpu_chunk``, or the sequence rounded up to 8 if shorter."""
    return min(blocks.tpu_chunk, round_up(L, SUBLANES))


# --- resource budgets (jaxblocks/kernels/resources.py) ------------------------------------------


def working_set(
    backend: str, rows: int, dim: int, N: int, L: int, block_sizes: BlockSizes | None = None
) -> tuple[resources.GpuWorkingSet, ...] | tuple[resources.TpuWorkingSet, ...]:
    """Estimated per-program resources of the forward and backward kernels of ``backend`` for
    ``rows = batch·G`` rows of ``dim / G`` channels (``dim`` here), state ``N``, ``L`` tokens.

    GPU (Triton): the kernels have no dots; registers hold ``[gpu_block_d, N]`` fp32 tensors
    (N padded to a power of two): the forward the state, the decay, the input and a product;
    the backward the chunk's ``T + 1`` recomputed states and ``T`` decays (unrolled), ``g``,
    ``dA`` and two temporaries. Shared memory: the chunk's row loads, pipelined only when
    ``num_stages > 1``. TPU (Mosaic): double-buffered blocks padded to (8, 128) fp32 tiles,
    plus the scratch (the state; the backward's ``g``, ``T + 1`` chunk states and ``k``
    segment states, and the segment's ``u, Δ, B`` blocks it recomputes them from).
    """
    blocks = default_block_sizes() if block_sizes is None else block_sizes
    f32 = 4
    if backend == "pallas_gpu":
        bd, T, Np = blocks.gpu_block_d, blocks.gpu_chunk, next_pow2(N)
        state = bd * Np * f32
        loads = T * (3 * bd + 2 * Np) * f32 if blocks.num_stages > 1 else 0  # u, Δ, dy, B, C
        ws = functools.partial(
            resources.GpuWorkingSet,
            num_warps=blocks.num_warps,
            shared_memory_bytes=blocks.num_stages * loads,
        )
        return (
            ws("selective_scan_fwd_gpu", live_bytes=4 * state),
            ws("selective_scan_bwd_gpu", live_bytes=(2 * T + 4) * state),
        )
    bd, T = blocks.tpu_block_d, tpu_chunk(blocks, L)
    k = checkpoint_chunks(blocks, T, L)
    tok = round_up(T, SUBLANES) * bd * f32  # a (T, bd) block
    bc = round_up(T, SUBLANES) * round_up(N, LANES) * f32  # a (T, N) block
    state = round_up(N, SUBLANES) * bd * f32  # an (N, bd) block
    ws = resources.TpuWorkingSet
    fwd = ws(  # u, Δ, y; B, C; A, last, hs; scratch h
        "selective_scan_fwd_tpu", block_bytes=3 * tok + 2 * bc + 3 * state, scratch_bytes=state
    )
    bwd = ws(  # u, Δ, dy, du, dΔ; B, C, dB, dC; A, hs, dlast, dA; the segment's u, Δ, B
        "selective_scan_bwd_tpu",
        block_bytes=5 * tok + 4 * bc + 4 * state + k * (2 * tok + bc),
        scratch_bytes=(1 + (T + 1) + k) * state,
    )
    return fwd, bwd


# --- input preparation --------------------------------------------------------------------------


def prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """``u [b·G, H, L]``, ``Δ' [b·G, H, L]`` fp32, ``A [G, H, N]`` fp32, ``B, C [b·G, N, L]``."""
    f32 = jnp.float32
    batch, dim, L = u.shape
    N = A.shape[1]
    G = 1 if B.ndim == 3 else B.shape[1]
    H = dim // G
    dt = delta.astype(f32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(f32)[None, :, None]
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    return (
        u.reshape(batch * G, H, L),
        dt.reshape(batch * G, H, L),
        A.astype(f32).reshape(G, H, N),
        B.reshape(batch * G, N, L),
        C.reshape(batch * G, N, L),
    )


def finish(y, last, u, D, z):
    """``y [b·G, H, L]``, ``last [b·G, H, N]`` back to ``[batch, dim, ·]``; + D·u, · silu(z)."""
    batch, dim, L = u.shape
    y = y.reshape(batch, dim, L)
    if D is not None:
        y = y + D.astype(jnp.float32)[None, :, None] * u.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(u.dtype), last.reshape(batch, dim, last.shape[-1])


def token_major(x, pad_rows: int, pad_tokens: int):
    """``[b·G, R, L]`` -> ``[b·G, L + pad_tokens, R + pad_rows]``, zero padded.

    A zero Δ gives ``exp(0·A) = 1`` and no input, so padded tokens carry the state through
    unchanged and padded channels (A = 0, B = C = 0) stay zero.
    """
    return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, pad_rows), (0, pad_tokens))), 1, 2)


def selective_scan_with(
    scan_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_sizes
):
    """`selective_scan` around a backend's ``scan_core``; returns ``(out, last_state)``."""
    blocks = default_block_sizes() if block_sizes is None else block_sizes
    uf, dt, Af, Bf, Cf = prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    y, last = scan_core(uf, dt, Af, Bf, Cf, blocks)
    return finish(y, last, u, D, z)


# --- the custom VJP over a backend's pallas_calls -----------------------------------------------


def assemble_grads(u, A, B, C, du, ddt, dA, dB, dC):
    """The kernels' partial results -> cotangents of the scan core's ``u, Δ', A, B, C``.

    ``dA`` comes per batch row (``[b·G, ·, ·]``) and is summed onto ``A``'s groups; ``dB, dC``
    come per channel tile (``[tiles, b·G, L, N]``) and are summed over the tiles.
    """
    G = A.shape[0]
    dA = jnp.sum(dA.reshape(-1, G, *dA.shape[1:]), axis=0)  # batch rows -> A's [G, ·, ·]
    return (
        du.astype(u.dtype),
        ddt,
        dA,
        jnp.sum(dB, axis=0).astype(B.dtype),  # channel tiles
        jnp.sum(dC, axis=0).astype(C.dtype),
    )


def make_scan(forward_call: Callable, backward_call: Callable) -> Callable:
    """The padded scan core ``(u, dt, A, B, C, blocks) -> (y, last)`` with a custom VJP.

    Args:
      forward_call: ``(u, dt, A, B, C, blocks) -> (y, last, hs)``, ``hs`` the state entering
        every chunk (the only activation saved besides the inputs).
      backward_call: ``(u, dt, A, B, C, hs, dy, dlast, blocks) -> (du, ddt, dA, dB, dC)`` as
        `assemble_grads` takes them.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def scan(u, dt, A, B, C, blocks):
        y, last, _ = forward_call(u, dt, A, B, C, blocks)
        return y, last

    def scan_fwd(u, dt, A, B, C, blocks):
        y, last, hs = forward_call(u, dt, A, B, C, blocks)
        return (y, last), (u, dt, A, B, C, hs)

    def scan_bwd(blocks, res, cts):
        u, dt, A, B, C, hs = res
        dy, dlast = cts
        parts = backward_call(u, dt, A, B, C, hs, dy, dlast, blocks)
        return assemble_grads(u, A, B, C, *parts)

    scan.defvjp(scan_fwd, scan_bwd)
    return scan


# --- cost model (the benchmarks use the same formulas) ------------------------------------------


def flops(rows: int, H: int, N: int, L: int, backward: bool = False) -> int:
    """Elementwise FLOPs of the scan: 7 per state element forward, 22 backward."""
    return rows * H * N * L * (22 if backward else 7)


def transcendentals(rows: int, H: int, N: int, L: int, backward: bool = False) -> int:
    """One ``exp`` per state element (the backward recomputes the decays once)."""
    del backward
    return rows * H * N * L


def bytes_accessed(rows: int, H: int, N: int, L: int, itemsize: int, backward=False) -> int:
    """HBM traffic: ``u, Δ`` in and ``y`` (fp32) out per channel, ``B, C`` per token; ×3 bwd."""
    io = rows * L * (H * (2 * itemsize + 4) + 2 * N * itemsize)
    return io * (3 if backward else 1)


def cost_estimate(rows, H, N, L, itemsize, backward=False) -> pl.CostEstimate:
    """`pl.CostEstimate` of one kernel from `flops`, `transcendentals` and `bytes_accessed`."""
    return pl.CostEstimate(
        flops=flops(rows, H, N, L, backward),
        transcendentals=transcendentals(rows, H, N, L, backward),
        bytes_accessed=bytes_accessed(rows, H, N, L, itemsize, backward),
    )


def make_entry(scan_core, doc: str):
    """A backend's `selective_scan` implementation: ``scan_core`` (its kernels and custom VJP)
    behind the op's signature. ``precision`` is accepted for a uniform API and unused: the
    kernels are elementwise (no matrix products)."""

    def entry(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
              block_sizes=None, precision=None):  # fmt: skip
        del precision
        return selective_scan_with(
            scan_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_sizes
        )

    entry.__doc__ = doc
    return entry
