"""Gated linear attention as Pallas GPU kernels (Triton backend).

Layout inside: head-first ``[B, H, T, D]``, T padded to whole chunks, K and V padded to powers
of two (Triton needs power-of-two tensors). The GPU grid is parallel, so an inter-chunk
recurrence is a loop inside the kernel over programs that split batch, heads and value blocks;
only the ``[K, BV]`` state updates run that way. Everything per chunk (the intra-chunk scores,
the outputs, the gradients) runs one program per chunk, as in fla's ``chunk_gla``
(``chunk_fwd_h`` then ``chunk_gla_fwd_o``).

Kernels (all accumulate in fp32; operands keep the input dtype in matmuls):
  states    grid (B, H, V/BV): loop over chunks, write the fp32 state entering every chunk and
            the final state (forward, and recomputed in the backward).
  fwd_o     grid (B, H, NT, V/BV): o of each chunk and value block in parallel, from the state
            entering the chunk: (q ⊙ e^G) h plus the sub-chunked intra-chunk part.
  dstates   grid (B, H, V/BV): the reverse loop for the state gradients, and d initial_state.
  grads     grid (B, H, NT, V/BV): dq, dk, dv of each chunk and value block in parallel, and
            the dG_L term (dq, dk, dG_L as partial sums over the value blocks, summed by XLA).
The forward is states + fwd_o: the final state is the last row block of the states output. The
intra-chunk scores are recomputed by each value block's program (fla keeps them in HBM instead;
at the default block_v = 64 one program covers V <= 64). dg is the reverse chunk-local cumsum of
``q ⊙ dq − k ⊙ dk`` (+ dG_L), done by XLA as the VJP of the gate cumsum, which is also computed
by XLA before the kernels.

This file holds what is Triton's own: the kernel bodies of the sequential passes and of the
output kernel, the block specs, the compiler params and the ``pallas_call`` wrappers. The
padding, the segment masks, the gradient kernel, the custom_vjp (`_common.make_chunk_gla`) and
the cost model are in `_common.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.gla import _common
from jaxblocks.kernels.interpret import gpu_interpret

BACKEND = "pallas_gpu"


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pad_dim(d: int) -> int:
    """K, V padded to a power of two >= 16 (Triton tensors are powers of two, tl.dot >= 16)."""
    return max(16, _pow2(d))


def supports(
    q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, block_sizes=None, precision=None
):
    """None, or why the Triton kernels cannot take these inputs (head dims, block sizes, the
    per-program `_common.working_set`)."""
    return _common.supports(
        BACKEND, q, k, v, g, scale=scale, initial_state=initial_state,
        segment_ids=segment_ids, chunk_size=chunk_size, block_sizes=block_sizes,
        precision=precision,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Kernel bodies. Refs are 2-D: [Tp, Kp] / [Tp, BV] for whole sequences in the sequential passes,
# [C, Kp] / [C, BV] for one chunk in fwd_o; states [Kp, BV]. With segments, four more input refs
# follow the regular inputs (see `_common.Segs`).


def _fwd_o_kernel(*refs, bs, scale, has_seg):
    # One chunk and one value block (paper Alg. 2 with the outer loop's states precomputed):
    # q, k, G [C, Kp], v [C, BV], h [Kp, BV] the fp32 state entering the chunk; o [C, BV].
    (q_ref, k_ref, v_ref, G_ref, h_ref), seg, (o_ref,) = _common.split_refs(refs, 5, has_seg)
    _common.chunk_output(
        q_ref, k_ref, v_ref, G_ref, o_ref, 0, h_ref[...],
        C=bs.chunk, c=bs.sub_chunk, scale=scale, precision=bs.precision, seg=seg,
    )  # fmt: skip


def _states_kernel(*refs, bs, NT, Kp, has_seg):
    (k_ref, v_ref, G_ref, gl_ref, h0_ref), seg, (h_ref,) = _common.split_refs(refs, 5, has_seg)

    def body(t, S):
        h_ref[pl.ds(t * Kp, Kp), :] = S  # state entering chunk t, fp32
        gl = gl_ref[pl.ds(t * Kp, Kp), :]
        return _common.state_update(
            k_ref, v_ref, G_ref, t * bs.chunk, S, gl, C=bs.chunk, precision=bs.precision, seg=seg
        )

    S = jax.lax.fori_loop(0, NT, body, h0_ref[...].astype(jnp.float32))
    h_ref[pl.ds(NT * Kp, Kp), :] = S  # the final state closes the list


def _dstates_kernel(*refs, bs, NT, Kp, scale, has_seg):
    (q_ref, do_ref, G_ref, gl_ref, dht_ref), seg, (dh_ref, dh0_ref) = _common.split_refs(
        refs, 5, has_seg
    )

    def body(i, dS):  # reverse loop over chunks
        t = NT - 1 - i
        dh_ref[pl.ds(t * Kp, Kp), :] = dS  # gradient w.r.t. the state leaving chunk t
        gl = gl_ref[pl.ds(t * Kp, Kp), :]
        return _common.dstate_update(
            q_ref, do_ref, G_ref, t * bs.chunk, dS, gl,
            C=bs.chunk, scale=scale, precision=bs.precision, seg=seg,
        )  # fmt: skip

    dh0_ref[...] = jax.lax.fori_loop(0, NT, body, dht_ref[...].astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers. Inputs are head-first and padded: q, k, G [B, H, Tp, Kp], v [B, H, Tp, Vp];
# segment arrays (`_common.segment_arrays`): col, inter, to_state [B, Tp, 1] and row [B, 1, Tp].


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


def _chunk_seg_specs(seg, C):
    """Segment specs of one chunk over the grid (B, H, NT, NV): col, inter, to_state [C, 1] and
    row [1, C] (the same arrays as `_seg_specs`, blocked by chunk)."""
    if seg is None:
        return [], []
    col = pl.BlockSpec((None, C, 1), lambda b, hh, t, j: (b, t, 0))
    row = pl.BlockSpec((None, 1, C), lambda b, hh, t, j: (b, 0, t))
    return [col, row, col, col], list(seg[:4])


def _states(k, v, G, gl, h0, seg, bs):
    B, H, Tp, Kp = k.shape
    Vp = v.shape[-1]
    NT, BV = Tp // bs.chunk, bs.block_v
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


def _fwd_o(q, k, v, G, h, seg, bs, scale):
    """o [B, H, Tp, Vp] in v's dtype, one program per chunk and value block; ``h`` is the
    `_states` output (its last row block, the final state, is not read)."""
    B, H, Tp, Kp = q.shape
    Vp = v.shape[-1]
    C, BV = bs.chunk, bs.block_v
    chunk = pl.BlockSpec((None, None, C, Kp), lambda b, hh, t, j: (b, hh, t, 0))
    chunk_v = pl.BlockSpec((None, None, C, BV), lambda b, hh, t, j: (b, hh, t, j))
    state = pl.BlockSpec((None, None, Kp, BV), lambda b, hh, t, j: (b, hh, t, j))
    seg_specs, seg_args = _chunk_seg_specs(seg, C)
    return pl.pallas_call(
        functools.partial(_fwd_o_kernel, bs=bs, scale=scale, has_seg=seg is not None),
        grid=(B, H, Tp // C, Vp // BV),
        in_specs=[chunk, chunk, chunk_v, chunk, state, *seg_specs],
        out_specs=chunk_v,
        out_shape=jax.ShapeDtypeStruct((B, H, Tp, Vp), v.dtype),
        compiler_params=_params(bs),
        # The whole forward's cost (the states pass included), as the benchmarks count it.
        cost_estimate=_common.cost_estimate(B, Tp, H, Kp, Vp, chunk=C, itemsize=q.dtype.itemsize),
        interpret=gpu_interpret(),
        name="gla_fwd_o_gpu",
    )(q, k, v, G, h, *seg_args)


def _forward(q, k, v, G, gl, h0, seg, bs, scale):
    """``(o [B, H, Tp, Vp], final_state [B, H, Kp, Vp] fp32)``: the sequential states pass, then
    the chunk-parallel output kernel."""
    Kp = q.shape[-1]
    NT = q.shape[2] // bs.chunk
    h = _states(k, v, G, gl, h0, seg, bs)  # [B, H, (NT + 1) Kp, Vp]: entering states, final
    return _fwd_o(q, k, v, G, h, seg, bs, scale), h[:, :, NT * Kp :, :]


def _dstates(q, do, G, gl, dht, seg, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = do.shape[-1]
    NT, BV = Tp // bs.chunk, bs.block_v
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
    in_specs, out_specs, out_shape = _common.grads_blocks(q.shape, Vp, C, bs.block_v)
    seg_specs, seg_args = _chunk_seg_specs(seg, C)
    return pl.pallas_call(
        functools.partial(_common.grads_kernel, tiles=bs, scale=scale, has_seg=seg is not None),
        grid=(B, H, Tp // C, Vp // bs.block_v),
        in_specs=[*in_specs, *seg_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(bs),
        cost_estimate=_common.cost_estimate(
            B, Tp, H, Kp, Vp, chunk=C, itemsize=q.dtype.itemsize, backward=True
        ),
        interpret=gpu_interpret(),
        name="gla_grads_gpu",
    )(q, k, v, G, do, h, h, dh, *seg_args)


def _segment_row(count, C):
    """The segment count as one row per batch row: [B, 1, Tp] (the GPU blocks span all of T)."""
    del C
    return count[:, None, :]


# `chunk_gla` on the GPU kernels: ``(o [B, T, H, V], final_state [B, H, K, V])``.
gla_pallas_gpu = _common.make_chunk_gla(
    _common.Backend(
        name=BACKEND,
        pad_dim=_pad_dim,
        segment_row=_segment_row,
        forward=_forward,
        states=_states,
        dstates=_dstates,
        grads=_grads,
    )
)
