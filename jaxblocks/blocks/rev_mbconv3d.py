"""Reversible 3-D mobile inverted bottlenecks (Pendse et al., "Memory Efficient 3D U-Net with
Reversible Mobile Inverted Bottlenecks for Brain Tumor Segmentation", arXiv 2009.06835).

`MBConv3D` is MobileNetV2's inverted bottleneck in 3-D: 1×1×1 expand → norm → act → 3×3×3
depthwise → norm → act → 1×1×1 project → norm. `ReversibleMBConv3DStage` chains ``num_blocks``
additive couplings ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` of two such bottlenecks over the channel
halves through `jaxblocks.layers.reversible_sequence`, whose backward rebuilds every block's
inputs from its outputs: a stage's activation memory does not grow with its depth.

Deviation (no official code is public; the paper's was written for Cerebras): GroupNorm instead
of BatchNorm inside the bottlenecks, because a reversible backward needs F and G to be pure
functions of their inputs, and training-mode BatchNorm depends on the batch and updates running
statistics (the paper does not name its normalisation). ``reversible=False`` runs the same
coupling with ordinary autodiff, for comparisons at equal parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.layers.reversible import (
    merge_channels,
    plain_sequence,
    reversible_sequence,
    split_channels,
)

__all__ = ["MBConv3D", "ReversibleMBConv3DStage"]


class _DepthwiseConv3D(nn.Module):
    """A 'SAME', stride-1, bias-free depthwise 3-D convolution with `nn.Conv`'s parameter
    (``kernel`` [kd, kh, kw, 1, C], its default init), computed as the sum of the kd·kh·kw
    shifted, per-channel-scaled copies of the zero-padded input. Equal to
    ``nn.Conv(C, kernel_size, feature_group_count=C)``; XLA:CPU runs that grouped 3-D
    convolution's forward + backward 17× slower than this sum (measured at [8, 24³, 32], 3³).
    """

    kernel_size: tuple[int, int, int] = (3, 3, 3)
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Float[Array, "B D H W C"]) -> Float[Array, "B D H W C"]:
        c, ks = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*ks, 1, c))
        dt = self.dtype or x.dtype
        x, kernel = x.astype(dt), kernel.astype(dt)
        lo = [(k - 1) // 2 for k in ks]
        xp = jnp.pad(x, ((0, 0), *((a, k - 1 - a) for a, k in zip(lo, ks, strict=True)),
                         (0, 0)))  # fmt: skip
        d, h, w = x.shape[1:4]
        out = jnp.zeros_like(x)
        for i in range(ks[0]):
            for j in range(ks[1]):
                for k in range(ks[2]):
                    out = (
                        out
                        + xp[:, i : i + d, j : j + h, k : k + w, :]
                        * kernel[i, j, k, 0][None, None, None, None, :]
                    )
        return out


class MBConv3D(nn.Module):
    """3-D inverted bottleneck mapping ``[B, D, H, W, C] -> [B, D, H, W, C]`` (no residual: the
    coupling adds it).

    Attributes:
      expansion: hidden width as a multiple of C.
      groups: GroupNorm groups (reduced to a divisor of the width).
      dtype: compute dtype.
    """

    expansion: int = 4
    groups: int = 8
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Float[Array, "B D H W C"]) -> Float[Array, "B D H W C"]:
        c = x.shape[-1]
        hidden = c * self.expansion

        def norm(width, name):
            g = next(d for d in range(min(self.groups, width), 0, -1) if width % d == 0)
            return nn.GroupNorm(num_groups=g, dtype=self.dtype, name=name)

        h = nn.Conv(hidden, (1, 1, 1), use_bias=False, dtype=self.dtype, name="expand")(x)
        h = nn.relu6(norm(hidden, "expand_norm")(h))
        h = _DepthwiseConv3D(dtype=self.dtype, name="depthwise")(h)
        h = nn.relu6(norm(hidden, "depthwise_norm")(h))
        h = nn.Conv(c, (1, 1, 1), use_bias=False, dtype=self.dtype, name="project")(h)
        return norm(c, "project_norm")(h)


class ReversibleMBConv3DStage(nn.Module):
    """``num_blocks`` reversible couplings of two `MBConv3D` over the channel halves.

    Attributes:
      num_blocks: couplings in the stage.
      expansion, groups: of the bottlenecks.
      reversible: True: the backward rebuilds activations (`reversible_sequence`); False:
        ordinary autodiff of the same computation.
      dtype: compute dtype.

    Example::

        stage = ReversibleMBConv3DStage(num_blocks=4)
        y = stage.apply(stage.init(key, x), x)  # x: [B, D, H, W, C], C even
    """

    num_blocks: int = 2
    expansion: int = 4
    groups: int = 8
    reversible: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Float[Array, "B D H W C"]) -> Float[Array, "B D H W C"]:
        if x.ndim != 5:
            raise ValueError(f"ReversibleMBConv3DStage: x must be [B, D, H, W, C], got {x.shape}")
        if self.num_blocks < 1:
            raise ValueError(f"ReversibleMBConv3DStage: num_blocks must be >= 1, got "
                             f"{self.num_blocks}")  # fmt: skip
        x1, x2 = split_channels(x)
        half = x1.shape[-1]
        template = MBConv3D(self.expansion, self.groups, self.dtype)

        def init(rng):  # parameter shapes depend on the channels only
            return template.init(rng, jnp.zeros((1, 3, 3, 3, half), x.dtype))["params"]

        f_params = tuple(self.param(f"f_{i}", init) for i in range(self.num_blocks))
        g_params = tuple(self.param(f"g_{i}", init) for i in range(self.num_blocks))
        seq = reversible_sequence if self.reversible else plain_sequence
        y1, y2 = seq(_Apply(template), _Apply(template), f_params, g_params, x1, x2)
        return merge_channels(y1, y2)


class _Apply:
    """``fn(params, x)`` applying a Linen template; hashable by the template (a static argument
    of the custom VJP)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, params, x):
        return self.module.apply({"params": params}, x)

    def __hash__(self):
        return hash(self.module)

    def __eq__(self, other):
        return isinstance(other, _Apply) and other.module == self.module
