"""The specification of gated linear attention: a token loop in fp32.

Per batch row and head, with a state ``S ∈ R^{K×V}`` and per-key-channel log forget gate
``g_t ∈ R^K``::

    S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t
    o_t = scale · q_t S_t

With ``segment_ids`` the state is reset to zero before every position whose id differs from the
previous position's, so packed sequences do not see each other. ``initial_state`` is the state
before position 0 (it belongs to the first segment of each row) and the returned final state is
the state after position ``T - 1`` (the last segment of each row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] bool: True where a new segment starts (never at t = 0: position 0 continues h0)."""
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev


def gla_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> tuple[jax.Array, jax.Array]:
    """Token loop in fp32. Shapes ``q, k, g: [B, T, H, K]``, ``v: [B, T, H, V]``; ``precision``
    is that of the read-out ``q_t S_t`` (the state update is elementwise).

    Returns ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] fp32)``.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)  # [T, B, H, *]
    h0 = (
        jnp.zeros((B, H, K, V), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    if segment_ids is None:
        reset = jnp.zeros((T, B), bool)
    else:
        reset = jnp.swapaxes(segment_starts(segment_ids), 0, 1)

    def step(S, xs):
        q_t, k_t, v_t, g_t, r_t = xs  # [B, H, K], [B, H, K], [B, H, V], [B, H, K], [B]
        S = jnp.where(r_t[:, None, None, None], 0.0, S)
        S = jnp.exp(g_t)[..., None] * S + k_t[..., None] * v_t[..., None, :]
        o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, S, precision=precision)
        return S, o_t

    S, o = jax.lax.scan(step, h0, (f32(q), f32(k), f32(v), f32(g), reset))
    return jnp.swapaxes(o, 0, 1).astype(v.dtype), S
