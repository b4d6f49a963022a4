"""A 3-D U-Net of reversible MBConv stages (Pendse et al., arXiv 2009.06835, paper 4).

Stem 3×3×3 conv, then per level a `ReversibleMBConv3DStage` and a 2×2×2 stride-2 conv doubling
the channels; a bottleneck stage; per level back up a 2×2×2 transposed conv, the skip added, and
a stage; a 1×1×1 head. Every stage's activations are rebuilt in the backward, so the training
memory is that of the stage boundaries (`python -m benchmarks.run rev_unet3d` measures it against
the same network with ordinary autodiff). Deviations (no official code is public): additive
skips (channel halves stay aligned for the couplings; the paper does not specify), GroupNorm in
the bottlenecks (see `jaxblocks.blocks.rev_mbconv3d`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.blocks.rev_mbconv3d import ReversibleMBConv3DStage
from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = ["RevUNet3D", "RevUNet3DConfig", "REV_UNET_PRESETS"]


@dataclasses.dataclass(frozen=True)
class RevUNet3DConfig:
    """``widths`` per level (even), ``blocks`` couplings per stage, ``num_classes`` outputs."""

    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: int = 2
    expansion: int = 4
    num_classes: int = 4
    reversible: bool = True

    def __post_init__(self):
        if not self.widths or any(w < 2 or w % 2 for w in self.widths):
            raise ValueError(f"RevUNet3DConfig.widths must be even and >= 2, got {self.widths}")
        if min(self.blocks, self.expansion, self.num_classes) < 1:
            raise ValueError(f"RevUNet3DConfig: sizes must be >= 1, got {self}")


class RevUNet3D(nn.Module):
    """Volumetric segmentation logits ``[B, D, H, W, num_classes]`` from ``[B, D, H, W, C]``
    (D, H, W divisible by ``2 ** (len(widths) - 1)``)."""

    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: int = 2
    expansion: int = 4
    num_classes: int = 4
    reversible: bool = True
    dtype: Any = None

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(self, x: Float[Array, "B D H W C"]) -> Float[Array, "B D H W K"]:
        widths = tuple(self.widths)
        RevUNet3DConfig(widths, self.blocks, self.expansion, self.num_classes, self.reversible)
        f = 2 ** (len(widths) - 1)
        if x.ndim != 5 or any(s % f for s in x.shape[1:4]):
            raise ValueError(f"RevUNet3D: x must be [B, D, H, W, C] with D, H, W divisible by {f}, "
                             f"got {x.shape}")  # fmt: skip
        kw = dict(dtype=self.dtype)

        def stage(name):
            return ReversibleMBConv3DStage(self.blocks, self.expansion,
                                           reversible=self.reversible, name=name, **kw)  # fmt: skip

        h = nn.Conv(widths[0], (3, 3, 3), padding="SAME", name="stem", **kw)(x)
        skips = []
        for i in range(len(widths) - 1):
            h = stage(f"down_{i}")(h)
            skips.append(h)
            h = nn.Conv(widths[i + 1], (2, 2, 2), strides=2, name=f"pool_{i}", **kw)(h)
        h = stage("bottleneck")(h)
        for i in reversed(range(len(widths) - 1)):
            h = nn.ConvTranspose(widths[i], (2, 2, 2), strides=(2, 2, 2), name=f"up_{i}", **kw)(h)
            h = stage(f"dec_{i}")(h + skips[i])
        return nn.Conv(self.num_classes, (1, 1, 1), name="head", **kw)(h)


REV_UNET_PRESETS = {"rev_mbconv_unet3d": RevUNet3DConfig()}


def _example(config: RevUNet3DConfig) -> Array:
    s = 2 ** (len(config.widths) - 1)
    return jnp.linspace(-1.0, 1.0, 2 * s * s * s * 4, dtype=jnp.float32).reshape(2, s, s, s, 4)


register_presets(
    RevUNet3D.from_config,
    REV_UNET_PRESETS,
    example_input=_example,
    doc="{name}: 3-D U-Net of reversible MBConv stages (BraTS-like: 4 modalities, 4 classes).",
    paper=Paper(
        "Memory Efficient 3D U-Net with Reversible Mobile Inverted Bottlenecks for Brain Tumor "
        "Segmentation",
        arxiv="2009.06835",
    ),
    params_source="no published count: the paper's code is not public and its sizes are "
    "not tabulated; jaxblocks demo widths",
    tiny={"widths": (4, 8), "blocks": 1, "expansion": 2},
)
