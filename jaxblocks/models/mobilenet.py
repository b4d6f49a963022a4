"""MobileNetV2 built from `ConvBN`: inverted residuals with depthwise ConvBNs, every mode works.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
https://arxiv.org/abs/1801.04381; ConvBN modes: https://arxiv.org/abs/2305.11624.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.layers.conv_bn import ConvBN, resolve_convbn_mode
from jaxblocks.models.resnet import (
    ACTIVATION_AXES,
    HEAD_KERNEL_AXES,
    conv_kernel_init,
    global_avg_pool,
)
from jaxblocks.registry import Paper, config_fields_module, register_presets

# (expansion t, output channels c, repeats n, first stride s): the paper's Table 2.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never more than 10% down (TF/torchvision)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6, stride) -> 1x1 linear projection (+ input).

    The depthwise conv is a `ConvBN` with ``feature_group_count`` equal to its channels; the
    residual add is used only when the stride is 1 and the channels are unchanged.
    """

    features: int
    strides: int = 1
    expand_ratio: int = 6
    conv: Callable[..., nn.Module] = ConvBN

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], mode: str | None = None, use_aux: bool = False
    ) -> Array:
        in_features = x.shape[-1]
        hidden = int(round(in_features * self.expand_ratio))
        y = x
        if self.expand_ratio != 1:
            y = self.conv(hidden, (1, 1), padding="VALID", activation=nn.relu6, name="expand")(
                y, mode, use_aux=use_aux
            )
        y = self.conv(
            hidden, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)),
            feature_group_count=hidden, activation=nn.relu6, name="depthwise",
        )(y, mode, use_aux=use_aux)  # fmt: skip
        residual = x if self.strides == 1 and in_features == self.features else None
        y = self.conv(self.features, (1, 1), padding="VALID", name="project")(
            y, mode, residual=residual, use_aux=use_aux
        )
        return _constrain(y)


@dataclasses.dataclass(frozen=True)
class MobileNetV2Config:
    """Architecture of a `MobileNetV2`; the default is torchvision's ``mobilenet_v2`` (1.0).

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled features.
      width_multiplier: scales every layer's channels (rounded to multiples of 8); the last
        1x1 layer keeps at least 1280 channels, as in the paper.
      stem_strides: stride of the first 3x3 ConvBN (2 for ImageNet; 1 for tiny images).
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    stem_strides: int = 2


class MobileNetV2(nn.Module):
    """MobileNetV2 (https://arxiv.org/abs/1801.04381) whose every conv is a `ConvBN`.

    Differs from `ResNet` in its inverted residual blocks: a depthwise 3x3 `ConvBN`
    (``feature_group_count`` = channels) between 1x1 expansion and linear projection layers,
    ReLU6, and a width multiplier. All ConvBN modes apply (https://arxiv.org/abs/2305.11624),
    resolved once per call by `resolve_convbn_mode` and passed to every layer; first match wins:
    the ``mode`` call argument; ``train=True`` ("train") / ``train=False`` (the context or the
    attribute when it is eval/tune/deploy, else "eval"); ``with convbn_mode(...)``; the ``mode``
    attribute; else "train" when applied with ``mutable=["batch_stats"]`` (and in ``init``),
    otherwise a ValueError (as ``flax.linen.BatchNorm``). Integer images are promoted to
    float32 unless ``dtype`` is set.
    Topology and counts follow torchvision (3,504,872 parameters at 1000 classes) except the
    classifier dropout, which is left out (no parameters; add it in the head if needed).

    Attributes:
      num_classes, width_multiplier, stem_strides: see `MobileNetV2Config`.
      mode: default ConvBN mode of every layer (None: decided per call, see above).
      dtype: compute dtype (None: the input's, integers promoted to float32); param_dtype:
        parameter storage dtype.
      implementation: kernel implementation passed to every `ConvBN` (None: automatic).
      aux_bn: give every `ConvBN` an auxiliary BatchNorm, selected per call with
        ``use_aux=True`` (ConAdv's adversarial inputs; `fold_for_deploy` drops it).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = MobileNetV2(num_classes=10, width_multiplier=0.25)
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> from jaxblocks.layers.conv_bn import convbn_mode
      >>> with convbn_mode("eval"):
      ...     logits = model.apply(variables, x)
      >>> logits.shape
      (2, 10)
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    stem_strides: int = 2
    mode: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    aux_bn: bool = False

    # Build from a `MobileNetV2Config`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        mode: str | None = None,
        *,
        train: bool | None = None,
        use_aux: bool = False,
        features: bool = False,
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (pooled features if ``num_classes == 0``).

        Args:
          x: NHWC images.
          mode: ConvBN mode for every layer of this call (wins over context and attribute).
          train: Flax-style alternative to ``mode`` (see the precedence above).
          use_aux: normalise with every layer's auxiliary BatchNorm (needs ``aux_bn=True``).
          features: return the last block's output at each resolution instead (strides 2, 4,
            8, 16, 32: 16, 24, 32, 96, 320 channels at width 1, timm's ``features_only``), the
            final 1×1 conv and classifier unused.
        """
        mode = resolve_convbn_mode(self, mode, train)
        if x.ndim != 4:
            raise ValueError(
                f"MobileNetV2: x must be NHWC [batch, height, width, channels], got {x.shape}"
            )
        if self.width_multiplier <= 0:
            raise ValueError(
                f"MobileNetV2: width_multiplier must be > 0, got {self.width_multiplier!r}"
            )
        conv = functools.partial(
            ConvBN,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
            implementation=self.implementation,
            aux_bn=self.aux_bn,
        )
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = _constrain(x)
        alpha = self.width_multiplier
        x = conv(
            make_divisible(32 * alpha), (3, 3), strides=self.stem_strides,
            padding=((1, 1), (1, 1)), activation=nn.relu6, name="features_0",
        )(x, mode, use_aux=use_aux)  # fmt: skip
        index = 1
        outputs = []
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                if i == 0 and s == 2:  # the previous resolution ends here
                    outputs.append(x)
                x = InvertedResidual(
                    features=make_divisible(c * alpha),
                    strides=s if i == 0 else 1,
                    expand_ratio=t,
                    conv=conv,
                    name=f"features_{index}",
                )(x, mode, use_aux)
                index += 1
        if features:
            return (*outputs, x)
        last = make_divisible(1280 * max(1.0, alpha))
        x = conv(last, (1, 1), padding="VALID", activation=nn.relu6, name=f"features_{index}")(
            x, mode, use_aux=use_aux
        )
        x = global_avg_pool(_constrain(x))  # [B, C]
        if self.num_classes == 0:
            return x
        # torchvision initialises the classifier with N(0, 0.01).
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.01), HEAD_KERNEL_AXES
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
            name="classifier",
        )(x)


MOBILENET_PRESETS: dict[str, MobileNetV2Config] = {"mobilenet_v2": MobileNetV2Config()}


def _example_image(config: MobileNetV2Config) -> Array:
    del config
    return jnp.linspace(-1.0, 1.0, 2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)


register_presets(
    MobileNetV2.from_config,
    MOBILENET_PRESETS,
    example_input=_example_image,
    doc="torchvision's {name} topology built from ConvBN; kwargs override fields.",
    paper=Paper(
        "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
        arxiv="1801.04381",
        code="https://github.com/pytorch/vision",
    ),
    published_params={"mobilenet_v2": 3_504_872},
    params_source="torchvision.models.mobilenet_v2(num_classes=1000): sum of numel() "
    "(the paper's Table 4 rounds it to 3.4M)",
    tiny={"width_multiplier": 0.25, "num_classes": 10},
)
