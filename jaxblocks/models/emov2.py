"""EMOv2: an efficient hybrid backbone built only from i²RMB blocks.

Zhang et al., "EMOv2: Pushing 5M Vision Model Frontier", https://arxiv.org/abs/2412.06674.
Official code: zhangzjn/EMOv2 ``model/lib_emo/emo2.py`` (``EMO2``,
``EMO2_{1M,2M,5M,20M}_k5_hybrid``), whose 224-pixel models this file registers as
``emov2_1m``, ``emov2_2m``, ``emov2_5m``, ``emov2_20m``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.blocks.emov2 import (
    ACTIVATION_AXES,
    BN_MOMENTUM,
    EOPS,
    IIRMB,
    NORM_EPSILON,
    ConvNormAct,
    gelu,
)
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.models.inception_next import drop_path_rates
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "ACTIVATIONS",
    "EMOV2_PARAMS",
    "EMOV2_PRESETS",
    "EMOV2_TRAIN_DROP_PATH",
    "EMOv2",
    "EMOv2Config",
    "EMOv2Stage",
]

Dtype = Any
# The official get_act names used by EMOv2 (timm's GELU is the exact one).
ACTIVATIONS = {"silu": nn.silu, "gelu": gelu, "relu": nn.relu}
# The official _init_weights: trunc_normal(std=0.02) for the Linear head, zero bias.
head_kernel_init = nn.initializers.truncated_normal(0.02)


@dataclasses.dataclass(frozen=True)
class EMOv2Config:
    """Architecture of an `EMOv2` (https://arxiv.org/abs/2412.06674); the default is EMOv2-1M
    (the official ``EMO2_1M_k5_hybrid``).

    Stage ``i`` has ``depths[i]`` i²RMBs of width ``embed_dims[i]``. Its first block halves the
    resolution (stride-2 DW conv) with a conv EOP, expansion ``2 * exp_ratios[i]`` and no skip;
    the others keep it, with the EOPs ``eops[i]`` and expansion ``exp_ratios[i]``. The stem is
    conv 3x3 s2 (bias, BN, SiLU) -> DW 3x3 (BN, SiLU) -> 1x1 conv, ``embed_dims[0] // 2`` wide.

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled, normalised features.
      depths, embed_dims, exp_ratios: per stage.
      norms: ``"bn"`` / ``"ln"`` per stage (the pre-norm of its blocks; the last one is also
        the final norm).
      acts: ``"silu"`` / ``"gelu"`` / ``"relu"`` per stage (the EOPs').
      dw_kernels: depthwise kernel size per stage (5 in EMOv2, 3/5 in EMOv1).
      dim_heads, window_sizes: of the attention EOPs per stage (window 7 at 224 pixels, 8 at
        256/512; <= 0 attends globally).
      eops: the EOPs of the non-first blocks per stage (names from `EOPS`): ``("conv",)`` in
        stages 1-2 and ``("hybrid",)`` in 3-4 for EMOv2 (EMOv1: ``("remote",)``).
      qkv_bias: bias of the EOP convs (True in every released model).
      drop_rate: dropout before ``proj`` in every block (the official ``drop``, 0).
      attn_drop_rate: attention-weight dropout (0).
      drop_path_rate: stochastic depth, ``linspace(0, rate, sum(depths))`` over the blocks. The
        official models train with the rates of `EMOV2_TRAIN_DROP_PATH`; the presets use 0 so
        that training needs no rng unless asked.
      ls_init: layer-scale init of every block (1e-6).
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (2, 2, 8, 3)
    embed_dims: tuple[int, ...] = (32, 48, 80, 180)
    exp_ratios: tuple[float, ...] = (2.0, 2.5, 3.0, 3.5)
    norms: tuple[str, ...] = ("bn", "bn", "ln", "ln")
    acts: tuple[str, ...] = ("silu", "silu", "gelu", "gelu")
    dw_kernels: tuple[int, ...] = (5, 5, 5, 5)
    dim_heads: tuple[int, ...] = (16, 16, 20, 20)
    window_sizes: tuple[int, ...] = (7, 7, 7, 7)
    eops: tuple[tuple[str, ...], ...] = (("conv",), ("conv",), ("hybrid",), ("hybrid",))
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    ls_init: float = 1e-6

    def __post_init__(self):
        _validate(self)


_PER_STAGE = ("embed_dims", "exp_ratios", "norms", "acts", "dw_kernels", "dim_heads",
              "window_sizes", "eops")  # fmt: skip


def _validate(cfg: Any) -> None:
    """Shared checks of `EMOv2Config` and the `EMOv2` attributes."""
    n = len(cfg.depths)
    if not n or any(int(d) < 1 for d in cfg.depths):
        raise ValueError(f"EMOv2: depths must be a non-empty tuple of ints >= 1, got "
                         f"{cfg.depths!r}")  # fmt: skip
    for name in _PER_STAGE:
        if len(getattr(cfg, name)) != n:
            raise ValueError(f"EMOv2: {name} must have one entry per stage (len(depths) = {n}), "
                             f"got {getattr(cfg, name)!r}")  # fmt: skip
    if any(nm not in ("bn", "ln") for nm in cfg.norms):
        raise ValueError(f"EMOv2: norms must be 'bn' or 'ln', got {cfg.norms!r}")
    if any(a not in ACTIVATIONS for a in cfg.acts):
        raise ValueError(f"EMOv2: acts must be in {sorted(ACTIVATIONS)}, got {cfg.acts!r}")
    if any(not e or any(op not in EOPS for op in e) for e in cfg.eops):
        raise ValueError(f"EMOv2: eops must be non-empty tuples of {EOPS}, got {cfg.eops!r}")
    for i, (dim, dh, ops) in enumerate(zip(cfg.embed_dims, cfg.dim_heads, cfg.eops, strict=True)):
        if any(op != "conv" for op in ops) and cfg.depths[i] > 1:
            mid = int(dim * cfg.exp_ratios[i])
            if dh < 1 or dim % dh or mid % (dim // dh):
                raise ValueError(
                    f"EMOv2: stage {i}: embed_dims={dim} must be a multiple of dim_heads={dh} "
                    f"and the expanded width {mid} a multiple of the {max(dim // max(dh, 1), 1)} "
                    "heads"
                )
    if cfg.embed_dims[0] < 2:
        raise ValueError(f"EMOv2: embed_dims[0] must be >= 2, got {cfg.embed_dims[0]}")
    if cfg.num_classes < 0:
        raise ValueError(f"EMOv2: num_classes must be >= 0, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"EMOv2: drop_path_rate must be in [0, 1), got {cfg.drop_path_rate!r}")


class EMOv2Stage(nn.Module):
    """An EMOv2 stage (https://arxiv.org/abs/2412.06674): ``depth`` i²RMBs (`IIRMB`), the first
    one downsampling (stride 2, conv EOP, doubled expansion, no skip); named ``blocks_<j>``.

    Attributes:
      features: width of the stage.
      depth: number of blocks.
      exp_ratio, norm, act, dw_kernel, dim_head, window_size, eops, qkv_bias, ls_init: of the
        blocks (``eops`` of the non-first ones).
      drop_path_rates: one per block (None: all 0).
      drop_rate, attn_drop_rate: dropout before ``proj``; attention dropout.
      dtype, param_dtype: compute and parameter dtypes.
    """

    features: int
    depth: int
    exp_ratio: float = 4.0
    norm: str = "bn"
    act: str = "silu"
    dw_kernel: int = 5
    dim_head: int = 32
    window_size: int = 7
    eops: tuple[str, ...] = ("conv",)
    qkv_bias: bool = True
    ls_init: float = 1e-6
    drop_path_rates: tuple[float, ...] | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool = True
    ) -> Float[Array, "B h w D"]:
        """Apply the blocks; ``train`` for BatchNorm, ``deterministic`` for dropout/drop path."""
        rates = self.drop_path_rates or (0.0,) * self.depth
        for j in range(self.depth):
            first = j == 0
            x = IIRMB(
                self.features,
                exp_ratio=self.exp_ratio * 2 if first else self.exp_ratio,
                norm=self.norm,
                act=ACTIVATIONS[self.act],
                # the official code uses 5 for a first block whose stage has no DW conv
                dw_kernel=(self.dw_kernel if self.dw_kernel > 0 else 5)
                if first
                else self.dw_kernel,
                stride=2 if first else 1,
                dim_head=self.dim_head,
                window_size=self.window_size,
                eops=("conv",) if first else tuple(self.eops),
                qkv_bias=self.qkv_bias,
                has_skip=not first,
                attn_drop=self.attn_drop_rate,
                proj_drop=self.drop_rate,
                drop_path=rates[j],
                ls_init=self.ls_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{j}",
            )(x, train=train, deterministic=deterministic)
        return x


class EMOv2(nn.Module):
    """EMOv2 classifier (Zhang et al., https://arxiv.org/abs/2412.06674).

    A four-stage backbone made of one block type, the i²RMB (`IIRMB`): plain inverted residuals
    (1x1 expansion) in the high-resolution stages 1-2 and window attention (the hybrid EW-MHSA:
    dilated "remote" windows spanning the map plus contiguous "close" windows, summed) as the
    expansion in stages 3-4, with BatchNorm early and LayerNorm late. Stem (stride 2) -> stages
    (stride 2 each, /32 in all) -> final norm -> global average pooling -> Linear.

    Layout and parameter counts match the official ``EMO2`` exactly (the presets' counts are
    checked by the registry test). Deviations: channels-last; BatchNorm follows Flax (momentum
    0.9 = torch's 0.1, biased running variance); ``num_classes=0`` (pooled features) and
    ``features=True`` (stage outputs) are additions; the official ``attn_pre``/``v_group`` and
    conv-EOP kernel/groups switches (off in every released model) are not implemented; the
    presets train without stochastic depth unless ``drop_path_rate`` is set (official rates in
    `EMOV2_TRAIN_DROP_PATH`).

    Train or eval, as ``NextViT``: ``train=True`` normalises with batch statistics and updates
    the running ones (apply with ``mutable=["batch_stats"]``), ``train=False`` uses the running
    statistics; ``train=None`` (default) trains when the ``batch_stats`` collection is mutable
    or the model is initialising, and otherwise raises a ValueError. Dropout and drop path
    (off at the defaults) are active only in training and then need an rng named ``"dropout"``.

    Stage features: ``features=True`` returns the tuple of the stages' outputs
    ``[B, H/4, W/4, C1]``, ..., ``[B, H/32, W/32, C4]`` (before the final norm, as the official
    detection/segmentation backbones) instead of the logits.

    Attributes:
      num_classes, depths, embed_dims, exp_ratios, norms, acts, dw_kernels, dim_heads,
        window_sizes, eops, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, ls_init: see
        `EMOv2Config`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = EMOv2(num_classes=10, depths=(1, 1, 2, 2), embed_dims=(8, 16, 16, 24),
      ...               dim_heads=(8, 8, 8, 8), window_sizes=(3, 3, 3, 3))
      >>> x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> model.apply(variables, x, train=False).shape
      (2, 10)
    """

    num_classes: int = 1000
    depths: tuple[int, ...] = (2, 2, 8, 3)
    embed_dims: tuple[int, ...] = (32, 48, 80, 180)
    exp_ratios: tuple[float, ...] = (2.0, 2.5, 3.0, 3.5)
    norms: tuple[str, ...] = ("bn", "bn", "ln", "ln")
    acts: tuple[str, ...] = ("silu", "silu", "gelu", "gelu")
    dw_kernels: tuple[int, ...] = (5, 5, 5, 5)
    dim_heads: tuple[int, ...] = (16, 16, 20, 20)
    window_sizes: tuple[int, ...] = (7, 7, 7, 7)
    eops: tuple[tuple[str, ...], ...] = (("conv",), ("conv",), ("hybrid",), ("hybrid",))
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    ls_init: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from an `EMOv2Config`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W 3"], *, train: bool | None = None, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (pooled features if ``num_classes == 0``).

        Args:
          x: NHWC images (any H, W >= 1; 224 for the published numbers).
          train: see the class docstring.
          features: return the stage outputs instead (see the class docstring).
        """
        _validate(self)
        train = resolve_train(self, train)
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(f"EMOv2: x must be NHWC [B, H, W, C], got shape "
                             f"{getattr(x, 'shape', type(x).__name__)}")  # fmt: skip
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        deterministic = not train
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        c0 = self.embed_dims[0] // 2
        x = ConvNormAct(c0, 3, 2, use_bias=True, act=nn.silu, name="stem_0", **kw)(x, train=train)
        x = ConvNormAct(c0, 3, 1, groups=c0, act=nn.silu, name="stem_1", **kw)(x, train=train)
        x = ConvNormAct(c0, 1, use_norm=False, name="stem_2", **kw)(x, train=train)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        rates = drop_path_rates(tuple(self.depths), self.drop_path_rate)
        outputs = []
        for i, depth in enumerate(self.depths):
            x = EMOv2Stage(
                self.embed_dims[i],
                depth,
                exp_ratio=self.exp_ratios[i],
                norm=self.norms[i],
                act=self.acts[i],
                dw_kernel=self.dw_kernels[i],
                dim_head=self.dim_heads[i],
                window_size=self.window_sizes[i],
                eops=tuple(self.eops[i]),
                qkv_bias=self.qkv_bias,
                ls_init=self.ls_init,
                drop_path_rates=tuple(rates[i]),
                drop_rate=self.drop_rate,
                attn_drop_rate=self.attn_drop_rate,
                name=f"stages_{i}",
                **kw,
            )(x, train=train, deterministic=deterministic)
            outputs.append(x)
        if features:
            return tuple(outputs)
        if self.norms[-1] == "bn":
            x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=NORM_EPSILON, name="norm", **kw)(x)  # fmt: skip
        else:
            x = nn.LayerNorm(NORM_EPSILON, name="norm", **kw)(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)  # [B, C]
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(head_kernel_init, ("embed", "classes")),
            name="head",
            **kw,
        )(x)


_EMOV2_EOPS = (("conv",), ("conv",), ("hybrid",), ("hybrid",))

EMOV2_PRESETS: dict[str, EMOv2Config] = {
    "emov2_1m": EMOv2Config(),
    "emov2_2m": EMOv2Config(depths=(3, 3, 9, 3), embed_dims=(32, 48, 120, 200)),
    "emov2_5m": EMOv2Config(
        depths=(3, 3, 9, 3),
        embed_dims=(48, 72, 160, 288),
        exp_ratios=(2.0, 3.0, 4.0, 4.0),
        dim_heads=(16, 24, 32, 32),
    ),
    "emov2_20m": EMOv2Config(
        depths=(3, 3, 13, 3),
        embed_dims=(64, 128, 320, 448),
        exp_ratios=(2.0, 3.0, 4.0, 4.0),
        dim_heads=(16, 32, 32, 32),
    ),
}

# The drop_path of the official EMO2_*_k5_hybrid constructors (training recipe, not structure).
EMOV2_TRAIN_DROP_PATH: dict[str, float] = {
    "emov2_1m": 0.04036,
    "emov2_2m": 0.05,
    "emov2_5m": 0.05,
    "emov2_20m": 0.1,
}

# sum(p.numel() for p in EMO2_*_k5_hybrid().parameters()) of the official model/lib_emo/emo2.py
# (num_classes=1000), computed by running the official file. The official training logs
# (resources/Cls/log_train_EMOv2_{1M,2M,5M}_224.txt, fvcore table) print 1.461M / 2.384M /
# 5.126M; the README truncates them to 1.4M / 2.3M / 5.1M. EMOv2-20M has no classification log
# or README row: its count is the official constructor's.
EMOV2_PARAMS: dict[str, int] = {
    "emov2_1m": 1_460_844,
    "emov2_2m": 2_384_312,
    "emov2_5m": 5_126_440,
    "emov2_20m": 20_195_208,
}


def _example_image(config: EMOv2Config) -> Array:
    return jax.random.normal(jax.random.key(0), (2, 32, 32, 3), jnp.float32)


register_presets(
    EMOv2.from_config,
    EMOV2_PRESETS,
    example_input=_example_image,
    doc="EMOv2 {name} (arXiv 2412.06674, official EMO2_*_k5_hybrid at 224 pixels); kwargs "
    "override config fields.",
    paper=Paper(
        "EMOv2: Pushing 5M Vision Model Frontier",
        arxiv="2412.06674",
        code="https://github.com/zhangzjn/EMOv2",
    ),
    published_params=EMOV2_PARAMS,
    params_source="official zhangzjn/EMOv2 model/lib_emo/emo2.py EMO2_{1M,2M,5M,20M}_k5_hybrid "
    "(num_classes=1000): sum of numel(); the official training logs print 1.461M / 2.384M / "
    "5.126M (fvcore), the README truncates to 1.4M / 2.3M / 5.1M; 20M: official constructor only",
    tiny={
        "depths": (1, 1, 2, 2),
        "embed_dims": (16, 24, 32, 40),
        "exp_ratios": (2.0, 2.0, 3.0, 3.5),
        "dim_heads": (8, 8, 16, 20),
        "window_sizes": (3, 3, 3, 3),
        "num_classes": 10,
    },
)
