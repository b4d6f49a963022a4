"""The GLA Transformer block (Yang et al., https://arxiv.org/abs/2312.06635)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.linear_attention import (
    GatedLinearAttention,
    check_bools,
    check_sequence_input,
)
from jaxblocks.layers.mlp import SwiGLU, swiglu_hidden_size
from jaxblocks.typing import Array, Float


class GLABlock(nn.Module):
    """Pre-norm GLA Transformer block: ``x + GLA(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``.

    Gated linear attention (https://arxiv.org/abs/2312.06635) replaces softmax attention in an
    otherwise LLaMA-style block, as in the paper's GLA Transformer and fla's ``GLABlock``.

    ``x [B, T, D]`` is a float array with B, D >= 1; T = 0 gives an empty output (see
    `GatedLinearAttention` for that and for non-finite inputs).

    Attributes:
      num_heads, expand_k, expand_v, use_short_conv: passed to `GatedLinearAttention`.
      mlp_hidden_size: SwiGLU width (default: 8/3 · D rounded up to 256).
      norm_eps: RMSNorm epsilon. decode: recurrent decoding (``cache`` collection).
      implementation, chunk_size: kernel choice. dtype, param_dtype: compute / storage dtypes.

    Example:
      >>> block = GLABlock(num_heads=2, mlp_hidden_size=128)
      >>> y, _ = block.init_with_output(jax.random.key(0), jnp.ones((2, 10, 64)))
    """

    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    use_short_conv: bool = False
    mlp_hidden_size: int | None = None
    norm_eps: float = 1e-5
    decode: bool = False
    implementation: str | None = None
    chunk_size: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        check_sequence_input(type(self).__name__, x)
        check_bools(type(self).__name__, use_short_conv=self.use_short_conv, decode=self.decode)
        norm = lambda name: nn.RMSNorm(
            epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        h = GatedLinearAttention(
            num_heads=self.num_heads,
            expand_k=self.expand_k,
            expand_v=self.expand_v,
            use_short_conv=self.use_short_conv,
            norm_eps=self.norm_eps,
            chunk_size=self.chunk_size,
            implementation=self.implementation,
            decode=self.decode,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(norm("attn_norm")(x))
        x = x + h
        hidden = self.mlp_hidden_size or swiglu_hidden_size(x.shape[-1])
        mlp = SwiGLU(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")
        return x + mlp(norm("mlp_norm")(x))
