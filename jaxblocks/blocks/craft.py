"""CRAFT blocks: SRWAB, HFERB, HFB and the cross-refinement group they form.

Li et al., "Feature Modulation Transformer: Cross-Refinement of Global Representation via
High-Frequency Prior for Image Super-Resolution" (CRAFT), ICCV 2023,
https://arxiv.org/abs/2308.05022. Official code: AVC2-UESTC/CRAFT-SR
``basicsr/archs/craft_arch.py`` (the oracle of the tests, rebuilt in torch on the same weights).

A CRAFT unit runs two branches on the same features ``x`` and fuses them:

- low (global): two `SRWAB` (shift rectangle-window attention blocks, the second shifted). Half
  of the heads attend inside ``4 × 16`` windows (H-Rwin), the other half inside ``16 × 4``
  windows (V-Rwin), with a dynamic position bias (an MLP of the relative offsets, CrossFormer)
  and a locality complementary module (LePE-style depthwise 3×3 conv of V added to the output);
- high (local): `HFERB`, a 3×3 conv on half of the channels and max-pool → 1×1 (high-frequency
  enhancement) on the other half, fused by a 1×1 conv and a residual;
- `HFB` fuses them: channel-wise ("transposed", Restormer) inter-attention whose queries come
  from the high-frequency branch and keys/values from the low one, then a GDFN feed-forward.

Channels-last ``[B, H, W, C]`` throughout. Parameter names follow the official modules
(``norm1``, ``qkv``, ``proj``, ``get_v``, ``attns_0/pos_proj``, ``mlp/fc1``; ``conv``, ``fc``,
``last_fc``; ``attn/q_dwconv``, ``ffn/project_in``) so a state dict maps by name.

Faithful to the official code, including two things that differ from Swin-style blocks:
shifted windows are *not* masked (the official passes ``attn_mask=None``, so a shifted window
that wraps around attends across the image border), and the dynamic position bias MLP is
``dim // 32`` wide (``DynamicPosBias(dim // 2 // 4)`` divides by 4 again), one unit at dim 48.
Initialisation follows the official ``_init_weights``: Linear weights truncated normal
(std 0.02; Flax truncates at ±2 std where torch's default bounds ±2 are absolute, i.e. no
truncation at this std), biases 0, LayerNorm 1/0; convolutions keep torch's default
``U(±1/√fan_in)`` weights, but their biases start at 0 (a Flax bias initialiser does not see
the fan-in). The attention temperatures start at 1.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.typing import Array, Float

__all__ = [
    "CRFB",
    "GDFN",
    "HFB",
    "HFERB",
    "RCRFG",
    "SRWAB",
    "DynamicPosBias",
    "InterAttention",
    "img2windows",
    "rect_window_attention",
    "relative_position_tables",
    "windows2img",
]

Dtype = Any

DENSE_INIT = nn.initializers.truncated_normal(stddev=0.02)
# torch's default conv weight init, kaiming_uniform(a=√5) = U(±1/√fan_in).
CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
LN_EPS = 1e-5  # nn.LayerNorm's default and the official WithBias_LayerNorm's


def _dtype(dtype: Dtype | None, x: Array) -> Dtype:
    if dtype is not None:
        return dtype
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def _check_nhwc(where: str, x: Array, channels: int) -> None:
    if getattr(x, "ndim", None) != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{where}: x must be [B, H, W, C] with C={channels}, got shape {getattr(x, 'shape', x)}"
        )


def img2windows(x: Float[Array, "B H W C"], hs: int, ws: int) -> Float[Array, "BW N C"]:
    """``[B, H, W, C] -> [B·nW, hs·ws, C]``: non-overlapping ``hs × ws`` windows, row-major over
    the window grid (the official ``img2windows``)."""
    b, h, w, c = x.shape
    if h % hs or w % ws:
        raise ValueError(f"img2windows: x of shape {x.shape} not divisible into {hs}×{ws} windows")
    x = x.reshape(b, h // hs, hs, w // ws, ws, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/hs, W/ws, hs, ws, C]
    return x.reshape(-1, hs * ws, c)


def windows2img(x: Float[Array, "BW N C"], hs: int, ws: int, h: int, w: int) -> Array:
    """The inverse of `img2windows`: ``[B·nW, hs·ws, C] -> [B, H, W, C]``."""
    n_win = (h // hs) * (w // ws)
    if x.ndim != 3 or x.shape[1] != hs * ws or x.shape[0] % n_win:
        raise ValueError(
            f"windows2img: x must be [B·{n_win}, {hs * ws}, C] for {hs}×{ws} windows of a "
            f"{h}×{w} image, got shape {x.shape}"
        )
    c = x.shape[-1]
    x = x.reshape(-1, h // hs, w // ws, hs, ws, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/hs, hs, W/ws, ws, C]
    return x.reshape(-1, h, w, c)


def relative_position_tables(hs: int, ws: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets ``[(2hs−1)(2ws−1), 2]`` float32, index ``[hs·ws, hs·ws]`` int32) of an
    ``hs × ws`` window: every relative offset (dh, dw), and for each query/key pair the row of its
    offset (the official ``calculate_rpi_v_sa``)."""
    dh, dw = np.meshgrid(np.arange(1 - hs, hs), np.arange(1 - ws, ws), indexing="ij")
    offsets = np.stack([dh.ravel(), dw.ravel()], axis=1).astype(np.float32)
    ch, cw = np.meshgrid(np.arange(hs), np.arange(ws), indexing="ij")
    coords = np.stack([ch.ravel(), cw.ravel()])  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]: query − key
    index = (rel[0] + hs - 1) * (2 * ws - 1) + rel[1] + ws - 1
    return offsets, index.astype(np.int32)


def rect_window_attention(
    q: Float[Array, "B H W C"],
    k: Float[Array, "B H W C"],
    v: Float[Array, "B H W C"],
    bias: Float[Array, "heads N N"],
    window: tuple[int, int],
    num_heads: int,
    scale: float,
) -> Float[Array, "B H W C"]:
    """Multi-head self-attention inside non-overlapping ``window = (hs, ws)`` rectangles plus
    a per-head ``[N, N]`` position bias (N = hs·ws); heads split C head-major. Logits and softmax
    in fp32. Returns the image ``[B, H, W, C]`` (the official ``Attention_regular`` without
    the mask, which CRAFT never passes)."""
    hs, ws = window
    b, h, w, c = q.shape
    if c % num_heads:
        raise ValueError(f"rect_window_attention: channels {c} not divisible by {num_heads} heads")
    if bias.shape != (num_heads, hs * ws, hs * ws):
        raise ValueError(
            f"rect_window_attention: bias must be [{num_heads}, {hs * ws}, {hs * ws}], got "
            f"shape {bias.shape}"
        )

    def heads(t):
        t = img2windows(t, hs, ws)  # [B·nW, N, C]
        return t.reshape(t.shape[0], hs * ws, num_heads, c // num_heads)  # [B·nW, N, h, D]

    qw, kw, vw = heads(q * scale), heads(k), heads(v)
    logits = jnp.einsum("bnhd,bmhd->bhnm", qw, kw, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits + bias[None].astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhnm,bmhd->bnhd", attn, vw)  # [B·nW, N, h, D]
    return windows2img(out.reshape(-1, hs * ws, c), hs, ws, h, w)


class DynamicPosBias(nn.Module):
    """Dynamic relative position bias (CrossFormer, https://arxiv.org/abs/2108.00154): an MLP
    ``Linear(2→d) → [LN → ReLU → Linear] ×3`` maps each relative offset (dh, dw) to one bias per
    head, so the table adapts to any window shape (the official, ``residual=False``).

    Attributes:
      pos_dim: hidden width d.
      num_heads: outputs per offset.
    """

    pos_dim: int
    num_heads: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, offsets: Float[Array, "R 2"]) -> Float[Array, "R heads"]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.pos_dim, kernel_init=DENSE_INIT, name="pos_proj", **kw)(offsets)
        for i, out in enumerate((self.pos_dim, self.pos_dim, self.num_heads)):
            x = nn.LayerNorm(LN_EPS, use_fast_variance=False, name=f"pos{i + 1}_norm", **kw)(x)
            x = nn.Dense(out, kernel_init=DENSE_INIT, name=f"pos{i + 1}_fc", **kw)(nn.relu(x))
        return x


class SRWAB(nn.Module):
    """Shift rectangle-window attention block of CRAFT (https://arxiv.org/abs/2308.05022).

    ``x + proj(concat[H-Rwin(q,k,v)[:C/2], V-Rwin(q,k,v)[C/2:]] + DWConv3×3(v))`` then
    ``x + MLP(LN(x))``. Unlike Swin's square windows, the two halves of the heads use transposed
    rectangles, ``split_size = (hs, ws)`` and ``(ws, hs)``, each with its own `DynamicPosBias`;
    ``shift=True`` rolls each half by half its window (CAT's shifted rectangle windows), with
    no attention mask, as the official.

    Attributes:
      dim: channels C (even; ``dim // 32 >= 1`` for the position-bias MLP).
      num_heads: heads of both halves together (even).
      split_size: the H-Rwin window (hs, ws); H and W must be multiples of both.
      shift: roll the windows by half their size (the second block of each pair).
      mlp_ratio: MLP hidden width over C.
      qkv_bias: bias of the qkv projection.

    Example:
      >>> blk = SRWAB(dim=32, num_heads=2, split_size=(2, 4), shift=True)
      >>> x = jnp.ones((1, 8, 8, 32))
      >>> blk.apply(blk.init(jax.random.key(0), x), x).shape
      (1, 8, 8, 32)
    """

    dim: int
    num_heads: int
    split_size: tuple[int, int] = (4, 16)
    shift: bool = False
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _validate(self, x: Array) -> None:
        _check_nhwc("SRWAB", x, self.dim)
        if self.dim % 2 or self.num_heads % 2 or (self.dim // 2) % (self.num_heads // 2):
            raise ValueError(
                f"SRWAB: dim={self.dim} and num_heads={self.num_heads} must be even and dim/2 "
                f"divisible by num_heads/2"
            )
        if self.dim // 32 < 1:
            raise ValueError(f"SRWAB: dim={self.dim} < 32 leaves the position-bias MLP no units")
        m = math.lcm(*self.split_size)
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(
                f"SRWAB: x of shape {x.shape}: H and W must be multiples of {m} (the windows "
                f"{tuple(self.split_size)} and their transpose); pad the image first"
            )

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        self._validate(x)
        dtype = _dtype(self.dtype, x)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        x = x.astype(dtype)
        c, half, heads = self.dim, self.dim // 2, self.num_heads // 2
        y = nn.LayerNorm(LN_EPS, use_fast_variance=False, name="norm1", **kw)(x)
        qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, kernel_init=DENSE_INIT, name="qkv", **kw)(y)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # the official reshape(b, l, 3, c)
        hs, ws = self.split_size
        outs = []
        # H-Rwin on channels [0, C/2) with (hs, ws) windows; V-Rwin on [C/2, C) with (ws, hs).
        for i, window in enumerate(((hs, ws), (ws, hs))):
            part = [t[..., i * half : (i + 1) * half] for t in (q, k, v)]
            shift = (window[0] // 2, window[1] // 2) if self.shift else (0, 0)
            if self.shift:
                part = [jnp.roll(t, (-shift[0], -shift[1]), axis=(1, 2)) for t in part]
            offsets, index = relative_position_tables(*window)
            pos = DynamicPosBias(half // 4 // 4, heads, name=f"attns_{i}", **kw)(
                jnp.asarray(offsets, dtype)
            )  # [R, heads]
            n = window[0] * window[1]
            bias = pos[index.reshape(-1)].reshape(n, n, heads).transpose(2, 0, 1)
            o = rect_window_attention(*part, bias, window, heads, (half // heads) ** -0.5)
            outs.append(jnp.roll(o, shift, axis=(1, 2)) if self.shift else o)
        # Locality complementary module: depthwise 3×3 conv of the unshifted V.
        lcm = nn.Conv(c, (3, 3), padding=1, feature_group_count=c, kernel_init=CONV_INIT,
                      name="get_v", **kw)(v)  # fmt: skip
        att = nn.Dense(c, kernel_init=DENSE_INIT, name="proj", **kw)(
            jnp.concatenate(outs, axis=-1) + lcm
        )
        x = x + att
        y = nn.LayerNorm(LN_EPS, use_fast_variance=False, name="norm2", **kw)(x)
        y = nn.Dense(int(c * self.mlp_ratio), kernel_init=DENSE_INIT, name="mlp_fc1", **kw)(y)
        y = nn.Dense(c, kernel_init=DENSE_INIT, name="mlp_fc2", **kw)(nn.gelu(y, approximate=False))
        return x + y


class HFERB(nn.Module):
    """High-frequency enhancement residual block of CRAFT (https://arxiv.org/abs/2308.05022).

    ``x + Conv1×1(concat[GELU(Conv3×3(x[:C/2])), GELU(Conv1×1(MaxPool3×3(x[C/2:])))])``: the
    max-pool branch keeps local extrema (edges, texture), which attention alone reconstructs
    poorly. Max-pool padding is −∞, as torch's.

    Attributes:
      dim: channels C (even).

    Example:
      >>> blk = HFERB(dim=8)
      >>> x = jnp.ones((1, 5, 5, 8))
      >>> blk.apply(blk.init(jax.random.key(0), x), x).shape
      (1, 5, 5, 8)
    """

    dim: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        _check_nhwc("HFERB", x, self.dim)
        if self.dim % 2:
            raise ValueError(f"HFERB: dim={self.dim} must be even")
        dtype = _dtype(self.dtype, x)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype, kernel_init=CONV_INIT)
        x = x.astype(dtype)
        mid = self.dim // 2
        lfe = nn.gelu(nn.Conv(mid, (3, 3), padding=1, name="conv", **kw)(x[..., :mid]), False)
        pooled = nn.max_pool(x[..., mid:], (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        hfe = nn.gelu(nn.Conv(mid, (1, 1), name="fc", **kw)(pooled), approximate=False)
        y = jnp.concatenate([lfe, hfe], axis=-1)
        return x + nn.Conv(self.dim, (1, 1), name="last_fc", **kw)(y)


def _transposed_attention(q: Array, k: Array, v: Array, temperature: Array, heads: int) -> Array:
    """Channel ("transposed") attention of Restormer: per head, the ``[c, c]`` softmax of
    L2-normalised (over space) q·kᵀ times the head's temperature, applied to v. All ``[B, H, W,
    C]``; statistics in fp32."""
    b, h, w, c = q.shape

    def split(t):  # [B, heads, c, HW], channels head-major
        return t.reshape(b, h * w, heads, c // heads).transpose(0, 2, 3, 1)

    def normalize(t):  # torch F.normalize: t / max(‖t‖, 1e-12)
        t = t.astype(jnp.float32)
        return t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)

    qh, kh, vh = normalize(split(q)), normalize(split(k)), split(v)
    logits = jnp.einsum("bhcn,bhdn->bhcd", qh, kh) * temperature.astype(jnp.float32)[None]
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhcd,bhdn->bhcn", attn, vh)  # [B, heads, c, HW]
    return out.transpose(0, 3, 1, 2).reshape(b, h, w, c)


class InterAttention(nn.Module):
    """High-frequency-prior query inter-attention of CRAFT's HFB: queries from the
    high-frequency map, keys and values from the (normalised) low-frequency map, each projected
    by a 1×1 then a depthwise 3×3 conv (no biases), channel-wise attention with a learnable
    per-head temperature (Restormer's MDTA across two inputs), 1×1 output projection.

    Attributes:
      dim: channels C.
      num_heads: heads (C divisible by it).
      use_bias: biases of the convolutions (False in CRAFT).
    """

    dim: int
    num_heads: int
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, low: Float[Array, "B H W C"], high: Float[Array, "B H W C"]
    ) -> Float[Array, "B H W C"]:
        _check_nhwc("InterAttention (low)", low, self.dim)
        if high.shape != low.shape:
            raise ValueError(f"InterAttention: high {high.shape} must match low {low.shape}")
        if self.dim % self.num_heads:
            raise ValueError(f"InterAttention: dim={self.dim} not divisible by {self.num_heads}")
        dtype = _dtype(self.dtype, low)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype, use_bias=self.use_bias,
                  kernel_init=CONV_INIT)  # fmt: skip
        c = self.dim
        temperature = self.param(
            "temperature", nn.initializers.ones, (self.num_heads, 1, 1), self.param_dtype
        )
        q = nn.Conv(c, (1, 1), name="q", **kw)(high.astype(dtype))
        q = nn.Conv(c, (3, 3), padding=1, feature_group_count=c, name="q_dwconv", **kw)(q)
        kv = nn.Conv(2 * c, (1, 1), name="kv", **kw)(low.astype(dtype))
        kv = nn.Conv(2 * c, (3, 3), padding=1, feature_group_count=2 * c, name="kv_dwconv",
                     **kw)(kv)  # fmt: skip
        k, v = jnp.split(kv, 2, axis=-1)
        out = _transposed_attention(q, k, v, temperature, self.num_heads)
        return nn.Conv(c, (1, 1), name="project_out", **kw)(out)


class GDFN(nn.Module):
    """Gated-Dconv feed-forward network (Restormer, https://arxiv.org/abs/2111.09881):
    1×1 → 2·⌊C·ratio⌋ → DW3×3 → GELU(first half) ⊙ second half → 1×1 → C, no biases in CRAFT.

    Attributes:
      dim: channels C.
      expansion_factor: hidden width over C (2.66 in CRAFT: ⌊48·2.66⌋ = 127).
      use_bias: biases of the convolutions.
    """

    dim: int
    expansion_factor: float = 2.66
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        _check_nhwc("GDFN", x, self.dim)
        dtype = _dtype(self.dtype, x)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype, use_bias=self.use_bias,
                  kernel_init=CONV_INIT)  # fmt: skip
        hidden = int(self.dim * self.expansion_factor)
        x = nn.Conv(2 * hidden, (1, 1), name="project_in", **kw)(x.astype(dtype))
        x = nn.Conv(2 * hidden, (3, 3), padding=1, feature_group_count=2 * hidden,
                    name="dwconv", **kw)(x)  # fmt: skip
        x1, x2 = jnp.split(x, 2, axis=-1)
        return nn.Conv(self.dim, (1, 1), name="project_out", **kw)(nn.gelu(x1, False) * x2)


class HFB(nn.Module):
    """Hybrid fusion block of CRAFT (https://arxiv.org/abs/2308.05022):
    ``x = low + InterAttention(LN(low), high)``, then ``x + GDFN(LN(x))``.

    Attributes:
      dim: channels C.
      num_heads: inter-attention heads.
      ffn_expansion_factor: GDFN hidden width over C.

    Example:
      >>> blk = HFB(dim=8, num_heads=2)
      >>> x = jnp.ones((1, 4, 4, 8))
      >>> blk.apply(blk.init(jax.random.key(0), x, x), x, x).shape
      (1, 4, 4, 8)
    """

    dim: int
    num_heads: int
    ffn_expansion_factor: float = 2.66
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, low: Float[Array, "B H W C"], high: Float[Array, "B H W C"]
    ) -> Float[Array, "B H W C"]:
        _check_nhwc("HFB", low, self.dim)
        dtype = _dtype(self.dtype, low)
        kw = dict(dtype=dtype, param_dtype=self.param_dtype)
        low = low.astype(dtype)
        y = nn.LayerNorm(LN_EPS, use_fast_variance=False, name="norm1", **kw)(low)
        x = low + InterAttention(self.dim, self.num_heads, name="attn", **kw)(y, high)
        y = nn.LayerNorm(LN_EPS, use_fast_variance=False, name="norm2", **kw)(x)
        return x + GDFN(self.dim, self.ffn_expansion_factor, name="ffn", **kw)(y)


class CRFB(nn.Module):
    """Cross-refinement fusion block of CRAFT: ``depth`` units of
    ``x = HFB(SRWAB_shifted(SRWAB(x)), HFERB(x))``.

    Attributes:
      dim, num_heads, split_size, mlp_ratio, qkv_bias: see `SRWAB` (``num_heads`` also sets
        the HFB heads).
      depth: units.
      ffn_expansion_factor: see `HFB`.
    """

    dim: int
    depth: int
    num_heads: int
    split_size: tuple[int, int] = (4, 16)
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    ffn_expansion_factor: float = 2.66
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        srwab = dict(dim=self.dim, num_heads=self.num_heads, split_size=tuple(self.split_size),
                     mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, **kw)  # fmt: skip
        for i in range(self.depth):
            low = SRWAB(shift=False, name=f"srwa_blocks_{2 * i}", **srwab)(x)
            low = SRWAB(shift=True, name=f"srwa_blocks_{2 * i + 1}", **srwab)(low)
            high = HFERB(self.dim, name=f"hfer_blocks_{i}", **kw)(x)
            x = HFB(self.dim, self.num_heads, self.ffn_expansion_factor, name=f"hf_blocks_{i}",
                    **kw)(low, high)  # fmt: skip
        return x


class RCRFG(nn.Module):
    """Residual cross-refinement fusion group of CRAFT: ``x + Conv3×3(CRFB(x))``.

    Attributes: as `CRFB`.

    Example:
      >>> grp = RCRFG(dim=32, depth=1, num_heads=2, split_size=(2, 4))
      >>> x = jnp.ones((1, 8, 8, 32))
      >>> grp.apply(grp.init(jax.random.key(0), x), x).shape
      (1, 8, 8, 32)
    """

    dim: int
    depth: int
    num_heads: int
    split_size: tuple[int, int] = (4, 16)
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    ffn_expansion_factor: float = 2.66
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H W C"]:
        _check_nhwc("RCRFG", x, self.dim)
        dtype = _dtype(self.dtype, x)
        x = x.astype(dtype)
        y = CRFB(self.dim, self.depth, self.num_heads, tuple(self.split_size), self.mlp_ratio,
                 self.qkv_bias, self.ffn_expansion_factor, dtype=dtype,
                 param_dtype=self.param_dtype, name="residual_group")(x)  # fmt: skip
        y = nn.Conv(self.dim, (3, 3), padding=1, kernel_init=CONV_INIT, dtype=dtype,
                    param_dtype=self.param_dtype, name="conv")(y)  # fmt: skip
        return x + y
