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
    del k, g, scale, initial_state, chunk_size
    if segment_ids is not None:
        return "segment_ids / cu_seqlens are not implemented in the Pallas kernels (use 'xla')"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims K={q.shape[-1]}, V={v.shape[-1]} exceed {MAX_HEAD_DIM}"
    return None


# ---------------------------------------------------------------------------------------------
# Kernel bodies. Refs are 2-D: [Tp, Kp] / [Tp, BV] for whole sequences, states [Kp, BV].


def _forward_kernel(
    q_ref, k_ref, v_ref, G_ref, gl_ref, h0_ref, o_ref, ht_ref, *, bs, NT, Kp, scale
):
    C, c = bs.chunk, bs.sub_chunk

    def body(t, S):  # the inter-chunk recurrence, chunk by chunk (paper Alg. 2, outer loop)
        r0 = t * C
        gl = gl_ref[pl.ds(t * Kp, Kp), :]  # [Kp, 1]: G at the chunk's last row, as a column
        return _chunk.fwd_chunk(q_ref, k_ref, v_ref, G_ref, o_ref, r0, S, gl, C=C, c=c, scale=scale)

    S = jax.lax.fori_loop(0, NT, body, h0_ref[...].astype(jnp.float32))  # S: [Kp, BV] fp32
    ht_ref[...] = S


def _states_kernel(k_ref, v_ref, G_ref, gl_ref, h0_ref, h_ref, *, bs, NT, Kp):
    def body(t, S):
        h_ref[pl.ds(t * Kp, Kp), :] = S  # state entering chunk t, fp32
        gl = gl_ref[pl.ds(t * Kp, Kp), :]
        return _chunk.state_update(k_ref, v_ref, G_ref, t * bs.chunk, S, gl, C=bs.chunk)

    S = jax.lax.fori_loop(0, NT, body, h0_ref[...].astype(jnp.float32))
    h_ref[pl.ds(NT * Kp, Kp), :] = S  # the final state closes the list


def _dstates_kernel(q_ref, do_ref, G_ref, gl_ref, dht_ref, dh_ref, dh0_ref, *, bs, NT, Kp, scale):
    def body(i, dS):  # reverse loop over chunks
        t = NT - 1 - i
        dh_ref[pl.ds(t * Kp, Kp), :] = dS  # gradient w.r.t. the state leaving chunk t
        gl = gl_ref[pl.ds(t * Kp, Kp), :]
        return _chunk.dstate_update(
            q_ref, do_ref, G_ref, t * bs.chunk, dS, gl, C=bs.chunk, scale=scale
        )

    dh0_ref[...] = jax.lax.fori_loop(0, NT, body, dht_ref[...].astype(jnp.float32))


def _grads_kernel(
    q_ref,
    k_ref,
    v_ref,
    G_ref,
    do_ref,
    h_ref,
    hn_ref,
    dh_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    dgl_ref,
    *,
    bs,
    scale,
):
    dgl_ref[...] = _chunk.grads_chunk(
        q_ref,
        k_ref,
        v_ref,
        G_ref,
        do_ref,
        h_ref[...],
        dh_ref[...],
        hn_ref[...],
        dq_ref,
        dk_ref,
        dv_ref,
        C=bs.chunk,
        c=bs.sub_chunk,
        scale=scale,
    )


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers. Inputs are head-first and padded: q, k, G [B, H, Tp, Kp], v [B, H, Tp, Vp].


def _params(bs):
    return pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=1)


def _spec(rows, cols):
    return pl.BlockSpec((None, None, rows, cols), lambda b, h, j: (b, h, 0, j))


def _whole(rows, cols):
    return pl.BlockSpec((None, None, rows, cols), lambda b, h, j: (b, h, 0, 0))


def _forward(q, k, v, G, gl, h0, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = v.shape[-1]
    NT, BV = Tp // bs.chunk, min(bs.block_v, Vp)
    kernel = functools.partial(_forward_kernel, bs=bs, NT=NT, Kp=Kp, scale=scale)
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
        ],
        out_specs=[_spec(Tp, BV), _spec(Kp, BV)],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Tp, Vp), v.dtype),
            jax.ShapeDtypeStruct((B, H, Kp, Vp), jnp.float32),
        ],
        compiler_params=_params(bs),
        cost_estimate=_chunk.cost_estimate(B, Tp, H, Kp, Vp, C=bs.chunk, itemsize=q.dtype.itemsize),
        interpret=gpu_interpret(),
        name="gla_fwd_gpu",
    )(q, k, v, G, gl, h0)


def _states(k, v, G, gl, h0, bs):
    B, H, Tp, Kp = k.shape
    Vp = v.shape[-1]
    NT, BV = Tp // bs.chunk, min(bs.block_v, Vp)
    return pl.pallas_call(
        functools.partial(_states_kernel, bs=bs, NT=NT, Kp=Kp),
        grid=(B, H, Vp // BV),
        in_specs=[_whole(Tp, Kp), _spec(Tp, BV), _whole(Tp, Kp), _whole(NT * Kp, 1), _spec(Kp, BV)],
        out_specs=_spec((NT + 1) * Kp, BV),
        out_shape=jax.ShapeDtypeStruct((B, H, (NT + 1) * Kp, Vp), jnp.float32),
        compiler_params=_params(bs),
        interpret=gpu_interpret(),
        name="gla_states_gpu",
    )(k, v, G, gl, h0)


def _dstates(q, do, G, gl, dht, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = do.shape[-1]
    NT, BV = Tp // bs.chunk, min(bs.block_v, Vp)
    return pl.pallas_call(
        functools.partial(_dstates_kernel, bs=bs, NT=NT, Kp=Kp, scale=scale),
        grid=(B, H, Vp // BV),
        in_specs=[_whole(Tp, Kp), _spec(Tp, BV), _whole(Tp, Kp), _whole(NT * Kp, 1), _spec(Kp, BV)],
        out_specs=[_spec(NT * Kp, BV), _spec(Kp, BV)],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, NT * Kp, Vp), jnp.float32),
            jax.ShapeDtypeStruct((B, H, Kp, Vp), jnp.float32),
        ],
        compiler_params=_params(bs),
        interpret=gpu_interpret(),
        name="gla_dstates_gpu",
    )(q, do, G, gl, dht)


def _grads(q, k, v, G, do, h, dh, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = v.shape[-1]
    C = bs.chunk
    NT = Tp // C
    chunk = lambda d: pl.BlockSpec((None, None, C, d), lambda b, hh, t: (b, hh, t, 0))
    state = lambda off: pl.BlockSpec((None, None, Kp, Vp), lambda b, hh, t: (b, hh, t + off, 0))
    return pl.pallas_call(
        functools.partial(_grads_kernel, bs=bs, scale=scale),
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
        ],
        out_specs=[
            chunk(Kp),
            chunk(Kp),
            chunk(Vp),
            pl.BlockSpec((None, None, Kp, 1), lambda b, hh, t: (b, hh, t, 0)),
        ],
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
    )(q, k, v, G, do, h, h, dh)


def _last_gates(G, C):
    """G at the last row of every chunk as stacked [Kp, 1] columns: [B, H, NT * Kp, 1]."""
    B, H, Tp, Kp = G.shape
    return G[:, :, C - 1 :: C, :].reshape(B, H, (Tp // C) * Kp, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gla(q, k, v, G, h0, bs, scale):
    return _forward(q, k, v, G, _last_gates(G, bs.chunk), h0, bs, scale)


def _gla_fwd(q, k, v, G, h0, bs, scale):
    out = _forward(q, k, v, G, _last_gates(G, bs.chunk), h0, bs, scale)
    return out, (q, k, v, G, h0)  # states are recomputed (fp32) in the backward, not saved


def _gla_bwd(bs, scale, res, cts):
    q, k, v, G, h0 = res
    do, dht = cts
    C = bs.chunk
    gl = _last_gates(G, C)
    h = _states(k, v, G, gl, h0, bs)  # [B, H, (NT+1) Kp, Vp]
    dh, dh0 = _dstates(q, do.astype(v.dtype), G, gl, dht, bs, scale)
    dq, dk, dv, dgl = _grads(q, k, v, G, do.astype(v.dtype), h, dh, bs, scale)
    B, H, Tp, Kp = q.shape
    dG = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk  # [B, H, Tp, Kp]
    dG = dG.reshape(B, H, Tp // C, C, Kp).at[:, :, :, -1, :].add(dgl.reshape(B, H, Tp // C, Kp))
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        dG.reshape(B, H, Tp, Kp),
        dh0,
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
    del segment_ids  # rejected by `supports`
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = effective_chunk(T, chunk_size)
    bs = BlockSizes(chunk=C, sub_chunk=min(SUB_CHUNK, C))
    pad = lambda d: max(16, _pow2(d))
    qh, kh, vh, G, h0 = prepare(q, k, v, g, initial_state, C, pad)
    o, final = _gla(qh, kh, vh, G, h0, bs, float(scale))
    return jnp.swapaxes(o, 1, 2)[:, :T, :, :V], final[:, :, :K, :V]
