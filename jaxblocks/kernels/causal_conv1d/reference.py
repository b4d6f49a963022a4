"""The specification of `causal_conv1d`: the short depthwise causal convolution in fp32.

Channels last, for every batch b, time t and channel c,

    y[b, t, c] = act(bias[c] + Σ_{j=0}^{W-1} w[j, c] · x[b, t − (W − 1) + j, c])

(x[t] = 0 for t < 0; W ≤ 8; act ∈ {None, "silu"}), written as a loop over the W taps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_conv1d_reference(x, w, bias=None, activation=None):
    """Tap loop in fp32; see the module docstring. x: [B, T, C], w: [W, C]. Returns ``x.dtype``."""
    T = x.shape[1]
    W = w.shape[0]
    x32 = x.astype(jnp.float32)
    xp = jnp.pad(x32, ((0, 0), (W - 1, 0), (0, 0)))  # [B, T + W - 1, C]
    y = jnp.zeros_like(x32)
    for j in range(W):
        y = y + w[j].astype(jnp.float32)[None, None, :] * xp[:, j : j + T, :]
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, None, :]
    if activation == "silu":
        y = jax.nn.silu(y)
    return y.astype(x.dtype)
