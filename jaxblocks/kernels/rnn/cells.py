"""The four FlashRNN cells: sizes, pointwise forward and hand-derived pointwise backward.

Shared by every implementation (the reference differentiates `pointwise` with autodiff; the Pallas
kernels call `pointwise_bwd`, which is derived in README.md and checked against autodiff in the
tests). Everything here works on lists of equally shaped fp32 arrays (one per gate / state) and
uses only primitives that both Pallas backends lower (no ``log1p``, no ``softplus``).

Ties are resolved explicitly with ``where`` so that autodiff of `pointwise` and `pointwise_bwd`
agree exactly, also at the first sLSTM step from a zero state where ``n' = max(1, 1)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Cell:
    """Sizes of one cell: states S, input gates G, recurrent gates Gr, bias gates Gb."""

    name: str
    S: int
    G: int
    Gr: int
    Gb: int
    state_names: tuple[str, ...]
    gate_names: tuple[str, ...]


CELLS: dict[str, Cell] = {
    "lstm": Cell("lstm", 2, 4, 4, 4, ("h", "c"), ("i", "f", "z", "o")),
    "slstm": Cell("slstm", 4, 4, 4, 4, ("y", "c", "n", "m"), ("i", "f", "z", "o")),
    # GRU: recurrent gates (g, r, z), input gates (r, z, n), biases (g, r, z, n).
    "gru": Cell("gru", 1, 3, 3, 4, ("h",), ("r", "z", "n")),
    "elman": Cell("elman", 1, 1, 1, 1, ("h",), ("h",)),
}


def _sigmoid(x):
    return jax.nn.sigmoid(x)


def log_sigmoid(x):
    """log σ(x) = min(x, 0) − log(1 + exp(−|x|)), stable for any x (no log1p: Triton lacks it)."""
    return jnp.minimum(x, 0.0) - jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


def _forget(fresh, x):
    """sLSTM's f' = exp(log σ(f) + m − m'), and 0 at a fresh state (n = 0).

    Away from a fresh state x ≤ 0 since m' ≥ log σ(f) + m. At a fresh state m' = i, so x could be
    large (exp(300) overflows fp32 and inf · c = inf · 0 = NaN); f' only multiplies c = n = 0
    there, so 0 is the value. The inner ``where`` keeps the unused exp finite for autodiff.
    """
    return jnp.where(fresh, 0.0, jnp.exp(jnp.where(fresh, 0.0, x)))


def pointwise(function: str, wx: Sequence, ry: Sequence, b: Sequence, states: Sequence) -> tuple:
    """One step of ``function`` after the recurrent matmul.

    Args:
      wx: G input pre-activations, ry: Gr recurrent pre-activations (``h @ R``), b: Gb biases
        (anything broadcastable against ``wx[0]``), states: S previous states.
    Returns:
      the S new states.
    """
    if function == "lstm":
        ri, rf, rz, ro = (wx[g] + ry[g] + b[g] for g in range(4))
        _, c = states
        c_new = _sigmoid(rf) * c + _sigmoid(ri) * jnp.tanh(rz)
        h_new = _sigmoid(ro) * jnp.tanh(c_new)
        return h_new, c_new
    if function == "slstm":
        ri, rf, rz, ro = (wx[g] + ry[g] + b[g] for g in range(4))
        _, c, n, m = states
        lfm = log_sigmoid(rf) + m
        fresh = n == 0.0
        # m' = i at a fresh (n == 0) state, else max(i, log σ(f) + m); ties go to i.
        m_new = jnp.where(fresh | (ri >= lfm), ri, lfm)
        ig = jnp.exp(ri - m_new)
        fg = _forget(fresh, lfm - m_new)
        c_new = fg * c + ig * jnp.tanh(rz)
        u = fg * n + ig
        n_new = jnp.where(u > 1.0, u, 1.0)
        y_new = _sigmoid(ro) * c_new / n_new
        return y_new, c_new, n_new, m_new
    if function == "gru":
        (h,) = states
        r = _sigmoid(wx[0] + ry[1] + b[1])
        z = _sigmoid(wx[1] + ry[2] + b[2])
        n = jnp.tanh(wx[2] + b[3] + r * (ry[0] + b[0]))
        return (z * h + (1.0 - z) * n,)
    if function == "elman":
        return (jnp.tanh(wx[0] + ry[0] + b[0]),)
    raise ValueError(f"unknown function {function!r}; expected one of {list(CELLS)}")


def pointwise_bwd(
    function: str, wx: Sequence, ry: Sequence, b: Sequence, states: Sequence, d_new: Sequence
) -> tuple[tuple, tuple, tuple, tuple]:
    """Cotangents of `pointwise` (recomputing its forward), given the new states' cotangents.

    Returns ``(d_wx, d_ry, d_b, d_states)``: G, Gr, Gb (per element, still to be summed over the
    batch by the caller) and S arrays. The hidden state's cotangent excludes the path through
    ``ry`` (the caller adds ``d_ry @ Rᵀ``).
    """
    if function == "lstm":
        ri, rf, rz, ro = (wx[g] + ry[g] + b[g] for g in range(4))
        _, c = states
        dh, dc = d_new
        i, f, o, z = _sigmoid(ri), _sigmoid(rf), _sigmoid(ro), jnp.tanh(rz)
        c_new = f * c + i * z
        tc = jnp.tanh(c_new)
        dct = dc + dh * o * (1.0 - tc * tc)
        d_ri = dct * z * i * (1.0 - i)
        d_rf = dct * c * f * (1.0 - f)
        d_rz = dct * i * (1.0 - z * z)
        d_ro = dh * tc * o * (1.0 - o)
        draw = (d_ri, d_rf, d_rz, d_ro)
        return draw, draw, draw, (jnp.zeros_like(dh), dct * f)
    if function == "slstm":
        ri, rf, rz, ro = (wx[g] + ry[g] + b[g] for g in range(4))
        _, c, n, m = states
        dy, dc, dn, dm = d_new
        lfm = log_sigmoid(rf) + m
        fresh = n == 0.0
        sel_i = fresh | (ri >= lfm)
        m_new = jnp.where(sel_i, ri, lfm)
        ig = jnp.exp(ri - m_new)
        fg = _forget(fresh, lfm - m_new)
        zt = jnp.tanh(rz)
        c_new = fg * c + ig * zt
        u = fg * n + ig
        n_new = jnp.where(u > 1.0, u, 1.0)
        o = _sigmoid(ro)
        inv_n = 1.0 / n_new
        # y' = o · c'/n'
        d_ro = dy * c_new * inv_n * o * (1.0 - o)
        dct = dc + dy * o * inv_n
        dnt = dn - dy * o * c_new * inv_n * inv_n
        du = jnp.where(u > 1.0, dnt, 0.0)
        # c' = fg c + ig tanh(z),  u = fg n + ig
        d_fg = dct * c + du * n
        d_ig = dct * zt + du
        d_rz = dct * ig * (1.0 - zt * zt)
        # ig = exp(i − m'),  fg = exp(lfm − m')
        d_mt = dm - d_ig * ig - d_fg * fg
        d_ri = d_ig * ig + jnp.where(sel_i, d_mt, 0.0)
        d_lfm = d_fg * fg + jnp.where(sel_i, 0.0, d_mt)
        d_rf = d_lfm * _sigmoid(-rf)  # d log σ(f) / df = σ(−f)
        draw = (d_ri, d_rf, d_rz, d_ro)
        return draw, draw, draw, (jnp.zeros_like(dy), dct * fg, du * fg, d_lfm)
    if function == "gru":
        (h,) = states
        (dh_new,) = d_new
        r = _sigmoid(wx[0] + ry[1] + b[1])
        z = _sigmoid(wx[1] + ry[2] + b[2])
        q = ry[0] + b[0]
        nv = jnp.tanh(wx[2] + b[3] + r * q)
        d_an = dh_new * (1.0 - z) * (1.0 - nv * nv)
        d_ar = d_an * q * r * (1.0 - r)
        d_az = dh_new * (h - nv) * z * (1.0 - z)
        d_q = d_an * r
        return (d_ar, d_az, d_an), (d_q, d_ar, d_az), (d_q, d_ar, d_az, d_an), (dh_new * z,)
    if function == "elman":
        h_new = jnp.tanh(wx[0] + ry[0] + b[0])
        (dh,) = d_new
        draw = (dh * (1.0 - h_new * h_new),)
        return draw, draw, draw, (jnp.zeros_like(dh),)
    raise ValueError(f"unknown function {function!r}; expected one of {list(CELLS)}")
