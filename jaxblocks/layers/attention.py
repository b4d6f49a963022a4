"""Attention layers: SLAB's simplified linear attention.

Guo, Chen, Tang, Wang, "SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized Batch Normalization", ICML 2024, https://arxiv.org/abs/2405.11582.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.typing import Array, Float

__all__ = ["SimplifiedLinearAttention", "simplified_linear_attention"]

Dtype = Any


def _kv_first(n_q: int, n_k: int, c: int, d: int) -> bool:
    # Official cost rule: Q(KᵀV) costs c·d·(i+j), (QKᵀ)V costs i·j·(c+d) multiply-adds.
    return n_q * n_k * (c + d) > c * d * (n_q + n_k)


def simplified_linear_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B S H K"],
    v: Float[Array, "B S H V"],
    *,
    epsilon: float = 1e-6,
    order: str | None = None,
) -> Float[Array, "B T H V"]:
    """``O_i = Σ_j (q_i·k_j) v_j / (q_i·Σ_j k_j + ε)`` per head, in float32.

    ``q``, ``k`` are the already-activated (ReLU) features. ``order``: ``"kv"`` computes
    ``Q(KᵀV)`` (linear in sequence length), ``"qk"`` computes ``(QKᵀ)V``; ``None`` picks the
    cheaper by the official rule ``T·S·(K+V) > K·V·(T+S)`` ⇒ ``"kv"``. Both orders give the same
    result up to rounding. Returns float32.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"simplified_linear_attention: q, k, v must be [B, T, H, D]; got {q.shape}, "
            f"{k.shape}, {v.shape}"
        )
    if q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3] or q.shape[::2] != k.shape[::2]:
        raise ValueError(
            f"simplified_linear_attention: incompatible shapes q {q.shape}, k {k.shape}, "
            f"v {v.shape}"
        )
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if order is None:
        order = "kv" if _kv_first(q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]) else "qk"
    if order not in ("kv", "qk"):
        raise ValueError(f"simplified_linear_attention: order={order!r}; use 'kv', 'qk' or None")
    z = 1.0 / (jnp.einsum("bihc,bhc->bih", q, jnp.sum(k, axis=1)) + epsilon)  # [B, T, H]
    if order == "kv":
        kv = jnp.einsum("bjhc,bjhd->bhcd", k, v)  # [B, H, K, V]
        out = jnp.einsum("bihc,bhcd->bihd", q, kv)  # [B, T, H, V]
    else:
        qk = jnp.einsum("bihc,bjhc->bhij", q, k)  # [B, H, T, S]
        out = jnp.einsum("bhij,bjhd->bihd", qk, v)  # [B, T, H, V]
    return out * z[..., None]


class SimplifiedLinearAttention(nn.Module):
    """Simplified linear attention (SLA) — Guo et al. 2024 (SLAB), https://arxiv.org/abs/2405.11582.

    Linear attention with the plainest kernel, ReLU, plus a depth-wise convolution on V that
    restores the local detail linear attention loses:
    ``O = ReLU(Q)(ReLU(K)ᵀV) / (ReLU(Q)·Σ_j ReLU(K_j) + ε) + DWC_{k×k}(V)``, then a Dense
    projection. It costs O(N·d²) instead of O(N²·d) and needs no softmax, so on hardware it is
    faster than softmax attention and than Flatten/focused linear attention (no power kernel).
    Tokens are a ``[B, N, C]`` image grid (``spatial_shape`` = (h, w), h·w = N; inferred for a
    square grid); a learned positional encoding ``[N, C]`` (init 0) is added to K before ReLU.

    Official code (xinghaochen/SLAB ``slab_deit.py``/``slab_swin.py``): one DWC with
    ``head_dim`` channels (and a bias) shared by all heads, kernel 5; the attention computed in
    fp32 with autocast off; ε = 1e-6; the contraction order picked by cost. We follow it (the
    ``focusing_factor`` argument of the official code is unused there and omitted here). The
    official DeiT variant fixes the positional encoding to 14×14 tokens; ours takes N from the
    input at init.

    Attributes:
      num_heads: heads H (C must be divisible by H).
      qkv_bias: bias in the qkv projection.
      kernel_size: DWC kernel (odd).
      epsilon: ε of the normalizer.
      use_pos_emb: add the learned positional encoding to K.
      dtype, param_dtype: compute and parameter dtypes (the attention core runs in fp32).

    Example:
      >>> sla = SimplifiedLinearAttention(num_heads=3)
      >>> x = jnp.ones((2, 16, 48))
      >>> y = sla.apply(sla.init(jax.random.key(0), x), x)
    """

    num_heads: int
    qkv_bias: bool = True
    kernel_size: int = 5
    epsilon: float = 1e-6
    use_pos_emb: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B N C"], spatial_shape: tuple[int, int] | None = None
    ) -> Float[Array, "B N C"]:
        if x.ndim != 3:
            raise ValueError(f"SimplifiedLinearAttention: x must be [B, N, C], got {x.shape}")
        b, n, c = x.shape
        if self.num_heads <= 0 or c % self.num_heads:
            raise ValueError(
                f"SimplifiedLinearAttention: num_heads={self.num_heads} must divide C={c}"
            )
        if spatial_shape is None:
            side = int(round(n**0.5))
            if side * side != n:
                raise ValueError(
                    f"SimplifiedLinearAttention: N={n} tokens is not a square grid; pass "
                    "spatial_shape=(h, w)"
                )
            spatial_shape = (side, side)
        h, w = spatial_shape
        if h * w != n:
            raise ValueError(
                f"SimplifiedLinearAttention: spatial_shape {spatial_shape} does not have N={n} "
                "tokens"
            )
        heads, d = self.num_heads, c // self.num_heads
        dtype = self.dtype if self.dtype is not None else x.dtype
        qkv = nn.Dense(
            3 * c, use_bias=self.qkv_bias, dtype=dtype, param_dtype=self.param_dtype, name="qkv"
        )(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # [B, N, C] each
        if self.use_pos_emb:
            pos = self.param("pos_emb", nn.initializers.zeros, (n, c), self.param_dtype)
            k = k + pos[None].astype(k.dtype)
        q, k = jax.nn.relu(q), jax.nn.relu(k)
        q, k, v = (a.reshape(b, n, heads, d) for a in (q, k, v))  # [B, N, H, D]
        out = simplified_linear_attention(q, k, v, epsilon=self.epsilon).astype(dtype)
        # DWC on V: one depth-wise conv over head_dim channels, shared by the heads.
        v_img = v.transpose(0, 2, 1, 3).reshape(b * heads, h, w, d)  # [B·H, h, w, D]
        dwc = nn.Conv(
            d,
            (self.kernel_size, self.kernel_size),
            padding="SAME",
            feature_group_count=d,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="dwc",
        )(v_img)
        dwc = dwc.reshape(b, heads, n, d).transpose(0, 2, 1, 3)  # [B, N, H, D]
        out = (out + dwc).reshape(b, n, c)
        return nn.Dense(c, dtype=dtype, param_dtype=self.param_dtype, name="proj")(out)
