"""Mamba's selective scan, token by token in fp32: the specification of `selective_scan`.

With ``u, Δ: [batch, dim, L]``, ``A: [dim, N]``, ``B, C: [batch, N, L]`` (or grouped
``[batch, G, N, L]``, channel ``d`` reading group ``d // (dim / G)``), and for every channel ``d``
and state ``n``:

    Δ'_t      = softplus(Δ_t + delta_bias)    (bias and softplus optional)
    h_t[d, n] = exp(Δ'_t[d] A[d, n]) · h_{t-1}[d, n] + Δ'_t[d] B_t[n] u_t[d],     h_{-1} = 0
    y_t[d]    = Σ_n C_t[n] h_t[d, n] + D[d] u_t[d]
    out_t[d]  = y_t[d] · silu(z_t[d])           (when z is given)

``out`` has ``u.dtype``; ``last_state = h_{L-1}`` is fp32 ``[batch, dim, N]`` (zeros when L = 0).
This mirrors ``selective_scan_ref`` of state-spaces/mamba (real A, time-varying B and C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _per_channel(X, dim):
    """B or C as ``[batch, dim, N, L]``: grouped ``[batch, G, N, L]`` repeated dim/G times."""
    if X.ndim == 3:
        return X[:, None]  # [batch, 1, N, L], broadcast over dim
    return jnp.repeat(X, dim // X.shape[1], axis=1)


def selective_scan_reference(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, precision=None
):
    """`selective_scan` as a `lax.scan` over tokens in fp32; returns ``(out, last_state)``.

    ``precision`` is accepted for a uniform API and unused: the readout is an elementwise
    product and a sum in fp32, not a matrix product.
    """
    del precision
    f32 = jnp.float32
    batch, dim, L = u.shape
    u32, dt = u.astype(f32), delta.astype(f32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(f32)[None, :, None]
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    A32 = A.astype(f32)
    Bd = _per_channel(B.astype(f32), dim)  # [batch, dim|1, N, L]
    Cd = _per_channel(C.astype(f32), dim)

    def step(h, xs):  # h: [batch, dim, N]
        u_t, dt_t, B_t, C_t = xs  # [batch, dim], [batch, dim], [batch, dim|1, N] x2
        dA = jnp.exp(dt_t[:, :, None] * A32[None])  # [batch, dim, N]
        h = dA * h + (dt_t * u_t)[:, :, None] * B_t
        y = jnp.sum(h * C_t, axis=-1)  # [batch, dim]
        return h, y

    xs = (
        jnp.moveaxis(u32, -1, 0),
        jnp.moveaxis(dt, -1, 0),
        jnp.moveaxis(Bd, -1, 0),
        jnp.moveaxis(Cd, -1, 0),
    )
    h0 = jnp.zeros((batch, dim, A.shape[1]), f32)
    last, ys = jax.lax.scan(step, h0, xs)
    y = jnp.moveaxis(ys, 0, -1)  # [batch, dim, L]
    if D is not None:
        y = y + D.astype(f32)[None, :, None] * u32
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(u.dtype), last
