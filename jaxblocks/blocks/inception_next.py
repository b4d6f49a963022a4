"""InceptionNeXt blocks: the Inception depthwise token mixer and the MetaNeXt block.

Yu, Zhou, Yan, Wang, "InceptionNeXt: When Inception Meets ConvNeXt",
https://arxiv.org/abs/2303.16900. Official code: sail-sg/inceptionnext
``models/inceptionnext.py``; timm ``timm/models/inception_next.py`` (the oracle of the tests).

Channels-last ``[B, H, W, C]`` throughout. Module and parameter names follow timm's
(``token_mixer/dwconv_hw``, ``mlp/fc1``, ``gamma``, ``head/fc2``) so `jaxblocks.interop.timm`
maps a timm state dict onto them with a generic rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.stochastic_depth import drop_path as drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "ConvMlp",
    "ConvNeXtMixer",
    "InceptionDWConv2d",
    "MetaNeXtBlock",
    "MlpClassifierHead",
    "drop_path",
    "inception_split_sizes",
]

Dtype = Any
# timm initialises every conv and linear weight with trunc_normal(std=0.02) and zero biases.
default_kernel_init = nn.initializers.truncated_normal(0.02)
BN_MOMENTUM = 0.9  # Flax decay; torch's BatchNorm2d momentum 0.1
BN_EPSILON = 1e-5  # torch's BatchNorm2d default, used by InceptionNeXt
LN_EPSILON = 1e-6  # MlpClassifierHead's LayerNorm
# Logical axis names of the kernels (HWIO); the trainer maps them to mesh axes.
CONV_AXES = (None, None, "conv_in", "conv_out")
CONV1X1_AXES = CONV_AXES
DEPTHWISE_AXES = (None, None, None, "conv_out")


def inception_split_sizes(channels: int, branch_ratio: float) -> tuple[int, int, int, int]:
    """Channel split ``(C - 3g, g, g, g)`` of `InceptionDWConv2d`, ``g = int(C * branch_ratio)``.

    The groups are, in order: identity, square depthwise conv, 1 x band (along W) and
    band x 1 (along H) depthwise convs.
    """
    if channels < 1:
        raise ValueError(f"inception_split_sizes: channels must be >= 1, got {channels}")
    if not 0.0 < branch_ratio <= 1.0 / 3.0:
        raise ValueError(
            f"inception_split_sizes: branch_ratio must be in (0, 1/3], got {branch_ratio!r}"
        )
    g = int(channels * branch_ratio)
    if g < 1:
        raise ValueError(
            f"inception_split_sizes: channels={channels} with branch_ratio={branch_ratio} gives "
            f"{g} channels per conv branch; expected at least 1 (channels >= "
            f"{int(-(-1 // branch_ratio))})"
        )
    return (channels - 3 * g, g, g, g)


def _check_nhwc(where: str, x: Array, channels: int | None = None) -> None:
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be [B, H, W, C] (4-D), got shape {x.shape}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"{where}: x has {x.shape[-1]} channels, expected {channels}")


class ConvNeXtMixer(nn.Module):
    """ConvNeXt's token mixer, the baseline of InceptionNeXt (https://arxiv.org/abs/2303.16900).

    One ``k x k`` depthwise convolution over every channel (stride 1, ``k // 2`` zero padding,
    with bias), as ConvNeXt's ``dwconv``. Passed as ``token_mixer`` to `MetaNeXtBlock` or the
    `InceptionNeXt` model it gives the paper's comparison point: the same MetaNeXt network with
    only the token mixer changed.

    Attributes:
      kernel_size: odd kernel size (ConvNeXt: 7).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> y, _ = ConvNeXtMixer().init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 4)))
      >>> y.shape
      (1, 8, 8, 4)
    """

    kernel_size: int = 7
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        _check_nhwc("ConvNeXtMixer", x)
        k = self.kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"ConvNeXtMixer: kernel_size must be odd and >= 1, got {k}")
        c = x.shape[-1]
        return nn.Conv(
            c,
            (k, k),
            padding=((k // 2, k // 2), (k // 2, k // 2)),
            feature_group_count=c,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(default_kernel_init, DEPTHWISE_AXES),
            name="dwconv",
        )(x)


class InceptionDWConv2d(nn.Module):
    """Inception depthwise convolution (InceptionNeXt, https://arxiv.org/abs/2303.16900).

    Where ConvNeXt runs one large 7x7 depthwise conv over every channel, this token mixer
    splits the channels into four groups ``(C - 3g, g, g, g)`` (`inception_split_sizes`) and
    runs, in timm's concatenation order: identity, a ``square`` x ``square`` depthwise conv,
    a ``1 x band`` depthwise conv (along W) and a ``band x 1`` depthwise conv (along H). Most
    channels pass through untouched, which is where the speed comes from.

    Convs use stride 1 and symmetric ``k // 2`` zero padding with bias, as the official code;
    only odd kernel sizes are accepted (with even ones the official code's branches change the
    spatial size and its concatenation fails). timm's ``dilation`` (used only for
    ``output_stride < 32``) is not implemented.

    Attributes:
      square_kernel_size: kernel of the square branch (3).
      band_kernel_size: length of the two band branches (11; InceptionNeXt-atto uses 9).
      branch_ratio: ``g / C`` per conv branch (0.125; atto uses 0.25).
      dtype, param_dtype: compute and parameter dtypes.
      kernel_init, bias_init: initializers of the depthwise kernels and biases.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mixer = InceptionDWConv2d(band_kernel_size=9)
      >>> x = jnp.ones((1, 8, 8, 16))
      >>> y, variables = mixer.init_with_output(jax.random.key(0), x)
      >>> y.shape
      (1, 8, 8, 16)
    """

    square_kernel_size: int = 3
    band_kernel_size: int = 11
    branch_ratio: float = 0.125
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        """Mix tokens; returns the same shape."""
        _check_nhwc("InceptionDWConv2d", x)
        for name in ("square_kernel_size", "band_kernel_size"):
            k = getattr(self, name)
            if k < 1 or k % 2 == 0:
                raise ValueError(f"InceptionDWConv2d: {name} must be odd and >= 1, got {k}")
        c_id, g, _, _ = inception_split_sizes(x.shape[-1], self.branch_ratio)
        s, b = self.square_kernel_size, self.band_kernel_size

        def dwconv(kernel: tuple[int, int], name: str) -> nn.Conv:
            return nn.Conv(
                g,
                kernel,
                padding=tuple((k // 2, k // 2) for k in kernel),
                feature_group_count=g,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(self.kernel_init, DEPTHWISE_AXES),
                bias_init=self.bias_init,
                name=name,
            )

        x_id = x[..., :c_id]
        x_hw = x[..., c_id : c_id + g]
        x_w = x[..., c_id + g : c_id + 2 * g]
        x_h = x[..., c_id + 2 * g :]
        y_hw = dwconv((s, s), "dwconv_hw")(x_hw)
        y_w = dwconv((1, b), "dwconv_w")(x_w)
        y_h = dwconv((b, 1), "dwconv_h")(x_h)
        # The identity group keeps the input's dtype; cast it to the convs' compute dtype.
        return jnp.concatenate([x_id.astype(y_hw.dtype), y_hw, y_w, y_h], axis=-1)


class ConvMlp(nn.Module):
    """MLP of 1x1 convs, ``fc1 -> GELU -> dropout -> fc2`` (InceptionNeXt,
    https://arxiv.org/abs/2303.16900).

    The channel MLP of `MetaNeXtBlock`. The 1x1 convs are `flax.linen.Conv` with a ``(1, 1)``
    kernel (HWIO ``[1, 1, C_in, C_out]``) so a timm ``ConvMlp`` weight maps onto them by the
    plain OIHW -> HWIO transpose. GELU is the exact (erf) one, as torch's ``nn.GELU()``.

    Attributes:
      hidden_features: width of the hidden layer.
      out_features: output channels (None: the input's).
      dropout: dropout rate after the activation (timm's ``drop``; 0 in InceptionNeXt).
      dtype, param_dtype, kernel_init, bias_init: as `InceptionDWConv2d`.
    """

    hidden_features: int
    out_features: int | None = None
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, deterministic: bool = True
    ) -> Float[Array, "B H W C2"]:
        """Apply the MLP per pixel; ``deterministic=False`` enables dropout (rng "dropout")."""
        _check_nhwc("ConvMlp", x)
        conv = lambda features, name: nn.Conv(
            features,
            (1, 1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, CONV1X1_AXES),
            bias_init=self.bias_init,
            name=name,
        )
        out_features = self.out_features or x.shape[-1]
        x = conv(self.hidden_features, "fc1")(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
        return conv(out_features, "fc2")(x)


class MetaNeXtBlock(nn.Module):
    """MetaNeXt block (InceptionNeXt, https://arxiv.org/abs/2303.16900).

    ``x + DropPath(gamma * ConvMlp(BN(token_mixer(x))))``: ConvNeXt's block with the token
    mixer made a parameter (`InceptionDWConv2d` for InceptionNeXt), BatchNorm instead of
    LayerNorm, and per-channel layer scale ``gamma`` initialised to ``ls_init_value``.

    BatchNorm follows `flax.linen.BatchNorm` semantics: ``momentum=0.9`` is the decay of the
    running statistics (torch's ``momentum=0.1``), ``epsilon=1e-5`` as torch, and the running
    variance is updated with the biased batch variance, where torch uses the unbiased one (the
    outputs in train and eval mode are the same; only the running variance drifts apart by a
    factor ``n / (n - 1)``, n = B*H*W).

    Attributes:
      mlp_ratio: hidden width of the MLP / C (InceptionNeXt: 4, 3 in the last stage).
      token_mixer: factory of the token mixer, called as ``token_mixer(dtype=, param_dtype=,
        name="token_mixer")`` (default `InceptionDWConv2d` with its defaults).
      ls_init_value: initial layer scale; None or 0 leaves the scale out (as timm).
      drop_path: stochastic-depth rate of the residual branch.
      bn_momentum, bn_epsilon: of the BatchNorm (Flax semantics, see above).
      dtype, param_dtype, kernel_init, bias_init: as `InceptionDWConv2d`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = MetaNeXtBlock()
      >>> x = jnp.ones((2, 8, 8, 32))
      >>> variables = block.init(jax.random.key(0), x)
      >>> y = block.apply(variables, x)  # eval: running statistics
      >>> y, updates = block.apply(variables, x, train=True, mutable=["batch_stats"])
    """

    mlp_ratio: float = 4.0
    token_mixer: Callable[..., nn.Module] = InceptionDWConv2d
    ls_init_value: float | None = 1e-6
    drop_path: float = 0.0
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B H W C"],
        *,
        train: bool = False,
        deterministic: bool | None = None,
    ) -> Float[Array, "B H W C"]:
        """Apply the block.

        Args:
          x: ``[B, H, W, C]`` features.
          train: normalise with batch statistics and update the running ones (apply with
            ``mutable=["batch_stats"]``); False uses the running statistics.
          deterministic: turn drop path off; None means ``not train``. With ``drop_path > 0``
            and drop path on, pass an rng named ``"dropout"``.

        Returns:
          ``[B, H, W, C]``, in ``dtype`` (the input's when None).
        """
        _check_nhwc("MetaNeXtBlock", x)
        if deterministic is None:
            deterministic = not train
        dim = x.shape[-1]
        shortcut = x
        y = self.token_mixer(dtype=self.dtype, param_dtype=self.param_dtype, name="token_mixer")(x)
        y = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="norm",
        )(y)
        y = ConvMlp(
            int(self.mlp_ratio * dim),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            name="mlp",
        )(y, deterministic=True)
        if self.ls_init_value:
            gamma = self.param(
                "gamma", nn.initializers.constant(self.ls_init_value), (dim,), self.param_dtype
            )
            y = y * gamma.astype(y.dtype).reshape(1, 1, 1, dim)
        y = drop_path(self, y, self.drop_path, deterministic)
        return shortcut.astype(y.dtype) + y


class MlpClassifierHead(nn.Module):
    """InceptionNeXt's MLP classifier head (https://arxiv.org/abs/2303.16900).

    Global average pooling -> Dense(``mlp_ratio * C``) -> GELU -> LayerNorm(eps 1e-6) ->
    dropout -> Dense(``num_classes``), where ConvNeXt uses LN -> Dense. The pooling and the
    LayerNorm statistics are computed in fp32.

    Attributes:
      num_classes: outputs; 0 returns the normalised hidden features (timm's
        ``reset_classifier(0)``: ``fc2`` becomes the identity).
      mlp_ratio: hidden width / C (3).
      dropout: dropout before ``fc2`` (timm's ``drop_rate``, 0 by default).
      ln_epsilon: LayerNorm epsilon (1e-6).
      dtype, param_dtype, kernel_init, bias_init: as `InceptionDWConv2d`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> head = MlpClassifierHead(num_classes=10)
      >>> logits, _ = head.init_with_output(jax.random.key(0), jnp.ones((2, 4, 4, 16)))
      >>> logits.shape
      (2, 10)
    """

    num_classes: int = 1000
    mlp_ratio: float = 3.0
    dropout: float = 0.0
    ln_epsilon: float = LN_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = default_kernel_init
    bias_init: Callable[..., Array] = nn.initializers.zeros

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, deterministic: bool = True, pre_logits: bool = False
    ) -> Float[Array, "B K"]:
        """Logits ``[B, num_classes]`` (``[B, mlp_ratio * C]`` if ``pre_logits`` or
        ``num_classes == 0``); ``deterministic=False`` enables dropout (rng "dropout")."""
        _check_nhwc("MlpClassifierHead", x)
        dense = lambda features, name, axes: nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
            bias_init=self.bias_init,
            name=name,
        )
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)  # [B, C]
        h = dense(int(self.mlp_ratio * x.shape[-1]), "fc1", ("channels", "mlp"))(pooled)
        h = nn.gelu(h, approximate=False)
        h = nn.LayerNorm(
            epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(h)
        h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
        if pre_logits or self.num_classes == 0:
            return h
        return dense(self.num_classes, "fc2", ("mlp", "classes"))(h)
