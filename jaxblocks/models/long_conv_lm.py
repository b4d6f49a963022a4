"""A small causal language model with LongConv token mixing (safari's long-conv LM shape).

Fu et al., "Simple Hardware-Efficient Long Convolutions for Sequence Modeling", ICML 2023,
https://arxiv.org/abs/2302.06646. Pre-norm residual blocks ``x + LongConv(LN(x))``,
``x + MLP(LN(x))`` over byte embeddings, tied to nothing; causal end to end.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.long_conv import LongConv
from jaxblocks.registry import Paper, register_presets
from jaxblocks.typing import Array, Float, Int

__all__ = ["LongConvLM", "LongConvLMConfig"]


@dataclasses.dataclass(frozen=True)
class LongConvLMConfig:
    vocab_size: int = 256
    width: int = 128
    depth: int = 2
    l_max: int = 1024
    channels: int = 2
    mlp_ratio: int = 2


class LongConvLM(nn.Module):
    """Byte-level causal LM with `LongConv` mixers — Fu et al. 2023, arXiv 2302.06646.

    Example:
      >>> lm = LongConvLM(LongConvLMConfig(width=32, depth=1, l_max=64))
      >>> tokens = jnp.zeros((2, 64), jnp.int32); v = lm.init(jax.random.key(0), tokens)
      >>> lm.apply(v, tokens).shape
      (2, 64, 256)
    """

    config: LongConvLMConfig = LongConvLMConfig()
    dtype: Any = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, tokens: Int[Array, "B T"], train: bool = False) -> Float[Array, "B T V"]:
        c = self.config
        x = nn.Embed(c.vocab_size, c.width, dtype=self.dtype, name="embed")(tokens)
        for i in range(c.depth):
            h = nn.LayerNorm(dtype=self.dtype, name=f"norm_mix{i}")(x)
            x = x + LongConv(
                l_max=c.l_max,
                channels=c.channels,
                implementation=self.implementation,
                dtype=self.dtype,
                name=f"mixer{i}",
            )(h, train=train)
            h = nn.LayerNorm(dtype=self.dtype, name=f"norm_mlp{i}")(x)
            h = nn.gelu(nn.Dense(c.mlp_ratio * c.width, dtype=self.dtype, name=f"fc1_{i}")(h))
            x = x + nn.Dense(c.width, dtype=self.dtype, name=f"fc2_{i}")(h)
        x = nn.LayerNorm(dtype=self.dtype, name="norm_out")(x)
        return nn.Dense(c.vocab_size, dtype=self.dtype, name="head")(x)


def _example_tokens(config: LongConvLMConfig) -> Array:
    return jnp.arange(2 * 64, dtype=jnp.int32).reshape(2, 64) % config.vocab_size


register_presets(
    LongConvLM,
    {"long_conv_lm_tiny": LongConvLMConfig()},
    example_input=_example_tokens,
    doc="LongConv byte LM: width 128, 2 blocks, kernels up to 1024 (≈0.9M parameters); "
    "config fields and module attributes as kwargs.",
    paper=Paper(
        "Simple Hardware-Efficient Long Convolutions for Sequence Modeling",
        arxiv="2302.06646",
        code="https://github.com/HazyResearch/safari",
    ),
    params_source="no published count: a jaxblocks demo size of the paper's long-conv mixer",
)
