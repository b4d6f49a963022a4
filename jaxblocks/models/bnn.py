"""A small binary CNN for the MST-compression demo (paper 29, https://arxiv.org/abs/2308.13735).

Vo et al. compress binary networks (ResNet-18, VGG-small on CIFAR-10) by computing each output
channel of a binary convolution from a similar channel (the minimum spanning tree of Hamming
distances between the channels' ±1 weights, `jaxblocks.compress.mst_plan`) and train with a
regulariser that shortens the tree. This model is the digits-sized stand-in: a real-valued
first convolution and classifier (kept real, as in BNN practice and the paper's baselines) and
`BinaryConv` layers in between, each followed by BatchNorm, as the binary layers of XNOR-Net
and Bi-Real Net are. No activation follows a binary layer: the next layer's sign is its
nonlinearity.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.compress.binary import BinaryConv
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = ["BinaryCNN", "BinaryCNNConfig", "BNN_PRESETS"]


@dataclasses.dataclass(frozen=True)
class BinaryCNNConfig:
    """``stem`` real 3×3 conv channels, then one binary 3×3 conv per entry of ``widths``
    (stride 2 where ``strides`` says), global average pooling and a real classifier."""

    stem: int = 32
    widths: tuple[int, ...] = (64, 64, 128, 128)
    strides: tuple[int, ...] = (1, 2, 1, 2)
    num_classes: int = 10

    def __post_init__(self):
        if len(self.widths) != len(self.strides) or not self.widths:
            raise ValueError(f"BinaryCNNConfig: widths {self.widths} and strides {self.strides} "
                             "must be non-empty and of equal length")  # fmt: skip
        if min(self.stem, *self.widths, self.num_classes) < 1:
            raise ValueError(f"BinaryCNNConfig: sizes must be >= 1, got {self}")


class BinaryCNN(nn.Module):
    """Real stem conv + BN + hard-tanh, binary conv + BN blocks, GAP, real Dense (logits)."""

    stem: int = 32
    widths: tuple[int, ...] = (64, 64, 128, 128)
    strides: tuple[int, ...] = (1, 2, 1, 2)
    num_classes: int = 10
    dtype: Any = None

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool | None = None
    ) -> Float[Array, "B classes"]:
        BinaryCNNConfig(self.stem, tuple(self.widths), tuple(self.strides), self.num_classes)
        if x.ndim != 4:
            raise ValueError(f"BinaryCNN: x must be NHWC images, got shape {x.shape}")
        train = resolve_train(self, train)
        dtype = self.dtype or jnp.float32

        def bn(name):
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=dtype, name=name)  # fmt: skip

        h = nn.Conv(self.stem, (3, 3), padding="SAME", use_bias=False, dtype=dtype,
                    name="stem")(x.astype(dtype))  # fmt: skip
        h = jnp.clip(bn("stem_bn")(h), -1.0, 1.0)  # hard-tanh: the STE's linear range
        for i, (w, s) in enumerate(zip(self.widths, self.strides, strict=True)):
            h = BinaryConv(w, (3, 3), strides=s, dtype=dtype, name=f"binary_{i}")(h)
            h = bn(f"binary_{i}_bn")(h)
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # [B, C]
        return nn.Dense(self.num_classes, dtype=dtype, name="head")(h)


BNN_PRESETS = {"bnn_small": BinaryCNNConfig()}


def _example(config: BinaryCNNConfig) -> Array:
    del config
    return jnp.linspace(-1.0, 1.0, 2 * 16 * 16 * 1, dtype=jnp.float32).reshape(2, 16, 16, 1)


register_presets(
    BinaryCNN.from_config,
    BNN_PRESETS,
    example_input=_example,
    doc="{name}: a small binary CNN (real stem and classifier, BinaryConv + BN blocks).",
    paper=Paper(
        "MST-compression: Compressing and Accelerating Binary Neural Networks with Minimum "
        "Spanning Tree",
        arxiv="2308.13735",
    ),
    params_source="no published count: a jaxblocks demo model for the digits (the paper's "
    "models are ResNet-18 and VGG-small on CIFAR-10)",
    tiny={"stem": 8, "widths": (16, 16), "strides": (1, 2)},
)
