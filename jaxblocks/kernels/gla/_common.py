"""What the two Pallas backends of `chunk_gla` share: block sizes, input preparation, the custom
VJP, the gradient kernel, gradient assembly and the cost model.

Both backends run four kernels (`KERNELS`) over the same per-chunk math (`_chunk.py`,
re-exported here) on head-first inputs padded to whole chunks: the states entering every chunk
(fp32), the reverse pass for the state gradients and dq, dk, dv per chunk, plus a forward kernel
for o. The forward differs: Mosaic's ``fwd`` walks the chunks and writes o as it carries the
state; Triton's forward is the ``states`` pass followed by ``fwd_o``, one program per chunk and
value block from the state entering the chunk (fla's split). The backends also differ in how
the inter-chunk recurrence runs (Triton: a loop inside the kernel over a parallel grid; Mosaic:
the chunks on an "arbitrary" grid axis with the state in VMEM scratch), in their K/V padding
(powers of two / multiples of 128 lanes), in the layout of one segment array, and in their
``pallas_call`` wrappers. `make_chunk_gla` builds the whole implementation from a `Backend`
(those differences); everything else (padding, the gate cumsum, the segment masks, the last gates
of every chunk, the `jax.custom_vjp`, dG from dq/dk, slicing back) is here, once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxblocks.kernels import resources
from jaxblocks.kernels.gla._chunk import Segs as Segs
from jaxblocks.kernels.gla._chunk import chunk_output as chunk_output
from jaxblocks.kernels.gla._chunk import dstate_update as dstate_update
from jaxblocks.kernels.gla._chunk import fwd_chunk as fwd_chunk
from jaxblocks.kernels.gla._chunk import grads_chunk as grads_chunk
from jaxblocks.kernels.gla._chunk import state_update as state_update
from jaxblocks.kernels.gla.xla import SUB_CHUNK, chunk_gates, effective_chunk
from jaxblocks.kernels.resources import GpuWorkingSet, TpuWorkingSet

MAX_HEAD_DIM = 256
LANES = 128  # TPU: the last block dim is a multiple of the 128 lanes
MIN_DOT = 16  # Triton's tl.dot needs every tile dim >= 16
BACKENDS = ("pallas_gpu", "pallas_tpu")
# The value block each backend uses when `BlockSizes.block_v` is None.
DEFAULT_BLOCK_V: dict[str, int] = {"pallas_gpu": 64, "pallas_tpu": LANES}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas kernels of `chunk_gla` (the chunk itself is ``chunk_size``).

    One object serves both backends, so a model can pass the same ``block_sizes`` on any
    platform. A value that neither backend accepts is refused here; one that only the other
    backend accepts is refused by the backend's ``supports`` predicate (so `chunk_gla` names
    it). The defaults are what the kernels used before ``block_sizes`` existed (untuned).

    Attributes:
      sub_chunk: rows of the secondary chunks (the intra-chunk score tiles ``A_IJ``), a power
        of two from 8 to 128, shrunk to the chunk when larger. ``pallas_gpu`` needs >= 16
        (``tl.dot``). Default 16.
      block_v: value columns per program (the state tile ``[K, block_v]``), a power of two
        >= 16, shrunk to the padded V when larger; None takes the backend's default (64 on GPU,
        128 on TPU). ``pallas_tpu`` needs a multiple of 128 (the lanes).
      num_warps: Triton warps per program (``pallas_gpu`` only), a power of two; None (the
        default) takes 4, or 8 when the padded K or V exceeds 128 (the fp32 ``[K, block_v]``
        states then need twice the threads to stay under 255 registers each, see
        `working_set`).

    Example:
      >>> BlockSizes(sub_chunk=32, block_v=32).block_v
      32
    """

    sub_chunk: int = SUB_CHUNK
    block_v: int | None = None
    num_warps: int | None = None

    def __post_init__(self):
        c = self.sub_chunk
        if not _is_int(c) or not _is_pow2(c) or not 8 <= c <= 128:
            raise ValueError(
                f"BlockSizes.sub_chunk must be a power of two from 8 to 128 (pallas_gpu: >= 16), "
                f"got {c!r}"
            )
        bv = self.block_v
        if bv is not None and (not _is_int(bv) or not _is_pow2(bv) or bv < MIN_DOT):
            raise ValueError(
                f"BlockSizes.block_v must be a power of two >= 16 (pallas_tpu: >= 128) or None "
                f"(the backend's default), got {bv!r}"
            )
        w = self.num_warps
        if w is not None and (not _is_int(w) or not _is_pow2(w)):
            raise ValueError(
                f"BlockSizes.num_warps must be a positive power of two or None, got {w!r}"
            )


def default_block_sizes(backend: str, block_sizes: BlockSizes | None = None) -> BlockSizes:
    """``block_sizes`` (or the defaults) with ``block_v`` filled in for ``backend``."""
    blocks = BlockSizes() if block_sizes is None else block_sizes
    if blocks.block_v is None:
        blocks = dataclasses.replace(blocks, block_v=DEFAULT_BLOCK_V[backend])
    return blocks


def block_sizes_reason(backend: str, block_sizes: BlockSizes | None) -> str | None:
    """None when ``backend`` takes these block sizes (None: its defaults), else why not."""
    blocks = default_block_sizes(backend, block_sizes)
    if backend == "pallas_gpu" and blocks.sub_chunk < MIN_DOT:
        return f"BlockSizes.sub_chunk must be >= {MIN_DOT} for pallas_gpu, got {blocks.sub_chunk}"
    if backend == "pallas_tpu" and blocks.block_v % LANES:
        return (
            f"BlockSizes.block_v must be a multiple of {LANES} for pallas_tpu (the lanes), "
            f"got {blocks.block_v}"
        )
    return None


def supports(
    backend, q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, block_sizes,
    precision=lax.Precision.HIGHEST,
):  # fmt: skip
    """None when ``backend`` takes these inputs and block sizes, else a short reason: a head
    dim over `MAX_HEAD_DIM`, a block size the backend refuses, or a kernel whose `working_set`
    does not fit `resources.H100` / `resources.TPU_V5E` (the reason names the kernel)."""
    del k, g, scale, initial_state, precision
    K, V = q.shape[-1], v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        return f"head dims K={K}, V={V} exceed {MAX_HEAD_DIM}"
    reason = block_sizes_reason(backend, block_sizes)
    if reason is not None:
        return reason
    sets = working_set(
        backend, q.shape[1], K, V, v.dtype, block_sizes,
        chunk_size=chunk_size, segments=segment_ids is not None,
    )  # fmt: skip
    limits = resources.H100 if backend == "pallas_gpu" else resources.TPU_V5E
    for ws in sets:
        reason = ws.check(limits)
        if reason is not None:
            return f"{reason} (BlockSizes: smaller block_v or sub_chunk, or more num_warps)"
    return None


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The tiling of one call: chunk ``C``, sub-chunk ``c``, value block ``BV``, Triton warps,
    and the `jax.lax.Precision` of every matrix product."""

    chunk: int
    sub_chunk: int
    block_v: int
    num_warps: int
    precision: lax.Precision = lax.Precision.HIGHEST


def default_num_warps(Kp: int, Vp: int) -> int:
    """4, or 8 when a padded head dim exceeds 128 (see `BlockSizes.num_warps`)."""
    return 4 if max(Kp, Vp) <= 128 else 8


def make_tiles(
    backend: str, block_sizes: BlockSizes | None, T: int, Kp: int, Vp: int, chunk_size: int,
    precision: lax.Precision = lax.Precision.HIGHEST,
):  # fmt: skip
    """`Tiles` for ``T`` tokens, padded K, V ``Kp``, ``Vp`` and ``chunk_size`` (fla's effective
    chunk)."""
    blocks = default_block_sizes(backend, block_sizes)
    C = effective_chunk(T, chunk_size)
    warps = blocks.num_warps
    return Tiles(
        chunk=C,
        sub_chunk=min(blocks.sub_chunk, C),
        block_v=min(blocks.block_v, Vp),
        num_warps=default_num_warps(Kp, Vp) if warps is None else warps,
        precision=precision,
    )


# --------------------------------------------------------------------------------------------
# Resource budgets (see `jaxblocks.kernels.resources`)
# --------------------------------------------------------------------------------------------

# Each backend's kernels, in `working_set` order; the pallas_call names are gla_<kernel>_<gpu|tpu>.
# GPU: fwd_o is the chunk-parallel output kernel (the forward is states + fwd_o); TPU: fwd writes
# o while it carries the state over an "arbitrary" chunk axis.
KERNELS: dict[str, tuple[str, ...]] = {
    "pallas_gpu": ("fwd_o", "states", "dstates", "grads"),
    "pallas_tpu": ("fwd", "states", "dstates", "grads"),
}


def _vmem_tile(rows: int, cols: int, dtype) -> int:
    """VMEM bytes of a [rows, cols] block: Mosaic pads the last dim to the 128 lanes and the
    second-to-last to the 8 sublanes (16 for 2-byte dtypes, which pack two rows)."""
    sub = 8 * max(1, 4 // np.dtype(dtype).itemsize)
    return resources.nbytes((-(-rows // sub) * sub, -(-cols // LANES) * LANES), dtype)


def working_set(
    backend: str,
    T: int,
    K: int,
    V: int,
    dtype,
    block_sizes: BlockSizes | None = None,
    *,
    chunk_size: int = 64,
    segments: bool = False,
) -> tuple[GpuWorkingSet | TpuWorkingSet, ...]:
    """Per-program footprint of each of the backend's four kernels (`KERNELS`), one entry per
    ``pallas_call``, for ``T`` tokens, head dims ``K``, ``V`` and operand ``dtype``.

    ``pallas_gpu`` (`GpuWorkingSet`, at the call's ``num_warps``): the block tensors live at the
    kernel's peak, fp32 unless loaded as an operand, with K, V padded as the kernels pad them:
      fwd_o    one row sub-chunk: the entering state S [K, BV] + acc [c, BV] + 5 [c, K] (q, G,
               q e^{G-G_n}, the rescaled key sub-chunk and its gates) + A [c, c] + v [c, BV] in
               ``dtype`` (no state update: S is read, never carried);
      states   the state update: S + k e^{G_L-G} [C, K] + v [C, BV] in ``dtype`` (the product
               accumulates into S); dstates: the same shapes with q, do;
      grads    max(pass dq: h [K, BV] + 6 [c, K] + 2 [c, BV] + dA [c, c];
               pass dk/dv: dh [K, BV] + 7 [c, K] + dv [c, BV] + 2 [c, BV] + A, dA [c, c];
               dG_L: hn, dh [K, BV]).
    Shared memory: the operands of the largest product (one pipeline stage).
    ``pallas_tpu`` (`TpuWorkingSet`): every blocked input and output of one grid step (with
    Mosaic's (8, 128) tile padding; double-buffered) plus the ``[K, BV]`` fp32 state scratch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"working_set: backend must be one of {BACKENDS}, got {backend!r}")
    gpu = backend == "pallas_gpu"
    pad = (lambda d: max(MIN_DOT, 1 << max(d - 1, 0).bit_length())) if gpu else (
        lambda d: -(-d // LANES) * LANES
    )  # fmt: skip
    Kp, Vp = pad(K), pad(V)
    t = make_tiles(backend, block_sizes, T, Kp, Vp, chunk_size)
    C, c, BV = t.chunk, t.sub_chunk, t.block_v
    it, f = np.dtype(dtype).itemsize, 4
    if gpu:
        state = Kp * BV * f
        update = state + C * Kp * f + C * BV * it
        fwd_o = state + c * BV * f + 5 * c * Kp * f + c * c * f + c * BV * it
        grads = max(
            state + 6 * c * Kp * f + 2 * c * BV * it + c * c * f,
            state + 7 * c * Kp * f + c * BV * f + 2 * c * BV * it + 2 * c * c * f,
            2 * state + Kp * f,
        )
        smem_update = (C * Kp + C * BV) * it
        smem = {
            "fwd_o": (c * Kp + Kp * BV) * it,  # (q e^G) S, the state cast to ``dtype``
            "states": smem_update,
            "dstates": smem_update,
            "grads": (c * BV + Kp * BV) * f,  # do hᵀ against the fp32 state
        }
        live = {"fwd_o": fwd_o, "states": update, "dstates": update, "grads": grads}
        return tuple(
            GpuWorkingSet(f"gla_{n}_gpu", live[n], t.num_warps, smem[n]) for n in KERNELS[backend]
        )
    v = lambda r, cc, dt=jnp.float32: _vmem_tile(r, cc, dt)
    seg = (3 * v(C, 1) + v(1, C)) if segments else 0
    chunk_in = 2 * v(C, Kp, dtype) + v(C, Kp) + v(C, BV, dtype) + v(Kp, 1)  # q|do, k|q, G, v, gl
    blocks = {
        "fwd": chunk_in + v(Kp, BV) + v(C, BV, dtype) + v(Kp, BV),  # + h0; o, ht
        "states": chunk_in - v(C, Kp, dtype) + 3 * v(Kp, BV),  # k, v, G, gl, h0; h, ht
        "dstates": chunk_in - v(C, Kp, dtype) + 3 * v(Kp, BV),  # q, do, G, gl, dht; dh, dh0
        # q, k, G, v, do, h, hn, dh; dq, dk, dv, dG_L (no gl input)
        "grads": chunk_in
        - v(Kp, 1)
        + v(C, BV, dtype)
        + 3 * v(Kp, BV)
        + 2 * v(C, Kp)
        + v(C, BV)
        + v(Kp, 1),
    }
    scratch = {"fwd": v(Kp, BV), "states": v(Kp, BV), "dstates": v(Kp, BV), "grads": 0}
    return tuple(
        TpuWorkingSet(f"gla_{n}_tpu", blocks[n] + seg, scratch[n]) for n in KERNELS[backend]
    )


# --------------------------------------------------------------------------------------------
# Input preparation: head-first padded inputs, gate cumsums, segment masks
# --------------------------------------------------------------------------------------------


def prepare(q, k, v, g, initial_state, C, pad_dim):
    """Head-first, T padded to whole chunks, K/V padded by ``pad_dim``; G = chunk cumsum (fp32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    Tp = -(-T // C) * C
    Kp, Vp = pad_dim(K), pad_dim(V)

    def hf(x, D):
        x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, D - x.shape[-1])))
        return jnp.swapaxes(x, 1, 2)  # [B, H, Tp, D]

    G = chunk_gates(hf(g, Kp), C)
    if initial_state is None:
        h0 = jnp.zeros((B, H, Kp, Vp), jnp.float32)
    else:
        h0 = jnp.pad(initial_state, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    return hf(q, Kp), hf(k, Kp), hf(v, Vp), G, h0


def last_gates(G, C, seg):
    """G at the last row of every chunk as stacked [Kp, 1] columns: [B, H, NT * Kp, 1].

    With segments, -inf where the chunk holds a segment start: the carried state is cut
    (exp(-inf) = 0 in the forward state decay and in the backward's dh decay).
    """
    B, H, Tp, Kp = G.shape
    gl = G[:, :, C - 1 :: C, :]  # [B, H, NT, Kp]
    if seg is not None:
        carry = seg[4]  # [B, NT] bool
        gl = jnp.where(carry[:, None, :, None], gl, -jnp.inf)
    return gl.reshape(B, H, (Tp // C) * Kp, 1)


def segment_masks(segment_ids, Tp, C):
    """(count [B, Tp], inter [B, Tp], to_state [B, Tp], carry [B, NT]) as fp32 / bool.

    count: running number of segment starts (padding continues the last segment); inter: the
    row continues the state entering its chunk; to_state: the row reaches the chunk's end state;
    carry: no start inside the chunk, so the entering state is carried.
    """
    B, T = segment_ids.shape
    starts = segment_ids != jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    cnt = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    cnt = jnp.pad(cnt, ((0, 0), (0, Tp - T)), mode="edge").reshape(B, Tp // C, C)
    prev = jnp.concatenate([jnp.zeros_like(cnt[:, :1, :1]), cnt[:, :-1, -1:]], axis=1)
    inter = cnt == prev
    to_state = cnt == cnt[:, :, -1:]
    carry = cnt[:, :, -1] == prev[:, :, 0]
    f = lambda x: x.reshape(B, Tp).astype(jnp.float32)
    return f(cnt), f(inter), f(to_state), carry


def segment_arrays(segment_ids, Tp, C, segment_row):
    """The kernels' segment inputs ``(col, row, inter, to_state, carry)``, or None.

    col, inter, to_state: ``[B, Tp, 1]``; ``row`` is the count in the backend's layout
    (``segment_row(count [B, Tp], C)``); carry ``[B, NT]`` (bool) feeds `last_gates`.
    """
    if segment_ids is None:
        return None
    cnt, inter, to_state, carry = segment_masks(segment_ids, Tp, C)
    col = lambda x: x[:, :, None]  # [B, Tp, 1]
    return col(cnt), segment_row(cnt, C), col(inter), col(to_state), carry


def split_refs(refs, n_in, has_seg):
    """A kernel's refs as (inputs, `Segs` or None, outputs and scratch)."""
    ins, rest = refs[:n_in], refs[n_in:]
    seg = Segs(*rest[:4]) if has_seg else None
    return ins, seg, rest[4:] if has_seg else rest


# --------------------------------------------------------------------------------------------
# The gradient kernel (one chunk per program on both backends)
# --------------------------------------------------------------------------------------------


def grads_kernel(*refs, tiles, scale, has_seg):
    """dq, dk (partial over value blocks), dv of one chunk and value block, and the block's part
    of the dG_L column (refs as `grads_blocks` lays them out)."""
    ins, seg, (dq_ref, dk_ref, dv_ref, dgl_ref) = split_refs(refs, 8, has_seg)
    q_ref, k_ref, v_ref, G_ref, do_ref, h_ref, hn_ref, dh_ref = ins
    dgl_ref[...] = grads_chunk(
        q_ref, k_ref, v_ref, G_ref, do_ref, h_ref, hn_ref, dh_ref, dq_ref, dk_ref, dv_ref,
        C=tiles.chunk, c=tiles.sub_chunk, scale=scale, precision=tiles.precision, seg=seg,
    )  # fmt: skip


def grads_blocks(q_shape, Vp, C, BV):
    """(in_specs, out_specs, out_shape) of the gradient kernel over the grid (B, H, NT, NV).

    One program per chunk and value block of ``BV`` columns. Inputs q, k, G (one chunk), v, do
    (one chunk, one value block), the states entering and leaving the chunk and the gradient
    w.r.t. the state leaving it (``[Kp, BV]`` each; the backend appends its segment specs);
    outputs dv (fp32) and, as partial sums over the NV value blocks (summed by XLA in
    `make_chunk_gla`), dq, dk ``[B, H, NV, Tp, Kp]`` and dG_L ``[B, H, NV, NT Kp, 1]``.
    """
    B, H, Tp, Kp = q_shape
    NT, NV = Tp // C, Vp // BV
    chunk = lambda d: pl.BlockSpec((None, None, C, d), lambda b, hh, t, j: (b, hh, t, 0))
    chunk_v = pl.BlockSpec((None, None, C, BV), lambda b, hh, t, j: (b, hh, t, j))
    state = lambda off: pl.BlockSpec((None, None, Kp, BV), lambda b, hh, t, j: (b, hh, t + off, j))
    in_specs = [chunk(Kp), chunk(Kp), chunk_v, chunk(Kp), chunk_v, state(0), state(1), state(0)]
    partial = pl.BlockSpec((None, None, None, C, Kp), lambda b, hh, t, j: (b, hh, j, t, 0))
    out_specs = [
        partial,
        partial,
        chunk_v,
        pl.BlockSpec((None, None, None, Kp, 1), lambda b, hh, t, j: (b, hh, j, t, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, H, NV, Tp, Kp), jnp.float32),
        jax.ShapeDtypeStruct((B, H, NV, Tp, Kp), jnp.float32),
        jax.ShapeDtypeStruct((B, H, Tp, Vp), jnp.float32),
        jax.ShapeDtypeStruct((B, H, NV, NT * Kp, 1), jnp.float32),
    ]
    return in_specs, out_specs, out_shape


# --------------------------------------------------------------------------------------------
# The custom VJP over a backend's pallas_calls
# --------------------------------------------------------------------------------------------


def assemble_grads(q, k, v, dq, dk, dv, dgl, dh0, seg, C):
    """dG = q ⊙ dq − k ⊙ dk (+ dG_L on each chunk's last row); cast; zero cotangents for seg."""
    B, H, Tp, Kp = q.shape
    dG = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk  # [B, H, Tp, Kp]
    dG = dG.reshape(B, H, Tp // C, C, Kp).at[:, :, :, -1, :].add(dgl.reshape(B, H, Tp // C, Kp))
    dseg = None if seg is None else jax.tree.map(jnp.zeros_like, seg)
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        dG.reshape(B, H, Tp, Kp),
        dh0,
        dseg,
    )


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one Pallas backend supplies to `make_chunk_gla`.

    Attributes:
      name: ``"pallas_gpu"`` or ``"pallas_tpu"`` (picks the `BlockSizes` defaults and rules).
      pad_dim: K or V -> its padded size.
      segment_row: ``(count [B, Tp], C)`` -> the layout of the segment ``row`` input.
      forward: ``(q, k, v, G, gl, h0, seg, tiles, scale) -> (o, final_state)`` (on the GPU
        ``states`` then the chunk-parallel output kernel; on the TPU one kernel).
      states: ``(k, v, G, gl, h0, seg, tiles) -> h [B, H, (NT + 1) Kp, Vp]``: the state entering
        every chunk, then the final state (fp32).
      dstates: ``(q, do, G, gl, dht, seg, tiles, scale) -> (dh [B, H, NT Kp, Vp], dh0)``: the
        gradient w.r.t. the state leaving every chunk, and w.r.t. the initial state.
      grads: ``(q, k, v, G, do, h, dh, seg, tiles, scale) -> (dq, dk, dv, dgl)`` over the grid
        (B, H, NT, NV) of `grads_blocks` (dq, dk, dgl partial over the value blocks).
    """

    name: str
    pad_dim: Callable[[int], int]
    segment_row: Callable
    forward: Callable
    states: Callable
    dstates: Callable
    grads: Callable


def make_chunk_gla(backend: Backend) -> Callable:
    """`chunk_gla` on ``backend``'s kernels, as the api calls its implementations.

    Returns ``fn(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, block_sizes)``
    giving ``(o [B, T, H, V], final_state [B, H, K, V])``.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
    def core(q, k, v, G, h0, seg, tiles, scale):
        return backend.forward(q, k, v, G, last_gates(G, tiles.chunk, seg), h0, seg, tiles, scale)

    def core_fwd(q, k, v, G, h0, seg, tiles, scale):
        out = backend.forward(q, k, v, G, last_gates(G, tiles.chunk, seg), h0, seg, tiles, scale)
        return out, (q, k, v, G, h0, seg)  # states are recomputed (fp32) in the backward

    def core_bwd(tiles, scale, res, cts):
        q, k, v, G, h0, seg = res
        do, dht = cts
        do = do.astype(v.dtype)
        gl = last_gates(G, tiles.chunk, seg)
        h = backend.states(k, v, G, gl, h0, seg, tiles)  # [B, H, (NT+1) Kp, Vp]
        dh, dh0 = backend.dstates(q, do, G, gl, dht, seg, tiles, scale)
        dq, dk, dv, dgl = backend.grads(q, k, v, G, do, h, dh, seg, tiles, scale)
        dq, dk, dgl = (x.sum(axis=2) for x in (dq, dk, dgl))  # over the value blocks
        return assemble_grads(q, k, v, dq, dk, dv, dgl, dh0, seg, tiles.chunk)

    core.defvjp(core_fwd, core_bwd)

    def chunk_gla_pallas(
        q, k, v, g, *, scale, initial_state=None, segment_ids=None, chunk_size=64,
        block_sizes=None, precision=lax.Precision.HIGHEST,
    ):  # fmt: skip
        """`chunk_gla` on the backend's kernels: ``(o [B, T, H, V], final [B, H, K, V])``."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        Kp, Vp = backend.pad_dim(K), backend.pad_dim(V)
        bs = make_tiles(backend.name, block_sizes, T, Kp, Vp, chunk_size, precision)
        qh, kh, vh, G, h0 = prepare(q, k, v, g, initial_state, bs.chunk, backend.pad_dim)
        seg = segment_arrays(segment_ids, G.shape[2], bs.chunk, backend.segment_row)
        o, final = core(qh, kh, vh, G, h0, seg, bs, float(scale))
        return jnp.swapaxes(o, 1, 2)[:, :T, :, :V], final[:, :, :K, :V]

    def stages(
        q, k, v, g, do, *, scale, chunk_size=64, block_sizes=None,
        precision=lax.Precision.HIGHEST,
    ):  # fmt: skip
        """The forward and backward as their separate calls, to time each one on hardware
        (`benchmarks/gla.py`): ``[(name, fn, args)]`` in the order the VJP runs them, where
        ``fn(*args)`` is that stage alone and ``args`` are its real inputs (the stages before it
        are run once to make them). ``do [B, T, H, V]`` is the output cotangent; the final
        state's is zero. Without segments (the benchmarks' case)."""
        B, T, H, K = q.shape
        Kp, Vp = backend.pad_dim(K), backend.pad_dim(v.shape[-1])
        bs = make_tiles(backend.name, block_sizes, T, Kp, Vp, chunk_size, precision)
        scale = float(scale)

        def prep(q, k, v, g, do):
            qh, kh, vh, G, h0 = prepare(q, k, v, g, None, bs.chunk, backend.pad_dim)
            doh = prepare(do, do, do, g, None, bs.chunk, backend.pad_dim)[2].astype(vh.dtype)
            return qh, kh, vh, G, h0, last_gates(G, bs.chunk, None), doh

        qh, kh, vh, G, h0, gl, doh = jax.jit(prep)(q, k, v, g, do)
        forward = lambda *a: backend.forward(*a, None, bs, scale)
        states = lambda *a: backend.states(*a, None, bs)
        dstates = lambda *a: backend.dstates(*a, None, bs, scale)
        grads = lambda *a: backend.grads(*a, None, bs, scale)

        def assemble(qh, kh, vh, dq, dk, dv, dgl, dh0):
            dq, dk, dgl = (x.sum(axis=2) for x in (dq, dk, dgl))
            return assemble_grads(qh, kh, vh, dq, dk, dv, dgl, dh0, None, bs.chunk)[:5]

        h = jax.jit(states)(kh, vh, G, gl, h0)
        dht = jnp.zeros_like(h0)
        dh, dh0 = jax.jit(dstates)(qh, doh, G, gl, dht)
        dq, dk, dv, dgl = jax.jit(grads)(qh, kh, vh, G, doh, h, dh)
        return [
            ("prepare (XLA)", prep, (q, k, v, g, do)),
            ("forward", forward, (qh, kh, vh, G, gl, h0)),
            ("states (backward)", states, (kh, vh, G, gl, h0)),
            ("dstates", dstates, (qh, doh, G, gl, dht)),
            ("grads", grads, (qh, kh, vh, G, doh, h, dh)),
            ("assemble (XLA)", assemble, (qh, kh, vh, dq, dk, dv, dgl, dh0)),
        ]

    chunk_gla_pallas.__name__ = f"chunk_gla_{backend.name}"
    chunk_gla_pallas.stages = stages
    return chunk_gla_pallas


# --------------------------------------------------------------------------------------------
# Cost model (the benchmarks and specs use the same formulas)
# --------------------------------------------------------------------------------------------


def flops(B: int, T: int, H: int, K: int, V: int, *, chunk: int, backward: bool = False) -> int:
    """FLOPs of the chunked forward (or backward) at B, T, H, K, V and chunk ``C``.

    Forward per token: intra scores 2·C/2·K, A·v 2·C/2·V, inter q·S 2·K·V and state update 2·K·V
    (halved causal sums counted as C/2); backward is about 2.5× the forward plus the state pass.
    """
    fwd = B * H * T * (chunk * K + chunk * V + 4 * K * V)
    return int(fwd * (3.5 if backward else 1.0))


def transcendentals(B: int, T: int, H: int, K: int) -> int:
    """The kernels' exponentials, counted as three per gate element."""
    return B * H * T * K * 3


def bytes_accessed(
    B: int, T: int, H: int, K: int, V: int, *, chunk: int, itemsize: int, backward: bool = False
) -> int:
    """HBM traffic: q, k, v, o in the input dtype and G in fp32; backward twice that plus the
    fp32 states and their gradients (``NT + 1`` of ``K × V`` each)."""
    io = B * T * H * (3 * K + V) * itemsize + B * T * H * K * 4 + B * T * H * V * itemsize
    if backward:
        io = 2 * io + 2 * B * H * (-(-T // chunk) + 1) * K * V * 4
    return io


def cost_estimate(
    B: int, T: int, H: int, K: int, V: int, *, chunk: int, itemsize: int, backward: bool = False
) -> pl.CostEstimate:
    """`pl.CostEstimate` from `flops`, `transcendentals` and `bytes_accessed`."""
    return pl.CostEstimate(
        flops=flops(B, T, H, K, V, chunk=chunk, backward=backward),
        transcendentals=transcendentals(B, T, H, K),
        bytes_accessed=bytes_accessed(
            B, T, H, K, V, chunk=chunk, itemsize=itemsize, backward=backward
        ),
    )
