"""Spatial and channel squeeze & excitation for fully convolutional networks: cSE, sSE, scSE.

Roy, Navab, Wachinger, "Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully
Convolutional Networks", MICCAI 2018, https://arxiv.org/abs/1803.02579, and the journal version
"Recalibrating Fully Convolutional Networks with Spatial and Channel 'Squeeze & Excitation'
Blocks", IEEE TMI 2019, https://arxiv.org/abs/1808.08127. Official code:
ai-med/squeeze_and_excitation (``squeeze_and_excitation/squeeze_and_excitation.py`` for 2-D,
``squeeze_and_excitation_3D.py`` for 3-D).

The math lives in the pure functions `channel_se`, `spatial_se` and `combine_se`; the Linen
modules only own the parameters and call them, so the same functions serve NNX or plain JAX.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.typing import Array, Float

__all__ = [
    "SCSE_MODES",
    "ChannelSE",
    "ChannelSpatialSE",
    "SpatialSE",
    "channel_se",
    "channel_se_gate",
    "combine_se",
    "spatial_se",
    "spatial_se_gate",
]

Dtype = Any
Initializer = Any

# "max" is the official package's rule; "add" the MICCAI paper's; all four are the aggregation
# strategies compared in the TMI paper.
SCSE_MODES = ("max", "add", "mul", "concat")

# Logical axis names of the parameters (the trainer maps them to mesh axes).
_CHANNELS, _HIDDEN = "channels", "mlp"


# --------------------------------------------------------------------------------------------
# Pure functions: the math.
# --------------------------------------------------------------------------------------------


def _bcast(v: Array, ndim: int) -> Array:
    """[..., n] → [1, ..., 1, n] of rank ``ndim`` (the suite forbids implicit rank promotion)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def channel_se_gate(
    x: Float[Array, "B *S C"],
    fc1_kernel: Float[Array, "C R"],
    fc1_bias: Float[Array, " R"],
    fc2_kernel: Float[Array, "R C"],
    fc2_bias: Float[Array, " C"],
) -> Float[Array, "B C"]:
    """cSE excitation ``σ(W2 · relu(W1 · mean_S(x) + b1) + b2)``, one gate per (sample, channel).

    The spatial mean is taken in float32 and cast back to ``x.dtype``.
    """
    spatial = tuple(range(1, x.ndim - 1))
    z = jnp.mean(x.astype(jnp.float32), axis=spatial).astype(x.dtype)  # [B, C]
    h = nn.relu(z @ fc1_kernel + _bcast(fc1_bias, 2))  # [B, C] @ [C, R] → [B, R]
    return jax.nn.sigmoid(h @ fc2_kernel + _bcast(fc2_bias, 2))  # [B, R] @ [R, C] → [B, C]


def channel_se(
    x: Float[Array, "B *S C"],
    fc1_kernel: Float[Array, "C R"],
    fc1_bias: Float[Array, " R"],
    fc2_kernel: Float[Array, "R C"],
    fc2_bias: Float[Array, " C"],
) -> Float[Array, "B *S C"]:
    """cSE (spatial squeeze, channel excitation): ``x * channel_se_gate(x, ...)``."""
    s = channel_se_gate(x, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias)  # [B, C]
    return x * s.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


def spatial_se_gate(
    x: Float[Array, "B *S C"], kernel: Float[Array, "C 1"], bias: Float[Array, " 1"]
) -> Float[Array, "B *S 1"]:
    """sSE excitation ``σ(x · w + b)``: a 1×1 convolution C → 1, one gate per voxel."""
    q = jnp.einsum("...c,co->...o", x, kernel)  # [B, *S, C] · [C, 1] → [B, *S, 1]
    return jax.nn.sigmoid(q + _bcast(bias, x.ndim))


def spatial_se(
    x: Float[Array, "B *S C"], kernel: Float[Array, "C 1"], bias: Float[Array, " 1"]
) -> Float[Array, "B *S C"]:
    """sSE (channel squeeze, spatial excitation): ``x * spatial_se_gate(x, ...)``."""
    return x * spatial_se_gate(x, kernel, bias)


def combine_se(
    cse: Float[Array, "B *S C"], sse: Float[Array, "B *S C"], mode: str = "max"
) -> Float[Array, "B *S C2"]:
    """Aggregate the cSE and sSE outputs into scSE (TMI paper, https://arxiv.org/abs/1808.08127).

    Args:
      cse: the cSE-recalibrated map ``x * s_channel``.
      sse: the sSE-recalibrated map ``x * q_spatial``, same shape as ``cse``.
      mode: ``"max"`` element-wise maximum (the official package); ``"add"`` sum (the MICCAI
        paper's Eq.); ``"mul"`` element-wise product; ``"concat"`` both maps stacked on the
        channel axis, cSE first.

    Returns:
      ``[B, *S, C]``, or ``[B, *S, 2C]`` for ``"concat"``.
    """
    if mode not in SCSE_MODES:
        raise ValueError(f"combine_se: mode={mode!r} must be one of {SCSE_MODES}")
    if cse.shape != sse.shape:
        raise ValueError(
            f"combine_se: cse has shape {cse.shape} but sse has shape {sse.shape}; expected equal"
        )
    if mode == "max":
        return jnp.maximum(cse, sse)
    if mode == "add":
        return cse + sse
    if mode == "mul":
        return cse * sse
    return jnp.concatenate([cse, sse], axis=-1)


# --------------------------------------------------------------------------------------------
# Linen modules: parameters and validation.
# --------------------------------------------------------------------------------------------


def _check_input(who: str, x: Array) -> None:
    if x.ndim not in (4, 5):
        raise ValueError(
            f"{who}: x must be channels-last [B, H, W, C] (2-D) or [B, D, H, W, C] (3-D), "
            f"got shape {x.shape} (rank {x.ndim})"
        )


def _reduced_channels(who: str, channels: int, reduction_ratio: int) -> int:
    if not isinstance(reduction_ratio, int) or isinstance(reduction_ratio, bool):
        raise ValueError(f"{who}: reduction_ratio={reduction_ratio!r} must be an int")
    if reduction_ratio < 1:
        raise ValueError(f"{who}: reduction_ratio={reduction_ratio} must be >= 1")
    hidden = channels // reduction_ratio
    if hidden < 1:
        raise ValueError(
            f"{who}: channels // reduction_ratio = {channels} // {reduction_ratio} = {hidden}; "
            f"expected >= 1 (x has C={channels} channels on its last axis)"
        )
    return hidden


class ChannelSE(nn.Module):
    """cSE, spatial squeeze and channel excitation — Roy et al. 2018, https://arxiv.org/abs/1803.02579.

    The SE block of Hu et al. (https://arxiv.org/abs/1709.01507) used in a fully convolutional
    net: global average over the spatial axes → ``Dense(C // r)`` → ReLU → ``Dense(C)`` →
    sigmoid, then each channel of ``x`` is scaled by its gate. It recalibrates *which channels*
    matter, the same for every voxel; `SpatialSE` is its transpose. Unlike
    `jaxblocks.layers.SqueezeExcite` both Dense layers carry a bias and the hidden width is
    ``C // r`` exactly (r = 2 by default), as in the official ``ChannelSELayer`` /
    ``ChannelSELayer3D``. One module serves 2-D ``[B, H, W, C]`` and 3-D ``[B, D, H, W, C]``
    inputs (the official package has a class for each).

    Deviations from the official code: channels-last; the spatial mean is taken in float32;
    initializers default to Flax's (LeCun-normal kernels, zero biases), not torch ``nn.Linear``'s
    uniform ones; pass ``kernel_init``/``bias_init`` to change them.

    Attributes:
      reduction_ratio: r, the bottleneck width is ``C // r`` (official default 2).
      dtype: compute dtype (None: promoted from the input and the parameters).
      param_dtype: storage dtype of ``fc1`` (kernel ``[C, C // r]``, bias ``[C // r]``) and
        ``fc2`` (kernel ``[C // r, C]``, bias ``[C]``).
      kernel_init, bias_init: initializers of the two Dense layers.

    Example:
      >>> cse = ChannelSE(reduction_ratio=2)
      >>> x = jnp.ones((2, 8, 8, 16))
      >>> y = cse.apply(cse.init(jax.random.key(0), x), x)  # [2, 8, 8, 16]
    """

    reduction_ratio: int = 2
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B *S C"]) -> Float[Array, "B *S C"]:
        """Args: x, ``[B, H, W, C]`` or ``[B, D, H, W, C]``. Returns: ``x`` scaled per channel."""
        _check_input("ChannelSE", x)
        C = x.shape[-1]
        R = _reduced_channels("ChannelSE", C, self.reduction_ratio)

        def param(name, init, shape, axes):
            return self.param(
                name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
            )

        w1 = param("fc1_kernel", self.kernel_init, (C, R), (_CHANNELS, _HIDDEN))
        b1 = param("fc1_bias", self.bias_init, (R,), (_HIDDEN,))
        w2 = param("fc2_kernel", self.kernel_init, (R, C), (_HIDDEN, _CHANNELS))
        b2 = param("fc2_bias", self.bias_init, (C,), (_CHANNELS,))
        x, w1, b1, w2, b2 = nn.dtypes.promote_dtype(x, w1, b1, w2, b2, dtype=self.dtype)
        return channel_se(x, w1, b1, w2, b2)


class SpatialSE(nn.Module):
    """sSE, channel squeeze and spatial excitation — Roy et al. 2018, https://arxiv.org/abs/1803.02579.

    A 1×1 convolution C → 1 (with bias) squeezes the channels at each voxel, a sigmoid turns it
    into a gate in (0, 1), and every channel of ``x`` at that voxel is scaled by it. It
    recalibrates *where* the features matter, the same for all channels; `ChannelSE` is its
    transpose. Mirrors the official ``SpatialSELayer`` / ``SpatialSELayer3D``.

    Deviations from the official code: channels-last; the 1×1 convolution is stored as a
    ``[C, 1]`` kernel (no spatial axes), so one set of parameters serves 2-D and 3-D inputs;
    the official layer's optional few-shot ``weights`` argument (an external kernel) is left
    out: call `spatial_se` with your own kernel instead; Flax initializers (LeCun-normal, zero
    bias) instead of torch ``Conv2d``'s.

    Attributes:
      dtype: compute dtype (None: promoted from the input and the parameters).
      param_dtype: storage dtype of ``kernel`` ``[C, 1]`` and ``bias`` ``[1]``.
      kernel_init, bias_init: initializers of the 1×1 convolution.

    Example:
      >>> sse = SpatialSE()
      >>> x = jnp.ones((2, 4, 8, 8, 16))
      >>> y = sse.apply(sse.init(jax.random.key(0), x), x)  # [2, 4, 8, 8, 16]
    """

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B *S C"]) -> Float[Array, "B *S C"]:
        """Args: x, ``[B, H, W, C]`` or ``[B, D, H, W, C]``. Returns: ``x`` scaled per voxel."""
        _check_input("SpatialSE", x)
        C = x.shape[-1]
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, (_CHANNELS, None)),
            (C, 1),
            self.param_dtype,
        )
        b = self.param(
            "bias", nn.with_logical_partitioning(self.bias_init, (None,)), (1,), self.param_dtype
        )
        x, w, b = nn.dtypes.promote_dtype(x, w, b, dtype=self.dtype)
        return spatial_se(x, w, b)


class ChannelSpatialSE(nn.Module):
    """scSE, concurrent spatial and channel SE — Roy et al. 2018, https://arxiv.org/abs/1803.02579.

    Runs `ChannelSE` and `SpatialSE` side by side on the same input and aggregates their
    outputs with `combine_se`, so a voxel-channel is kept if it is important either channel-wise
    or spatially. ``mode`` chooses the aggregation compared in the TMI paper
    (https://arxiv.org/abs/1808.08127): ``"max"`` (default, the official
    ``ChannelSpatialSELayer``/``ChannelSpatialSELayer3D``, ``torch.max``), ``"add"`` (the MICCAI
    paper's sum, also segmentation_models_pytorch's ``SCSEModule``), ``"mul"`` and ``"concat"``.
    The official package implements only ``"max"``; ``"add"``, ``"mul"`` and ``"concat"``
    follow the papers' descriptions, and ``"concat"`` puts the cSE map first and returns
    ``2C`` channels (the layer after it must take them).

    Parameters live in the sub-modules ``cse`` (`ChannelSE`) and ``sse`` (`SpatialSE`), so
    ``params["cse"]`` applies to a standalone `ChannelSE`. Deviations from the official code are
    those of the two sub-modules.

    Attributes:
      reduction_ratio: r of the cSE bottleneck ``C // r`` (official default 2).
      mode: ``"max"``, ``"add"``, ``"mul"`` or ``"concat"``.
      dtype: compute dtype (None: promoted from the input and the parameters).
      param_dtype: storage dtype of the parameters.
      kernel_init, bias_init: initializers of all kernels and biases.

    Example:
      >>> scse = ChannelSpatialSE(mode="max")
      >>> x = jnp.ones((2, 8, 8, 16))
      >>> y = scse.apply(scse.init(jax.random.key(0), x), x)  # [2, 8, 8, 16]
    """

    reduction_ratio: int = 2
    mode: str = "max"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B *S C"]) -> Float[Array, "B *S C2"]:
        """Args: x, ``[B, H, W, C]`` or ``[B, D, H, W, C]``. Returns: ``[B, *S, C]``
        (``[B, *S, 2C]`` for ``mode="concat"``)."""
        if self.mode not in SCSE_MODES:
            raise ValueError(f"ChannelSpatialSE: mode={self.mode!r} must be one of {SCSE_MODES}")
        _check_input("ChannelSpatialSE", x)
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
        )
        cse = ChannelSE(reduction_ratio=self.reduction_ratio, name="cse", **common)(x)
        sse = SpatialSE(name="sse", **common)(x)
        return combine_se(cse, sse, self.mode)
