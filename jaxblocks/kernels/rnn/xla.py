"""Fast pure-JAX `flashrnn`: one fused recurrent matmul per step and a hand-written backward.

Differences from the reference that make it fast (all exact up to rounding):

* the bias is added to the input projections outside the loop (the GRU's ``b_g``, which the
  reset gate multiplies, takes an input slot of its own: `_inputs`);
* the Gr head-wise matrices are concatenated to ``[N, D, Gr·D]`` so each step is a single batched
  matmul ``einsum('nbd,nde->nbe')`` with fp32 accumulation, in R's dtype (bf16 stays bf16 on the
  MXU / tensor cores, as in FlashRNN);
* inside the loop the states are head-major ``[N, B, D]``, so the batched matmul has its batch
  (head) dimension leading and XLA inserts no transposes per step;
* a `custom_vjp`, as torch's and cuDNN's RNNs have: the forward saves every gate's
  pre-activation (``[T, N, B, Gb·D]``, the size of ``Wx``) and the states before each step; the
  backward is one reverse scan whose step is the cells' hand-derived `pointwise_bwd` and one fused
  matmul ``dRy R_catᵀ``, and ``dR = Σ_t h_{t-1}ᵀ dRy_t`` is a single matmul over all B·T rows
  after the loop. Autodiff of the scan instead saved every intermediate of the cell, multiplied
  per gate and accumulated ``dR`` with a B-row outer product every step;
* the LSTM activates its four gates with one ``tanh`` over the contiguous pre-activations
  (`_lstm_gates`), forward and backward; the other cells use `cells.pointwise` /
  `pointwise_bwd` (`_cell`, `_cell_bwd`);
* the scans are unrolled per direction (`UNROLL`), as measured on XLA:CPU.

The matmuls take the op's ``precision`` when their operands are fp32 (HIGHEST: full fp32;
DEFAULT, "tf32": TF32 on GPUs, one bf16 pass on TPUs); bf16 operands are multiplied exactly.
On XLA:CPU most of the time outside the matmuls goes to first touches of fresh buffers (page
faults, ~0.35 ms per MB on the benchmark machine), so the residuals are laid out for the backward
and nothing is transposed twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxblocks.kernels.rnn.cells import CELLS, pointwise, pointwise_bwd

# Scan unroll, (forward, backward), the same for every cell. Measured on XLA:CPU (AMD EPYC, 2
# cores; B16 T512 N1 D256 for all four cells, also N4 D64 for the LSTM): 8 forward steps per
# iteration halve the loop overhead (16 was no better); unrolling the backward by 2, 4 or 8 made
# the LSTM and sLSTM slower and the GRU and Elman no faster.
UNROLL: tuple[int, int] = (8, 1)


def _dot_dtype(R):
    # XLA:CPU has no bf16 x bf16 -> fp32 dot; elsewhere low-precision R stays low on the MXU.
    if R.dtype == jnp.float32 or jax.default_backend() == "cpu":
        return jnp.float32
    return R.dtype


def _split(y, n: int, D: int) -> list:
    """``[..., n·D]`` -> n arrays ``[..., D]``."""
    return [y[..., g * D : (g + 1) * D] for g in range(n)]


def _inputs(Wx, b, function):
    """The gate inputs with the bias hoisted, time-major: ``[T, N, B, Gb·D]`` fp32.

    Gate g's pre-activation is ``x[g] + Ry[g]``. For the GRU the first of its Gb = 4 slots holds
    ``b_g`` (its pre-activation is ``q = b_g + Ry_g``, multiplied by the reset gate) and the
    last ``x_n + b_n`` takes no recurrent term, so ``Ry`` is padded by one slot (`_add_ry`).
    """
    B, T, G, N, D = Wx.shape
    f32 = jnp.float32
    x = Wx.astype(f32)
    if function == "gru":  # slots (g, r, z, n)
        x = jnp.concatenate([jnp.zeros((B, T, 1, N, D), f32), x], axis=2)
    x = x + b.astype(f32)[None, None]  # [B, T, Gb, N, D]
    return jnp.transpose(x, (1, 3, 0, 2, 4)).reshape(T, N, B, -1)  # [T, N, B, Gb*D]


def _add_ry(function, x_t, ry):
    """Every gate's pre-activation ``[N, B, Gb·D]``: ``x_t + Ry`` (the GRU's n slot takes none)."""
    if function == "gru":
        return jnp.concatenate([x_t[..., : ry.shape[-1]] + ry, x_t[..., ry.shape[-1] :]], -1)
    return x_t + ry


def _cell_args(function: str, pre: list) -> tuple[list, list, list]:
    """``(wx, ry, b)`` for `pointwise` / `pointwise_bwd` that reproduce the pre-activations.

    With these, `pointwise_bwd`'s bias cotangent ``d_b`` is the pre-activations' cotangent (one
    array per slot of `_inputs`, Gb in all); ``Ry``'s cotangent is its first Gr entries.
    """
    if function == "gru":  # r = σ(a_r), z = σ(a_z), n = tanh(x_n + r q)
        return pre[1:], [pre[0], 0.0, 0.0], [0.0] * 4
    return pre, [0.0] * len(pre), [0.0] * len(pre)


def _lstm_gates(pre, D: int):
    """The LSTM's four gate activations (i, f, z, o) from its pre-activations ``[..., 4·D]``
    with a single ``tanh`` over the whole contiguous array, since σ(x) = ½ tanh(½x) + ½; also
    returns ``tanh``'s output ``t`` (the derivative of every slot is ``scale² (1 − t²)``).

    Exact up to rounding, and as accurate as the per-gate form: against the fp32 reference at
    B3 T257 D48 the relative RMS is 1.0e-7 forward / 5.0e-7 worst gradient (per-gate: 8.1e-8 /
    5.0e-7); the outputs differ from the per-gate form's by ≤ 7e-7 at B16 T512 D256.

    What it buys on XLA:CPU: in a scan of the LSTM step alone at B16 D256 (T512), the pointwise
    part took ~69 µs per step with a sigmoid or tanh per gate slice and ~14 µs with this one
    ``tanh`` (the step's matmul: ~50 µs); in `flashrnn_xla` the forward took 0.84× and
    forward+backward 0.86-0.91× the time.
    """
    half, one, zero = (jnp.full((D,), v, pre.dtype) for v in (0.5, 1.0, 0.0))
    lead = (1,) * (pre.ndim - 1)
    scale = jnp.concatenate([half, half, one, half]).reshape(*lead, -1)  # σ, σ, tanh, σ
    offset = jnp.concatenate([half, half, zero, half]).reshape(*lead, -1)
    t = jnp.tanh(pre * scale)
    return _split(t * scale + offset, 4, D), t, scale


def _lstm_step(pre, states, D: int):
    """`cells.pointwise` for the LSTM from its concatenated pre-activations (`_lstm_gates`)."""
    (i, f, z, o), _, _ = _lstm_gates(pre, D)
    c = f * states[1] + i * z
    return o * jnp.tanh(c), c


def _lstm_step_bwd(pre, states, d_new, D: int):
    """`cells.pointwise_bwd` for the LSTM: ``(d pre [..., 4·D], d states)``."""
    (i, f, z, o), t, scale = _lstm_gates(pre, D)
    c = states[1]
    dh, dc = d_new
    tc = jnp.tanh(f * c + i * z)
    dct = dc + dh * o * (1.0 - tc * tc)
    d_act = jnp.concatenate([dct * z, dct * c, dct * i, dh * tc], axis=-1)
    return d_act * (scale * scale) * (1.0 - t * t), (jnp.zeros_like(dh), dct * f)


def _cell(function: str, pre, states, D: int) -> tuple:
    """The new states from one step's concatenated pre-activations ``[N, B, Gb·D]``."""
    if function == "lstm":
        return _lstm_step(pre, states, D)
    return pointwise(function, *_cell_args(function, _split(pre, CELLS[function].Gb, D)), states)


def _cell_bwd(function: str, pre, states, d_new, D: int) -> tuple:
    """``(d pre [N, B, Gb·D], d states)`` of `_cell`; ``d_new`` are the new states' cotangents."""
    if function == "lstm":
        return _lstm_step_bwd(pre, states, d_new, D)
    pre_args = _cell_args(function, _split(pre, CELLS[function].Gb, D))
    _, _, d_pre, d_states = pointwise_bwd(function, *pre_args, states, d_new)
    return jnp.concatenate(d_pre, axis=-1), d_states


def _forward(Wx, R, b, states, function, precision, unroll):
    """The forward scan: the last fp32 states ``[S, N, B, D]``, the states before every step
    ``[T, S, N, B, D]`` and every pre-activation ``[T, N, B, Gb·D]`` (the backward's residuals;
    jit drops the pre-activations when nothing differentiates).

    Writing the pre-activations over the inputs in place made XLA:CPU copy the whole buffer
    every step of the unrolled loop (3.7× slower), so they are a scan output.
    """
    cell = CELLS[function]
    f32 = jnp.float32
    B, T, G, N, D = Wx.shape
    Gr = cell.Gr
    r_cat = jnp.transpose(R, (1, 2, 0, 3)).reshape(N, D, Gr * D).astype(_dot_dtype(R))
    precision = precision if r_cat.dtype == f32 else None  # bf16 operands: exact either way

    def step(s, x_t):  # s: S states [N, B, D] fp32; x_t: [N, B, Gb*D]
        ry = jnp.einsum(  # [N, B, D] @ [N, D, Gr*D] -> [N, B, Gr*D]
            "nbd,nde->nbe",
            s[0].astype(r_cat.dtype),
            r_cat,
            preferred_element_type=f32,
            precision=precision,
        )
        pre = _add_ry(function, x_t, ry)  # [N, B, Gb*D]
        return _cell(function, pre, s, D), (jnp.stack(s), pre)

    s0 = tuple(jnp.swapaxes(states[k], 0, 1).astype(f32) for k in range(cell.S))  # [N, B, D]
    last, (s_before, pre_all) = jax.lax.scan(
        step, s0, _inputs(Wx, b, function), unroll=max(1, min(unroll, T))
    )
    return jnp.stack(last), s_before, pre_all


def _to_output(s_before, last, dtype):
    """The states before every step ``[T, S, N, B, D]`` and the last ``[S, N, B, D]`` (fp32) ->
    ``(states_all [S, B, T, N, D], last [S, B, N, D])`` in ``dtype``."""
    s_after = jnp.concatenate([s_before[1:], last[None]])  # fused into the transpose
    states_all = jnp.transpose(s_after, (1, 3, 0, 2, 4)).astype(dtype)
    return states_all, jnp.swapaxes(last, 1, 2).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flashrnn(Wx, R, b, states, function, precision, unroll):
    last, s_before, _ = _forward(Wx, R, b, states, function, precision, unroll[0])
    return _to_output(s_before, last, Wx.dtype)


def _flashrnn_fwd(Wx, R, b, states, function, precision, unroll):
    last, s_before, pre_all = _forward(Wx, R, b, states, function, precision, unroll[0])
    return _to_output(s_before, last, Wx.dtype), (R, b, states, s_before, pre_all)


def _flashrnn_bwd(function, precision, unroll, residuals, cotangents):
    R, b, states, s_before, pre_all = residuals
    d_all, d_last = cotangents  # [S, B, T, N, D], [S, B, N, D]
    cell = CELLS[function]
    f32 = jnp.float32
    B, T, N, D = d_all.shape[1:]
    G, Gr, Gb = cell.G, cell.Gr, cell.Gb
    dot_dtype = _dot_dtype(R)
    precision = precision if dot_dtype == f32 else None
    # [N, Gr*D, D]: R_catᵀ laid out once, outside the loop (a transposed operand inside the loop
    # cost XLA:CPU a copy per step)
    r_cat_t = jnp.transpose(R, (1, 0, 3, 2)).reshape(N, Gr * D, D).astype(dot_dtype)
    d_all = jnp.transpose(d_all.astype(f32), (2, 0, 3, 1, 4))  # [T, S, N, B, D]

    def step(carry, xs):  # d_s: S cotangents [N, B, D] of the states after step t
        d_s, buf = carry  # buf: the pre-activations, then their cotangents (in place)
        t, sp_t, d_t = xs
        d_new = [d_t[k] + d_s[k] for k in range(cell.S)]
        sp = [sp_t[k] for k in range(cell.S)]
        d_pre, d_sp = _cell_bwd(function, buf[t], sp, d_new, D)  # [N, B, Gb*D], S states
        dh = jnp.einsum(  # dRy [N, B, Gr*D] @ R_catᵀ [N, Gr*D, D] -> [N, B, D]
            "nbe,ned->nbd",
            d_pre[..., : Gr * D].astype(dot_dtype),
            r_cat_t,
            preferred_element_type=f32,
            precision=precision,
        )
        return ((d_sp[0] + dh, *d_sp[1:]), buf.at[t].set(d_pre)), None

    d_s_last = tuple(jnp.swapaxes(d_last[k].astype(f32), 0, 1) for k in range(cell.S))
    (d_s0, d_pre_all), _ = jax.lax.scan(  # d_pre_all: [T, N, B, Gb*D]
        step,
        (d_s_last, pre_all),
        (jnp.arange(T), s_before, d_all),
        reverse=True,
        unroll=max(1, min(unroll[1], T)),
    )
    d_rcat = jnp.einsum(  # Σ_t h_{t-1}ᵀ dRy_t: [N, D, Gr*D], one matmul over T·B rows
        "tnbd,tnbe->nde",
        s_before[:, 0].astype(dot_dtype),
        d_pre_all[..., : Gr * D].astype(dot_dtype),
        preferred_element_type=f32,
        precision=precision,
    )
    dR = jnp.transpose(d_rcat.reshape(N, D, Gr, D), (2, 0, 1, 3))  # [Gr, N, D, D]
    db = jnp.swapaxes(jnp.sum(d_pre_all, axis=(0, 2)).reshape(N, Gb, D), 0, 1)  # [Gb, N, D]
    d_x = d_pre_all[..., (Gb - G) * D :].reshape(T, N, B, G, D)  # the inputs' (bias hoisted)
    dWx = jnp.transpose(d_x, (2, 0, 3, 1, 4))  # [T, N, B, G, D] -> [B, T, G, N, D]
    d_states = jnp.swapaxes(jnp.stack(d_s0), 1, 2)  # [S, B, N, D]
    # Wx's dtype (the outputs'). The barrier materialises dWx in its own row-major layout: left
    # to itself, XLA:CPU fuses the transpose into each consumer, e.g. a projection's two
    # matmuls, and re-lays the whole array out for each (measured 30 ms against 8 ms).
    dWx = jax.lax.optimization_barrier(dWx.astype(cotangents[0].dtype))
    return dWx, dR.astype(R.dtype), db.astype(b.dtype), d_states.astype(states.dtype)


_flashrnn.defvjp(_flashrnn_fwd, _flashrnn_bwd)


def flashrnn_xla(
    Wx,
    R,
    b,
    states,
    function: str,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
    unroll: tuple[int, int] | None = None,
):
    """`flashrnn` with hoisted bias, fused head-wise matmuls, unrolled scans and a `custom_vjp`.

    ``unroll``: (forward, backward) steps per loop iteration; None takes `UNROLL`.
    """
    unroll = UNROLL if unroll is None else tuple(unroll)
    return _flashrnn(Wx, R, b, states, function, precision, unroll)


def flashrnn_step(
    wx_t, R, b, states, function: str, precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
):
    """One step (decoding): ``wx_t: [B, G, N, D]``, ``states: [S, B, N, D]`` -> new states."""
    cell = CELLS[function]
    f32 = jnp.float32
    dot_dtype = _dot_dtype(R)
    precision = precision if dot_dtype == f32 else None
    ry = jnp.einsum(
        "bnd,gnde->gbne",
        states[0].astype(dot_dtype),
        R.astype(dot_dtype),
        preferred_element_type=f32,
        precision=precision,
    )
    new = pointwise(
        function,
        [wx_t[:, g].astype(f32) for g in range(cell.G)],
        [ry[g] for g in range(cell.Gr)],
        [b[g].astype(f32)[None] for g in range(cell.Gb)],
        [states[k].astype(f32) for k in range(cell.S)],
    )
    return jnp.stack(new).astype(wx_t.dtype)
