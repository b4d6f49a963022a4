"""MCUNet backbones (TinyNAS / ProxylessNAS-style inverted residuals) and MCUNetV2's
receptive-field redistribution for patch-based inference.

Lin, Chen, Lin, Gan, Han, "MCUNetV2: Memory-Efficient Patch-based Inference for Tiny Deep
Learning", https://arxiv.org/abs/2110.15352; Lin et al., "MCUNet: Tiny Deep Learning on IoT
Devices", https://arxiv.org/abs/2007.10319. Official code: mit-han-lab/mcunet
(``mcunet/model_zoo.py``, ``mcunet/tinynas/nn/networks/proxyless_nets.py``,
``mcunet/tinynas/nn/modules/layers.py``).

Topology of the official ``ProxylessNASNets`` as the MCUNet model zoo builds it: a 3×3/2
``first_conv`` (conv, BN, ReLU6), a list of ``MobileInvertedResidualBlock`` s whose
``MBInvertedConvLayer`` is 1×1 expand (BN, ReLU6; absent at expand ratio 1) → k×k depthwise with
the block's stride (BN, ReLU6) → 1×1 linear projection (BN), plus the identity when the stride
is 1 and the width is unchanged; no ``feature_mix_layer``; global average pool and a linear
classifier. Each block has its own depthwise kernel (3, 5 or 7) and expand ratio (the searched
architecture). The hidden width is ``round(in · expand)`` as in ``MBInvertedConvLayer``.

The block lists of ``mcunet-in0`` … ``mcunet-in4`` come from the zoo's net-config json files
(``<url_base>/<net_name>.json``, downloaded by ``build_model``; not in the repository), as
transcribed per block in a public torchvision-style port (``# mcunet-5fps_imagenet.json`` …).
They were checked here against the zoo README: the parameter counts they give (749,840,
636,232, 729,392, 737,408, 1,732,640 at 1000 classes) round to its 0.75M, 0.64M, 0.73M, 0.74M
and 1.73M. The MCUNetV2 presets (``mcunetv2-*``) are not in the public zoo, so none is given.

Deviations: BN epsilon defaults to 1e-5 (torch ``BatchNorm2d``'s and this library's, so
`fold_for_deploy` folds it without arguments); the official builder uses the json's ``bn``
entry and falls back to 1e-3 without one (pass ``epsilon=1e-3`` then, and the same to
`fold_for_deploy`); the classifier dropout of the json is left
out (no parameters). Initialisers follow OFA's ``init_model('he_fout')``: convs N(0, 2/(k²·out)),
the classifier ``U(±1/sqrt(in))`` with zero bias.

Receptive-field redistribution (``redistribute_rf=True``) is MCUNetV2's idea (Sec. 3.2: shrink
the receptive field of the per-patch stage, enlarge it after, so patches overlap less); the
paper's redistributed networks were searched and their configs are not published, so the rule
here is this library's: see `redistribute_receptive_field`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.layers.conv_bn import DEFAULT_EPSILON, ConvBN, resolve_convbn_mode
from jaxblocks.models.mobilenet import make_divisible
from jaxblocks.models.resnet import ACTIVATION_AXES, HEAD_KERNEL_AXES, global_avg_pool
from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = [
    "MCUNET_PRESETS",
    "MBInvertedConv",
    "MCUNet",
    "MCUNetConfig",
    "mcunet_blocks",
    "patch_stage_end",
    "redistribute_receptive_field",
]

# One block: (expand ratio, output channels, depthwise kernel size, stride).
Block = tuple[int, int, int, int]

# BN epsilon: torch's default (the official builder's fallback without a "bn" entry is 1e-3).
MCUNET_BN_EPSILON = DEFAULT_EPSILON

# The smallest and largest depthwise kernels of the TinyNAS search space.
MIN_KERNEL, MAX_KERNEL = 3, 7

MCUNET_IN0: tuple[Block, ...] = (  # mcunet-10fps_imagenet, 48², stem 24
    (1, 16, 3, 1), (4, 16, 5, 2), (3, 16, 3, 1), (4, 16, 3, 1), (5, 24, 7, 2),
    (4, 24, 5, 1), (5, 24, 5, 1), (5, 48, 7, 2), (4, 48, 5, 1), (5, 56, 3, 1),
    (4, 56, 5, 1), (5, 56, 3, 1), (6, 112, 3, 2), (4, 112, 5, 1), (6, 192, 3, 1),
)  # fmt: skip
MCUNET_IN1: tuple[Block, ...] = (  # mcunet-5fps_imagenet, 96², stem 16
    (1, 8, 3, 1), (4, 16, 3, 2), (3, 16, 3, 1), (3, 24, 7, 2), (5, 24, 3, 1),
    (5, 40, 3, 2), (4, 40, 7, 1), (4, 48, 5, 1), (3, 48, 3, 1), (4, 48, 3, 1),
    (5, 96, 7, 2), (4, 96, 5, 1), (4, 96, 5, 1), (6, 160, 3, 1),
)  # fmt: skip
MCUNET_IN2: tuple[Block, ...] = (  # mcunet-256kb-1mb_imagenet, 160², stem 16
    (1, 8, 3, 1), (3, 16, 5, 2), (6, 16, 7, 1), (5, 16, 3, 1), (5, 16, 5, 1),
    (5, 24, 3, 2), (6, 24, 7, 1), (6, 24, 5, 1), (4, 40, 7, 2), (5, 40, 5, 1),
    (5, 48, 3, 1), (5, 48, 5, 1), (4, 48, 3, 1), (6, 96, 5, 2), (4, 96, 5, 1),
    (3, 96, 5, 1), (4, 96, 3, 1), (5, 160, 5, 1),
)  # fmt: skip
MCUNET_IN3: tuple[Block, ...] = (  # mcunet-320kb-1mb_imagenet, 176², stem 16
    (1, 8, 3, 1), (3, 16, 7, 2), (5, 16, 3, 1), (5, 16, 7, 1), (4, 16, 5, 1),
    (5, 24, 5, 2), (5, 24, 5, 1), (5, 24, 5, 1), (5, 40, 3, 2), (6, 40, 7, 1),
    (4, 40, 5, 1), (5, 48, 5, 1), (5, 48, 7, 1), (5, 48, 3, 1), (6, 96, 3, 2),
    (5, 96, 7, 1), (4, 96, 3, 1), (5, 160, 7, 1),
)  # fmt: skip
MCUNET_IN4: tuple[Block, ...] = (  # mcunet-512kb-2mb_imagenet, 160², stem 32
    (1, 16, 3, 1), (3, 24, 7, 2), (5, 24, 3, 1), (4, 24, 5, 1), (5, 40, 7, 2),
    (4, 40, 3, 1), (4, 40, 7, 1), (3, 80, 7, 2), (3, 80, 3, 1), (3, 80, 7, 1),
    (4, 96, 3, 1), (3, 96, 5, 1), (3, 96, 5, 1), (4, 192, 7, 2), (3, 192, 7, 1),
    (3, 192, 5, 1), (4, 320, 5, 1),
)  # fmt: skip


def _check_blocks(blocks: Any, patch_stride: int, stem_strides: int = 2) -> None:
    """ValueError unless ``blocks`` is a non-empty sequence of valid ``Block`` s."""
    if not isinstance(blocks, Sequence) or not blocks:
        raise ValueError(f"MCUNet: blocks must be a non-empty sequence of (expand, channels, "
                         f"kernel, stride) tuples, got {blocks!r}")  # fmt: skip
    for i, b in enumerate(blocks):
        if (
            not isinstance(b, Sequence)
            or len(b) != 4
            or not all(isinstance(v, int) and v >= 1 for v in b)
            or b[2] % 2 == 0
            or b[3] not in (1, 2)
        ):
            raise ValueError(
                f"MCUNet: blocks[{i}] must be (expand >= 1, channels >= 1, odd kernel, stride 1 "
                f"or 2) ints, got {b!r}"
            )
    total = stem_strides * math.prod(b[3] for b in blocks)
    if (
        not isinstance(patch_stride, int)
        or patch_stride < stem_strides
        or patch_stride & (patch_stride - 1)
        or patch_stride >= total
    ):
        raise ValueError(
            f"MCUNet: patch_stride must be a power of 2 from the stem's stride {stem_strides} to "
            f"below the network's total stride {total}, got {patch_stride!r}"
        )


def _patch_blocks(blocks: Sequence[Block], patch_stride: int, stem_strides: int = 2) -> int:
    """How many leading blocks end at a cumulative stride <= ``patch_stride``."""
    stride, n = stem_strides, 0
    for b in blocks:
        if stride * b[3] > patch_stride:
            break
        stride *= b[3]
        n += 1
    return n


def redistribute_receptive_field(
    blocks: Sequence[Block], patch_stride: int = 8, stem_strides: int = 2
) -> tuple[Block, ...]:
    """MCUNetV2's receptive-field redistribution (https://arxiv.org/abs/2110.15352, Sec. 3.2)
    of a block list, by this library's rule (the paper's searched ``*-rd`` nets are unpublished).

    The per-patch stage is every block ending at a cumulative stride <= ``patch_stride``. In
    it: every depthwise kernel becomes 3×3 (the search space's smallest), and each resolution
    keeps its first block plus at most one stride-1 block (fewer blocks). The removed blocks
    move, in order, with their expand ratios and a 7×7 kernel (the largest), to just after the
    first block past the patch stage, at that block's width: the receptive field the patch
    stage gives up is added back at a resolution where it costs no patch overlap.

    Example:
      >>> redistribute_receptive_field(((1, 8, 7, 1), (4, 16, 5, 2), (3, 16, 7, 1),
      ...                                (3, 16, 5, 1), (3, 24, 3, 2), (3, 24, 3, 1)), 4)
      ((1, 8, 3, 1), (4, 16, 3, 2), (3, 16, 3, 1), (3, 24, 3, 2), (3, 24, 7, 1), (3, 24, 3, 1))
    """
    _check_blocks(blocks, patch_stride, stem_strides)
    n = _patch_blocks(blocks, patch_stride, stem_strides)
    kept: list[Block] = []
    moved: list[Block] = []
    repeats = 0
    for e, c, _, s in blocks[:n]:
        if s == 1 and kept and repeats >= 1:
            moved.append((e, c, MAX_KERNEL, 1))
            continue
        repeats = 0 if s == 2 or not kept else repeats + 1
        kept.append((e, c, MIN_KERNEL, s))
    rest = [tuple(b) for b in blocks[n:]]
    first = rest[0]
    moved = [(e, first[1], k, 1) for e, _, k, _ in moved]
    return (*kept, first, *moved, *rest[1:])  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class MCUNetConfig:
    """Architecture of an `MCUNet`.

    Attributes:
      blocks: per block (expand ratio, output channels, depthwise kernel, stride), as in the
        official net configs.
      stem_features: output channels of the 3×3/2 ``first_conv``.
      num_classes: classifier outputs; 0 returns the pooled features.
      width_multiplier: scales every layer's channels (rounded to multiples of 8; 1.0 keeps the
        searched widths exactly).
      resolution: the preset's published input resolution (informational; any size works).
      redistribute_rf: apply `redistribute_receptive_field` to ``blocks``.
      patch_stride: cumulative stride where the per-patch stage ends (`patch_stage_end`).
      epsilon: BatchNorm epsilon.
    """

    blocks: tuple[Block, ...] = MCUNET_IN1
    stem_features: int = 16
    num_classes: int = 1000
    width_multiplier: float = 1.0
    resolution: int = 96
    redistribute_rf: bool = False
    patch_stride: int = 8
    epsilon: float = MCUNET_BN_EPSILON

    def __post_init__(self):
        _check_blocks(self.blocks, self.patch_stride)
        if self.width_multiplier <= 0:
            raise ValueError(f"MCUNetConfig: width_multiplier must be > 0, got "
                             f"{self.width_multiplier!r}")  # fmt: skip


def mcunet_blocks(config: Any) -> tuple[Block, ...]:
    """The block list a config (or `MCUNet`) builds: redistributed if ``redistribute_rf``."""
    blocks = tuple(tuple(b) for b in config.blocks)
    if config.redistribute_rf:
        return redistribute_receptive_field(blocks, config.patch_stride)
    return blocks  # type: ignore[return-value]


def patch_stage_end(config: Any) -> str:
    """Name of the top-level child that ends the per-patch stage of a config or `MCUNet`: pass
    it as ``until=`` to `jaxblocks.analysis.patch_inference.patch_apply`."""
    n = _patch_blocks(mcunet_blocks(config), config.patch_stride)
    return f"blocks_{n - 1}" if n else "first_conv"


# OFA's init_model("he_fout"): convs N(0, 2 / (kh * kw * out)) (untruncated, as torch's normal_);
# the classifier U(+-1/sqrt(in)) = variance scaling 1/3 over fan_in, uniform.
he_fout = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
classifier_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class MBInvertedConv(nn.Module):
    """MCUNet / ProxylessNAS inverted residual (https://arxiv.org/abs/2110.15352) with its own
    depthwise kernel size: 1×1 expand (ReLU6) → k×k depthwise (ReLU6, stride) → 1×1 linear
    (+ input when the stride is 1 and the width unchanged).

    Differs from `jaxblocks.models.mobilenet.InvertedResidual` in the searched kernel size
    (3/5/7, padded by k//2) and the official layer names (``inverted_bottleneck``,
    ``depth_conv``, ``point_linear``).

    Attributes:
      features: output channels.
      kernel_size: depthwise kernel (odd).
      strides: depthwise stride.
      expand_ratio: hidden width / input width (1: no expansion layer).
      conv: the `ConvBN` factory (dtype, initialisers, epsilon bound).
    """

    features: int
    kernel_size: int = 3
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
            y = self.conv(
                hidden, (1, 1), padding="VALID", activation=nn.relu6, name="inverted_bottleneck"
            )(y, mode, use_aux=use_aux)
        p = self.kernel_size // 2
        y = self.conv(
            hidden, (self.kernel_size,) * 2, strides=self.strides, padding=((p, p), (p, p)),
            feature_group_count=hidden, activation=nn.relu6, name="depth_conv",
        )(y, mode, use_aux=use_aux)  # fmt: skip
        residual = x if self.strides == 1 and in_features == self.features else None
        y = self.conv(self.features, (1, 1), padding="VALID", name="point_linear")(
            y, mode, residual=residual, use_aux=use_aux
        )
        return _constrain(y)


class MCUNet(nn.Module):
    """MCUNet backbone (https://arxiv.org/abs/2007.10319, MCUNetV2:
    https://arxiv.org/abs/2110.15352): TinyNAS-searched inverted residuals with per-block
    kernel sizes and expand ratios, built from `ConvBN`.

    Differs from `jaxblocks.models.mobilenet.MobileNetV2` in its searched block list (kernels 3,
    5 or 7, expand ratios 1–6, no final 1×1 conv) and in ``redistribute_rf``, which builds the
    MCUNetV2-style redistributed network (small receptive field in the per-patch stage ending
    at ``patch_stride``, large after it; `redistribute_receptive_field`) for patch-based
    inference (`jaxblocks.analysis.patch_inference.patch_apply` with
    ``until=patch_stage_end(model)``). ConvBN modes resolve as in `MobileNetV2` (``mode`` /
    ``train`` call arguments, context, attribute).

    Attributes:
      blocks, stem_features, num_classes, width_multiplier, resolution, redistribute_rf,
        patch_stride, epsilon: see `MCUNetConfig`.
      mode: default ConvBN mode of every layer (None: decided per call).
      dtype: compute dtype (None: the input's, integers promoted to float32); param_dtype:
        parameter storage dtype.
      implementation: kernel implementation passed to every `ConvBN` (None: automatic).
      aux_bn: give every `ConvBN` an auxiliary BatchNorm (see `MobileNetV2`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxblocks.registry import create_model
      >>> model = create_model("mcunet_in1", num_classes=10, width_multiplier=0.25)
      >>> x = jax.random.normal(jax.random.key(0), (1, 48, 48, 3))
      >>> variables = model.init(jax.random.key(1), x, train=False)
      >>> model.apply(variables, x, train=False).shape
      (1, 10)
      >>> patch_stage_end(model)
      'blocks_4'
    """

    blocks: tuple[Block, ...] = MCUNET_IN1
    stem_features: int = 16
    num_classes: int = 1000
    width_multiplier: float = 1.0
    resolution: int = 96
    redistribute_rf: bool = False
    patch_stride: int = 8
    epsilon: float = MCUNET_BN_EPSILON
    mode: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    aux_bn: bool = False

    # Build from an `MCUNetConfig`; kwargs override config fields and module attributes.
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
          mode, train, use_aux: ConvBN mode selection, as in `MobileNetV2`.
          features: return the last block's output at each resolution instead (strides 2, 4,
            8, 16, 32), the classifier unused.
        """
        mode = resolve_convbn_mode(self, mode, train)
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"MCUNet: x must be NHWC [batch, height, width, channels], got "
                             f"shape {getattr(x, 'shape', None)}")  # fmt: skip
        if not jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.complexfloating):
            raise ValueError(f"MCUNet: x must be real images, got dtype {x.dtype}")
        if self.width_multiplier <= 0:
            raise ValueError(f"MCUNet: width_multiplier must be > 0, got {self.width_multiplier!r}")
        blocks = mcunet_blocks(self)  # validates blocks and patch_stride
        conv = functools.partial(
            ConvBN,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=he_fout,
            epsilon=self.epsilon,
            implementation=self.implementation,
            aux_bn=self.aux_bn,
        )
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        x = _constrain(x)
        alpha = self.width_multiplier
        x = conv(
            make_divisible(self.stem_features * alpha), (3, 3), strides=2,
            padding=((1, 1), (1, 1)), activation=nn.relu6, name="first_conv",
        )(x, mode, use_aux=use_aux)  # fmt: skip
        outputs = []
        for i, (e, c, k, s) in enumerate(blocks):
            if s == 2:  # the previous resolution ends here
                outputs.append(x)
            x = MBInvertedConv(
                features=make_divisible(c * alpha),
                kernel_size=k,
                strides=s,
                expand_ratio=e,
                conv=conv,
                name=f"blocks_{i}",
            )(x, mode, use_aux)
        if features:
            return (*outputs, x)
        x = global_avg_pool(x)  # [B, C]
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(classifier_init, HEAD_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
            name="classifier",
        )(x)


MCUNET_PRESETS: dict[str, MCUNetConfig] = {
    "mcunet_in0": MCUNetConfig(MCUNET_IN0, stem_features=24, resolution=48),
    "mcunet_in1": MCUNetConfig(MCUNET_IN1, stem_features=16, resolution=96),
    "mcunet_in2": MCUNetConfig(MCUNET_IN2, stem_features=16, resolution=160),
    "mcunet_in3": MCUNetConfig(MCUNET_IN3, stem_features=16, resolution=176),
    "mcunet_in4": MCUNetConfig(MCUNET_IN4, stem_features=32, resolution=160),
}


def _example_image(config: MCUNetConfig) -> Array:
    del config
    return jnp.linspace(-1.0, 1.0, 2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)


register_presets(
    MCUNet.from_config,
    MCUNET_PRESETS,
    example_input=_example_image,
    doc="MCUNet model-zoo net {name} (mit-han-lab/mcunet) built from ConvBN; kwargs override "
    "fields (redistribute_rf=True: MCUNetV2-style receptive-field redistribution).",
    paper=Paper(
        "MCUNetV2: Memory-Efficient Patch-based Inference for Tiny Deep Learning",
        arxiv="2110.15352",
        code="https://github.com/mit-han-lab/mcunet",
    ),
    published_params={
        "mcunet_in0": 750_000,
        "mcunet_in1": 640_000,
        "mcunet_in2": 730_000,
        "mcunet_in3": 740_000,
        "mcunet_in4": 1_730_000,
    },
    params_source="mit-han-lab/mcunet README model zoo table (#Params 0.75M, 0.64M, 0.73M, "
    "0.74M, 1.73M, rounded to 0.01M; exact counts of these block lists: 749,840, 636,232, "
    "729,392, 737,408, 1,732,640)",
    params_rtol=0.01,
    tiny={"width_multiplier": 0.25, "num_classes": 10},
)
