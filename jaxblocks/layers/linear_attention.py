"""Gated linear attention layer (GLA) and its small pieces (short causal conv, gate projection)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.kernels.gla.api import chunk_gla, fused_recurrent_gla
from jaxblocks.typing import Array, Float

_INIT = nn.initializers.variance_scaling(2**-5, "fan_avg", "uniform")  # xavier, gain 2^-2.5


def check_sequence_input(layer: str, x) -> None:
    """``x`` is a float ``[B, T, D]`` array with B, D >= 1 (T = 0 is an empty sequence)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{layer}: x must be a float array [B, T, D], got {type(x).__name__}")
    got = f"shape {tuple(x.shape)} dtype {jnp.dtype(x.dtype).name}"
    if x.ndim != 3:
        raise ValueError(f"{layer}: x must be [B, T, D] (rank 3), got {got}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{layer}: x must be a float array [B, T, D] (embeddings; embed integer ids "
            f"first), got {got}"
        )
    if x.shape[0] == 0 or x.shape[2] == 0:
        raise ValueError(f"{layer}: x must be [B, T, D] with B >= 1 and D >= 1, got {got}")


def check_bools(layer: str, **flags) -> None:
    """Each flag is a bool (a string such as ``"no"`` would otherwise count as True)."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{layer}: {name} must be a bool, got {type(value).__name__} {value!r}")


def causal_depthwise_conv1d(
    x: Float[Array, "B T C"],
    kernel: Float[Array, "W C"],
    bias: Float[Array, " C"] | None = None,
    prefix: Float[Array, "B W1 C"] | None = None,
) -> Float[Array, "B T C"]:
    """Causal depthwise 1-D convolution: ``y_t = Σ_i kernel[i] ⊙ x_{t-W+1+i} (+ bias)``.

    ``prefix`` holds the ``W - 1`` inputs before ``x`` (decoding); zeros when None.
    """
    W, C = kernel.shape
    if prefix is None:
        prefix = jnp.zeros((x.shape[0], W - 1, C), x.dtype)
    xp = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)  # [B, T + W - 1, C]
    y = jax.lax.conv_general_dilated(
        xp,
        kernel[:, None, :].astype(x.dtype),  # [W, 1, C]: depthwise (feature_group_count = C)
        window_strides=(1,),
        padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=C,
    )
    return y if bias is None else y + bias.astype(y.dtype)[None, None, :]


class ShortConvolution(nn.Module):
    """Causal depthwise conv (kernel 4) + SiLU on a projection, as in fla's ``ShortConvolution``.

    In decode mode the last ``conv_size - 1`` inputs are kept in the ``cache`` collection.
    """

    conv_size: int = 4
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        B, T, C = x.shape
        W = self.conv_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.lecun_normal(in_axis=0, out_axis=1), (None, "embed")
            ),
            (W, C),
            self.param_dtype,
        )
        prefix = None
        if self.decode:
            is_init = self.has_variable("cache", "prefix")
            cached = self.variable("cache", "prefix", jnp.zeros, (B, W - 1, C), self.dtype)
            if is_init:
                prefix = cached.value
                full = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
                cached.value = full[:, -(W - 1) :].astype(self.dtype)
        return nn.silu(causal_depthwise_conv1d(x, kernel, prefix=prefix))


class GatedLinearAttention(nn.Module):
    """Gated linear attention (Yang et al., https://arxiv.org/abs/2312.06635).

    Linear attention with a data-dependent, per-key-channel forget gate: each head keeps a
    ``K × V`` state ``S_t = diag(α_t) S_{t-1} + k_tᵀ v_t`` read by ``o_t = q_t S_t``, so training
    runs chunkwise in O(T) (`jaxblocks.kernels.gla.chunk_gla`) and decoding is O(1) per token.
    As in the paper and fla's layer: keys are ``expand_k · d`` wide, values ``expand_v · d``;
    the gate ``log α = logsigmoid(W₂ W₁ x) / 16`` comes from a rank-16 projection; each head's
    output goes through a shared RMSNorm and a swish output gate before the output projection;
    an optional short causal depthwise conv (kernel 4, SiLU) precedes q, k, v.

    With ``decode=True`` the layer carries the recurrent state (and conv inputs) in the
    ``cache`` collection: ``init`` creates a zero cache, each ``apply(..., mutable=["cache"])``
    continues from it (chunked for a prompt, token loop for single tokens).

    Input ``x [B, T, D]`` is a float array with B, D >= 1. T = 0 is an empty sequence: the
    output is ``[B, 0, D]`` and a decode cache is left as it was. A NaN or inf in ``x`` at
    position t makes the later outputs of its batch row NaN and, as the chunked kernel
    multiplies masked zeros by it, the earlier positions of its chunk (``chunk_size`` tokens);
    it never reaches another batch row.

    Attributes:
      num_heads: heads; expand_k, expand_v: key / value width relative to the input.
      gate_low_rank_dim: rank of the gate projection; gate_logit_normalizer: divides logsigmoid.
      clamp_min: optional lower clamp of the log gate.
      use_short_conv, conv_size: the short causal conv on q, k, v.
      use_output_gate: swish output gate (else the normed output goes straight to ``o_proj``).
      norm_eps: RMSNorm epsilon. chunk_size: kernel chunk. implementation: kernel choice.
      decode: recurrent decoding with the ``cache`` collection.
      dtype: compute dtype; param_dtype: storage dtype (fp32).

    Example:
      >>> layer = GatedLinearAttention(num_heads=2)
      >>> y, params = layer.init_with_output(jax.random.key(0), jnp.ones((2, 10, 64)))
    """

    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    clamp_min: float | None = None
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    norm_eps: float = 1e-5
    chunk_size: int = 64
    implementation: str | None = None
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dense(self, features, axes, name, use_bias=False, init=_INIT):
        return nn.Dense(
            features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(init, axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
            name=name,
        )

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        layer = type(self).__name__
        check_sequence_input(layer, x)
        check_bools(
            layer,
            use_short_conv=self.use_short_conv,
            use_output_gate=self.use_output_gate,
            decode=self.decode,
        )
        H = self.num_heads
        if isinstance(H, bool) or not isinstance(H, (int, np.integer)) or H < 1:
            raise ValueError(f"{layer}: num_heads must be a positive int, got {H!r}")
        B, T, D = x.shape
        key_dim, value_dim = int(D * self.expand_k), int(D * self.expand_v)
        if key_dim < H or value_dim < H or key_dim % H or value_dim % H:
            raise ValueError(
                f"{layer}: key_dim {key_dim} and value_dim {value_dim} must be positive and "
                f"divisible by num_heads {H} (input width {D}, expand_k {self.expand_k}, "
                f"expand_v {self.expand_v})"
            )
        if self.decode and self.has_variable("cache", "state"):
            want = (B, H, key_dim // H, value_dim // H)
            have = tuple(self.get_variable("cache", "state").shape)
            if have != want:
                raise ValueError(
                    f"{layer}: the decode cache holds a state of shape {have} ([B, H, K, V]) but "
                    f"x of shape {tuple(x.shape)} needs {want}; initialise the cache with an "
                    f"input of the same batch size and width"
                )
        x = x.astype(self.dtype)
        q = self._dense(key_dim, ("embed", "kv"), "q_proj")(x)
        k = self._dense(key_dim, ("embed", "kv"), "k_proj")(x)
        v = self._dense(value_dim, ("embed", "kv"), "v_proj")(x)
        if self.use_short_conv:
            conv = lambda name: ShortConvolution(
                self.conv_size, self.decode, self.dtype, self.param_dtype, name=name
            )
            q, k, v = conv("q_conv")(q), conv("k_conv")(k), conv("v_conv")(v)
        gk = self._dense(self.gate_low_rank_dim, ("embed", None), "gk_proj_0")(x)
        gk = self._dense(key_dim, (None, "kv"), "gk_proj_1", use_bias=True)(gk)
        gk = jax.nn.log_sigmoid(gk.astype(jnp.float32)) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = jnp.maximum(gk, self.clamp_min)

        heads = lambda t: t.reshape(B, T, H, t.shape[-1] // H)  # explicit: T may be 0
        q, k, v, gk = heads(q), heads(k), heads(v), heads(gk)
        o = self._attend(q, k, v, gk)  # [B, T, H, V/H]
        o = nn.RMSNorm(
            epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="g_norm"
        )(o)  # one RMSNorm over each head's values, shared by the heads (fla's fused norm)
        o = o.reshape(B, T, value_dim)
        if self.use_output_gate:
            o = o * nn.swish(self._dense(value_dim, ("embed", "kv"), "g_proj")(x))
        return self._dense(D, ("kv", "embed"), "o_proj")(o)

    def _attend(self, q, k, v, gk):
        B, T, H, Kh = q.shape
        Vh = v.shape[-1]
        if not self.decode:
            o, _ = chunk_gla(
                q, k, v, gk, chunk_size=self.chunk_size, implementation=self.implementation
            )
            return o
        is_init = self.has_variable("cache", "state")
        state = self.variable("cache", "state", jnp.zeros, (B, H, Kh, Vh), jnp.float32)
        if not is_init:  # init: build the (zero) cache, compute as in training
            o, _ = chunk_gla(
                q, k, v, gk, chunk_size=self.chunk_size, implementation=self.implementation
            )
            return o
        if T <= 16:  # a few tokens: the token loop (fla switches at T <= 64)
            o, state.value = fused_recurrent_gla(
                q, k, v, gk, initial_state=state.value, output_final_state=True
            )
        else:
            o, state.value = chunk_gla(
                q,
                k,
                v,
                gk,
                initial_state=state.value,
                output_final_state=True,
                chunk_size=self.chunk_size,
                implementation=self.implementation,
            )
        return o
