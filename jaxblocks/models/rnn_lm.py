"""Small recurrent language models over the head-wise FlashRNN layers (LSTM, sLSTM, GRU, Elman).

Token embedding → ``num_layers`` × pre-norm residual recurrent layer (``x + RNN(LN(x))``, the
recurrent layer a head-wise `FlashRNN` with the chosen cell) → LayerNorm → LM head. Registered as
``lstm_lm_tiny`` and ``slstm_lm_tiny`` (CPU-sized) so the registry tests exercise the layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.kernels.rnn.api import CELLS
from jaxblocks.layers.recurrent import FlashRNN
from jaxblocks.registry import Paper, register_presets
from jaxblocks.typing import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class RNNLMConfig:
    """Architecture of a recurrent LM; ``hidden_size`` must divide by ``num_heads``."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    cell: str = "lstm"

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, f) <= 0:
                raise ValueError(f"RNNLMConfig.{f} must be positive, got {getattr(self, f)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"RNNLMConfig: hidden_size={self.hidden_size} not divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.cell not in CELLS:
            raise ValueError(f"RNNLMConfig.cell must be one of {list(CELLS)}, got {self.cell!r}")


PRESETS: dict[str, RNNLMConfig] = {
    # one layer: the registry test compiles value_and_grad of every model on 2 CPU cores
    "lstm_tiny": RNNLMConfig(cell="lstm", num_layers=1),
    "slstm_tiny": RNNLMConfig(cell="slstm", num_layers=1),
}


class RNNLM(nn.Module):
    """Recurrent LM over head-wise FlashRNN cells (https://arxiv.org/abs/2412.07752).

    Attributes:
      config: the architecture (`RNNLMConfig`).
      implementation: the `flashrnn` implementation (None: fastest available).
      dtype: compute and output dtype; param_dtype: storage dtype (fp32).

    Example:
      >>> import jax
      >>> model = RNNLM(PRESETS["lstm_tiny"])
      >>> logits, _ = model.init_with_output(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
      >>> logits.shape
      (1, 8, 256)
    """

    config: RNNLMConfig = PRESETS["lstm_tiny"]
    implementation: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T V"]:
        cfg = self.config
        x = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype
        )(tokens)
        for i in range(cfg.num_layers):
            h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")(x)
            h, _ = FlashRNN(
                features=cfg.hidden_size,
                num_heads=cfg.num_heads,
                function=cfg.cell,
                implementation=self.implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"rnn_{i}",
            )(h)
            x = x + h
        x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm_out")(x)
        return nn.Dense(
            cfg.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype, name="lm_head"
        )(x)


def _tokens(config: RNNLMConfig) -> Array:
    return (jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) * 5) % config.vocab_size


register_presets(
    RNNLM,
    {f"{name.removesuffix('_tiny')}_lm_tiny": config for name, config in PRESETS.items()},
    example_input=_tokens,
    doc="Recurrent LM, preset {name!r} (config fields and attributes as kwargs).",
    paper=Paper(
        "FlashRNN: I/O-Aware Optimization of Traditional RNNs on modern hardware",
        arxiv="2412.07752",
        code="https://github.com/NX-AI/flashrnn",
    ),
    params_source="no published count: jaxblocks demo sizes of FlashRNN's head-wise cells",
)
