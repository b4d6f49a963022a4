"""NiNformer: a Network-in-Network transformer whose token mixer is an MLP-Mixer-gated unit.

Abdullah, Ozcan, "NiNformer: A Network in Network Transformer with Token Mixing Generated
Gating Function", https://arxiv.org/abs/2403.02411. Official code: Abdullah-88/NiNformer
``ninformer.py`` (``FeedForward``, ``MixerBlock``, ``MixerGatingUnit``, ``NiNBlock``).

Where self-attention would be, the NiN block puts a *Mixer gating unit*: a whole MLP-Mixer
block (token MLP over the sequence axis, then channel MLP) computed from the input generates a
data-dependent gate that multiplies a linear projection of the same input. The token MLP's
weights are ``[seq_len, d_ffn]``, so the sequence length is fixed at construction (like
MLP-Mixer, unlike attention).

The math lives in the pure functions `token_mix`, `mixer_gate` and `nin_block_residuals`; the
Linen modules own the parameters and call them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.typing import Array, Float

__all__ = [
    "ACTIVATION_AXES",
    "FeedForward",
    "MixerBlock",
    "MixerGatingUnit",
    "NiNBlock",
    "mixer_gate",
    "nin_block_residuals",
    "token_mix",
    "torch_linear_bias_init",
    "torch_linear_kernel_init",
]

Dtype = Any

# torch's default init of nn.Linear / nn.Conv2d weights: kaiming_uniform(a=√5), i.e.
# U(±1/√fan_in) = variance_scaling(1/3, fan_in, uniform). The official code keeps it.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torch's LayerNorm ε (flax's default is 1e-6).
LN_EPSILON = 1e-5
ACTIVATION_AXES = ("batch", None, None)


def torch_linear_bias_init(fan_in: int) -> Callable[..., Array]:
    """torch's default bias init of nn.Linear / nn.Conv2d: U(±1/√fan_in)."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        return nn.initializers.uniform(2.0 * bound)(key, shape, dtype) - jnp.asarray(bound, dtype)

    return init


# --------------------------------------------------------------------------------------------
# Pure functions: the math.
# --------------------------------------------------------------------------------------------


def token_mix(
    x: Float[Array, "B N C"], mlp: Callable[[Float[Array, "B C N"]], Float[Array, "B C N"]]
) -> Float[Array, "B N C"]:
    """Apply ``mlp`` along the sequence axis: ``mlp(xᵀ)ᵀ`` (the official ``b n d -> b d n``)."""
    return jnp.swapaxes(mlp(jnp.swapaxes(x, 1, 2)), 1, 2)


def mixer_gate(u: Float[Array, "B N C"], v: Float[Array, "B N C"]) -> Float[Array, "B N C"]:
    """The gating of `MixerGatingUnit`: ``u ⊙ v`` with ``u = Linear(x)``, ``v = Mixer(x)``.

    The gate ``v`` is not squashed (no sigmoid), as in the official code and the paper.
    """
    if u.shape != v.shape:
        raise ValueError(f"mixer_gate: u has shape {u.shape} but v has shape {v.shape}; "
                         "expected equal")  # fmt: skip
    return u * v


def nin_block_residuals(
    x: Float[Array, "B N C"],
    norm: Callable[[Array], Array],
    mgu: Callable[[Array], Array],
    ffn: Callable[[Array], Array],
) -> Float[Array, "B N C"]:
    """The NiN block: ``x + mgu(norm(x))``, then ``+ ffn(norm(·))`` with the *same* ``norm``."""
    x = x + mgu(norm(x))
    return x + ffn(norm(x))


# --------------------------------------------------------------------------------------------
# Linen modules: parameters and validation.
# --------------------------------------------------------------------------------------------


def _check_tokens(who: str, x: Array, seq_len: int | None = None, dim: int | None = None):
    if x.ndim != 3:
        raise ValueError(f"{who}: x must be tokens [batch, seq_len, channels], got shape "
                         f"{x.shape} (rank {x.ndim})")  # fmt: skip
    if seq_len is not None and x.shape[1] != seq_len:
        raise ValueError(
            f"{who}: x has shape {x.shape}, sequence length {x.shape[1]}, but the token MLP was "
            f"built for seq_len={seq_len} (its weights are [seq_len, d_ffn]); resize the input "
            "or build the module with the new seq_len"
        )
    if dim is not None and x.shape[2] != dim:
        raise ValueError(f"{who}: x has shape {x.shape}, {x.shape[2]} channels; expected "
                         f"d_model={dim}")  # fmt: skip


def _positive(who: str, **values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{who}: {name}={v!r} must be a positive int")


def _dense(features: int, fan_in: int, axes: tuple[Any, Any], module: Any, name: str):
    return nn.Dense(
        features,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=nn.with_logical_partitioning(torch_linear_kernel_init, axes),
        bias_init=nn.with_logical_partitioning(torch_linear_bias_init(fan_in), (axes[1],)),
        name=name,
    )


def _layer_norm(module: Any, name: str) -> nn.LayerNorm:
    # Flax norms compute their statistics in (at least) float32 and cast back to ``dtype``.
    return nn.LayerNorm(
        epsilon=LN_EPSILON,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class FeedForward(nn.Module):
    """NiNformer's MLP (https://arxiv.org/abs/2403.02411): Linear → GELU → Dropout → Linear →
    Dropout, over the last axis.

    The official ``FeedForward``; used for the token and channel MLPs of `MixerBlock` and for
    the FFN of `NiNBlock`. GELU is exact (erf), as torch's ``nn.GELU()``.

    Attributes:
      hidden_dim: width of the hidden layer.
      dropout: dropout rate of both Dropout layers (active only with ``deterministic=False``,
        which needs an rng named ``"dropout"``).
      kernel_axes: logical axis names of the first kernel ``(in, hidden)``; the second's are
        reversed.
      dtype, param_dtype: compute and parameter dtypes.
    """

    hidden_dim: int
    dropout: float = 0.0
    kernel_axes: tuple[Any, Any] = ("embed", "mlp")
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "*B C"], *, deterministic: bool = True) -> Array:
        dim = x.shape[-1]
        h = _dense(self.hidden_dim, dim, self.kernel_axes, self, "fc1")(x)
        h = nn.gelu(h, approximate=False)
        h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
        axes = (self.kernel_axes[1], self.kernel_axes[0])
        h = _dense(dim, self.hidden_dim, axes, self, "fc2")(h)
        return nn.Dropout(self.dropout, deterministic=deterministic)(h)


class MixerBlock(nn.Module):
    """MLP-Mixer block as NiNformer uses it (https://arxiv.org/abs/2403.02411).

    ``x + TokenMLP(LN x)`` with the MLP over the sequence axis (``seq_len → token_dim →
    seq_len``), then ``+ ChannelMLP(LN ·)`` (``C → channel_dim → C``), each with its own
    LayerNorm; both MLPs are `FeedForward` with dropout.

    Attributes:
      seq_len: the fixed number of tokens (the token MLP's input width).
      token_dim, channel_dim: hidden widths of the token and channel MLPs (the official
        ``MixerGatingUnit`` passes ``d_ffn`` for both).
      dropout: dropout rate of both MLPs.
      dtype, param_dtype: compute and parameter dtypes.
    """

    seq_len: int
    token_dim: int
    channel_dim: int
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B N C"], *, deterministic: bool = True
    ) -> Float[Array, "B N C"]:
        _positive("MixerBlock", seq_len=self.seq_len, token_dim=self.token_dim,
                  channel_dim=self.channel_dim)  # fmt: skip
        _check_tokens("MixerBlock", x, self.seq_len)
        kw = {"dropout": self.dropout, "dtype": self.dtype, "param_dtype": self.param_dtype}
        token_mlp = FeedForward(self.token_dim, kernel_axes=(None, "mlp"), name="token_mlp", **kw)
        channel_mlp = FeedForward(self.channel_dim, name="channel_mlp", **kw)
        x = x + token_mix(
            _layer_norm(self, "token_norm")(x), lambda t: token_mlp(t, deterministic=deterministic)
        )
        return x + channel_mlp(_layer_norm(self, "channel_norm")(x), deterministic=deterministic)


class MixerGatingUnit(nn.Module):
    """NiNformer's Mixer gating unit (https://arxiv.org/abs/2403.02411): ``Linear(x) ⊙
    MixerBlock(x)``.

    Plays the role of attention in `NiNBlock`: a full `MixerBlock` of the input produces the
    gate of a linear projection of the same input (`mixer_gate`, no sigmoid). Unlike gMLP's
    spatial gating unit, the input is not split in halves: both branches see all channels.

    Attributes:
      seq_len: fixed number of tokens.
      token_dim, channel_dim: hidden widths of the mixer's token and channel MLPs.
      dropout: dropout rate inside the mixer.
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mgu = MixerGatingUnit(seq_len=16, token_dim=32, channel_dim=32)
      >>> x = jax.random.normal(jax.random.key(0), (2, 16, 8))
      >>> mgu.apply(mgu.init(jax.random.key(1), x), x).shape
      (2, 16, 8)
    """

    seq_len: int
    token_dim: int
    channel_dim: int
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B N C"], *, deterministic: bool = True
    ) -> Float[Array, "B N C"]:
        _check_tokens("MixerGatingUnit", x, self.seq_len)
        dim = x.shape[-1]
        u = _dense(dim, dim, ("embed", "mlp"), self, "proj")(x)
        v = MixerBlock(
            self.seq_len, self.token_dim, self.channel_dim, self.dropout,
            dtype=self.dtype, param_dtype=self.param_dtype, name="mixer",
        )(x, deterministic=deterministic)  # fmt: skip
        return mixer_gate(u, v)


class NiNBlock(nn.Module):
    """NiNformer block (https://arxiv.org/abs/2403.02411): ``x + MGU(LN x)``, ``x + FFN(LN x)``.

    A pre-norm transformer block with `MixerGatingUnit` in place of attention. As in the
    official ``NiNBlock``, *one* LayerNorm module (one scale/bias pair, ``norm``) serves both
    pre-norms (a standard transformer block has two); this is kept so that parameters and
    counts match the official code. The FFN is `FeedForward` (``d_model → d_ffn → d_model``),
    and the mixer's token and channel MLPs both use ``d_ffn`` hidden units, as in the official
    code.

    Attributes:
      d_model: channels.
      d_ffn: hidden width of the FFN and of the mixer's token and channel MLPs.
      seq_len: fixed number of tokens.
      dropout: dropout rate of every `FeedForward` (active only with ``deterministic=False``,
        which needs an rng named ``"dropout"``).
      dtype, param_dtype: compute and parameter dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> block = NiNBlock(d_model=8, d_ffn=16, seq_len=4, dropout=0.5)
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 8))
      >>> variables = block.init(jax.random.key(1), x)
      >>> y = block.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
      >>> y.shape
      (2, 4, 8)
    """

    d_model: int
    d_ffn: int
    seq_len: int
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B N C"], *, deterministic: bool = True
    ) -> Float[Array, "B N C"]:
        _positive("NiNBlock", d_model=self.d_model, d_ffn=self.d_ffn, seq_len=self.seq_len)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"NiNBlock: dropout={self.dropout!r} must be in [0, 1)")
        _check_tokens("NiNBlock", x, self.seq_len, self.d_model)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if self.dtype is not None:
            x = x.astype(self.dtype)
        norm = _layer_norm(self, "norm")
        mgu = MixerGatingUnit(self.seq_len, self.d_ffn, self.d_ffn, self.dropout, name="mgu", **kw)
        ffn = FeedForward(self.d_ffn, self.dropout, name="ffn", **kw)
        y = nin_block_residuals(
            x,
            norm,
            lambda h: mgu(h, deterministic=deterministic),
            lambda h: ffn(h, deterministic=deterministic),
        )
        return nn.with_logical_constraint(y, ACTIVATION_AXES)
