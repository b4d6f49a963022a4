"""Sub-pixel rearrangement — Shi et al., "Real-Time Single Image and Video Super-Resolution Using
an Efficient Sub-Pixel Convolutional Neural Network", https://arxiv.org/abs/1609.05158.

`pixel_shuffle` turns an ``[B, H, W, C·r²]`` feature map into an ``[B, H·r, W·r, C]`` image (the
"periodic shuffling" that ends ESPCN), `pixel_unshuffle` inverts it. Channel order follows
``torch.nn.PixelShuffle`` so converted weights agree: output channel ``c`` at sub-pixel
``(i, j)`` takes input channel ``c·r² + i·r + j``.
"""

from __future__ import annotations

import flax.linen as nn
from jaxtyping import Array

__all__ = ["PixelShuffle", "pixel_shuffle", "pixel_unshuffle"]


def _check(fn: str, x: Array, r: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{fn}: upscale factor r must be a positive int, got {r!r}")
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{fn}: x must be NHWC [B, H, W, C], got shape {getattr(x, 'shape', x)}")


def pixel_shuffle(x: Array, r: int) -> Array:
    """``[B, H, W, C·r²] -> [B, H·r, W·r, C]`` (torch's channel order, NHWC).

    Example:
      >>> y = pixel_shuffle(jnp.zeros((2, 5, 7, 18)), 3)
      >>> y.shape
      (2, 15, 21, 2)
    """
    _check("pixel_shuffle", x, r)
    b, h, w, c = x.shape
    if c % (r * r):
        raise ValueError(f"pixel_shuffle: channels {c} of x {x.shape} not divisible by r²={r * r}")
    x = x.reshape(b, h, w, c // (r * r), r, r)  # [B, H, W, C, i, j]
    x = x.transpose(0, 1, 4, 2, 5, 3)  # [B, H, i, W, j, C]
    return x.reshape(b, h * r, w * r, c // (r * r))


def pixel_unshuffle(x: Array, r: int) -> Array:
    """``[B, H·r, W·r, C] -> [B, H, W, C·r²]``, the inverse of `pixel_shuffle`."""
    _check("pixel_unshuffle", x, r)
    b, hr, wr, c = x.shape
    if hr % r or wr % r:
        raise ValueError(f"pixel_unshuffle: spatial size {(hr, wr)} of x not divisible by r={r}")
    x = x.reshape(b, hr // r, r, wr // r, r, c)  # [B, H, i, W, j, C]
    x = x.transpose(0, 1, 3, 5, 2, 4)  # [B, H, W, C, i, j]
    return x.reshape(b, hr // r, wr // r, c * r * r)


class PixelShuffle(nn.Module):
    """`pixel_shuffle` as a layer (no parameters), like ``torch.nn.PixelShuffle(r)``."""

    upscale_factor: int

    def __call__(self, x: Array) -> Array:
        return pixel_shuffle(x, self.upscale_factor)
