"""Next-ViT: a hybrid CNN-transformer built from NCB and NTB blocks for fast deployment.

Li et al., "Next-ViT: Next Generation Vision Transformer for Efficient Deployment in Realistic
Industrial Scenarios", https://arxiv.org/abs/2207.05501. Official code: bytedance/Next-ViT
``classification/nextvit.py``; timm ``timm/models/nextvit.py``, whose model names this file
registers (``nextvit_small``, ``nextvit_base``, ``nextvit_large``) and whose weights
`jaxblocks.interop.timm.load_timm_state_dict` converts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.nextvit import (
    ACTIVATION_AXES,
    BN_EPSILON,
    BN_MOMENTUM,
    CONV_AXES,
    NextConvBlock,
    NextTransformerBlock,
    block_kind,
    default_kernel_init,
    reparameterize_block,
)
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.models.inception_next import drop_path_rates
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "NEXTVIT_PARAMS",
    "NEXTVIT_PRESETS",
    "ConvNormAct",
    "NextStage",
    "NextViT",
    "NextViTConfig",
    "reparameterize",
]

Dtype = Any


@dataclasses.dataclass(frozen=True)
class NextViTConfig:
    """Architecture of a `NextViT` (https://arxiv.org/abs/2207.05501).

    The default is timm's ``nextvit_small``; `NEXTVIT_PRESETS` holds the others. timm derives
    the per-block widths and block types from ``depths`` ("Next Hybrid Strategy"); here they are
    fields: stage ``i`` has ``depths[i]`` blocks, block ``j`` is a `NextTransformerBlock` of
    width ``ntb_chs[i]`` when ``ntb_periods[i] > 0`` and ``(j + 1) % ntb_periods[i] == 0``,
    otherwise a `NextConvBlock` of width ``ncb_chs[i]``. Next-ViT: periods ``(0, 4, 5, 3)``,
    i.e. stages 2 and 4 end with an NTB and stage 3 repeats ``[NCB x 4, NTB]``.

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled, normalised features.
      stem_chs: widths of the stem's conv-BN-ReLU layers (3x3; strides 2, 1, 1, 2; the last
        width is used twice).
      depths: blocks per stage.
      ncb_chs, ntb_chs: widths of the NCB and of the NTB blocks of each stage.
      ntb_periods: see above (0: no NTB in that stage).
      strides: stride of the first block of each stage (1 or 2).
      sr_ratios: E-MHSA spatial reduction of each stage.
      head_dim: channels per head of E-MHSA and per group of MHCA (32).
      mix_block_ratio: share of E-MHSA channels in an NTB (0.75).
      drop_rate: dropout before the classifier.
      drop_path_rate: stochastic depth, rising linearly from 0 over all blocks (timm trains
        small with 0.1, base and large with 0.2; the presets use 0 so that training needs no
        rng unless asked).
      attn_drop_rate, proj_drop_rate: E-MHSA attention dropout; MLP/projection dropout.
    """

    num_classes: int = 1000
    stem_chs: tuple[int, ...] = (64, 32, 64)
    depths: tuple[int, ...] = (3, 4, 10, 3)
    ncb_chs: tuple[int, ...] = (96, 192, 384, 768)
    ntb_chs: tuple[int, ...] = (96, 256, 512, 1024)
    ntb_periods: tuple[int, ...] = (0, 4, 5, 3)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    head_dim: int = 32
    mix_block_ratio: float = 0.75
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0

    def __post_init__(self):
        _validate(self)


def _validate(cfg: Any) -> None:
    """Shared checks of `NextViTConfig` and the `NextViT` attributes."""
    n = len(cfg.depths)
    if not n or any(int(d) < 1 for d in cfg.depths):
        raise ValueError(f"NextViT: depths must be a non-empty tuple of ints >= 1, got "
                         f"{cfg.depths!r}")  # fmt: skip
    for name in ("ncb_chs", "ntb_chs", "ntb_periods", "strides", "sr_ratios"):
        if len(getattr(cfg, name)) != n:
            raise ValueError(f"NextViT: {name} must have one entry per stage (len(depths) = "
                             f"{n}), got {getattr(cfg, name)!r}")  # fmt: skip
    if len(cfg.stem_chs) != 3:
        raise ValueError(f"NextViT: stem_chs must have 3 entries, got {cfg.stem_chs!r}")
    if any(s not in (1, 2) for s in cfg.strides):
        raise ValueError(f"NextViT: strides must be 1 or 2, got {cfg.strides!r}")
    if any(c % cfg.head_dim for c in cfg.ncb_chs):
        raise ValueError(f"NextViT: ncb_chs {cfg.ncb_chs!r} must be multiples of head_dim "
                         f"{cfg.head_dim}")  # fmt: skip
    if cfg.num_classes < 0:
        raise ValueError(f"NextViT: num_classes must be >= 0, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"NextViT: drop_path_rate must be in [0, 1), got {cfg.drop_path_rate!r}")


def block_types(cfg: Any) -> list[list[str]]:
    """``"ncb"`` / ``"ntb"`` of every block, per stage (the Next Hybrid Strategy)."""
    return [
        ["ntb" if p > 0 and (j + 1) % p == 0 else "ncb" for j in range(d)]
        for d, p in zip(cfg.depths, cfg.ntb_periods, strict=True)
    ]


def min_input_size(cfg: Any) -> int:
    """Smallest H = W the model accepts: every stage's E-MHSA needs at least ``sr**2`` tokens."""
    size, reduction = 4, 4  # after the stem
    for i, kinds in enumerate(block_types(cfg)):
        reduction *= cfg.strides[i]
        if "ntb" in kinds and cfg.sr_ratios[i] > 1:
            size = max(size, reduction * cfg.sr_ratios[i])
    return max(size, reduction)


class ConvNormAct(nn.Module):
    """Next-ViT stem layer: 3x3 conv (padding 1, no bias) -> BatchNorm -> ReLU
    (https://arxiv.org/abs/2207.05501); named as timm's (``conv``, ``norm``).

    Attributes:
      features: output channels.
      stride: conv stride.
      dtype, param_dtype: compute and parameter dtypes.
    """

    features: int
    stride: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """``[B, H', W', features]``, ``H' = floor((H - 1) / stride) + 1``."""
        x = nn.Conv(
            self.features,
            (3, 3),
            strides=(self.stride, self.stride),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(default_kernel_init, CONV_AXES),
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="norm",
        )(x)
        return nn.relu(x)


class NextStage(nn.Module):
    """A Next-ViT stage (https://arxiv.org/abs/2207.05501): a run of NCB/NTB blocks, the first
    with the stage's stride; named as timm's ``NextStage`` (``blocks_<j>``).

    Attributes:
      block_chs: output width of each block.
      block_types: ``"ncb"`` or ``"ntb"`` per block.
      stride: of the first block.
      sr_ratio, head_dim, mix_block_ratio: of the blocks.
      drop_path_rates: one per block (None: all 0).
      dropout, attn_drop: of the blocks.
      deploy: blocks without their pre-BNs (see `reparameterize`).
      dtype, param_dtype: compute and parameter dtypes.
    """

    block_chs: tuple[int, ...]
    block_types: tuple[str, ...]
    stride: int = 2
    sr_ratio: int = 1
    head_dim: int = 32
    mix_block_ratio: float = 0.75
    drop_path_rates: tuple[float, ...] | None = None
    dropout: float = 0.0
    attn_drop: float = 0.0
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool = True
    ) -> Float[Array, "B h w D"]:
        """Apply the blocks; ``train`` for BatchNorm, ``deterministic`` for drop path."""
        rates = self.drop_path_rates or (0.0,) * len(self.block_chs)
        for j, (chs, kind) in enumerate(zip(self.block_chs, self.block_types, strict=True)):
            common = dict(
                out_features=chs,
                stride=self.stride if j == 0 else 1,
                head_dim=self.head_dim,
                drop_path=rates[j],
                dropout=self.dropout,
                deploy=self.deploy,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{j}",
            )
            if kind == "ntb":
                block = NextTransformerBlock(
                    sr_ratio=self.sr_ratio,
                    mix_block_ratio=self.mix_block_ratio,
                    attn_drop=self.attn_drop,
                    **common,
                )
            else:
                block = NextConvBlock(**common)
            x = block(x, train=train, deterministic=deterministic)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        return x


class NextViT(nn.Module):
    """Next-ViT classifier (Li et al., https://arxiv.org/abs/2207.05501).

    A hybrid network designed for deployment latency (TensorRT/CoreML) rather than FLOPs: a
    conv-BN-ReLU stem (stride 4), four stages mixing `NextConvBlock` (convolutional attention,
    MHCA) with a few `NextTransformerBlock` (channel-split E-MHSA with spatially reduced keys
    and values, plus MHCA) in the "Next Hybrid Strategy", then BatchNorm -> global average
    pooling -> Linear. Only BatchNorm is used, so every norm folds into a neighbouring linear map
    for inference (`reparameterize`).

    Layout and parameter count match timm's ``NextViT`` exactly (the presets' counts are checked
    by the registry test; weights load with `jaxblocks.interop.timm`, the classifier
    ``head_fc`` being timm's ``head.fc``). Deviations: channels-last; BatchNorm follows Flax
    (momentum 0.9 = torch's 0.1, biased running variance, see `jaxblocks.blocks.nextvit`); the
    per-stage widths and NTB positions are config fields (`NextViTConfig`).

    Train or eval, as ``InceptionNeXt``: ``train=True`` normalises with batch statistics and
    updates the running ones (apply with ``mutable=["batch_stats"]``), ``train=False`` uses the
    running statistics; ``train=None`` (default) trains when the ``batch_stats`` collection is
    mutable or the model is initialising, and otherwise raises a ValueError. Drop path and
    dropout (off at the defaults) are active only in training and then need an rng named
    ``"dropout"``.

    Stage features: ``features=True`` returns the tuple of the stages' outputs
    ``[B, H/4s, W/4s, C]`` (the last one before the final BN, as timm's
    ``forward_intermediates``) instead of the logits; ``num_classes=0`` returns the pooled
    features.

    Deploy: ``deploy=True`` builds the blocks without the BatchNorms that precede a linear map;
    its variables are ``reparameterize(variables)`` of the ``deploy=False`` model, and it
    reproduces that model's eval outputs.

    Attributes:
      num_classes, stem_chs, depths, ncb_chs, ntb_chs, ntb_periods, strides, sr_ratios,
        head_dim, mix_block_ratio, drop_rate, drop_path_rate, attn_drop_rate, proj_drop_rate:
        see `NextViTConfig`.
      deploy: see above.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = NextViT(num_classes=10, stem_chs=(16, 16, 32), depths=(1, 2),
      ...                 ncb_chs=(32, 64), ntb_chs=(32, 128), ntb_periods=(0, 2),
      ...                 strides=(1, 2), sr_ratios=(1, 2))
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> model.apply(variables, x, train=False).shape
      (2, 10)
    """

    num_classes: int = 1000
    stem_chs: tuple[int, ...] = (64, 32, 64)
    depths: tuple[int, ...] = (3, 4, 10, 3)
    ncb_chs: tuple[int, ...] = (96, 192, 384, 768)
    ntb_chs: tuple[int, ...] = (96, 256, 512, 1024)
    ntb_periods: tuple[int, ...] = (0, 4, 5, 3)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    head_dim: int = 32
    mix_block_ratio: float = 0.75
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from a `NextViTConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W 3"], *, train: bool | None = None, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (pooled features if ``num_classes == 0``).

        Args:
          x: NHWC images, H and W at least `min_input_size` (32 for the presets).
          train: see the class docstring.
          features: return the stage outputs instead (see the class docstring).
        """
        _validate(self)
        train = resolve_train(self, train)
        if x.ndim != 4:
            raise ValueError(f"NextViT: x must be NHWC [B, H, W, C], got shape {x.shape}")
        min_size = min_input_size(self)
        if x.shape[1] < min_size or x.shape[2] < min_size:
            raise ValueError(
                f"NextViT: x of shape {x.shape} is too small; H and W must be at least {min_size} "
                f"(stride-4 stem, stage strides {tuple(self.strides)}, E-MHSA reductions "
                f"{tuple(self.sr_ratios)})"
            )
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        deterministic = not train
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        c0, c1, c2 = self.stem_chs
        for i, (chs, stride) in enumerate(((c0, 2), (c1, 1), (c2, 1), (c2, 2))):
            x = ConvNormAct(chs, stride, name=f"stem_{i}", **kw)(x, train=train)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        types = block_types(self)
        rates = drop_path_rates(tuple(self.depths), self.drop_path_rate)
        outputs = []
        for i, kinds in enumerate(types):
            chs = tuple(self.ntb_chs[i] if k == "ntb" else self.ncb_chs[i] for k in kinds)
            x = NextStage(
                block_chs=chs,
                block_types=tuple(kinds),
                stride=self.strides[i],
                sr_ratio=self.sr_ratios[i],
                head_dim=self.head_dim,
                mix_block_ratio=self.mix_block_ratio,
                drop_path_rates=tuple(rates[i]),
                dropout=self.proj_drop_rate,
                attn_drop=self.attn_drop_rate,
                deploy=self.deploy,
                name=f"stages_{i}",
                **kw,
            )(x, train=train, deterministic=deterministic)
            outputs.append(x)
        if features:
            return tuple(outputs)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            name="norm",
            **kw,
        )(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)  # [B, C]
        x = nn.Dropout(self.drop_rate, deterministic=deterministic)(x)
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(default_kernel_init, ("embed", "classes")),
            name="head_fc",
            **kw,
        )(x)


def reparameterize(variables: dict[str, Any]) -> dict[str, Any]:
    """Fold the pre-BNs of every block into the linear maps that follow them.

    As the official ``merge_bn`` / timm's ``reparameterize``: in each NCB the BN before the MLP
    goes into ``mlp/fc1``; in each NTB ``norm1`` goes into E-MHSA's q, k and v (with the
    spatial-reduction BN also into k and v), ``norm2`` into ``mlp/fc1``. The running statistics
    are used, so the result reproduces eval mode.

    Args:
      variables: ``{"params", "batch_stats"}`` of a ``NextViT(deploy=False)``.

    Returns:
      The variables of the same model with ``deploy=True``.

    Example::

        deployed = reparameterize(variables)
        model.clone(deploy=True).apply(deployed, x, train=False)  # == model.apply(variables, ...)
    """
    params, stats = dict(variables["params"]), dict(variables["batch_stats"])
    for stage in [k for k in params if k.startswith("stages_")]:
        p_stage, s_stage = dict(params[stage]), dict(stats[stage])
        for name, p_block in p_stage.items():
            kind = block_kind(p_block)
            if kind is None:
                raise ValueError(f"reparameterize: {stage}/{name} has no pre-BN to fold (already "
                                 f"reparameterized?)")  # fmt: skip
            p_stage[name], s_stage[name] = reparameterize_block(p_block, s_stage[name], kind)
        params[stage], stats[stage] = p_stage, s_stage
    return {**variables, "params": params, "batch_stats": stats}


NEXTVIT_PRESETS: dict[str, NextViTConfig] = {
    "nextvit_small": NextViTConfig(depths=(3, 4, 10, 3)),
    "nextvit_base": NextViTConfig(depths=(3, 4, 20, 3)),
    "nextvit_large": NextViTConfig(depths=(3, 4, 30, 3)),
}

# sum(p.numel() for p in timm.create_model(name).parameters()) with timm 1.0.31 (num_classes=1000).
NEXTVIT_PARAMS: dict[str, int] = {
    "nextvit_small": 31_763_368,
    "nextvit_base": 44_818_856,
    "nextvit_large": 57_874_344,
}


def _example_image(config: NextViTConfig) -> Array:
    size = min_input_size(config)
    n = 2 * size * size * 3
    return jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32).reshape(2, size, size, 3)


register_presets(
    NextViT.from_config,
    NEXTVIT_PRESETS,
    example_input=_example_image,
    doc="timm's {name} (Next-ViT, arXiv 2207.05501); kwargs override config fields.",
    paper=Paper(
        "Next-ViT: Next Generation Vision Transformer for Efficient Deployment in Realistic "
        "Industrial Scenarios",
        arxiv="2207.05501",
        code="https://github.com/bytedance/Next-ViT",
    ),
    published_params=NEXTVIT_PARAMS,
    params_source="timm 1.0.31 timm.create_model(name, num_classes=1000): sum of numel() (the "
    "official README rounds them to 31.7M / 44.8M / 57.8M)",
    weights="timm",
    tiny={
        "stem_chs": (16, 16, 32),
        "depths": (1, 1, 2, 1),
        "ncb_chs": (32, 32, 64, 64),
        "ntb_chs": (32, 64, 96, 128),
        "ntb_periods": (0, 1, 2, 1),
        "head_dim": 16,
        "num_classes": 10,
    },
)
