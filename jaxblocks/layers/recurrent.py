"""Recurrent layers: head-wise LSTM / GRU / sLSTM / Elman over `flashrnn`, and LayerNorm LSTM / GRU.

`FlashRNN` (and its presets `LSTM`, `GRU`, `SLSTM`, `ElmanRNN`) follows FlashRNN (Pöppel et al.,
arXiv 2412.07752): the input projection ``Wx = x W`` for all time steps is one matmul outside the
recurrence, and the recurrence with head-wise (block-diagonal) recurrent matrices
``R [Gr, N, D, D]`` runs in the fused `jaxblocks.kernels.rnn.flashrnn` op (Pallas kernels on
GPU/TPU, an unrolled scan on CPU). With ``num_heads=1`` R is a full matrix and `LSTM` / `GRU`
compute exactly `flax.linen.OptimizedLSTMCell` / `flax.linen.GRUCell` under the weight mapping in
`flax_lstm_params` / `flax_gru_params`.

`LayerNormLSTM` / `LayerNormGRU` (Ba et al., arXiv 1607.06450) normalise the recurrent
pre-activations and the LSTM cell inside every step. A LayerNorm reduces over all heads and gates
of a step, between the recurrent matmul and the pointwise cell, so it couples the heads that the
fused kernel runs as independent programs (grid over heads × batch tiles) and would need a
cross-program reduction every step; the normalised cell also feeds the next step. These layers
therefore run as a `lax.scan` in the layer (the input-side LayerNorm is hoisted out of the loop).
Their math lives in the pure step functions `layer_norm_lstm_step` / `layer_norm_gru_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.kernels.rnn.api import CELLS, flashrnn
from jaxblocks.typing import Array, Float

__all__ = [
    "GRU",
    "LSTM",
    "SLSTM",
    "ElmanRNN",
    "FlashRNN",
    "LayerNormGRU",
    "LayerNormLSTM",
    "flax_gru_params",
    "flax_lstm_params",
    "layer_norm_gru_step",
    "layer_norm_lstm_step",
]

Initializer = Callable[..., Array]


def _shape(x) -> str:
    return f"shape {tuple(x.shape)} dtype {jnp.dtype(x.dtype).name}"


def _check_bool(layer: str, name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{layer}: {name} must be a bool, got {type(value).__name__} {value!r}")


def _check_positive_int(layer: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{layer}: {name} must be a positive int, got {type(value).__name__} {value!r}"
        )


def _check_input(layer: str, x) -> None:
    """``x`` is a float ``[B, T, F]`` array with B, F >= 1 (T = 0 is an empty sequence)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{layer}: x must be a float array [B, T, F], got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"{layer}: x must be [B, T, F] (rank 3), got {_shape(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{layer}: x must be a float array [B, T, F] (features; embed integer ids first), "
            f"got {_shape(x)}"
        )
    if x.shape[0] == 0 or x.shape[2] == 0:
        raise ValueError(f"{layer}: x must be [B, T, F] with B >= 1 and F >= 1, got {_shape(x)}")


def _check_states(layer: str, name: str, states, want: tuple[int, ...], what: str) -> None:
    """``states`` is None or a float array of shape ``want`` (``what`` spells out its axes)."""
    if states is None:
        return
    if not hasattr(states, "shape") or not hasattr(states, "dtype"):
        raise TypeError(
            f"{layer}: {name} must be None or an array {what} = {want}, got {type(states).__name__}"
        )
    if tuple(states.shape) != want:
        raise ValueError(f"{layer}: {name} must have shape {what} = {want}, got {_shape(states)}")
    if not jnp.issubdtype(states.dtype, jnp.floating):
        raise TypeError(f"{layer}: {name} must be a float array, got {_shape(states)}")


def _headwise(init: Initializer) -> Initializer:
    """Apply a matrix initializer (e.g. orthogonal) to every [D, D] block of a [..., D, D] shape."""

    def headwise_init(key, shape, dtype=jnp.float32):
        n = 1
        for s in shape[:-2]:
            n *= s
        keys = jax.random.split(key, n)
        mats = jax.vmap(lambda k: init(k, shape[-2:], dtype))(keys)
        return mats.reshape(shape)

    return headwise_init


class _FlashRNNDirection(nn.Module):
    """One direction: input projection, head-wise R and bias, then `flashrnn`."""

    features: int
    num_heads: int
    function: str
    implementation: str | None
    dtype: Any
    param_dtype: Any
    kernel_init: Initializer
    recurrent_kernel_init: Initializer
    bias_init: Initializer

    @nn.compact
    def __call__(self, x, initial_states):
        cell = CELLS[self.function]
        N, D = self.num_heads, self.features // self.num_heads
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, ("embed", None, "heads", None)),
            (x.shape[-1], cell.G, N, D),
            self.param_dtype,
        )
        recurrent = self.param(
            "recurrent_kernel",
            nn.with_logical_partitioning(
                _headwise(self.recurrent_kernel_init), (None, "heads", None, None)
            ),
            (cell.Gr, N, D, D),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(self.bias_init, (None, "heads", None)),
            (cell.Gb, N, D),
            self.param_dtype,
        )
        x, kernel, recurrent, bias = nn.dtypes.promote_dtype(
            x, kernel, recurrent, bias, dtype=self.dtype
        )
        wx = jnp.einsum("btf,fgnd->btgnd", x, kernel)  # all input projections: one matmul
        if initial_states is not None:
            initial_states = initial_states.astype(wx.dtype)
        return flashrnn(
            wx,
            recurrent,
            bias,
            initial_states,
            function=self.function,
            implementation=self.implementation,
        )


class FlashRNN(nn.Module):
    """Head-wise recurrent layer (FlashRNN, https://arxiv.org/abs/2412.07752).

    Unlike `flax.linen.RNN` over a cell, the recurrent matrix is block-diagonal over
    ``num_heads`` heads (each ``features // num_heads`` wide), the input projection for the whole
    sequence is one matmul, and the recurrence runs in the fused `flashrnn` op with any of its
    cells (``function``: "lstm", "slstm", "gru", "elman"). The output is the first state (h, or
    y for the sLSTM) at every step.

    Attributes:
      features: hidden size ``N · D``.
      num_heads: N; 1 gives a full recurrent matrix.
      function: the cell.
      return_sequences: return ``[B, T, features]`` (True) or the last step ``[B, features]``.
      bidirectional: also run a second set of weights over the reversed sequence and
        concatenate its outputs (features doubled); final states become a (forward, backward) pair.
      implementation: passed to `flashrnn` (None: fastest available).
      dtype / param_dtype: computation / parameter dtypes.
      kernel_init / recurrent_kernel_init / bias_init: initializers of ``W [F, G, N, D]``, of
        each head's ``[D, D]`` block of ``R`` and of ``b [Gb, N, D]``.

    Call: ``(x [B, T, F], initial_states [S, B, N, D] | None)`` ->
    ``(outputs, final_states [S, B, N, D])`` (states in the layout of `flashrnn`). With
    ``bidirectional=True``, ``initial_states`` is None or a ``(forward, backward)`` pair, each
    None or ``[S, B, N, D]``. ``x`` is a float array with B, F >= 1; T = 0 (an empty sequence)
    gives ``[B, 0, features]`` outputs (with ``return_sequences=False``: the initial h, zeros
    when None) and the initial states back. A NaN or inf in ``x`` at step t reaches every later
    step of its batch row, in every head (the input projection mixes the features into all
    heads), and no other row.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = LSTM(features=32, num_heads=4)
      >>> x = jnp.ones((2, 7, 8))
      >>> params = layer.init(jax.random.key(0), x)
      >>> y, (h_c) = layer.apply(params, x)
      >>> y.shape, h_c.shape
      ((2, 7, 32), (2, 2, 4, 8))
    """

    features: int
    num_heads: int = 1
    function: str = "lstm"
    return_sequences: bool = True
    bidirectional: bool = False
    implementation: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()

    def _direction(self, name):
        return _FlashRNNDirection(
            features=self.features,
            num_heads=self.num_heads,
            function=self.function,
            implementation=self.implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            recurrent_kernel_init=self.recurrent_kernel_init,
            bias_init=self.bias_init,
            name=name,
        )

    def _check(self, x, initial_states):
        """Validate the attributes and the inputs; the (forward, backward) initial states."""
        layer = type(self).__name__
        if not isinstance(self.function, str) or self.function not in CELLS:
            raise ValueError(
                f"{layer}: function must be one of {list(CELLS)}, got {self.function!r}"
            )
        _check_positive_int(layer, "features", self.features)
        _check_positive_int(layer, "num_heads", self.num_heads)
        _check_bool(layer, "return_sequences", self.return_sequences)
        _check_bool(layer, "bidirectional", self.bidirectional)
        if self.implementation is not None and not isinstance(self.implementation, str):
            raise TypeError(
                f"{layer}: implementation must be None or a str, "
                f"got {type(self.implementation).__name__} {self.implementation!r}"
            )
        if self.features % self.num_heads:
            raise ValueError(
                f"{layer}: features={self.features} is not divisible by num_heads={self.num_heads}"
            )
        _check_input(layer, x)
        N = self.num_heads
        want = (CELLS[self.function].S, x.shape[0], N, self.features // N)
        what = "[S, B, N, D]"
        if not self.bidirectional:
            if isinstance(initial_states, (tuple, list)):
                raise TypeError(
                    f"{layer}: initial_states must be None or one array {what} = {want} "
                    f"(a (forward, backward) pair is for bidirectional=True), got a "
                    f"{type(initial_states).__name__} of {len(initial_states)}"
                )
            _check_states(layer, "initial_states", initial_states, want, what)
            return initial_states, None
        if initial_states is None:
            return None, None
        if not isinstance(initial_states, (tuple, list)) or len(initial_states) != 2:
            if hasattr(initial_states, "shape"):
                got = f"one array of {_shape(initial_states)}"
            elif isinstance(initial_states, (tuple, list)):
                got = f"a {type(initial_states).__name__} of {len(initial_states)}"
            else:
                got = type(initial_states).__name__
            raise ValueError(
                f"{layer}: with bidirectional=True, initial_states must be None or a (forward, "
                f"backward) pair, each None or {what} = {want}, got {got}"
            )
        for i, side in enumerate(("forward", "backward")):
            _check_states(layer, f"initial_states[{i}] ({side})", initial_states[i], want, what)
        return tuple(initial_states)

    def _outputs(self, states_all, last):
        h = states_all[0] if self.return_sequences else last[0]  # [B, T, N, D] or [B, N, D]
        return h.reshape(*h.shape[:-2], self.features)

    @nn.compact
    def __call__(
        self, x: Float[Array, "B T F"], initial_states=None
    ) -> tuple[Array, Array | tuple[Array, Array]]:
        init_f, init_b = self._check(x, initial_states)
        sa, last = self._direction("forward")(x, init_f)
        out = self._outputs(sa, last)
        if not self.bidirectional:
            return out, last
        sa_b, last_b = self._direction("backward")(x[:, ::-1], init_b)
        if self.return_sequences:
            sa_b = sa_b[:, :, ::-1]
        out = jnp.concatenate([out, self._outputs(sa_b, last_b)], axis=-1)
        return out, (last, last_b)


class LSTM(FlashRNN):
    """Head-wise LSTM (FlashRNN's ``lstm``, https://arxiv.org/abs/2412.07752): states (h, c).

    ``c' = σ(f)c + σ(i)tanh(z)``, ``h' = σ(o)tanh(c')`` with gates (i, f, z, o). With one head it
    equals `flax.linen.OptimizedLSTMCell` (see `flax_lstm_params`). Attributes as `FlashRNN`.
    """

    function: str = "lstm"


class SLSTM(FlashRNN):
    """Head-wise sLSTM (xLSTM, https://arxiv.org/abs/2405.04517, via FlashRNN): states (y, c, n, m).

    Exponential input gate with the max-stabilizer m and normaliser n; y = σ(o)·c/n. Attributes
    as `FlashRNN`.
    """

    function: str = "slstm"


class GRU(FlashRNN):
    """Head-wise GRU (FlashRNN's ``gru``, https://arxiv.org/abs/2412.07752): state h.

    ``h' = z h + (1 − z) tanh(Wn + bn + r (Rg + bg))``. With one head it equals
    `flax.linen.GRUCell` (see `flax_gru_params`). Attributes as `FlashRNN`.
    """

    function: str = "gru"


class ElmanRNN(FlashRNN):
    """Head-wise Elman (tanh) RNN, FlashRNN's ``elman``: ``h' = tanh(Wx + R h + b)``."""

    function: str = "elman"


# --- weight mapping from Flax's cells ---------------------------------------------------------


def flax_lstm_params(cell_params: dict) -> dict:
    """`flax.linen.OptimizedLSTMCell` params -> ``LSTM(num_heads=1)`` params (of one direction).

    Mapping (gates i, f, g, o of Flax are our i, f, z, o): ``kernel[:, k, 0] = i{k}.kernel``,
    ``recurrent_kernel[k, 0] = h{k}.kernel``, ``bias[k, 0] = h{k}.bias`` (Flax's input kernels
    have no bias). Flax's carry ``(c, h)`` is our states ``[h, c]``.
    """
    gates = ("i", "f", "g", "o")
    return {
        "kernel": jnp.stack([cell_params[f"i{g}"]["kernel"] for g in gates], 1)[:, :, None],
        "recurrent_kernel": jnp.stack([cell_params[f"h{g}"]["kernel"] for g in gates])[:, None],
        "bias": jnp.stack([cell_params[f"h{g}"]["bias"] for g in gates])[:, None],
    }


def flax_gru_params(cell_params: dict) -> dict:
    """`flax.linen.GRUCell` params -> ``GRU(num_heads=1)`` params (of one direction).

    Input gates (r, z, n) = Flax's (ir, iz, in) kernels; recurrent (g, r, z) = (hn, hr, hz)
    kernels; biases (g, r, z, n) = (hn.bias, ir.bias, iz.bias, in.bias).
    """
    p = cell_params
    return {
        "kernel": jnp.stack([p["ir"]["kernel"], p["iz"]["kernel"], p["in"]["kernel"]], 1)[
            :, :, None
        ],
        "recurrent_kernel": jnp.stack([p["hn"]["kernel"], p["hr"]["kernel"], p["hz"]["kernel"]])[
            :, None
        ],
        "bias": jnp.stack([p["hn"]["bias"], p["ir"]["bias"], p["iz"]["bias"], p["in"]["bias"]])[
            :, None
        ],
    }


# --- LayerNorm LSTM / GRU (Ba et al.) ----------------------------------------------------------


def _row(v, like):
    """A per-feature vector ``[C]`` shaped to broadcast against ``like [..., C]`` (rank-safe)."""
    return v.reshape((1,) * (like.ndim - 1) + v.shape)


def _layer_norm(x, scale, bias, eps):
    """LayerNorm over the last axis with fp32 statistics (biased variance)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps) * _row(scale, x) + _row(bias, x)


def layer_norm_lstm_step(p: dict, xw_t, h, c, eps: float = 1e-5):
    """One LN-LSTM step (Ba et al. eq. 20-22), gates ordered (i, f, z, o), all fp32.

    ``gates = LN(h W_h; α_h, β_h) + xw_t + b`` with ``xw_t = LN(x W_x; α_x, β_x)`` precomputed;
    ``c' = σ(f)c + σ(i)tanh(z)``; ``h' = σ(o) tanh(LN(c'; α_c, β_c))``.
    """
    rh = jnp.dot(h.astype(p["recurrent_kernel"].dtype), p["recurrent_kernel"])
    g = _layer_norm(rh, p["ln_h_scale"], p["ln_h_bias"], eps) + xw_t + _row(p["bias"], xw_t)
    i, f, z, o = jnp.split(g, 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(z)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(_layer_norm(c_new, p["ln_c_scale"], p["ln_c_bias"], eps))
    return h_new, c_new


def layer_norm_gru_step(p: dict, xw_t, h, eps: float = 1e-5):
    """One LN-GRU step, gates ordered (r, z, n), all fp32.

    As in Ba et al.'s released code: the recurrent (r, z) block and the recurrent candidate block
    are normalised separately, ``[r, z] = σ(LN(h U_rz) + xw_rz + b_rz)``,
    ``n = tanh(xw_n + b_n + r · LN(h U_n))``, ``h' = z h + (1 − z) n``, with ``xw`` the
    (separately) normalised input projections.
    """
    H = h.shape[-1]
    rh = jnp.dot(h.astype(p["recurrent_kernel"].dtype), p["recurrent_kernel"])
    rz = _layer_norm(rh[..., : 2 * H], p["ln_h_scale"][: 2 * H], p["ln_h_bias"][: 2 * H], eps)
    rn = _layer_norm(rh[..., 2 * H :], p["ln_h_scale"][2 * H :], p["ln_h_bias"][2 * H :], eps)
    bias = _row(p["bias"], xw_t)
    r = jax.nn.sigmoid(rz[..., :H] + xw_t[..., :H] + bias[..., :H])
    z = jax.nn.sigmoid(rz[..., H:] + xw_t[..., H : 2 * H] + bias[..., H : 2 * H])
    n = jnp.tanh(xw_t[..., 2 * H :] + bias[..., 2 * H :] + r * rn)
    return z * h + (1.0 - z) * n


class _LayerNormRNN(nn.Module):
    features: int
    return_sequences: bool = True
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
    bias_init: Initializer = nn.initializers.zeros_init()

    gates: int = 4
    num_states: int = 2

    def _check(self, x, initial_states):
        layer = type(self).__name__
        _check_positive_int(layer, "features", self.features)
        _check_bool(layer, "return_sequences", self.return_sequences)
        _check_input(layer, x)
        want = (self.num_states, x.shape[0], self.features)
        _check_states(layer, "initial_states", initial_states, want, "[S, B, H]")

    def _params(self, in_features):
        H, G = self.features, self.gates
        ones, zeros = nn.initializers.ones_init(), nn.initializers.zeros_init()
        part = nn.with_logical_partitioning
        p = {
            "kernel": self.param(
                "kernel", part(self.kernel_init, ("embed", "mlp")), (in_features, G * H)
            ),
            "recurrent_kernel": self.param(
                "recurrent_kernel",
                part(self.recurrent_kernel_init, (None, "mlp")),
                (H, G * H),
            ),
            "bias": self.param("bias", part(self.bias_init, ("mlp",)), (G * H,)),
            "ln_x_scale": self.param("ln_x_scale", part(ones, ("mlp",)), (G * H,)),
            "ln_x_bias": self.param("ln_x_bias", part(zeros, ("mlp",)), (G * H,)),
            "ln_h_scale": self.param("ln_h_scale", part(ones, ("mlp",)), (G * H,)),
            "ln_h_bias": self.param("ln_h_bias", part(zeros, ("mlp",)), (G * H,)),
        }
        if self.num_states == 2:
            p["ln_c_scale"] = self.param("ln_c_scale", part(ones, ("mlp",)), (H,))
            p["ln_c_bias"] = self.param("ln_c_bias", part(zeros, ("mlp",)), (H,))
        return p


class LayerNormLSTM(_LayerNormRNN):
    """Layer-normalised LSTM (Ba et al., Layer Normalization, https://arxiv.org/abs/1607.06450).

    LayerNorm on the input and recurrent pre-activations (over all 4H gates) and on the cell
    before the output tanh; the statistics are per step and per example, so unlike BatchNorm
    nothing is stored. Runs as a `lax.scan` in the layer (see the module docstring for why the
    fused `flashrnn` kernel does not apply); the input LayerNorm is hoisted out of the loop.

    Attributes:
      features: hidden size H. return_sequences: all steps or only the last.
      epsilon: LayerNorm epsilon. dtype / param_dtype: computation (matmuls) / parameter dtypes;
        the cell state and the normalisation run in fp32.

    Call: ``(x [B, T, F], initial_states [2, B, H] (h, c) | None)`` ->
    ``(outputs [B, T, H] or [B, H], final_states [2, B, H])``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = LayerNormLSTM(features=16)
      >>> x = jnp.ones((2, 5, 8))
      >>> y, s = layer.apply(layer.init(jax.random.key(0), x), x)
      >>> y.shape, s.shape
      ((2, 5, 16), (2, 2, 16))
    """

    gates: int = 4
    num_states: int = 2

    @nn.compact
    def __call__(self, x: Float[Array, "B T F"], initial_states=None):
        self._check(x, initial_states)
        p = self._params(x.shape[-1])
        dtype = self.dtype or jnp.result_type(x, p["kernel"])
        B, T, _ = x.shape
        H, f32 = self.features, jnp.float32
        xw = jnp.einsum("btf,fg->btg", x.astype(dtype), p["kernel"].astype(dtype))
        xw = _layer_norm(xw, p["ln_x_scale"], p["ln_x_bias"], self.epsilon)  # hoisted: all T
        pp = {
            k: (v.astype(dtype) if k == "recurrent_kernel" else v.astype(f32)) for k, v in p.items()
        }
        if initial_states is None:
            initial_states = jnp.zeros((2, B, H), f32)
        s0 = (initial_states[0].astype(f32), initial_states[1].astype(f32))

        def step(carry, xw_t):
            h, c = layer_norm_lstm_step(pp, xw_t, *carry, eps=self.epsilon)
            return (h, c), h

        (h, c), hs = jax.lax.scan(step, s0, jnp.moveaxis(xw, 1, 0))
        out = jnp.moveaxis(hs, 0, 1) if self.return_sequences else h
        return out.astype(dtype), jnp.stack([h, c]).astype(dtype)


class LayerNormGRU(_LayerNormRNN):
    """Layer-normalised GRU (Ba et al., Layer Normalization, https://arxiv.org/abs/1607.06450).

    LayerNorm on the input and recurrent pre-activations, the (r, z) and candidate blocks each
    normalised on their own (as in the paper's released code); see `layer_norm_gru_step`. Runs as
    a `lax.scan` in the layer, like `LayerNormLSTM`.

    Call: ``(x [B, T, F], initial_states [1, B, H] | None)`` ->
    ``(outputs [B, T, H] or [B, H], final_states [1, B, H])``.
    """

    gates: int = 3
    num_states: int = 1

    @nn.compact
    def __call__(self, x: Float[Array, "B T F"], initial_states=None):
        self._check(x, initial_states)
        p = self._params(x.shape[-1])
        dtype = self.dtype or jnp.result_type(x, p["kernel"])
        B, T, _ = x.shape
        H, f32 = self.features, jnp.float32
        xw = jnp.einsum("btf,fg->btg", x.astype(dtype), p["kernel"].astype(dtype))
        xw = jnp.concatenate(  # input LN, (r, z) and n blocks separately, hoisted: all T
            [
                _layer_norm(
                    xw[..., : 2 * H],
                    p["ln_x_scale"][: 2 * H],
                    p["ln_x_bias"][: 2 * H],
                    self.epsilon,
                ),
                _layer_norm(
                    xw[..., 2 * H :],
                    p["ln_x_scale"][2 * H :],
                    p["ln_x_bias"][2 * H :],
                    self.epsilon,
                ),
            ],
            axis=-1,
        )
        pp = {
            k: (v.astype(dtype) if k == "recurrent_kernel" else v.astype(f32)) for k, v in p.items()
        }
        if initial_states is None:
            initial_states = jnp.zeros((1, B, H), f32)

        def step(h, xw_t):
            h = layer_norm_gru_step(pp, xw_t, h, eps=self.epsilon)
            return h, h

        h, hs = jax.lax.scan(step, initial_states[0].astype(f32), jnp.moveaxis(xw, 1, 0))
        out = jnp.moveaxis(hs, 0, 1) if self.return_sequences else h
        return out.astype(dtype), h[None].astype(dtype)
