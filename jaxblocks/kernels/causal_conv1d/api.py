"""Public entry of the `causal_conv1d` op: validation, then implementation dispatch.

This module is the op's public face: code outside the op folder imports `causal_conv1d` and
`BlockSizes` from here (or from the package).
"""

from __future__ import annotations

from jaxblocks.kernels.causal_conv1d import pallas_gpu, pallas_tpu
from jaxblocks.kernels.causal_conv1d._common import MAX_TAPS
from jaxblocks.kernels.causal_conv1d._common import BlockSizes as BlockSizes
from jaxblocks.kernels.causal_conv1d.reference import causal_conv1d_reference
from jaxblocks.kernels.causal_conv1d.xla import causal_conv1d_xla
from jaxblocks.kernels.dispatch import Implementation, select_implementation
from jaxblocks.kernels.precision import resolve_precision
from jaxblocks.kernels.validation import check_array, check_choice, describe
from jaxblocks.typing import Array, Float

OP = "causal_conv1d"
_ACTIVATIONS = (None, "silu", "swish")


def _reference(x, w, bias=None, activation=None, *, block_sizes, precision):
    # No blocks: block_sizes is ignored; the tap loop is elementwise fp32: so is precision.
    return causal_conv1d_reference(x, w, bias, activation)


def _xla(x, w, bias=None, activation=None, *, block_sizes, precision):
    # No blocks: block_sizes is ignored.
    return causal_conv1d_xla(x, w, bias, activation, precision=precision)


# Every entry takes (x [B, T, C], w [W, C], bias, activation, *, block_sizes, precision);
# `supports` the same arguments.
IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(_reference),
    "xla": Implementation(_xla),
    "pallas_gpu": Implementation(pallas_gpu.causal_conv1d_pallas_gpu, supports=pallas_gpu.supports),
    "pallas_tpu": Implementation(pallas_tpu.causal_conv1d_pallas_tpu, supports=pallas_tpu.supports),
}


def causal_conv1d(
    x: Float[Array, "B T C"],
    w: Float[Array, "W C"],
    bias: Float[Array, " C"] | None = None,
    activation: str | None = None,
    *,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    precision: str = "highest",
) -> Float[Array, "B T C"]:
    """Short depthwise causal convolution (Mamba, https://arxiv.org/abs/2312.00752; GLA's conv).

    ``y[t, c] = act(bias[c] + Σ_j w[j, c] · x[t − W + 1 + j, c])``, channels last, W ≤ 8 taps:
    the short-range sibling of `jaxblocks.kernels.long_conv.fft_conv` (the newest input is
    multiplied by ``w[W − 1]``).

    Args:
      x: [B, T, C]; the output has its dtype.
      w: taps [W, C], 1 ≤ W ≤ 8. bias: optional [C].
      activation: None or "silu" ("swish" is an alias).
      implementation: None (automatic), "reference", "xla", "pallas_gpu" or "pallas_tpu".
      block_sizes: tile sizes of the Pallas kernels (`BlockSizes`); None, or a None field,
        takes each backend's defaults. The reference and xla implementations have no blocks
        and ignore it. Sizes the chosen Pallas backend cannot tile with make it unsupported
        (an explicit ``implementation`` raises, automatic dispatch falls back), as do sizes
        whose per-program working set cannot fit a GPU SM / TPU core (`_common.working_set`).
      precision: "highest" (default) or "tf32" (`jaxblocks.kernels.precision`), for a uniform
        signature across ops. The reference and both Pallas kernels are elementwise (W fp32
        multiply-adds per output, no matrix products) and ignore it; it sets the precision of
        the ``xla`` path's grouped convolution.

    Returns:
      y: [B, T, C] in ``x.dtype``.

    Example:
      >>> causal_conv1d(jnp.ones((1, 5, 3)), jnp.ones((4, 3))).shape
      (1, 5, 3)
    """
    check_array(OP, "x", x, ndim=3)
    B, T, C = x.shape
    if T == 0:
        raise ValueError(f"{OP}: x must have a non-empty time axis T, got {describe(x)}")
    check_array(OP, "w", w, shape=(None, C))
    if not 1 <= w.shape[0] <= MAX_TAPS:
        raise ValueError(
            f"{OP}: w must have shape (W, C={C}) with 1 <= W <= {MAX_TAPS}, "
            f"got {describe(w)}; use fft_conv for long kernels"
        )
    if bias is not None:
        check_array(OP, "bias", bias, shape=(C,))
    check_choice(OP, "activation", activation, _ACTIVATIONS)
    check_choice(OP, "implementation", implementation, (None, *IMPLEMENTATIONS))
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"{OP}: block_sizes must be None or a jaxblocks.kernels.causal_conv1d.BlockSizes, "
            f"got {type(block_sizes).__name__}"
        )
    prec = resolve_precision(OP, precision)
    act = "silu" if activation == "swish" else activation
    kw = dict(block_sizes=block_sizes, precision=prec)
    _, fn = select_implementation(OP, implementation, IMPLEMENTATIONS, x, w, bias, act, **kw)
    return fn(x, w, bias, act, **kw)
