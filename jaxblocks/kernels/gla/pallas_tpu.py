"""Gated linear attention as Pallas TPU (Mosaic) kernels, with a custom_vjp.

Head-first blocks ``[C, Kp]`` / ``[C, BV]`` whose last two dims satisfy the (8, 128) tiling:
T is padded to whole chunks (C a multiple of 16) and K, V to multiples of 128 (the lane width).
The TPU grid runs in order, so chunks sit on the innermost "arbitrary" grid axis and the
recurrent state is carried across grid steps in a VMEM scratch buffer.

Kernels (fp32 accumulation; matmul operands keep the input dtype):
  forward  grid (B, H, V/BV, NT):  o per chunk; the state lives in VMEM; final state at the end.
  states   grid (B, H, V/BV, NT):  the state entering every chunk, recomputed in fp32 (backward).
  dstates  grid (B, H, V/BV, NT):  chunks visited in reverse for the state gradients.
  grads    grid (B, H, NT):        dq, dk, dv per chunk (all parallel) and the dG_L term.
The chunk math is shared with the GPU kernels (`_chunk.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.gla import _chunk
from jaxblocks.kernels.gla.pallas_gpu import (
    MAX_HEAD_DIM,
    assemble_grads,
    last_gates,
    prepare,
    segment_masks,
)
from jaxblocks.kernels.gla.xla import SUB_CHUNK, effective_chunk
from jaxblocks.kernels.interpret import tpu_interpret

LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Chunk ``C`` (multiple of 16), sub-chunk ``c`` and value block ``BV`` (multiple of 128)."""

    chunk: int = 64
    sub_chunk: int = SUB_CHUNK
    block_v: int = LANES

    def __post_init__(self):
        if self.chunk % 16 or self.chunk % self.sub_chunk or self.sub_chunk % 8:
            raise ValueError(
                f"BlockSizes: chunk {self.chunk} must be a multiple of 16 and of sub_chunk "
                f"{self.sub_chunk} (itself a multiple of 8)"
            )
        if self.block_v % LANES:
            raise ValueError(
                f"BlockSizes.block_v must be a multiple of {LANES}, got {self.block_v}"
            )


def supports(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size):
    del k, g, scale, initial_state, chunk_size, segment_ids
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims K={q.shape[-1]}, V={v.shape[-1]} exceed {MAX_HEAD_DIM}"
    return None


# ---------------------------------------------------------------------------------------------
# Kernel bodies: every ref is one chunk [C, D] or one state block [Kp, BV]. With segments, four
# more input refs (one chunk each: col, inter, to_state [C, 1]; row [1, C]) follow the inputs.


def _split(refs, n_in, has_seg):
    ins, rest = refs[:n_in], refs[n_in:]
    seg = _chunk.Segs(*rest[:4]) if has_seg else None
    return ins, seg, rest[4:] if has_seg else rest


def _forward_kernel(*refs, bs, scale, has_seg):
    ins, seg, (o_ref, ht_ref, S_ref) = _split(refs, 6, has_seg)
    q_ref, k_ref, v_ref, G_ref, gl_ref, h0_ref = ins
    t = pl.program_id(3)

    @pl.when(t == 0)
    def _():
        S_ref[...] = h0_ref[...]

    # One step of the inter-chunk recurrence; the state never leaves VMEM.
    S_ref[...] = _chunk.fwd_chunk(
        q_ref, k_ref, v_ref, G_ref, o_ref, 0, S_ref[...], gl_ref[...],
        C=bs.chunk, c=bs.sub_chunk, scale=scale, seg=seg,
    )  # fmt: skip

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        ht_ref[...] = S_ref[...]


def _states_kernel(*refs, bs, has_seg):
    (k_ref, v_ref, G_ref, gl_ref, h0_ref), seg, (h_ref, ht_ref, S_ref) = _split(refs, 5, has_seg)
    t = pl.program_id(3)

    @pl.when(t == 0)
    def _():
        S_ref[...] = h0_ref[...]

    h_ref[...] = S_ref[...]  # state entering chunk t, fp32
    S_ref[...] = _chunk.state_update(
        k_ref, v_ref, G_ref, 0, S_ref[...], gl_ref[...], C=bs.chunk, seg=seg
    )

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        ht_ref[...] = S_ref[...]


def _dstates_kernel(*refs, bs, scale, has_seg):
    ins, seg, (dh_ref, dh0_ref, dS_ref) = _split(refs, 5, has_seg)
    q_ref, do_ref, G_ref, gl_ref, dht_ref = ins
    t = pl.program_id(3)  # chunk NT - 1 - t (the index maps walk backwards)

    @pl.when(t == 0)
    def _():
        dS_ref[...] = dht_ref[...]

    dh_ref[...] = dS_ref[...]  # gradient w.r.t. the state leaving this chunk
    dS_ref[...] = _chunk.dstate_update(
        q_ref, do_ref, G_ref, 0, dS_ref[...], gl_ref[...], C=bs.chunk, scale=scale, seg=seg
    )

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        dh0_ref[...] = dS_ref[...]


def _grads_kernel(*refs, bs, scale, has_seg):
    ins, seg, (dq_ref, dk_ref, dv_ref, dgl_ref) = _split(refs, 8, has_seg)
    q_ref, k_ref, v_ref, G_ref, do_ref, h_ref, hn_ref, dh_ref = ins
    dgl_ref[...] = _chunk.grads_chunk(
        q_ref, k_ref, v_ref, G_ref, do_ref, h_ref[...], dh_ref[...], hn_ref[...],
        dq_ref, dk_ref, dv_ref, C=bs.chunk, c=bs.sub_chunk, scale=scale, seg=seg,
    )  # fmt: skip


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
    NT, BV = Tp // bs.chunk, min(bs.block_v, Vp)
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
        cost_estimate=_chunk.cost_estimate(B, Tp, H, Kp, Vp, C=bs.chunk, itemsize=q.dtype.itemsize),
        interpret=tpu_interpret(),
        name="gla_fwd_tpu",
    )(q, k, v, G, gl, h0, *seg_args)


def _states(k, v, G, gl, h0, seg, bs):
    B, H, Tp, Kp = k.shape
    Vp = v.shape[-1]
    NT, BV = Tp // bs.chunk, min(bs.block_v, Vp)
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
    NT, BV = Tp // bs.chunk, min(bs.block_v, Vp)
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
    NT = Tp // C
    chunk = lambda d: pl.BlockSpec((None, None, C, d), lambda b, hh, t: (b, hh, t, 0))
    state = lambda off: pl.BlockSpec((None, None, Kp, Vp), lambda b, hh, t: (b, hh, t + off, 0))
    seg_specs, seg_args = _seg_specs(seg, C, lambda b, hh, t: t)
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
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        cost_estimate=_chunk.cost_estimate(
            B, Tp, H, Kp, Vp, C=C, itemsize=q.dtype.itemsize, backward=True
        ),
        interpret=tpu_interpret(),
        name="gla_grads_tpu",
    )(q, k, v, G, do, h, h, dh, *seg_args)


def _tpu_segments(segment_ids, Tp, C):
    if segment_ids is None:
        return None
    cnt, inter, to_state, carry = segment_masks(segment_ids, Tp, C)
    col = lambda x: x[:, :, None]  # [B, Tp, 1]
    B = cnt.shape[0]
    return col(cnt), cnt.reshape(B, Tp // C, 1, C), col(inter), col(to_state), carry


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
    h, ht = _states(k, v, G, gl, h0, seg, bs)
    h = jnp.concatenate([h, ht], axis=2)  # [B, H, (NT+1) Kp, Vp]: entering states + final
    dh, dh0 = _dstates(q, do.astype(v.dtype), G, gl, dht, seg, bs, scale)
    dq, dk, dv, dgl = _grads(q, k, v, G, do.astype(v.dtype), h, dh, seg, bs, scale)
    return assemble_grads(q, k, v, dq, dk, dv, dgl, dh0, seg, C)


_gla.defvjp(_gla_fwd, _gla_bwd)


def gla_pallas_tpu(q, k, v, g, *, scale, initial_state=None, segment_ids=None, chunk_size=64):
    """`chunk_gla` on the TPU kernels. Returns ``(o [B, T, H, V], final_state [B, H, K, V])``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = effective_chunk(T, chunk_size)
    bs = BlockSizes(chunk=C, sub_chunk=min(SUB_CHUNK, C))
    pad = lambda d: -(-d // LANES) * LANES
    qh, kh, vh, G, h0 = prepare(q, k, v, g, initial_state, C, pad)
    seg = _tpu_segments(segment_ids, G.shape[2], C)
    o, final = _gla(qh, kh, vh, G, h0, seg, bs, float(scale))
    return jnp.swapaxes(o, 1, 2)[:, :T, :, :V], final[:, :, :K, :V]
