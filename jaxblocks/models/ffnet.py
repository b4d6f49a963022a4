"""FFNet image classifiers (FFNet-1, -2, -3, -4) built from `FFBlock`.

Yun, Lee, Ro, "FFNet: MetaMixer-based Efficient Convolutional Mixer Design" (first posted as
"MetaMixer Is All You Need"), https://arxiv.org/abs/2406.02021. Official code: ysj9909/FFNet
``models/ffnet.py`` (presets ``ffnet_1`` ... ``ffnet_4``, layout and initialisers follow it),
``export_model.py`` (``replace_batchnorm``: the deploy form, here `reparameterize`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.ffnet import (
    BN_EPSILON,
    BN_MOMENTUM,
    REPVGG_KERNEL_SIZE,
    Conv2dBN,
    FFBlock,
    PatchMerging,
    default_kernel_init,
    reparameterize,
    se_width,
)
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.models.inception_next import drop_path_rates
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "FFNET_DEPLOY_PARAMS",
    "FFNET_PARAMS",
    "FFNET_PRESETS",
    "FFNet",
    "FFNetConfig",
    "FFNetStage",
    "ffnet_param_count",
    "reparameterize",
]

Dtype = Any
ACTIVATION_AXES = ("batch", "height", "width", "channels")
LN_EPSILON = 1e-6  # timm's LayerNorm2d, the official ``layer_norm_last`` option
_PER_STAGE = (
    "embed_dims",
    "kernel_sizes",
    "kernel_sizes1",
    "kernel_sizes2",
    "use_gelus",
    "use_ses",
    "expansion_ratios",
)


@dataclasses.dataclass(frozen=True)
class FFNetConfig:
    """Architecture of an `FFNet` (https://arxiv.org/abs/2406.02021).

    The default is the official ``ffnet_1``; `FFNET_PRESETS` holds all four. Names follow the
    official ``FFNet.__init__`` arguments (``depth`` -> ``depths``, ``embed_dim`` ->
    ``embed_dims``).

    Attributes:
      num_classes: classifier outputs; 0 returns the normalised pooled features.
      embed_dims: channels per stage; each a multiple of the previous one (the downsampling
        `RepVGGDW` is depthwise with a channel multiplier).
      in_dim: width of the stem's first conv (64).
      depths: blocks per stage.
      kernel_sizes: the channel mixer's depthwise size per stage (FFNet-1: 3; others: 7).
      kernel_sizes1, kernel_sizes2: the token mixer's two depthwise sizes per stage (3, 3, 7, 7).
      use_gelus: GELU (True) or ReLU per stage.
      use_ses: SE after the token mixer of the even blocks of each stage (all False).
      expansion_ratios: the channel mixer's hidden width / C per stage (3).
      use_layer_scale, layer_scale_init_value: per-branch layer scale (FFNet-3/4: on, 1e-6;
        the official class default 1e-5 applies when switched on otherwise).
      drop_path_rate: stochastic depth, rising linearly from 0 over all blocks. The official
        presets train with 0.1 / 0.15 / 0.35 / 0.4 (FFNet-1 ... 4); the presets here use 0 so
        that training needs no rng unless asked (pass ``drop_path_rate=0.1`` to train as the
        paper).
      layer_norm_last: LayerNorm (eps 1e-6) instead of BatchNorm before pooling (off).
    """

    num_classes: int = 1000
    embed_dims: tuple[int, ...] = (80, 160, 320, 640)
    in_dim: int = 64
    depths: tuple[int, ...] = (2, 2, 8, 2)
    kernel_sizes: tuple[int, ...] = (3, 3, 3, 3)
    kernel_sizes1: tuple[int, ...] = (3, 3, 7, 7)
    kernel_sizes2: tuple[int, ...] = (3, 3, 7, 7)
    use_gelus: tuple[bool, ...] = (True, True, True, True)
    use_ses: tuple[bool, ...] = (False, False, False, False)
    expansion_ratios: tuple[float, ...] = (3, 3, 3, 3)
    use_layer_scale: bool = False
    layer_scale_init_value: float = 1e-5
    drop_path_rate: float = 0.0
    layer_norm_last: bool = False

    def __post_init__(self):
        _validate(self)


def _validate(cfg: Any) -> None:
    """Shared checks of `FFNetConfig` and the `FFNet` attributes."""
    depths = tuple(cfg.depths)
    if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
        raise ValueError(f"FFNet: depths must be a non-empty tuple of ints >= 1, got "
                         f"{cfg.depths!r}")  # fmt: skip
    for name in _PER_STAGE:
        if len(tuple(getattr(cfg, name))) != len(depths):
            raise ValueError(f"FFNet: {name} must have one entry per stage (len(depths) = "
                             f"{len(depths)}), got {getattr(cfg, name)!r}")  # fmt: skip
    dims = tuple(cfg.embed_dims)
    if any(not isinstance(c, int) or c < 1 for c in dims) or cfg.in_dim < 1:
        raise ValueError(f"FFNet: embed_dims and in_dim must be positive ints, got "
                         f"{cfg.embed_dims!r}, {cfg.in_dim!r}")  # fmt: skip
    if any(b % a for a, b in zip(dims[:-1], dims[1:], strict=True)):
        raise ValueError(
            f"FFNet: each of embed_dims {dims} must be a multiple of the previous one (the "
            "downsampling RepVGGDW is depthwise: groups = input channels)"
        )
    kernels = tuple(cfg.kernel_sizes) + tuple(cfg.kernel_sizes1) + tuple(cfg.kernel_sizes2)
    if any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernels):
        raise ValueError(
            f"FFNet: kernel sizes must be odd positive ints (7 builds a RepVGGDW), got "
            f"kernel_sizes={cfg.kernel_sizes!r}, kernel_sizes1={cfg.kernel_sizes1!r}, "
            f"kernel_sizes2={cfg.kernel_sizes2!r}"
        )
    if cfg.num_classes < 0:
        raise ValueError(f"FFNet: num_classes must be >= 0, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"FFNet: drop_path_rate must be in [0, 1), got {cfg.drop_path_rate!r}")


class FFNetStage(nn.Module):
    """An FFNet stage (https://arxiv.org/abs/2406.02021): optional `PatchMerging`
    (``downsample``; the official ``stages.i.0``), then `FFBlock` s (``blocks_j``; official
    ``stages.i.{j + 1}``, or ``stages.0.j`` in the first stage). SE, when on, is used by the
    even blocks only, as the official code.

    Attributes:
      features: channels of the stage.
      depth: number of blocks.
      downsample: start with a `PatchMerging` (every stage but the first).
      kernel_size, kernel_size1, kernel_size2, expansion_ratio, use_gelu, use_se,
        use_layer_scale, layer_scale_init_value: of the blocks (see `FFBlock`).
      drop_path_rates: one per block (None: all 0).
      deploy: the fused form.
      dtype, param_dtype: compute and parameter dtypes.
    """

    features: int
    depth: int
    downsample: bool = True
    kernel_size: int = 3
    kernel_size1: int = 3
    kernel_size2: int = 3
    expansion_ratio: float = 3.0
    use_gelu: bool = True
    use_se: bool = False
    use_layer_scale: bool = False
    layer_scale_init_value: float = 1e-5
    drop_path_rates: tuple[float, ...] | None = None
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool = True
    ) -> Float[Array, "B h w D"]:
        """Apply the stage; ``train`` for BatchNorm, ``deterministic`` for drop path."""
        kw = dict(deploy=self.deploy, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.downsample:
            x = PatchMerging(self.features, name="downsample", **kw)(x, train=train)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        rates = self.drop_path_rates or (0.0,) * self.depth
        for j in range(self.depth):
            x = FFBlock(
                kernel_size=self.kernel_size,
                kernel_size1=self.kernel_size1,
                kernel_size2=self.kernel_size2,
                expansion_ratio=self.expansion_ratio,
                use_se=self.use_se and j % 2 == 0,
                use_gelu=self.use_gelu,
                drop_path=rates[j],
                use_layer_scale=self.use_layer_scale,
                layer_scale_init_value=self.layer_scale_init_value,
                name=f"blocks_{j}",
                **kw,
            )(x, train=train, deterministic=deterministic)
            x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        return x


class FFNet(nn.Module):
    """FFNet classifier (Yun et al., https://arxiv.org/abs/2406.02021).

    A four-stage pure ConvNet of MetaMixer blocks (`FFBlock`: FFNified attention + a
    depthwise-conv FFN): stem `Conv2dBN` 3x3 stride 2 (``in_dim``) -> GELU -> `Conv2dBN` 3x3
    stride 2; stages 2-4 start with a `PatchMerging` (stride-2 RepVGGDW + residual 1x1); then
    BatchNorm -> global average pooling -> Linear. Every BatchNorm but the last sits right after
    or before a conv, and the parallel RepVGGDW branches merge, so the model folds into plain
    convs for inference (``deploy``, `reparameterize`).

    Parameter layout and count match the official ``FFNet`` (the registry test checks the train
    form's counts, the tests the deploy form's). Deviations: channels-last; BatchNorm follows
    Flax (momentum 0.9 = torch's 0.1, biased running variance, see `jaxblocks.blocks.ffnet`);
    the deploy form is built from trained variables by the pure function `reparameterize`
    rather than by replacing modules; the ``distillation`` flag (unused by the official model)
    and the checkpoint loaders are left out; the presets' ``drop_path_rate`` is 0 (see
    `FFNetConfig`).

    Train or eval: ``train=True`` normalises with batch statistics and updates the running ones
    (apply with ``mutable=["batch_stats"]``), ``train=False`` uses the running statistics;
    ``train=None`` (default) trains when the ``batch_stats`` collection is mutable or the model
    is initialising, and otherwise raises a ValueError. The deploy form is for inference only
    (its final BatchNorm keeps its running statistics). Drop path (off at the defaults) needs an
    rng named ``"dropout"``.

    Stage features: ``features=True`` returns the tuple of the stages' outputs
    ``[B, H/4s, W/4s, C]`` (before the final norm) instead of the logits; ``num_classes=0``
    returns the normalised pooled features.

    Attributes:
      num_classes, embed_dims, in_dim, depths, kernel_sizes, kernel_sizes1, kernel_sizes2,
        use_gelus, use_ses, expansion_ratios, use_layer_scale, layer_scale_init_value,
        drop_path_rate, layer_norm_last: see `FFNetConfig`.
      deploy: the fused inference form (variables from `reparameterize`).
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = FFNet(num_classes=10, embed_dims=(8, 16), in_dim=8, depths=(1, 1),
      ...               kernel_sizes=(3, 7), kernel_sizes1=(3, 7), kernel_sizes2=(3, 7),
      ...               use_gelus=(True, True), use_ses=(False, False),
      ...               expansion_ratios=(3, 3))
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> model.apply(variables, x, train=False).shape
      (2, 10)
      >>> model.clone(deploy=True).apply(reparameterize(variables), x).shape
      (2, 10)
    """

    num_classes: int = 1000
    embed_dims: tuple[int, ...] = (80, 160, 320, 640)
    in_dim: int = 64
    depths: tuple[int, ...] = (2, 2, 8, 2)
    kernel_sizes: tuple[int, ...] = (3, 3, 3, 3)
    kernel_sizes1: tuple[int, ...] = (3, 3, 7, 7)
    kernel_sizes2: tuple[int, ...] = (3, 3, 7, 7)
    use_gelus: tuple[bool, ...] = (True, True, True, True)
    use_ses: tuple[bool, ...] = (False, False, False, False)
    expansion_ratios: tuple[float, ...] = (3, 3, 3, 3)
    use_layer_scale: bool = False
    layer_scale_init_value: float = 1e-5
    drop_path_rate: float = 0.0
    layer_norm_last: bool = False
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from an `FFNetConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    def _resolve_train(self, train: bool | None) -> bool:
        if self.deploy:
            if train:
                raise ValueError("FFNet: deploy=True is the inference form; train=True needs the "
                                 "train form (deploy=False)")  # fmt: skip
            if train is not None and not isinstance(train, bool):
                raise TypeError(f"FFNet: train must be a bool or None, got {train!r}")
            return False
        return resolve_train(self, train)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool | None = None, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (normalised pooled features if ``num_classes == 0``).

        Args:
          x: NHWC images (any H, W >= 1; the official models run at 256 x 256).
          train: see the class docstring.
          features: return the stage outputs instead (see the class docstring).
        """
        _validate(self)
        train = self._resolve_train(train)
        if x.ndim != 4:
            raise ValueError(f"FFNet: x must be NHWC [B, H, W, C] (4-D), got shape {x.shape}")
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise ValueError(f"FFNet: x of shape {x.shape} has an empty spatial axis")
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        dtype = x.dtype
        deterministic = not train
        kw = dict(deploy=self.deploy, dtype=dtype, param_dtype=self.param_dtype)

        # Names follow the official Sequential ``patch_embed.0`` / ``patch_embed.2``.
        x = Conv2dBN(self.in_dim, 3, stride=2, name="patch_embed_0", **kw)(x, train=train)
        x = nn.gelu(x, approximate=False)
        x = Conv2dBN(self.embed_dims[0], 3, stride=2, name="patch_embed_2", **kw)(x, train=train)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        rates = drop_path_rates(tuple(self.depths), self.drop_path_rate)
        outputs = []
        for i, dim in enumerate(self.embed_dims):
            x = FFNetStage(
                features=dim,
                depth=self.depths[i],
                downsample=i > 0,
                kernel_size=self.kernel_sizes[i],
                kernel_size1=self.kernel_sizes1[i],
                kernel_size2=self.kernel_sizes2[i],
                expansion_ratio=self.expansion_ratios[i],
                use_gelu=self.use_gelus[i],
                use_se=self.use_ses[i],
                use_layer_scale=self.use_layer_scale,
                layer_scale_init_value=self.layer_scale_init_value,
                drop_path_rates=tuple(rates[i]),
                name=f"stages_{i}",
                **kw,
            )(x, train=train, deterministic=deterministic)
            outputs.append(x)
        if features:
            return tuple(outputs)
        if self.layer_norm_last:
            x = nn.LayerNorm(
                epsilon=LN_EPSILON, dtype=dtype, param_dtype=self.param_dtype, name="norm"
            )(x)
        else:
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                dtype=dtype,
                param_dtype=self.param_dtype,
                name="norm",
            )(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)  # [B, C]
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(default_kernel_init, ("embed", "classes")),
            name="head",
        )(x)


def _dw_params(c_in: int, c_out: int, k: int, deploy: bool, *, bn: bool) -> int:
    """A depthwise conv of size k as the official mixers build it (see `jaxblocks.blocks.ffnet`)."""
    if k == REPVGG_KERNEL_SIZE:
        if deploy:
            return c_out * k * k + c_out
        return c_out * k * k + 2 * c_out + c_out * (k // 2) ** 2 + 2 * c_out
    if not bn:
        return c_out * k * k + c_out  # plain conv with bias
    return c_out * k * k + (c_out if deploy else 2 * c_out)


def ffnet_param_count(config: FFNetConfig, *, deploy: bool = False, in_chans: int = 3) -> int:
    """Parameter count of an FFNet from its config in closed form (official layout; ``deploy``
    counts the fused form, as after the official ``replace_batchnorm``)."""
    bn = (lambda c: c) if deploy else (lambda c: 2 * c)  # Conv2d_BN's BN | the fused bias
    c0 = config.embed_dims[0]
    n = in_chans * config.in_dim * 9 + bn(config.in_dim) + config.in_dim * c0 * 9 + bn(c0)
    prev = c0
    for i, dim in enumerate(config.embed_dims):
        if i > 0:
            n += _dw_params(prev, dim, REPVGG_KERNEL_SIZE, deploy, bn=True)
            n += dim * dim + (dim if deploy else 2 * dim)  # BN -> 1x1 + skip
        hidden = int(dim * config.expansion_ratios[i])
        block = dim * dim + bn(dim)  # token mixer fc
        block += _dw_params(dim, dim, config.kernel_sizes1[i], deploy, bn=False)
        block += _dw_params(dim, dim, config.kernel_sizes2[i], deploy, bn=False)
        block += _dw_params(dim, dim, config.kernel_sizes[i], deploy, bn=True)
        block += dim * hidden + hidden + hidden * dim + dim  # fc1, fc2
        block += 2 * dim if config.use_layer_scale else 0
        n += block * config.depths[i]
        if config.use_ses[i]:
            r = se_width(dim)
            n += (dim * r + r + r * dim + dim) * ((config.depths[i] + 1) // 2)
        prev = dim
    n += 2 * prev  # final norm (BatchNorm or LayerNorm), not fused by the official code
    if config.num_classes:
        n += prev * config.num_classes + config.num_classes
    return n


_FFNET_34 = dict(use_layer_scale=True, layer_scale_init_value=1e-6, kernel_sizes=(7, 7, 7, 7))
FFNET_PRESETS: dict[str, FFNetConfig] = {
    "ffnet_1": FFNetConfig(),
    "ffnet_2": FFNetConfig(
        depths=(3, 3, 15, 3), embed_dims=(88, 176, 352, 704), kernel_sizes=(7, 7, 7, 7)
    ),
    "ffnet_3": FFNetConfig(depths=(4, 4, 22, 5), embed_dims=(96, 192, 384, 768), **_FFNET_34),
    "ffnet_4": FFNetConfig(depths=(4, 4, 27, 3), embed_dims=(128, 256, 512, 1024), **_FFNET_34),
}

# sum(p.numel() for p in model.parameters()) of the official models/ffnet.py (ysj9909/FFNet at
# f3c3e4c, torch 2.14, num_classes=1000) in the train form the presets build (equal to the
# closed form `ffnet_param_count`; the tests check both).
FFNET_PARAMS: dict[str, int] = {
    "ffnet_1": 13_775_656,
    "ffnet_2": 27_208_408,
    "ffnet_3": 48_817_896,
    "ffnet_4": 79_868_968,
}
# The same after the official export_model.replace_batchnorm() (every ``fuse``): the deploy form
# (``deploy=True`` here). These are the README's rounded #params: 13.7M / 26.9M / 48.3M / 79.2M.
FFNET_DEPLOY_PARAMS: dict[str, int] = {
    "ffnet_1": 13_660_152,
    "ffnet_2": 26_908_440,
    "ffnet_3": 48_330_632,
    "ffnet_4": 79_200_360,
}


def _example_image(config: FFNetConfig) -> Array:
    size = 32
    n = 2 * size * size * 3
    return jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32).reshape(2, size, size, 3)


register_presets(
    FFNet.from_config,
    FFNET_PRESETS,
    example_input=_example_image,
    doc="The official {name} (FFNet / MetaMixer, arXiv 2406.02021); kwargs override config fields.",
    paper=Paper(
        "FFNet: MetaMixer-based Efficient Convolutional Mixer Design",
        arxiv="2406.02021",
        code="https://github.com/ysj9909/FFNet",
    ),
    published_params=FFNET_PARAMS,
    params_source="official ysj9909/FFNet models/ffnet.py (commit f3c3e4c) run with torch: "
    "sum(p.numel() for p in model.parameters()) at num_classes=1000 in the train (unfused) form "
    "the presets build, equal to the closed form ffnet_param_count. The README's #params "
    "(13.7M, 26.9M, 48.3M, 79.2M) are of the deploy form after export_model.replace_batchnorm: "
    "FFNET_DEPLOY_PARAMS, checked with deploy=True",
    # One tiny model for all four presets (one registry compile): 4 stages with both the 3x3
    # and the RepVGGDW (7x7) forms of every depthwise conv, and layer scale (FFNet-3/4; 0.5 so
    # that the blocks matter in the checks).
    tiny={
        "embed_dims": (8, 16, 32, 64),
        "in_dim": 8,
        "depths": (1, 1, 1, 1),
        "kernel_sizes": (3, 3, 7, 7),
        "use_layer_scale": True,
        "layer_scale_init_value": 0.5,
        "num_classes": 10,
    },
)
