"""The FlashRNN recurrence, step by step in fp32: the specification of `flashrnn`.

For ``t = 0 .. T-1``, with ``h = s[0]`` the first state and per head ``n``:

    Ry[b, g, n, e] = Σ_d h[b, n, d] · R[g, n, d, e]              (head-wise recurrent matmul)
    s_{t+1}        = cell(Wx[:, t], Ry, b, s_t)                   (see `cells.pointwise`)

``states_all[:, :, t]`` is the state after step ``t`` and ``last_states`` the state after the last
step. The cells (FlashRNN's math) with ``raw = Wx + Ry + b``:

* lstm  (h, c):       c' = σ(f)c + σ(i)tanh(z),  h' = σ(o)tanh(c')
* slstm (y, c, n, m): m' = max(i, logσ(f) + m) (= i where n = 0), i' = exp(i − m'),
                      f' = exp(logσ(f) + m − m'), c' = f'c + i'tanh(z), n' = max(f'n + i', 1),
                      y' = σ(o)c'/n'
* gru   (h):          r = σ(Wr + Rr + br), z = σ(Wz + Rz + bz),
                      h' = z h + (1 − z) tanh(Wn + bn + r(Rg + bg))
* elman (h):          h' = tanh(raw)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxblocks.kernels.rnn.cells import CELLS, pointwise


def flashrnn_reference(
    Wx, R, b, states, function: str, precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
):
    """`flashrnn` as a `lax.scan` over time in fp32; outputs are cast to ``Wx.dtype``.

    ``Ry`` is computed at ``precision`` (HIGHEST: the fp32 specification; DEFAULT: what "tf32"
    asks for of the fp32 products on an accelerator; the same on CPU).
    """
    cell = CELLS[function]
    f32 = jnp.float32
    wx32, r32, b32, s32 = (x.astype(f32) for x in (Wx, R, b, states))
    bias = [b32[g][None] for g in range(cell.Gb)]  # [1, N, D] each

    def step(s, wx_t):  # s: [S, B, N, D], wx_t: [B, G, N, D]
        ry = jnp.einsum("bnd,gnde->gbne", s[0], r32, precision=precision)  # [B,N,D]@[G,N,D,D]
        new = pointwise(
            function,
            [wx_t[:, g] for g in range(cell.G)],
            [ry[g] for g in range(cell.Gr)],
            bias,
            [s[k] for k in range(cell.S)],
        )
        new = jnp.stack(new)
        return new, new

    last, all_t = jax.lax.scan(step, s32, jnp.moveaxis(wx32, 1, 0))
    states_all = jnp.moveaxis(all_t, 0, 2)  # [T, S, B, N, D] -> [S, B, T, N, D]
    return states_all.astype(Wx.dtype), last.astype(Wx.dtype)
