"""FSMN memory layers — Zhang et al., "Feedforward Sequential Memory Networks",
https://arxiv.org/abs/1512.08301, in the real-valued forms MossFormer2
(https://arxiv.org/abs/2312.11825) and FRCRN use.

A feedforward sequential memory block adds to each frame a learned per-channel filter of its
neighbours (a depthwise convolution over time): recurrence-like context with no recurrence.
`UniDeepFsmn` uses one symmetric depthwise filter; `DilatedDenseFsmn` (the official
``DilatedDenseNet``) stacks dilated grouped filters with dense connections, instance norm and
PReLU, and `UniDeepFsmnDilated` puts it in place of the single filter. Layout is
``[B, T, C]`` (time before channels), unlike the official ``[B, C, T]``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = [
    "ChannelPReLU",
    "DilatedDenseFsmn",
    "UniDeepFsmn",
    "UniDeepFsmnDilated",
    "fsmn_memory",
]


def _check_btc(layer: str, x: Array) -> None:
    if x.ndim != 3:
        raise ValueError(f"{layer}: x must be [B, T, C], got shape {x.shape}")


def _check_lorder(layer: str, lorder: int) -> None:
    if isinstance(lorder, bool) or not isinstance(lorder, int) or lorder < 1:
        raise ValueError(f"{layer}: lorder must be an int >= 1, got {lorder!r}")


def fsmn_memory(
    p: Float[Array, "B T C"], kernel: Float[Array, "K C"], dilation: int = 1
) -> Float[Array, "B T C"]:
    """The FSMN memory term ``m_t[c] = Σ_j kernel[j, c] · p[t + (j − (K−1)/2)·dilation, c]``:
    a symmetric ("same", zero-padded) depthwise cross-correlation over time, ``K`` odd."""
    k = kernel.shape[0]
    if k % 2 != 1 or kernel.ndim != 2 or kernel.shape[1] != p.shape[-1]:
        raise ValueError(f"fsmn_memory: kernel must be [K odd, C={p.shape[-1]}], got "
                         f"{kernel.shape}")  # fmt: skip
    pad = dilation * (k - 1) // 2
    return jax.lax.conv_general_dilated(
        p,
        kernel[:, None, :].astype(p.dtype),  # [K, 1, C]
        window_strides=(1,),
        padding=[(pad, pad)],
        rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=p.shape[-1],
    )


class ChannelPReLU(nn.Module):
    """PReLU ``max(x, 0) + a·min(x, 0)`` as torch's ``nn.PReLU``: one slope per channel
    (``per_channel=True``, ``nn.PReLU(C)``) or one shared slope (``nn.PReLU()``), init 0.25.

    Flax's `nn.PReLU` has only the shared slope with init 0.01.
    """

    per_channel: bool = True
    negative_slope_init: float = 0.25
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (x.shape[-1],) if self.per_channel else ()
        a = self.param(
            "negative_slope", nn.initializers.constant(self.negative_slope_init), shape,
            self.param_dtype,
        )  # fmt: skip
        a = a.astype(x.dtype).reshape((1,) * (x.ndim - 1) + shape if shape else ())
        return jnp.where(x >= 0, x, a * x)


def causal_fsmn_memory(p: Float[Array, "B L C"], kernel: Float[Array, "K C"]) -> Array:
    """FRCRN's causal FSMN memory ``m_t[c] = Σ_{j<K} kernel[j, c]·p[t − (K − 1) + j, c]`` (zero
    before the start; official ``conv1`` on the input left-padded by ``lorder − 1``). Equal to
    the symmetric `jaxblocks.layers.fsmn.fsmn_memory` with the ``K − 1`` future taps set to
    zero; computed as ``K`` shifted multiply-adds, which XLA:CPU differentiates several times
    faster than a depthwise convolution."""
    if p.ndim != 3 or kernel.ndim != 2 or kernel.shape[1] != p.shape[-1]:
        raise ValueError(f"causal_fsmn_memory: p must be [B, L, C] and kernel [K, C], got "
                         f"{p.shape} and {kernel.shape}")  # fmt: skip
    k, length = kernel.shape[0], p.shape[1]
    padded = jnp.pad(p, ((0, 0), (k - 1, 0), (0, 0)))
    kernel = kernel.astype(p.dtype)[:, None, None, :]  # [K, 1, 1, C]
    out = padded[:, k - 1 :] * kernel[k - 1]
    for j in range(k - 1):
        out = out + padded[:, j : j + length] * kernel[j]
    return out


class UniDeepFsmn(nn.Module):
    """FSMN layer of MossFormer2/FRCRN (https://arxiv.org/abs/1512.08301): ``p =
    W₂ ReLU(W₁x + b₁)``; ``out = x + p + DWConv(p)``, the depthwise filter of ``2·lorder − 1``
    taps centred on the frame (official ``UniDeepFsmn``).

    Attributes:
      hidden_size: width of the ReLU projection (official ``hidden_size``).
      lorder: the filter has ``2·lorder − 1`` taps (official default 20), or ``lorder`` when
        causal.
      causal: FRCRN's variant: the memory filter covers the current and the ``lorder − 1``
        previous positions only (`causal_fsmn_memory`); MossFormer2's is symmetric.
      dtype: compute dtype (None: the input's).
      param_dtype: parameter storage dtype.

    The output width equals the input's (the official residual requires input_dim = output_dim).

    Example:
      >>> layer = UniDeepFsmn(hidden_size=32, lorder=4)
      >>> x = jnp.ones((2, 10, 16))
      >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
      (2, 10, 16)
    """

    hidden_size: int
    lorder: int = 20
    causal: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        name = type(self).__name__
        _check_btc(name, x)
        _check_lorder(name, self.lorder)
        dtype = self.dtype or x.dtype
        c = x.shape[-1]
        dense = dict(dtype=dtype, param_dtype=self.param_dtype)
        f = nn.relu(nn.Dense(self.hidden_size, name="linear", **dense)(x))
        p = nn.Dense(c, use_bias=False, name="project", **dense)(f)
        taps = self.lorder if self.causal else 2 * self.lorder - 1
        kernel = self.param(
            "memory", nn.initializers.lecun_normal(in_axis=0, out_axis=()), (taps, c),
            self.param_dtype,
        )  # fmt: skip
        memory = causal_fsmn_memory if self.causal else fsmn_memory
        return x.astype(dtype) + p + memory(p, kernel.astype(dtype))


class DilatedDenseFsmn(nn.Module):
    """Dilated dense FSMN memory (official ``DilatedDenseNet``, MossFormer2,
    https://arxiv.org/abs/2312.11825).

    Layer ``i`` (dilation ``2^i``) filters the dense concatenation ``[out_{i−1}, …, out_0, x]``
    (``C·(i+1)`` channels) with a grouped convolution of ``2·lorder − 1`` taps, ``C`` groups of
    ``i+1`` *adjacent* concatenated channels each (as the official ``groups=in_channels``),
    then instance norm over time (affine, eps 1e-5) and per-channel PReLU. Returns the last
    layer's output (no residual).

    Attributes:
      depth: number of dilated layers (official 2 inside `UniDeepFsmnDilated`).
      lorder: taps ``2·lorder − 1`` per filter (official 20).
      dtype, param_dtype: compute and storage dtypes.

    Example:
      >>> layer = DilatedDenseFsmn(depth=2, lorder=3)
      >>> x = jnp.ones((2, 12, 8))
      >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
      (2, 12, 8)
    """

    depth: int = 2
    lorder: int = 20
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        _check_btc("DilatedDenseFsmn", x)
        _check_lorder("DilatedDenseFsmn", self.lorder)
        if self.depth < 1:
            raise ValueError(f"DilatedDenseFsmn: depth must be >= 1, got {self.depth}")
        dtype = self.dtype or x.dtype
        c = x.shape[-1]
        skip = x.astype(dtype)
        out = skip
        for i in range(self.depth):
            dil = 2**i
            pad = dil * (self.lorder - 1)
            out = nn.Conv(
                c, (2 * self.lorder - 1,), kernel_dilation=(dil,), padding=[(pad, pad)],
                feature_group_count=c, use_bias=False, dtype=dtype,
                param_dtype=self.param_dtype, name=f"conv{i + 1}",
            )(skip)  # fmt: skip
            # torch InstanceNorm2d(C, affine=True) over time: biased variance, eps 1e-5, fp32.
            out = nn.InstanceNorm(
                epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32,
                param_dtype=self.param_dtype, name=f"norm{i + 1}",
            )(out.astype(jnp.float32)).astype(dtype)  # fmt: skip
            out = ChannelPReLU(param_dtype=self.param_dtype, name=f"prelu{i + 1}")(out)
            skip = jnp.concatenate([out, skip], axis=-1)
        return out


class UniDeepFsmnDilated(nn.Module):
    """FSMN with dilated dense memory (official ``UniDeepFsmn_dilated``, MossFormer2,
    https://arxiv.org/abs/2312.11825): ``p = W₂ ReLU(W₁x + b₁)``; ``out = x +
    DilatedDenseFsmn(p)`` (no inner ``p +`` term, unlike `UniDeepFsmn`).

    Attributes:
      hidden_size: width of the ReLU projection.
      lorder: taps ``2·lorder − 1`` per memory filter (official 20).
      depth: layers of the dilated dense memory (official 2).
      dtype, param_dtype: compute and storage dtypes.

    Example:
      >>> layer = UniDeepFsmnDilated(hidden_size=16, lorder=3)
      >>> x = jnp.ones((2, 12, 8))
      >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
      (2, 12, 8)
    """

    hidden_size: int
    lorder: int = 20
    depth: int = 2
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        _check_btc("UniDeepFsmnDilated", x)
        dtype = self.dtype or x.dtype
        dense = dict(dtype=dtype, param_dtype=self.param_dtype)
        f = nn.relu(nn.Dense(self.hidden_size, name="linear", **dense)(x))
        p = nn.Dense(x.shape[-1], use_bias=False, name="project", **dense)(f)
        mem = DilatedDenseFsmn(self.depth, self.lorder, dtype=dtype,
                               param_dtype=self.param_dtype, name="conv")(p)  # fmt: skip
        return x.astype(dtype) + mem
