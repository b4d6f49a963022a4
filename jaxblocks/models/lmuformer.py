"""LMUFormer keyword-spotting classifiers: convolutional embedding → LMUFormer blocks → per-token
logits averaged over the sequence.

Liu, Datta, Beerel, "LMUFormer: Low Complexity Yet Powerful Spiking Model With Legendre Memory
Units", ICLR 2024, https://arxiv.org/abs/2402.04882. Official code zeyuliu1037/LMUFormer
``src/lmu_rnn.py`` (``ConvLMU``) with the Speech Commands settings of ``src/gsc.yml``: 128 mel
bins in, width 256, one block, MLP ratio 4, θ = 128, 35 classes. The three registered models are
the code's ``lmu_rnn_conv1d`` (non-spiking), ``slmu_rnn_conv1d`` (spiking) and
``slmu_rnn_ms_conv1d`` (spiking with membrane shortcuts, the default of ``gsc.yml``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.lmuformer import Conv1dEmbedding, LMUFormerBlock, _bn, _lif
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = ["LMUFORMER_PRESETS", "LMUFormer", "LMUFormerConfig"]


@dataclasses.dataclass(frozen=True)
class LMUFormerConfig:
    """Architecture of an `LMUFormer` classifier (https://arxiv.org/abs/2402.04882).

    Attributes:
      num_classes: outputs (Speech Commands V2: 35).
      dim: embedding width (``gsc.yml``: 256).
      depth: LMUFormer blocks (``layer: 1``).
      mlp_ratio: ConvFFN width / dim.
      theta: the LMU window (the code fixes θ = seq_len = 128).
      spiking, membrane_shortcut: the model variant (see the module docstring).
    """

    num_classes: int = 35
    dim: int = 256
    depth: int = 1
    mlp_ratio: float = 4.0
    theta: float = 128.0
    spiking: bool = False
    membrane_shortcut: bool = False


class LMUFormer(nn.Module):
    """LMUFormer classifier (``ConvLMU`` of the official code, https://arxiv.org/abs/2402.04882).

    ``x [B, T, F]`` (T frames of F features, e.g. a log-mel spectrogram) → `Conv1dEmbedding`
    → ``depth`` × `LMUFormerBlock` → (membrane-shortcut model: BN → LIF) → a Dense per token →
    mean of the per-token logits over T. Every part runs causally in time except the
    embedding's centred 3-tap convolutions (as the code); ``mode="recurrent"`` runs the LMUs
    step by step with the same numbers.

    Train or eval, the rule of every registered BatchNorm model (`resolve_train`): ``train=True``
    uses batch statistics (apply with ``mutable=["batch_stats"]``), ``train=False`` the running
    ones; ``train=None`` trains when ``batch_stats`` is mutable, else it is an error.

    Attributes:
      see `LMUFormerConfig`; dtype / param_dtype: compute and parameter dtypes.
    """

    num_classes: int = 35
    dim: int = 256
    depth: int = 1
    mlp_ratio: float = 4.0
    theta: float = 128.0
    spiking: bool = False
    membrane_shortcut: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B T F"], *, train: bool | None = None, mode: str | None = None
    ) -> Float[Array, "B K"]:
        train = resolve_train(self, train)
        if getattr(x, "ndim", None) != 3:
            raise ValueError(f"LMUFormer: x must be [B, T, F] feature frames, got shape "
                             f"{getattr(x, 'shape', None)}")  # fmt: skip
        if x.shape[1] < 1:
            raise ValueError(f"LMUFormer: x has no frames, shape {x.shape}")
        dtype = self.dtype or (x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
        x = x.astype(dtype)
        kw = dict(spiking=self.spiking, membrane_shortcut=self.membrane_shortcut, dtype=dtype,
                  param_dtype=self.param_dtype)  # fmt: skip
        x = Conv1dEmbedding(self.dim, name="patch_embed", **kw)(x, train=train)
        for i in range(self.depth):
            x = LMUFormerBlock(self.theta, mlp_ratio=self.mlp_ratio, name=f"block_{i}", **kw)(
                x, train=train, mode=mode
            )
        if self.membrane_shortcut:
            x = _lif()(_bn(train, dtype, "head_bn")(x))
        logits = nn.Dense(self.num_classes, dtype=dtype, param_dtype=self.param_dtype,
                          name="head")(x)  # fmt: skip
        return logits.astype(jnp.float32).mean(axis=1).astype(dtype)


LMUFORMER_PRESETS = {
    "lmuformer_gsc": LMUFormerConfig(),
    "spiking_lmuformer_gsc": LMUFormerConfig(spiking=True),
    "spiking_lmuformer_ms_gsc": LMUFormerConfig(spiking=True, membrane_shortcut=True),
}
# Layer by layer from the official modules at gsc.yml's settings (in 128, dim 256, 1 block,
# MLP 1024, 35 classes; BN affine counted, running statistics not), equal to eval_shape here.
LMUFORMER_PARAMS = {
    "lmuformer_gsc": 1_621_796,
    "spiking_lmuformer_gsc": 1_689_382,
    "spiking_lmuformer_ms_gsc": 1_689_894,
}


def _example(config: LMUFormerConfig) -> Array:
    # log-mel-like magnitudes (gsc.yml normalises by mean -6.8, std 5.6): large enough for the
    # spiking variants' LIF neurons (threshold 1) to fire at initialisation
    del config
    x = jnp.linspace(-12.0, 12.0, 2 * 32 * 128, dtype=jnp.float32).reshape(2, 32, 128)
    return x * jnp.cos(jnp.arange(128, dtype=jnp.float32))[None, None]


register_presets(
    LMUFormer.from_config,
    LMUFORMER_PRESETS,
    example_input=_example,
    doc="{name}: the official LMUFormer keyword-spotting model; kwargs override fields.",
    paper=Paper(
        "LMUFormer: Low Complexity Yet Powerful Spiking Model With Legendre Memory Units",
        arxiv="2402.04882",
        code="https://github.com/zeyuliu1037/LMUFormer",
    ),
    published_params=LMUFORMER_PARAMS,
    params_source="counted layer by layer from the official code (src/lmu_rnn.py ConvLMU with "
    "src/gsc.yml: 128 mel bins, dim 256, 1 block, MLP ratio 4, 35 classes; lmu_rnn_conv1d, "
    "slmu_rnn_conv1d, slmu_rnn_ms_conv1d); the paper rounds the non-spiking and spiking models to "
    "1.62M and 1.69M",
    params_rtol=0.0,
    tiny={"dim": 16, "num_classes": 5, "theta": 32.0},
)
