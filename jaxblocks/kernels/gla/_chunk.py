"""Per-chunk math shared by the Pallas GPU and TPU kernels (see README.md for the derivation);
`_common.py` re-exports what the backends call.

Every function works on 2-D blocks read from refs: ``q, k, G: [rows, K]``, ``v, do: [rows, BV]``,
states ``[K, BV]`` fp32 and the chunk's last gate cumsum as a column ``gl: [K, 1]``. ``G`` is the
chunk-local inclusive cumsum of the log gates (fp32, computed before the kernel). ``r0`` is the
chunk's first row in the refs (0 when the block is one chunk). Sub-chunks are ``c`` rows; the
off-diagonal sub-block pairs are rescaled against ``G`` at the first row of the row sub-chunk and
multiplied in the operand dtype (fp32 accumulation); diagonal sub-blocks are exact in fp32.
Rows of a value are picked with masked sums instead of dynamic slices, which both backends lower
for any dtype (packed bf16 rows on TPU included).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ
_TN = (((0,), (0,)), ((), ()))  # aᵀ @ b


class Segs(NamedTuple):
    """Segment refs (fp32), rows as in the q/k refs. ``None`` everywhere means no segments.

    col / row: the running count of segment starts as a column [rows, 1] / a row [1, rows];
    inter: 1 where the row continues the state entering its chunk (no start in between);
    to_state: 1 where the row is in the segment that reaches the end of its chunk.
    (The carried state is cut where a chunk holds a start by setting ``gl`` to -inf outside.)
    """

    col: Any
    row: Any
    inter: Any
    to_state: Any


def _same(seg, rI, rJ, c):
    """[c, c]: row i of sub-chunk rI and row j of sub-chunk rJ are in the same segment."""
    return seg.col[pl.ds(rI, c), :] == seg.row[:, pl.ds(rJ, c)]


def _mask(seg, x, rI, rJ, c):
    return x if seg is None else jnp.where(_same(seg, rI, rJ, c), x, 0.0)


def _rows(seg, name, r, n):
    """[n, 1] row mask (inter / to_state), or 1 without segments."""
    return 1.0 if seg is None else getattr(seg, name)[pl.ds(r, n), :]


# Every matrix product of the kernels goes through these three, at the op's ``precision`` (a
# `jax.lax.Precision`: HIGHEST keeps fp32 operands in IEEE fp32 on Triton and multi-pass on
# Mosaic, DEFAULT lets them through TF32 / one bf16 pass); bf16 operands are exact either way.


def dot(a, b, dt, precision):
    """a @ b with operands cast to ``dt``, fp32 accumulation."""
    return jnp.dot(a.astype(dt), b.astype(dt), precision=precision, preferred_element_type=F32)


def dot_nt(a, b, dt, precision):
    """a @ bᵀ."""
    return jax.lax.dot_general(
        a.astype(dt), b.astype(dt), _NT, precision=precision, preferred_element_type=F32
    )


def dot_tn(a, b, dt, precision):
    """aᵀ @ b."""
    return jax.lax.dot_general(
        a.astype(dt), b.astype(dt), _TN, precision=precision, preferred_element_type=F32
    )


def _exp_masked(keep, x):
    """exp(x) where keep else 0; the exponent is zeroed first so nothing can overflow."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, x, 0.0)), 0.0)


def _row(x, j):
    """Row j of x [c, D] as [1, D] (a masked sum: no dynamic slicing)."""
    ii = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(ii == j, x, 0.0), axis=0, keepdims=True)


def _col(x, j):
    """Column j of x [c, c] as [c, 1]."""
    jj = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.sum(jnp.where(jj == j, x, 0.0), axis=1, keepdims=True)


def diag_scores(qI, kI, GI):
    """Exact A_ij = Σ_k q_ik k_jk exp(G_ik − G_jk) for j ≤ i within one sub-chunk, fp32 [c, c]."""
    c = qI.shape[0]
    ii = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    jj = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)

    def body(j, A):  # column j of A: every row i ≥ j against key row j
        keep = ii >= j  # [c, 1]
        e = _exp_masked(keep, GI - _row(GI, j))  # [c, K], exponent ≤ 0
        col = jnp.sum(qI * _row(kI, j) * e, axis=1, keepdims=True)  # [c, 1]
        return jnp.where(jj == j, col, A)

    return jax.lax.fori_loop(0, c, body, jnp.zeros((c, c), F32))


def diag_dq(dA, kI, GI):
    """Exact diagonal-block part of dq [c, K] from dA [c, c] (causal, scale included)."""
    c = kI.shape[0]
    ii = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)

    def body(j, dq):
        e = _exp_masked(ii >= j, GI - _row(GI, j))  # [c, K]: exp(G_i − G_j), rows i ≥ j
        return dq + _col(dA, j) * _row(kI, j) * e  # dq_i += dA_ij k_j e^{G_i − G_j}

    return jax.lax.fori_loop(0, c, body, jnp.zeros(kI.shape, F32))


def diag_dk(dA, qI, GI):
    """Exact diagonal-block part of dk [c, K] from dA [c, c] (causal, scale included)."""
    c = qI.shape[0]
    ii = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    rows = jax.lax.broadcasted_iota(jnp.int32, qI.shape, 0)

    def body(j, dk):
        e = _exp_masked(ii >= j, GI - _row(GI, j))  # [c, K]: exp(G_i − G_j), rows i ≥ j
        dk_j = jnp.sum(_col(dA, j) * qI * e, axis=0, keepdims=True)  # Σ_i dA_ij q_i e^{..}
        return jnp.where(rows == j, dk_j, dk)

    return jax.lax.fori_loop(0, c, body, jnp.zeros(qI.shape, F32))


def _load(ref, r, n):
    return ref[pl.ds(r, n), :]


def fwd_chunk(q_ref, k_ref, v_ref, G_ref, o_ref, r0, S, gl, *, C, c, scale, precision, seg=None):
    """Write o for the chunk at rows r0..r0+C and return the state after it.

    o_I = scale · (q_I ⊙ e^{G_I}) S + Σ_{J<I} A_IJ v_J + A_II v_I  (sub-chunks I, J)
    S'  = e^{G_L} ⊙ S + (k ⊙ e^{G_L − G})ᵀ v
    """
    chunk_output(
        q_ref, k_ref, v_ref, G_ref, o_ref, r0, S, C=C, c=c, scale=scale, precision=precision,
        seg=seg,
    )  # fmt: skip
    return state_update(k_ref, v_ref, G_ref, r0, S, gl, C=C, precision=precision, seg=seg)


def chunk_output(q_ref, k_ref, v_ref, G_ref, o_ref, r0, S, *, C, c, scale, precision, seg=None):
    """Write o for the chunk at rows r0..r0+C from S, the state entering it ([K, BV] fp32).

    o_I = scale · (q_I ⊙ e^{G_I}) S + Σ_{J<I} A_IJ v_J + A_II v_I  (sub-chunks I, J)

    The output half of `fwd_chunk`; on its own it is the body of the chunk-parallel GPU output
    kernel, which reads S from the states pass instead of carrying it.
    """
    dt, p = v_ref.dtype, precision
    for I in range(C // c):  # row sub-chunks (secondary chunking)
        rI = r0 + I * c
        qI = _load(q_ref, rI, c).astype(F32)  # [c, K]
        GI = _load(G_ref, rI, c)  # [c, K]
        Gn = _load(G_ref, rI, 1)  # [1, K]: the row sub-chunk's reference gate
        qe = qI * jnp.exp(GI) * _rows(seg, "inter", rI, c)
        acc = dot(qe, S, dt, p)  # [c, BV]: (q ⊙ e^G) S
        qg = qI * jnp.exp(GI - Gn)  # exponent ≤ 0
        for J in range(I):  # off-diagonal sub-blocks, column before row
            rJ = r0 + J * c
            kg = _load(k_ref, rJ, c).astype(F32) * jnp.exp(Gn - _load(G_ref, rJ, c))  # ≤ 0
            A = _mask(seg, dot_nt(qg, kg, dt, p), rI, rJ, c)  # [c, c]
            acc = acc + dot(A, _load(v_ref, rJ, c), dt, p)  # [c, BV]
        A = diag_scores(qI, _load(k_ref, rI, c).astype(F32), GI)  # [c, c] exact, fp32
        acc = acc + dot(_mask(seg, A, rI, rI, c), _load(v_ref, rI, c), dt, p)
        o_ref[pl.ds(rI, c), :] = (scale * acc).astype(o_ref.dtype)


def state_update(k_ref, v_ref, G_ref, r0, S, gl, *, C, precision, seg=None):
    """S' = e^{G_L} ⊙ S + (k ⊙ e^{G_L − G})ᵀ v  with gl = G_L as a [K, 1] column."""
    dt = v_ref.dtype
    G = _load(G_ref, r0, C)  # [C, K]
    GL = _load(G_ref, r0 + C - 1, 1)  # [1, K]
    kd = _load(k_ref, r0, C).astype(F32) * jnp.exp(GL - G)  # [C, K], exponent ≤ 0
    kd = kd * _rows(seg, "to_state", r0, C)
    return jnp.exp(gl) * S + dot_tn(kd, _load(v_ref, r0, C), dt, precision)  # [K, BV]


def dstate_update(q_ref, do_ref, G_ref, r0, dS, gl, *, C, scale, precision, seg=None):
    """Gradient w.r.t. the state entering the chunk from the one leaving it.

    dS_in = e^{G_L} ⊙ dS_out + scale · (q ⊙ e^{G})ᵀ do
    """
    dt = do_ref.dtype
    qd = _load(q_ref, r0, C).astype(F32) * jnp.exp(_load(G_ref, r0, C))  # [C, K]
    qd = qd * _rows(seg, "inter", r0, C)
    return jnp.exp(gl) * dS + scale * dot_tn(qd, _load(do_ref, r0, C), dt, precision)  # [K, BV]


def grads_chunk(
    q_ref, k_ref, v_ref, G_ref, do_ref, h_ref, hn_ref, dh_ref, dq_ref, dk_ref, dv_ref,
    *, C, c, scale, precision, seg=None,
):  # fmt: skip
    """dq, dk, dv (fp32) of one chunk and one value block (the refs hold exactly that) and the
    block's part of dG_L [K, 1]; dq, dk and dG_L are partial sums over the value blocks.

    h: state entering the chunk, dh: gradient w.r.t. the state leaving it, hn: state leaving it.
    dq_i = scale e^{G_i} ⊙ (do_i hᵀ) + Σ_j dA_ij k_j e^{G_i − G_j}
    dk_j = e^{G_L − G_j} ⊙ (v_j dhᵀ) + Σ_i dA_ij q_i e^{G_i − G_j}
    dv_j = (k_j ⊙ e^{G_L − G_j}) dh + Σ_i A_ij do_i,     dA = scale · tril(do vᵀ)
    dG_L (extra, from the state passed on) = Σ_v hn ⊙ dh.

    Two passes over the sub-chunks, so that every output row block is accumulated in values
    (registers) and stored exactly once: rows I for dq (against the key sub-chunks J ≤ I), then
    key sub-chunks J for dk and dv (against the row sub-chunks I ≥ J). Accumulating into the
    output refs instead (``dk_ref[...] += ...``) stores and reloads through memory with no
    barrier in between, a race between Triton's threads. dA_IJ (and the rescaled q, k) are
    formed in both passes: one more [c, BV] x [BV, c] product per pair. The inter-chunk parts
    against the fp32 states are in fp32: dG = q ⊙ dq − k ⊙ dk cancels strongly for strong
    gates, so dq and dk must not carry the states' bf16 rounding.
    """
    dt, p = v_ref.dtype, precision
    n = C // c
    ii = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    jj = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)

    def dA_of(I, J):  # [c, c]: scale · do_I v_Jᵀ, causal on the diagonal, segment-masked
        dA = scale * dot_nt(_load(do_ref, I * c, c), _load(v_ref, J * c, c), dt, p)
        dA = jnp.where(jj <= ii, dA, 0.0) if I == J else dA
        return _mask(seg, dA, I * c, J * c, c)

    # Pass 1 (paper Alg. 2 backward, dQ): row sub-chunk I against the state and keys J ≤ I.
    h = h_ref[...]  # [K, BV] fp32
    for I in range(n):
        rI = I * c
        GI, Gn = _load(G_ref, rI, c), _load(G_ref, rI, 1)  # [c, K], [1, K]
        doI = _load(do_ref, rI, c)  # [c, BV]
        dq = scale * jnp.exp(GI) * _rows(seg, "inter", rI, c) * dot_nt(doI, h, F32, p)  # [c, K]
        eI = jnp.exp(GI - Gn)  # exponent ≤ 0
        for J in range(I):
            kg = _load(k_ref, J * c, c).astype(F32) * jnp.exp(Gn - _load(G_ref, J * c, c))
            dq = dq + dot(dA_of(I, J), kg, dt, p) * eI  # [c, K]
        dq = dq + diag_dq(dA_of(I, I), _load(k_ref, rI, c).astype(F32), GI)
        dq_ref[pl.ds(rI, c), :] = dq

    # Pass 2 (dK, dV): key sub-chunk J against the state gradient and rows I ≥ J.
    dh = dh_ref[...]  # [K, BV] fp32
    GL = _load(G_ref, C - 1, 1)  # [1, K]
    for J in range(n):
        rJ = J * c
        kJ, GJ, vJ = _load(k_ref, rJ, c).astype(F32), _load(G_ref, rJ, c), _load(v_ref, rJ, c)
        eL = jnp.exp(GL - GJ) * _rows(seg, "to_state", rJ, c)  # [c, K], exponent ≤ 0
        dk = eL * dot_nt(vJ, dh, F32, p)  # [c, K]
        dv = dot(kJ * eL, dh, dt, p)  # [c, BV]
        for I in range(J + 1, n):
            rI = I * c
            Gn = _load(G_ref, rI, 1)
            doI = _load(do_ref, rI, c)
            qg = _load(q_ref, rI, c).astype(F32) * jnp.exp(_load(G_ref, rI, c) - Gn)  # ≤ 0
            eJ = jnp.exp(Gn - GJ)  # [c, K], exponent ≤ 0
            A = _mask(seg, scale * dot_nt(qg, kJ * eJ, dt, p), rI, rJ, c)  # [c, c]
            dk = dk + dot_tn(dA_of(I, J), qg, dt, p) * eJ
            dv = dv + dot_tn(A, doI, dt, p)
        qJ = _load(q_ref, rJ, c).astype(F32)
        A = _mask(seg, scale * diag_scores(qJ, kJ, GJ), rJ, rJ, c)
        dv = dv + dot_tn(A, _load(do_ref, rJ, c), dt, p)
        dk = dk + diag_dk(dA_of(J, J), qJ, GJ)
        dk_ref[pl.ds(rJ, c), :] = dk
        dv_ref[pl.ds(rJ, c), :] = dv
    return jnp.sum(hn_ref[...] * dh, axis=1, keepdims=True)  # [K, 1]
