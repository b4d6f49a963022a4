"""MossFormer2 blocks — Zhao et al., "MossFormer2: Combining Transformer and RNN-Free Recurrent
Network for Enhanced Time-Domain Monaural Speech Separation", ICASSP 2024,
https://arxiv.org/abs/2312.11825 (official code: alibabasglab/MossFormer2,
``MossFormer2_standalone/model/utils/Transformer.py``).

Each MossFormer2 block is a MossFormer layer (FLASH-style gated single-head attention: exact
quadratic attention inside groups of ``group_size`` frames plus linear attention across the whole
sequence, both shared by two gated branches) followed by a gated FSMN block (the "RNN-free
recurrent" module: a gated convolutional unit around a dilated dense FSMN memory).
Layout is ``[B, T, C]``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxblocks.layers.fsmn import ChannelPReLU, UniDeepFsmnDilated, fsmn_memory

__all__ = [
    "ConvModule",
    "FFConvM",
    "GatedFSMN",
    "GatedFSMNBlock",
    "MossFormer2Block",
    "MossFormerLayer",
    "OffsetScale",
    "ScaleNorm",
    "flash_attention_outputs",
    "rotary_embed",
]


def _check_btc(layer: str, x: Array) -> None:
    if x.ndim != 3:
        raise ValueError(f"{layer}: x must be [B, T, C], got shape {x.shape}")


class ScaleNorm(nn.Module):
    """ScaleNorm (Nguyen & Salazar, https://arxiv.org/abs/1910.05895): ``g · x / max(‖x‖/√C,
    eps)`` with one learned scalar ``g`` (init 1), statistics in fp32."""

    epsilon: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        g = self.param("g", nn.initializers.ones, (1,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        norm = jnp.linalg.norm(x32, axis=-1, keepdims=True) * x.shape[-1] ** -0.5
        return (x32 / jnp.maximum(norm, self.epsilon) * g[0]).astype(x.dtype)


class ConvModule(nn.Module):
    """MossFormer's convolution module: ``x + DWConv(x)`` along time, ``kernel_size`` taps
    (official 17), "same" padding, no bias."""

    kernel_size: int = 17
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        if self.kernel_size % 2 != 1:
            raise ValueError(f"ConvModule: kernel_size must be odd, got {self.kernel_size}")
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=()),
            (self.kernel_size, x.shape[-1]), self.param_dtype,
        )  # fmt: skip
        return x + fsmn_memory(x, kernel.astype(x.dtype))


class FFConvM(nn.Module):
    """MossFormer's convolution-augmented projection: norm → Dense → SiLU → `ConvModule` →
    dropout (official ``FFConvM``).

    Attributes:
      features: output width.
      norm: ``"scalenorm"`` (the MossFormer layer's) or ``"layernorm"`` (the gated FSMN's).
      kernel_size: taps of the depthwise convolution (17).
      dropout_rate: official 0.1.
    """

    features: int
    norm: str = "layernorm"
    kernel_size: int = 17
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        dtype = self.dtype or x.dtype
        if self.norm == "scalenorm":
            h = ScaleNorm(param_dtype=self.param_dtype, name="norm")(x)
        elif self.norm == "layernorm":
            h = nn.LayerNorm(1e-5, dtype=dtype, param_dtype=self.param_dtype, name="norm")(x)
        else:
            raise ValueError(f"FFConvM: norm must be 'scalenorm' or 'layernorm', got {self.norm!r}")
        h = nn.Dense(self.features, dtype=dtype, param_dtype=self.param_dtype, name="linear")(h)
        h = nn.silu(h)
        h = ConvModule(self.kernel_size, param_dtype=self.param_dtype, name="conv")(h)
        return nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class GatedFSMN(nn.Module):
    """Gated convolutional unit around the dilated FSMN (official ``Gated_FSMN_dilated``):
    ``u = FFConvM(x)``, ``v = FFConvM(x)``; ``out = v ⊙ UniDeepFsmnDilated(u) + x``.

    Attributes:
      hidden_size: width of u, v and the FSMN's projection (= the input width in MossFormer2).
      lorder: FSMN taps ``2·lorder − 1`` (20).
    """

    hidden_size: int
    lorder: int = 20
    kernel_size: int = 17
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], deterministic: bool = True) -> Array:
        _check_btc("GatedFSMN", x)
        kw = dict(norm="layernorm", kernel_size=self.kernel_size, dropout_rate=self.dropout_rate,
                  dtype=self.dtype, param_dtype=self.param_dtype)  # fmt: skip
        u = FFConvM(self.hidden_size, name="to_u", **kw)(x, deterministic)
        v = FFConvM(self.hidden_size, name="to_v", **kw)(x, deterministic)
        u = UniDeepFsmnDilated(self.hidden_size, self.lorder, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="fsmn")(u)  # fmt: skip
        return v * u + x.astype(u.dtype)


class GatedFSMNBlock(nn.Module):
    """Gated FSMN block of MossFormer2 (official ``Gated_FSMN_Block_Dilated``): 1×1 conv
    (dim → ``inner_channels``) + PReLU → LayerNorm → `GatedFSMN` → LayerNorm → 1×1 conv
    (→ dim) + residual.

    Attributes:
      inner_channels: official 256.
      lorder: FSMN taps ``2·lorder − 1`` (20).

    Example:
      >>> blk = GatedFSMNBlock(inner_channels=8, lorder=3)
      >>> x = jnp.ones((1, 10, 16))
      >>> blk.apply(blk.init(jax.random.key(0), x), x).shape
      (1, 10, 16)
    """

    inner_channels: int = 256
    lorder: int = 20
    kernel_size: int = 17
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], deterministic: bool = True) -> Array:
        _check_btc("GatedFSMNBlock", x)
        dtype = self.dtype or x.dtype
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.inner_channels, name="conv1", **kw)(x)
        h = ChannelPReLU(per_channel=False, param_dtype=self.param_dtype, name="prelu")(h)
        h = nn.LayerNorm(1e-5, name="norm1", **kw)(h)
        h = GatedFSMN(self.inner_channels, self.lorder, self.kernel_size, self.dropout_rate,
                      name="gated_fsmn", **kw)(h, deterministic)  # fmt: skip
        h = nn.LayerNorm(1e-5, name="norm2", **kw)(h)
        return nn.Dense(x.shape[-1], name="conv2", **kw)(h) + x.astype(dtype)


class OffsetScale(nn.Module):
    """Per-head ``x·γ_h + β_h`` (γ ~ N(0, 0.02²), β = 0): the cheap per-head queries and keys of
    FLASH (https://arxiv.org/abs/2202.10447) from one shared projection."""

    heads: int = 4
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, ...]:
        d = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.normal(0.02), (self.heads, d), self.param_dtype)
        beta = self.param("beta", nn.initializers.zeros, (self.heads, d), self.param_dtype)
        out = jnp.einsum("...d,hd->...hd", x, gamma.astype(x.dtype))
        out = out + beta.astype(x.dtype).reshape((1,) * (x.ndim - 1) + beta.shape)
        return tuple(out[..., h, :] for h in range(self.heads))


def rotary_embed(t: Float[Array, "B T D"], rotary_dim: int) -> Float[Array, "B T D"]:
    """Rotary position embedding on the first ``rotary_dim`` features, pairs interleaved
    ``(2i, 2i+1)``, frequencies ``10000^(−2i/rotary_dim)``, positions ``0..T−1`` (as
    ``rotary_embedding_torch.RotaryEmbedding(rotary_dim).rotate_queries_or_keys``)."""
    if rotary_dim <= 0:
        return t
    n = t.shape[-2]
    inv = 1.0 / (10000.0 ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    ang = np.repeat(np.arange(n, dtype=np.float32)[:, None] * inv[None, :], 2, axis=-1)
    cos, sin = jnp.asarray(np.cos(ang)[None], t.dtype), jnp.asarray(np.sin(ang)[None], t.dtype)
    rot, rest = t[..., :rotary_dim], t[..., rotary_dim:]
    pairs = rot.reshape(*rot.shape[:-1], rotary_dim // 2, 2)
    half = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(rot.shape)
    return jnp.concatenate([rot * cos + half * sin, rest], axis=-1)


def flash_attention_outputs(
    quad_q: Array,
    lin_q: Array,
    quad_k: Array,
    lin_k: Array,
    v: Array,
    u: Array,
    group_size: int,
    attn_dropout: Any = None,
) -> tuple[Array, Array]:
    """Non-causal FLASH mixed-chunk attention shared by two value streams ``v`` and ``u``.

    Inside each group of ``g = group_size`` frames (the sequence zero-padded to a multiple):
    ``A = ReLU(q_quad k_quadᵀ / g)²``; across the whole sequence the linear term ``q_lin ·
    (k_linᵀ v) / T``. Returns ``(A v + linear_v, A u + linear_u)`` for the ``T`` real frames
    (zero-padded keys contribute nothing: their q/k/v are exactly zero after padding).
    ``attn_dropout``, if given, maps the quadratic weights ``A`` (the official dropout site).
    """
    b, n, _ = quad_q.shape
    g = group_size
    pad = (-n) % g
    padded = [jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (quad_q, quad_k, v, u)]
    qq, qk, vv, uu = (a.reshape(b, -1, g, a.shape[-1]) for a in padded)  # [B, G, g, ·]
    sim = jnp.einsum("bgid,bgjd->bgij", qq, qk) / g
    attn = jnp.square(nn.relu(sim))  # [B, G, g, g]
    if attn_dropout is not None:
        attn = attn_dropout(attn)
    quad_v = jnp.einsum("bgij,bgjd->bgid", attn, vv).reshape(b, -1, v.shape[-1])[:, :n]
    quad_u = jnp.einsum("bgij,bgjd->bgid", attn, uu).reshape(b, -1, u.shape[-1])[:, :n]
    lin_kv = jnp.einsum("bnd,bne->bde", lin_k, v) / n  # [B, D, E]
    lin_ku = jnp.einsum("bnd,bne->bde", lin_k, u) / n
    lin_v = jnp.einsum("bnd,bde->bne", lin_q, lin_kv)
    lin_u = jnp.einsum("bnd,bde->bne", lin_q, lin_ku)
    return quad_v + lin_v, quad_u + lin_u


class MossFormerLayer(nn.Module):
    """MossFormer gated single-head attention layer (official ``FLASH_ShareA_FFConvM``,
    https://arxiv.org/abs/2312.11825; FLASH: https://arxiv.org/abs/2202.10447).

    Token shift (the first half of the channels delayed one frame), then ``v, u =
    FFConvM(x)`` (``expansion_factor·dim`` split in two) and a shared ``qk = FFConvM(x)`` turned
    into four queries/keys by `OffsetScale`, partial rotary embedding, the mixed quadratic +
    linear attention of `flash_attention_outputs` applied to both v and u, and the gated
    combination ``(att_u ⊙ v) ⊙ σ(att_v ⊙ u)`` projected back by ``FFConvM`` plus a residual.
    Unlike FLASH's GAU there is no separate gate projection: the two attended streams gate each
    other.

    Attributes:
      group_size: frames per quadratic-attention group (official 256).
      query_key_dim: shared query/key width (128).
      expansion_factor: hidden width / dim (4).
      rotary_dim: features rotated by the rotary embedding (min(32, query_key_dim)).
      shift_tokens: token shift (True).
      kernel_size: taps of the FFConvM depthwise convolutions (17).
      dropout_rate: official 0.1 (FFConvM outputs and attention weights).

    Example:
      >>> layer = MossFormerLayer(group_size=4, query_key_dim=8, rotary_dim=8)
      >>> x = jnp.ones((1, 10, 16))
      >>> layer.apply(layer.init(jax.random.key(0), x), x).shape
      (1, 10, 16)
    """

    group_size: int = 256
    query_key_dim: int = 128
    expansion_factor: float = 4.0
    rotary_dim: int = 32
    shift_tokens: bool = True
    kernel_size: int = 17
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], deterministic: bool = True) -> Array:
        _check_btc("MossFormerLayer", x)
        if self.group_size < 1:
            raise ValueError(f"MossFormerLayer: group_size must be >= 1, got {self.group_size}")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.query_key_dim:
            raise ValueError(f"MossFormerLayer: rotary_dim must be even and <= query_key_dim "
                             f"{self.query_key_dim}, got {self.rotary_dim}")  # fmt: skip
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        dim = x.shape[-1]
        hidden = int(dim * self.expansion_factor)
        if hidden % 2:
            raise ValueError(f"MossFormerLayer: dim·expansion_factor must be even, got {hidden}")
        h = x
        if self.shift_tokens:
            half = (dim + 1) // 2  # torch.chunk(2): the first chunk takes the odd channel
            shifted = jnp.pad(h[:, :-1, :half], ((0, 0), (1, 0), (0, 0)))
            h = jnp.concatenate([shifted, h[:, :, half:]], axis=-1)
        kw = dict(norm="scalenorm", kernel_size=self.kernel_size, dropout_rate=self.dropout_rate,
                  dtype=dtype, param_dtype=self.param_dtype)  # fmt: skip
        vu = FFConvM(hidden, name="to_hidden", **kw)(h, deterministic)
        v, u = vu[..., : hidden // 2], vu[..., hidden // 2 :]
        qk = FFConvM(self.query_key_dim, name="to_qk", **kw)(h, deterministic)
        quad_q, lin_q, quad_k, lin_k = OffsetScale(4, self.param_dtype, name="qk_offset_scale")(qk)
        quad_q, lin_q, quad_k, lin_k = (
            rotary_embed(t, self.rotary_dim) for t in (quad_q, lin_q, quad_k, lin_k)
        )
        drop = nn.Dropout(self.dropout_rate, name="attn_dropout")
        att_v, att_u = flash_attention_outputs(
            quad_q, lin_q, quad_k, lin_k, v, u, self.group_size,
            attn_dropout=lambda a: drop(a, deterministic=deterministic),
        )  # fmt: skip
        out = (att_u * v) * jax.nn.sigmoid(att_v * u)
        return x + FFConvM(dim, name="to_out", **kw)(out, deterministic)


class MossFormer2Block(nn.Module):
    """One MossFormer2 block (https://arxiv.org/abs/2312.11825): `MossFormerLayer` then
    `GatedFSMNBlock` (the official ``FLASHTransformer_DualA_FSMN`` loop body).

    Attributes:
      group_size, query_key_dim, expansion_factor, rotary_dim, shift_tokens: the attention
        layer's (`MossFormerLayer`).
      inner_channels, lorder: the gated FSMN block's (`GatedFSMNBlock`).
      kernel_size, dropout_rate: shared.

    Example:
      >>> blk = MossFormer2Block(group_size=4, query_key_dim=8, rotary_dim=8,
      ...                        inner_channels=8, lorder=3)
      >>> x = jnp.ones((1, 10, 16))
      >>> blk.apply(blk.init(jax.random.key(0), x), x).shape
      (1, 10, 16)
    """

    group_size: int = 256
    query_key_dim: int = 128
    expansion_factor: float = 4.0
    rotary_dim: int = 32
    shift_tokens: bool = True
    inner_channels: int = 256
    lorder: int = 20
    kernel_size: int = 17
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], deterministic: bool = True) -> Array:
        kw = dict(kernel_size=self.kernel_size, dropout_rate=self.dropout_rate, dtype=self.dtype,
                  param_dtype=self.param_dtype)  # fmt: skip
        x = MossFormerLayer(self.group_size, self.query_key_dim, self.expansion_factor,
                            self.rotary_dim, self.shift_tokens, name="flash", **kw)(
            x, deterministic
        )  # fmt: skip
        return GatedFSMNBlock(self.inner_channels, self.lorder, name="fsmn", **kw)(x, deterministic)
