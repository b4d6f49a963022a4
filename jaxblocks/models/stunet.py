"""STU-Net: scalable and transferable 3-D medical segmentation U-Nets (Huang et al., "STU-Net:
Scalable and Transferable Medical Image Segmentation Models Empowered by Large-Scale Supervised
Pre-training", https://arxiv.org/abs/2304.06716).

nnU-Net's residual U-Net scaled in depth and width: every stage is `BasicResBlock`s (3×3×3 conv
with bias → InstanceNorm (affine) → LeakyReLU(0.01) → 3×3×3 conv → InstanceNorm, plus a strided
1×1×1 conv on the skip when the shape changes, then LeakyReLU), the first block of each encoder
stage striding by 2; the decoder upsamples by nearest interpolation followed by a 1×1×1 conv,
concatenates the skip and runs a stage; 1×1×1 heads give deep-supervision outputs at every
decoder stage (``deep_supervision=True`` returns them all, finest first). The layout follows the
official ``STUNet.py`` (uni-medical/STU-Net), parameter for parameter. Channels-last
``[B, D, H, W, C]``; torch's InstanceNorm epsilon (1e-5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.registry import Paper, config_fields_module, register_presets

__all__ = ["BasicResBlock", "STUNet", "STUNetConfig", "STUNET_PRESETS"]


def _leaky(x):
    return nn.leaky_relu(x, 0.01)


class BasicResBlock(nn.Module):
    """STU-Net's residual block (see the module docstring)."""

    features: int
    strides: int = 1
    use_1x1conv: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Float[Array, "B D H W C"]) -> Float[Array, "B d h w F"]:
        kw = dict(dtype=self.dtype)
        s = (self.strides,) * 3
        y = nn.Conv(self.features, (3, 3, 3), strides=s, padding=1, name="conv1", **kw)(x)
        y = _leaky(nn.InstanceNorm(epsilon=1e-5, name="norm1", **kw)(y))
        y = nn.Conv(self.features, (3, 3, 3), padding=1, name="conv2", **kw)(y)
        y = nn.InstanceNorm(epsilon=1e-5, name="norm2", **kw)(y)
        if self.use_1x1conv:
            x = nn.Conv(self.features, (1, 1, 1), strides=s, name="conv3", **kw)(x)
        return _leaky(y + x)


@dataclasses.dataclass(frozen=True)
class STUNetConfig:
    """``depth`` blocks and ``dims`` channels per resolution (len = pooling stages + 1)."""

    depth: tuple[int, ...] = (1, 1, 1, 1, 1, 1)
    dims: tuple[int, ...] = (16, 32, 64, 128, 256, 256)
    in_channels: int = 1
    num_classes: int = 105

    def __post_init__(self):
        if len(self.depth) != len(self.dims) or len(self.dims) < 2:
            raise ValueError(f"STUNetConfig: depth {self.depth} and dims {self.dims} need equal "
                             "lengths >= 2")  # fmt: skip
        if min(*self.depth, *self.dims, self.in_channels, self.num_classes) < 1:
            raise ValueError(f"STUNetConfig: sizes must be >= 1, got {self}")


class STUNet(nn.Module):
    """Segmentation logits ``[B, D, H, W, num_classes]`` (D, H, W divisible by
    ``2 ** (len(dims) - 1)``); with ``deep_supervision`` a tuple, finest first."""

    depth: tuple[int, ...] = (1, 1, 1, 1, 1, 1)
    dims: tuple[int, ...] = (16, 32, 64, 128, 256, 256)
    in_channels: int = 1
    num_classes: int = 105
    deep_supervision: bool = False
    dtype: Any = None

    from_config = classmethod(config_fields_module)

    @nn.compact
    def __call__(self, x: Float[Array, "B D H W C"]):
        depth, dims = tuple(self.depth), tuple(self.dims)
        STUNetConfig(depth, dims, self.in_channels, self.num_classes)
        f = 2 ** (len(dims) - 1)
        if x.ndim != 5 or x.shape[-1] != self.in_channels or any(s % f for s in x.shape[1:4]):
            raise ValueError(f"STUNet: x must be [B, D, H, W, {self.in_channels}] with D, H, W "
                             f"divisible by {f}, got {x.shape}")  # fmt: skip
        kw = dict(dtype=self.dtype)

        def stage(h, d, n_blocks, features, strides, name):
            h = BasicResBlock(features, strides, True, name=f"{name}_0", **kw)(h)
            for i in range(1, n_blocks):
                h = BasicResBlock(features, name=f"{name}_{i}", **kw)(h)
            return h

        skips = []
        h = x
        for d in range(len(dims)):
            h = stage(h, d, depth[d], dims[d], 1 if d == 0 else 2, f"context_{d}")
            skips.append(h)
        outs = []
        for u in range(len(dims) - 1):
            lvl = len(dims) - 2 - u
            for ax in (1, 2, 3):  # nearest-neighbour ×2
                h = jnp.repeat(h, 2, axis=ax)
            h = nn.Conv(dims[lvl], (1, 1, 1), name=f"upsample_{u}", **kw)(h)
            h = jnp.concatenate([h, skips[lvl]], axis=-1)
            h = stage(h, lvl, depth[lvl], dims[lvl], 1, f"localization_{u}")
            outs.append(nn.Conv(self.num_classes, (1, 1, 1), name=f"seg_output_{u}", **kw)(h))
        if self.deep_supervision:
            return tuple(reversed(outs))
        return outs[-1]


STUNET_PRESETS = {
    "stunet_s": STUNetConfig((1,) * 6, (16, 32, 64, 128, 256, 256)),
    "stunet_b": STUNetConfig((1,) * 6, (32, 64, 128, 256, 512, 512)),
    "stunet_l": STUNetConfig((2,) * 6, (64, 128, 256, 512, 1024, 1024)),
    "stunet_h": STUNetConfig((3,) * 6, (96, 192, 384, 768, 1536, 1536)),
}


def _example(config: STUNetConfig) -> Array:
    s = 2 ** (len(config.dims) - 1)
    n = s * s * s * config.in_channels
    return jnp.linspace(-1.0, 1.0, 2 * n, dtype=jnp.float32).reshape(2, s, s, s, -1)


register_presets(
    STUNet.from_config,
    STUNET_PRESETS,
    example_input=_example,
    doc="{name}: STU-Net 3-D segmentation U-Net (1 input channel, 105 TotalSegmentator "
    "classes by default).",
    paper=Paper(
        "STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by "
        "Large-Scale Supervised Pre-training",
        arxiv="2304.06716",
        code="https://github.com/uni-medical/STU-Net",
    ),
    published_params={
        "stunet_s": 14_596_941,
        "stunet_b": 58_262_669,
        "stunet_l": 440_302_605,
        "stunet_h": 1_457_326_221,
    },
    params_source="the official STUNet.py (uni-medical/STU-Net) at 1 input channel and 105 "
    "classes (TotalSegmentator), counted layer by layer; the paper and README round them to "
    "14.6M / 58.26M / 440.30M / 1457.33M",
    tiny={"depth": (1, 1, 1), "dims": (4, 8, 8), "num_classes": 3},
)
