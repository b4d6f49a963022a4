"""Temporal convolution networks: the dilated causal TCN and TCNCA (TCN + chunked attention).

Bai, Kolter, Koltun, "An Empirical Evaluation of Generic Convolutional and Recurrent Networks
for Sequence Modeling", 2018, https://arxiv.org/abs/1803.01271 (the TCN);
Terzić et al., "TCNCA: Temporal Convolution Network with Chunked Attention for Scalable
Sequence Processing", NeurIPS 2023 ENLSP workshop, https://arxiv.org/abs/2312.05605 (TCNCA),
built on MEGA (Ma et al., https://arxiv.org/abs/2209.10655, facebookresearch/mega).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.typing import Array, Float

__all__ = [
    "TCN",
    "CausalDepthwiseConv",
    "TCNCA",
    "NormalizedFeedForward",
    "TemporalBlock",
    "chunked_attention",
    "simple_relative_position_bias",
    "tcn_receptive_field",
]

Dtype = Any

ATTENTION_ACTIVATIONS = ("softmax", "laplace", "relu2")
# MEGA's `utils.laplace` constants: μ = √½, σ = 1/(2√π) (Ma et al., 2022, appendix).
_LAPLACE_MU, _LAPLACE_SIGMA = 0.707107, 0.282095


def tcn_receptive_field(kernel_size: int, num_levels: int, convs_per_level: int = 2) -> int:
    """Inputs seen by one output: ``1 + convs·(k − 1)·(2^levels − 1)`` (dilations 1, 2, 4, …)."""
    return 1 + convs_per_level * (kernel_size - 1) * (2**num_levels - 1)


class CausalDepthwiseConv(nn.Module):
    """Dilated causal per-channel convolution as k shifted multiply-adds.

    ``y[t, c] = b[c] + Σ_i w[i, 0, c] · x[t − (k − 1 − i)·d, c]`` (zeros before the start), the
    parameters laid out as `flax.linen.Conv` with ``feature_group_count = C`` (kernel
    [k, 1, C], bias [C]), so the two are interchangeable. XLA fuses the shifted sum into one
    elementwise pass; its grouped convolution is ~40× slower on CPU.
    """

    kernel_size: int
    dilation: int
    kernel_init: Callable = nn.initializers.normal(0.01)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        B, T, C = x.shape
        k, d = self.kernel_size, self.dilation
        dtype = self.dtype or x.dtype
        w = self.param("kernel", self.kernel_init, (k, 1, C), self.param_dtype).astype(dtype)
        b = self.param("bias", nn.initializers.zeros, (C,), self.param_dtype).astype(dtype)
        xp = jnp.pad(x.astype(dtype), ((0, 0), ((k - 1) * d, 0), (0, 0)))  # [B, T + (k−1)d, C]
        y = jnp.broadcast_to(b[None, None], (B, T, C))
        for i in range(k):  # tap i reads the input (k − 1 − i)·d steps back
            y = y + w[i, 0][None, None] * xp[:, i * d : i * d + T]
        return y


class TemporalBlock(nn.Module):
    """One TCN level: two dilated causal convolutions with ReLU and dropout, plus a residual.

    ``out = ReLU(x' + dropout(ReLU(conv(dropout(ReLU(conv(x)))))))`` as in Bai et al.; the
    residual x' is a 1×1 convolution when the width changes. Weight normalisation of the
    original is omitted. ``depthwise`` makes the convolutions per channel
    (``feature_group_count = C``), the form that replaces MEGA's per-channel EMA in TCNCA.
    ``linear_output`` drops the ReLU after the second convolution and after the residual sum
    (``out = x' + dropout(conv(…))``), so the level's output can be negative: TCNCA's last level,
    whose output feeds ``SiLU(TCN(x) + ω ⊙ x)``.
    """

    features: int
    kernel_size: int
    dilation: int
    dropout: float = 0.0
    depthwise: bool = False
    linear_output: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], *, train: bool = False) -> Float[Array, "B T F"]:
        dtype = self.dtype or x.dtype
        if self.depthwise and x.shape[-1] != self.features:
            raise ValueError(
                f"TemporalBlock: depthwise needs in == out features, got {x.shape[-1]} -> "
                f"{self.features}"
            )
        init = nn.initializers.normal(0.01)  # the paper's N(0, 0.01) init
        if self.depthwise:  # same parameters as nn.Conv(feature_group_count=C), fast everywhere
            conv = functools.partial(
                CausalDepthwiseConv,
                self.kernel_size,
                self.dilation,
                init,
                dtype=dtype,
                param_dtype=self.param_dtype,
            )
        else:
            conv = functools.partial(
                nn.Conv,
                self.features,
                (self.kernel_size,),
                kernel_dilation=(self.dilation,),
                # Causal: all the padding on the left, so output t sees inputs ≤ t only.
                padding=(((self.kernel_size - 1) * self.dilation, 0),),
                dtype=dtype,
                param_dtype=self.param_dtype,
                kernel_init=init,
            )
        y = x.astype(dtype)
        for i in range(2):
            y = conv(name=f"conv{i + 1}")(y)
            if not (self.linear_output and i == 1):
                y = nn.relu(y)
            y = nn.Dropout(self.dropout)(y, deterministic=not train)
        res = x.astype(dtype)
        if x.shape[-1] != self.features:
            res = nn.Dense(
                self.features, dtype=dtype, param_dtype=self.param_dtype, name="downsample"
            )(res)
        return y + res if self.linear_output else nn.relu(y + res)


class TCN(nn.Module):
    """Temporal Convolution Network — Bai et al. 2018, https://arxiv.org/abs/1803.01271.

    A stack of `TemporalBlock` levels with dilations 1, 2, 4, …, 2^(n−1): the receptive field
    (`tcn_receptive_field`) grows exponentially with depth at O(T) cost, and the network is
    strictly causal (output t never depends on inputs after t). Input/output ``[B, T, C]``.

    Attributes:
      features: width of every level (one int per level, or an int with ``num_levels``).
      kernel_size: taps per convolution. num_levels: levels when ``features`` is an int.
      dropout, depthwise: see `TemporalBlock`.
      linear_output: the last level without its output ReLUs (`TemporalBlock`), so the TCN's
        output is signed (TCNCA); False (default) is Bai et al.'s network.

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
    linear_output: bool = False
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
        n = len(self.widths)
        for i, f in enumerate(self.widths):
            x = TemporalBlock(
                f,
                self.kernel_size,
                2**i,
                self.dropout,
                self.depthwise,
                self.linear_output and i == n - 1,
                self.dtype,
                self.param_dtype,
                name=f"level{i}",
            )(x, train=train)
        return x


def simple_relative_position_bias(table: Float[Array, " W"], n: int) -> Float[Array, "n n"]:
    """MEGA's ``SimpleRelativePositionalBias``: ``bias[i, j] = table[M − 1 + j − i]``.

    ``table`` holds one learned scalar per offset −(M−1)…(M−1) (length 2M − 1, M the chunk size);
    the n × n bias of a (possibly shorter, n ≤ M) chunk reads the offsets it needs.
    """
    M = (table.shape[0] + 1) // 2
    if table.ndim != 1 or table.shape[0] != 2 * M - 1 or not 1 <= n <= M:
        raise ValueError(
            f"simple_relative_position_bias: table must be [2M-1] and 1 <= n <= M, got table "
            f"shape {table.shape}, n={n}"
        )
    i = jnp.arange(n)
    return table[M - 1 + i[None, :] - i[:, None]]


def _attention_weights(s, mask, activation):
    """Scores → weights: softmax over the visible keys, or MEGA's element-wise laplace/relu²."""
    if activation == "softmax":
        return jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    if activation == "laplace":
        w = 0.5 * (1.0 + jax.lax.erf((s - _LAPLACE_MU) / (_LAPLACE_SIGMA * math.sqrt(2.0))))
    else:  # relu2
        w = jnp.square(nn.relu(s))
    return jnp.where(mask, w, 0.0)


def chunked_attention(
    q: Float[Array, "B T Z"],
    k: Float[Array, "B T Z"],
    v: Float[Array, "B T V"],
    chunk_size: int,
    *,
    causal: bool = True,
    bias: Float[Array, "c c"] | None = None,
    activation: str = "softmax",
    weights_fn: Callable[[Array], Array] | None = None,
) -> Float[Array, "B T V"]:
    """Attention within consecutive chunks of ``chunk_size`` tokens (MEGA-chunk), scores in fp32.

    Tokens attend only inside their own chunk (causally when ``causal``), so the cost is
    O(T·chunk) rather than O(T²). A sequence shorter than a chunk is one chunk of T tokens
    (as MEGA); otherwise T is padded to a chunk multiple and the padded keys are masked (MEGA
    asserts divisibility instead).

    Args:
      q, k: [B, T, Z]; v: [B, T, V].
      chunk_size: tokens per chunk.
      causal: key j visible to query i only when j ≤ i.
      bias: optional additive [chunk_size, chunk_size] bias (MEGA's relative position bias; the
        top-left corner is used when T < chunk_size).
      activation: ``"softmax"``: ``softmax(q·k/√Z + bias)``; ``"laplace"`` / ``"relu2"``
        (MEGA's element attention): ``f(q·k / n + bias)`` with n the number of keys the query
        sees (i + 1 in a causal chunk, the chunk's real keys otherwise) and f MEGA's
        ``laplace`` (erf-based, μ = √½, σ = 1/(2√π)) or ``relu(·)²``, masked keys weighted 0.
      weights_fn: optional map on the [B, n, c, c] weights before they weight v (dropout).
    """
    if activation not in ATTENTION_ACTIVATIONS:
        raise ValueError(
            f"chunked_attention: activation must be one of {ATTENTION_ACTIVATIONS}, got "
            f"{activation!r}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunked_attention: chunk_size must be >= 1, got {chunk_size}")
    B, T, Z = q.shape
    c = min(chunk_size, T)
    n = -(-T // c)
    pad = n * c - T
    padf = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, a.shape[-1])
    qc, kc, vc = padf(q), padf(k), padf(v)  # [B, n, c, ·]
    s = jnp.einsum("bnqz,bnkz->bnqk", qc, kc, preferred_element_type=jnp.float32)  # [B, n, c, c]
    pos = jnp.arange(n * c).reshape(n, c)  # [n, c]
    mask = jnp.broadcast_to((pos < T)[:, None, :], (n, c, c))  # real keys
    if causal:
        mask = mask & (pos[:, None, :] <= pos[:, :, None])  # [n, c, c]
    if activation == "softmax":
        s = s / jnp.sqrt(jnp.float32(Z))
    else:
        visible = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)  # [n, c, 1]
        s = s / visible.astype(jnp.float32)[None]
    if bias is not None:
        s = s + bias[None, None, :c, :c].astype(jnp.float32)
    p = _attention_weights(s, mask[None], activation)
    if weights_fn is not None:
        p = weights_fn(p)
    o = jnp.einsum("bnqk,bnkv->bnqv", p.astype(v.dtype), vc)  # [B, n, c, V]
    return o.reshape(B, n * c, -1)[:, :T]


_mega_init = nn.initializers.normal(0.02)  # MEGA's reset_parameters: every projection N(0, 0.02)


class NormalizedFeedForward(nn.Module):
    """MEGA's normalised FFN (``NormalizedFeedForwardNetwork``), https://arxiv.org/abs/2209.10655.

    ``y = x + dropout(W₂ hidden_dropout(SiLU(W₁ LN(x))))`` (pre-norm; MEGA's post-norm option
    is not offered), weights N(0, 0.02), zero biases, LayerNorm ε 1e-5 (torch's default).

    Attributes:
      hidden: width of the hidden layer. dropout, hidden_dropout: as MEGA.
    """

    hidden: int
    dropout: float = 0.0
    hidden_dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], *, train: bool = False) -> Float[Array, "B T C"]:
        dtype = self.dtype or x.dtype
        dense = functools.partial(
            nn.Dense, dtype=dtype, param_dtype=self.param_dtype, kernel_init=_mega_init
        )
        y = nn.LayerNorm(1e-5, dtype=dtype, param_dtype=self.param_dtype, name="norm")(x)
        y = nn.silu(dense(self.hidden, name="fc1")(y))
        y = nn.Dropout(self.hidden_dropout)(y, deterministic=not train)
        y = dense(x.shape[-1], name="fc2")(y)
        y = nn.Dropout(self.dropout)(y, deterministic=not train)
        return x.astype(dtype) + y


class TCNCA(nn.Module):
    """TCNCA layer — Terzić et al. 2023, https://arxiv.org/abs/2312.05605.

    MEGA's moving-average gated attention (``MovingAverageGatedAttention`` +
    ``NormalizedFeedForwardNetwork``, facebookresearch/mega) with the multi-dimensional damped
    EMA — an O(T log T) FFT-computed linear recurrence — replaced by a dilated causal depthwise
    `TCN` (O(T)), followed by attention within fixed-size chunks (MEGA-chunk). With X = LN(x):

        X' = SiLU(TCN(X) + ω ⊙ X)                       (MEGA's EMA output, ω skip inside)
        [u, zr, hx] = W_mx X' + b_mx                    (MEGA's ``mx_proj``: C, Z + V, C)
        φ = σ(u);  [Z, R] = SiLU(zr);  Q = Z ⊙ γ₀ + β₀;  K = Z ⊙ γ₁ + β₁
        V = SiLU(W_v X + b_v);  O = ChunkAttn(Q, K, V) with relative position bias per chunk
        H = SiLU(hx + W_h (R ⊙ O) + b_h);  y = x + φ ⊙ (H − x)
        out = y + W₂ SiLU(W₁ LN(y))                     (`NormalizedFeedForward`)

    The attention is ``softmax(Q Kᵀ/√Z + bias)`` (MEGA's default and its LRA text-task setting;
    ``attention_activation="laplace"`` / ``"relu2"`` give MEGA's element attention, used for
    its LRA image tasks), the bias MEGA's ``SimpleRelativePositionalBias`` over one chunk
    (`simple_relative_position_bias`). Initialisation follows MEGA's ``reset_parameters``:
    v/mx/h projections, FFN and γ N(0, 0.02), biases and β zero, the bias table N(0, 0.02),
    ω N(0, 1) (the EMA's ω); the TCN keeps Bai et al.'s N(0, 0.01) convolutions.

    Deviations, on purpose: no code of TCNCA was found, so its TCN is a depthwise (per channel,
    like the EMA it replaces) Bai et al. TCN whose last level has no output ReLU
    (``TCN(linear_output=True)``): with that ReLU the TCN's contribution to the SiLU input would
    be clamped to ≥ 0, which MEGA's signed EMA output is not (the inner levels keep Bai et al.'s
    ReLUs; the SiLU input is sown as ``intermediates/silu_input``). The TCN is causal in both
    modes (MEGA's bidirectional EMA for encoders has no TCN counterpart here; ``causal`` masks
    the attention only). LayerNorm ε 1e-5 (torch's) for MEGA's ``layernorm`` (its LRA runs also
    use scale/batch norm, not offered). T need not be a chunk multiple (padded keys are masked);
    a single head, as MEGA.

    Attributes:
      z_dim: shared Q/K width (MEGA ``zdim``). v_dim: value/hidden width (MEGA ``hdim``,
        default 2·C). ffn_dim: NFFN hidden width (default 2·C; 0 drops the FFN sub-layer).
      chunk_size: attention chunk (also the relative-bias range).
      tcn_levels / tcn_kernel_size: TCN depth and taps (depthwise, C channels).
      causal: causal attention within chunks. attention_activation: see above.
      dropout, attention_dropout, hidden_dropout: MEGA's three dropout rates.

    Example:
      >>> layer = TCNCA(z_dim=16, chunk_size=8, tcn_levels=2)
      >>> x = jnp.ones((2, 32, 8)); params = layer.init(jax.random.key(0), x)
      >>> layer.apply(params, x).shape
      (2, 32, 8)
    """

    z_dim: int = 64
    v_dim: int | None = None
    ffn_dim: int | None = None
    chunk_size: int = 128
    tcn_levels: int = 4
    tcn_kernel_size: int = 3
    causal: bool = True
    attention_activation: str = "softmax"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _check(self, x) -> None:
        if x.ndim != 3:
            raise ValueError(f"TCNCA: x must be [B, T, C], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"TCNCA: x must be floating point, got dtype {x.dtype}")
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise ValueError(f"TCNCA: x must have T >= 1 and C >= 1, got shape {x.shape}")
        if self.chunk_size < 1:
            raise ValueError(f"TCNCA: chunk_size must be >= 1, got {self.chunk_size}")
        if self.tcn_levels < 1 or self.tcn_kernel_size < 1:
            raise ValueError(
                f"TCNCA: tcn_levels and tcn_kernel_size must be >= 1, got {self.tcn_levels}, "
                f"{self.tcn_kernel_size}"
            )
        if self.attention_activation not in ATTENTION_ACTIVATIONS:
            raise ValueError(
                f"TCNCA: attention_activation must be one of {ATTENTION_ACTIVATIONS}, got "
                f"{self.attention_activation!r}"
            )

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], *, train: bool = False) -> Float[Array, "B T C"]:
        self._check(x)
        C = x.shape[-1]
        Z = self.z_dim
        V = self.v_dim or 2 * C
        dtype = self.dtype or x.dtype
        pd = self.param_dtype
        dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=pd, kernel_init=_mega_init)
        drop = lambda rate: functools.partial(nn.Dropout(rate), deterministic=not train)

        residual = x.astype(dtype)
        xn = nn.LayerNorm(1e-5, dtype=dtype, param_dtype=pd, name="norm")(x)
        v = drop(self.hidden_dropout)(nn.silu(dense(V, name="v_proj")(xn)))
        # The EMA's place: SiLU(TCN(X) + ω ⊙ X), ω inside the SiLU as MEGA's MultiHeadEMA.
        omega = self.param("omega", nn.initializers.normal(1.0), (C,), pd)
        tcn = TCN(
            C,
            self.tcn_kernel_size,
            self.tcn_levels,
            depthwise=True,
            linear_output=True,
            dtype=dtype,
            param_dtype=pd,
            name="tcn",
        )
        pre = tcn(xn, train=train) + xn * omega.astype(dtype)[None, None]
        self.sow("intermediates", "silu_input", pre)  # signed: see the class docstring
        mx = nn.silu(pre)
        mx = drop(self.dropout)(mx)
        base = dense(2 * C + Z + V, name="mx_proj")(mx)
        u, zr, hx = jnp.split(base, [C, C + Z + V], axis=-1)  # MEGA's split order
        phi = nn.sigmoid(u)
        z, r = jnp.split(nn.silu(zr), [Z], axis=-1)
        gamma = self.param("gamma", _mega_init, (2, Z), pd).astype(dtype)
        beta = self.param("beta", nn.initializers.zeros, (2, Z), pd).astype(dtype)
        q = z * gamma[0, None, None] + beta[0, None, None]
        k = z * gamma[1, None, None] + beta[1, None, None]
        table = self.param("rel_pos_bias", _mega_init, (2 * self.chunk_size - 1,), pd)
        c = min(self.chunk_size, x.shape[1])
        bias = simple_relative_position_bias(table, c)
        attn_drop = drop(self.attention_dropout)
        o = chunked_attention(
            q,
            k,
            v,
            c,
            causal=self.causal,
            bias=bias,
            activation=self.attention_activation,
            weights_fn=attn_drop if self.attention_dropout > 0 else None,
        ).astype(dtype)
        h = nn.silu(hx + dense(C, name="h_proj")(o * r))
        h = drop(self.dropout)(h)
        y = residual + phi * (h - residual)  # MEGA's addcmul(residual, u, h − residual)
        ffn = C * 2 if self.ffn_dim is None else self.ffn_dim
        if ffn > 0:
            y = NormalizedFeedForward(
                ffn, self.dropout, self.hidden_dropout, dtype, pd, name="ffn"
            )(y, train=train)
        return y
