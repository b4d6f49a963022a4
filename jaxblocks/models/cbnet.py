"""CBNet: composite backbones joined by dense higher-level composition (DHLC).

Liang et al., "CBNet: A Composite Backbone Network Architecture for Object Detection",
https://arxiv.org/abs/2107.00420 (CBNetV2). Official code: VDIGPKU/CBNetV2
``mmdet/models/backbones/cbnet.py`` (``_CBSubnet``, ``_CBResNet``, ``CBResNet``,
``CBSwinTransformer``).

`CompositeBackbone` wraps K copies of any backbone that follows a two-method protocol (see its
docstring); `ResNetStages` is the project's ResNet (`jaxblocks.models.resnet`, its blocks and
parameter names) in that protocol, and `CBResNet` the composite of K of them, registered as
``cb_resnet18`` and ``cb_resnet50``. The assistant-supervision loss of CBNetV2 is a detector
head on the assisting backbones' features: the model returns every backbone's stage outputs so a
trainer can add it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxblocks.layers.conv_bn import ConvBN, resolve_convbn_mode
from jaxblocks.models.resnet import (
    ACTIVATION_AXES,
    BLOCKS,
    STEMS,
    BasicBlock,
    Bottleneck,
    conv_kernel_init,
)
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "CBRESNET_PRESETS",
    "CBResNet",
    "CBResNetConfig",
    "CompositeBackbone",
    "ResNetStages",
    "nearest_resize",
]


def nearest_resize(x: Float[Array, "B h w C"], size: tuple[int, int]) -> Float[Array, "B H W C"]:
    """Nearest-neighbour resize of NHWC ``x`` to ``size``: output pixel ``d`` reads input
    ``floor(d * in / out)``, PyTorch's ``F.interpolate(mode="nearest")`` (exact for the integer
    ratios of a backbone's stages)."""
    h_in, w_in = x.shape[1:3]
    h, w = size
    if (h_in, w_in) == (h, w):
        return x
    rows = (np.arange(h) * h_in) // h
    cols = (np.arange(w) * w_in) // w
    return x[:, rows][:, :, cols]


class ResNetStages(nn.Module):
    """The project's ResNet (https://arxiv.org/abs/1512.03385) as a staged backbone for
    `CompositeBackbone`: ``forward_stem`` (the ``conv1`` ConvBN, and the max-pool of the
    ImageNet stem) and ``forward_stage(i, ...)`` (the blocks ``layer{i+1}_{j}``).

    The blocks are `jaxblocks.models.resnet.BasicBlock` / ``Bottleneck`` and the parameter
    names are `ResNet`'s, so a backbone's variables are those of ``ResNet(num_classes=0)``
    (without ``fc``). Only `ConvBN` normalisation (``ResNet(norm="batch")``).

    Attributes:
      stage_sizes, block, width, stem, zero_init_residual: see
        `jaxblocks.models.resnet.ResNetConfig`.
      dtype, param_dtype: of every ConvBN.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
    width: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def num_stages(self) -> int:
        return len(self.stage_sizes)

    def setup(self):
        if self.stem not in STEMS:
            raise ValueError(f"ResNetStages: stem must be one of {STEMS}, got {self.stem!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"ResNetStages: block must be one of {BLOCKS}, got {self.block!r}")
        conv = functools.partial(
            ConvBN, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_kernel_init
        )
        if self.stem == "imagenet":
            self.conv1 = conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)),
                              activation=nn.relu)  # fmt: skip
        else:
            self.conv1 = conv(self.width, (3, 3), padding=((1, 1), (1, 1)), activation=nn.relu)
        block_cls = BasicBlock if self.block == "basic" else Bottleneck
        # setattr names the submodules as ResNet's compact ones (``layer2_0``).
        for i, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                setattr(self, f"layer{i + 1}_{j}", block_cls(
                    features=self.width * 2**i, strides=2 if i > 0 and j == 0 else 1,
                    zero_init_residual=self.zero_init_residual, conv=conv,
                ))  # fmt: skip

    def forward_stem(self, x: Float[Array, "B H W C"], mode: str) -> Float[Array, "B h w D"]:
        """The stem: ``conv1`` (+ 3x3 stride-2 max-pool for the ImageNet stem)."""
        x = self.conv1(x, mode)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return nn.with_logical_constraint(x, ACTIVATION_AXES)

    def forward_stage(self, i: int, x: Float[Array, "B H W C"], mode: str) -> Array:
        """Stage ``i`` (0-based): the blocks ``layer{i+1}_0 ...``."""
        for j in range(self.stage_sizes[i]):
            x = getattr(self, f"layer{i + 1}_{j}")(x, mode)
        return x


class CompositeBackbone(nn.Module):
    """CBNet composite backbone (CBNetV2, Liang et al., https://arxiv.org/abs/2107.00420).

    ``num_backbones`` (K) copies of one backbone run in turn; each later one is fed by the one
    before through DHLC (dense higher-level composition): before its stage ``i`` (for every
    ``i >= del_stages``), the input of that stage gets

        feed_i = sum_{j >= i} Up_nearest(BN(Conv1x1(out_j of the previous backbone)))

    resized to the stage input's size, with 1x1 conv (no bias) + BN mapping stage ``j``'s
    output channels to stage ``i``'s input channels. The BN scale and bias start at 0
    (``zero_init_dhlc``), so the composite starts as K independent runs and the lead (last)
    backbone equals a single backbone. As the official ``_CBResNet``, one set of DHLC layers
    (``cb_linears_{i}_{j}``: target stage ``i``, source stage ``i + j``) is shared by all K-1
    compositions, every backbone after the first reuses the first's stem, and its first
    ``del_stages`` stages are not built: it reuses the previous backbone's outputs there.

    The backbone protocol: ``backbone(name=..., dtype=...)`` builds a module with
    ``num_stages`` (int), ``forward_stem(x, mode)`` and ``forward_stage(i, x, mode)``
    (``mode``: the resolved ConvBN mode, see `resolve_convbn_mode`, passed on as the ResNet
    models do). `ResNetStages`
    follows it; subclasses may override `make_backbone` instead (`CBResNet`).

    Differences from the official code: BatchNorm follows Flax (momentum 0.9 = PyTorch's
    0.1, biased running variance); the official ``train()`` keeps the DHLC BNs in eval mode,
    which here is ``frozen_dhlc_bn=True`` (default False: they train like every other BN).

    Attributes:
      backbone: factory of one backbone (see the protocol), or None when `make_backbone` is
        overridden.
      num_backbones: K (2 = "Dual").
      del_stages: leading stages the backbones after the first do not have (CBNetV2's
        ``cb_del_stages``; the official constructor's default is 0, the ``cbv2d1`` configs
        use 1).
      zero_init_dhlc: start the DHLC BN scales (and biases) at 0.
      frozen_dhlc_bn: the DHLC BNs use running statistics in train mode too.
      mode: default ConvBN mode (None: decided per call, as `ResNet`).
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Returns (the call): one tuple of stage outputs per backbone, the lead (last) backbone's last,
    as the official ``forward``.

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> make = functools.partial(ResNetStages, stage_sizes=(1, 1), block="basic", width=8,
      ...                          stem="small")
      >>> model = CompositeBackbone(backbone=make, num_backbones=2, del_stages=0)
      >>> x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> outs = model.apply(variables, x, mode="eval")
      >>> [o.shape for o in outs[-1]]
      [(2, 16, 16, 8), (2, 8, 8, 16)]
    """

    backbone: Callable[..., nn.Module] | None = None
    num_backbones: int = 2
    del_stages: int = 1
    zero_init_dhlc: bool = True
    frozen_dhlc_bn: bool = False
    mode: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def make_backbone(self, name: str, dtype: Any) -> nn.Module:
        """Build one backbone named ``name`` (compute dtype ``dtype``)."""
        if self.backbone is None:
            raise ValueError(f"{type(self).__name__}: backbone must be a factory of a staged "
                             "backbone (see CompositeBackbone), got None")  # fmt: skip
        return self.backbone(name=name, dtype=dtype)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], mode: str | None = None, *, train: bool | None = None
    ) -> tuple[tuple[Array, ...], ...]:
        """Every backbone's stage outputs (see the class docstring).

        Args:
          x: NHWC images.
          mode, train: ConvBN mode of this call (precedence as `ResNet`).
        """
        where = type(self).__name__
        mode = resolve_convbn_mode(self, mode, train)
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(f"{where}: x must be NHWC [batch, height, width, channels], got "
                             f"shape {getattr(x, 'shape', type(x).__name__)}")  # fmt: skip
        k_total = self.num_backbones
        if not isinstance(k_total, int) or k_total < 1:
            raise ValueError(f"{where}: num_backbones must be an int >= 1, got {k_total!r}")
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        backbones = [self.make_backbone(f"backbone_{k}", dtype) for k in range(k_total)]
        n = backbones[0].num_stages
        if not isinstance(self.del_stages, int) or not 0 <= self.del_stages < n:
            raise ValueError(f"{where}: del_stages must be an int in [0, {n}) (the backbone has "
                             f"{n} stages), got {self.del_stages!r}")  # fmt: skip
        dhlc_mode = "eval" if self.frozen_dhlc_bn and mode == "train" else mode
        scale_init = nn.initializers.zeros if self.zero_init_dhlc else nn.initializers.ones
        linears: dict[tuple[int, int], ConvBN] = {}

        def dhlc(feats: list[Array]) -> list[Array | None]:
            """feed_i for every stage i from the previous backbone's ``[stem, out_0, ...]``."""
            feeds: list[Array | None] = []
            for i in range(n):
                if i < self.del_stages:
                    feeds.append(None)
                    continue
                target = feats[i]  # the stage-i input: its size and channels
                total = None
                for j in range(n - i):
                    if (i, j) not in linears:
                        linears[i, j] = ConvBN(
                            target.shape[-1], (1, 1), padding="VALID", scale_init=scale_init,
                            kernel_init=conv_kernel_init, dtype=dtype,
                            param_dtype=self.param_dtype, name=f"cb_linears_{i}_{j}",
                        )  # fmt: skip
                    y = linears[i, j](feats[i + j + 1], dhlc_mode)
                    y = nearest_resize(y, target.shape[1:3])
                    total = y if total is None else total + y
                feeds.append(total)
            return feeds

        outs: list[tuple[Array, ...]] = []
        prev: list[Array] = []
        feeds: list[Array | None] = []
        for k, bb in enumerate(backbones):
            h = bb.forward_stem(x, mode) if k == 0 else prev[0]
            feats = [h]
            for i in range(n):
                if k > 0 and i < self.del_stages:
                    h = prev[i + 1]
                else:
                    if k > 0:
                        h = h + feeds[i].astype(h.dtype)
                    h = bb.forward_stage(i, h, mode)
                feats.append(h)
            outs.append(tuple(feats[1:]))
            if k < k_total - 1:
                feeds = dhlc(feats)
            prev = feats
        return tuple(outs)


@dataclasses.dataclass(frozen=True)
class CBResNetConfig:
    """Architecture of a `CBResNet`: a `ResNetStages` backbone (see
    `jaxblocks.models.resnet.ResNetConfig`) and the composition (see `CompositeBackbone`)."""

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    block: str = "bottleneck"
    width: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False
    num_backbones: int = 2
    del_stages: int = 1
    zero_init_dhlc: bool = True
    frozen_dhlc_bn: bool = False

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"CBResNet: block must be one of {BLOCKS}, got {self.block!r}")
        if self.stem not in STEMS:
            raise ValueError(f"CBResNet: stem must be one of {STEMS}, got {self.stem!r}")
        if not self.stage_sizes or any(int(s) < 1 for s in self.stage_sizes):
            raise ValueError(f"CBResNet: stage_sizes must be a non-empty tuple of ints >= 1, got "
                             f"{self.stage_sizes!r}")  # fmt: skip
        if self.num_backbones < 1:
            raise ValueError(f"CBResNet: num_backbones must be >= 1, got {self.num_backbones!r}")
        if not 0 <= self.del_stages < len(self.stage_sizes):
            raise ValueError(f"CBResNet: del_stages must be in [0, {len(self.stage_sizes)}), got "
                             f"{self.del_stages!r}")  # fmt: skip


class CBResNet(CompositeBackbone):
    """CB-ResNet (CBNetV2, https://arxiv.org/abs/2107.00420): `CompositeBackbone` of K
    `ResNetStages` (``backbone_{k}``, each with `ResNet`'s parameter names), as the official
    ``CBResNet``. Default: Dual-ResNet-50 with ``del_stages=1``.

    Attributes:
      stage_sizes, block, width, stem, zero_init_residual: of each ResNet.
      num_backbones, del_stages, zero_init_dhlc, frozen_dhlc_bn, mode, dtype, param_dtype:
        see `CompositeBackbone`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = CBResNet(stage_sizes=(1, 1, 1, 1), block="basic", width=8, stem="small")
      >>> x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> lead = model.apply(variables, x, mode="eval")[-1]
      >>> [o.shape[-1] for o in lead]
      [8, 16, 32, 64]
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
    width: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False

    # Build from a `CBResNetConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    def make_backbone(self, name: str, dtype: Any) -> nn.Module:
        return ResNetStages(
            stage_sizes=tuple(self.stage_sizes), block=self.block, width=self.width,
            stem=self.stem, zero_init_residual=self.zero_init_residual, dtype=dtype,
            param_dtype=self.param_dtype, name=name,
        )  # fmt: skip


CBRESNET_PRESETS: dict[str, CBResNetConfig] = {
    "cb_resnet18": CBResNetConfig(stage_sizes=(2, 2, 2, 2), block="basic"),
    "cb_resnet50": CBResNetConfig(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
}


def _example_image(config: CBResNetConfig) -> Array:
    del config
    return jnp.linspace(-1.0, 1.0, 2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)


register_presets(
    CBResNet.from_config,
    CBRESNET_PRESETS,
    example_input=_example_image,
    doc="{name}: Dual CB-ResNet backbone (CBNetV2, arXiv 2107.00420) returning every "
    "backbone's stage outputs; kwargs override config fields and module attributes.",
    paper=Paper(
        "CBNet: A Composite Backbone Network Architecture for Object Detection",
        arxiv="2107.00420",
        code="https://github.com/VDIGPKU/CBNetV2",
    ),
    params_source="no published count for the backbone alone; CBNetV2 reports whole-detector "
    "parameter counts (backbone + FPN + heads), which this backbone-only module cannot match",
    tiny={"stage_sizes": (1, 1, 1), "block": "basic", "width": 8, "stem": "small"},
)
