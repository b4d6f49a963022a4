"""Fast pure-JAX `fft_conv`: `jnp.fft.rfft/irfft` with FFT size N.

Autodiff goes through XLA's FFT (the transpose of an rfft is an irfft), so no custom_vjp is
needed here; everything is computed in fp32 and cast back to ``u.dtype``.
"""

from __future__ import annotations

import jax.numpy as jnp


def fft_conv_xla(u, k, D=None, pregate=None, postgate=None, *, causal=True, fft_size):
    """``irfft(rfft(pregate·u, N) · rfft(k, N), N)[:L] + D·u``, times postgate; N = ``fft_size``.

    ``fft_size`` is filled by the api: ≥ L + Lk − 1 for a causal (linear) convolution, the period
    of the circular convolution otherwise.
    """
    del causal  # the api chose N: N ≥ L + Lk - 1 makes the circular convolution a linear one
    L = u.shape[-1]
    N = fft_size
    u32 = u.astype(jnp.float32)
    v = u32 if pregate is None else u32 * pregate.astype(jnp.float32)
    k_f = jnp.fft.rfft(k.astype(jnp.float32), n=N)  # [H, N//2 + 1]
    v_f = jnp.fft.rfft(v, n=N)  # [B, H, N//2 + 1]
    y = jnp.fft.irfft(v_f * k_f[None], n=N)[..., :L]  # [B, H, L]
    if D is not None:
        y = y + D.astype(jnp.float32)[None, :, None] * u32
    if postgate is not None:
        y = y * postgate.astype(jnp.float32)
    return y.astype(u.dtype)
