"""MOAT: alternating mobile convolution (MBConv) and attention, the MOAT and tiny-MOAT families.

Yang et al., "MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision Models",
https://arxiv.org/abs/2210.01820. Official code (TF2/Keras): google-research/deeplab2
``model/pixel_encoder/moat.py`` (configs ``moat0_config`` ... ``tiny_moat3_config``) with the
blocks of ``model/layers/moat_blocks.py``; its test ``model/pixel_encoder/moat_test.py`` fixes
the parameter counts registered here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.blocks.moat import (
    ACTIVATION_AXES,
    BN_EPSILON,
    BN_MOMENTUM,
    CONV_AXES,
    LN_EPSILON,
    MBConvBlock,
    MOATBlock,
    default_kernel_init,
    gelu,
)
from jaxblocks.layers.conv_bn import resolve_train
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = [
    "MOAT",
    "MOAT_PARAMS",
    "MOAT_PRESETS",
    "MOATConfig",
    "min_input_size",
    "moat_drop_path_rates",
]

Dtype = Any
BLOCK_TYPES = ("mbconv", "moat")


@dataclasses.dataclass(frozen=True)
class MOATConfig:
    """Architecture of a `MOAT` (https://arxiv.org/abs/2210.01820).

    The default is tiny-MOAT-0 (deeplab2's ``tiny_moat0_config``); `MOAT_PRESETS` holds the
    others. The official training drop-path rates (``1 - survival_prob``) are tiny-MOAT-0/1/2:
    0, tiny-MOAT-3: 0.1, MOAT-0: 0.2, MOAT-1/2: 0.3, MOAT-3: 0.6, MOAT-4: 0.7; the presets use 0
    so that training needs no rng unless asked.

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled features (no final LayerNorm, as
        the official model without a classification head).
      stem_size: widths of the stem's 3x3 convs (first stride 2; conv -> BN -> GELU between
        them, none after the last).
      block_types: ``"mbconv"`` or ``"moat"`` per stage.
      num_blocks: blocks per stage.
      hidden_sizes: output width of each stage.
      stage_strides: stride of the first block of each stage.
      expansion_rate: MBConv expansion of the output width (4).
      se_ratio: SE bottleneck / output width in MBConv blocks (0.25); None: no SE.
      head_size: channels per attention head (32).
      window_sizes: per stage, ``(height, width)`` attention windows or None for global
        attention (the official classification models: global everywhere).
      position_embedding_sizes: per stage, the side ``P`` of the learned relative-position
        tables (official: 14 at stride 16, 7 at stride 32; interpolated to the map or window).
      relative_position_embedding: False builds the official "no PE" models.
      global_attention_at_end_of_moat_stage: the last block of each MOAT stage attends
        globally whatever ``window_sizes`` says (official option for dense tasks).
      pool_size: shortcut pooling of the downsampling blocks: 2 (the official ``MOAT`` class
        default, for classification) or 3 (deeplab2's ``get_model`` default, for dense tasks).
      kernel_size: depthwise kernel (3).
      ln_epsilon: of the attention and final LayerNorms (1e-5).
      drop_path_rate: stochastic depth, block ``i`` of ``n`` gets ``rate * i / n`` (official).
    """

    num_classes: int = 1000
    stem_size: tuple[int, ...] = (32, 32)
    block_types: tuple[str, ...] = ("mbconv", "mbconv", "moat", "moat")
    num_blocks: tuple[int, ...] = (2, 3, 7, 2)
    hidden_sizes: tuple[int, ...] = (32, 64, 128, 256)
    stage_strides: tuple[int, ...] = (2, 2, 2, 2)
    expansion_rate: int = 4
    se_ratio: float | None = 0.25
    head_size: int = 32
    window_sizes: tuple[tuple[int, int] | None, ...] = (None, None, None, None)
    position_embedding_sizes: tuple[int | None, ...] = (None, None, 14, 7)
    relative_position_embedding: bool = True
    global_attention_at_end_of_moat_stage: bool = False
    pool_size: int = 2
    kernel_size: int = 3
    ln_epsilon: float = LN_EPSILON
    drop_path_rate: float = 0.0

    def __post_init__(self):
        _validate(self)


def _validate(cfg: Any) -> None:
    """Shared checks of `MOATConfig` and the `MOAT` attributes."""
    n = len(cfg.block_types)
    if not n:
        raise ValueError("MOAT: block_types must name at least one stage")
    for name in ("num_blocks", "hidden_sizes", "stage_strides", "window_sizes",
                 "position_embedding_sizes"):  # fmt: skip
        if len(getattr(cfg, name)) != n:
            raise ValueError(f"MOAT: {name} must have one entry per stage (len(block_types) = "
                             f"{n}), got {getattr(cfg, name)!r}")  # fmt: skip
    bad = [t for t in cfg.block_types if t not in BLOCK_TYPES]
    if bad:
        raise ValueError(f"MOAT: block_types must be 'mbconv' or 'moat', got {cfg.block_types!r}")
    if not cfg.stem_size or any(int(c) < 1 for c in cfg.stem_size):
        raise ValueError(f"MOAT: stem_size must be a non-empty tuple of ints >= 1, got "
                         f"{cfg.stem_size!r}")  # fmt: skip
    if any(int(d) < 1 for d in cfg.num_blocks) or any(int(s) < 1 for s in cfg.stage_strides):
        raise ValueError(f"MOAT: num_blocks and stage_strides must be ints >= 1, got "
                         f"{cfg.num_blocks!r}, {cfg.stage_strides!r}")  # fmt: skip
    for t, c in zip(cfg.block_types, cfg.hidden_sizes, strict=True):
        if t == "moat" and c % cfg.head_size:
            raise ValueError(f"MOAT: hidden_sizes {cfg.hidden_sizes!r} of the MOAT stages must "
                             f"be multiples of head_size {cfg.head_size}")  # fmt: skip
    for w in cfg.window_sizes:
        if w is not None and (len(w) != 2 or min(w) < 1):
            raise ValueError(f"MOAT: window_sizes entries must be None or (height, width) of "
                             f"positive ints, got {cfg.window_sizes!r}")  # fmt: skip
    if cfg.num_classes < 0:
        raise ValueError(f"MOAT: num_classes must be >= 0, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"MOAT: drop_path_rate must be in [0, 1), got {cfg.drop_path_rate!r}")


def moat_drop_path_rates(num_blocks: tuple[int, ...], rate: float) -> list[list[float]]:
    """Per-block stochastic-depth rates as the official ``_adjust_survival_rate``: block ``i``
    (counted over all stages from 0) of ``n`` gets ``rate * i / n``; split by stage."""
    total = sum(num_blocks)
    flat = [rate * i / total for i in range(total)]
    out, start = [], 0
    for d in num_blocks:
        out.append(flat[start : start + d])
        start += d
    return out


def _reductions(cfg: Any) -> list[int]:
    """Total stride at the output of each stage (the stem halves the input)."""
    out, r = [], 2
    for s in cfg.stage_strides:
        r *= s
        out.append(r)
    return out


def min_input_size(cfg: Any) -> int:
    """Smallest H = W at which every stage's map is a whole multiple of its attention window
    (the total stride when attention is global: 32 for the presets)."""
    reductions = _reductions(cfg)
    size = reductions[-1]
    for t, r, w in zip(cfg.block_types, reductions, cfg.window_sizes, strict=True):
        if t == "moat" and w is not None:
            size = math.lcm(size, r * w[0], r * w[1])
    return size


def _check_windows(cfg: Any, shape: tuple[int, ...]) -> None:
    """Every windowed stage's map (TF "SAME": ``ceil`` of each stride) tiles into windows."""
    h, w = -(-shape[1] // 2), -(-shape[2] // 2)  # after the stem
    for s, (kind, window) in enumerate(zip(cfg.block_types, cfg.window_sizes, strict=True)):
        h, w = -(-h // cfg.stage_strides[s]), -(-w // cfg.stage_strides[s])
        all_global = cfg.global_attention_at_end_of_moat_stage and cfg.num_blocks[s] == 1
        if kind != "moat" or window is None or all_global:
            continue
        if h % window[0] or w % window[1]:
            raise ValueError(
                f"MOAT: x of shape {tuple(shape)} gives stage {s} a ({h}, {w}) map, which "
                f"window_sizes[{s}]={tuple(window)!r} does not tile; use H and W multiples of "
                f"{min_input_size(cfg)}"
            )


class MOAT(nn.Module):
    """MOAT classifier / backbone (Yang et al., https://arxiv.org/abs/2210.01820).

    A conv stem (3x3 stride 2 -> BN -> GELU -> 3x3), two stages of `MBConvBlock` (pre-norm
    inverted residuals with SE), two stages of `MOATBlock` (MBConv without SE, then LayerNorm
    and multi-head self-attention with a 2-D relative position bias, no MLP), each stage
    opening with a stride-2 block; the head averages the map, applies a LayerNorm and a 1x1
    conv (``logits_head``). Attention is global by default (classification); ``window_sizes``
    switch stages to window attention for high-resolution dense tasks, the position tables being
    resized to the window, so the same parameters serve every resolution.

    Layout and parameter count follow deeplab2's ``MOAT`` with
    ``build_classification_head_with_class_num`` (the registry checks the counts of its test).
    Deviations: channels-last Flax modules; BatchNorm is Flax's (momentum 0.99 and epsilon 1e-3
    as Keras' defaults; biased running variance; no cross-replica statistics unlike
    ``SyncBatchNormalization``); the depthwise kernels are ``[k, k, 1, C]``.

    Train or eval: ``train=True`` normalises with batch statistics and updates the running ones
    (apply with ``mutable=["batch_stats"]``), ``train=False`` uses the running statistics;
    ``train=None`` (default) trains when ``batch_stats`` is mutable or the model is
    initialising, and otherwise raises a ValueError. Drop path (off at the defaults) is active
    only in training and then needs an rng named ``"dropout"``.

    Stage features: ``features=True`` returns the tuple of the stages' outputs instead of the
    logits, ``[B, ceil(H / r), ceil(W / r), C]`` with ``r`` = 4, 8, 16, 32 for the presets (the
    official ``stage2`` ... ``stage5`` endpoints; its ``res`` endpoints are their GELU);
    ``num_classes=0`` returns the pooled features.

    The parameter counts do not depend on the shortcut's ``pool_size`` (deeplab2's test builds
    with ``get_model``'s default 3; the presets keep the ``MOAT`` class default 2) nor on the
    windows (the tables have a fixed size and are resized).

    Attributes:
      num_classes, stem_size, block_types, num_blocks, hidden_sizes, stage_strides,
        expansion_rate, se_ratio, head_size, window_sizes, position_embedding_sizes,
        relative_position_embedding, global_attention_at_end_of_moat_stage, pool_size,
        kernel_size, ln_epsilon, drop_path_rate: see `MOATConfig`.
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = MOAT(num_classes=10, stem_size=(8, 8), num_blocks=(1, 1, 1, 1),
      ...              hidden_sizes=(8, 16, 16, 32), head_size=8,
      ...              position_embedding_sizes=(None, None, 2, 1))
      >>> x = jnp.ones((2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> model.apply(variables, x, train=False).shape
      (2, 10)
    """

    num_classes: int = 1000
    stem_size: tuple[int, ...] = (32, 32)
    block_types: tuple[str, ...] = ("mbconv", "mbconv", "moat", "moat")
    num_blocks: tuple[int, ...] = (2, 3, 7, 2)
    hidden_sizes: tuple[int, ...] = (32, 64, 128, 256)
    stage_strides: tuple[int, ...] = (2, 2, 2, 2)
    expansion_rate: int = 4
    se_ratio: float | None = 0.25
    head_size: int = 32
    window_sizes: tuple[tuple[int, int] | None, ...] = (None, None, None, None)
    position_embedding_sizes: tuple[int | None, ...] = (None, None, 14, 7)
    relative_position_embedding: bool = True
    global_attention_at_end_of_moat_stage: bool = False
    pool_size: int = 2
    kernel_size: int = 3
    ln_epsilon: float = LN_EPSILON
    drop_path_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # Build from a `MOATConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W 3"], *, train: bool | None = None, features: bool = False
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (pooled features if ``num_classes == 0``).

        Args:
          x: NHWC images; with window attention, each windowed stage's map must be a
            multiple of its window (H and W multiples of `min_input_size` always are).
          train: see the class docstring.
          features: return the stage outputs instead (see the class docstring).
        """
        _validate(self)
        train = resolve_train(self, train)
        if x.ndim != 4:
            raise ValueError(f"MOAT: x must be NHWC [B, H, W, C], got shape {x.shape}")
        _check_windows(self, x.shape)
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        deterministic = not train
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        conv = dict(
            padding="SAME",
            kernel_init=nn.with_logical_partitioning(default_kernel_init, CONV_AXES),
            **kw,
        )
        for i, c in enumerate(self.stem_size):
            x = nn.Conv(c, (3, 3), strides=2 if i == 0 else 1, name=f"stem_conv_{i}", **conv)(x)
            if i < len(self.stem_size) - 1:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=BN_MOMENTUM,
                    epsilon=BN_EPSILON,
                    name=f"stem_norm_{i}",
                    **kw,
                )(x)
                x = gelu(x)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        rates = moat_drop_path_rates(tuple(self.num_blocks), self.drop_path_rate)
        outputs = []
        for s, kind in enumerate(self.block_types):
            for j in range(self.num_blocks[s]):
                common = dict(
                    features=self.hidden_sizes[s],
                    stride=self.stage_strides[s] if j == 0 else 1,
                    expansion_rate=self.expansion_rate,
                    kernel_size=self.kernel_size,
                    pool_size=self.pool_size,
                    drop_path=rates[s][j],
                    name=f"block_{s:02d}_{j:02d}",
                    **kw,
                )
                if kind == "mbconv":
                    block = MBConvBlock(se_ratio=self.se_ratio, **common)
                else:
                    last = j == self.num_blocks[s] - 1
                    window = self.window_sizes[s]
                    if last and self.global_attention_at_end_of_moat_stage:
                        window = None
                    block = MOATBlock(
                        head_size=self.head_size,
                        window_size=None if window is None else tuple(window),
                        position_embedding_size=self.position_embedding_sizes[s],
                        use_relative_position=self.relative_position_embedding,
                        ln_epsilon=self.ln_epsilon,
                        **common,
                    )
                x = block(x, train=train, deterministic=deterministic)
                x = nn.with_logical_constraint(x, ACTIVATION_AXES)
            outputs.append(x)
        if features:
            return tuple(outputs)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        if self.num_classes == 0:
            return x.reshape(x.shape[0], -1)
        x = nn.LayerNorm(epsilon=self.ln_epsilon, name="final_layer_norm", **kw)(x)
        x = nn.Conv(self.num_classes, (1, 1), name="logits_head", **conv)(x)  # [B, 1, 1, N]
        return x.reshape(x.shape[0], -1)


def _config(stem: int, depths: tuple[int, ...], width: int) -> MOATConfig:
    return MOATConfig(
        stem_size=(stem, stem),
        num_blocks=depths,
        hidden_sizes=(width, 2 * width, 4 * width, 8 * width),
    )


MOAT_PRESETS: dict[str, MOATConfig] = {
    "tiny_moat_0": _config(32, (2, 3, 7, 2), 32),
    "tiny_moat_1": _config(40, (2, 3, 7, 2), 40),
    "tiny_moat_2": _config(56, (2, 3, 7, 2), 56),
    "tiny_moat_3": _config(80, (2, 3, 7, 2), 80),
    "moat_0": _config(64, (2, 3, 7, 2), 96),
    "moat_1": _config(64, (2, 6, 14, 2), 96),
    "moat_2": _config(128, (2, 6, 14, 2), 128),
    "moat_3": _config(160, (2, 12, 28, 2), 160),
    "moat_4": _config(256, (2, 12, 28, 2), 256),
}

# deeplab2 model/pixel_encoder/moat_test.py, `test_moat_with_output_shape_and_params`: trainable
# variables of the model with a 1000-class head (BN scale/offset included, running statistics
# not), with relative position embeddings. The "no_pe" counts of the same test, reached here with
# ``relative_position_embedding=False``, are `MOAT_PARAMS_NO_PE`.
MOAT_PARAMS: dict[str, int] = {
    "tiny_moat_0": 3_355_348,
    "tiny_moat_1": 5_122_895,
    "tiny_moat_2": 9_772_741,
    "tiny_moat_3": 19_534_390,
    "moat_0": 27_846_892,
    "moat_1": 41_598_448,
    "moat_2": 73_422_408,
    "moat_3": 189_958_040,
    "moat_4": 483_214_184,
}
MOAT_PARAMS_NO_PE: dict[str, int] = {
    "tiny_moat_0": 3_332_232,
    "tiny_moat_1": 5_094_000,
    "tiny_moat_2": 9_732_288,
    "tiny_moat_3": 19_476_600,
    "moat_0": 27_777_544,
    "moat_1": 41_467_864,
    "moat_2": 73_248_296,
    "moat_3": 189_536_280,
    "moat_4": 482_539_368,
}


def _example_image(config: MOATConfig) -> Array:
    size = min_input_size(config)
    return jax.random.normal(jax.random.key(0), (2, size, size, 3), jnp.float32)


register_presets(
    MOAT.from_config,
    MOAT_PRESETS,
    example_input=_example_image,
    doc="deeplab2's {name} (MOAT, arXiv 2210.01820) with a 1000-class head and relative position "
    "embeddings; kwargs override config fields.",
    paper=Paper(
        "MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision Models",
        arxiv="2210.01820",
        code="https://github.com/google-research/deeplab2",
    ),
    published_params=MOAT_PARAMS,
    params_source="google-research/deeplab2 model/pixel_encoder/moat_test.py: trainable "
    "parameters with the 1000-class head and position embeddings (the README rounds them: "
    "tiny-MOAT-0..3 3.4M/5.1M/9.8M/19.5M, MOAT-0..4 27.8M/41.6M/73.4M/190.0M/483.2M)",
    tiny={
        "stem_size": (8, 8),
        "num_blocks": (1, 1, 2, 1),
        "hidden_sizes": (8, 16, 16, 32),
        "head_size": 8,
        "position_embedding_sizes": (None, None, 3, 2),
        "num_classes": 10,
    },
)
