"""RaftMLP: raft token mixing (vertical and horizontal MLPs over rafts of channels) and the
cross-scale MLP embedding.

Tatsunami, Taki, "RaftMLP: How Much Can Be Done Without Attention and with Less Spatial
Locality?", https://arxiv.org/abs/2108.04384. Official code: okojoalg/raft-mlp
``libs/modules.py`` (``PermutedBlock``, ``ChannelBlock``, ``RaftShrink``/``RaftExpansion``,
``CrossScaleMLPEmbedding``, ``SerialPermutedLevel``).

MLP-Mixer mixes all ``H·W`` tokens with one MLP per channel. RaftMLP splits the token mixing
into a vertical MLP (over the ``H`` positions of a column) and a horizontal MLP (over the ``W``
positions of a row), and makes each see a *raft* of ``r`` channels at once: the ``C`` channels
are grouped into ``C / r`` rafts, and the vertical MLP maps the ``r·H`` values of one raft in
one column to ``r·H`` values. Layout as the official einops patterns: channel
``c = k·(C/r) + j`` is member ``k`` of raft ``j``, and a raft column is flattened ``(k, h)``,
member-major.

The mixing weights are sized by the token grid ``(ph, pw)`` of the training resolution. On
another grid `RaftMLPBlock` resizes the tokens to ``(ph, pw)`` with torch-compatible bicubic
interpolation before the token mixing and back afterwards, every block, as the official
``RaftShrink``/``RaftExpansion`` (`resize_bicubic`).

The math lives in pure functions (`to_rafts`, `from_rafts`, `bicubic_resize_matrix`,
`resize_bicubic`, `cross_scale_embedding`); the Linen modules own the parameters.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.blocks.ninformer import FeedForward, torch_linear_bias_init, torch_linear_kernel_init
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "ACTIVATION_AXES",
    "LN_EPSILON",
    "ChannelMLPBlock",
    "CrossScaleMLPEmbedding",
    "PermutedBlock",
    "RaftLayerNorm",
    "RaftMLPBlock",
    "RaftTokenMixingBlock",
    "bicubic_resize_matrix",
    "check_embedding_kernels",
    "cross_scale_embedding",
    "embedding_grid",
    "from_rafts",
    "resize_bicubic",
    "to_rafts",
]

Dtype = Any
Axis = Literal["vertical", "horizontal"]

# torch's LayerNorm ε, kept by the official code.
LN_EPSILON = 1e-5
# torch's bicubic kernel (F.interpolate, mode="bicubic"): Keys' cubic convolution with a = -0.75
# (jax.image.resize uses a = -0.5 and antialiases when shrinking, so it is not used here).
TORCH_CUBIC_A = -0.75
ACTIVATION_AXES = ("batch", None, None, "embed")


# --------------------------------------------------------------------------------------------
# Pure functions: the math.
# --------------------------------------------------------------------------------------------


def to_rafts(x: Float[Array, "B H W C"], raft_size: int, axis: Axis) -> Array:
    """Tokens → raft rows: ``[B, W, C/r, r·H]`` (vertical) or ``[B, H, C/r, r·W]`` (horizontal).

    Row ``(w, j)`` of the vertical form holds raft ``j`` of column ``w``, flattened
    ``(k, h) → k·H + h`` with channel ``c = k·C/r + j`` (the official ``RaftShrink``:
    ``b (h w) (chw co) -> b (co w) (chw h)``); the horizontal form is the same with rows and
    columns exchanged (the official ``b (co w) (chw h) -> b (co h) (chw w)``).
    """
    b, h, w, c = x.shape
    r = raft_size
    x = x.reshape(b, h, w, r, c // r)  # [B, H, W, r, C/r]
    if axis == "vertical":
        return x.transpose(0, 2, 4, 3, 1).reshape(b, w, c // r, r * h)  # [B, W, C/r, (r, H)]
    return x.transpose(0, 1, 4, 3, 2).reshape(b, h, c // r, r * w)  # [B, H, C/r, (r, W)]


def from_rafts(t: Array, raft_size: int, axis: Axis, shape: tuple[int, ...]) -> Array:
    """The inverse of `to_rafts` back to tokens of ``shape`` ``(B, H, W, C)``."""
    b, h, w, c = shape
    r = raft_size
    if axis == "vertical":
        t = t.reshape(b, w, c // r, r, h)  # [B, W, C/r, r, H]
        return t.transpose(0, 4, 1, 3, 2).reshape(b, h, w, c)
    t = t.reshape(b, h, c // r, r, w)  # [B, H, C/r, r, W]
    return t.transpose(0, 1, 4, 3, 2).reshape(b, h, w, c)


def _cubic_weights(t: float, a: float) -> tuple[float, float, float, float]:
    # The four taps at offsets -1, 0, 1, 2 of torch's get_cubic_upsample_coefficients.
    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)


def bicubic_resize_matrix(in_size: int, out_size: int, a: float = TORCH_CUBIC_A) -> np.ndarray:
    """``[out_size, in_size]`` matrix of torch's 1-D bicubic resize (``align_corners=False``).

    As ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`` with an output
    size: source position ``(i + ½)·in/out − ½`` (not clamped), the four taps around it
    weighted by Keys' cubic with ``a = −0.75``, out-of-range taps clamped to the border pixel,
    no antialiasing. Equal sizes give the identity.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic_resize_matrix: sizes must be >= 1, got in_size={in_size}, "
                         f"out_size={out_size}")  # fmt: skip
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        i0 = math.floor(src)
        for off, wgt in zip(range(-1, 3), _cubic_weights(src - i0, a), strict=True):
            m[i, min(max(i0 + off, 0), in_size - 1)] += wgt
    return m


def resize_bicubic(x: Float[Array, "B H W C"], size: tuple[int, int]) -> Float[Array, "B h w C"]:
    """Resize the spatial axes of NHWC ``x`` to ``size`` as torch's bicubic `F.interpolate`
    (`bicubic_resize_matrix` along H, then along W); the identity when the size is unchanged."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    mh = jnp.asarray(bicubic_resize_matrix(h, size[0]), x.dtype)
    mw = jnp.asarray(bicubic_resize_matrix(w, size[1]), x.dtype)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def embedding_grid(size: int, kernel: int, stride: int) -> int:
    """Output positions along one axis of ``nn.Unfold(kernel, stride, padding=(k − s) // 2)``."""
    pad = (kernel - stride) // 2
    return (size + 2 * pad - kernel) // stride + 1


def cross_scale_embedding(
    x: Float[Array, "B H W Ci"],
    kernel: Float[Array, "K Co"],
    bias: Float[Array, " Co"] | None,
    kernels: tuple[int, ...],
    precision: Any = None,
) -> Float[Array, "B h w Co"]:
    """The official ``CrossScaleMLPEmbedding``: ``fc(concat_k unfold_k(x))``.

    Each ``nn.Unfold(k, stride=s, padding=(k − s) // 2)`` (``s = min(kernels)``) gives the
    ``k×k`` patches around every output position, flattened ``(C, kh, kw)``; they are
    concatenated in the order of ``kernels`` and one Linear maps them to ``Co``. Here the
    Linear's rows of kernel ``k`` are reshaped into a ``k×k`` convolution with the same stride
    and padding, and the convolutions are summed: the same map, without materialising the
    patches.

    Args:
      x: NHWC input whose ``H`` and ``W`` are multiples of ``min(kernels)``.
      kernel: ``[Ci·Σk², Co]`` Linear weight, rows ordered as the concatenated patches.
      bias: ``[Co]`` or None.
      kernels: patch sizes; each a multiple of the smallest, with ``k − s`` even.
      precision: of the convolutions.
    """
    stride = min(kernels)
    ci = x.shape[-1]
    y = None
    offset = 0
    for k in kernels:
        n = ci * k * k
        w = kernel[offset : offset + n].reshape(ci, k, k, -1).transpose(1, 2, 0, 3)  # HWIO
        offset += n
        pad = (k - stride) // 2
        out = jax.lax.conv_general_dilated(
            x,
            w.astype(x.dtype),
            window_strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )
        y = out if y is None else y + out
    if bias is not None:
        y = y + bias.astype(y.dtype).reshape(1, 1, 1, -1)
    return y


# --------------------------------------------------------------------------------------------
# Linen modules: parameters and validation.
# --------------------------------------------------------------------------------------------


def _positive(who: str, **values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{who}: {name}={v!r} must be a positive int")


def _check_tokens(who: str, x: Array, channels: int | None = None) -> None:
    if x.ndim != 4:
        raise ValueError(f"{who}: x must be NHWC tokens [batch, height, width, channels], got "
                         f"shape {x.shape} (rank {x.ndim})")  # fmt: skip
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"{who}: x has shape {x.shape}, {x.shape[-1]} channels; expected "
                         f"{channels}")  # fmt: skip


def _check_rafts(who: str, channels: int, raft_size: int) -> None:
    if channels % raft_size:
        raise ValueError(f"{who}: channels={channels} must be divisible by "
                         f"raft_size={raft_size}")  # fmt: skip


# The official ``Block.fn`` (Linear → GELU (erf) → Dropout → Linear → Dropout, torch's Linear
# init) is NiNformer's ``FeedForward``.
_Mlp = FeedForward


class RaftLayerNorm(nn.Module):
    """LayerNorm over the channels with its affine parameters in the official raft order
    (https://arxiv.org/abs/2108.04384).

    The official ``PermutedBlock`` normalises after ``b (c1 o1) (c2 o2) -> b (o1 o2) (c1 c2)``,
    so its ``nn.LayerNorm(C)`` sees the channels in raft-major order ``j·r + k`` rather than
    the tokens' ``k·(C/r) + j``. The statistics do not depend on the order; ``scale`` and
    ``bias`` are stored in the official order (so weights load unchanged) and permuted to the
    tokens' order when applied. Statistics in float32, ε = 1e-5 (torch's).

    Attributes:
      raft_size: ``r``.
      epsilon: variance ε.
      dtype, param_dtype: compute and parameter dtypes.
    """

    raft_size: int
    epsilon: float = LN_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... C"]) -> Float[Array, "... C"]:
        c = x.shape[-1]
        r = self.raft_size
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (c,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            (c,),
            self.param_dtype,
        )
        # official index j·r + k → token channel k·(C/r) + j
        scale = scale.reshape(c // r, r).T.reshape(c)
        bias = bias.reshape(c // r, r).T.reshape(c)
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + self.epsilon)
        bc = (1,) * (x.ndim - 1) + (c,)
        y = y * scale.astype(jnp.float32).reshape(bc) + bias.astype(jnp.float32).reshape(bc)
        return y.astype(dtype)


class PermutedBlock(nn.Module):
    """One raft token-mixing MLP of RaftMLP (https://arxiv.org/abs/2108.04384): the official
    ``PermutedBlock``, vertical or horizontal.

    ``x + DropPath(MLP(to_rafts(RaftLN(x))))``: the MLP maps the ``r·L`` values of one raft
    along one column (vertical, ``L = H``) or row (horizontal, ``L = W``) to ``r·L·e`` and back
    (``e = expansion``, GELU). Its weights are ``[r·L, r·L·e]``, so ``L`` is fixed.

    Attributes:
      length: ``H`` (vertical) or ``W`` (horizontal) of the token grid.
      raft_size: channels per raft ``r``.
      axis: ``"vertical"`` or ``"horizontal"``.
      expansion: hidden width factor (the official ``token_expansion_factor``, 2).
      dropout: dropout rate inside the MLP.
      drop_path: stochastic-depth rate of the branch.
      dtype, param_dtype: compute and parameter dtypes.
    """

    length: int
    raft_size: int
    axis: Axis = "vertical"
    expansion: int = 2
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, deterministic: bool = True
    ) -> Float[Array, "B H W C"]:
        who = f"PermutedBlock({self.axis})"
        _positive(who, length=self.length, raft_size=self.raft_size, expansion=self.expansion)
        if self.axis not in ("vertical", "horizontal"):
            raise ValueError(f"{who}: axis must be 'vertical' or 'horizontal'")
        _check_tokens(who, x)
        _check_rafts(who, x.shape[-1], self.raft_size)
        got = x.shape[1] if self.axis == "vertical" else x.shape[2]
        if got != self.length:
            dim = "height" if self.axis == "vertical" else "width"
            raise ValueError(
                f"{who}: x has shape {x.shape}, {dim} {got}, but the mixing MLP was built for "
                f"length={self.length} (weights [r·length, r·length·expansion]); resize the "
                "tokens (RaftMLPBlock does) or build the block for the new grid"
            )
        f = self.raft_size * self.length
        t = to_rafts(RaftLayerNorm(self.raft_size, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="norm")(x),
                     self.raft_size, self.axis)  # fmt: skip
        t = _Mlp(
            f * self.expansion,
            self.dropout,
            kernel_axes=(None, "mlp"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(t, deterministic=deterministic)
        y = from_rafts(t, self.raft_size, self.axis, x.shape)
        return x + drop_path(self, y, self.drop_path, deterministic)


class RaftTokenMixingBlock(nn.Module):
    """RaftMLP's raft token mixing (https://arxiv.org/abs/2108.04384): a vertical then a
    horizontal `PermutedBlock`, on the fixed ``(height, width)`` token grid.

    As the official ``SerialPermutedLevel``'s ``RaftShrink → PermutedBlock(ph) → Rearrange →
    PermutedBlock(pw) → RaftExpansion`` on the training grid. Each has its own LayerNorm and
    residual. Parameters: ``vertical``, ``horizontal``.

    Attributes:
      height, width: the token grid the weights are sized for.
      raft_size, expansion, dropout, drop_path: of both `PermutedBlock`.
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax
      >>> mix = RaftTokenMixingBlock(height=4, width=6, raft_size=2)
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 6, 8))
      >>> mix.apply(mix.init(jax.random.key(1), x), x).shape
      (2, 4, 6, 8)
    """

    height: int
    width: int
    raft_size: int = 2
    expansion: int = 2
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, deterministic: bool = True
    ) -> Float[Array, "B H W C"]:
        _check_tokens("RaftTokenMixingBlock", x)
        if tuple(x.shape[1:3]) != (self.height, self.width):
            raise ValueError(
                f"RaftTokenMixingBlock: x has shape {x.shape}, token grid {tuple(x.shape[1:3])}, "
                f"but the mixing weights are sized for (height, width)=({self.height}, "
                f"{self.width}); resize the tokens (RaftMLPBlock does) or rebuild the block"
            )
        kw = dict(
            raft_size=self.raft_size,
            expansion=self.expansion,
            dropout=self.dropout,
            drop_path=self.drop_path,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = PermutedBlock(self.height, axis="vertical", name="vertical", **kw)(
            x, deterministic=deterministic
        )
        return PermutedBlock(self.width, axis="horizontal", name="horizontal", **kw)(
            x, deterministic=deterministic
        )


class ChannelMLPBlock(nn.Module):
    """RaftMLP's channel mixing (https://arxiv.org/abs/2108.04384), the official
    ``ChannelBlock``: ``x + DropPath(MLP(LN(x)))`` with ``C → e·C → C`` (GELU), LN ε 1e-5.

    Attributes:
      expansion: hidden width factor (``channel_expansion_factor``, 4).
      dropout: dropout rate inside the MLP.
      drop_path: stochastic-depth rate of the branch.
      dtype, param_dtype: compute and parameter dtypes.
    """

    expansion: int = 4
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... C"], *, deterministic: bool = True) -> Array:
        c = x.shape[-1]
        h = nn.LayerNorm(
            epsilon=LN_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            name="norm",
        )(x)
        mlp = _Mlp(c * self.expansion, self.dropout, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")  # fmt: skip
        h = mlp(h, deterministic=deterministic)
        return x + drop_path(self, h, self.drop_path, deterministic)


class RaftMLPBlock(nn.Module):
    """RaftMLP block (https://arxiv.org/abs/2108.04384): raft token mixing on the training
    grid, then channel mixing on the input's grid.

    One repetition of the official ``SerialPermutedLevel``: ``RaftShrink`` (bicubic resize of
    the tokens to the grid ``(height, width)`` the mixing weights were built for, when the
    input's grid differs), `RaftTokenMixingBlock`, ``RaftExpansion`` (bicubic resize back),
    `ChannelMLPBlock`. Inputs of any grid are accepted; at the training grid the resizes are
    skipped. The resizes are torch's bicubic (`resize_bicubic`) and, as in the official code,
    also carry the token mixers' residual stream, so away from the training grid the block is
    not the identity-plus-branch it is on that grid.

    Attributes:
      height, width: the training token grid (the official ``ph``, ``pw``).
      raft_size: channels per raft ``r`` (must divide the channels).
      token_expansion, channel_expansion: hidden factors of the token and channel MLPs (2, 4).
      dropout: dropout inside every MLP.
      drop_path: stochastic-depth rate of the three residual branches (the official code uses
        the same rate in every block of the network, not a linear ramp).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax
      >>> block = RaftMLPBlock(height=4, width=4, raft_size=2)
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
      >>> variables = block.init(jax.random.key(1), x)
      >>> block.apply(variables, x).shape
      (2, 4, 4, 8)
      >>> y = jax.random.normal(jax.random.key(2), (2, 3, 5, 8))
      >>> block.apply(variables, y).shape  # resized to 4x4 for the token mixing and back
      (2, 3, 5, 8)
    """

    height: int
    width: int
    raft_size: int = 2
    token_expansion: int = 2
    channel_expansion: int = 4
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, deterministic: bool = True
    ) -> Float[Array, "B H W C"]:
        _positive("RaftMLPBlock", height=self.height, width=self.width,
                  raft_size=self.raft_size, token_expansion=self.token_expansion,
                  channel_expansion=self.channel_expansion)  # fmt: skip
        for name in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"RaftMLPBlock: {name}={getattr(self, name)!r} must be in [0, 1)")
        _check_tokens("RaftMLPBlock", x)
        _check_rafts("RaftMLPBlock", x.shape[-1], self.raft_size)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        kw = dict(dropout=self.dropout, drop_path=self.drop_path, dtype=self.dtype,
                  param_dtype=self.param_dtype)  # fmt: skip
        grid = tuple(x.shape[1:3])
        t = resize_bicubic(x, (self.height, self.width))
        t = RaftTokenMixingBlock(
            self.height, self.width, self.raft_size, self.token_expansion, name="token_mixing",
            **kw,
        )(t, deterministic=deterministic)  # fmt: skip
        x = resize_bicubic(t, grid)
        x = ChannelMLPBlock(self.channel_expansion, name="channel_mixing", **kw)(
            x, deterministic=deterministic
        )
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class CrossScaleMLPEmbedding(nn.Module):
    """RaftMLP's cross-scale (multi-scale) MLP patch embedding
    (https://arxiv.org/abs/2108.04384), the official ``CrossScaleMLPEmbedding``.

    Unlike a plain patch embedding, each output token sees patches of several sizes centred on
    the same stride-``s`` cell (``s = min(kernels)``, ``padding = (k − s) / 2``), concatenated
    and mapped to ``features`` by one Linear (`cross_scale_embedding`). The parameters are the
    official ``fc``: ``kernel [Ci·Σk², features]`` (rows in ``nn.Unfold``'s ``(C, kh, kw)``
    order, kernels in the given order) and ``bias``; torch's default init.

    Attributes:
      features: output channels.
      kernels: patch sizes, the smallest first (the patch size / stride); each a multiple of
        the smallest with an even difference (so all grids agree).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax
      >>> emb = CrossScaleMLPEmbedding(features=16, kernels=(4, 8))
      >>> x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
      >>> emb.apply(emb.init(jax.random.key(1), x), x).shape
      (2, 8, 8, 16)
    """

    features: int
    kernels: tuple[int, ...] = (4, 8)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W Ci"]) -> Float[Array, "B h w Co"]:
        _positive("CrossScaleMLPEmbedding", features=self.features)
        check_embedding_kernels("CrossScaleMLPEmbedding", tuple(self.kernels))
        _check_tokens("CrossScaleMLPEmbedding", x)
        s = min(self.kernels)
        if x.shape[1] % s or x.shape[2] % s:
            raise ValueError(
                f"CrossScaleMLPEmbedding: x has shape {x.shape}; height and width must be "
                f"multiples of the stride min(kernels)={s} (the model resizes them first)"
            )
        ci = x.shape[-1]
        fan_in = ci * sum(k * k for k in self.kernels)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(torch_linear_kernel_init, (None, "embed")),
            (fan_in, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(torch_linear_bias_init(fan_in), ("embed",)),
            (self.features,),
            self.param_dtype,
        )
        dtype = self.dtype or x.dtype
        y = cross_scale_embedding(x.astype(dtype), kernel.astype(dtype), bias.astype(dtype),
                                  tuple(self.kernels))  # fmt: skip
        return nn.with_logical_constraint(y, ACTIVATION_AXES)


def check_embedding_kernels(who: str, kernels: tuple[int, ...]) -> None:
    """Kernels of `CrossScaleMLPEmbedding`: positive ints, the first the smallest, each a
    multiple of it with an even difference (otherwise the grids of the kernels differ and the
    official ``torch.cat`` fails)."""
    if not kernels or any(not isinstance(k, int) or isinstance(k, bool) or k < 1
                          for k in kernels):  # fmt: skip
        raise ValueError(f"{who}: kernels={kernels!r} must be a non-empty tuple of positive ints")
    s = min(kernels)
    if kernels[0] != s:
        raise ValueError(f"{who}: kernels={kernels!r}: the first must be the smallest (it is the "
                         "patch size and the stride)")  # fmt: skip
    for k in kernels:
        if k % s or (k - s) % 2:
            raise ValueError(
                f"{who}: kernels={kernels!r}: each kernel must be a multiple of the stride {s} "
                f"with (k - {s}) even, got k={k}"
            )
