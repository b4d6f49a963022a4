"""What the two Pallas backends of `chunk_gla` share: block sizes, input preparation, the custom
VJP, the gradient kernel, gradient assembly and the cost model.

Both backends run the same four kernels (forward; the states entering every chunk, recomputed
in fp32; the reverse pass for the state gradients; dq, dk, dv per chunk) over the same per-chunk
math (`_chunk.py`, re-exported here) on head-first inputs padded to whole chunks. They differ in
how the inter-chunk recurrence runs (Triton: a loop inside the kernel over a parallel grid;
Mosaic: the chunks on an "arbitrary" grid axis with the state in VMEM scratch), in their K/V
padding (powers of two / multiples of 128 lanes), in the layout of one segment array, and in
their ``pallas_call`` wrappers. `make_chunk_gla` builds the whole implementation from a `Backend`
(those differences); everything else (padding, the gate cumsum, the segment masks, the last gates
of every chunk, the `jax.custom_vjp`, dG from dq/dk, slicing back) is here, once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxblocks.kernels.gla._chunk import Segs as Segs
from jaxblocks.kernels.gla._chunk import dstate_update as dstate_update
from jaxblocks.kernels.gla._chunk import fwd_chunk as fwd_chunk
from jaxblocks.kernels.gla._chunk import grads_chunk as grads_chunk
from jaxblocks.kernels.gla._chunk import state_update as state_update
from jaxblocks.kernels.gla.xla import SUB_CHUNK, chunk_gates, effective_chunk

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
      num_warps: Triton warps per program (``pallas_gpu`` only), a power of two. Default 4.

    Example:
      >>> BlockSizes(sub_chunk=32, block_v=32).block_v
      32
    """

    sub_chunk: int = SUB_CHUNK
    block_v: int | None = None
    num_warps: int = 4

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
        if not _is_int(w) or not _is_pow2(w):
            raise ValueError(f"BlockSizes.num_warps must be a positive power of two, got {w!r}")


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


def supports(backend, q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, block_sizes):
    """None when ``backend`` takes these inputs and block sizes, else a short reason."""
    del k, g, scale, initial_state, chunk_size, segment_ids
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims K={q.shape[-1]}, V={v.shape[-1]} exceed {MAX_HEAD_DIM}"
    return block_sizes_reason(backend, block_sizes)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The tiling of one call: chunk ``C``, sub-chunk ``c``, value block ``BV``, Triton warps."""

    chunk: int
    sub_chunk: int
    block_v: int
    num_warps: int


def make_tiles(backend: str, block_sizes: BlockSizes | None, T: int, Vp: int, chunk_size: int):
    """`Tiles` for ``T`` tokens, padded V ``Vp`` and ``chunk_size`` (fla's effective chunk)."""
    blocks = default_block_sizes(backend, block_sizes)
    C = effective_chunk(T, chunk_size)
    return Tiles(
        chunk=C,
        sub_chunk=min(blocks.sub_chunk, C),
        block_v=min(blocks.block_v, Vp),
        num_warps=blocks.num_warps,
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
    """dq, dk, dv of one chunk and its dG_L column (refs as `grads_blocks` lays them out)."""
    ins, seg, (dq_ref, dk_ref, dv_ref, dgl_ref) = split_refs(refs, 8, has_seg)
    q_ref, k_ref, v_ref, G_ref, do_ref, h_ref, hn_ref, dh_ref = ins
    dgl_ref[...] = grads_chunk(
        q_ref, k_ref, v_ref, G_ref, do_ref, h_ref[...], dh_ref[...], hn_ref[...],
        dq_ref, dk_ref, dv_ref, C=tiles.chunk, c=tiles.sub_chunk, scale=scale, seg=seg,
    )  # fmt: skip


def grads_blocks(q_shape, Vp, C):
    """(in_specs, out_specs, out_shape) of the gradient kernel over the grid (B, H, NT).

    Inputs q, k, v, G, do (one chunk each), the states entering and leaving the chunk and the
    gradient w.r.t. the state leaving it (``[Kp, Vp]`` each; the backend appends its segment
    specs); outputs dq, dk, dv (fp32, one chunk each) and dG_L ``[Kp, 1]`` per chunk.
    """
    B, H, Tp, Kp = q_shape
    NT = Tp // C
    chunk = lambda d: pl.BlockSpec((None, None, C, d), lambda b, hh, t: (b, hh, t, 0))
    state = lambda off: pl.BlockSpec((None, None, Kp, Vp), lambda b, hh, t: (b, hh, t + off, 0))
    in_specs = [chunk(Kp), chunk(Kp), chunk(Vp), chunk(Kp), chunk(Vp), state(0), state(1), state(0)]
    out_specs = [
        chunk(Kp),
        chunk(Kp),
        chunk(Vp),
        pl.BlockSpec((None, None, Kp, 1), lambda b, hh, t: (b, hh, t, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((B, H, Tp, Kp), jnp.float32),
        jax.ShapeDtypeStruct((B, H, Tp, Kp), jnp.float32),
        jax.ShapeDtypeStruct((B, H, Tp, Vp), jnp.float32),
        jax.ShapeDtypeStruct((B, H, NT * Kp, 1), jnp.float32),
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
      forward: ``(q, k, v, G, gl, h0, seg, tiles, scale) -> (o, final_state)``.
      states: ``(k, v, G, gl, h0, seg, tiles) -> h [B, H, (NT + 1) Kp, Vp]``: the state entering
        every chunk, then the final state (fp32).
      dstates: ``(q, do, G, gl, dht, seg, tiles, scale) -> (dh [B, H, NT Kp, Vp], dh0)``: the
        gradient w.r.t. the state leaving every chunk, and w.r.t. the initial state.
      grads: ``(q, k, v, G, do, h, dh, seg, tiles, scale) -> (dq, dk, dv, dgl)``.
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
        return assemble_grads(q, k, v, dq, dk, dv, dgl, dh0, seg, tiles.chunk)

    core.defvjp(core_fwd, core_bwd)

    def chunk_gla_pallas(
        q, k, v, g, *, scale, initial_state=None, segment_ids=None, chunk_size=64, block_sizes=None
    ):
        """`chunk_gla` on the backend's kernels: ``(o [B, T, H, V], final [B, H, K, V])``."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        bs = make_tiles(backend.name, block_sizes, T, backend.pad_dim(V), chunk_size)
        qh, kh, vh, G, h0 = prepare(q, k, v, g, initial_state, bs.chunk, backend.pad_dim)
        seg = segment_arrays(segment_ids, G.shape[2], bs.chunk, backend.segment_row)
        o, final = core(qh, kh, vh, G, h0, seg, bs, float(scale))
        return jnp.swapaxes(o, 1, 2)[:, :T, :, :V], final[:, :, :K, :V]

    chunk_gla_pallas.__name__ = f"chunk_gla_{backend.name}"
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
