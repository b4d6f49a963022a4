"""Fast pure-JAX `flashrnn`: one fused recurrent matmul per step inside an unrolled `lax.scan`.

Differences from the reference that make it fast (all exact up to rounding):

* the bias is added to the input projections once for the whole sequence, outside the loop
  (for the GRU only ``b_g`` stays inside: it is multiplied by the reset gate);
* the Gr head-wise matrices are concatenated to ``[N, D, Gr·D]`` so each step is a single batched
  matmul ``einsum('nbd,nde->nbe')`` with fp32 accumulation, in R's dtype (bf16 stays bf16 on the
  MXU / tensor cores, as in FlashRNN);
* inside the loop the states are head-major ``[N, B, D]``, so the batched matmul has its batch
  (head) dimension leading and XLA inserts no transposes per step;
* the scan is unrolled (``unroll`` steps per loop iteration, 2 by default) so XLA fuses the cell of
  consecutive steps and amortises the loop overhead;
* the per-step outputs are stored in the input dtype.

The matmul takes the op's ``precision`` when its operands are fp32 (HIGHEST: full fp32; DEFAULT,
"tf32": TF32 on GPUs, one bf16 pass on TPUs); bf16 operands are multiplied exactly either way.
Gradients come from autodiff of the scan, whose transposed products keep that precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxblocks.kernels.rnn.cells import CELLS, pointwise

DEFAULT_UNROLL = 2  # XLA:CPU: 8 is ~10% faster forward but 4-6x slower backward (sLSTM)


def _dot_dtype(R):
    # XLA:CPU has no bf16 x bf16 -> fp32 dot; elsewhere low-precision R stays low on the MXU.
    if R.dtype == jnp.float32 or jax.default_backend() == "cpu":
        return jnp.float32
    return R.dtype


def flashrnn_xla(
    Wx,
    R,
    b,
    states,
    function: str,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
    unroll: int = DEFAULT_UNROLL,
):
    """`flashrnn` with hoisted bias, fused head-wise matmul and an unrolled scan.

    Inside the loop everything is head-major (``[N, B, D]``) so the per-step batched matmul has
    its batch dimension leading and needs no transposes.
    """
    cell = CELLS[function]
    f32 = jnp.float32
    B, T, G, N, D = Wx.shape
    b32 = b.astype(f32)
    if function == "gru":
        # input gates (r, z, n) take biases b[1:4]; b_g stays in the loop (it is gated by r).
        xb = Wx.astype(f32) + b32[1:][None, None]
        bias_in = [b32[0][:, None], 0.0, 0.0, 0.0]  # [N, 1, D]
    else:
        xb = Wx.astype(f32) + b32[None, None]
        bias_in = [0.0] * cell.Gb
    xb = jnp.transpose(xb, (1, 2, 3, 0, 4))  # [T, G, N, B, D]
    r_cat = jnp.transpose(R, (1, 2, 0, 3)).reshape(N, D, cell.Gr * D)  # [N, D, Gr*D]
    dot_dtype = _dot_dtype(R)
    r_cat = r_cat.astype(dot_dtype)
    precision = precision if dot_dtype == f32 else None  # bf16 operands: exact either way

    def step(s, x_t):  # s: tuple of S [N, B, D] fp32, x_t: [G, N, B, D]
        ry = jnp.einsum(  # [N, B, D] @ [N, D, Gr*D] -> [N, B, Gr*D]
            "nbd,nde->nbe",
            s[0].astype(dot_dtype),
            r_cat,
            preferred_element_type=f32,
            precision=precision,
        )
        new = pointwise(
            function,
            [x_t[g] for g in range(G)],
            [ry[..., g * D : (g + 1) * D] for g in range(cell.Gr)],
            bias_in,
            s,
        )
        return new, jnp.stack(new).astype(Wx.dtype)

    s0 = tuple(jnp.swapaxes(states[k], 0, 1).astype(f32) for k in range(cell.S))  # [N, B, D]
    last, all_t = jax.lax.scan(step, s0, xb, unroll=max(1, min(unroll, T)))
    states_all = jnp.transpose(all_t, (1, 3, 0, 2, 4))  # [T, S, N, B, D] -> [S, B, T, N, D]
    last = jnp.swapaxes(jnp.stack(last), 1, 2).astype(Wx.dtype)  # [S, B, N, D]
    return states_all, last


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
