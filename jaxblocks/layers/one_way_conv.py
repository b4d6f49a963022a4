"""One-way (CP-factorised) convolutions — "A priori compression of convolutional neural
networks for wave simulators" (paper 61 of ../shared/papers; no code was published): a k×k
kernel over C channels is replaced, before training, by products of 1-D ("one-way") filters.

`OneWayConv` computes ``Σ_r  dw_{1×k}^r( dw_{k×1}^r( P_r x ) )``: a 1×1 channel mixing
``P_r`` (C_in → C_out), then a depthwise k×1 and a depthwise 1×k filter per output channel, summed
over ``rank`` terms. Its kernel is ``K[i, j, c, o] = Σ_r P_r[c, o] a_r[i, o] b_r[j, o]``
(`one_way_kernel`), a rank-``rank`` CP form per output channel, with
``rank · (C_in·C_out + 2k·C_out)`` weights instead of ``k²·C_in·C_out``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["OneWayConv", "one_way_kernel", "conv_param_count", "conv_flops"]


def one_way_kernel(
    pointwise: Float[Array, "C R O"],
    vertical: Float[Array, "k R O"],
    horizontal: Float[Array, "k R O"],
) -> Float[Array, "k k C O"]:
    """The equivalent full ``[k, k, C_in, C_out]`` kernel of a `OneWayConv`'s parameters."""
    return jnp.einsum("cro,iro,jro->ijco", pointwise, vertical, horizontal)


def conv_param_count(k: int, c_in: int, c_out: int, rank: int | None = None) -> int:
    """Weights of a k×k conv (``rank=None``) or of a rank-``rank`` `OneWayConv` (no bias)."""
    if rank is None:
        return k * k * c_in * c_out
    return rank * (c_in * c_out + 2 * k * c_out)


def conv_flops(h: int, w: int, k: int, c_in: int, c_out: int, rank: int | None = None) -> int:
    """Multiply-adds ×2 per image of a 'SAME' stride-1 conv, full or one-way."""
    return 2 * h * w * conv_param_count(k, c_in, c_out, rank)


class OneWayConv(nn.Module):
    """Rank-``rank`` one-way convolution (a priori compression), a drop-in for ``nn.Conv(features,
    (k, k), padding="SAME")`` with stride 1.

    Attributes:
      features: output channels.
      kernel_size: ``k`` or ``(k, k)`` (square).
      rank: CP terms per output channel.
      use_bias: add a per-channel bias.
      dtype, param_dtype: compute and storage dtypes.

    Parameters: ``pointwise`` ``[C_in, rank, C_out]``, ``vertical`` and ``horizontal``
    ``[k, rank, C_out]`` (the 1-D filters), ``bias`` ``[C_out]``. Initialised so the equivalent
    kernel has He-normal's variance: each factor ~ N(0, σ²) with σ⁶ · rank = 2 / (k²·C_in).
    """

    features: int
    kernel_size: int | tuple[int, int] = 3
    rank: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W O"]:
        ks = self.kernel_size
        k = ks if isinstance(ks, int) else ks[0]
        if not isinstance(ks, int) and (len(ks) != 2 or ks[0] != ks[1]):
            raise ValueError(f"OneWayConv: kernel_size must be square, got {ks}")
        if self.rank < 1 or self.features < 1 or k < 1:
            raise ValueError(f"OneWayConv: features, kernel_size and rank must be >= 1, got "
                             f"{self.features}, {k}, {self.rank}")  # fmt: skip
        if x.ndim != 4:
            raise ValueError(f"OneWayConv: x must be NHWC [B, H, W, C], got shape {x.shape}")
        c_in, r, o = x.shape[-1], self.rank, self.features
        sigma = (2.0 / (k * k * c_in) / r) ** (1.0 / 6.0)
        init: Callable = nn.initializers.normal(sigma)
        p = self.param("pointwise", init, (c_in, r, o), self.param_dtype)
        a = self.param("vertical", init, (k, r, o), self.param_dtype)
        b = self.param("horizontal", init, (k, r, o), self.param_dtype)
        dtype = self.dtype or (x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
        x = x.astype(dtype)
        y = jnp.einsum("bhwc,cro->bhwro", x, p.astype(dtype)).reshape(*x.shape[:3], r * o)
        pad = ((k - 1) // 2, k // 2)
        dn = ("NHWC", "HWIO", "NHWC")

        y = jax.lax.conv_general_dilated(
            y, a.reshape(k, 1, 1, r * o).astype(dtype), (1, 1), (pad, (0, 0)),
            dimension_numbers=dn, feature_group_count=r * o,
        )  # depthwise k×1  # fmt: skip
        y = jax.lax.conv_general_dilated(
            y, b.reshape(1, k, 1, r * o).astype(dtype), (1, 1), ((0, 0), pad),
            dimension_numbers=dn, feature_group_count=r * o,
        )  # depthwise 1×k  # fmt: skip
        y = y.reshape(*y.shape[:3], r, o).sum(axis=3)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (o,), self.param_dtype)
            y = y + bias.astype(dtype).reshape(1, 1, 1, o)
        return y
