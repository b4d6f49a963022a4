"""ResNet-18/34/50 built from `ConvBN`, so every ConvBN mode (train/eval/tune/deploy) works.

He et al., "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385;
the ConvBN modes are from You et al., "Efficient ConvBN Blocks for Transfer Learning and Beyond",
https://arxiv.org/abs/2305.11624.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.layers.conv_bn import ConvBN, active_convbn_mode
from jaxblocks.registry import register_model

# Logical axis names of NHWC activations and of the classifier; the trainer maps them to mesh axes.
ACTIVATION_AXES = ("batch", "height", "width", "channels")
HEAD_KERNEL_AXES = ("channels", "classes")
STEMS = ("imagenet", "small")
BLOCKS = ("basic", "bottleneck")

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every conv.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _same_pad(kernel: int, ndim: int = 2) -> tuple[tuple[int, int], ...]:
    """Symmetric PyTorch-style padding ``(k-1)//2`` (differs from "SAME" at stride 2)."""
    p = (kernel - 1) // 2
    return ((p, p),) * ndim


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


def module_kwargs(config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A frozen config dataclass plus overrides -> a model's constructor kwargs.

    ``kwargs`` naming config fields override them; the rest are passed on as module attributes.
    """
    fields = {f.name for f in dataclasses.fields(config)}
    config = dataclasses.replace(config, **{k: v for k, v in kwargs.items() if k in fields})
    rest = {k: v for k, v in kwargs.items() if k not in fields}
    return {**dataclasses.asdict(config), **rest}


def resolve_call_mode(mode: str | None, train: bool | None, default: str | None) -> str | None:
    """The ConvBN mode a model passes to its layers' calls (None: let each layer resolve it).

    ``mode`` wins; else Flax-style ``train=True`` means "train", and ``train=False`` means the
    active `convbn_mode` context or the model's ``default`` when that is a running-statistics
    mode (eval/tune/deploy), otherwise "eval". With neither, the layers resolve it themselves
    (call argument, then context, then attribute).
    """
    if mode is not None or train is None:
        return mode
    if train:
        return "train"
    resolved = active_convbn_mode() or default
    return resolved if resolved not in (None, "train") else "eval"


def global_avg_pool(x: Float[Array, "B H W C"]) -> Float[Array, "B C"]:
    """Mean over the spatial axes, accumulated in fp32 and cast back."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


class BasicBlock(nn.Module):
    """Two 3x3 ConvBNs with an identity (or 1x1 ConvBN) shortcut: ResNet-18/34 (expansion 1)."""

    features: int
    strides: int = 1
    zero_init_residual: bool = False
    conv: Callable[..., nn.Module] = ConvBN

    expansion = 1

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], mode: str | None = None, use_aux: bool = False
    ) -> Array:
        out_features = self.features * self.expansion
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.conv(
            self.features, (3, 3), strides=self.strides, padding=_same_pad(3),
            activation=nn.relu, name="conv1",
        )(x, mode, use_aux=use_aux)  # fmt: skip
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = self.conv(
                out_features, (1, 1), strides=self.strides, padding="VALID", name="downsample"
            )(x, mode, use_aux=use_aux)
        # The layer adds the shortcut before its ReLU, so tune mode keeps one tensor for both.
        y = self.conv(
            out_features, (3, 3), padding=_same_pad(3), activation=nn.relu,
            scale_init=last_scale, name="conv2",
        )(y, mode, residual=shortcut, use_aux=use_aux)  # fmt: skip
        return _constrain(y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, torchvision "v1.5"), 1x1 expand x4: ResNet-50."""

    features: int
    strides: int = 1
    zero_init_residual: bool = False
    conv: Callable[..., nn.Module] = ConvBN

    expansion = 4

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], mode: str | None = None, use_aux: bool = False
    ) -> Array:
        out_features = self.features * self.expansion
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.conv(self.features, (1, 1), padding="VALID", activation=nn.relu, name="conv1")(
            x, mode, use_aux=use_aux
        )
        y = self.conv(
            self.features, (3, 3), strides=self.strides, padding=_same_pad(3),
            activation=nn.relu, name="conv2",
        )(y, mode, use_aux=use_aux)  # fmt: skip
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = self.conv(
                out_features, (1, 1), strides=self.strides, padding="VALID", name="downsample"
            )(x, mode, use_aux=use_aux)
        y = self.conv(
            out_features, (1, 1), padding="VALID", activation=nn.relu, scale_init=last_scale,
            name="conv3",
        )(y, mode, residual=shortcut, use_aux=use_aux)  # fmt: skip
        return _constrain(y)


_BLOCK_CLASSES: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Architecture of a `ResNet`; the presets below are torchvision's ResNet-18/34/50.

    Attributes:
      stage_sizes: residual blocks per stage.
      block: ``"basic"`` (two 3x3) or ``"bottleneck"`` (1x1-3x3-1x1, expansion 4).
      num_classes: classifier outputs; 0 returns the pooled features.
      width: base channels (64 in the paper); stage i has ``width * 2**i`` (times 4 at the
        bottleneck output).
      stem: ``"imagenet"`` (7x7 stride-2 ConvBN + 3x3 stride-2 max-pool) or ``"small"``
        (3x3 stride-1 ConvBN, no pool) for tiny images such as CIFAR or upsampled digits.
      zero_init_residual: start the last BN scale of every residual branch at 0, so each block
        begins as the identity (Goyal et al.; torchvision's ``zero_init_residual``).
    """

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    block: str = "bottleneck"
    num_classes: int = 1000
    width: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False


RESNET_PRESETS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": ResNetConfig(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": ResNetConfig(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
}


class ResNet(nn.Module):
    """ResNet (https://arxiv.org/abs/1512.03385) whose every conv is a `ConvBN`.

    Every conv+BN pair is one `ConvBN` (https://arxiv.org/abs/2305.11624), so the whole model
    switches between train (batch statistics), eval (running statistics), tune (BN folded into
    the conv on the fly, eval-exact with less memory) and deploy (folded variables from
    `fold_for_deploy`). Precedence: the ``mode`` call argument, then
    ``with convbn_mode("tune"): model.apply(...)``, then the ``mode`` attribute
    (``train=True/False`` is accepted as well, for Flax-style trainers). Each residual add
    happens inside the block's last `ConvBN`, before its ReLU, so tune mode keeps one tensor for
    both. Topology and parameter names follow torchvision (``conv1``, ``layer1_0/conv1``,
    ``fc``): ResNet-18/34/50 at 1000 classes have exactly torchvision's parameter counts.
    Padding is PyTorch's symmetric ``(k-1)//2``, not "SAME".

    Attributes:
      stage_sizes, block, num_classes, width, stem, zero_init_residual: see `ResNetConfig`.
      mode: default ConvBN mode of every layer (None: the `convbn_mode` context, else "train").
      dtype: compute dtype (None: the input's); BN statistics and folds stay fp32 in `ConvBN`.
      param_dtype: parameter storage dtype.
      implementation: kernel implementation passed to every `ConvBN` (None: automatic).
      aux_bn: give every `ConvBN` an auxiliary BatchNorm, selected per call with
        ``use_aux=True`` (ConAdv's adversarial inputs; `fold_for_deploy` drops it).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ResNet(stage_sizes=(2, 2, 2, 2), block="basic", num_classes=10, width=16,
      ...                stem="small")
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> logits, updates = model.apply(variables, x, mutable=["batch_stats"])  # train mode
      >>> logits.shape
      (2, 10)
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
    num_classes: int = 1000
    width: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False
    mode: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    aux_bn: bool = False

    @classmethod
    def from_config(cls, config: ResNetConfig, **kwargs: Any) -> ResNet:
        """Build from a `ResNetConfig`; ``kwargs`` override config fields and module attributes."""
        return cls(**module_kwargs(config, kwargs))

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        mode: str | None = None,
        *,
        train: bool | None = None,
        use_aux: bool = False,
    ) -> Float[Array, "B classes"]:
        """Logits ``[B, num_classes]`` (pooled features if ``num_classes == 0``).

        Args:
          x: NHWC images.
          mode: ConvBN mode for every layer of this call (wins over context and attribute).
          train: Flax-style alternative to ``mode`` (see `resolve_call_mode`).
          use_aux: normalise with every layer's auxiliary BatchNorm (adversarial inputs in
            ConAdv / AdvProp); needs ``aux_bn=True``.
        """
        mode = resolve_call_mode(mode, train, self.mode)
        if x.ndim != 4:
            raise ValueError(
                f"ResNet: x must be NHWC [batch, height, width, channels], got shape {x.shape}"
            )
        if self.stem not in STEMS:
            raise ValueError(f"ResNet: stem must be one of {STEMS}, got {self.stem!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet: block must be one of {BLOCKS}, got {self.block!r}")
        conv = functools.partial(
            ConvBN,
            mode=self.mode,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
            implementation=self.implementation,
            aux_bn=self.aux_bn,
        )
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = _constrain(x)
        if self.stem == "imagenet":
            x = conv(self.width, (7, 7), strides=2, padding=_same_pad(7), activation=nn.relu,
                     name="conv1")(x, mode, use_aux=use_aux)  # fmt: skip
            # Flax pads max-pool windows with -inf, as PyTorch does.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(self.width, (3, 3), padding=_same_pad(3), activation=nn.relu, name="conv1")(
                x, mode, use_aux=use_aux
            )
        x = _constrain(x)
        block_cls = _BLOCK_CLASSES[self.block]
        for i, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                x = block_cls(
                    features=self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    conv=conv,
                    name=f"layer{i + 1}_{j}",
                )(x, mode, use_aux)
        x = global_avg_pool(x)  # [B, C]
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), HEAD_KERNEL_AXES
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
            name="fc",
        )(x)


def _example_image() -> Array:
    return jnp.linspace(-1.0, 1.0, 2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)


def _factory(name: str) -> Callable[..., ResNet]:
    def make(**kwargs: Any) -> ResNet:
        return ResNet.from_config(RESNET_PRESETS[name], **kwargs)

    make.__name__ = name
    make.__doc__ = f"torchvision's {name} topology built from ConvBN; kwargs override fields."
    return make


resnet18 = register_model("resnet18", example_input=_example_image)(_factory("resnet18"))
resnet34 = register_model("resnet34", example_input=_example_image)(_factory("resnet34"))
resnet50 = register_model("resnet50", example_input=_example_image)(_factory("resnet50"))
