"""Legendre Memory Unit (LMU) with its parallel (FFT convolution) training form, and LIF spikes.

Voelker, Kajić, Eliasmith, "Legendre Memory Units", NeurIPS 2019; the parallel form and the
spiking variant follow LMUFormer (Liu, Datta, Beerel, https://arxiv.org/abs/2402.04882,
code zeyuliu1037/LMUFormer ``src/blocks/lmu_cell.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from jaxblocks.kernels.long_conv.api import fft_conv
from jaxblocks.typing import Array, Float

__all__ = [
    "LIF",
    "LMU",
    "lif",
    "lmu_discrete",
    "lmu_impulse_response",
    "lmu_state_space",
    "spike",
]

Dtype = Any


def lmu_state_space(order: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """The continuous LMU system (A [d, d], B [d, 1]) in float64 (Voelker et al., eq. 2).

    ``A_ij = (2i+1)/θ · (−1 if i < j else (−1)^(i−j+1))``, ``B_i = (2i+1)/θ · (−1)^i``: the Padé
    approximant of a delay of θ steps projected on the first d shifted Legendre polynomials.
    """
    q = np.arange(order, dtype=np.float64)
    r = ((2 * q + 1) / theta)[:, None]  # [d, 1]
    i, j = np.meshgrid(q, q, indexing="ij")
    a = r * np.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    b = r * ((-1.0) ** q)[:, None]
    return a, b


@functools.lru_cache(maxsize=64)
def lmu_discrete(order: int, theta: float, dt: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Zero-order-hold discretisation (Ā, B̄) of `lmu_state_space` (as scipy's cont2discrete).

    ``exp([[A, B], [0, 0]]·dt) = [[Ā, B̄], [0, I]]``, computed in float64.
    """
    a, b = lmu_state_space(order, theta)
    m = np.zeros((order + 1, order + 1))
    m[:order, :order], m[:order, order:] = a, b
    e = scipy.linalg.expm(m * dt)
    return e[:order, :order], e[:order, order:]


@functools.lru_cache(maxsize=64)
def lmu_impulse_response(order: int, theta: float, length: int) -> np.ndarray:
    """H [d, length] with H[:, t] = Āᵗ B̄ (float64): the memory is m = H ⊛ u (causal)."""
    a, b = lmu_discrete(order, theta)
    h = np.empty((order, length))
    x = b[:, 0]
    for t in range(length):
        h[:, t] = x
        x = a @ x
    return h


@jax.custom_jvp
def spike(x):
    """Heaviside step ``x >= 0`` with a sigmoid surrogate gradient (α = 4, spikingjelly's)."""
    return (x >= 0).astype(x.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    s = jax.nn.sigmoid(4.0 * x.astype(jnp.float32))
    return spike(x), (dx * (4.0 * s * (1.0 - s)).astype(dx.dtype))


def lif(x, *, tau: float = 2.0, v_threshold: float = 1.0, axis: int = 1):
    """Multi-step LIF neuron over ``axis`` (spikingjelly ``MultiStepLIFNode``, hard reset to 0).

    ``v ← v + (x_t − v)/τ``; ``s_t = H(v − v_th)``; ``v ← v·(1 − s_t)`` with the reset detached
    (``detach_reset=True``). Returns spikes (0/1) in ``x.dtype`` with surrogate gradients.
    """
    xt = jnp.moveaxis(x.astype(jnp.float32), axis, 0)

    def step(v, x_t):
        v = v + (x_t - v) / tau
        s = spike(v - v_threshold)
        return v * (1.0 - jax.lax.stop_gradient(s)), s

    _, s = jax.lax.scan(step, jnp.zeros_like(xt[0]), xt)
    return jnp.moveaxis(s, 0, axis).astype(x.dtype)


class LIF(nn.Module):
    """LIF spiking activation over the time axis (``[B, T, C]``), see `lif`."""

    tau: float = 2.0
    v_threshold: float = 1.0

    @nn.compact
    def __call__(self, x):
        return lif(x, tau=self.tau, v_threshold=self.v_threshold, axis=1)


class LMU(nn.Module):
    """Legendre Memory Unit — Voelker et al. 2019; parallel form from LMUFormer, arXiv 2402.04882.

    A linear memory m_t = Ā m_{t−1} + B̄ u_t of order ``memory_size`` holds a Legendre summary
    of the last θ steps of a 1-d signal u = f(W_u x); the output is h = f(W_h [m; x]). Unlike a
    gated RNN the memory is linear and time-invariant, so training runs it as one causal
    convolution with the impulse response H_t = Āᵗ B̄ (`fft_conv`, O(T log T)), and inference
    can run it step by step (``mode="recurrent"``): both give the same numbers.

    Attributes:
      hidden_size: width of h. memory_size: LMU order d. theta: window θ (steps).
      spiking: LMUFormer's spiking cell: BatchNorm + LIF after W_u, on m and after W_h
        (ReLU otherwise).
      mode: "parallel" (FFT convolution) or "recurrent" (`lax.scan`); overridable per call.
      implementation: `fft_conv` implementation (None: automatic).
      check_finite: in the parallel (FFT) mode, `fft_conv`'s guard: without it one NaN/inf in
        the input makes every memory step of that channel NaN, earlier ones included; with it,
        only the steps from there on (traced inputs) or an error (concrete inputs).

    Example:
      >>> lmu = LMU(hidden_size=8, memory_size=4, theta=16.0)
      >>> x = jnp.ones((2, 16, 3)); params = lmu.init(jax.random.key(0), x)
      >>> lmu.apply(params, x).shape
      (2, 16, 8)
    """

    hidden_size: int
    memory_size: int
    theta: float
    spiking: bool = False
    mode: str = "parallel"
    implementation: str | None = None
    check_finite: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def memory(self, u: Float[Array, "B T"], mode: str) -> Float[Array, "B T d"]:
        """m_t = Σ_{s ≤ t} Ā^{t−s} B̄ u_s in fp32, by FFT convolution or by the recurrence."""
        B, T = u.shape
        d = self.memory_size
        u = u.astype(jnp.float32)
        if mode == "parallel":
            h = jnp.asarray(lmu_impulse_response(d, float(self.theta), T), jnp.float32)  # [d, T]
            ub = jnp.broadcast_to(u[:, None, :], (B, d, T))  # [B, d, T]: one channel per order
            m = fft_conv(  # [B, d, T]
                ub, h, implementation=self.implementation, check_finite=self.check_finite
            )
            return jnp.swapaxes(m, 1, 2)
        if mode == "recurrent":
            a, b = (jnp.asarray(x, jnp.float32) for x in lmu_discrete(d, float(self.theta)))

            def step(m, u_t):  # m: [B, d], u_t: [B]
                m = m @ a.T + u_t[:, None] * b[:, 0][None, :]
                return m, m

            _, ms = jax.lax.scan(step, jnp.zeros((B, d), jnp.float32), u.T)  # [T, B, d]
            return jnp.swapaxes(ms, 0, 1)
        raise ValueError(f"LMU: mode must be 'parallel' or 'recurrent', got {mode!r}")

    @nn.compact
    def __call__(
        self, x: Float[Array, "B T C"], *, train: bool = False, mode: str | None = None
    ) -> Float[Array, "B T H"]:
        if x.ndim != 3:
            raise ValueError(f"LMU: x must be [B, T, C], got shape {x.shape}")
        mode = self.mode if mode is None else mode
        dtype = self.dtype or x.dtype
        dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=self.param_dtype)
        bn = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
        )
        u = dense(1, name="W_u")(x)  # [B, T, 1]
        u = LIF()(bn(name="bn_u")(u)) if self.spiking else nn.relu(u)
        m = self.memory(u[..., 0], mode).astype(dtype)  # [B, T, d]
        if self.spiking:
            m = LIF()(bn(name="bn_m")(m))
        h = dense(self.hidden_size, name="W_h")(jnp.concatenate([m, x.astype(dtype)], -1))
        return LIF()(bn(name="bn_h")(h)) if self.spiking else nn.relu(h)
