"""Gated linear attention as Pallas TPU (Mosaic) kernels.

Head-first blocks ``[C, Kp]`` / ``[C, BV]`` whose last two dims satisfy the (8, 128) tiling:
T is padded to whole chunks (C a multiple of 16) and K, V to multiples of 128 (the lane width).
The TPU grid runs in order, so chunks sit on the innermost "arbitrary" grid axis and the
recurrent state is carried across grid steps in a VMEM scratch buffer.

Kernels (fp32 accumulation; matmul operands keep the input dtype):
  forward  grid (B, H, V/BV, NT):  o per chunk; the state lives in VMEM; final state at the end.
  states   grid (B, H, V/BV, NT):  the state entering every chunk, recomputed in fp32 (backward).
  dstates  grid (B, H, V/BV, NT):  chunks visited in reverse for the state gradients.
  grads    grid (B, H, NT, V/BV):  dq, dk, dv per chunk and value block (all parallel) and
                                   the dG_L term (partial sums over value blocks, like the GPU).
This file holds what is Mosaic's own: the first three kernel bodies (grid steps over the
chunks), the block specs, the compiler params and the ``pallas_call`` wrappers. The chunk math
(`_chunk.py`), the padding, the segment masks, the gradient kernel, the custom_vjp
(`_common.make_chunk_gla`) and the cost model are shared with the GPU kernels in `_common.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.gla import _common
from jaxblocks.kernels.interpret import tpu_interpret

BACKEND = "pallas_tpu"
LANES = _common.LANES


def _pad_dim(d: int) -> int:
    """K, V padded to a multiple of the 128 lanes."""
    return -(-d // LANES) * LANES


def supports(
    q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, block_sizes=None, precision=None
):
    """None, or why the Mosaic kernels cannot take these inputs (head dims, block sizes, the
    per-program `_common.working_set`)."""
    return _common.supports(
        BACKEND, q, k, v, g, scale=scale, initial_state=initial_state,
        segment_ids=segment_ids, chunk_size=chunk_size, block_sizes=block_sizes,
        precision=precision,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Kernel bodies: every ref is one chunk [C, D] or one state block [Kp, BV]. With segments, four
# more input refs (one chunk each: col, inter, to_state [C, 1]; row [1, C]) follow the inputs.


def _forward_kernel(*refs, bs, scale, has_seg):
    ins, seg, (o_ref, ht_ref, S_ref) = _common.split_refs(refs, 6, has_seg)
    q_ref, k_ref, v_ref, G_ref, gl_ref, h0_ref = ins
    t = pl.program_id(3)

    @pl.when(t == 0)
    def _():
        S_ref[...] = h0_ref[...]

    # One step of the inter-chunk recurrence; the state never leaves VMEM.
    S_ref[...] = _common.fwd_chunk(
        q_ref, k_ref, v_ref, G_ref, o_ref, 0, S_ref[...], gl_ref[...],
        C=bs.chunk, c=bs.sub_chunk, scale=scale, precision=bs.precision, seg=seg,
    )  # fmt: skip

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        ht_ref[...] = S_ref[...]


def _states_kernel(*refs, bs, has_seg):
    (k_ref, v_ref, G_ref, gl_ref, h0_ref), seg, (h_ref, ht_ref, S_ref) = _common.split_refs(
        refs, 5, has_seg
    )
    t = pl.program_id(3)

    @pl.when(t == 0)
    def _():
        S_ref[...] = h0_ref[...]

    h_ref[...] = S_ref[...]  # state entering chunk t, fp32
    S_ref[...] = _common.state_update(
        k_ref, v_ref, G_ref, 0, S_ref[...], gl_ref[...], C=bs.chunk, precision=bs.precision,
        seg=seg,
    )  # fmt: skip

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        ht_ref[...] = S_ref[...]


def _dstates_kernel(*refs, bs, scale, has_seg):
    ins, seg, (dh_ref, dh0_ref, dS_ref) = _common.split_refs(refs, 5, has_seg)
    q_ref, do_ref, G_ref, gl_ref, dht_ref = ins
    t = pl.program_id(3)  # chunk NT - 1 - t (the index maps walk backwards)

    @pl.when(t == 0)
    def _():
        dS_ref[...] = dht_ref[...]

    dh_ref[...] = dS_ref[...]  # gradient w.r.t. the state leaving this chunk
    dS_ref[...] = _common.dstate_update(
        q_ref, do_ref, G_ref, 0, dS_ref[...], gl_ref[...],
        C=bs.chunk, scale=scale, precision=bs.precision, seg=seg,
    )  # fmt: skip

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        dh0_ref[...] = dS_ref[...]


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers. Inputs are head-first and padded: q, k, G [B, H, Tp, Kp], v [B, H, Tp, Vp];
# segments: col, inter, to_state [B, Tp, 1] and row [B, NT, 1, C] (a (1, C) block is legal
# because C is the full last dim).

_SEQ = ("parallel", "parallel", "parallel", "arbitrary")


def _seg_specs(seg, C, index):
    """BlockSpecs for the segment arrays; ``index(*grid) -> chunk index``."""
    if seg is None:
        return [], []
    col = pl.BlockSpec((None, C, 1), lambda *g: (g[0], index(*g), 0))
    row = pl.BlockSpec((None, None, 1, C), lambda *g: (g[0], index(*g), 0, 0))
    return [col, row, col, col], list(seg[:4])


def _fwd_specs(C, Kp, BV, reverse_nt=None):
    t_ = (lambda t: t) if reverse_nt is None else (lambda t: reverse_nt - 1 - t)
    chunk_k = pl.BlockSpec((None, None, C, Kp), lambda b, h, j, t: (b, h, t_(t), 0))
    chunk_v = pl.BlockSpec((None, None, C, BV), lambda b, h, j, t: (b, h, t_(t), j))
    gl = pl.BlockSpec((None, None, Kp, 1), lambda b, h, j, t: (b, h, t_(t), 0))
    state = pl.BlockSpec((None, None, Kp, BV), lambda b, h, j, t: (b, h, 0, j))
    per_chunk_state = pl.BlockSpec((None, None, Kp, BV), lambda b, h, j, t: (b, h, t_(t), j))
    return chunk_k, chunk_v, gl, state, per_chunk_state, lambda b, h, j, t: t_(t)


def _forward(q, k, v, G, gl, h0, seg, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = v.shape[-1]
    NT, BV = Tp // bs.chunk, bs.block_v
    ck, cv, glspec, st, _, idx = _fwd_specs(bs.chunk, Kp, BV)
    seg_specs, seg_args = _seg_specs(seg, bs.chunk, idx)
    return pl.pallas_call(
        functools.partial(_forward_kernel, bs=bs, scale=scale, has_seg=seg is not None),
        grid=(B, H, Vp // BV, NT),
        in_specs=[ck, ck, cv, ck, glspec, st, *seg_specs],
        out_specs=[cv, st],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Tp, Vp), v.dtype),
            jax.ShapeDtypeStruct((B, H, Kp, Vp), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((Kp, BV), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEQ),
        cost_estimate=_common.cost_estimate(
            B, Tp, H, Kp, Vp, chunk=bs.chunk, itemsize=q.dtype.itemsize
        ),
        interpret=tpu_interpret(),
        name="gla_fwd_tpu",
    )(q, k, v, G, gl, h0, *seg_args)


def _states(k, v, G, gl, h0, seg, bs):
    B, H, Tp, Kp = k.shape
    Vp = v.shape[-1]
    NT, BV = Tp // bs.chunk, bs.block_v
    ck, cv, glspec, st, pst, idx = _fwd_specs(bs.chunk, Kp, BV)
    seg_specs, seg_args = _seg_specs(seg, bs.chunk, idx)
    return pl.pallas_call(
        functools.partial(_states_kernel, bs=bs, has_seg=seg is not None),
        grid=(B, H, Vp // BV, NT),
        in_specs=[ck, cv, ck, glspec, st, *seg_specs],
        out_specs=[pst, st],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, NT * Kp, Vp), jnp.float32),
            jax.ShapeDtypeStruct((B, H, Kp, Vp), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((Kp, BV), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEQ),
        interpret=tpu_interpret(),
        name="gla_states_tpu",
    )(k, v, G, gl, h0, *seg_args)


def _dstates(q, do, G, gl, dht, seg, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = do.shape[-1]
    NT, BV = Tp // bs.chunk, bs.block_v
    ck, cv, glspec, st, pst, idx = _fwd_specs(bs.chunk, Kp, BV, reverse_nt=NT)
    seg_specs, seg_args = _seg_specs(seg, bs.chunk, idx)
    return pl.pallas_call(
        functools.partial(_dstates_kernel, bs=bs, scale=scale, has_seg=seg is not None),
        grid=(B, H, Vp // BV, NT),
        in_specs=[ck, cv, ck, glspec, st, *seg_specs],
        out_specs=[pst, st],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, NT * Kp, Vp), jnp.float32),
            jax.ShapeDtypeStruct((B, H, Kp, Vp), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((Kp, BV), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEQ),
        interpret=tpu_interpret(),
        name="gla_dstates_tpu",
    )(q, do, G, gl, dht, *seg_args)


def _grads(q, k, v, G, do, h, dh, seg, bs, scale):
    B, H, Tp, Kp = q.shape
    Vp = v.shape[-1]
    C = bs.chunk
    in_specs, out_specs, out_shape = _common.grads_blocks(q.shape, Vp, C, bs.block_v)
    seg_specs, seg_args = _seg_specs(seg, C, lambda b, hh, t, j: t)
    return pl.pallas_call(
        functools.partial(_common.grads_kernel, tiles=bs, scale=scale, has_seg=seg is not None),
        grid=(B, H, Tp // C, Vp // bs.block_v),
        in_specs=[*in_specs, *seg_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 4),
        cost_estimate=_common.cost_estimate(
            B, Tp, H, Kp, Vp, chunk=C, itemsize=q.dtype.itemsize, backward=True
        ),
        interpret=tpu_interpret(),
        name="gla_grads_tpu",
    )(q, k, v, G, do, h, h, dh, *seg_args)


def _states_and_final(k, v, G, gl, h0, seg, bs):
    """The entering states followed by the final state: [B, H, (NT + 1) Kp, Vp]."""
    h, ht = _states(k, v, G, gl, h0, seg, bs)
    return jnp.concatenate([h, ht], axis=2)


def _segment_row(count, C):
    """The segment count as one row per chunk: [B, NT, 1, C] (a (1, C) block is legal because C
    is the full last dim)."""
    B, Tp = count.shape
    return count.reshape(B, Tp // C, 1, C)


# `chunk_gla` on the TPU kernels: ``(o [B, T, H, V], final_state [B, H, K, V])``.
gla_pallas_tpu = _common.make_chunk_gla(
    _common.Backend(
        name=BACKEND,
        pad_dim=_pad_dim,
        segment_row=_segment_row,
        forward=_forward,
        states=_states_and_final,
        dstates=_dstates,
        grads=_grads,
    )
)
