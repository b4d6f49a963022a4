"""Next-ViT blocks: the Next Convolution Block (NCB) and the Next Transformer Block (NTB).

Li et al., "Next-ViT: Next Generation Vision Transformer for Efficient Deployment in Realistic
Industrial Scenarios", https://arxiv.org/abs/2207.05501. Official code: bytedance/Next-ViT
``classification/nextvit.py``; timm ``timm/models/nextvit.py`` (the oracle of the tests).

Channels-last ``[B, H, W, C]`` throughout. Module and parameter names follow timm's
(``patch_embed/conv``, ``mhca/group_conv3x3``, ``e_mhsa/q``, ``norm1``, ``mlp/fc1``) so
`jaxblocks.interop.timm` maps a timm state dict onto them with its generic rule.

BatchNorm follows `flax.linen.BatchNorm` semantics: ``momentum=0.9`` is the decay of the running
statistics (torch's ``momentum=0.1``), ``epsilon=1e-5`` as torch, and the running variance is
updated with the biased batch variance where torch uses the unbiased one (outputs are the same in
both modes; only the running variance drifts apart by a factor ``n / (n - 1)``).

Every block has a ``deploy`` switch: with it, the BatchNorms that precede a linear map (the
"pre-BN" of the MLPs and of E-MHSA) are left out, and `fold_pre_bn` / the model's
``reparameterize`` fold them into that map's weights, as the official ``merge_bn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.layers.conv_bn import fold_factor
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "ConvAttention",
    "ConvMlp",
    "EfficientAttention",
    "NextConvBlock",
    "NextTransformerBlock",
    "PatchEmbed",
    "attention_weights",
    "avg_pool_2x2_ceil",
    "block_kind",
    "bn_affine",
    "fold_pre_bn",
    "make_divisible",
    "reparameterize_block",
    "scaled_dot_product_attention",
    "token_avg_pool",
]

Dtype = Any
# timm initialises every conv and linear weight with trunc_normal(std=0.02) and zero biases.
default_kernel_init = nn.initializers.truncated_normal(0.02)
BN_MOMENTUM = 0.9  # Flax decay; torch's BatchNorm momentum 0.1
BN_EPSILON = 1e-5  # torch's default, used by Next-ViT (NORM_EPS)
# Logical axis names of the kernels (HWIO / [in, out]); the trainer maps them to mesh axes.
CONV_AXES = (None, None, "conv_in", "conv_out")
QKV_AXES = ("embed", "heads")
PROJ_AXES = ("heads", "embed")
ACTIVATION_AXES = ("batch", "height", "width", "channels")


# ----------------------------------------------------------------------------- pure functions


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``, default
    ``divisor``), rounding up when rounding down would lose more than 10% (MobileNet's rule, used
    for the E-MHSA width of `NextTransformerBlock`)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def avg_pool_2x2_ceil(x: Float[Array, "B H W C"]) -> Float[Array, "B h w C"]:
    """2x2 average pooling, stride 2, ``h = ceil(H / 2)``: torch's ``AvgPool2d(2, ceil_mode=True,
    count_include_pad=False)``, so a trailing odd row/column is averaged over what exists.
    Sums in fp32."""
    h_pad, w_pad = x.shape[1] % 2, x.shape[2] % 2
    y = nn.avg_pool(
        x.astype(jnp.float32),
        (2, 2),
        strides=(2, 2),
        padding=((0, h_pad), (0, w_pad)),
        count_include_pad=False,
    )
    return y.astype(x.dtype)


def token_avg_pool(x: Float[Array, "B N C"], window: int) -> Float[Array, "B n C"]:
    """Average of non-overlapping windows of ``window`` consecutive tokens, ``n = N // window``
    (torch's ``AvgPool1d(window, window)`` over the token axis: a remainder is dropped). The
    tokens are the row-major flattening of the feature map, so a window is a run of pixels
    along W, possibly spanning rows, exactly as in the official code. Sums in fp32."""
    b, n, c = x.shape
    m = n // window
    if m < 1:
        raise ValueError(
            f"token_avg_pool: {n} tokens are fewer than the window {window}; use a larger input "
            f"or a smaller sr_ratio"
        )
    y = x[:, : m * window].astype(jnp.float32).reshape(b, m, window, c)  # [B, n, window, C]
    return jnp.mean(y, axis=2).astype(x.dtype)


def attention_weights(
    q: Float[Array, "B N H K"], k: Float[Array, "B M H K"]
) -> Float[Array, "B H N M"]:
    """``softmax(q k^T / sqrt(K))`` per head, without mask, in fp32."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bnhk,bmhk->bhnm", q.astype(jnp.float32), k.astype(jnp.float32))
    return jax.nn.softmax(logits * scale, axis=-1)


def scaled_dot_product_attention(
    q: Float[Array, "B N H K"], k: Float[Array, "B M H K"], v: Float[Array, "B M H K"]
) -> Float[Array, "B N H K"]:
    """``softmax(q k^T / sqrt(K)) v`` per head, without mask; logits and softmax in fp32."""
    out = jnp.einsum("bhnm,bmhk->bnhk", attention_weights(q, k), v.astype(jnp.float32))
    return out.astype(q.dtype)


def bn_affine(
    params: dict[str, Array], stats: dict[str, Array], epsilon: float = BN_EPSILON
) -> tuple[Array, Array]:
    """Per-channel ``(s, t)`` with ``BN_eval(x) = x * s + t`` from a Flax BatchNorm's
    ``params`` (``scale``, ``bias``) and ``batch_stats`` (``mean``, ``var``)."""
    s = fold_factor(params["scale"], stats["var"], epsilon)
    return s, params["bias"] - stats["mean"] * s


def fold_pre_bn(linear: dict[str, Array], s: Array, t: Array) -> dict[str, Array]:
    """Fold a per-channel affine ``x * s + t`` that precedes a Dense or 1x1 Conv into it.

    ``linear`` holds ``kernel`` (``[C_in, C_out]`` or ``[1, 1, C_in, C_out]``) and optionally
    ``bias``; returns new params with ``kernel * s`` along ``C_in`` and
    ``bias + t @ kernel`` (a bias is created when absent). Official code: ``merge_pre_bn``.
    """
    kernel = linear["kernel"]
    w = kernel.reshape(kernel.shape[-2], kernel.shape[-1])  # [C_in, C_out]
    bias = linear.get("bias", jnp.zeros((w.shape[1],), w.dtype))
    new_bias = bias + jnp.einsum("i,io->o", t, w, precision=jax.lax.Precision.HIGHEST)
    new_w = w * s.reshape(-1, 1)
    return {**linear, "kernel": new_w.reshape(kernel.shape), "bias": new_bias.astype(bias.dtype)}


# ----------------------------------------------------------------------------- modules


def _check_nhwc(where: str, x: Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be [B, H, W, C] (4-D), got shape {x.shape}")


class _Layers:
    """Layer factories of the Next-ViT modules (which declare ``dtype``, ``param_dtype``,
    ``kernel_init`` and ``bias_init`` last, after their own attributes)."""

    def _bn(self, train: bool, name: str) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _conv(self, features: int, kernel: int, name: str, *, groups: int = 1, bias: bool = False):
        pad = kernel // 2
        return nn.Conv(
            features,
            (kernel, kernel),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, CONV_AXES),
            bias_init=self.bias_init,
            name=name,
        )

    def _dense(self, features: int, name: str, axes, *, bias: bool = True) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
            bias_init=self.bias_init,
            name=name,
        )


class PatchEmbed(_Layers, nn.Module):
    """Next-ViT patch embedding (https://arxiv.org/abs/2207.05501).

    ``stride == 2``: 2x2 average pooling (ceil mode, `avg_pool_2x2_ceil`) -> 1x1 conv (no bias)
    -> BN; otherwise, if the channels change: 1x1 conv -> BN; else the identity (no
    parameters). Downsampling by pooling and a pointwise conv, rather than a strided conv, is
    Next-ViT's choice for deployment speed.

    Attributes:
      out_features: output channels.
      stride: 1 or 2.
      dtype, param_dtype, kernel_init, bias_init: compute/parameter dtypes and initialisers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((1, 7, 8, 32))
      >>> y, _ = PatchEmbed(64, stride=2).init_with_output(jax.random.key(0), x)
      >>> y.shape
      (1, 4, 4, 64)
    """

    out_features: int = 0
    stride: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """``[B, ceil(H / stride), ceil(W / stride), out_features]``."""
        _check_nhwc("PatchEmbed", x)
        if self.stride not in (1, 2):
            raise ValueError(f"PatchEmbed: stride must be 1 or 2, got {self.stride}")
        if self.stride == 1 and x.shape[-1] == self.out_features:
            return x
        if self.stride == 2:
            x = avg_pool_2x2_ceil(x)
        x = self._conv(self.out_features, 1, "conv")(x)
        return self._bn(train, "norm")(x)


class ConvAttention(_Layers, nn.Module):
    """Multi-Head Convolutional Attention, MHCA (Next-ViT, https://arxiv.org/abs/2207.05501).

    A grouped 3x3 conv with one group per "head" of ``head_dim`` channels (no bias) -> BN ->
    ReLU -> 1x1 projection (no bias): the convolutional counterpart of multi-head attention,
    each head aggregating its own neighbourhood, heads mixed by the projection.

    Attributes:
      head_dim: channels per group (32); the input channels must be a multiple of it.
      dtype, param_dtype, kernel_init, bias_init: as `PatchEmbed`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> y, _ = ConvAttention().init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 64)))
      >>> y.shape
      (1, 8, 8, 64)
    """

    head_dim: int = 32
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """Same shape as ``x``."""
        _check_nhwc("ConvAttention", x)
        c = x.shape[-1]
        if c % self.head_dim:
            raise ValueError(f"ConvAttention: {c} channels are not a multiple of head_dim "
                             f"{self.head_dim}")  # fmt: skip
        y = self._conv(c, 3, "group_conv3x3", groups=c // self.head_dim)(x)
        y = nn.relu(self._bn(train, "norm")(y))
        return self._conv(c, 1, "projection")(y)


class ConvMlp(_Layers, nn.Module):
    """Next-ViT's MLP of 1x1 convs, ``fc1 -> ReLU -> dropout -> fc2 -> dropout``
    (https://arxiv.org/abs/2207.05501).

    As timm's ``ConvMlp`` with ReLU; the hidden width is given (timm: ``int(C * mlp_ratio)``;
    the official code rounds it to a multiple of 32, equal for every published width).

    Attributes:
      hidden_features: hidden width.
      dropout: dropout after the activation and after ``fc2`` (timm's ``drop``, 0).
      dtype, param_dtype, kernel_init, bias_init: as `PatchEmbed`.
    """

    hidden_features: int = 0
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, deterministic: bool = True) -> Array:
        """Same shape as ``x``; ``deterministic=False`` enables dropout (rng "dropout")."""
        _check_nhwc("ConvMlp", x)
        c = x.shape[-1]
        y = nn.relu(self._conv(self.hidden_features, 1, "fc1", bias=True)(x))
        y = nn.Dropout(self.dropout, deterministic=deterministic)(y)
        y = self._conv(c, 1, "fc2", bias=True)(y)
        return nn.Dropout(self.dropout, deterministic=deterministic)(y)


class EfficientAttention(_Layers, nn.Module):
    """Efficient Multi-Head Self Attention, E-MHSA (Next-ViT, https://arxiv.org/abs/2207.05501).

    Multi-head self-attention over tokens ``[B, N, C]`` (``C / head_dim`` heads, q/k/v Linear
    with bias, output Linear) whose keys and values come from a spatially reduced sequence: with
    ``sr_ratio = r > 1`` the tokens are averaged in windows of ``r**2`` consecutive tokens
    (`token_avg_pool`) and batch-normalised (over batch and tokens, the official
    ``BatchNorm1d``) before the k/v projections, cutting the attention cost by ``r**2``.

    Attributes:
      head_dim: channels per head (32).
      sr_ratio: spatial reduction ``r``; 1 disables it.
      qkv_bias: bias of q, k and v (kept in ``deploy`` mode regardless, to hold the folded BN).
      attn_drop, proj_drop: dropout of the attention weights and of the output.
      deploy: leave out the reduction's BN (folded into k and v by ``reparameterize``).
      dtype, param_dtype, kernel_init, bias_init: as `PatchEmbed`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> attn = EfficientAttention(sr_ratio=2)
      >>> y, _ = attn.init_with_output(jax.random.key(0), jnp.ones((2, 16, 64)))
      >>> y.shape
      (2, 16, 64)
    """

    head_dim: int = 32
    sr_ratio: int = 1
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(
        self, x: Float[Array, "B N C"], *, train: bool = False, deterministic: bool = True
    ) -> Float[Array, "B N C"]:
        """Attend; ``train`` for the BN, ``deterministic=False`` enables dropout."""
        if x.ndim != 3:
            raise ValueError(f"EfficientAttention: x must be [B, N, C], got shape {x.shape}")
        b, n, c = x.shape
        if c % self.head_dim:
            raise ValueError(f"EfficientAttention: {c} channels are not a multiple of head_dim "
                             f"{self.head_dim}")  # fmt: skip
        heads = c // self.head_dim
        bias = self.qkv_bias or self.deploy
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, self.head_dim)  # [B, N, H, K]
        q = split(self._dense(c, "q", QKV_AXES, bias=bias)(x))
        kv = x
        if self.sr_ratio > 1:
            kv = token_avg_pool(x, self.sr_ratio**2)
            if not self.deploy:
                kv = self._bn(train, "norm")(kv)
        k = split(self._dense(c, "k", QKV_AXES, bias=bias)(kv))
        v = split(self._dense(c, "v", QKV_AXES, bias=bias)(kv))
        weights = attention_weights(q, k)  # [B, H, N, M]
        weights = nn.Dropout(self.attn_drop, deterministic=deterministic)(weights)
        y = jnp.einsum("bhnm,bmhk->bnhk", weights, v.astype(jnp.float32)).astype(q.dtype)
        y = self._dense(c, "proj", PROJ_AXES)(y.reshape(b, n, c))
        return nn.Dropout(self.proj_drop, deterministic=deterministic)(y)


class NextConvBlock(_Layers, nn.Module):
    """Next Convolution Block, NCB (Next-ViT, https://arxiv.org/abs/2207.05501).

    ``x = PatchEmbed(x)``; ``x = x + MHCA(x)``; ``x = x + ConvMlp(BN(x))`` (ReLU MLP, ratio 3).
    A transformer-shaped block with convolutional attention (`ConvAttention`) and BatchNorm:
    all of it folds into convolutions for deployment (``deploy`` drops the BN, which
    `fold_pre_bn` merges into ``mlp/fc1``).

    Attributes:
      out_features: output channels (a multiple of ``head_dim``).
      stride: of the `PatchEmbed` (1 or 2).
      head_dim: of the `ConvAttention`.
      mlp_ratio: hidden width of the MLP / C (3).
      drop_path: stochastic-depth rate of both residual branches.
      dropout: of the MLP (timm's ``drop``).
      deploy: leave out the pre-MLP BN (see `NextViT.reparameterize`).
      dtype, param_dtype, kernel_init, bias_init: as `PatchEmbed`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = NextConvBlock(64, stride=2)
      >>> x = jnp.ones((2, 8, 8, 32))
      >>> variables = block.init(jax.random.key(0), x)
      >>> block.apply(variables, x).shape  # eval: running statistics
      (2, 4, 4, 64)
    """

    out_features: int = 0
    stride: int = 1
    head_dim: int = 32
    mlp_ratio: float = 3.0
    drop_path: float = 0.0
    dropout: float = 0.0
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool | None = None
    ) -> Float[Array, "B h w D"]:
        """Apply the block.

        Args:
          x: ``[B, H, W, C]``.
          train: BN with batch statistics, updating the running ones (apply with
            ``mutable=["batch_stats"]``); False uses the running statistics.
          deterministic: turn drop path and dropout off; None means ``not train``.
        """
        _check_nhwc("NextConvBlock", x)
        deterministic = not train if deterministic is None else deterministic
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                  bias_init=self.bias_init)  # fmt: skip
        x = PatchEmbed(self.out_features, self.stride, name="patch_embed", **kw)(x, train=train)
        y = ConvAttention(self.head_dim, name="mhca", **kw)(x, train=train)
        x = x + drop_path(self, y, self.drop_path, deterministic)
        y = x if self.deploy else self._bn(train, "norm")(x)
        y = ConvMlp(int(self.out_features * self.mlp_ratio), self.dropout, name="mlp", **kw)(
            y, deterministic=deterministic
        )
        return x + drop_path(self, y, self.drop_path, deterministic)


class NextTransformerBlock(_Layers, nn.Module):
    """Next Transformer Block, NTB (Next-ViT, https://arxiv.org/abs/2207.05501).

    Splits the output channels into ``C1 = make_divisible(mix_block_ratio * out, head_dim)``
    global and ``C2 = out - C1`` local ones, to capture both frequencies in one block:

    ``x = PatchEmbed(in -> C1, stride)``; ``x = x + E-MHSA(BN(x))`` (`EfficientAttention` on
    the flattened tokens); ``y = PatchEmbed(C1 -> C2)``; ``y = y + MHCA(y)``;
    ``x = concat[x, y]``; ``x = x + ConvMlp(BN(x))`` (ratio 2).

    The drop-path rate of the E-MHSA branch is ``drop_path * mix_block_ratio``, of the MHCA
    branch ``drop_path * (1 - mix_block_ratio)``, as the official code. ``deploy`` leaves out
    ``norm1``, the E-MHSA reduction BN and ``norm2`` (folded by `NextViT.reparameterize`).
    timm rounds ``C1`` to a multiple of 32 whatever ``head_dim``; here the divisor is
    ``head_dim`` (the same for timm's ``head_dim=32``).

    Attributes:
      out_features: output channels.
      stride: of the first `PatchEmbed`.
      sr_ratio: spatial reduction of the E-MHSA keys/values.
      head_dim: of E-MHSA and MHCA.
      mlp_ratio: hidden width of the MLP / C (2).
      mix_block_ratio: share of the E-MHSA channels (0.75).
      drop_path, dropout, attn_drop: stochastic depth, MLP/projection dropout, attention dropout.
      deploy: see above.
      dtype, param_dtype, kernel_init, bias_init: as `PatchEmbed`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = NextTransformerBlock(128, sr_ratio=2)
      >>> x = jnp.ones((2, 8, 8, 64))
      >>> variables = block.init(jax.random.key(0), x)
      >>> block.apply(variables, x).shape
      (2, 8, 8, 128)
    """

    out_features: int = 0
    stride: int = 1
    sr_ratio: int = 1
    head_dim: int = 32
    mlp_ratio: float = 2.0
    mix_block_ratio: float = 0.75
    drop_path: float = 0.0
    dropout: float = 0.0
    attn_drop: float = 0.0
    deploy: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    def split_channels(self) -> tuple[int, int]:
        """``(C1, C2)``: the E-MHSA and the MHCA channels."""
        c1 = make_divisible(int(self.out_features * self.mix_block_ratio), self.head_dim)
        return c1, self.out_features - c1

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool | None = None
    ) -> Float[Array, "B h w D"]:
        """Apply the block; ``train`` and ``deterministic`` as `NextConvBlock`."""
        _check_nhwc("NextTransformerBlock", x)
        c1, c2 = self.split_channels()
        if c2 < 1 or c2 % self.head_dim:
            raise ValueError(
                f"NextTransformerBlock: out_features={self.out_features} with mix_block_ratio="
                f"{self.mix_block_ratio} splits into {c1} + {c2} channels; the MHCA part must be "
                f"a positive multiple of head_dim={self.head_dim}"
            )
        deterministic = not train if deterministic is None else deterministic
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                  bias_init=self.bias_init)  # fmt: skip
        x = PatchEmbed(c1, self.stride, name="patch_embed", **kw)(x, train=train)
        b, h, w, _ = x.shape
        y = x if self.deploy else self._bn(train, "norm1")(x)
        y = EfficientAttention(
            self.head_dim,
            self.sr_ratio,
            attn_drop=self.attn_drop,
            proj_drop=self.dropout,
            deploy=self.deploy,
            name="e_mhsa",
            **kw,
        )(y.reshape(b, h * w, c1), train=train, deterministic=deterministic)
        rate = self.drop_path * self.mix_block_ratio
        x = x + drop_path(self, y.reshape(b, h, w, c1), rate, deterministic)

        y = PatchEmbed(c2, 1, name="projection", **kw)(x, train=train)
        z = ConvAttention(self.head_dim, name="mhca", **kw)(y, train=train)
        y = y + drop_path(self, z, self.drop_path * (1.0 - self.mix_block_ratio), deterministic)
        x = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)

        y = x if self.deploy else self._bn(train, "norm2")(x)
        y = ConvMlp(int(self.out_features * self.mlp_ratio), self.dropout, name="mlp", **kw)(
            y, deterministic=deterministic
        )
        return x + drop_path(self, y, self.drop_path, deterministic)


def reparameterize_block(
    params: dict[str, Any], stats: dict[str, Any], kind: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fold the pre-BNs of one block's variables (``kind``: ``"ncb"`` or ``"ntb"``) into the
    following linear maps; returns ``(params, batch_stats)`` for the ``deploy=True`` block.

    NCB: ``norm`` into ``mlp/fc1``. NTB: ``norm1`` into ``e_mhsa/q``; ``norm1`` and then the
    reduction BN ``e_mhsa/norm`` into ``e_mhsa/k`` and ``e_mhsa/v`` (token averaging commutes
    with a per-channel affine map); ``norm2`` into ``mlp/fc1``. Uses the running statistics:
    the result reproduces eval mode.
    """
    params, stats = dict(params), dict(stats)
    mlp = dict(params["mlp"])
    pre = "norm" if kind == "ncb" else "norm2"
    if kind not in ("ncb", "ntb"):
        raise ValueError(f"reparameterize_block: kind must be 'ncb' or 'ntb', got {kind!r}")
    mlp["fc1"] = fold_pre_bn(mlp["fc1"], *bn_affine(params.pop(pre), stats.pop(pre)))
    params["mlp"] = mlp
    if kind == "ntb":
        s1, t1 = bn_affine(params.pop("norm1"), stats.pop("norm1"))
        attn = dict(params["e_mhsa"])
        attn["q"] = fold_pre_bn(attn["q"], s1, t1)
        s, t = s1, t1
        if "norm" in attn:  # sr_ratio > 1: BN_sr(BN_1(x)) = x * (s1 s2) + (t1 s2 + t2)
            attn_stats = dict(stats["e_mhsa"])
            s2, t2 = bn_affine(attn.pop("norm"), attn_stats.pop("norm"))
            s, t = s1 * s2, t1 * s2 + t2
            if attn_stats:
                stats["e_mhsa"] = attn_stats
            else:
                del stats["e_mhsa"]
        attn["k"] = fold_pre_bn(attn["k"], s, t)
        attn["v"] = fold_pre_bn(attn["v"], s, t)
        params["e_mhsa"] = attn
    return params, stats


def block_kind(params: dict[str, Any]) -> str | None:
    """``"ntb"``, ``"ncb"`` or None (already folded or not a block) from a block's params."""
    if "norm1" in params and "e_mhsa" in params:
        return "ntb"
    if "mhca" in params and "norm" in params and "mlp" in params:
        return "ncb"
    return None
