"""Gated MLPs for transformer-style blocks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.typing import Array, Float


def swiglu_hidden_size(dim: int, ratio: float = 4.0, multiple_of: int = 256) -> int:
    """LLaMA/fla sizing: ``2/3 · ratio · dim`` rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * ratio * dim / 3)
    return multiple_of * -(-hidden // multiple_of)


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202).

    ``down(silu(gate(x)) ⊙ up(x))`` without biases, the MLP of LLaMA and of fla's GLA
    Transformer. Unlike a plain two-layer MLP the hidden activation is gated multiplicatively.

    Attributes:
      hidden_size: width of the gated hidden layer (see `swiglu_hidden_size`).
      out_features: output width; default the input width.
      dtype: compute dtype; param_dtype: storage dtype (fp32).
      kernel_init: initializer of the three projections.

    Example:
      >>> mlp = SwiGLU(hidden_size=128)
      >>> y, _ = mlp.init_with_output(jax.random.key(0), jnp.ones((2, 5, 32)))
    """

    hidden_size: int
    out_features: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.variance_scaling(2**-5, "fan_avg", "uniform")

    @nn.compact
    def __call__(self, x: Float[Array, "... C"]) -> Float[Array, "... C"]:
        out = self.out_features or x.shape[-1]

        def dense(features, axes, name):
            return nn.Dense(
                features,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
                name=name,
            )

        gate = dense(self.hidden_size, ("embed", "mlp"), "gate")(x)
        up = dense(self.hidden_size, ("embed", "mlp"), "up")(x)
        return dense(out, ("mlp", "embed"), "down")(nn.silu(gate) * up)
