"""UniFormer: local and global multi-head relation aggregators in one hierarchical network.

Li et al., "UniFormer: Unifying Convolution and Self-attention for Visual Recognition",
https://arxiv.org/abs/2201.09450. Official code: Sense-X/UniFormer
``image_classification/models/uniformer.py`` (``uniformer_small``, ``uniformer_base``) and
``image_classification/models/uniformer_light.py`` (``uniformer_xxs``, ``uniformer_xs``); this
file registers those four names. No timm implementation exists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.uniformer import (
    ACTIVATION_AXES,
    BN_EPSILON,
    BN_MOMENTUM,
    EMBED_LN_EPSILON,
    CBlock,
    EvoSABlock,
    HeadEmbedding,
    MiddleEmbedding,
    PatchEmbed,
    SABlock,
    default_kernel_init,
)
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.models.inception_next import drop_path_rates
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "UNIFORMER_PARAMS",
    "UNIFORMER_PRESETS",
    "UniFormer",
    "UniFormerConfig",
    "min_input_size",
]

Dtype = Any
MIN_INPUT_SIZE = 32  # stride 4 x 2 x 2 x 2: the last stage needs at least one token


@dataclasses.dataclass(frozen=True)
class UniFormerConfig:
    """Architecture of a `UniFormer` (https://arxiv.org/abs/2201.09450).

    The default is the official ``uniformer_small``; `UNIFORMER_PRESETS` holds the others.
    Four stages: stages 1-2 of `CBlock` (local MHRA), stages 3-4 of `SABlock` (global MHRA),
    or, for the light models (``prune_ratios`` set), of `EvoSABlock` with a class token and
    token pruning.

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled, normalised features.
      depths: blocks per stage (4 stages).
      embed_dims: channels per stage.
      head_dim: channels per attention head of stages 3-4 (64; light: 28 / 32).
      mlp_ratios: MLP hidden width / C per stage (4; light: 3).
      qkv_bias: bias of the attention's qkv projection (True in every official model).
      conv_stem: the stem is `HeadEmbedding` (two 3x3 s2 conv-BN) instead of a 4x4 patch
        embedding (UniFormer-S† and the light models).
      conv_downsample: downsample between stages with `MiddleEmbedding` (3x3 s2 conv-BN)
        instead of a 2x2 patch embedding (UniFormer-S† only; the light models keep patches).
      layer_scale_init: per-channel layer scale of the global blocks (and, in the light
        models, of the local blocks too, as uniformer_light.py), initial value 1e-6 in the
        official ``uniformer_base_ls``; None: none.
      prune_ratios: None for the standard model; for the light model, the kept share of tokens
        of each block of stage 3 and of stage 4 (``((1, 0.5, ...), (0.5, ...))``; the first
        block of stage 3 must keep all tokens, it sets the global score).
      trade_offs: the score update weight of each of those blocks (same layout).
      drop_rate: dropout after the stem and in the blocks' MLPs and projections.
      attn_drop_rate: attention dropout.
      drop_path_rate: stochastic depth, rising linearly from 0 over all blocks (the official
        recipes: S 0.1, B 0.3, light 0; the presets use 0 so that training needs no rng).
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (3, 4, 8, 3)
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    head_dim: int = 64
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0)
    qkv_bias: bool = True
    conv_stem: bool = False
    conv_downsample: bool = False
    layer_scale_init: float | None = None
    prune_ratios: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    trade_offs: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        _validate(self)


def _validate(cfg: Any) -> None:
    """Shared checks of `UniFormerConfig` and the `UniFormer` attributes."""
    for name in ("depths", "embed_dims", "mlp_ratios"):
        if len(getattr(cfg, name)) != 4:
            raise ValueError(f"UniFormer: {name} must have 4 entries (one per stage), got "
                             f"{getattr(cfg, name)!r}")  # fmt: skip
    if any(int(d) < 1 for d in cfg.depths):
        raise ValueError(f"UniFormer: depths must be ints >= 1, got {cfg.depths!r}")
    if any(c % cfg.head_dim for c in cfg.embed_dims[2:]):
        raise ValueError(f"UniFormer: embed_dims[2:] = {tuple(cfg.embed_dims[2:])} must be "
                         f"multiples of head_dim={cfg.head_dim}")  # fmt: skip
    if (cfg.prune_ratios is None) != (cfg.trade_offs is None):
        raise ValueError("UniFormer: prune_ratios and trade_offs must both be set (light model) "
                         "or both be None")  # fmt: skip
    if cfg.prune_ratios is not None:
        for name in ("prune_ratios", "trade_offs"):
            value = getattr(cfg, name)
            lens = tuple(len(v) for v in value) if len(value) == 2 else None
            if lens != tuple(cfg.depths[2:]):
                raise ValueError(
                    f"UniFormer: {name} must hold one entry per block of stages 3 and 4 "
                    f"(depths[2:] = {tuple(cfg.depths[2:])}), got {value!r}"
                )
        if cfg.prune_ratios[0][0] != 1:
            raise ValueError(f"UniFormer: the first block of stage 3 must keep every token "
                             f"(prune_ratios[0][0] = 1), got {cfg.prune_ratios[0][0]}")  # fmt: skip
        if any(not 0 < r <= 1 for stage in cfg.prune_ratios for r in stage):
            raise ValueError(f"UniFormer: prune_ratios must be in (0, 1], got "
                             f"{cfg.prune_ratios!r}")  # fmt: skip
    if cfg.num_classes < 0:
        raise ValueError(f"UniFormer: num_classes must be >= 0, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"UniFormer: drop_path_rate must be in [0, 1), got "
                         f"{cfg.drop_path_rate!r}")  # fmt: skip


def min_input_size(cfg: Any) -> int:
    """Smallest H = W the model accepts (32: the last stage has at least one token)."""
    del cfg
    return MIN_INPUT_SIZE


class UniFormer(nn.Module):
    """UniFormer classifier (Li et al., https://arxiv.org/abs/2201.09450).

    A four-stage hierarchy (strides 4, 8, 16, 32) whose blocks all read
    ``DPE -> relation aggregator (MHRA) -> FFN``: in the two shallow stages the aggregator is
    local (`CBlock`: a learnable 5x5 depthwise affinity between BatchNorm'd 1x1 convs), in the
    two deep stages global (`SABlock`: multi-head self-attention). It unifies convolution and
    attention in one block form and spends attention only where it models long-range relations.
    Patch embeddings (conv ``p x p`` s ``p`` + LayerNorm) start every stage; final BatchNorm ->
    global average pooling -> Linear ``head``.

    The light models (XXS, XS; ``prune_ratios`` set, uniformer_light.py) add a class token in
    stage 3 (``cls_token``, zeros, upsampled to stage 4 by the Linear ``cls_upsample``) and use
    `EvoSABlock`, which keeps only the tokens with the highest class attention for the slow
    update. Training mode also returns the logits of the class token (``norm_cls``, a
    LayerNorm with ε 1e-5, then the Linear ``head_cls``): ``(logits, cls_logits)``, the
    official training output; evaluation returns ``logits``.

    Layout and parameter names follow the official code (``patch_embed1``, ``blocks3_0/attn/qkv``,
    ``norm``, ``head``), and so does the parameter count (checked by the registry test).
    Deviations: channels-last; BatchNorm follows Flax (momentum 0.9 = torch's 0.1, biased running
    variance); any input of at least 32x32 (the official ``PatchEmbed`` asserts the training
    size); the official ``representation_size`` pre-logits layer (unused by every model) is left
    out; see `EvoSABlock` for the light blocks' deviation.

    Train or eval, as ``NextViT``: ``train=True`` normalises with batch statistics and updates
    the running ones (apply with ``mutable=["batch_stats"]``), ``train=False`` uses the running
    statistics; ``train=None`` (default) trains when ``batch_stats`` is mutable or the model is
    initialising, and otherwise raises a ValueError. Dropout and drop path (off at the defaults)
    are active only in training and then need an rng named ``"dropout"``.

    Stage features: ``features=True`` returns the tuple of the four stage outputs
    ``[B, H/4, W/4, C1]`` ... ``[B, H/32, W/32, C4]`` (before the final BatchNorm) instead of the
    logits; ``num_classes=0`` returns the pooled features (and no class-token logits).

    Attributes:
      num_classes, depths, embed_dims, head_dim, mlp_ratios, qkv_bias, conv_stem,
        conv_downsample, layer_scale_init, prune_ratios, trade_offs, drop_rate, attn_drop_rate,
        drop_path_rate: see `UniFormerConfig`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = UniFormer(num_classes=10, depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64),
      ...                   head_dim=16)
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> model.apply(variables, x, train=False).shape
      (2, 10)
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (3, 4, 8, 3)
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    head_dim: int = 64
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0)
    qkv_bias: bool = True
    conv_stem: bool = False
    conv_downsample: bool = False
    layer_scale_init: float | None = None
    prune_ratios: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    trade_offs: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from a `UniFormerConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @property
    def light(self) -> bool:
        """Whether this is a light model (class token and token pruning in stages 3-4)."""
        return self.prune_ratios is not None

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W 3"], *, train: bool | None = None, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (see the class docstring for the other outputs).

        Args:
          x: NHWC images, H and W at least 32.
          train: see the class docstring.
          features: return the stage outputs instead.
        """
        _validate(self)
        train = resolve_train(self, train)
        if x.ndim != 4:
            raise ValueError(f"UniFormer: x must be NHWC [B, H, W, C], got shape {x.shape}")
        if x.shape[1] < MIN_INPUT_SIZE or x.shape[2] < MIN_INPUT_SIZE:
            raise ValueError(f"UniFormer: x of shape {x.shape} is too small; H and W must be at "
                             f"least {MIN_INPUT_SIZE} (total stride 32)")  # fmt: skip
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        det = not train
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        rates = drop_path_rates(tuple(self.depths), self.drop_path_rate)
        block_kw = dict(dropout=self.drop_rate, **kw)
        attn_kw = dict(head_dim=self.head_dim, qkv_bias=self.qkv_bias,
                       attn_drop=self.attn_drop_rate)  # fmt: skip

        def embed(i: int, y: Array) -> Array:
            c = self.embed_dims[i]
            name = f"patch_embed{i + 1}"
            if i == 0 and self.conv_stem:
                stem = HeadEmbedding(c, name=name, **kw)
            elif i == 0:
                stem = PatchEmbed(c, 4, name=name, **kw)
            elif self.conv_downsample:
                stem = MiddleEmbedding(c, name=name, **kw)
            else:
                stem = PatchEmbed(c, 2, name=name, **kw)
            return stem(y, train=train)

        outputs = []
        x = nn.Dropout(self.drop_rate, deterministic=det)(embed(0, x))  # official pos_drop
        for s in (0, 1):
            if s:
                x = embed(s, x)
            for j in range(self.depths[s]):
                x = CBlock(
                    mlp_ratio=self.mlp_ratios[s],
                    drop_path=rates[s][j],
                    layer_scale_init=self.layer_scale_init if self.light else None,
                    name=f"blocks{s + 1}_{j}",
                    **block_kw,
                )(x, train=train)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)
            outputs.append(x)

        cls_token = None
        if self.light:
            cls_token = self.param("cls_token", nn.initializers.zeros,
                                   (1, 1, self.embed_dims[2]), self.param_dtype)  # fmt: skip
            cls_token = jnp.broadcast_to(cls_token, (x.shape[0], 1, self.embed_dims[2]))
            cls_token = cls_token.astype(x.dtype)
        global_attn = None
        for s in (2, 3):
            x = embed(s, x)
            if self.light and s == 3:
                cls_token = nn.Dense(
                    self.embed_dims[3],
                    kernel_init=nn.with_logical_partitioning(
                        default_kernel_init, ("embed", "mlp")
                    ),  # fmt: skip
                    name="cls_upsample",
                    **kw,
                )(cls_token)
            for j in range(self.depths[s]):
                common = dict(
                    mlp_ratio=self.mlp_ratios[s],
                    drop_path=rates[s][j],
                    layer_scale_init=self.layer_scale_init,
                    name=f"blocks{s + 1}_{j}",
                    **attn_kw,
                    **block_kw,
                )
                if self.light:
                    cls_token, x, global_attn = EvoSABlock(
                        prune_ratio=self.prune_ratios[s - 2][j],
                        trade_off=self.trade_offs[s - 2][j],
                        downsample=s == 2 and j == self.depths[s] - 1,
                        **common,
                    )(cls_token, x, global_attn, train=train)
                else:
                    x = SABlock(**common)(x, train=train)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)
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
        if self.num_classes == 0:
            return x

        def head(name: str, y: Array) -> Array:
            return nn.Dense(
                self.num_classes,
                kernel_init=nn.with_logical_partitioning(
                    default_kernel_init, ("embed", "classes")
                ),  # fmt: skip
                name=name,
                **kw,
            )(y)

        logits = head("head", x)
        if not self.light or not (train or self.is_initializing()):
            return logits
        cls = nn.LayerNorm(EMBED_LN_EPSILON, name="norm_cls", **kw)(cls_token[:, 0])
        cls_logits = head("head_cls", cls)
        return (logits, cls_logits) if train else logits


_LIGHT_MLP = (3.0, 3.0, 3.0, 3.0)

UNIFORMER_PRESETS: dict[str, UniFormerConfig] = {
    "uniformer_small": UniFormerConfig(depths=(3, 4, 8, 3)),
    "uniformer_base": UniFormerConfig(depths=(5, 8, 20, 7)),
    "uniformer_xxs": UniFormerConfig(
        depths=(2, 5, 8, 2),
        embed_dims=(56, 112, 224, 448),
        head_dim=28,
        mlp_ratios=_LIGHT_MLP,
        conv_stem=True,
        prune_ratios=((1.0,) + (0.5,) * 7, (0.5,) * 2),
        trade_offs=((1.0,) + (0.5,) * 7, (0.5,) * 2),
    ),
    "uniformer_xs": UniFormerConfig(
        depths=(3, 5, 9, 3),
        embed_dims=(64, 128, 256, 512),
        head_dim=32,
        mlp_ratios=_LIGHT_MLP,
        conv_stem=True,
        prune_ratios=((1.0,) + (0.5,) * 8, (0.5,) * 3),
        trade_offs=((1.0,) + (0.5,) * 8, (0.5,) * 3),
    ),
}

# sum(p.numel() for p in model.parameters()) of the official uniformer.py / uniformer_light.py
# models (num_classes=1000; the light ones include their training-only norm_cls and head_cls).
# The README rounds them to 22M / 50M / 10.2M / 16.5M.
UNIFORMER_PARAMS: dict[str, int] = {
    "uniformer_small": 21_545_256,
    "uniformer_base": 49_776_552,
    "uniformer_xxs": 10_215_280,
    "uniformer_xs": 16_509_264,
}


def _example_image(config: UniFormerConfig) -> Array:
    size = min_input_size(config)
    n = 2 * size * size * 3
    return jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32).reshape(2, size, size, 3)


_PAPER = Paper(
    "UniFormer: Unifying Convolution and Self-attention for Visual Recognition",
    arxiv="2201.09450",
    code="https://github.com/Sense-X/UniFormer",
)
_SOURCE = (
    "sum of numel() over the parameters of the official Sense-X/UniFormer model "
    "(image_classification/models/{uniformer,uniformer_light}.py, num_classes=1000), counted "
    "with torch; the official README rounds them to 22M (S) / 50M (B) / 10.2M (XXS) / 16.5M (XS)"
)

_STANDARD = ("uniformer_small", "uniformer_base")
_LIGHT = ("uniformer_xxs", "uniformer_xs")

register_presets(
    UniFormer.from_config,
    {k: UNIFORMER_PRESETS[k] for k in _STANDARD},
    example_input=_example_image,
    doc="The official {name} (UniFormer, arXiv 2201.09450); kwargs override config fields.",
    paper=_PAPER,
    published_params={k: UNIFORMER_PARAMS[k] for k in _STANDARD},
    params_source=_SOURCE,
    tiny={
        "depths": (1, 1, 1, 1),
        "embed_dims": (16, 32, 48, 64),
        "head_dim": 16,
        "num_classes": 10,
    },  # fmt: skip
)

register_presets(
    UniFormer.from_config,
    {k: UNIFORMER_PRESETS[k] for k in _LIGHT},
    example_input=_example_image,
    doc="The official light {name} (UniFormer, arXiv 2201.09450, uniformer_light.py: class "
    "token and token pruning); kwargs override config fields.",
    paper=_PAPER,
    published_params={k: UNIFORMER_PARAMS[k] for k in _LIGHT},
    params_source=_SOURCE,
    tiny={
        "depths": (1, 1, 2, 1),
        "embed_dims": (16, 32, 48, 64),
        "head_dim": 16,
        "prune_ratios": ((1.0, 0.5), (0.5,)),
        "trade_offs": ((1.0, 0.5), (0.5,)),
        "num_classes": 10,
    },
)
