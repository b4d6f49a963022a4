"""A small CNN surrogate for the 2-D wave equation, with full or one-way (CP) convolutions —
the setting of "A priori compression of convolutional neural networks for wave simulators"
(paper 61): the same network with every k×k convolution replaced, before training, by a
`jaxblocks.layers.OneWayConv`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.layers.one_way_conv import OneWayConv
from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = ["WaveCNN", "WaveCNNConfig", "WAVE_CNN_PRESETS"]

CONVS = ("full", "one_way")


@dataclasses.dataclass(frozen=True)
class WaveCNNConfig:
    """``depth`` k×k conv + GELU layers of ``width`` channels, then a k×k conv to one channel
    added to the last input frame (the network predicts the change). ``conv``: "full"
    (``nn.Conv``) or "one_way" (`OneWayConv` of ``rank``)."""

    width: int = 32
    depth: int = 3
    kernel_size: int = 5
    conv: str = "full"
    rank: int = 2

    def __post_init__(self):
        if self.conv not in CONVS:
            raise ValueError(f"WaveCNNConfig.conv must be one of {CONVS}, got {self.conv!r}")
        if min(self.width, self.depth, self.kernel_size, self.rank) < 1:
            raise ValueError(f"WaveCNNConfig: sizes must be >= 1, got {self}")


class WaveCNN(nn.Module):
    """Wave-field forecaster: NHWC frames (u(t−1), u(t)) → u(t + Δ) (see `WaveCNNConfig`)."""

    width: int = 32
    depth: int = 3
    kernel_size: int = 5
    conv: str = "full"
    rank: int = 2
    dtype: Any = None

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W 1"]:
        WaveCNNConfig(self.width, self.depth, self.kernel_size, self.conv, self.rank)
        if x.ndim != 4:
            raise ValueError(f"WaveCNN: x must be NHWC frames, got shape {x.shape}")
        dtype = self.dtype or jnp.float32
        k = self.kernel_size

        def conv(features, name):
            if self.conv == "full":
                return nn.Conv(features, (k, k), padding="SAME", dtype=dtype, name=name)
            return OneWayConv(features, k, rank=self.rank, dtype=dtype, name=name)

        h = x.astype(dtype)
        for i in range(self.depth):
            h = nn.gelu(conv(self.width, f"conv{i}")(h))
        return x[..., -1:].astype(dtype) + conv(1, "out")(h)


WAVE_CNN_PRESETS = {
    "wave_cnn": WaveCNNConfig(),
    "wave_cnn_one_way": WaveCNNConfig(conv="one_way", rank=2),
}


def _example(config: WaveCNNConfig) -> Array:
    del config
    return jnp.linspace(-1.0, 1.0, 2 * 16 * 16 * 2, dtype=jnp.float32).reshape(2, 16, 16, 2)


register_presets(
    WaveCNN.from_config,
    WAVE_CNN_PRESETS,
    example_input=_example,
    doc="{name}: wave-equation CNN surrogate (full or one-way convolutions).",
    paper=Paper("A priori compression of convolutional neural networks for wave simulators"),
    params_source="no published count: a jaxblocks demo surrogate (the paper gives no sizes)",
    tiny={"width": 8, "depth": 1},
)
