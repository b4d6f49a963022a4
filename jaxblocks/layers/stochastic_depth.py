"""Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth",
https://arxiv.org/abs/1603.09382): drop a residual branch per sample, the blocks' shared helper."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array

__all__ = ["drop_path"]


def drop_path(module: nn.Module, x: Array, rate: float, deterministic: bool) -> Array:
    """Stochastic depth: zero the whole residual branch per sample with probability ``rate``
    and scale the kept ones by ``1 / (1 - rate)`` (rng stream ``"dropout"`` of ``module``)."""
    if deterministic or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path: rate must be in [0, 1), got {rate!r}")
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)
