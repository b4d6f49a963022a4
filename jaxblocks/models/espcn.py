"""ESPCN — Shi et al., "Real-Time Single Image and Video Super-Resolution Using an Efficient
Sub-Pixel Convolutional Neural Network", CVPR 2016, https://arxiv.org/abs/1609.05158.

All convolutions run at the low resolution; the last one produces ``C·r²`` channels that
`pixel_shuffle` rearranges into the ``r``-times larger image, instead of upsampling first (SRCNN)
or using a transposed convolution.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.layers.pixel_shuffle import pixel_shuffle
from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = ["ESPCN", "ESPCNConfig", "ESPCN_PRESETS"]


@dataclasses.dataclass(frozen=True)
class ESPCNConfig:
    """Architecture of an `ESPCN`; the default is the paper's 3-layer network at r = 3.

    Attributes:
      upscale_factor: r.
      channels: image channels C (1: the luminance Y, as the paper).
      features: widths of the hidden layers ((64, 32) in the paper).
      kernel_sizes: one per layer, hidden ones then the output one ((5, 3, 3) in the paper).
      activation: ``"tanh"`` (the paper's) or ``"relu"`` (pytorch/examples' reimplementation).
    """

    upscale_factor: int = 3
    channels: int = 1
    features: tuple[int, ...] = (64, 32)
    kernel_sizes: tuple[int, ...] = (5, 3, 3)
    activation: str = "tanh"

    def __post_init__(self):
        if isinstance(self.upscale_factor, bool) or not isinstance(self.upscale_factor, int):
            raise TypeError(f"ESPCNConfig.upscale_factor must be an int, got "
                            f"{self.upscale_factor!r}")  # fmt: skip
        if self.upscale_factor < 1 or self.channels < 1:
            raise ValueError(
                f"ESPCNConfig: upscale_factor and channels must be >= 1, got "
                f"{self.upscale_factor}, {self.channels}"
            )
        if len(self.kernel_sizes) != len(self.features) + 1:
            raise ValueError(
                f"ESPCNConfig: kernel_sizes {self.kernel_sizes} needs one entry per hidden layer "
                f"{self.features} plus the output layer"
            )
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"ESPCNConfig.activation must be 'tanh' or 'relu', got "
                             f"{self.activation!r}")  # fmt: skip


class ESPCN(nn.Module):
    """Efficient sub-pixel CNN (https://arxiv.org/abs/1609.05158): low-res image → r× image.

    Conv5×5(64) → tanh → Conv3×3(32) → tanh → Conv3×3(C·r²) → `pixel_shuffle` (r), "SAME"
    padding so the output is exactly ``r`` times the input. The paper specifies no
    initialisation; Flax's defaults are used (pytorch/examples uses orthogonal init with its
    ReLU variant). The output is not clipped: the training loss sees the raw prediction.

    Attributes:
      upscale_factor, channels, features, kernel_sizes, activation: see `ESPCNConfig`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> model = ESPCN()
      >>> lr = jnp.zeros((1, 11, 11, 1))
      >>> v = model.init(jax.random.key(0), lr)
      >>> model.apply(v, lr).shape
      (1, 33, 33, 1)
    """

    upscale_factor: int = 3
    channels: int = 1
    features: tuple[int, ...] = (64, 32)
    kernel_sizes: tuple[int, ...] = (5, 3, 3)
    activation: str = "tanh"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    # Build from an `ESPCNConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B Hr Wr C"]:
        ESPCNConfig(self.upscale_factor, self.channels, tuple(self.features),
                    tuple(self.kernel_sizes), self.activation)  # fmt: skip
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(
                f"ESPCN: x must be NHWC with {self.channels} channel(s), got shape {x.shape}"
            )
        dtype = self.dtype
        if dtype is None:
            dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        x = x.astype(dtype)
        act = jnp.tanh if self.activation == "tanh" else nn.relu
        r = self.upscale_factor
        widths = (*self.features, self.channels * r * r)
        for i, (f, k) in enumerate(zip(widths, self.kernel_sizes, strict=True)):
            x = nn.Conv(f, (k, k), padding="SAME", dtype=dtype, param_dtype=self.param_dtype,
                        name=f"conv{i + 1}")(x)  # fmt: skip
            if i < len(widths) - 1:
                x = act(x)
        return pixel_shuffle(x, r)


ESPCN_PRESETS: dict[str, ESPCNConfig] = {"espcn": ESPCNConfig()}


def _example_image(config: ESPCNConfig) -> Array:
    n = 2 * 11 * 11 * config.channels
    return jnp.linspace(0.0, 1.0, n, dtype=jnp.float32).reshape(2, 11, 11, config.channels)


register_presets(
    ESPCN.from_config,
    ESPCN_PRESETS,
    example_input=_example_image,
    doc="{name}: the paper's 3-layer tanh ESPCN (r = 3, one channel); kwargs override fields.",
    paper=Paper(
        "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel "
        "Convolutional Neural Network",
        arxiv="1609.05158",
    ),
    published_params={"espcn": 22_729},
    params_source="the paper's architecture (§3, l = 3, (f1, n1) = (5, 64), (f2, n2) = (3, 32), "
    "f3 = 3) at r = 3, C = 1: 1,664 + 18,464 + 2,601 (no official code exists)",
    tiny={"features": (8, 8)},
)
