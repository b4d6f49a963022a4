"""What every fast implementation does around its scan core, in XLA (fused elementwise).

`prepare` applies ``delta_bias`` and softplus to Δ in fp32 and flattens groups into the batch:
channel ``d = g·H + h`` of a grouped problem (``H = dim / G``) reads ``B[:, g]``, so
``[batch, G·H, L]`` is the batch-``batch·G`` problem ``[batch·G, H, L]`` whose ``A`` is
``[G, H, N]`` indexed by ``row % G``. `finish` adds ``D·u``, gates with ``silu(z)`` and casts.
Autodiff of these elementwise steps gives the gradients of ``D``, ``z`` and ``delta_bias`` (and
the softplus chain rule); the scan cores carry custom VJPs for ``u, Δ, A, B, C``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """``u [b·G, H, L]``, ``Δ' [b·G, H, L]`` fp32, ``A [G, H, N]`` fp32, ``B, C [b·G, N, L]``."""
    f32 = jnp.float32
    batch, dim, L = u.shape
    N = A.shape[1]
    G = 1 if B.ndim == 3 else B.shape[1]
    H = dim // G
    dt = delta.astype(f32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(f32)[None, :, None]
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    return (
        u.reshape(batch * G, H, L),
        dt.reshape(batch * G, H, L),
        A.astype(f32).reshape(G, H, N),
        B.reshape(batch * G, N, L),
        C.reshape(batch * G, N, L),
    )


def finish(y, last, u, D, z):
    """``y [b·G, H, L]``, ``last [b·G, H, N]`` back to ``[batch, dim, ·]``; + D·u, · silu(z)."""
    batch, dim, L = u.shape
    y = y.reshape(batch, dim, L)
    if D is not None:
        y = y + D.astype(jnp.float32)[None, :, None] * u.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(u.dtype), last.reshape(batch, dim, last.shape[-1])
