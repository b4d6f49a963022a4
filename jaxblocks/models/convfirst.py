"""ConvFirstNet and the matched MBConv network: a small classifier to compare the two blocks.

Lavin, "On the Efficiency of Convolutional Neural Networks", https://arxiv.org/abs/2404.03617;
blocks in `jaxblocks.blocks.convfirst` (after andravin/spio ``scripts/profile_block.py``).
The paper's own ConvFirst network is not released as code; this one is the project's: a
stride-2 3x3 ConvBN-SiLU stem, stages of `ConvFirstBlock` (or `MBConvBaselineBlock`, same
widths and depths) whose first block carries the stride and the width change, global average
pooling and a linear classifier. ``convfirst_net_tiny`` and ``mbconv_net_tiny`` differ only in
``block``, so they compare the two blocks at equal width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.blocks.convfirst import (
    ACTIVATION_AXES,
    BLOCK_KINDS,
    ConvFirstBlock,
    MBConvBaselineBlock,
    conv_kernel_init,
)
from jaxblocks.layers.conv_bn import ConvBN, resolve_convbn_mode
from jaxblocks.registry import Paper, config_fields_module, register_presets
from jaxblocks.typing import Array, Float

__all__ = ["CONVFIRST_PRESETS", "ConvFirstNet", "ConvFirstNetConfig"]

HEAD_KERNEL_AXES = ("channels", "classes")


@dataclasses.dataclass(frozen=True)
class ConvFirstNetConfig:
    """Architecture of a `ConvFirstNet` (https://arxiv.org/abs/2404.03617).

    Attributes:
      num_classes: classifier outputs; 0 returns the pooled features.
      block: ``"convfirst"`` (`ConvFirstBlock`) or ``"mbconv"`` (`MBConvBaselineBlock`).
      stem_width: channels of the stride-2 3x3 stem (a multiple of ``group_width``).
      widths: output channels of each stage (multiples of ``group_width``).
      depths: blocks per stage.
      strides: stride of each stage's first block (1 or 2).
      kernel_size, group_width, expansion: of every block (3, 8, 4 as the paper).
      drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
    """

    num_classes: int = 1000
    block: str = "convfirst"
    stem_width: int = 32
    widths: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    kernel_size: int = 3
    group_width: int = 8
    expansion: int = 4
    drop_path_rate: float = 0.0

    def __post_init__(self):
        _validate(self)


def _validate(cfg: Any) -> None:
    where = "ConvFirstNet"
    if cfg.block not in BLOCK_KINDS:
        raise ValueError(f"{where}: block must be one of {BLOCK_KINDS}, got {cfg.block!r}")
    n = len(cfg.depths)
    if not n or any(int(d) < 1 for d in cfg.depths):
        raise ValueError(f"{where}: depths must be a non-empty tuple of ints >= 1, got "
                         f"{cfg.depths!r}")  # fmt: skip
    for name in ("widths", "strides"):
        if len(getattr(cfg, name)) != n:
            raise ValueError(f"{where}: {name} must have one entry per stage (len(depths) = "
                             f"{n}), got {getattr(cfg, name)!r}")  # fmt: skip
    if any(s not in (1, 2) for s in cfg.strides):
        raise ValueError(f"{where}: strides must be 1 or 2, got {cfg.strides!r}")
    chans = (cfg.stem_width, *cfg.widths)
    if cfg.group_width < 1 or any(c < 1 or c % cfg.group_width for c in chans):
        raise ValueError(f"{where}: stem_width and widths {chans!r} must be positive multiples of "
                         f"group_width={cfg.group_width}")  # fmt: skip
    if cfg.num_classes < 0:
        raise ValueError(f"{where}: num_classes must be >= 0, got {cfg.num_classes}")
    if not 0.0 <= cfg.drop_path_rate < 1.0:
        raise ValueError(f"{where}: drop_path_rate must be in [0, 1), got {cfg.drop_path_rate!r}")


class ConvFirstNet(nn.Module):
    """ConvFirst network (Lavin, https://arxiv.org/abs/2404.03617), or its MBConv twin.

    Stem (3x3 stride-2 ConvBN + SiLU), then ``len(depths)`` stages of `ConvFirstBlock` (the
    grouped k x k conv on the narrow tensor before the 1x1 expansion) or, with
    ``block="mbconv"``, of `MBConvBaselineBlock` at the same widths, then global average
    pooling and a Dense classifier. Every conv is a `ConvBN`, so the ConvBN modes (train / eval
    / tune / deploy) apply, resolved once per call with `resolve_convbn_mode` as in `ResNet`:
    the ``mode`` argument, ``train=True/False``, the `convbn_mode` context, the ``mode``
    attribute, else "train" under ``mutable=["batch_stats"]`` (and in ``init``), otherwise a
    ValueError. Drop path (off by default) is active only in train mode and then needs a
    ``"dropout"`` rng. ``features=True`` returns the stage outputs.

    Attributes:
      num_classes, block, stem_width, widths, depths, strides, kernel_size, group_width,
        expansion, drop_path_rate: see `ConvFirstNetConfig`.
      mode: default ConvBN mode (None: decided per call).
      dtype: compute dtype (None: the input's, integers promoted to float32).
      param_dtype: parameter storage dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ConvFirstNet(num_classes=10, stem_width=16, widths=(16, 32), depths=(1, 1),
      ...                      strides=(1, 2))
      >>> x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(1), x)
      >>> model.apply(variables, x, mode="eval").shape
      (2, 10)
    """

    num_classes: int = 1000
    block: str = "convfirst"
    stem_width: int = 32
    widths: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    kernel_size: int = 3
    group_width: int = 8
    expansion: int = 4
    drop_path_rate: float = 0.0
    mode: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    # Build from a `ConvFirstNetConfig`; kwargs override config fields and module attributes.
    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        mode: str | None = None,
        *,
        train: bool | None = None,
        features: bool = False,
    ) -> Float[Array, "B classes"] | tuple[Array, ...]:
        """Logits ``[B, num_classes]`` (pooled features if ``num_classes == 0``; the stage
        outputs if ``features``)."""
        _validate(self)
        mode = resolve_convbn_mode(self, mode, train)
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(f"ConvFirstNet: x must be NHWC [B, H, W, C], got shape "
                             f"{getattr(x, 'shape', type(x).__name__)}")  # fmt: skip
        dtype = self.dtype
        if dtype is None and not jnp.issubdtype(x.dtype, jnp.floating):
            dtype = jnp.float32
        if dtype is not None:
            x = x.astype(dtype)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        x = ConvBN(
            self.stem_width, (3, 3), strides=2, padding=((1, 1), (1, 1)), activation=nn.silu,
            kernel_init=conv_kernel_init, name="stem", **kw,
        )(x, mode)  # fmt: skip
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        block_cls = ConvFirstBlock if self.block == "convfirst" else MBConvBaselineBlock
        block = functools.partial(
            block_cls, kernel_size=self.kernel_size, group_width=self.group_width,
            expansion=self.expansion, **kw,
        )  # fmt: skip
        total = sum(self.depths)
        deterministic = mode != "train"
        outputs, index = [], 0
        for i, (width, depth) in enumerate(zip(self.widths, self.depths, strict=True)):
            for j in range(depth):
                rate = self.drop_path_rate * index / max(total - 1, 1)
                x = block(
                    width, strides=self.strides[i] if j == 0 else 1, drop_path_rate=rate,
                    name=f"stages_{i}_{j}",
                )(x, mode, deterministic=deterministic)  # fmt: skip
                index += 1
            outputs.append(x)
        if features:
            return tuple(outputs)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)  # [B, C]
        if self.num_classes == 0:
            return x
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), HEAD_KERNEL_AXES
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
            name="head",
            **kw,
        )(x)


CONVFIRST_PRESETS: dict[str, ConvFirstNetConfig] = {
    "convfirst_net_tiny": ConvFirstNetConfig(block="convfirst"),
    "mbconv_net_tiny": ConvFirstNetConfig(block="mbconv"),
}


def _example_image(config: ConvFirstNetConfig) -> Array:
    del config
    return jnp.linspace(-1.0, 1.0, 2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)


register_presets(
    ConvFirstNet.from_config,
    CONVFIRST_PRESETS,
    example_input=_example_image,
    doc="{name}: the project's small ConvFirst / matched-MBConv classifier (arXiv 2404.03617); "
    "kwargs override config fields and module attributes.",
    paper=Paper(
        "On the Efficiency of Convolutional Neural Networks",
        arxiv="2404.03617",
        code="https://github.com/andravin/spio",
    ),
    params_source="no published count; the paper's network is not released, these presets are "
    "the project's own (stem 32, widths 64-512, depths 2-2-6-2)",
    tiny={
        "stem_width": 16,
        "widths": (16, 32),
        "depths": (1, 1),
        "strides": (1, 2),
        "num_classes": 10,
    },  # fmt: skip
)
