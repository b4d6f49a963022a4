"""The specification of `fft_conv`: direct convolutions in fp32.

`fft_conv_reference` computes, for every batch b and channel h,

    v[t]  = pregate[b, h, t] · u[b, h, t]                         (pregate optional)
    c[t]  = Σ_{s=0}^{Lk-1} k[h, s] · v[t − s]                     causal (linear) convolution
    c[t]  = Σ_{s=0}^{Lk-1} k[h, s] · v_N[(t − s) mod N],  t < L   circular, period N = fft_size
    y[t]  = postgate[b, h, t] · (c[t] + D[h] · u[b, h, t])        (D, postgate optional)

where ``v_N`` is ``v`` zero-padded to length N. Both forms are direct (O(L·Lk)) convolutions:
the input is extended on the left by Lk − 1 samples — zeros (causal) or the tail of ``v_N``
(circular) — and a depthwise "valid" convolution runs over it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _depthwise_valid(x, k, precision):
    """x: [B, H, Lx], k: [H, Lk] -> [B, H, Lx - Lk + 1], y[t] = Σ_s k[s] x[t + Lk - 1 - s]."""
    H = x.shape[1]
    return jax.lax.conv_general_dilated(
        x,  # [B, H, Lx]  (N, C, W)
        jnp.flip(k, -1)[
            :, None, :
        ],  # [H, 1, Lk]  (O, I/g, W): flipped, conv_general is a correlation
        window_strides=(1,),
        padding="VALID",
        dimension_numbers=("NCH", "OIH", "NCH"),
        feature_group_count=H,
        precision=precision,
    )


def fft_conv_reference(
    u,
    k,
    D=None,
    pregate=None,
    postgate=None,
    *,
    causal=True,
    fft_size=None,
    precision=jax.lax.Precision.HIGHEST,
):
    """Direct fp32 convolution; see the module docstring. Returns ``u.dtype``.

    ``precision`` goes to the convolution (the one product; `HIGHEST`: exact fp32 on any
    backend).
    """
    B, H, L = u.shape
    Lk = k.shape[-1]
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    u32, k32 = f32(u), f32(k)
    v = u32 if pregate is None else u32 * f32(pregate)
    if causal:
        left = jnp.zeros((B, H, Lk - 1), jnp.float32)
    else:
        N = L if fft_size is None else fft_size
        v_n = jnp.pad(v, ((0, 0), (0, 0), (0, N - L)))  # [B, H, N]
        # (t - s) mod N for t < L, s < Lk reaches back Lk - 1 samples: the tail of v_N.
        reps = -(-(Lk - 1) // N) if Lk > 1 else 0
        tail = jnp.tile(v_n, (1, 1, reps))[..., reps * N - (Lk - 1) :]
        left = tail
    c = _depthwise_valid(jnp.concatenate([left, v], axis=-1), k32, precision)  # [B, H, L]
    y = c if D is None else c + f32(D)[None, :, None] * u32
    if postgate is not None:
        y = y * f32(postgate)
    return y.astype(u.dtype)
