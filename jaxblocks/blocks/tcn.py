"""Temporal convolution networks: the dilated causal TCN and TCNCA (TCN + chunked attention).

Bai, Kolter, Koltun, "An Empirical Evaluation of Generic Convolutional and Recurrent Networks
for Sequence Modeling", 2018, https://arxiv.org/abs/1803.01271 (the TCN);
Terzić et al., "TCNCA: Temporal Convolution Network with Chunked Attention for Scalable
Sequence Processing", NeurIPS 2023 ENLSP workshop, https://arxiv.org/abs/2312.05605 (TCNCA).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.typing import Array, Float

__all__ = ["TCN", "TCNCA", "TemporalBlock", "chunked_attention", "tcn_receptive_field"]

Dtype = Any


def tcn_receptive_field(kernel_size: int, num_levels: int, convs_per_level: int = 2) -> int:
    """Inputs seen by one output: ``1 + convs·(k − 1)·(2^levels − 1)`` (dilations 1, 2, 4, …)."""
    return 1 + convs_per_level * (kernel_size - 1) * (2**num_levels - 1)


class TemporalBlock(nn.Module):
    """One TCN level: two dilated causal convolutions with ReLU and dropout, plus a residual.

    ``out = ReLU(x' + conv(dropout(ReLU(conv(x)))) …)`` as in Bai et al.; the residual is a 1×1
    convolution when the width changes. Weight normalisation of the original is omitted.
    ``depthwise`` makes the convolutions per channel (``feature_group_count = C``), the form that
    replaces MEGA's per-channel EMA in TCNCA.
    """

    features: int
    kernel_size: int
    dilation: int
    dropout: float = 0.0
    depthwise: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], *, train: bool = False) -> Float[Array, "B T F"]:
        dtype = self.dtype or x.dtype
        groups = self.features if self.depthwise else 1
        if self.depthwise and x.shape[-1] != self.features:
            raise ValueError(
                f"TemporalBlock: depthwise needs in == out features, got {x.shape[-1]} -> "
                f"{self.features}"
            )
        conv = functools.partial(
            nn.Conv,
            self.features,
            (self.kernel_size,),
            kernel_dilation=(self.dilation,),
            # Causal: all the padding on the left, so output t sees inputs ≤ t only.
            padding=(((self.kernel_size - 1) * self.dilation, 0),),
            feature_group_count=groups,
            dtype=dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(0.01),  # the paper's N(0, 0.01) init
        )
        y = x.astype(dtype)
        for i in range(2):
            y = conv(name=f"conv{i + 1}")(y)
            y = nn.Dropout(self.dropout)(nn.relu(y), deterministic=not train)
        res = x.astype(dtype)
        if x.shape[-1] != self.features:
            res = nn.Dense(
                self.features, dtype=dtype, param_dtype=self.param_dtype, name="downsample"
            )(res)
        return nn.relu(y + res)


class TCN(nn.Module):
    """Temporal Convolution Network — Bai et al. 2018, https://arxiv.org/abs/1803.01271.

    A stack of `TemporalBlock` levels with dilations 1, 2, 4, …, 2^(n−1): the receptive field
    (`tcn_receptive_field`) grows exponentially with depth at O(T) cost, and the network is
    strictly causal (output t never depends on inputs after t). Input/output ``[B, T, C]``.

    Attributes:
      features: width of every level (one int per level, or an int with ``num_levels``).
      kernel_size: taps per convolution. num_levels: levels when ``features`` is an int.
      dropout, depthwise: see `TemporalBlock`.

    Example:
      >>> tcn = TCN(features=16, num_levels=3, kernel_size=3)
      >>> x = jnp.ones((2, 50, 4)); params = tcn.init(jax.random.key(0), x)
      >>> tcn.apply(params, x).shape
      (2, 50, 16)
    """

    features: int | tuple[int, ...]
    kernel_size: int = 3
    num_levels: int = 4
    dropout: float = 0.0
    depthwise: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def widths(self) -> tuple[int, ...]:
        if isinstance(self.features, int):
            return (self.features,) * self.num_levels
        return tuple(self.features)

    @property
    def receptive_field(self) -> int:
        return tcn_receptive_field(self.kernel_size, len(self.widths))

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], *, train: bool = False) -> Float[Array, "B T F"]:
        if x.ndim != 3:
            raise ValueError(f"TCN: x must be [B, T, C], got shape {x.shape}")
        for i, f in enumerate(self.widths):
            x = TemporalBlock(
                f,
                self.kernel_size,
                2**i,
                self.dropout,
                self.depthwise,
                self.dtype,
                self.param_dtype,
                name=f"level{i}",
            )(x, train=train)
        return x


def chunked_attention(q, k, v, chunk_size: int, *, causal: bool = True):
    """Softmax attention within consecutive chunks of ``chunk_size`` tokens (fp32 softmax).

    q, k: [B, T, Z], v: [B, T, V]. Tokens attend only inside their own chunk (causally when
    ``causal``), so the cost is O(T·chunk) rather than O(T²). T is padded to a chunk multiple;
    padded keys are masked.
    """
    B, T, Z = q.shape
    n = -(-T // chunk_size)
    pad = n * chunk_size - T
    padf = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk_size, a.shape[-1])
    qc, kc, vc = padf(q), padf(k), padf(v)  # [B, n, c, ·]
    s = jnp.einsum("bnqz,bnkz->bnqk", qc, kc, preferred_element_type=jnp.float32)
    s = s / jnp.sqrt(jnp.float32(Z))  # [B, n, c, c]
    pos = jnp.arange(n * chunk_size).reshape(n, chunk_size)  # [n, c]
    mask = (pos < T)[:, None, :]  # [n, 1, c] real keys
    if causal:
        mask = mask & (pos[:, None, :] <= pos[:, :, None])  # [n, c, c]
    s = jnp.where(mask[None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bnqk,bnkv->bnqv", p.astype(v.dtype), vc)  # [B, n, c, V]
    return o.reshape(B, n * chunk_size, -1)[:, :T]


class TCNCA(nn.Module):
    """TCNCA block — Terzić et al. 2023, https://arxiv.org/abs/2312.05605.

    MEGA's moving-average gated attention with the EMA (an FFT-computed linear recurrence in
    MEGA) replaced by a dilated causal `TCN`, followed by attention within fixed-size chunks
    (MEGA-chunk): O(T) in length with a receptive field set by the TCN's depth. With X the
    normalised input,

        X' = SiLU(TCN(X));  Z = SiLU(W_z X');  Q = Z ⊙ γ_q + β_q;  K = Z ⊙ γ_k + β_k
        V = SiLU(W_v X);    R = SiLU(W_r X');   O = ChunkAttn(Q, K, V)
        H = SiLU(W_h X' + U_h (R ⊙ O));  φ = σ(W_φ X');  Y = x + φ ⊙ (H − x)

    (MEGA's gated update ``φ ⊙ H + (1 − φ) ⊙ x``; single head; no code of the paper was found,
    so the layout follows MEGA with the TCN in the EMA's place).

    Attributes:
      z_dim: shared Q/K width. v_dim: value width (default 2·C as MEGA).
      chunk_size: attention chunk. tcn_levels / tcn_kernel_size: TCN depth and taps
        (depthwise, C channels). causal: causal chunks.
    """

    z_dim: int = 64
    v_dim: int | None = None
    chunk_size: int = 128
    tcn_levels: int = 4
    tcn_kernel_size: int = 3
    causal: bool = True
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], *, train: bool = False) -> Float[Array, "B T C"]:
        if x.ndim != 3:
            raise ValueError(f"TCNCA: x must be [B, T, C], got shape {x.shape}")
        C = x.shape[-1]
        dtype = self.dtype or x.dtype
        dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=self.param_dtype)
        xn = nn.LayerNorm(dtype=dtype, param_dtype=self.param_dtype, name="norm")(x)
        xs = TCN(
            C,
            self.tcn_kernel_size,
            self.tcn_levels,
            depthwise=True,
            dtype=dtype,
            param_dtype=self.param_dtype,
            name="tcn",
        )(xn, train=train)
        xs = nn.silu(xs)
        z = nn.silu(dense(self.z_dim, name="W_z")(xs))
        gamma = self.param("gamma", nn.initializers.normal(0.02), (2, self.z_dim), self.param_dtype)
        beta = self.param("beta", nn.initializers.zeros, (2, self.z_dim), self.param_dtype)
        q = z * gamma[0].astype(dtype)[None, None] + beta[0].astype(dtype)[None, None]
        k = z * gamma[1].astype(dtype)[None, None] + beta[1].astype(dtype)[None, None]
        v_dim = self.v_dim or 2 * C
        v = nn.silu(dense(v_dim, name="W_v")(xn))
        r = nn.silu(dense(v_dim, name="W_r")(xs))
        o = chunked_attention(q, k, v, self.chunk_size, causal=self.causal).astype(dtype)
        o = nn.Dropout(self.dropout)(o, deterministic=not train)
        h = nn.silu(dense(C, name="W_h")(xs) + dense(C, use_bias=False, name="U_h")(r * o))
        phi = nn.sigmoid(dense(C, name="W_phi")(xs))
        x = x.astype(dtype)
        return x + phi * (h - x)
