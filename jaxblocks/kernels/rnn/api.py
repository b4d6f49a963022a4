"""`flashrnn`: head-wise LSTM / sLSTM / GRU / Elman recurrences (FlashRNN, arXiv 2412.07752).

`flashrnn` validates its arguments and dispatches to ``reference`` (`lax.scan`, fp32), ``xla``
(unrolled scan with one fused head-wise matmul per step; the CPU default), ``pallas_gpu`` (Triton
kernels, R resident on chip for the whole sequence) or ``pallas_tpu`` (Mosaic kernels, time as
the innermost sequential grid axis). `flashrnn_step` is one step, for decoding. This module is
the op's public face: code outside the op folder imports `flashrnn`, `flashrnn_step`,
`BlockSizes` and `CELLS` from here.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.kernels.dispatch import Implementation, select_implementation
from jaxblocks.kernels.precision import resolve_precision
from jaxblocks.kernels.rnn import pallas_gpu, pallas_tpu
from jaxblocks.kernels.rnn._common import BlockSizes as BlockSizes
from jaxblocks.kernels.rnn.cells import CELLS as CELLS
from jaxblocks.kernels.rnn.reference import flashrnn_reference
from jaxblocks.kernels.rnn.xla import flashrnn_step as _step
from jaxblocks.kernels.rnn.xla import flashrnn_xla
from jaxblocks.kernels.validation import check_array, check_choice

OP = "flashrnn"


def _reference(Wx, R, b, states, function, block_sizes, precision):
    return flashrnn_reference(Wx, R, b, states, function, precision)  # no blocks to size


def _xla(Wx, R, b, states, function, block_sizes, precision):
    return flashrnn_xla(Wx, R, b, states, function, precision)  # no blocks to size


# Every entry takes (Wx, R, b, states, function, block_sizes, precision) with precision a
# `jax.lax.Precision`; `supports` the same arguments.
IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(_reference),
    "xla": Implementation(_xla),
    "pallas_gpu": Implementation(pallas_gpu.flashrnn_pallas_gpu, pallas_gpu.supports),
    "pallas_tpu": Implementation(pallas_tpu.flashrnn_pallas_tpu, pallas_tpu.supports),
}


def _validate(op, Wx, R, b, states, function, *, step=False):
    if not isinstance(function, str):
        raise TypeError(
            f"{op}: function must be one of {list(CELLS)}, got {type(function).__name__} "
            f"{function!r}"
        )
    check_choice(op, "function", function, list(CELLS))
    cell = CELLS[function]
    if step:
        check_array(op, "Wx", Wx, ndim=4)
        B, G, N, D = Wx.shape
        layout = "[B, G, N, D]"
    else:
        check_array(op, "Wx", Wx, ndim=5)
        B, _, G, N, D = Wx.shape
        layout = "[B, T, G, N, D]"
    if G != cell.G:
        raise ValueError(
            f"{op}: Wx {layout} must have G={cell.G} gate inputs for function={function!r} "
            f"(gates {cell.gate_names}), got shape {tuple(Wx.shape)}"
        )
    if B == 0 or N == 0 or D == 0:
        raise ValueError(f"{op}: Wx must have non-empty B, N, D, got shape {tuple(Wx.shape)}")
    check_array(op, "R", R, shape=(cell.Gr, N, D, D))
    check_array(op, "b", b, shape=(cell.Gb, N, D))
    if states is not None:
        check_array(op, "states", states, shape=(cell.S, B, N, D))


def flashrnn(
    Wx: Float[Array, "B T G N D"],
    R: Float[Array, "Gr N D D"],
    b: Float[Array, "Gb N D"],
    states: Float[Array, "S B N D"] | None = None,
    *,
    function: str = "lstm",
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    precision: str = "highest",
) -> tuple[Float[Array, "S B T N D"], Float[Array, "S B N D"]]:
    """FlashRNN's head-wise recurrence (arXiv 2412.07752): `R` is block-diagonal over N heads.

    Runs ``s_{t+1} = cell(Wx[:, t], Ry_t, b, s_t)`` with ``Ry[b,g,n,e] = Σ_d h[b,n,d] R[g,n,d,e]``
    (``h = s[0]``) for the cells of FlashRNN (see `reference.flashrnn_reference`). Unlike a
    cuDNN LSTM it takes precomputed input projections and head-wise recurrent matrices, and it has
    four cells with one interface. Accumulation is fp32 in every implementation.

    Args:
      Wx: input pre-activations ``[B, T, G, N, D]`` (G = 4 lstm/slstm, 3 gru (r, z, n), 1 elman).
      R: recurrent weights ``[Gr, N, D, D]`` (Gr = G, but 3 for gru: (g, r, z)).
      b: biases ``[Gb, N, D]`` (Gb = G, but 4 for gru: (g, r, z, n)).
      states: initial states ``[S, B, N, D]`` (S = 2 lstm (h, c), 4 slstm (y, c, n, m), 1 gru /
        elman); zeros when None.
      function: "lstm", "slstm", "gru" or "elman".
      implementation: None (automatic), "reference", "xla", "pallas_gpu" or "pallas_tpu".
      block_sizes: tile sizes of the Pallas kernels (`BlockSizes`); None takes each backend's
        defaults. The reference and xla implementations have no blocks and ignore it.
      precision: how the recurrent products (``h R`` forward; ``h R``, ``hᵀ dRy``, ``dRy Rᵀ``
        backward) multiply fp32 operands in every implementation: "highest" (default; IEEE fp32
        on GPU, multi-pass bf16 on TPU) or "tf32" (TF32 tensor cores on GPU, one bf16 pass on
        TPU, ~1e-3 relative error per product). bf16 ``R`` is multiplied exactly either way.
        See `jaxblocks.kernels.precision` and the op's README.

    Returns:
      ``(states_all [S, B, T, N, D], last_states [S, B, N, D])`` in ``Wx.dtype``: the states after
      every step and after the last one (the initial states when T = 0).

    Gradients: every implementation but ``reference`` is a `jax.custom_vjp` (reverse mode, as
    torch's and cuDNN's RNNs; its backward is differentiable again, so Hessian-vector products
    work). Forward mode (`jax.jvp`, `jax.jacfwd`) needs ``implementation="reference"``.

    Non-finite values are IEEE arithmetic, not checked: a NaN or inf in ``Wx`` at step t (or in
    ``states``) reaches the states of its batch row and head from that step on (heads are
    independent: ``R`` is block-diagonal), never another row or head; a NaN in ``R`` or ``b``
    reaches every row of its head. Empty batches (B = 0) and heads (N or D = 0) are errors; an
    empty sequence (T = 0) is not.

    Example:
      >>> import jax.numpy as jnp
      >>> Wx = jnp.ones((2, 5, 4, 3, 16)); R = jnp.zeros((4, 3, 16, 16)); b = jnp.zeros((4, 3, 16))
      >>> flashrnn(Wx, R, b)[0].shape
      (2, 2, 5, 3, 16)
    """
    _validate(OP, Wx, R, b, states, function)
    lax_precision = resolve_precision(OP, precision)
    if implementation is not None and not isinstance(implementation, str):
        raise TypeError(
            f"{OP}: implementation must be None or a str, "
            f"got {type(implementation).__name__} {implementation!r}"
        )
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"{OP}: block_sizes must be None or a jaxblocks.kernels.rnn.BlockSizes, "
            f"got {type(block_sizes).__name__}"
        )
    cell = CELLS[function]
    B, T, G, N, D = Wx.shape
    if states is None:
        states = jnp.zeros((cell.S, B, N, D), Wx.dtype)
    if T == 0:  # an empty sequence: no step, the initial states come back
        return jnp.zeros((cell.S, B, 0, N, D), Wx.dtype), states.astype(Wx.dtype)
    args = (Wx, R, b, states, function, block_sizes, lax_precision)
    _, fn = select_implementation(OP, implementation, IMPLEMENTATIONS, *args)
    return fn(*args)


def flashrnn_step(
    Wx: Float[Array, "B G N D"],
    R: Float[Array, "Gr N D D"],
    b: Float[Array, "Gb N D"],
    states: Float[Array, "S B N D"],
    *,
    function: str = "lstm",
    precision: str = "highest",
) -> Float[Array, "S B N D"]:
    """One step of `flashrnn` for decoding: the new states ``[S, B, N, D]`` in ``Wx.dtype``.

    ``flashrnn_step(Wx[:, t], R, b, s)`` equals ``flashrnn(Wx[:, t:t+1], R, b, s)[1]``; it runs
    the xla form (one einsum for ``h R`` at ``precision``, as in `flashrnn`).
    """
    op = "flashrnn_step"
    _validate(op, Wx, R, b, states, function, step=True)
    return _step(Wx, R, b, states, function, resolve_precision(op, precision))
