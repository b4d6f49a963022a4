"""UniFormer blocks: dynamic position encoding (DPE), local MHRA (``CBlock``), global MHRA
(``SABlock``) and the token-pruning global block of the light models (``EvoSABlock``).

Li et al., "UniFormer: Unifying Convolution and Self-attention for Visual Recognition",
https://arxiv.org/abs/2201.09450. Official code: Sense-X/UniFormer
``image_classification/models/uniformer.py`` (UniFormer-S/B) and ``uniformer_light.py``
(UniFormer-XXS/XS, whose global blocks prune tokens as Evo-ViT, https://arxiv.org/abs/2108.01390).

Channels-last ``[B, H, W, C]`` throughout. Module and parameter names follow the official ones
(``pos_embed``, ``norm1``, ``conv1``, ``attn``, ``conv2``, ``mlp/fc1``, ``attn/qkv``, ``gamma_1``)
so a state dict maps onto them by name (convs: OIHW -> HWIO; linears: transpose).

Initialisation as the official code: Linear weights ``trunc_normal(0.02)`` with zero biases,
LayerNorm ones/zeros, convs at torch's default (``kaiming_uniform(a=√5)``, i.e. ``U(±1/√fan_in)``
for weights and biases). LayerNorm ε is 1e-6 in the blocks (the official ``norm_layer``) and 1e-5
in the patch embeddings (plain ``nn.LayerNorm``). BatchNorm follows `flax.linen.BatchNorm`:
``momentum=0.9`` is the decay of the running statistics (torch's 0.1), ε = 1e-5 as torch, and
the running variance is updated with the biased batch variance (torch: unbiased).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.blocks.nextvit import attention_weights
from jaxblocks.blocks.ninformer import torch_linear_bias_init
from jaxblocks.layers.stochastic_depth import drop_path
from jaxblocks.typing import Array, Float

__all__ = [
    "DPE",
    "CBlock",
    "CMlp",
    "EvoSABlock",
    "GlobalMHRABlock",
    "HeadEmbedding",
    "LocalMHRABlock",
    "MHSA",
    "MiddleEmbedding",
    "Mlp",
    "PatchEmbed",
    "SABlock",
    "depthwise_conv2d",
    "merge_tokens",
    "pool_global_attention",
]

Dtype = Any
# torch's default Conv2d weight init, kept by the official code: U(±1/√fan_in).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# The official _init_weights: trunc_normal(std=0.02) for every Linear, zero bias.
default_kernel_init = nn.initializers.truncated_normal(0.02)
BN_MOMENTUM = 0.9  # Flax decay; torch's BatchNorm momentum 0.1
BN_EPSILON = 1e-5  # torch's default
LN_EPSILON = 1e-6  # the blocks' norm_layer: partial(nn.LayerNorm, eps=1e-6)
EMBED_LN_EPSILON = 1e-5  # PatchEmbed's (and the light model's norm_cls) plain nn.LayerNorm
CONV_AXES = (None, None, "conv_in", "conv_out")
ACTIVATION_AXES = ("batch", "height", "width", "channels")


# ----------------------------------------------------------------------------- pure functions


def depthwise_conv2d(
    x: Float[Array, "B H W C"], kernel: Float[Array, "k k 1 C"], bias: Float[Array, " C"]
) -> Float[Array, "B H W C"]:
    """Depthwise ``k x k`` convolution, stride 1, zero padding ``k // 2`` (same size), plus bias:
    torch's ``Conv2d(C, C, k, padding=k // 2, groups=C)``."""
    k = kernel.shape[0]
    y = jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(1, 1),
        padding=((k // 2, k // 2), (k // 2, k // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )
    return y + bias.astype(x.dtype).reshape(1, 1, 1, -1)


def merge_tokens(x: Float[Array, "B N C"], score: Float[Array, "B N"]) -> Float[Array, "B 1 C"]:
    """The representative token of the pruned tokens: their average weighted by their global
    attention, ``sum_i (s_i / sum_j s_j) x_i`` (Evo-ViT's ``merge_tokens``). Sums in fp32."""
    s = score.astype(jnp.float32)
    w = s / jnp.sum(s, axis=1, keepdims=True)
    out = jnp.einsum("bn,bnc->bc", w, x.astype(jnp.float32))[:, None]
    return out.astype(x.dtype)


def pool_global_attention(score: Float[Array, "B N"], h: int, w: int) -> Float[Array, "B n"]:
    """The global attention of an ``h x w`` map for the next stage: 2x2 average pooling (floor,
    as the stride-2 patch embedding) rescaled to keep its sum (official ``downsample``)."""
    b = score.shape[0]
    old = jnp.sum(score, axis=1, keepdims=True)
    h2, w2 = h // 2, w // 2
    g = score.reshape(b, h, w)[:, : 2 * h2, : 2 * w2].reshape(b, h2, 2, w2, 2)
    g = jnp.mean(g, axis=(2, 4)).reshape(b, h2 * w2)
    return g * (old / jnp.sum(g, axis=1, keepdims=True))


# ----------------------------------------------------------------------------- layers


def _check_nhwc(where: str, x: Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be [B, H, W, C] (4-D), got shape {x.shape}")


def _check_heads(where: str, c: int, head_dim: int) -> int:
    if head_dim < 1 or c % head_dim:
        raise ValueError(
            f"{where}: {c} channels (x.shape[-1]) are not a multiple of head_dim={head_dim}"
        )
    return c // head_dim


class _Layers:
    """Layer factories shared by the UniFormer modules (which declare ``dtype`` and
    ``param_dtype``)."""

    def _conv(self, features: int, kernel: int, name: str, *, stride: int = 1, pad: int = 0,
              groups: int = 1, fan_in: int) -> nn.Conv:  # fmt: skip
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(torch_conv_kernel_init, CONV_AXES),
            bias_init=torch_linear_bias_init(fan_in),
            name=name,
        )

    def _dense(self, features: int, name: str, axes, *, bias: bool = True) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(default_kernel_init, axes),
            name=name,
        )

    def _bn(self, train: bool, name: str) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _ln(self, name: str, epsilon: float = LN_EPSILON) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _gamma(self, name: str, c: int) -> Array | None:
        if not self.layer_scale_init:
            return None
        init = nn.initializers.constant(self.layer_scale_init)
        return self.param(name, nn.with_logical_partitioning(init, ("channels",)), (c,),
                          self.param_dtype)  # fmt: skip


def _scaled(y: Array, gamma: Array | None) -> Array:
    if gamma is None:
        return y
    return y * nn.unbox(gamma).astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))


class DPE(nn.Module):
    """Dynamic position encoding of UniFormer (https://arxiv.org/abs/2201.09450):
    ``x + DWConv_{3x3}(x)``, the first residual of every UniFormer block.

    A depthwise convolution (with bias) encodes position from the zero-padded neighbourhood,
    so it works at any resolution, unlike absolute position embeddings. Official code: the
    blocks' ``pos_embed`` conv; here its parameters are ``kernel [k, k, 1, C]`` and
    ``bias [C]``.

    Attributes:
      kernel_size: odd kernel side (3).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> y, _ = DPE().init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
      >>> y.shape
      (1, 8, 8, 16)
    """

    kernel_size: int = 3
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        """Same shape as ``x``."""
        _check_nhwc("DPE", x)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"DPE: kernel_size must be odd and positive, got {self.kernel_size}")
        c, k = x.shape[-1], self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(torch_conv_kernel_init, CONV_AXES),
            (k, k, 1, c),
            self.param_dtype,
        )
        bias = self.param("bias", torch_linear_bias_init(k * k), (c,), self.param_dtype)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return x + depthwise_conv2d(x, nn.unbox(kernel), bias)


class CMlp(_Layers, nn.Module):
    """UniFormer's MLP of 1x1 convs, ``fc1 -> GELU -> dropout -> fc2 -> dropout``
    (https://arxiv.org/abs/2201.09450), the FFN of the local block; exact (erf) GELU as torch.

    Attributes:
      hidden_features: hidden width (``int(C * mlp_ratio)``).
      dropout: after the GELU and after ``fc2``.
      dtype, param_dtype: compute and parameter dtypes.
    """

    hidden_features: int = 0
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, deterministic: bool = True) -> Array:
        """Same shape as ``x``; ``deterministic=False`` enables dropout (rng "dropout")."""
        c = x.shape[-1]
        y = self._conv(self.hidden_features, 1, "fc1", fan_in=c)(x)
        y = nn.Dropout(self.dropout, deterministic=deterministic)(nn.gelu(y, approximate=False))
        y = self._conv(c, 1, "fc2", fan_in=self.hidden_features)(y)
        return nn.Dropout(self.dropout, deterministic=deterministic)(y)


class Mlp(_Layers, nn.Module):
    """The transformer MLP of the global block, ``Linear -> GELU -> dropout -> Linear ->
    dropout`` (https://arxiv.org/abs/2201.09450); exact (erf) GELU as torch.

    Attributes:
      hidden_features: hidden width.
      dropout: after the GELU and after ``fc2``.
      dtype, param_dtype: compute and parameter dtypes.
    """

    hidden_features: int = 0
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B N C"], *, deterministic: bool = True) -> Array:
        """Same shape as ``x``; ``deterministic=False`` enables dropout (rng "dropout")."""
        c = x.shape[-1]
        y = self._dense(self.hidden_features, "fc1", ("embed", "mlp"))(x)
        y = nn.Dropout(self.dropout, deterministic=deterministic)(nn.gelu(y, approximate=False))
        y = self._dense(c, "fc2", ("mlp", "embed"))(y)
        return nn.Dropout(self.dropout, deterministic=deterministic)(y)


class MHSA(_Layers, nn.Module):
    """Multi-head self-attention of UniFormer's global MHRA (https://arxiv.org/abs/2201.09450).

    One ``qkv`` Linear (``C -> 3C``, bias ``qkv_bias``), ``C / head_dim`` heads,
    ``softmax(q k^T / sqrt(head_dim))`` in fp32, attention dropout, ``proj`` Linear, dropout:
    the official ``Attention``. With ``return_cls_attention`` it also returns the first token's
    attention averaged over heads ``[B, N]`` (before dropout): the light models' global score.

    Attributes:
      head_dim: channels per head (64; the light models 28 / 32).
      qkv_bias: bias of the qkv projection (True in every official model).
      attn_drop, proj_drop: dropout of the attention weights and of the output.
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> y, _ = MHSA(head_dim=16).init_with_output(jax.random.key(0), jnp.ones((2, 10, 32)))
      >>> y.shape
      (2, 10, 32)
    """

    head_dim: int = 64
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B N C"],
        *,
        deterministic: bool = True,
        return_cls_attention: bool = False,
    ) -> Array | tuple[Array, Float[Array, "B N"]]:
        """Attend over the ``N`` tokens of ``x``."""
        if x.ndim != 3:
            raise ValueError(f"MHSA: x must be [B, N, C] (3-D), got shape {x.shape}")
        b, n, c = x.shape
        heads = _check_heads("MHSA", c, self.head_dim)
        qkv = self._dense(3 * c, "qkv", ("embed", "heads"), bias=self.qkv_bias)(x)
        qkv = qkv.reshape(b, n, 3, heads, self.head_dim)  # [B, N, 3, H, K], torch's layout
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        weights = attention_weights(q, k)  # [B, H, N, N] fp32
        cls_attention = jnp.mean(weights[:, :, 0, :], axis=1)  # [B, N]
        weights = nn.Dropout(self.attn_drop, deterministic=deterministic)(weights)
        y = jnp.einsum("bhnm,bmhk->bnhk", weights, v.astype(jnp.float32)).astype(q.dtype)
        y = self._dense(c, "proj", ("heads", "embed"))(y.reshape(b, n, c))
        y = nn.Dropout(self.proj_drop, deterministic=deterministic)(y)
        return (y, cls_attention) if return_cls_attention else y


# ----------------------------------------------------------------------------- blocks


class CBlock(_Layers, nn.Module):
    """UniFormer's local MHRA block, ``CBlock`` (https://arxiv.org/abs/2201.09450).

    ``x = x + DPE(x)``; ``x = x + conv2(DWConv_{5x5}(conv1(BN(x))))`` (1x1, depthwise 5x5,
    1x1, all with bias: the local relation aggregator, a learnable neighbourhood affinity
    instead of attention); ``x = x + CMlp(BN(x))``. Used in the shallow, high-resolution
    stages, where attention would mostly learn local, redundant relations.

    Attributes:
      mlp_ratio: hidden width of the `CMlp` / C (4; the light models 3).
      drop_path: stochastic-depth rate of both residual branches.
      dropout: of the `CMlp`.
      layer_scale_init: initial per-channel ``gamma_1``/``gamma_2`` scaling the two branches;
        None leaves them out (uniformer.py has none here; uniformer_light.py has them when its
        global ``layer_scale`` flag is on).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = CBlock()
      >>> x = jnp.ones((2, 8, 8, 32))
      >>> variables = block.init(jax.random.key(0), x)
      >>> block.apply(variables, x).shape  # eval: running statistics
      (2, 8, 8, 32)
    """

    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dropout: float = 0.0
    layer_scale_init: float | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool | None = None
    ) -> Float[Array, "B H W C"]:
        """Apply the block.

        Args:
          x: ``[B, H, W, C]``.
          train: BN with batch statistics, updating the running ones (apply with
            ``mutable=["batch_stats"]``); False uses the running statistics.
          deterministic: turn drop path and dropout off; None means ``not train``.
        """
        _check_nhwc("CBlock", x)
        deterministic = not train if deterministic is None else deterministic
        c = x.shape[-1]
        x = DPE(dtype=self.dtype, param_dtype=self.param_dtype, name="pos_embed")(x)
        y = self._conv(c, 1, "conv1", fan_in=c)(self._bn(train, "norm1")(x))
        y = self._conv(c, 5, "attn", pad=2, groups=c, fan_in=25)(y)
        y = self._conv(c, 1, "conv2", fan_in=c)(y)
        x = x + drop_path(self, _scaled(y, self._gamma("gamma_1", c)), self.drop_path,
                          deterministic)  # fmt: skip
        y = CMlp(int(c * self.mlp_ratio), self.dropout, self.dtype, self.param_dtype, name="mlp")(
            self._bn(train, "norm2")(x), deterministic=deterministic
        )
        return x + drop_path(self, _scaled(y, self._gamma("gamma_2", c)), self.drop_path,
                             deterministic)  # fmt: skip


class SABlock(_Layers, nn.Module):
    """UniFormer's global MHRA block, ``SABlock`` (https://arxiv.org/abs/2201.09450).

    ``x = x + DPE(x)``; flatten to ``[B, HW, C]``; ``x = x + MHSA(LN(x))``;
    ``x = x + Mlp(LN(x))``; back to ``[B, H, W, C]``. A ViT block preceded by the
    convolutional position encoding, used in the deep, low-resolution stages where long-range
    relations matter. LayerNorm ε = 1e-6 (the official ``norm_layer``).

    Attributes:
      head_dim: channels per head (64).
      mlp_ratio: hidden width of the `Mlp` / C (4).
      qkv_bias: bias of the qkv projection.
      drop_path, dropout, attn_drop: stochastic depth, MLP/projection dropout, attention dropout.
      layer_scale_init: initial ``gamma_1``/``gamma_2`` (the official ``uniformer_base_ls``
        uses 1e-6); None leaves them out.
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = SABlock(head_dim=16)
      >>> x = jnp.ones((2, 4, 4, 32))
      >>> block.apply(block.init(jax.random.key(0), x), x).shape
      (2, 4, 4, 32)
    """

    head_dim: int = 64
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    dropout: float = 0.0
    attn_drop: float = 0.0
    layer_scale_init: float | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B H W C"], *, train: bool = False, deterministic: bool | None = None
    ) -> Float[Array, "B H W C"]:
        """Apply the block; ``train`` only sets the default of ``deterministic`` (no BN)."""
        _check_nhwc("SABlock", x)
        deterministic = not train if deterministic is None else deterministic
        b, h, w, c = x.shape
        _check_heads("SABlock", c, self.head_dim)
        x = DPE(dtype=self.dtype, param_dtype=self.param_dtype, name="pos_embed")(x)
        t = x.reshape(b, h * w, c)
        attn = MHSA(self.head_dim, self.qkv_bias, self.attn_drop, self.dropout, self.dtype,
                    self.param_dtype, name="attn")  # fmt: skip
        y = attn(self._ln("norm1")(t), deterministic=deterministic)
        t = t + drop_path(self, _scaled(y, self._gamma("gamma_1", c)), self.drop_path,
                          deterministic)  # fmt: skip
        y = Mlp(int(c * self.mlp_ratio), self.dropout, self.dtype, self.param_dtype, name="mlp")(
            self._ln("norm2")(t), deterministic=deterministic
        )
        t = t + drop_path(self, _scaled(y, self._gamma("gamma_2", c)), self.drop_path,
                          deterministic)  # fmt: skip
        return t.reshape(b, h, w, c)


class EvoSABlock(_Layers, nn.Module):
    """The global block of the light UniFormers (XXS/XS), ``EvoSABlock``
    (https://arxiv.org/abs/2201.09450, token evolution of Evo-ViT,
    https://arxiv.org/abs/2108.01390).

    An `SABlock` whose tokens are joined by a class token ``[B, 1, C]`` and which carries a
    global score per token ``[B, HW]`` (the class token's attention, averaged over heads, an
    exponential moving average across blocks). With ``prune_ratio = 1`` every token is
    attended and the score is set (first block: no score yet) or updated,
    ``s = (1 - trade_off) s + trade_off a_cls``. With ``prune_ratio < 1`` only the
    ``int(HW * prune_ratio)`` highest-scored tokens, the class token and one representative
    token (the score-weighted mean of the others, `merge_tokens`) go through attention and MLP
    (the slow update); the others receive the representative token's two branch outputs (the
    fast update, scaled by ``gamma_3`` with layer scale), and the kept tokens' scores are
    updated. ``downsample`` pools the score to the next stage's resolution
    (`pool_global_attention`).

    The official code keeps the score (and token indices) in module globals; here they are
    passed in and returned. Deviation: the official ``downsample`` runs only in the pruning
    branch; here it also runs with ``prune_ratio = 1`` (the same for every official model,
    whose last stage-3 block prunes).

    Attributes:
      head_dim, mlp_ratio, qkv_bias, drop_path, dropout, attn_drop, layer_scale_init: as
        `SABlock` (with layer scale and pruning, a third ``gamma_3`` scales the fast update).
      prune_ratio: share of tokens kept for the slow update (1: no pruning).
      trade_off: weight of the new class attention in the score update.
      downsample: return the score pooled 2x2 for the next stage.
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> first, prune = EvoSABlock(head_dim=16), EvoSABlock(head_dim=16, prune_ratio=0.5)
      >>> cls, x = jnp.zeros((2, 1, 32)), jnp.ones((2, 4, 4, 32))
      >>> (cls, x, score), v = first.init_with_output(jax.random.key(0), cls, x)
      >>> (cls, x, score), _ = prune.init_with_output(jax.random.key(1), cls, x, score)
      >>> x.shape, score.shape
      ((2, 4, 4, 32), (2, 16))
    """

    head_dim: int = 64
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    prune_ratio: float = 1.0
    trade_off: float = 1.0
    downsample: bool = False
    drop_path: float = 0.0
    dropout: float = 0.0
    attn_drop: float = 0.0
    layer_scale_init: float | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        cls_token: Float[Array, "B 1 C"],
        x: Float[Array, "B H W C"],
        global_attn: Float[Array, "B N"] | None = None,
        *,
        train: bool = False,
        deterministic: bool | None = None,
    ) -> tuple[Float[Array, "B 1 C"], Float[Array, "B H W C"], Float[Array, "B n"]]:
        """``(cls_token, x, global_attn)``; ``global_attn`` is ``[B, H * W]``, or pooled to
        ``[B, (H // 2) * (W // 2)]`` with ``downsample``. ``train`` only sets the default of
        ``deterministic``."""
        _check_nhwc("EvoSABlock", x)
        deterministic = not train if deterministic is None else deterministic
        b, h, w, c = x.shape
        n = h * w
        _check_heads("EvoSABlock", c, self.head_dim)
        if cls_token.shape != (b, 1, c):
            raise ValueError(f"EvoSABlock: cls_token must be [B, 1, C] = {(b, 1, c)}, got shape "
                             f"{cls_token.shape}")  # fmt: skip
        if global_attn is not None and global_attn.shape != (b, n):
            raise ValueError(f"EvoSABlock: global_attn must be [B, H * W] = {(b, n)}, got shape "
                             f"{global_attn.shape}")  # fmt: skip
        if not 0.0 < self.prune_ratio <= 1.0:
            raise ValueError(f"EvoSABlock: prune_ratio must be in (0, 1], got {self.prune_ratio}")
        pruning = self.prune_ratio < 1.0
        if pruning and global_attn is None:
            raise ValueError("EvoSABlock: prune_ratio < 1 needs the global_attn of a previous "
                             "block (the first global block must have prune_ratio=1)")  # fmt: skip

        x = DPE(dtype=self.dtype, param_dtype=self.param_dtype, name="pos_embed")(x)
        t = x.reshape(b, n, c)
        cls_token = cls_token.astype(t.dtype)
        attn = MHSA(self.head_dim, self.qkv_bias, self.attn_drop, self.dropout, self.dtype,
                    self.param_dtype, name="attn")  # fmt: skip
        norm1, norm2 = self._ln("norm1"), self._ln("norm2")
        mlp = Mlp(int(c * self.mlp_ratio), self.dropout, self.dtype, self.param_dtype, name="mlp")
        g1, g2 = self._gamma("gamma_1", c), self._gamma("gamma_2", c)

        if not pruning:
            z = jnp.concatenate([cls_token, t], axis=1)  # [B, 1 + N, C]
            y, a_cls = attn(norm1(z), deterministic=deterministic, return_cls_attention=True)
            a_cls = a_cls[:, 1:]
            if global_attn is None:
                global_attn = a_cls
            else:
                global_attn = (1.0 - self.trade_off) * global_attn + self.trade_off * a_cls
            z = z + drop_path(self, _scaled(y, g1), self.drop_path, deterministic)
            y = mlp(norm2(z), deterministic=deterministic)
            z = z + drop_path(self, _scaled(y, g2), self.drop_path, deterministic)
            cls_token, t = z[:, :1], z[:, 1:]
        else:
            keep = int(n * self.prune_ratio)
            order = jnp.argsort(global_attn, axis=1, descending=True, stable=True)  # [B, N]
            t_sorted = jnp.take_along_axis(t, order[:, :, None], axis=1)
            score = jnp.take_along_axis(global_attn, order, axis=1)
            t_drop = t_sorted[:, keep:]
            rep = merge_tokens(t_drop, score[:, keep:])  # [B, 1, C]
            z = jnp.concatenate([cls_token, t_sorted[:, :keep], rep], axis=1)  # [B, keep+2, C]
            y, a_cls = attn(norm1(z), deterministic=deterministic, return_cls_attention=True)
            kept = (1.0 - self.trade_off) * score[:, :keep] + self.trade_off * a_cls[:, 1:-1]
            score = jnp.concatenate([kept.astype(score.dtype), score[:, keep:]], axis=1)
            fast = y[:, -1:]
            z = z + drop_path(self, _scaled(y, g1), self.drop_path, deterministic)
            y = mlp(norm2(z), deterministic=deterministic)
            fast = fast + y[:, -1:]
            z = z + drop_path(self, _scaled(y, g2), self.drop_path, deterministic)
            g3 = self._gamma("gamma_3", c)
            t_drop = t_drop + _scaled(fast, g3)  # the fast update, without drop path
            cls_token = z[:, :1]
            t_sorted = jnp.concatenate([z[:, 1:-1], t_drop.astype(z.dtype)], axis=1)
            inverse = jnp.argsort(order, axis=1)  # back to raster order
            t = jnp.take_along_axis(t_sorted, inverse[:, :, None], axis=1)
            global_attn = jnp.take_along_axis(score, inverse, axis=1)
        if self.downsample:
            global_attn = pool_global_attention(global_attn, h, w)
        return cls_token, t.reshape(b, h, w, c), global_attn


# ----------------------------------------------------------------------------- embeddings


class PatchEmbed(_Layers, nn.Module):
    """UniFormer patch embedding (https://arxiv.org/abs/2201.09450): a ``p x p`` conv of stride
    ``p`` (bias) then LayerNorm over channels (ε 1e-5, torch's default, as the official
    ``PatchEmbed``). ``p = 4`` for the stem, 2 between stages.

    Attributes:
      out_features: output channels.
      patch_size: ``p``.
      dtype, param_dtype: compute and parameter dtypes.
    """

    out_features: int = 0
    patch_size: int = 4
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """``[B, H // p, W // p, out_features]``; ``train`` is unused (no BN)."""
        _check_nhwc("PatchEmbed", x)
        p = self.patch_size
        if x.shape[1] < p or x.shape[2] < p:
            raise ValueError(f"PatchEmbed: x of shape {x.shape} is smaller than the patch {p}x{p}")
        x = self._conv(self.out_features, p, "proj", stride=p, fan_in=x.shape[-1] * p * p)(x)
        return self._ln("norm", EMBED_LN_EPSILON)(x)


class HeadEmbedding(_Layers, nn.Module):
    """UniFormer's convolutional stem, ``head_embedding`` (https://arxiv.org/abs/2201.09450):
    conv 3x3 s2 (``C / 2``) -> BN -> GELU -> conv 3x3 s2 (``C``) -> BN, padding 1, conv biases.
    Used by UniFormer-S† and the light models instead of the 4x4 patch embedding. Names follow
    the official ``nn.Sequential`` indices (``proj_0``, ``proj_1``, ``proj_3``, ``proj_4``).

    Attributes:
      out_features: output channels ``C``.
      dtype, param_dtype: compute and parameter dtypes.
    """

    out_features: int = 0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """``[B, ceil(H / 4), ceil(W / 4), out_features]``."""
        _check_nhwc("HeadEmbedding", x)
        half = self.out_features // 2
        x = self._conv(half, 3, "proj_0", stride=2, pad=1, fan_in=x.shape[-1] * 9)(x)
        x = nn.gelu(self._bn(train, "proj_1")(x), approximate=False)
        x = self._conv(self.out_features, 3, "proj_3", stride=2, pad=1, fan_in=half * 9)(x)
        return self._bn(train, "proj_4")(x)


class MiddleEmbedding(_Layers, nn.Module):
    """UniFormer-S†'s downsampling between stages, ``middle_embedding``
    (https://arxiv.org/abs/2201.09450): conv 3x3 s2 (padding 1, bias) -> BN.

    Attributes:
      out_features: output channels.
      dtype, param_dtype: compute and parameter dtypes.
    """

    out_features: int = 0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], *, train: bool = False) -> Array:
        """``[B, ceil(H / 2), ceil(W / 2), out_features]``."""
        _check_nhwc("MiddleEmbedding", x)
        x = self._conv(self.out_features, 3, "proj_0", stride=2, pad=1, fan_in=x.shape[-1] * 9)(x)
        return self._bn(train, "proj_1")(x)


# The paper's names for the two blocks.
LocalMHRABlock = CBlock
GlobalMHRABlock = SABlock
