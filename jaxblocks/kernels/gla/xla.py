"""Chunked gated linear attention in pure JAX: the fast form that runs everywhere.

The sequence is cut into chunks of ``C`` (64) tokens and each chunk into sub-chunks of ``c`` (16)
(the paper's secondary chunking, fla's ``chunk_gla``). Gates are cumulated in fp32 log space
within a chunk (``G``). Inter-chunk terms go through the per-chunk states (a `lax.scan` over
chunks); the intra-chunk scores ``A`` are built per sub-chunk pair:

* off-diagonal pairs (column sub-chunk before the row sub-chunk): both operands are rescaled
  against ``G`` at the first row of the row sub-chunk, ``q·exp(G_i − G_n)`` and
  ``k·exp(G_n − G_j)``, so no exponent is positive, then multiplied as a matmul in the input
  dtype with fp32 accumulation;
* diagonal pairs: in fp32, by the same rescaling on tiles of 4 rows and exact
  ``Σ_k q_ik k_jk exp(G_ik − G_jk)`` on the 4 × 4 diagonal tiles (4 exponentials per element of
  q instead of 16 on CPU, where these elementwise passes dominate).

Every exponent that is evaluated is ≤ 0 for gates ≤ 0 (masked entries are set to 0 before the
``exp``, so neither the value nor its derivative can overflow), hence the result is finite for any
gate value. `_gla_loop` runs groups of chunks in a loop and factors the scores of a group at the
chunk start when its gate cumsums are bounded (``|G| ≤ FACTOR_BOUND``); the backward is JAX
autodiff of the same steps, rematerialised. See README.md for the math.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxblocks.kernels.gla.reference import segment_starts

SUB_CHUNK = 16
# Log gates are floored here before any cumsum. exp(GATE_FLOOR) is 0 in fp32 (below -104), so a
# gate at or under the floor, −inf (a hard reset, ``log 0``) included, already decays the state
# to exactly 0 in the token loop: flooring changes nothing there, while it keeps the chunked
# forms' cumsums finite (−inf − (−inf) is NaN) and small (fp32 cumsums lose 2^-24 |G| per
# step). Across a reset the chunked forms see e^{GATE_FLOOR + s} with s the other gates in
# between, 0 for s < 150; larger s (positive gates) overflows the token loop itself (e^{88}).
GATE_FLOOR = -256.0


def floor_gates(g: jax.Array) -> jax.Array:
    """``g`` in fp32, floored at `GATE_FLOOR` (−inf gates become finite resets; NaN stays NaN)."""
    return jnp.maximum(g.astype(jnp.float32), GATE_FLOOR)


def effective_chunk(T: int, chunk_size: int) -> int:
    """fla's rule: ``min(chunk_size, max(16, next_pow2(T)))`` (short sequences pad less)."""
    return min(chunk_size, max(SUB_CHUNK, 1 << max(T - 1, 0).bit_length()))


def chunk_gates(g: jax.Array, C: int) -> jax.Array:
    """Chunk-local inclusive cumulative sum of the floored ``g [..., T, K]`` in fp32 (T a
    multiple of C)."""
    *lead, T, K = g.shape
    G = jnp.cumsum(floor_gates(g).reshape(*lead, T // C, C, K), axis=-2)
    return G.reshape(*lead, T, K)


def _where_exp(mask, x):
    """exp(x) where mask else 0; the exponent is zeroed first (no overflow, nor in the VJP)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


TILE = 4  # rows of the fp32 tiles inside a diagonal sub-block


def _blocked_scores(q, k, G, c: int, dtype, inner, precision):
    """Causal scores [..., C, C] of a block split into sub-blocks of ``c`` rows.

    Row sub-block I against all earlier rows (J < I) at once: both operands are rescaled against
    ``G`` at the first row of I, ``q·exp(G_i − G_n)`` and ``k·exp(G_n − G_j)`` (exponents ≤ 0),
    and multiplied in ``dtype`` with fp32 accumulation; only the lower triangle of sub-block
    pairs is formed. Diagonal sub-blocks come from ``inner(q, k, G) -> [..., n, c, c]`` (fp32).
    """
    *lead, C, K = q.shape
    n = C // c
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    split = lambda x: x.reshape(*lead, n, c, K)
    diag = inner(split(q32), split(k32), split(G))  # [..., n, c, c]
    rows = []
    for I in range(n):  # row sub-blocks
        r = I * c
        Gn = G[..., r : r + 1, :]  # [..., 1, K]: the row sub-block's reference gate
        parts = []
        if I > 0:
            qg = q32[..., r : r + c, :] * jnp.exp(G[..., r : r + c, :] - Gn)  # [..., c, K]
            kg = k32[..., :r, :] * jnp.exp(Gn - G[..., :r, :])  # [..., r, K]
            parts.append(
                jnp.einsum(
                    "...ik,...jk->...ij",
                    qg.astype(dtype),
                    kg.astype(dtype),
                    precision=precision,
                    preferred_element_type=jnp.float32,
                )
            )  # [..., c, r]
        parts.append(diag[..., I, :, :])  # [..., c, c]
        if I < n - 1:
            parts.append(jnp.zeros((*lead, c, C - r - c), jnp.float32))  # above the diagonal
        rows.append(jnp.concatenate(parts, axis=-1))
    return jnp.concatenate(rows, axis=-2)


def _sub_chunk_factored_scores(q, k, G, c: int, precision):
    """Causal scores [..., C, C] (fp32) per row sub-chunk I against rows ``[0, (I+1)c)`` at once,
    both operands rescaled against ``G_n`` at the first row of I: ``q·exp(G_i − G_n)`` and
    ``k·exp(G_n − G_j)``. The exponents are ≤ 0 for the earlier sub-chunks and bounded by the
    caller's guard (``|G_j − G_n| ≤ FACTOR_BOUND`` within a sub-chunk) on the diagonal one;
    entries above the diagonal are finite and masked by the caller."""
    *lead, C, K = q.shape
    n = C // c
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    rows = []
    for I in range(n):
        r = I * c
        Gn = G[..., r : r + 1, :]
        qg = q32[..., r : r + c, :] * jnp.exp(G[..., r : r + c, :] - Gn)  # [..., c, K]
        kg = k32[..., : r + c, :] * jnp.exp(Gn - G[..., : r + c, :])  # [..., r + c, K]
        parts = [jnp.einsum("...ik,...jk->...ij", qg, kg, precision=precision)]  # [.., c, r + c]
        if I < n - 1:
            parts.append(jnp.zeros((*lead, c, C - r - c), jnp.float32))
        rows.append(jnp.concatenate(parts, axis=-1))
    return jnp.concatenate(rows, axis=-2)


def _exact_scores(q, k, G):
    """Exact Σ_k q_ik k_jk exp(G_ik − G_jk) for j ≤ i, fp32: [..., n, w, w] from [..., n, w, K]."""
    w = q.shape[-2]
    keep = jnp.arange(w)[None, :, None] <= jnp.arange(w)[:, None, None]  # [w(i), w(j), 1]
    dec = _where_exp(keep, G[..., :, None, :] - G[..., None, :, :])  # [..., n, w, w, K]
    return jnp.sum(q[..., :, None, :] * k[..., None, :, :] * dec, axis=-1)


def _diagonal_scores(q, k, G, precision):
    """Diagonal sub-blocks [..., n, c, c] in fp32: the same rescaling on tiles of 4 rows
    (fp32 matmuls, exponents ≤ 0) and exact per-pair sums on the 4 × 4 diagonal tiles, which
    costs 4 instead of c exponentials per element of q."""
    c = q.shape[-2]
    if c <= TILE:
        return _exact_scores(q, k, G)
    return _blocked_scores(q, k, G, TILE, jnp.float32, _exact_scores, precision)


def _intra_scores(q, k, G, scale: float, c: int, dtype, precision):
    """Causal intra-chunk scores A [..., C, C] (fp32) from q, k [..., C, K] and G [..., C, K]:
    sub-chunks of ``c`` rows, off-diagonal pairs in ``dtype``, diagonal sub-chunks in fp32."""
    diagonal = lambda q, k, G: _diagonal_scores(q, k, G, precision)
    return scale * _blocked_scores(q, k, G, c, dtype, diagonal, precision)


GROUP = 8  # chunks per step of `_gla_loop` (a step's working set stays in cache)
FACTOR_BOUND = 40.0  # |exponent| up to which a step's scores are factored (see _gla_loop)


def _gla_loop(q, k, v, g, h0, seg, scale, chunk_size, with_segments, precision):
    """The forward as a `lax.fori_loop` over groups of ``GROUP`` chunks: each step slices its
    ``[B, GROUP·C, H, D]`` slab of the inputs, forms the scores, chunk states and outputs of its
    chunks while they are in cache, carries the state and writes its outputs in place. Nothing of
    size T is materialised besides the output (XLA:CPU pays a page fault per 4 KiB of every
    fresh large buffer, which cost the earlier all-chunks and regrouped forms much of their time).

    Intra-chunk scores, one of three forms per step (a `lax.switch`; all fp32 where a product
    includes the diagonal, so as accurate as the exact form):

    0. every chunk-local gate cumsum has ``|G| ≤ FACTOR_BOUND``: factored at the chunk start,
       ``A = scale (q ⊙ e^{G}) (k ⊙ e^{−G})ᵀ``, one matmul, every factor within ``e^{±40}``;
    1. else, if the decay inside every sub-chunk is ``≤ FACTOR_BOUND``: each row sub-chunk
       against all rows up to its end, rescaled at its first row (`_sub_chunk_factored_scores`);
    2. else (strong gates, non-finite values): the sub-chunked form of `_intra_scores`, whose
       evaluated exponents are all ≤ 0.

    Differentiated by JAX (reverse and forward mode): the step is under `jax.checkpoint`, so the
    VJP keeps only the state entering each group and recomputes the step in reverse."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = effective_chunk(T, chunk_size)
    c = min(SUB_CHUNK, C)
    NT = -(-T // C)
    Gs = min(GROUP, NT)  # chunks per step
    NG = -(-NT // Gs)
    W = Gs * C
    Tp = NG * W
    dtype = jnp.promote_types(q.dtype, v.dtype)
    if Tp != T:
        pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
        q, k, v, g = pad(q), pad(k), pad(v), pad(g)
    if with_segments:
        # Running segment count (reset count) per position; padding continues the last segment.
        cnt = jnp.cumsum(segment_starts(seg).astype(jnp.int32), axis=1)
        cnt = jnp.pad(cnt, ((0, 0), (0, Tp - T)), mode="edge")  # [B, Tp]
        prev = jnp.concatenate([jnp.zeros_like(cnt[:, :1]), cnt[:, C - 1 : -1 : C]], axis=1)
    causal = jnp.tril(jnp.ones((C, C), bool))[None, None, None]  # [1, 1, 1, C, C]

    def local(x):  # [B, W, H, D] -> [Gs, B, H, C, D]
        return jnp.transpose(x.reshape(B, Gs, C, H, x.shape[-1]), (1, 0, 3, 2, 4))

    def step(S, slabs):
        """One group: slabs ``q, k, v, g [B, W, H, D]`` (and segment counts ``[B, W]``,
        ``[B, Gs]``) -> (state after the group, outputs ``[B, W, H, V]``)."""
        qs, ks, vs, gs = (local(x) for x in slabs[:4])
        G = jnp.cumsum(floor_gates(gs), axis=-2)  # chunk-local gate cumsum, fp32
        Glast = G[..., -1:, :]  # [Gs, B, H, 1, K]
        if with_segments:
            cn, pv = slabs[4:]
            cn = jnp.transpose(cn.reshape(B, Gs, C), (1, 0, 2))[:, :, None]  # [Gs, B, 1, C]
            pv = jnp.transpose(pv)[:, :, None, None]  # [Gs, B, 1, 1]
            same = cn[..., :, None] == cn[..., None, :]  # [Gs, B, 1, C, C]
            sees_state = (cn == pv)[..., None]  # row i continues the incoming state
            carry = (cn[..., -1:] == pv)[..., None]  # no reset in the chunk
            to_state = (cn == cn[..., -1:])[..., None]  # row j reaches the chunk's end
        else:
            same = sees_state = carry = to_state = True
        qe = qs.astype(jnp.float32) * jnp.exp(G)

        def chunk_factored():  # fp32, like every product that includes the diagonal
            ke = ks.astype(jnp.float32) * jnp.exp(-G)
            return scale * jnp.einsum("...ik,...jk->...ij", qe, ke, precision=precision)

        def sub_chunk_factored():
            return scale * _sub_chunk_factored_scores(qs, ks, G, c, precision)

        def sub_chunked():
            return _intra_scores(qs, ks, G, scale, c, dtype, precision)

        Gsub = G.reshape(*G.shape[:-2], C // c, c, K)
        within = jnp.max(jnp.abs(Gsub - Gsub[..., :1, :]))  # decay inside a sub-chunk
        branch = jnp.where(
            jnp.max(jnp.abs(G)) <= FACTOR_BOUND, 0, jnp.where(within <= FACTOR_BOUND, 1, 2)
        )
        A = jax.lax.switch(branch, (chunk_factored, sub_chunk_factored, sub_chunked))
        A = jnp.where(causal & same, A, 0.0)
        o = jnp.einsum(
            "...ij,...jv->...iv",
            A.astype(dtype),
            vs,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        # Per-chunk state updates, then the recurrence over the chunks of the group.
        kdec = jnp.where(to_state, ks.astype(jnp.float32) * jnp.exp(Glast - G), 0.0)
        U = jnp.einsum(
            "...jk,...jv->...kv",
            kdec.astype(dtype),
            vs,
            precision=precision,
            preferred_element_type=jnp.float32,
        )  # [Gs, B, H, K, V]
        decay = jnp.where(carry, jnp.exp(Glast), 0.0)[..., 0, :, None]  # [Gs, B, H, K, 1]
        hs = []
        for i in range(Gs):
            hs.append(S)  # state entering chunk i
            S = decay[i] * S + U[i]
        h = jnp.stack(hs)  # [Gs, B, H, K, V]
        qdec = jnp.where(sees_state, qe, 0.0)
        o = o + scale * jnp.einsum(
            "...ik,...kv->...iv",
            qdec.astype(dtype),
            h.astype(dtype),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return S, jnp.transpose(o.astype(v.dtype), (1, 0, 3, 2, 4)).reshape(B, W, H, V)

    inputs = (q, k, v, g) + ((cnt, prev) if with_segments else ())
    widths = (W, W, W, W, W, Gs)[: len(inputs)]  # of a group's slab, along axis 1
    # Under autodiff the step is rematerialised, so only the state entering each group is kept
    # and the step is recomputed in the backward (fla's recomputed states).
    step = jax.checkpoint(step)

    def body(n, carry):
        S, out = carry
        sl = tuple(
            jax.lax.dynamic_slice_in_dim(x, n * w, w, axis=1)
            for x, w in zip(inputs, widths, strict=True)
        )
        S, o = step(S, sl)
        return S, jax.lax.dynamic_update_slice_in_dim(out, o, n * W, axis=1)

    out = jnp.zeros((B, Tp, H, V), v.dtype)
    final, out = jax.lax.fori_loop(0, NG, body, (h0, out))
    return (out if Tp == T else out[:, :T]), final


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "with_segments", "precision"))
def _gla_jit(q, k, v, g, h0, seg, *, scale, chunk_size, with_segments, precision):
    return _gla_loop(q, k, v, g, h0, seg, scale, chunk_size, with_segments, precision)


def gla_xla(
    q, k, v, g, *, scale, initial_state=None, segment_ids=None, chunk_size=64,
    precision=jax.lax.Precision.HIGHEST,
):  # fmt: skip
    """Chunked GLA (see module doc). Returns ``(o [B, T, H, V], final_state [B, H, K, V] fp32)``.

    ``precision`` (a `jax.lax.Precision`) is that of every matrix product."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    h0 = (
        jnp.zeros((B, H, K, V), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
    return _gla_jit(
        q,
        k,
        v,
        g,
        h0,
        seg,
        scale=float(scale),
        chunk_size=chunk_size,
        with_segments=segment_ids is not None,
        precision=precision,
    )


@functools.partial(jax.jit, static_argnames=("precision",))
def recurrent_xla(q, k, v, g, h0, scale, precision=jax.lax.Precision.HIGHEST):
    """Token loop for decoding (a `lax.scan`, fp32 state); same contract as the reference; the
    read-out ``q S`` is the one matrix product, at ``precision``."""
    f32 = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)

    def step(S, xs):
        q_t, k_t, v_t, g_t = xs
        S = jnp.exp(g_t)[..., None] * S + k_t[..., None] * v_t[..., None, :]
        return S, scale * jnp.einsum("bhk,bhkv->bhv", q_t, S, precision=precision)

    S, o = jax.lax.scan(step, h0.astype(jnp.float32), (f32(q), f32(k), f32(v), f32(g)))
    return jnp.swapaxes(o, 0, 1).astype(v.dtype), S
