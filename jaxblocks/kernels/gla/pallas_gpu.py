"""Gated linear attention as Pallas GPU kernels (Triton backend), with a custom_vjp.

Layout inside: head-first ``[B, H, T, D]``, T padded to whole chunks, K and V padded to powers
of two (Triton needs power-of-two tensors). The GPU grid is parallel, so the inter-chunk
recurrence is a loop inside the kernel; programs split batch, heads and value blocks.

Kernels (all accumulate in fp32; operands keep the input dtype in matmuls):
  forward   grid (B, H, V/BV): loop over chunks, write o, carry the state, write the final state.
  states    grid (B, H, V/BV): recompute the state entering every chunk in fp32 (backward).
  dstates   grid (B, H, V/BV): the reverse loop for the state gradients, and d initial_state.
  grads     grid (B, H, NT):   dq, dk, dv of each chunk in parallel, and the dG_L term.
dg is the reverse chunk-local cumsum of ``q ⊙ dq − k ⊙ dk`` (+ dG_L), done by XLA as the VJP of
the gate cumsum, which is also computed by XLA before the kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.gla import _chunk
from jaxblocks.kernels.gla.xla import SUB_CHUNK, chunk_gates, effective_chunk
from jaxblocks.kernels.interpret import gpu_interpret

MAX_HEAD_DIM = 256


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Chunk ``C``, sub-chunk ``c`` and value block ``BV`` (powers of two, c ≥ 16 for tl.dot)."""

    chunk: int = 64
    sub_chunk: int = SUB_CHUNK
    block_v: int = 64
    num_warps: int = 4

    def __post_init__(self):
        for name in ("chunk", "sub_chunk", "block_v"):
            n = getattr(self, name)
            if n < 16 or n & (n - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {n}")
        if self.chunk % self.sub_chunk:
            raise ValueError(f"BlockSizes: chunk {self.chunk} % sub_chunk {self.sub_chunk} != 0")


def supports(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size):
    del k, g, scale, initial_state, chunk_size, segment_ids
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims K={q.shape[-1]}, V={v.shape[-1]} exceed {MAX_HEAD_DIM}"
    return None


# ---------------------------------------------------------------------------------------------
# Kernel bodies. Refs are 2-D: [Tp, Kp] / [Tp, BV] for whole sequences, states [Kp, BV]. With
# segments, four more input refs follow the regular inputs (see `_chunk.Segs`).


def _split(refs, n_in, has_seg):
    ins, rest = refs[:n_in], refs[n_in:]
    seg = _chunk.Segs(*rest[:4]) if has_seg else None
    return ins, seg, rest[4:] if has_seg else rest


def _forward_kernel(*refs, bs, NT, Kp, scale, has_seg):
    (q_ref, k_ref, v_ref, G_ref, gl_ref, h0_ref), seg, (o_ref, ht_ref) = _split(refs, 6, has_seg)
    C, c = bs.chunk, bs.sub_chunk

    def body(t, S):  # the inter-chunk recurrence, chunk by chunk (paper Alg. 2, outer loop)
        gl = gl_ref[pl.ds(t * Kp, Kp), :]  # [Kp, 1]: G at the chunk's last row, as a column
        return _chunk.fwd_chunk(
            q_ref, k_ref, v_ref, G_ref, o_ref, t * C, S, gl, C=C, c=c, scale=scale, seg=seg
        )

    ht_ref[...] = jax.lax.fori_loop(0, NT, body, h0_ref[...].astype(jnp.float32))  # [Kp, BV]


def _states_kernel(*refs, bs, NT, Kp, has_seg):
    (k_ref, v_ref, G_ref, gl_ref, h0_ref), seg, (h_ref,) = _split(refs, 5, has_seg)

    def body(t, S):
        h_ref[pl.ds(t * Kp, Kp), :] = S  # state entering chunk t, fp32
        gl = gl_ref[pl.ds(t * Kp, Kp), :]
        return _chunk.state_update(k_ref, v_ref, G_ref, t * bs.chunk, S, gl, C=bs.chunk, seg=seg)

    S = jax.lax.fori_loop(0, NT, body, h0_ref[...].astype(jnp.float32))
    h_ref[pl.ds(NT * Kp, Kp), :] = S  # the final state closes the list


def _dstates_kernel(*refs, bs, NT, Kp, scale, has_seg):
    (q_ref, do_ref, G_ref, gl_ref, dht_ref), seg, (dh_ref, dh0_ref) = _split(refs, 5, has_seg)

    def body(i, dS):  # reverse loop over chunks
        t = NT - 1 - i
        dh_ref[pl.ds(t * Kp, Kp), :] = dS  # gradient w.r.t. the state leaving chunk t
        gl = gl_ref[pl.ds(t * Kp, Kp), :]
        return _chunk.dstate_update(
            q_ref, do_ref, G_ref, t * bs.chunk, dS, gl, C=bs.chunk, scale=scale, seg=seg
        )

    dh0_ref[...] = jax.lax.fori_loop(0, NT, body, dht_ref[...].astype(jnp.float32))


def _grads_kernel(*refs, bs, scale, has_seg):
    ins, seg, outs = _split(refs, 8, has_seg)
    q_ref, k_ref, v_ref, G_ref, do_ref, h_ref, hn_ref, dh_ref = ins
    dq_ref, dk_ref, dv_ref, dgl_ref = outs
    dgl_ref[...] = _chunk.grads_chunk(
        q_ref, k_ref, v_ref, G_ref, do_ref, h_ref[...], dh_ref[...], hn_ref[...],
        dq_ref, dk_ref, dv_ref, C=bs.chunk, c=bs.sub_chunk, scale=scale, seg=seg,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers. Inputs are head-first and padded: q, k, G [B, H, Tp, Kp], v [B, H, Tp, Vp];
# segment arrays (`segment_arrays`): col, inter, to_state [B, Tp, 1] and row [B, 1, Tp].


def _params(bs):
    return pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=1)


def _spec(rows, cols):
    return pl.BlockSpec((None, None, rows, cols), lambda b, h, j: (b, h, 0, j))


def _whole(rows, cols):
    return pl.BlockSpec((None, None, rows, cols), lambda b, h, j: (b, h, 0, 0))


def _seg_specs(seg, Tp):
    if seg is None:
        return [], []
    col = pl.BlockSpec((None, Tp, 1), lambda b, h, j: (b, 0, 0))
    row = pl.BlockSpec((None, 1, Tp), lambda b, h, j: (b, 0, 0))
    return [col, row, col, col], list(seg[:4])


def _forward(q, k, v, G, gl, h0, seg, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = v.shape[-1]
    NT, BV = Tp // bs.chunk, min(bs.block_v, Vp)
    kernel = functools.partial(
        _forward_kernel, bs=bs, NT=NT, Kp=Kp, scale=scale, has_seg=seg is not None
    )
    seg_specs, seg_args = _seg_specs(seg, Tp)
    return pl.pallas_call(
        kernel,
        grid=(B, H, Vp // BV),
        in_specs=[
            _whole(Tp, Kp),
            _whole(Tp, Kp),
            _spec(Tp, BV),
            _whole(Tp, Kp),
            _whole(NT * Kp, 1),
            _spec(Kp, BV),
            *seg_specs,
        ],  # fmt: skip
        out_specs=[_spec(Tp, BV), _spec(Kp, BV)],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Tp, Vp), v.dtype),
            jax.ShapeDtypeStruct((B, H, Kp, Vp), jnp.float32),
        ],
        compiler_params=_params(bs),
        cost_estimate=_chunk.cost_estimate(B, Tp, H, Kp, Vp, C=bs.chunk, itemsize=q.dtype.itemsize),
        interpret=gpu_interpret(),
        name="gla_fwd_gpu",
    )(q, k, v, G, gl, h0, *seg_args)


def _states(k, v, G, gl, h0, seg, bs):
    B, H, Tp, Kp = k.shape
    Vp = v.shape[-1]
    NT, BV = Tp // bs.chunk, min(bs.block_v, Vp)
    seg_specs, seg_args = _seg_specs(seg, Tp)
    return pl.pallas_call(
        functools.partial(_states_kernel, bs=bs, NT=NT, Kp=Kp, has_seg=seg is not None),
        grid=(B, H, Vp // BV),
        in_specs=[
            _whole(Tp, Kp),
            _spec(Tp, BV),
            _whole(Tp, Kp),
            _whole(NT * Kp, 1),
            _spec(Kp, BV),
            *seg_specs,
        ],  # fmt: skip
        out_specs=_spec((NT + 1) * Kp, BV),
        out_shape=jax.ShapeDtypeStruct((B, H, (NT + 1) * Kp, Vp), jnp.float32),
        compiler_params=_params(bs),
        interpret=gpu_interpret(),
        name="gla_states_gpu",
    )(k, v, G, gl, h0, *seg_args)


def _dstates(q, do, G, gl, dht, seg, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = do.shape[-1]
    NT, BV = Tp // bs.chunk, min(bs.block_v, Vp)
    seg_specs, seg_args = _seg_specs(seg, Tp)
    return pl.pallas_call(
        functools.partial(
            _dstates_kernel, bs=bs, NT=NT, Kp=Kp, scale=scale, has_seg=seg is not None
        ),
        grid=(B, H, Vp // BV),
        in_specs=[
            _whole(Tp, Kp),
            _spec(Tp, BV),
            _whole(Tp, Kp),
            _whole(NT * Kp, 1),
            _spec(Kp, BV),
            *seg_specs,
        ],  # fmt: skip
        out_specs=[_spec(NT * Kp, BV), _spec(Kp, BV)],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, NT * Kp, Vp), jnp.float32),
            jax.ShapeDtypeStruct((B, H, Kp, Vp), jnp.float32),
        ],
        compiler_params=_params(bs),
        interpret=gpu_interpret(),
        name="gla_dstates_gpu",
    )(q, do, G, gl, dht, *seg_args)


def _grads(q, k, v, G, do, h, dh, seg, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = v.shape[-1]
    C = bs.chunk
    NT = Tp // C
    chunk = lambda d: pl.BlockSpec((None, None, C, d), lambda b, hh, t: (b, hh, t, 0))
    state = lambda off: pl.BlockSpec((None, None, Kp, Vp), lambda b, hh, t: (b, hh, t + off, 0))
    seg_specs, seg_args = [], []
    if seg is not None:
        col = pl.BlockSpec((None, C, 1), lambda b, hh, t: (b, t, 0))
        row = pl.BlockSpec((None, 1, C), lambda b, hh, t: (b, 0, t))
        seg_specs, seg_args = [col, row, col, col], list(seg[:4])
    return pl.pallas_call(
        functools.partial(_grads_kernel, bs=bs, scale=scale, has_seg=seg is not None),
        grid=(B, H, NT),
        in_specs=[
            chunk(Kp),
            chunk(Kp),
            chunk(Vp),
            chunk(Kp),
            chunk(Vp),
            state(0),
            state(1),
            state(0),
            *seg_specs,
        ],  # fmt: skip
        out_specs=[
            chunk(Kp),
            chunk(Kp),
            chunk(Vp),
            pl.BlockSpec((None, None, Kp, 1), lambda b, hh, t: (b, hh, t, 0)),
        ],  # fmt: skip
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Tp, Kp), jnp.float32),
            jax.ShapeDtypeStruct((B, H, Tp, Kp), jnp.float32),
            jax.ShapeDtypeStruct((B, H, Tp, Vp), jnp.float32),
            jax.ShapeDtypeStruct((B, H, NT * Kp, 1), jnp.float32),
        ],
        compiler_params=_params(bs),
        cost_estimate=_chunk.cost_estimate(
            B, Tp, H, Kp, Vp, C=C, itemsize=q.dtype.itemsize, backward=True
        ),
        interpret=gpu_interpret(),
        name="gla_grads_gpu",
    )(q, k, v, G, do, h, h, dh, *seg_args)


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


def _gpu_segments(segment_ids, Tp, C):
    if segment_ids is None:
        return None
    cnt, inter, to_state, carry = segment_masks(segment_ids, Tp, C)
    col = lambda x: x[:, :, None]  # [B, Tp, 1]
    return col(cnt), cnt[:, None, :], col(inter), col(to_state), carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _gla(q, k, v, G, h0, seg, bs, scale):
    return _forward(q, k, v, G, last_gates(G, bs.chunk, seg), h0, seg, bs, scale)


def _gla_fwd(q, k, v, G, h0, seg, bs, scale):
    out = _forward(q, k, v, G, last_gates(G, bs.chunk, seg), h0, seg, bs, scale)
    return out, (q, k, v, G, h0, seg)  # states are recomputed (fp32) in the backward, not saved


def _gla_bwd(bs, scale, res, cts):
    q, k, v, G, h0, seg = res
    do, dht = cts
    C = bs.chunk
    gl = last_gates(G, C, seg)
    h = _states(k, v, G, gl, h0, seg, bs)  # [B, H, (NT+1) Kp, Vp]
    dh, dh0 = _dstates(q, do.astype(v.dtype), G, gl, dht, seg, bs, scale)
    dq, dk, dv, dgl = _grads(q, k, v, G, do.astype(v.dtype), h, dh, seg, bs, scale)
    return assemble_grads(q, k, v, dq, dk, dv, dgl, dh0, seg, C)


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


_gla.defvjp(_gla_fwd, _gla_bwd)


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


def gla_pallas_gpu(q, k, v, g, *, scale, initial_state=None, segment_ids=None, chunk_size=64):
    """`chunk_gla` on the GPU kernels. Returns ``(o [B, T, H, V], final_state [B, H, K, V])``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = effective_chunk(T, chunk_size)
    bs = BlockSizes(chunk=C, sub_chunk=min(SUB_CHUNK, C))
    pad = lambda d: max(16, _pow2(d))
    qh, kh, vh, G, h0 = prepare(q, k, v, g, initial_state, C, pad)
    seg = _gpu_segments(segment_ids, G.shape[2], C)
    o, final = _gla(qh, kh, vh, G, h0, seg, bs, float(scale))
    return jnp.swapaxes(o, 1, 2)[:, :T, :, :V], final[:, :, :K, :V]
