"""Channel attention by squeeze-and-excitation: `SqueezeExcite` (Hu et al. 2018)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.typing import Array, Float

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation — Hu, Shen, Sun 2018 (SENet), https://arxiv.org/abs/1709.01507.

    Gates each channel by a weight computed from the whole map: squeeze (mean over the spatial
    axes) → ``Dense(C // reduction)`` → ReLU → ``Dense(C)`` → sigmoid, then ``x * gate``. Unlike
    spatial attention the gate is one number per (sample, channel); unlike a norm it carries
    learned weights. Both Dense layers have no bias, as in MSVMamba's SE (the block this layer was
    written for); the hidden width is ``max(1, C // reduction)``. Channels last, any number of
    spatial axes (``[B, H, W, C]``, ``[B, T, C]``, ...). The squeeze mean is taken in float32 and
    cast to ``dtype`` before the Dense layers; the gate is applied in the input's dtype.

    Attributes:
      reduction: channel reduction ratio r of the bottleneck (default 8).
      dtype: compute dtype of the Dense layers.
      param_dtype: dtype of the kernels (``fc1``: ``[C, C // r]``, ``fc2``: ``[C // r, C]``).

    Example:
      >>> se = SqueezeExcite(reduction=4)
      >>> x = jnp.ones((2, 8, 8, 16))
      >>> y = se.apply(se.init(jax.random.key(0), x), x)  # [2, 8, 8, 16]
    """

    reduction: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B *S C"]) -> Float[Array, "B *S C"]:
        if x.ndim < 3:
            raise ValueError(
                f"SqueezeExcite: x must be [B, *spatial, C] with at least one spatial axis, "
                f"got shape {x.shape}"
            )
        if not isinstance(self.reduction, int) or self.reduction <= 0:
            raise ValueError(f"SqueezeExcite: reduction={self.reduction!r} must be a positive int")
        C = x.shape[-1]
        spatial = tuple(range(1, x.ndim - 1))
        s = jnp.mean(x.astype(jnp.float32), axis=spatial).astype(self.dtype)  # [B, C]
        dense = lambda f, n: nn.Dense(
            f, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=n
        )
        s = jax.nn.sigmoid(dense(C, "fc2")(nn.relu(dense(max(1, C // self.reduction), "fc1")(s))))
        return x * s.reshape((x.shape[0],) + (1,) * len(spatial) + (C,)).astype(x.dtype)
