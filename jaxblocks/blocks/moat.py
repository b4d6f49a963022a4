"""MOAT blocks: the pre-norm MBConv block and the MOAT block (MBConv, then relative-position
self-attention over the whole map or windows).

Yang et al., "MOAT: Alternating Mobile Convolution and Attention Brings Strong Vision Models",
https://arxiv.org/abs/2210.01820. Official code (TF2/Keras): google-research/deeplab2
``model/layers/moat_blocks.py`` and ``model/layers/moat_attention.py``.

Channels-last ``[B, H, W, C]`` throughout. Module and parameter names follow the official
Keras layers (``pre_norm``, ``expand_conv``, ``depthwise_conv``, ``se/reduce_conv2d``,
``shrink_conv``, ``shortcut_conv``, ``attention_norm``, ``attention/q`` ... ``attention/o``,
``attention/relative_position_embedding``) and every parameter has the official shape, except
the depthwise kernel (Flax ``[3, 3, 1, C]``, Keras ``[3, 3, C, 1]``) and the names of the leaves
(``kernel``/``scale`` for Keras ``weight``/``kernel``/``gamma``).

Official defaults kept: every kernel and the position table ``normal(stddev=0.02)``, biases zero;
exact (erf) GELU, as ``tf.nn.gelu``; swish inside squeeze-and-excitation (the SE layer's own
default, which ``MBConvBlock`` does not override); LayerNorm epsilon 1e-5. BatchNorm is Keras'
default ``momentum=0.99`` (the decay, as Flax's ``momentum``) and ``epsilon=1e-3``; the
official ``SyncBatchNormalization`` averages statistics over replicas, which a Flax BatchNorm
does only under an ``axis_name`` (not set here), and the running variance is updated with the
biased batch variance (Flax semantics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "MBConvBlock",
    "MOATAttention",
    "MOATBlock",
    "SqueezeExcitation",
    "attention_with_bias",
    "avg_pool_same",
    "gelu",
    "relative_position_bias",
    "relative_position_index",
    "resize_relative_position_table",
    "window_partition",
    "window_reverse",
]

Dtype = Any
default_kernel_init = nn.initializers.normal(stddev=0.02)  # tf.random_normal_initializer(0.02)
BN_MOMENTUM = 0.99  # Keras BatchNormalization default (a decay, as Flax's momentum)
BN_EPSILON = 1e-3  # Keras BatchNormalization default
LN_EPSILON = 1e-5  # the official ln_epsilon
# Logical axis names of the kernels; the trainer maps them to mesh axes.
CONV_AXES = (None, None, "conv_in", "conv_out")
QKV_AXES = ("embed", "heads", "kv")
OUT_AXES = ("heads", "kv", "embed")
ACTIVATION_AXES = ("batch", "height", "width", "channels")


# ----------------------------------------------------------------------------- pure functions


def gelu(x: Array) -> Array:
    """Exact GELU, ``x * Phi(x)`` (``tf.nn.gelu``'s default; ``jax.nn.gelu`` defaults to the
    tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


def avg_pool_same(x: Float[Array, "B H W C"], pool_size: int, stride: int) -> Array:
    """Average pooling with TensorFlow's ``"SAME"`` padding, the padding left out of each
    average (Keras ``AveragePooling2D(pool_size, stride, "same")``): ``[B, ceil(H / stride),
    ceil(W / stride), C]``. Sums in fp32."""
    y = nn.avg_pool(
        x.astype(jnp.float32),
        (pool_size, pool_size),
        strides=(stride, stride),
        padding="SAME",
        count_include_pad=False,
    )
    return y.astype(x.dtype)


def resize_relative_position_table(
    table: Float[Array, "N h w"], height: int, width: int
) -> Float[Array, "N H W"]:
    """Bilinear resize of a relative-position table to ``[N, height, width]``, as the official
    ``tf.image.resize`` (half-pixel centres, edges clamped, no antialiasing when shrinking).
    Returns ``table`` itself when the size already matches. Computed in fp32."""
    n, h, w = table.shape
    if (h, w) == (height, width):
        return table
    out = jax.image.resize(
        table.astype(jnp.float32), (n, height, width), method="bilinear", antialias=False
    )
    return out.astype(table.dtype)


@functools.cache
def relative_position_index(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices into a ``[2 height - 1, 2 width - 1]`` table for every
    (query, key) pair of a ``height x width`` map flattened row-major: for query ``(i, j)`` and
    key ``(x, y)``, ``(x - i + height - 1, y - j + width - 1)``, the key's offset from the query
    (the official one-hot ``generate_lookup_tensor``). Both ``[H W, H W]`` int32."""
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)  # [HW] row and column of each token
    rows = i[None, :] - i[:, None] + height - 1  # [query, key]
    cols = j[None, :] - j[:, None] + width - 1
    return rows.astype(np.int32), cols.astype(np.int32)


def relative_position_bias(
    table: Float[Array, "N h w"], height: int, width: int
) -> Float[Array, "N L L"]:
    """The 2-D multi-head relative position bias of a ``height x width`` window, ``L = H W``.

    ``table`` (one ``[2P - 1, 2P - 1]`` table per head, learned for a ``P x P`` window) is first
    resized to ``[2 H - 1, 2 W - 1]`` (`resize_relative_position_table`), then
    ``bias[n, (i, j), (x, y)] = table[n, x - i + H - 1, y - j + W - 1]``.
    """
    if table.ndim != 3:
        raise ValueError(f"relative_position_bias: table must be [heads, 2P-1, 2P-1], got shape "
                         f"{table.shape}")  # fmt: skip
    table = resize_relative_position_table(table, 2 * height - 1, 2 * width - 1)
    rows, cols = relative_position_index(height, width)
    return table[:, rows, cols]  # [N, L, L]


def attention_with_bias(
    q: Float[Array, "B L N K"],
    k: Float[Array, "B L N K"],
    v: Float[Array, "B L N K"],
    bias: Float[Array, "N L L"] | None = None,
) -> Float[Array, "B L N K"]:
    """``softmax(q k^T / sqrt(K) + bias) v`` per head; logits, softmax and the weighted sum in
    fp32, cast back to ``q``'s dtype."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bsnk,btnk->bnst", q.astype(jnp.float32) * scale, k.astype(jnp.float32))
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)[None]
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnst,btnk->bsnk", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)


def window_partition(x: Float[Array, "B H W C"], wh: int, ww: int) -> Float[Array, "b wh ww C"]:
    """Non-overlapping ``wh x ww`` windows, ``b = B (H / wh) (W / ww)``, in the official order
    (batch, window row, window column)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // wh, wh, w // ww, ww, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/wh, W/ww, wh, ww, C]
    return x.reshape(-1, wh, ww, c)


def window_reverse(x: Float[Array, "b wh ww C"], height: int, width: int) -> Array:
    """Inverse of `window_partition`: ``[B, height, width, C]``."""
    _, wh, ww, c = x.shape
    x = x.reshape(-1, height // wh, width // ww, wh, ww, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/wh, wh, W/ww, ww, C]
    return x.reshape(-1, height, width, c)


# ----------------------------------------------------------------------------- modules


def _check_nhwc(where: str, x: Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be [B, H, W, C] (4-D), got shape {x.shape}")


class _Layers:
    """Layer factories shared by the MOAT modules (which declare ``dtype``, ``param_dtype``,
    ``kernel_init`` and ``bias_init``)."""

    def _bn(self, train: bool, name: str) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _conv(self, features: int, kernel: int, name: str, *, stride: int = 1, groups: int = 1,
              bias: bool = True) -> nn.Conv:  # fmt: skip
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding="SAME",  # TensorFlow's: extra padding at the end for even sizes
            feature_group_count=groups,
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, CONV_AXES),
            bias_init=self.bias_init,
            name=name,
        )

    def _mbconv(self, x: Array, *, train: bool, deterministic: bool, se: bool) -> Array:
        """The inverted bottleneck of `MBConvBlock` / `MOATBlock`, residual added."""
        c_in, c_out = x.shape[-1], self.features
        inner = c_out * self.expansion_rate  # the official expands the *output* width
        shortcut = x
        if self.stride > 1:
            shortcut = avg_pool_same(shortcut, self.pool_size, self.stride)
        if c_in != c_out:
            shortcut = self._conv(c_out, 1, "shortcut_conv")(shortcut)
        y = self._bn(train, "pre_norm")(x)
        y = self._conv(inner, 1, "expand_conv", bias=False)(y)
        y = gelu(self._bn(train, "expand_norm")(y))
        y = self._conv(inner, self.kernel_size, "depthwise_conv", stride=self.stride,
                       groups=inner, bias=False)(y)  # fmt: skip
        y = gelu(self._bn(train, "depthwise_norm")(y))
        if se:
            se_features = max(1, int(c_out * self.se_ratio))
            y = SqueezeExcitation(
                se_features,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                bias_init=self.bias_init,
                name="se",
            )(y)
        y = self._conv(c_out, 1, "shrink_conv")(y)
        return shortcut + drop_path(self, y, self.drop_path, deterministic)


def _check_block(where: str, x: Array, features: int, stride: int, pool_size: int,
                 kernel_size: int) -> None:  # fmt: skip
    _check_nhwc(where, x)
    if features < 1:
        raise ValueError(f"{where}: features must be >= 1, got {features}")
    if stride < 1 or pool_size < 1 or kernel_size < 1:
        raise ValueError(f"{where}: stride, pool_size and kernel_size must be >= 1, got "
                         f"{stride}, {pool_size}, {kernel_size}")  # fmt: skip


class SqueezeExcitation(_Layers, nn.Module):
    """MOAT's squeeze-and-excitation (https://arxiv.org/abs/2210.01820, after SENet).

    ``x * sigmoid(expand(swish(reduce(mean_HW(x)))))`` with 1x1 convolutions *with* bias
    (``reduce_conv2d``: ``C -> se_features``, ``expand_conv2d``: back to ``C``). Differs from
    `jaxblocks.layers.squeeze_excite.SqueezeExcite` (no biases, ReLU, width ``C // r``), so
    the official layer is rebuilt here; MOAT sizes the bottleneck from the block's *output*
    width (``int(features * 0.25)``), not from ``C``.

    Attributes:
      se_features: bottleneck width.
      dtype, param_dtype, kernel_init, bias_init: compute/parameter dtypes and initialisers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> se = SqueezeExcitation(4)
      >>> y, _ = se.init_with_output(jax.random.key(0), jnp.ones((1, 4, 4, 16)))
      >>> y.shape
      (1, 4, 4, 16)
    """

    se_features: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        _check_nhwc("SqueezeExcitation", x)
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        s = nn.swish(self._conv(self.se_features, 1, "reduce_conv2d")(s))
        s = self._conv(x.shape[-1], 1, "expand_conv2d")(s)  # [B, 1, 1, C]
        return (jax.nn.sigmoid(s) * x).astype(s.dtype)


class MBConvBlock(_Layers, nn.Module):
    """MOAT's MBConv block (https://arxiv.org/abs/2210.01820; MobileNetV2's inverted residual
    in CoAtNet's pre-norm form), the block of MOAT's first two stages.

    ``shortcut = AvgPool(pool_size, stride)(x)`` (only when ``stride > 1``, TF ``"SAME"``
    padding) followed by a 1x1 conv with bias when the width changes; main branch
    ``BN -> 1x1 expand (features * expansion_rate, no bias) -> BN -> GELU -> kxk depthwise
    (stride, no bias) -> BN -> GELU -> SE -> 1x1 shrink (bias)``; output
    ``shortcut + drop_path(main)``. Unlike MobileNetV2 the block is normalised at its input
    (pre-norm), expands the *output* width, ends without a BN, and downsamples the shortcut by
    pooling instead of skipping it.

    Attributes:
      features: output channels.
      stride: of the depthwise conv and of the shortcut pooling.
      expansion_rate: hidden width / ``features`` (4).
      se_ratio: SE bottleneck width / ``features`` (0.25); None: no SE.
      kernel_size: of the depthwise conv (3).
      pool_size: of the shortcut pooling (2 for classification, 3 for dense tasks).
      drop_path: stochastic-depth rate of the main branch.
      dtype, param_dtype, kernel_init, bias_init: compute/parameter dtypes and initialisers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = MBConvBlock(32, stride=2)
      >>> x = jnp.ones((2, 8, 8, 16))
      >>> variables = block.init(jax.random.key(0), x)
      >>> block.apply(variables, x).shape  # eval: running statistics
      (2, 4, 4, 32)
    """

    features: int = 0
    stride: int = 1
    expansion_rate: int = 4
    se_ratio: float | None = 0.25
    kernel_size: int = 3
    pool_size: int = 2
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool | None = None
    ) -> Float[Array, "B h w D"]:
        """Apply the block, ``h = ceil(H / stride)``.

        Args:
          x: ``[B, H, W, C]``.
          train: BN with batch statistics, updating the running ones (apply with
            ``mutable=["batch_stats"]``); False uses the running statistics.
          deterministic: turn drop path off; None means ``not train``.
        """
        _check_block("MBConvBlock", x, self.features, self.stride, self.pool_size,
                     self.kernel_size)  # fmt: skip
        deterministic = not train if deterministic is None else deterministic
        se = self.se_ratio is not None
        return self._mbconv(x, train=train, deterministic=deterministic, se=se)


class MOATAttention(nn.Module):
    """MOAT's multi-head self-attention with a 2-D relative position bias
    (https://arxiv.org/abs/2210.01820; CoAtNet's relative attention).

    Over each ``[h, w]`` map (a window or the whole feature map) of a ``[B, h, w, C]`` input:
    ``C / head_size`` heads, q/k/v/o projections with bias (kernels ``[C, heads, head_size]``
    and ``[heads, head_size, C]`` as the official ``TrailDense``), logits
    ``q k^T / sqrt(head_size) + bias``, softmax in fp32. The bias comes from one learned
    ``[2P - 1, 2P - 1]`` table per head (``P = position_embedding_size``), bilinearly resized to
    ``[2h - 1, 2w - 1]`` for the actual map (`relative_position_bias`), so the parameters do not
    depend on the input resolution. Returns ``[B, h * w, C]`` tokens, as the official layer.

    Attributes:
      head_size: channels per head (32).
      position_embedding_size: ``P``; None learns the table at the map's own size
        (``[2h - 1, 2w - 1]``, no resize).
      use_relative_position: False drops the bias (the official "no PE" models).
      dtype, param_dtype, kernel_init, bias_init: compute/parameter dtypes and initialisers.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> attn = MOATAttention(head_size=16, position_embedding_size=7)
      >>> y, v = attn.init_with_output(jax.random.key(0), jnp.ones((2, 4, 4, 32)))
      >>> y.shape, nn.unbox(v)["params"]["relative_position_embedding"].shape
      ((2, 16, 32), (2, 13, 13))
    """

    head_size: int = 32
    position_embedding_size: int | None = 7
    use_relative_position: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B L C"]:
        _check_nhwc("MOATAttention", x)
        b, h, w, c = x.shape
        if c % self.head_size:
            raise ValueError(f"MOATAttention: {c} channels (x.shape[-1]) are not a multiple of "
                             f"head_size {self.head_size}")  # fmt: skip
        heads = c // self.head_size
        tokens = x.reshape(b, h * w, c)
        dense = functools.partial(
            nn.DenseGeneral,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, QKV_AXES),
            bias_init=self.bias_init,
        )
        q = dense((heads, self.head_size), name="q")(tokens)  # [B, L, N, K]
        k = dense((heads, self.head_size), name="k")(tokens)
        v = dense((heads, self.head_size), name="v")(tokens)
        bias = None
        if self.use_relative_position:
            p = self.position_embedding_size
            th, tw = (2 * h - 1, 2 * w - 1) if p is None else (2 * p - 1, 2 * p - 1)
            table = self.param(
                "relative_position_embedding",
                nn.with_logical_partitioning(self.kernel_init, ("heads", None, None)),
                (heads, th, tw),
                self.param_dtype,
            )
            bias = relative_position_bias(table, h, w)  # [N, L, L]
        y = attention_with_bias(q, k, v, bias)
        return nn.DenseGeneral(
            c,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, OUT_AXES),
            bias_init=self.bias_init,
            name="o",
        )(y)


class MOATBlock(_Layers, nn.Module):
    """The MOAT block (Yang et al., https://arxiv.org/abs/2210.01820).

    A transformer block whose MLP is replaced by an MBConv placed *before* the attention:
    ``x = MBConv(x)`` (as `MBConvBlock` without SE; it does the downsampling, so attention
    never needs a strided patch embedding), then ``x = x + drop_path(MHSA(LN(x)))``
    (`MOATAttention`, relative position bias). No MLP follows the attention. The attention
    runs over the whole map (``window_size=None``, classification) or over non-overlapping
    windows (dense tasks at high resolution); the position table is resized to the window.

    Attributes:
      features: output channels (a multiple of ``head_size``).
      stride, expansion_rate, kernel_size, pool_size: of the MBConv part (see `MBConvBlock`).
      head_size: channels per head (32).
      window_size: ``(height, width)`` of the attention windows, which must divide the map
        after the stride; None: global attention.
      position_embedding_size: see `MOATAttention` (7 at stride 32, 14 at stride 16).
      use_relative_position: False: no position bias (the official "no PE" models).
      ln_epsilon: of the attention LayerNorm (1e-5).
      drop_path: stochastic-depth rate of both residual branches (as the official).
      dtype, param_dtype, kernel_init, bias_init: compute/parameter dtypes and initialisers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = MOATBlock(64, stride=2, window_size=(2, 2), position_embedding_size=4)
      >>> x = jnp.ones((2, 8, 8, 32))
      >>> variables = block.init(jax.random.key(0), x)
      >>> block.apply(variables, x).shape
      (2, 4, 4, 64)
    """

    features: int = 0
    stride: int = 1
    expansion_rate: int = 4
    kernel_size: int = 3
    pool_size: int = 2
    head_size: int = 32
    window_size: tuple[int, int] | None = None
    position_embedding_size: int | None = 7
    use_relative_position: bool = True
    ln_epsilon: float = LN_EPSILON
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool | None = None
    ) -> Float[Array, "B h w D"]:
        """Apply the block, ``h = ceil(H / stride)``; ``train`` and ``deterministic`` as
        `MBConvBlock`."""
        _check_block("MOATBlock", x, self.features, self.stride, self.pool_size,
                     self.kernel_size)  # fmt: skip
        if self.features % self.head_size:
            raise ValueError(f"MOATBlock: features={self.features} must be a multiple of "
                             f"head_size={self.head_size}")  # fmt: skip
        h, w = -(-x.shape[1] // self.stride), -(-x.shape[2] // self.stride)
        window = (h, w) if self.window_size is None else tuple(self.window_size)
        if len(window) != 2 or min(window) < 1 or h % window[0] or w % window[1]:
            raise ValueError(
                f"MOATBlock: window_size={self.window_size!r} must be two positive ints dividing "
                f"the feature map after the stride, ({h}, {w}) for x of shape {x.shape} and "
                f"stride {self.stride}"
            )
        wh, ww = window
        deterministic = not train if deterministic is None else deterministic
        x = self._mbconv(x, train=train, deterministic=deterministic, se=False)
        y = nn.LayerNorm(
            epsilon=self.ln_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention_norm",
        )(x)
        y = window_partition(y, wh, ww)  # [B * windows, wh, ww, C]
        y = MOATAttention(
            head_size=self.head_size,
            position_embedding_size=self.position_embedding_size,
            use_relative_position=self.use_relative_position,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            name="attention",
        )(y)
        y = window_reverse(y.reshape(-1, wh, ww, y.shape[-1]), h, w)
        return x + drop_path(self, y, self.drop_path, deterministic)
