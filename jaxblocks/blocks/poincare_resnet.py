"""Poincaré residual block: Poincaré conv → midpoint BN → ReLU → conv → BN, Möbius-added skip.

van Spengler, Berkhout, Mettes, "Poincaré ResNet", ICCV 2023, https://arxiv.org/abs/2303.14027.
Official code: maxvanspengler/poincare-resnet ``models/resnets/hyperbolic.py``
(``ResidualBlock``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.norm.poincare import PoincareBatchNorm
from jaxblocks.layers.poincare import (
    MlrLambda,
    PoincareConv2d,
    check_curvature,
    expmap0,
    logmap0,
    mobius_add,
)
from jaxblocks.typing import Array, Float

__all__ = ["ACTIVATION_AXES", "PoincareResidualBlock", "SkipAxis", "poincare_skip"]

Dtype = Any
ACTIVATION_AXES = ("batch", "height", "width", "channels")
# The axis whose vectors the skip connection adds in the ball (see `poincare_skip`).
SkipAxis = Literal["channel", "width"]
_SKIP_AXIS = {"channel": -1, "width": 2}


def poincare_skip(
    fx: Float[Array, "B H W C"],
    residual: Float[Array, "B H W C"],
    c: float,
    order: Literal["fr", "rf"] = "fr",
    skip_axis: SkipAxis = "channel",
) -> Float[Array, "B H W C"]:
    """The Poincaré residual connection on tangent vectors: ``log_0(exp_0 f(x) ⊕_c exp_0 r)``.

    ``order="fr"`` (official default) adds ``f(x) ⊕ r``, ``"rf"`` ``r ⊕ f(x)`` (Möbius addition
    is not commutative). ``skip_axis="channel"`` treats each pixel's channel vector as the point
    (the paper's block, Fig. 1); ``"width"`` reproduces the official code, which calls
    ``expmap0``/``mobius_add``/``logmap0`` with ``dim=-1`` on NCHW tensors and so treats each
    row of the feature map (the width axis) as the point.
    """
    if fx.shape != residual.shape:
        raise ValueError(f"poincare_skip: f(x) has shape {fx.shape} but the residual has shape "
                         f"{residual.shape}; expected equal")  # fmt: skip
    if order not in ("fr", "rf"):
        raise ValueError(f"poincare_skip: order={order!r}; expected 'fr' or 'rf'")
    if skip_axis not in _SKIP_AXIS:
        raise ValueError(f"poincare_skip: skip_axis={skip_axis!r}; expected 'channel' or 'width'")
    axis = _SKIP_AXIS[skip_axis]
    a, r = expmap0(fx, c, axis), expmap0(residual, c, axis)
    y = mobius_add(a, r, c, axis) if order == "fr" else mobius_add(r, a, c, axis)
    return logmap0(y, c, axis)


class PoincareResidualBlock(nn.Module):
    """Poincaré residual block (https://arxiv.org/abs/2303.14027), NHWC tangent vectors in/out.

    The basic ResNet block with every layer replaced by its Poincaré counterpart: two 3×3
    `PoincareConv2d` (padding 1, identity init), each followed by a `PoincareBatchNorm`
    (midpoint, batch statistics always), ReLU after the first; the residual (through a 1×1
    stride-s `PoincareConv2d` without BN when the stride or width changes, as the official
    ``downsample``) joins by Möbius addition in the ball (`poincare_skip`, ``"fr"``), and a ReLU
    follows. Activations between layers are tangent vectors at the origin, where ReLU acts (as
    the official ``act_layer``).

    Deviation (default): the skip connection treats the channel vector as the point
    (``skip_axis="channel"``, the paper's formulation); ``skip_axis="width"`` reproduces the
    official code's ``dim=-1`` on NCHW tensors. The official code adds a 1×1 downsample only on
    a stride change; here also when the width changes at stride 1 (it would fail there).

    Attributes:
      features: output channels.
      stride: of the first conv and of the downsample.
      c: curvature (> 0), the official ``init_c`` (fixed).
      skip_order: ``"fr"`` (official default) or ``"rf"``.
      skip_axis: see above.
      mlr_lambda: of the convolutions (`jaxblocks.layers.poincare.poincare_hyperplane_dists`).
      act: activation in tangent space (ReLU).
      dtype: output dtype (None: the input's); param_dtype: parameter dtype.

    Example:
      >>> import jax
      >>> block = PoincareResidualBlock(8, stride=2)
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
      >>> block.apply(block.init(jax.random.key(1), x), x).shape
      (2, 4, 4, 8)
    """

    features: int
    stride: int = 1
    c: float = 0.1
    skip_order: Literal["fr", "rf"] = "fr"
    skip_axis: SkipAxis = "channel"
    mlr_lambda: MlrLambda = "hnn++"
    act: Callable[[Array], Array] = nn.relu
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B h w D"]:
        check_curvature("PoincareResidualBlock", self.c)
        if x.ndim != 4:
            raise ValueError(f"PoincareResidualBlock: x must be NHWC [batch, height, width, "
                             f"channels], got shape {x.shape} (rank {x.ndim})")  # fmt: skip
        if self.stride not in (1, 2) or self.features < 1:
            raise ValueError(f"PoincareResidualBlock: need stride in (1, 2) and features >= 1, "
                             f"got stride={self.stride}, features={self.features}")  # fmt: skip
        dtype = self.dtype or x.dtype
        kw = dict(c=self.c, dtype=dtype, param_dtype=self.param_dtype)
        conv_kw = dict(mlr_lambda=self.mlr_lambda, **kw)
        h = PoincareConv2d(self.features, (3, 3), self.stride, 1, name="conv1", **conv_kw)(x)
        h = self.act(PoincareBatchNorm(name="bn1", **kw)(h))
        h = PoincareConv2d(self.features, (3, 3), 1, 1, name="conv2", **conv_kw)(h)
        h = PoincareBatchNorm(name="bn2", **kw)(h)
        residual = x
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = PoincareConv2d(
                self.features, (1, 1), self.stride, 0, name="downsample", **conv_kw
            )(x)
        y = poincare_skip(h, residual, self.c, self.skip_order, self.skip_axis)
        y = self.act(y).astype(dtype)
        return nn.with_logical_constraint(y, ACTIVATION_AXES)
