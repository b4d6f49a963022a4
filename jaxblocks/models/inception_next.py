"""InceptionNeXt: a MetaNeXt (ConvNeXt-shaped) network whose token mixer is `InceptionDWConv2d`.

Yu, Zhou, Yan, Wang, "InceptionNeXt: When Inception Meets ConvNeXt",
https://arxiv.org/abs/2303.16900. Official code: sail-sg/inceptionnext
``models/inceptionnext.py``; timm ``timm/models/inception_next.py``, whose model names this
file registers (``inception_next_atto`` ... ``inception_next_base``) and whose weights
`jaxblocks.interop.timm.load_timm_state_dict` converts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.inception_next import (
    BN_EPSILON,
    BN_MOMENTUM,
    CONV_AXES,
    InceptionDWConv2d,
    MetaNeXtBlock,
    MlpClassifierHead,
    default_kernel_init,
)
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = ["INCEPTION_NEXT_PRESETS", "InceptionNeXt", "InceptionNeXtConfig", "MetaNeXtStage"]

Dtype = Any
ACTIVATION_AXES = ("batch", "height", "width", "channels")


@dataclasses.dataclass(frozen=True)
class InceptionNeXtConfig:
    """Architecture of an `InceptionNeXt` (https://arxiv.org/abs/2303.16900).

    The default is timm's ``inception_next_tiny``; `INCEPTION_NEXT_PRESETS` holds the others.

    Attributes:
      num_classes: classifier outputs; 0 returns the head's hidden features.
      depths: blocks per stage.
      dims: channels per stage (same length as ``depths``).
      mlp_ratios: MLP ratio of the blocks of each stage.
      head_mlp_ratio: hidden width of the classifier head / last dim.
      square_kernel_size, band_kernel_size, branch_ratio: the `InceptionDWConv2d` of every block
        (atto: band 9, ratio 0.25; the others: band 11, ratio 0.125).
      ls_init_value: initial layer scale of every block.
      drop_rate: dropout before the last Dense of the head.
      drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    mlp_ratios: tuple[float, ...] = (4, 4, 4, 3)
    head_mlp_ratio: float = 3.0
    square_kernel_size: int = 3
    band_kernel_size: int = 11
    branch_ratio: float = 0.125
    ls_init_value: float = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        _validate(self)


def _validate(cfg: Any) -> None:
    """Shared checks of `InceptionNeXtConfig` and the `InceptionNeXt` attributes."""
    depths, dims, ratios = tuple(cfg.depths), tuple(cfg.dims), tuple(cfg.mlp_ratios)
    if not depths or any(int(d) < 1 for d in depths):
        raise ValueError(f"InceptionNeXt: depths must be a non-empty tuple of ints >= 1, got "
                         f"{cfg.depths!r}")  # fmt: skip
    if len(dims) != len(depths) or any(int(c) < 1 for c in dims):
        raise ValueError(
            f"InceptionNeXt: dims must have one positive entry per stage (len(depths) = "
            f"{len(depths)}), got {cfg.dims!r}"
        )
    if len(ratios) != len(depths) or any(r <= 0 for r in ratios):
        raise ValueError(
            f"InceptionNeXt: mlp_ratios must have one positive entry per stage (len(depths) = "
            f"{len(depths)}), got {cfg.mlp_ratios!r}"
        )
    if cfg.num_classes < 0:
        raise ValueError(f"InceptionNeXt: num_classes must be >= 0, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"InceptionNeXt: drop_path_rate must be in [0, 1), got "
                         f"{cfg.drop_path_rate!r}")  # fmt: skip
    smallest = min(dims)
    g = int(smallest * cfg.branch_ratio)
    if g < 1 or not 0.0 < cfg.branch_ratio <= 1.0 / 3.0:
        raise ValueError(
            f"InceptionNeXt: branch_ratio={cfg.branch_ratio!r} must be in (0, 1/3] and give "
            f"every conv branch at least one channel; dims={cfg.dims!r} gives {g} at width "
            f"{smallest}"
        )


def drop_path_rates(depths: tuple[int, ...], rate: float) -> list[list[float]]:
    """Per-block stochastic-depth rates, ``linspace(0, rate, sum(depths))`` split by stage."""
    total = sum(depths)
    flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start : start + d])
        start += d
    return out


class MetaNeXtStage(nn.Module):
    """InceptionNeXt stage (https://arxiv.org/abs/2303.16900): downsample, then blocks.

    The optional downsample is BN -> conv 2x2 stride 2 (ConvNeXt's downsample with BatchNorm
    in place of LayerNorm), followed by ``depth`` `MetaNeXtBlock`.

    Named as timm's ``MetaNeXtStage`` (``downsample_0`` the BN, ``downsample_1`` the conv,
    ``blocks_<j>``) so timm state dicts map by name.

    Attributes:
      dim: output channels.
      depth: number of `MetaNeXtBlock`.
      downsample: whether to start with BN -> conv 2x2 stride 2 (every stage but the first).
      mlp_ratio, token_mixer, ls_init_value: of the blocks.
      drop_path_rates: one rate per block (None: all 0).
      dtype, param_dtype: compute and parameter dtypes.
    """

    dim: int
    depth: int
    downsample: bool = True
    mlp_ratio: float = 4.0
    token_mixer: Any = InceptionDWConv2d
    ls_init_value: float | None = 1e-6
    drop_path_rates: tuple[float, ...] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool = True
    ) -> Float[Array, "B h w D"]:
        """Apply the stage; ``train`` for BatchNorm, ``deterministic`` for drop path."""
        if self.downsample:
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="downsample_0",
            )(x)
            x = nn.Conv(
                self.dim,
                (2, 2),
                strides=(2, 2),
                padding="VALID",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(default_kernel_init, CONV_AXES),
                name="downsample_1",
            )(x)
        rates = self.drop_path_rates or (0.0,) * self.depth
        for j in range(self.depth):
            x = MetaNeXtBlock(
                mlp_ratio=self.mlp_ratio,
                token_mixer=self.token_mixer,
                ls_init_value=self.ls_init_value,
                drop_path=rates[j],
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{j}",
            )(x, train=train, deterministic=deterministic)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        return x


class InceptionNeXt(nn.Module):
    """InceptionNeXt classifier (Yu et al., https://arxiv.org/abs/2303.16900).

    A ConvNeXt-shaped network (patchify stem conv 4x4 stride 4 + BN; four stages, each but the
    first opened by BN -> conv 2x2 stride 2; `MlpClassifierHead`) whose blocks are
    `MetaNeXtBlock` with the `InceptionDWConv2d` token mixer: compared with ConvNeXt, the 7x7
    depthwise conv is replaced by identity / 3x3 / 1xk / kx1 branches on channel groups, the
    LayerNorms of the body by BatchNorm, and the head gains a hidden MLP layer.

    Layout and parameter count match timm's ``MetaNeXt`` exactly (the presets' counts are
    checked by the registry test; weights load with `jaxblocks.interop.timm`). Deviations:
    channels-last; BatchNorm follows Flax (momentum 0.9 = torch's 0.1, biased running
    variance, see `MetaNeXtBlock`); timm's ``output_stride``/dilation option is not implemented.

    Train or eval, as ``ResNet``/``MobileNetV2``: ``train=True`` normalises with batch
    statistics and updates the running ones (apply with ``mutable=["batch_stats"]``),
    ``train=False`` uses the running statistics; ``train=None`` (default) trains when the
    ``batch_stats`` collection is mutable or the model is initialising, and otherwise raises a
    ValueError. Drop path and head dropout (off at the defaults) are active only in training and
    then need an rng named ``"dropout"``.

    Attributes:
      num_classes, depths, dims, mlp_ratios, head_mlp_ratio, square_kernel_size,
        band_kernel_size, branch_ratio, ls_init_value, drop_rate, drop_path_rate: see
        `InceptionNeXtConfig`.
      token_mixer: factory of every block's token mixer, replacing `InceptionDWConv2d` (and
        the three kernel fields above), called as ``token_mixer(dtype=, param_dtype=,
        name=)``; `ConvNeXtMixer` gives the paper's MetaNeXt/ConvNeXt baseline. None (default):
        `InceptionDWConv2d`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = InceptionNeXt(num_classes=10, depths=(1, 1), dims=(16, 32),
      ...                       mlp_ratios=(4, 3), branch_ratio=0.25)
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> model.apply(variables, x, train=False).shape
      (2, 10)
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    mlp_ratios: tuple[float, ...] = (4, 4, 4, 3)
    head_mlp_ratio: float = 3.0
    square_kernel_size: int = 3
    band_kernel_size: int = 11
    branch_ratio: float = 0.125
    ls_init_value: float = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    token_mixer: Callable[..., nn.Module] | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from an `InceptionNeXtConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W 3"], *, train: bool | None = None, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (the head's hidden features if ``num_classes == 0``).

        Args:
          x: NHWC images; H and W should be multiples of ``4 * 2**(len(depths) - 1)`` (other
            sizes are floored by the strided convs, as in torch).
          train: see the class docstring.
          features: return the stage outputs ``([B, H/4, W/4, dims[0]], …)`` instead, the head
            unused (timm's ``features_only``; for dense heads and `CompositeBackbone`).
        """
        _validate(self)
        train = resolve_train(self, train)
        if x.ndim != 4:
            raise ValueError(f"InceptionNeXt: x must be NHWC [B, H, W, C], got shape {x.shape}")
        min_size = 4 * 2 ** (len(self.depths) - 1)
        if x.shape[1] < min_size or x.shape[2] < min_size:
            raise ValueError(
                f"InceptionNeXt: x of shape {x.shape} is too small; H and W must be at least "
                f"{min_size} (stem stride 4, then {len(self.depths) - 1} stride-2 stages)"
            )
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        deterministic = not train
        x = nn.Conv(
            self.dims[0],
            (4, 4),
            strides=(4, 4),
            padding="VALID",
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(default_kernel_init, CONV_AXES),
            name="stem_0",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="stem_1",
        )(x)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        mixer = self.token_mixer or functools.partial(
            InceptionDWConv2d,
            square_kernel_size=self.square_kernel_size,
            band_kernel_size=self.band_kernel_size,
            branch_ratio=self.branch_ratio,
        )
        rates = drop_path_rates(tuple(self.depths), self.drop_path_rate)
        outputs = []
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims, strict=True)):
            x = MetaNeXtStage(
                dim=dim,
                depth=depth,
                downsample=i > 0,
                mlp_ratio=self.mlp_ratios[i],
                token_mixer=mixer,
                ls_init_value=self.ls_init_value,
                drop_path_rates=tuple(rates[i]),
                dtype=dtype,
                param_dtype=self.param_dtype,
                name=f"stages_{i}",
            )(x, train=train, deterministic=deterministic)
            outputs.append(x)
        if features:
            return tuple(outputs)
        return MlpClassifierHead(
            num_classes=self.num_classes,
            mlp_ratio=self.head_mlp_ratio,
            dropout=self.drop_rate,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="head",
        )(x, deterministic=deterministic)


_SMALL_BRANCH = dict(band_kernel_size=11, branch_ratio=0.125)
INCEPTION_NEXT_PRESETS: dict[str, InceptionNeXtConfig] = {
    "inception_next_atto": InceptionNeXtConfig(
        depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), band_kernel_size=9, branch_ratio=0.25
    ),
    "inception_next_tiny": InceptionNeXtConfig(
        depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **_SMALL_BRANCH
    ),
    "inception_next_small": InceptionNeXtConfig(
        depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **_SMALL_BRANCH
    ),
    "inception_next_base": InceptionNeXtConfig(
        depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **_SMALL_BRANCH
    ),
}

# sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters()) with timm 1.0.31
# (the closed form `inception_next_param_count` gives the same numbers; the tests check both).
INCEPTION_NEXT_PARAMS: dict[str, int] = {
    "inception_next_atto": 4_156_520,
    "inception_next_tiny": 28_055_680,
    "inception_next_small": 49_374_016,
    "inception_next_base": 86_672_136,
}


def inception_next_param_count(config: InceptionNeXtConfig) -> int:
    """Parameter count of an InceptionNeXt from its config in closed form (timm's layout)."""
    c0 = config.dims[0]
    n = 3 * c0 * 16 + c0 + 2 * c0  # stem conv 4x4 (3 input channels) + BN
    prev = c0
    for i, (depth, dim) in enumerate(zip(config.depths, config.dims, strict=True)):
        if i > 0:
            n += 2 * prev + prev * dim * 4 + dim  # BN + conv 2x2
        g = int(dim * config.branch_ratio)
        mixer = g * (config.square_kernel_size**2 + 1) + 2 * g * (config.band_kernel_size + 1)
        hidden = int(config.mlp_ratios[i] * dim)
        mlp = dim * hidden + hidden + hidden * dim + dim
        n += depth * (mixer + 2 * dim + mlp + dim)  # mixer, BN, MLP, gamma
        prev = dim
    hidden = int(config.head_mlp_ratio * prev)
    n += prev * hidden + hidden + 2 * hidden  # fc1 + LayerNorm
    if config.num_classes:
        n += hidden * config.num_classes + config.num_classes
    return n


def _example_image(config: InceptionNeXtConfig) -> Array:
    size = 4 * 2 ** (len(config.depths) - 1)  # the smallest input every stage accepts
    n = 2 * size * size * 3
    return jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32).reshape(2, size, size, 3)


register_presets(
    InceptionNeXt.from_config,
    INCEPTION_NEXT_PRESETS,
    example_input=_example_image,
    doc="timm's {name} (InceptionNeXt, arXiv 2303.16900); kwargs override config fields.",
    paper=Paper(
        "InceptionNeXt: When Inception Meets ConvNeXt",
        arxiv="2303.16900",
        code="https://github.com/sail-sg/inceptionnext",
    ),
    published_params=INCEPTION_NEXT_PARAMS,
    params_source="timm 1.0.31 timm.create_model(name, num_classes=1000): sum of numel(), equal to "
    "the closed form inception_next_param_count (the official README rounds them to 4.2M / "
    "28M / 49M / 87M)",
    weights="timm",
    tiny={
        "depths": (1, 1, 2, 1),
        "dims": (16, 32, 48, 64),
        "branch_ratio": 0.25,
        "num_classes": 10,
    },  # fmt: skip
)
