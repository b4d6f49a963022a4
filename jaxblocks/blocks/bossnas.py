"""BossNAS HyTra candidates: `ResConv` (bottleneck residual conv) and `ResAtt` (residual MHSA).

Li et al., "BossNAS: Exploring Hybrid CNN-transformers with Block-wisely Self-supervised Neural
Architecture Search", https://arxiv.org/abs/2103.12424. Official code: changlin31/BossNAS
``retraining_hytra/boss_candidates/{resnet_op,bot_op}.py`` (the retraining candidates, which
these modules follow; the searching ones in ``searching/bossnas/models/operations/hytra_ops.py``
are the same maths with an extra down-sampling branch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.blocks.nextvit import avg_pool_2x2_ceil
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "ResAtt",
    "ResConv",
    "bossnas_attention",
]

Dtype = Any

BN_MOMENTUM = 0.9  # Flax decay; torch's BatchNorm momentum 0.1
BN_EPSILON = 1e-5  # torch's default
CONV_AXES = (None, None, "conv_in", "conv_out")
ACTIVATION_AXES = ("batch", "height", "width", "channels")
# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"), as the official BossNet init.
default_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def bossnas_attention(
    qkv: Float[Array, "B N 3HD"], heads: int, scale: float | None = None
) -> Float[Array, "B N HD"]:
    """The official HyTra ``Attention.forward`` on tokens: ``out_m = sum_l softmax_m'(q_l . k_m')
    [m] * v_l``.

    The official code computes ``v @ softmax(q^T k)`` with ``v`` of shape ``[d, n]``, i.e. the
    attention matrix is applied *transposed*: token ``m`` aggregates the values ``v_l`` with the
    weights row ``l`` gives to key ``m`` (rows normalised over keys). We keep this exactly, since
    the published models were trained with it. Channel layout as the official ``view(b, 3 * heads,
    dim_head, n)``: ``[q | k | v]``, each head-major. The softmax runs in float32.
    """
    b, n, c3 = qkv.shape
    if c3 % (3 * heads):
        raise ValueError(f"bossnas_attention: qkv width {c3} is not divisible by 3 * heads")
    d = c3 // (3 * heads)
    scale = d**-0.5 if scale is None else scale
    q, k, v = jnp.split(qkv.reshape(b, n, 3, heads, d), 3, axis=2)  # [B, N, 1, H, D] each
    q, k, v = (a[:, :, 0] for a in (q, k, v))  # [B, N, H, D]
    logits = jnp.einsum("blhd,bmhd->bhlm", q.astype(jnp.float32) * scale, k.astype(jnp.float32))
    w = jax.nn.softmax(logits, axis=-1)  # [B, H, L(query row), M(key)]
    out = jnp.einsum("bhlm,blhd->bmhd", w, v.astype(jnp.float32))  # the transposed product
    return out.reshape(b, n, heads * d).astype(qkv.dtype)


class _Layers:
    """Conv / BN / activation factories shared by both candidates."""

    @staticmethod
    def conv(mod, features, kernel, stride=1, groups=1, bias=False, name=None):
        p = kernel // 2
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((p, p), (p, p)),
            feature_group_count=groups,
            use_bias=bias,
            dtype=mod.dtype,
            param_dtype=mod.param_dtype,
            kernel_init=nn.with_logical_partitioning(default_kernel_init, CONV_AXES),
            name=name,
        )

    @staticmethod
    def bn(mod, train, name, zero=False):
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=mod.dtype,
            param_dtype=mod.param_dtype,
            scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
            name=name,
        )


def _shortcut(mod, x, out_features, stride, train, act):
    """The official shortcut: ResNet-D avg-down (2x2 avg pool ceil, 1x1 conv, BN) when
    ``avg_down``, else a strided 3x3 conv-BN-act or a 1x1 conv-BN-act; identity when the shape
    is kept."""
    c = x.shape[-1]
    if stride == 1 and c == out_features:
        return x
    if mod.avg_down:
        if stride == 2:
            x = avg_pool_2x2_ceil(x)
        x = _Layers.conv(mod, out_features, 1, name="shortcut_conv")(x)
        return _Layers.bn(mod, train, "shortcut_bn")(x)
    x = _Layers.conv(mod, out_features, 3 if stride == 2 else 1, stride, name="shortcut_conv")(x)
    return act(_Layers.bn(mod, train, "shortcut_bn")(x))


def _se_width(channels: int) -> int:
    """timm's ``SEModule`` hidden width: ``make_divisible(channels / 16, 8)``."""
    return max(8, int(channels / 16 + 4) // 8 * 8)


def _check(name: str, x: Array, stride: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: x must be NHWC [B, H, W, C], got shape {x.shape}")
    if stride not in (1, 2):
        raise ValueError(f"{name}: stride must be 1 or 2, got {stride!r}")


class ResConv(nn.Module):
    """BossNAS ResConv candidate (https://arxiv.org/abs/2103.12424): a ResNet-D bottleneck.

    ``1x1 conv -> PEG (depthwise 3x3 with bias, carrying the block's stride) -> BN -> act ->
    3x3 conv -> BN -> act -> 1x1 conv (x4) -> BN (zero-init scale) [-> SE] [-> drop path] ->
    + shortcut -> act``. Unlike timm's ResNet bottleneck the stride sits in the depthwise PEG
    after the first 1x1 conv, not in the 3x3 conv; the shortcut is the avg-down one (2x2 average
    pool, ceil mode, padding excluded, then 1x1 conv + BN) when ``avg_down``. SE is timm's
    ``SEModule`` (``create_attn("se")``: mean -> 1x1 conv with bias to ``C / 16`` rounded to a
    multiple of 8 -> ReLU ->
    1x1 conv with bias -> sigmoid), written inline because `jaxblocks.layers.SqueezeExcite` has
    no biases.

    Attributes:
      planes: bottleneck width; the output has ``4 * planes`` channels.
      stride: 1 or 2.
      se: squeeze-excitation on the residual branch (BossNet-T0: yes).
      avg_down: ResNet-D shortcut (BossNet: yes).
      act: activation (BossNet-T0: SiLU).
      drop_path: stochastic-depth rate of the residual branch.
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> block = ResConv(planes=16, stride=2)
      >>> x = jnp.ones((2, 8, 8, 32))
      >>> v = block.init(jax.random.key(0), x)
      >>> block.apply(v, x, train=False).shape
      (2, 4, 4, 64)
    """

    planes: int
    stride: int = 1
    se: bool = True
    avg_down: bool = True
    act: Callable[[Array], Array] = nn.silu
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool = True
    ) -> Float[Array, "B h w D"]:
        """``[B, ceil(H / stride), ceil(W / stride), 4 * planes]``."""
        _check("ResConv", x, self.stride)
        out = 4 * self.planes
        residual = _shortcut(self, x, out, self.stride, train, self.act)
        y = _Layers.conv(self, self.planes, 1, name="conv1")(x)
        y = _Layers.conv(self, self.planes, 3, self.stride, self.planes, True, name="peg")(y)
        y = self.act(_Layers.bn(self, train, "bn1")(y))
        y = _Layers.conv(self, self.planes, 3, name="conv2")(y)
        y = self.act(_Layers.bn(self, train, "bn2")(y))
        y = _Layers.conv(self, out, 1, name="conv3")(y)
        y = _Layers.bn(self, train, "bn3", zero=True)(y)
        if self.se:
            s = jnp.mean(y.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(y.dtype)
            s = nn.relu(_Layers.conv(self, _se_width(out), 1, bias=True, name="se_fc1")(s))
            y = y * jax.nn.sigmoid(_Layers.conv(self, out, 1, bias=True, name="se_fc2")(s))
        y = drop_path(self, y, self.drop_path, deterministic)
        return self.act(y + residual)


class ResAtt(nn.Module):
    """BossNAS ResAtt candidate (https://arxiv.org/abs/2103.12424): a BoTNet-style residual
    block with global multi-head self-attention and a PEG instead of relative positions.

    ``1x1 conv -> PEG (depthwise 3x3 with bias, the block's stride) -> BN -> act -> MHSA
    (1x1 qkv conv without bias, `bossnas_attention`) -> BN -> act -> 1x1 conv -> BN (zero-init
    scale) -> + shortcut -> act``, shortcut as `ResConv`'s. Unlike BoTNet there are no relative
    position logits (the PEG supplies position) and the down-sampling is in the PEG, not an
    average pool after attention. No drop path (the official ``make_boss_blocks`` gives none to
    ResAtt).

    Attributes:
      out_features: output channels (``4 * planes`` in BossNet).
      heads: attention heads (BossNet: 1, 2, 4, 8 in stages 1-4).
      dim_head: channels per head (64); the attention input width is ``heads * dim_head``.
      stride: 1 or 2.
      avg_down: ResNet-D shortcut (BossNet: yes).
      act: activation (BossNet-T0: SiLU).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> block = ResAtt(out_features=64, heads=2, dim_head=8, stride=2)
      >>> x = jnp.ones((2, 8, 8, 32))
      >>> v = block.init(jax.random.key(0), x)
      >>> block.apply(v, x, train=False).shape
      (2, 4, 4, 64)
    """

    out_features: int
    heads: int = 4
    dim_head: int = 64
    stride: int = 1
    avg_down: bool = True
    act: Callable[[Array], Array] = nn.silu
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool = True
    ) -> Float[Array, "B h w D"]:
        """``[B, ceil(H / stride), ceil(W / stride), out_features]``."""
        del deterministic  # no stochastic parts
        _check("ResAtt", x, self.stride)
        if self.heads < 1 or self.dim_head < 1:
            raise ValueError(
                f"ResAtt: heads and dim_head must be >= 1, got {self.heads}, {self.dim_head}"
            )
        inner = self.heads * self.dim_head
        shortcut = _shortcut(self, x, self.out_features, self.stride, train, self.act)
        y = _Layers.conv(self, inner, 1, name="proj_conv")(x)
        y = _Layers.conv(self, inner, 3, self.stride, inner, True, name="peg")(y)
        y = self.act(_Layers.bn(self, train, "proj_bn")(y))
        qkv = _Layers.conv(self, 3 * inner, 1, name="to_qkv")(y)  # [B, h, w, 3 * inner]
        b, h, w, _ = qkv.shape
        y = bossnas_attention(qkv.reshape(b, h * w, 3 * inner), self.heads).reshape(b, h, w, inner)
        y = self.act(_Layers.bn(self, train, "attn_bn")(y))
        y = _Layers.conv(self, self.out_features, 1, name="out_conv")(y)
        y = _Layers.bn(self, train, "out_bn", zero=True)(y)
        return self.act(y + shortcut)
