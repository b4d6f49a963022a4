"""ResNet-18/34/50 built from `ConvBN`, so every ConvBN mode (train/eval/tune/deploy) works.

He et al., "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385;
the ConvBN modes are from You et al., "Efficient ConvBN Blocks for Transfer Learning and Beyond",
https://arxiv.org/abs/2305.11624.

``norm=`` swaps the normalization of every conv for the papers' alternatives (`NORMS`): Ghost
BatchNorm (Hoffer et al., https://arxiv.org/abs/1705.08741), EvoNorm-B0/S0 (Liu et al.,
https://arxiv.org/abs/2004.02967), GroupNorm or Batch-Channel Normalization after Weight
Standardization (Qiao et al., https://arxiv.org/abs/1903.10520). Registered as
``resnet18_ghost_bn``, ``resnet50_evonorm_b0``, ``resnet50_evonorm_s0``, ``resnet50_gn_ws`` and
``resnet50_bcn_ws``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.layers.conv_bn import CONV_AXES, ConvBN, compute_dtype, resolve_convbn_mode
from jaxblocks.layers.norm import (
    BatchChannelNorm,
    EvoNormB0,
    EvoNormS0,
    GhostBatchNorm,
    WSConv,
)
from jaxblocks.registry import Paper, config_fields_module, register_presets

# Logical axis names of NHWC activations and of the classifier; the trainer maps them to mesh axes.
ACTIVATION_AXES = ("batch", "height", "width", "channels")
HEAD_KERNEL_AXES = ("channels", "classes")
STEMS = ("imagenet", "small")
BLOCKS = ("basic", "bottleneck")
# The normalizations `ResNet(norm=...)` takes; those with running statistics (batch_stats) use
# the ConvBN mode (train: batch statistics; eval/tune: running ones), the others ignore it.
NORMS = ("batch", "ghost_batch", "evonorm_b0", "evonorm_s0", "group_ws", "bcn_ws")
NORMS_WITH_RUNNING_STATS = ("batch", "ghost_batch", "evonorm_b0", "bcn_ws")

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every conv.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _same_pad(kernel: int, ndim: int = 2) -> tuple[tuple[int, int], ...]:
    """Symmetric PyTorch-style padding ``(k-1)//2`` (differs from "SAME" at stride 2)."""
    p = (kernel - 1) // 2
    return ((p, p),) * ndim


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


def global_avg_pool(x: Float[Array, "B H W C"]) -> Float[Array, "B C"]:
    """Mean over the spatial axes, accumulated in fp32 and cast back."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def _largest_divisor_at_most(n: int, k: int) -> int:
    return next(d for d in range(min(n, k), 0, -1) if n % d == 0)


class ConvNorm(nn.Module):
    """A bias-free conv, one of `ResNet`'s non-ConvBN norms and the activation, called as `ConvBN`.

    ``norm`` (see `ResNet`): ``"ghost_batch"`` conv → `GhostBatchNorm`; ``"evonorm_b0"`` /
    ``"evonorm_s0"`` conv → EvoNorm, which *replaces* norm + ReLU (layers without an activation,
    and the last one of a residual branch, use its affine-only form; the ReLU after the residual
    add stays, as in the official tensorflow/tpu ResNet); ``"group_ws"`` `WSConv` → GroupNorm;
    ``"bcn_ws"`` `WSConv` → `BatchChannelNorm`. The call takes the resolved ConvBN ``mode``:
    ``"train"`` normalizes with batch statistics, ``"eval"``/``"tune"`` with the running ones.

    Variables: ``conv/kernel`` and the norm's under ``norm``.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int = 1
    padding: Any = "SAME"
    activation: Callable | None = None
    norm: str = "ghost_batch"
    ghost_batch_size: int = 128
    norm_groups: int = 32
    scale_init: Callable[..., Any] = nn.initializers.ones
    kernel_init: Callable[..., Any] = conv_kernel_init
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        mode: str | None = None,
        *,
        residual: Array | None = None,
        use_aux: bool = False,
    ) -> Array:
        if use_aux:
            raise ValueError(f"ConvNorm: use_aux=True needs norm='batch', got norm={self.norm!r}")
        if self.norm in NORMS_WITH_RUNNING_STATS and mode == "deploy":
            raise ValueError(
                f"ConvNorm: mode='deploy' folds ConvBN layers (norm='batch'); with "
                f"norm={self.norm!r} use mode='eval'"
            )
        ura = mode != "train"
        dtype = compute_dtype(self.dtype, x)
        n = len(self.kernel_size)
        conv_cls = WSConv if self.norm in ("group_ws", "bcn_ws") else nn.Conv
        y = conv_cls(
            self.features,
            tuple(self.kernel_size),
            strides=self.strides,
            padding=self.padding,
            use_bias=False,
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, (None,) * n + CONV_AXES),
            name="conv",
        )(x)
        act = self.activation
        kw = dict(dtype=dtype, param_dtype=self.param_dtype, name="norm")
        groups = _largest_divisor_at_most(self.features, self.norm_groups)
        if self.norm == "ghost_batch":
            # momentum 0.9 (PyTorch's 0.1), as every ConvBN here: ghost >= batch is norm="batch".
            norm = GhostBatchNorm(
                self.ghost_batch_size, momentum=0.9, scale_init=self.scale_init, **kw
            )
            y = norm(y, use_running_average=ura)
        elif self.norm in ("evonorm_b0", "evonorm_s0"):
            fused = act is not None and residual is None  # EvoNorm replaces norm + activation
            if self.norm == "evonorm_b0":
                y = EvoNormB0(apply_act=fused, scale_init=self.scale_init, **kw)(
                    y, use_running_average=ura
                )
            else:
                y = EvoNormS0(groups=self.norm_groups, apply_act=fused, scale_init=self.scale_init,
                              **kw)(y)  # fmt: skip
            act = None if fused else act
        elif self.norm == "group_ws":
            y = nn.GroupNorm(num_groups=groups, epsilon=1e-5, scale_init=self.scale_init, **kw)(y)
        else:  # bcn_ws
            y = BatchChannelNorm(num_groups=groups, **kw)(y, use_running_average=ura)
        if residual is not None:
            y = y + residual.astype(y.dtype)
        return act(y) if act is not None else y


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
      norm: the normalization after every conv, one of `NORMS` (see `ResNet`); ``"batch"``
        (default) is `ConvBN`.
      ghost_batch_size: samples per ghost batch (``norm="ghost_batch"``); 128 is the default
        of the paper's code (eladhoffer/bigBatch ``main_gbn.py``).
      norm_groups: channel groups of EvoNorm-S0, GroupNorm and BCN (32 in the papers; reduced
        to the largest divisor of the channels at most this).
    """

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    block: str = "bottleneck"
    num_classes: int = 1000
    width: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False
    norm: str = "batch"
    ghost_batch_size: int = 128
    norm_groups: int = 32


_R18 = ResNetConfig(stage_sizes=(2, 2, 2, 2), block="basic")
_R50 = ResNetConfig(stage_sizes=(3, 4, 6, 3), block="bottleneck")

# Registry name -> architecture. Parameter counts at 1000 classes (tests/models assert them):
# resnet18 11,689,512, resnet34 21,797,672 and resnet50 25,557,032 are torchvision's.
RESNET_PRESETS: dict[str, ResNetConfig] = {
    "resnet18": _R18,
    "resnet34": ResNetConfig(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": _R50,
    # Hoffer, Hubara, Soudry, "Train longer, generalize better: closing the generalization gap
    # in large batch training of neural networks", arXiv 1705.08741: Ghost BN (ghost batches of
    # 128). Same parameters as resnet18: 11,689,512.
    "resnet18_ghost_bn": dataclasses.replace(_R18, norm="ghost_batch"),
    # Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", arXiv 2004.02967.
    # EvoNorm replaces every BN+ReLU (one more per-channel vector v in each of the 33 layers
    # with a ReLU: 64 + 2 * (3*64 + 4*128 + 6*256 + 3*512) = 7,616), so 25,557,032 + 7,616 =
    # 25,564,648 parameters for both.
    "resnet50_evonorm_b0": dataclasses.replace(_R50, norm="evonorm_b0"),
    "resnet50_evonorm_s0": dataclasses.replace(_R50, norm="evonorm_s0"),
    # Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with Batch-Channel Normalization and
    # Weight Standardization", arXiv 1903.10520. GroupNorm (32 groups) after WS convs: a
    # per-channel scale and bias like BN, so 25,557,032 parameters.
    "resnet50_gn_ws": dataclasses.replace(_R50, norm="group_ws"),
    # Same paper, BCN after WS convs: BN's per-channel affine plus a per-group (32) affine in
    # each of the 53 norm layers: 25,557,032 + 53 * 2 * 32 = 25,560,424 parameters.
    "resnet50_bcn_ws": dataclasses.replace(_R50, norm="bcn_ws"),
}


class ResNet(nn.Module):
    """ResNet (https://arxiv.org/abs/1512.03385) whose every conv is a `ConvBN`.

    Every conv+BN pair is one `ConvBN` (https://arxiv.org/abs/2305.11624), so the whole model
    switches between train (batch statistics), eval (running statistics), tune (BN folded into
    the conv on the fly, eval-exact with less memory) and deploy (folded variables from
    `fold_for_deploy`). The model resolves the mode once, with `resolve_convbn_mode`, and
    passes it to every layer; first match wins:

    1. the ``mode`` call argument;
    2. ``train=True`` ("train") / ``train=False`` (the `convbn_mode` context or the ``mode``
       attribute when it is eval/tune/deploy, otherwise "eval"), for Flax-style trainers;
    3. ``with convbn_mode("tune"): model.apply(...)`` (the innermost context);
    4. the ``mode`` attribute;
    5. none of these: "train" when applied with ``mutable=["batch_stats"]`` (and in ``init``),
       otherwise a ValueError (as ``flax.linen.BatchNorm``): pass ``mode="eval"`` /
       ``train=False`` to evaluate.

    Each residual add happens inside the block's last `ConvBN`, before its ReLU, so tune mode
    keeps one tensor for both. Topology and parameter names follow torchvision (``conv1``,
    ``layer1_0/conv1``, ``fc``): ResNet-18/34/50 at 1000 classes have exactly torchvision's
    parameter counts. Padding is PyTorch's symmetric ``(k-1)//2``, not "SAME". Integer images
    are promoted to float32 (unless ``dtype`` is set), as ``flax.linen.Conv`` does.

    ``norm`` other than ``"batch"`` replaces every ConvBN by a `ConvNorm` (conv, then the
    norm): ``"ghost_batch"`` (Ghost BN, arXiv 1705.08741; ``ghost_batch_size``),
    ``"evonorm_b0"`` / ``"evonorm_s0"`` (EvoNorm replaces BN+ReLU, arXiv 2004.02967),
    ``"group_ws"`` / ``"bcn_ws"`` (Weight-Standardized convs with GroupNorm or Batch-Channel
    Normalization, arXiv 1903.10520). Norms with running statistics (ghost_batch, evonorm_b0,
    bcn_ws) follow the same mode precedence, with tune computing eval (there is no fold) and
    deploy unavailable; evonorm_s0 and group_ws have no state and ignore the mode.

    Attributes:
      stage_sizes, block, num_classes, width, stem, zero_init_residual, norm,
        ghost_batch_size, norm_groups: see `ResNetConfig`.
      mode: default ConvBN mode of every layer (None: decided per call, see above).
      dtype: compute dtype (None: the input's, integers promoted to float32); BN statistics
        and folds stay fp32 in `ConvBN`.
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
    norm: str = "batch"
    ghost_batch_size: int = 128
    norm_groups: int = 32
    mode: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str | None = None
    aux_bn: bool = False

    # Build from a `ResNetConfig`; kwargs override config fields and module attributes.
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
          use_aux: normalise with every layer's auxiliary BatchNorm (adversarial inputs in
            ConAdv / AdvProp); needs ``aux_bn=True``.
          features: return the four stages' outputs (strides 4, 8, 16, 32 with the ImageNet
            stem) instead, the head unused (timm's ``features_only``).
        """
        if self.norm not in NORMS:
            raise ValueError(f"ResNet: norm must be one of {NORMS}, got {self.norm!r}")
        stateful = self.norm in NORMS_WITH_RUNNING_STATS
        if stateful or mode is not None or train is not None:
            mode = resolve_convbn_mode(self, mode, train)
        if x.ndim != 4:
            raise ValueError(
                f"ResNet: x must be NHWC [batch, height, width, channels], got shape {x.shape}"
            )
        if self.stem not in STEMS:
            raise ValueError(f"ResNet: stem must be one of {STEMS}, got {self.stem!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet: block must be one of {BLOCKS}, got {self.block!r}")
        if self.norm == "batch":
            conv = functools.partial(
                ConvBN,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=conv_kernel_init,
                implementation=self.implementation,
                aux_bn=self.aux_bn,
            )
        else:
            if self.aux_bn:
                raise ValueError(f"ResNet: aux_bn=True needs norm='batch', got {self.norm!r}")
            if self.norm == "bcn_ws" and self.zero_init_residual:
                raise ValueError(
                    "ResNet: zero_init_residual=True is not available with norm='bcn_ws' "
                    "(BatchChannelNorm has no scale_init)"
                )
            if (
                stateful
                and mode == "train"
                and not self.is_initializing()
                and not self.is_mutable_collection("batch_stats")
            ):
                raise ValueError(
                    f"ResNet: mode='train' with norm={self.norm!r} updates the running "
                    "statistics: apply with mutable=['batch_stats'] (or evaluate with "
                    "mode='eval' / train=False)"
                )
            conv = functools.partial(
                ConvNorm,
                norm=self.norm,
                ghost_batch_size=self.ghost_batch_size,
                norm_groups=self.norm_groups,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=conv_kernel_init,
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
        outputs = []
        for i, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                x = block_cls(
                    features=self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    conv=conv,
                    name=f"layer{i + 1}_{j}",
                )(x, mode, use_aux)
            outputs.append(x)
        if features:
            return tuple(outputs)
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


def _example_image(config: ResNetConfig | None = None) -> Array:
    del config  # one small image batch for every preset
    return jnp.linspace(-1.0, 1.0, 2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)


_TINY = {"width": 8, "stage_sizes": (1, 1, 1, 1), "num_classes": 10}
_DOC = (
    "{name}: torchvision's ResNet topology (see RESNET_PRESETS for the paper and parameter "
    "count); kwargs override config fields and module attributes."
)


def _register(names: tuple[str, ...], paper: Paper, published: dict[str, int], source: str):
    register_presets(
        ResNet.from_config,
        {n: RESNET_PRESETS[n] for n in names},
        example_input=_example_image,
        doc=_DOC,
        paper=paper,
        published_params=published,
        params_source=source,
        weights="timm" if names[0] == "resnet18" else None,
        tiny=_TINY,
    )


_register(
    ("resnet18", "resnet34", "resnet50"),
    Paper(
        "Deep Residual Learning for Image Recognition",
        arxiv="1512.03385",
        code="https://github.com/pytorch/vision",
    ),  # fmt: skip
    {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032},
    "torchvision.models.resnet18/34/50(num_classes=1000): sum of numel() (timm's are equal)",
)
_register(
    ("resnet18_ghost_bn",),
    Paper(
        "Train longer, generalize better: closing the generalization gap in large batch "
        "training of neural networks",
        arxiv="1705.08741",
        code="https://github.com/eladhoffer/bigBatch",
    ),  # fmt: skip
    {"resnet18_ghost_bn": 11_689_512},
    "Ghost BN has BN's parameters: torchvision's resnet18 count",
)
_register(
    ("resnet50_evonorm_b0", "resnet50_evonorm_s0"),
    Paper(
        "Evolving Normalization-Activation Layers",
        arxiv="2004.02967",
        code="https://github.com/tensorflow/tpu",
    ),  # fmt: skip
    {"resnet50_evonorm_b0": 25_564_648, "resnet50_evonorm_s0": 25_564_648},
    "torchvision's resnet50 (25,557,032) plus the per-channel v of the official tensorflow/tpu "
    "EvoNorm layers in the 33 layers that had a ReLU (7,616)",
)
_register(
    ("resnet50_gn_ws", "resnet50_bcn_ws"),
    Paper(
        "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
        arxiv="1903.10520",
        code="https://github.com/joe-siyuan-qiao/Batch-Channel-Normalization",
    ),  # fmt: skip
    {"resnet50_gn_ws": 25_557_032, "resnet50_bcn_ws": 25_560_424},
    "torchvision's resnet50 (GroupNorm has BN's per-channel affine); BCN adds the official "
    "code's per-group (32) affine in each of the 53 norm layers (3,392)",
)
