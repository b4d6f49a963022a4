"""HNeRV and NeRV++ blocks — Chen et al., "HNeRV: A Hybrid Neural Representation for Videos",
CVPR 2023, https://arxiv.org/abs/2304.02633 (official code: haochen-rye/HNeRV ``model_all.py``);
Ghorbel et al., "NeRV++: An Enhanced Implicit Neural Video Representation",
https://arxiv.org/abs/2402.18305 (no code released: its repository holds only a README).

* `HNeRVEncoder`: the ConvNeXt encoder that turns a frame into HNeRV's small content-adaptive
  embedding (official ``ConvNeXt(stage_blocks, strds, dims)``: one patchify conv per stage with
  kernel = stride, then ConvNeXt blocks).
* `ConvNeXtBlock`: depthwise 7×7 → LayerNorm → 4× MLP (GELU) → layer scale, residual.
* `NeRVBlock`: the decoder's upsampling block, Conv k×k → `pixel_shuffle` (s) → GELU (the
  official ``NeRVBlock`` with ``UpConv('pshuffel')``, norm ``none``).
* `SeparableConvResBlock` (NeRV++'s SCRB) and `NeRVPlusPlusBlock`: SCRB → NeRV block → SCRB with
  a bilinear-interpolation skip, as the NeRV++ abstract and figure describe.

All modules are NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.layers.pixel_shuffle import pixel_shuffle
from jaxblocks.typing import Array, Float

__all__ = [
    "CONV_INIT",
    "ConvNeXtBlock",
    "HNeRVEncoder",
    "NeRVBlock",
    "NeRVPlusPlusBlock",
    "SeparableConvResBlock",
    "bilinear_upsample",
    "nerv_kernel_size",
    "nerv_widths",
]

# torch's Conv2d default (kaiming_uniform a=√5 → U(±1/√fan_in)); biases start at zero here
# (torch draws them from the same range; a deliberate simplification).
CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# The official ConvNeXt encoder's ``_init_weights``: trunc_normal(std=.02), bias 0.
ENC_INIT = nn.initializers.truncated_normal(0.02)
LN_EPS = 1e-6  # the official ConvNeXt LayerNorm


def _dtype(dtype: Any, x: Array) -> Any:
    if dtype is not None:
        return dtype
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def _check_nhwc(name: str, x: Array, channels: int | None = None) -> None:
    if getattr(x, "ndim", None) != 4 or (channels is not None and x.shape[-1] != channels):
        want = f"{channels} channel(s)" if channels is not None else "any channels"
        raise ValueError(f"{name}: x must be NHWC [B, H, W, C] with {want}, got shape "
                         f"{getattr(x, 'shape', x)}")  # fmt: skip


def nerv_kernel_size(stage: int, ks_dec1: int = 1, ks_dec2: int = 5) -> int:
    """The official decoder kernel of stage ``stage``: ``min(ks_dec1 + 2·stage, ks_dec2)``
    (``--ks 0_1_5``: 1, 3, 5, 5, 5)."""
    return min(ks_dec1 + 2 * stage, ks_dec2)


def nerv_widths(fc_dim: int, n_stages: int, reduce: float = 1.2, lower_width: int = 12):
    """Output widths of the decoder stages: ``int(max(round(ngf / reduce), lower_width))``
    applied stage after stage from ``fc_dim`` (the official ``--reduce`` / ``--lower_width``)."""
    out, ngf = [], fc_dim
    for _ in range(n_stages):
        ngf = int(max(round(ngf / reduce), lower_width))
        out.append(ngf)
    return tuple(out)


def bilinear_upsample(x: Float[Array, "B H W C"], scale: int) -> Float[Array, "B Hs Ws C"]:
    """Bilinear ×``scale`` upsampling with half-pixel centres and edge clamping, i.e.
    ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)`` — NeRV++'s skip."""
    _check_nhwc("bilinear_upsample", x)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"bilinear_upsample: scale must be a positive int, got {scale!r}")
    b, h, w, c = x.shape
    # jax.image.resize's 'bilinear' uses half-pixel centres and (upsampling) no antialiasing.
    return jax.image.resize(x, (b, h * scale, w * scale, c), "bilinear")


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block of HNeRV's encoder (https://arxiv.org/abs/2304.02633; ConvNeXt,
    https://arxiv.org/abs/2201.03545): ``x + γ·Linear(GELU(Linear₄ₓ(LN(DWConv7(x)))))``.

    Attributes:
      dim: channels C.
      layer_scale_init: γ's initial value (official 1e-6; 0 drops γ).
      dtype, param_dtype: compute and storage dtypes.
    """

    dim: int
    layer_scale_init: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        _check_nhwc("ConvNeXtBlock", x, self.dim)
        dtype = _dtype(self.dtype, x)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        c = self.dim
        y = nn.Conv(c, (7, 7), padding=3, feature_group_count=c, kernel_init=ENC_INIT,
                    name="dwconv", **kw)(x)  # fmt: skip
        y = nn.LayerNorm(LN_EPS, use_fast_variance=False, name="norm", **kw)(y)
        y = nn.Dense(4 * c, kernel_init=ENC_INIT, name="pwconv1", **kw)(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(c, kernel_init=ENC_INIT, name="pwconv2", **kw)(y)
        if self.layer_scale_init > 0:
            gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (c,),
                               self.param_dtype)  # fmt: skip
            y = y * gamma.astype(dtype).reshape(1, 1, 1, c)
        return x.astype(dtype) + y


class HNeRVEncoder(nn.Module):
    """HNeRV's ConvNeXt frame encoder (https://arxiv.org/abs/2304.02633): frame ``[B, H, W, 3]``
    → embedding ``[B, H/∏s, W/∏s, dims[-1]]``.

    Stage i: a patchify conv (kernel = stride = ``strides[i]``; LayerNorm after it in stage 0,
    before it later, as the official ``ConvNeXt``) then ``blocks`` `ConvNeXtBlock`s. The official
    ``--enc_dim 64_16`` gives ``dims = (64, 64, 64, 64, 16)`` with ``--enc_strds 5 4 4 2 2``.

    Attributes:
      strides: per-stage downsampling factors.
      dims: per-stage widths (the last is the embedding's channels).
      blocks: ConvNeXt blocks per stage (official ``num_blks`` first entry, 1).
      in_chans: frame channels.
      dtype, param_dtype: compute and storage dtypes.
    """

    strides: tuple[int, ...] = (5, 4, 4, 2, 2)
    dims: tuple[int, ...] = (64, 64, 64, 64, 16)
    blocks: int = 1
    in_chans: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B h w E"]:
        if len(self.strides) != len(self.dims) or not self.strides:
            raise ValueError(f"HNeRVEncoder: strides {self.strides} and dims {self.dims} need one "
                             "entry per stage")  # fmt: skip
        _check_nhwc("HNeRVEncoder", x, self.in_chans)
        total = 1
        for s in self.strides:
            total *= s
        if x.shape[1] % total or x.shape[2] % total:
            raise ValueError(
                f"HNeRVEncoder: frame size {x.shape[1:3]} of x {x.shape} must be divisible by "
                f"the product of strides {self.strides} = {total}"
            )
        dtype = _dtype(self.dtype, x)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        y = x.astype(dtype)
        for i, (s, d) in enumerate(zip(self.strides, self.dims, strict=True)):
            if i:
                y = nn.LayerNorm(LN_EPS, use_fast_variance=False, name=f"down{i}_norm", **kw)(y)
            y = nn.Conv(d, (s, s), strides=s, padding="VALID", kernel_init=ENC_INIT,
                        name=f"down{i}_conv", **kw)(y)  # fmt: skip
            if not i:
                y = nn.LayerNorm(LN_EPS, use_fast_variance=False, name=f"down{i}_norm", **kw)(y)
            for j in range(self.blocks):
                y = ConvNeXtBlock(d, name=f"stage{i}_block{j}", **kw)(y)
        return y


class NeRVBlock(nn.Module):
    """NeRV / HNeRV decoder block (https://arxiv.org/abs/2304.02633): Conv k×k (``C_out·s²``
    channels, 'same' padding) → `pixel_shuffle` (s) → GELU. HNeRV grows k with depth
    (`nerv_kernel_size`) and shrinks widths by 1.2 per stage (`nerv_widths`).

    Attributes:
      features: output channels C_out.
      stride: upscale factor s (1: no shuffle).
      kernel_size: k (odd).
      act: activation (official ``--act gelu``; exact erf GELU as torch's ``nn.GELU``).
      dtype, param_dtype: compute and storage dtypes.
    """

    features: int
    stride: int = 2
    kernel_size: int = 3
    act: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B Hs Ws F"]:
        _check_nhwc("NeRVBlock", x)
        k, s = self.kernel_size, self.stride
        if k < 1 or k % 2 == 0:
            raise ValueError(f"NeRVBlock: kernel_size must be odd and positive, got {k}")
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"NeRVBlock: stride must be a positive int, got {s!r}")
        dtype = _dtype(self.dtype, x)
        y = nn.Conv(self.features * s * s, (k, k), padding=(k - 1) // 2, kernel_init=CONV_INIT,
                    dtype=dtype, param_dtype=self.param_dtype, name="conv")(x)  # fmt: skip
        if s > 1:
            y = pixel_shuffle(y, s)
        act = self.act or (lambda t: nn.gelu(t, approximate=False))
        return act(y)


class SeparableConvResBlock(nn.Module):
    """NeRV++'s separable-conv2d residual block, SCRB (https://arxiv.org/abs/2402.18305):
    ``x + SepConv(GELU(SepConv(x)))`` with ``SepConv`` = depthwise k×k → pointwise 1×1.

    No code is released; the paper names the block (separable conv2d, residual) and this is the
    plainest reading of it: two separable convolutions with the decoder's activation between.

    Attributes:
      kernel_size: depthwise kernel (3).
      act: activation between the two separable convs (GELU as the HNeRV decoder).
      dtype, param_dtype: compute and storage dtypes.
    """

    kernel_size: int = 3
    act: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        _check_nhwc("SeparableConvResBlock", x)
        k = self.kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"SeparableConvResBlock: kernel_size must be odd, got {k}")
        dtype = _dtype(self.dtype, x)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype, kernel_init=CONV_INIT)
        c = x.shape[-1]
        act = self.act or (lambda t: nn.gelu(t, approximate=False))
        y = x.astype(dtype)
        for i in range(2):
            if i:
                y = act(y)
            y = nn.Conv(c, (k, k), padding=(k - 1) // 2, feature_group_count=c,
                        name=f"dw{i}", **kw)(y)  # fmt: skip
            y = nn.Conv(c, (1, 1), name=f"pw{i}", **kw)(y)
        return x.astype(dtype) + y


class NeRVPlusPlusBlock(nn.Module):
    """NeRV++ upsampling stage (https://arxiv.org/abs/2402.18305): SCRB → `NeRVBlock` (the
    upsampling block, UB) → SCRB, plus a bilinear-interpolation skip:
    ``y = SCRB₂(UB(SCRB₁(x))) + P(bilinear_upsample(x, s))`` where P is a 1×1 conv when the width
    changes (identity otherwise) — the skip needs matching channels and the paper does not say
    how it gets them; a 1×1 projection is the cheapest choice.

    Attributes:
      features, stride, kernel_size, act: of the inner `NeRVBlock`.
      scrb_kernel_size: depthwise kernel of both SCRBs.
      dtype, param_dtype: compute and storage dtypes.
    """

    features: int
    stride: int = 2
    kernel_size: int = 3
    scrb_kernel_size: int = 3
    act: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B Hs Ws F"]:
        _check_nhwc("NeRVPlusPlusBlock", x)
        dtype = _dtype(self.dtype, x)
        kw = dict(act=self.act, dtype=dtype, param_dtype=self.param_dtype)
        y = SeparableConvResBlock(self.scrb_kernel_size, name="scrb_in", **kw)(x)
        y = NeRVBlock(self.features, self.stride, self.kernel_size, name="up", **kw)(y)
        y = SeparableConvResBlock(self.scrb_kernel_size, name="scrb_out", **kw)(y)
        skip = bilinear_upsample(x.astype(dtype), self.stride)
        if x.shape[-1] != self.features:
            skip = nn.Conv(self.features, (1, 1), kernel_init=CONV_INIT, dtype=dtype,
                           param_dtype=self.param_dtype, name="skip_proj")(skip)  # fmt: skip
        return y + skip
