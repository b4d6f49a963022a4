"""Fast pure-JAX `fft_conv`: `jnp.fft.rfft/irfft` with FFT size N.

Autodiff goes through XLA's FFT (the transpose of an rfft is an irfft), so no custom_vjp is
needed here; everything is computed in fp32 and cast back to ``u.dtype``.

The input and kernel rows go through ONE rfft (concatenated), not two: with two independent
FFTs, XLA:CPU may run both thunks at once on its two-thread intra-op pool, each waits in the
FFT library (ducc) for pool tasks no free thread can run, and the process hangs (reproduced
here at B2 H256 L4096 forward+backward on 2 cores; `tools/xla_cpu_fft_hang_repro.py`, and
PyAutoLabs/PyAutoFit#1530 for the same stacks). With one rfft, one elementwise product and one
irfft, every FFT of the forward and of the backward depends on the previous one.
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
    B, H = v.shape[:2]
    k32 = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, L - k.shape[-1])))  # [H, L]
    rows = jnp.concatenate([v.reshape(B * H, L), k32], axis=0)  # [(B + 1) H, L]
    f = jnp.fft.rfft(rows, n=N)  # one FFT op (see the module docstring); [(B + 1) H, N//2 + 1]
    v_f, k_f = f[: B * H].reshape(B, H, -1), f[B * H :]  # [B, H, N//2+1], [H, N//2+1]
    y = jnp.fft.irfft(v_f * k_f[None], n=N)[..., :L]  # [B, H, L]
    if D is not None:
        y = y + D.astype(jnp.float32)[None, :, None] * u32
    if postgate is not None:
        y = y * postgate.astype(jnp.float32)
    return y.astype(u.dtype)
