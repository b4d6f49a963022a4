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


def dot(a, b, dt):
    return jnp.dot(a.astype(dt), b.astype(dt), preferred_element_type=F32)


def dot_nt(a, b, dt):
    return jax.lax.dot_general(a.astype(dt), b.astype(dt), _NT, preferred_element_type=F32)


def dot_tn(a, b, dt):
    return jax.lax.dot_general(a.astype(dt), b.astype(dt), _TN, preferred_element_type=F32)


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


def diag_dq_dk(dA, qI, kI, GI):
    """Exact diagonal-block parts of dq, dk [c, K] from dA [c, c] (causal, scale included)."""
    c = qI.shape[0]
    ii = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    rows = jax.lax.broadcasted_iota(jnp.int32, qI.shape, 0)

    def body(j, carry):
        dq, dk = carry
        keep = ii >= j  # rows i ≥ j see key j
        e = _exp_masked(keep, GI - _row(GI, j))  # [c, K]: exp(G_i − G_j)
        dA_j = _col(dA, j)  # [c, 1]
        dq = dq + dA_j * _row(kI, j) * e  # dq_i += dA_ij k_j e^{G_i − G_j}
        dk_j = jnp.sum(dA_j * qI * e, axis=0, keepdims=True)  # Σ_i dA_ij q_i e^{G_i − G_j}
        dk = jnp.where(rows == j, dk_j, dk)
        return dq, dk

    z = jnp.zeros(qI.shape, F32)
    return jax.lax.fori_loop(0, c, body, (z, z))


def _load(ref, r, n):
    return ref[pl.ds(r, n), :]


def fwd_chunk(q_ref, k_ref, v_ref, G_ref, o_ref, r0, S, gl, *, C, c, scale, seg=None):
    """Write o for the chunk at rows r0..r0+C and return the state after it.

    o_I = scale · (q_I ⊙ e^{G_I}) S + Σ_{J<I} A_IJ v_J + A_II v_I  (sub-chunks I, J)
    S'  = e^{G_L} ⊙ S + (k ⊙ e^{G_L − G})ᵀ v
    """
    dt = v_ref.dtype
    for I in range(C // c):  # row sub-chunks (secondary chunking)
        rI = r0 + I * c
        qI = _load(q_ref, rI, c).astype(F32)  # [c, K]
        GI = _load(G_ref, rI, c)  # [c, K]
        Gn = _load(G_ref, rI, 1)  # [1, K]: the row sub-chunk's reference gate
        acc = dot(qI * jnp.exp(GI) * _rows(seg, "inter", rI, c), S, dt)  # [c, BV]: (q ⊙ e^G) S
        qg = qI * jnp.exp(GI - Gn)  # exponent ≤ 0
        for J in range(I):  # off-diagonal sub-blocks, column before row
            rJ = r0 + J * c
            kg = _load(k_ref, rJ, c).astype(F32) * jnp.exp(Gn - _load(G_ref, rJ, c))  # ≤ 0
            A = _mask(seg, dot_nt(qg, kg, dt), rI, rJ, c)  # [c, c]
            acc = acc + dot(A, _load(v_ref, rJ, c), dt)  # [c, BV]
        A = diag_scores(qI, _load(k_ref, rI, c).astype(F32), GI)  # [c, c] exact, fp32
        acc = acc + dot(_mask(seg, A, rI, rI, c), _load(v_ref, rI, c), dt)
        o_ref[pl.ds(rI, c), :] = (scale * acc).astype(o_ref.dtype)
    return state_update(k_ref, v_ref, G_ref, r0, S, gl, C=C, seg=seg)


def state_update(k_ref, v_ref, G_ref, r0, S, gl, *, C, seg=None):
    """S' = e^{G_L} ⊙ S + (k ⊙ e^{G_L − G})ᵀ v  with gl = G_L as a [K, 1] column."""
    dt = v_ref.dtype
    G = _load(G_ref, r0, C)  # [C, K]
    GL = _load(G_ref, r0 + C - 1, 1)  # [1, K]
    kd = _load(k_ref, r0, C).astype(F32) * jnp.exp(GL - G)  # [C, K], exponent ≤ 0
    kd = kd * _rows(seg, "to_state", r0, C)
    return jnp.exp(gl) * S + dot_tn(kd, _load(v_ref, r0, C), dt)  # [K, BV]


def dstate_update(q_ref, do_ref, G_ref, r0, dS, gl, *, C, scale, seg=None):
    """Gradient w.r.t. the state entering the chunk from the one leaving it.

    dS_in = e^{G_L} ⊙ dS_out + scale · (q ⊙ e^{G})ᵀ do
    """
    dt = do_ref.dtype
    qd = _load(q_ref, r0, C).astype(F32) * jnp.exp(_load(G_ref, r0, C))  # [C, K]
    qd = qd * _rows(seg, "inter", r0, C)
    return jnp.exp(gl) * dS + scale * dot_tn(qd, _load(do_ref, r0, C), dt)  # [K, BV]


def grads_chunk(
    q_ref, k_ref, v_ref, G_ref, do_ref, h, dh, hn, dq_ref, dk_ref, dv_ref, *, C, c, scale, seg=None
):
    """dq, dk, dv (fp32) of one chunk (the refs hold exactly one chunk) and dG_L [K, 1].

    h: state entering the chunk, dh: gradient w.r.t. the state leaving it, hn: state leaving it.
    dq_i = scale e^{G_i} ⊙ (do_i hᵀ) + Σ_j dA_ij k_j e^{G_i − G_j}
    dk_j = e^{G_L − G_j} ⊙ (v_j dhᵀ) + Σ_i dA_ij q_i e^{G_i − G_j}
    dv_j = (k_j ⊙ e^{G_L − G_j}) dh + Σ_i A_ij do_i,     dA = scale · tril(do vᵀ)
    dG_L (extra, from the state passed on) = Σ_v hn ⊙ dh.
    """
    dt = v_ref.dtype
    G = G_ref[...]  # [C, K]
    GL = _load(G_ref, C - 1, 1)  # [1, K]
    eL = jnp.exp(GL - G) * _rows(seg, "to_state", 0, C)  # [C, K], exponent ≤ 0
    # Inter-chunk parts against the fp32 states, in fp32: dG = q ⊙ dq − k ⊙ dk cancels strongly
    # for strong gates, so dq and dk must not carry the states' bf16 rounding.
    dk_ref[...] = eL * dot_nt(v_ref[...], dh, F32)  # [C, K]
    dv_ref[...] = dot(k_ref[...].astype(F32) * eL, dh, dt)  # [C, V]
    ii = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    jj = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    for I in range(C // c):
        rI = I * c
        qI = _load(q_ref, rI, c).astype(F32)
        kI = _load(k_ref, rI, c).astype(F32)
        GI = _load(G_ref, rI, c)
        Gn = _load(G_ref, rI, 1)
        doI = _load(do_ref, rI, c)
        dq = scale * jnp.exp(GI) * _rows(seg, "inter", rI, c) * dot_nt(doI, h, F32)  # [c, K]
        eI = jnp.exp(GI - Gn)  # exponent ≤ 0
        qg = qI * eI
        for J in range(I):
            rJ = J * c
            eJ = jnp.exp(Gn - _load(G_ref, rJ, c))  # [c, K], exponent ≤ 0
            kg = _load(k_ref, rJ, c).astype(F32) * eJ
            A = _mask(seg, scale * dot_nt(qg, kg, dt), rI, rJ, c)  # [c, c]
            dA = _mask(seg, scale * dot_nt(doI, _load(v_ref, rJ, c), dt), rI, rJ, c)  # [c, c]
            dq = dq + dot(dA, kg, dt) * eI
            dk_ref[pl.ds(rJ, c), :] += dot_tn(dA, qg, dt) * eJ
            dv_ref[pl.ds(rJ, c), :] += dot_tn(A, doI, dt)
        A = _mask(seg, scale * diag_scores(qI, kI, GI), rI, rI, c)
        dA = jnp.where(jj <= ii, scale * dot_nt(doI, _load(v_ref, rI, c), dt), 0.0)
        dA = _mask(seg, dA, rI, rI, c)
        dv_ref[pl.ds(rI, c), :] += dot_tn(A, doI, dt)
        ddq, ddk = diag_dq_dk(dA, qI, kI, GI)
        dq_ref[pl.ds(rI, c), :] = dq + ddq
        dk_ref[pl.ds(rI, c), :] += ddk
    return jnp.sum(hn * dh, axis=1, keepdims=True)  # [K, 1]
