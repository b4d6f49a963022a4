"""Public entry of the pointwise (1x1) ConvBN op: validation, then implementation dispatch.

This module is the op's public face: code outside the op folder imports `pointwise_conv_bn`
and `BlockSizes` from here (or from the package).
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxblocks.kernels.conv_bn import pallas_gpu, pallas_tpu
from jaxblocks.kernels.conv_bn._common import BlockSizes as BlockSizes
from jaxblocks.kernels.conv_bn.reference import ACTIVATIONS, pointwise_conv_bn_reference
from jaxblocks.kernels.conv_bn.xla import pointwise_conv_bn_xla
from jaxblocks.kernels.dispatch import Implementation, select_implementation
from jaxblocks.kernels.precision import resolve_precision
from jaxblocks.kernels.validation import (
    check_array,
    check_choice,
    check_nonnegative,
    describe,
)

OP = "pointwise_conv_bn"


def _ignoring_block_sizes(fn):
    """``fn`` called as the Pallas implementations are, ``block_sizes`` dropped (no blocks)."""

    def run(*args, block_sizes=None, **kwargs):
        del block_sizes
        return fn(*args, **kwargs)

    return run


# Every entry takes (x [M, C_in], w, scale, bias, mean, var, conv_bias, *, epsilon, activation,
# block_sizes, precision); `supports` the same arguments. ``precision`` is a resolved
# `jax.lax.Precision`.
IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(_ignoring_block_sizes(pointwise_conv_bn_reference)),
    "xla": Implementation(_ignoring_block_sizes(pointwise_conv_bn_xla)),
    "pallas_gpu": Implementation(
        pallas_gpu.pointwise_conv_bn_pallas_gpu, supports=pallas_gpu.supports
    ),
    "pallas_tpu": Implementation(
        pallas_tpu.pointwise_conv_bn_pallas_tpu, supports=pallas_tpu.supports
    ),
}


def pointwise_conv_bn(
    x: Float[Array, "*B Cin"],
    w: Float[Array, "Cin Cout"],
    scale: Float[Array, " Cout"],
    bias: Float[Array, " Cout"],
    mean: Float[Array, " Cout"],
    var: Float[Array, " Cout"],
    *,
    conv_bias: Float[Array, " Cout"] | None = None,
    epsilon: float = 1e-5,
    activation: str | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    precision: str = "highest",
) -> Float[Array, "*B Cout"]:
    """Pointwise (1x1) convolution with the BatchNorm folded in and an activation fused.

    Tune mode of "Efficient ConvBN Blocks for Transfer Learning and Beyond"
    (https://arxiv.org/abs/2305.11624): the BatchNorm on running statistics is folded into the
    convolution weight on the fly, inside autodiff, so outputs and gradients equal the unfolded
    conv -> BN -> activation (Eval mode) while the backward keeps only ``x`` (plus the output for
    relu/relu6, the pre-activation for silu/gelu) instead of the conv output as well. For a 1x1
    stride-1 convolution this is one matmul with a fold prologue and a bias+activation epilogue::

        s = scale * rsqrt(var + epsilon)                          (fp32)
        y = act(x @ (w * s) + (bias + s * (conv_bias - mean)))

    The fold is computed in fp32 and the folded weight cast to ``x.dtype`` for the matmul, which
    accumulates in fp32. ``mean`` and ``var`` are running statistics: constants of the step,
    their cotangent is zero. Gradients flow to ``x``, ``w``, ``scale``, ``bias``, ``conv_bias``.

    Args:
      x: input [..., C_in], any leading dims (flattened to M rows); float32, bfloat16, float16.
        M = 0 (empty leading dims) gives an empty [..., C_out] output.
      w: 1x1 convolution weight [C_in, C_out] (any float dtype; folded in fp32).
      scale, bias: BatchNorm affine parameters [C_out].
      mean, var: BatchNorm running statistics [C_out] (biased variance, as flax.linen.BatchNorm).
        The variance must be non-negative: checked when its values are concrete (outside
        ``jit``); under ``jit`` a negative entry gives NaN in that output channel.
      conv_bias: optional convolution bias [C_out].
      epsilon: BatchNorm epsilon, a positive Python float (with 0, a channel whose running
        variance is 0 would divide by zero).
      activation: None, "relu", "relu6", "silu" or "gelu" (tanh approximation, as
        `jax.nn.gelu`'s default).
      implementation: None (automatic: "pallas_gpu" on GPU, "pallas_tpu" on TPU, "xla"
        elsewhere), or one of "reference", "xla", "pallas_gpu", "pallas_tpu".
      block_sizes: tile sizes of the Pallas kernels (`BlockSizes`); None, or a None field,
        takes each backend's defaults. The reference and xla implementations have no blocks
        and ignore it. Sizes the chosen Pallas backend cannot tile with make it unsupported
        (an explicit ``implementation`` raises, automatic dispatch falls back), as do sizes
        whose estimated registers, shared memory (GPU) or VMEM (TPU) per program exceed an
        H100 SM / a TPU v5e core (`_common.working_set`; the reason names the kernel).
      precision: "highest" (default) or "tf32": how fp32 operands of the matmuls (forward, dx,
        dw') are multiplied in every implementation: "highest" in full fp32 (IEEE FMAs in
        Triton, the multi-pass algorithm on the MXU, fp32 in XLA), "tf32" on TF32 tensor cores
        (GPU) or one bf16 MXU pass (TPU). bf16/fp16 operands are exact either way (see
        `jaxblocks.kernels.precision`).

    Returns:
      y [..., C_out] in ``x.dtype``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 32)) * 0.25
      >>> ones, zeros = jnp.ones(32), jnp.zeros(32)
      >>> pointwise_conv_bn(x, w, ones, zeros, zeros, ones, activation="relu").shape
      (2, 8, 8, 32)
    """
    check_array(OP, "x", x)
    if x.ndim < 1:
        raise ValueError(f"{OP}: x must have rank >= 1 ([..., C_in]), got {describe(x)}")
    check_array(OP, "w", w, ndim=2, min_size=1)
    c_in, c_out = w.shape
    if x.shape[-1] != c_in:
        raise ValueError(
            f"{OP}: x's last dim (C_in) must equal w.shape[0]={c_in} (w is [C_in, C_out]), "
            f"got x {describe(x)} and w {describe(w)}"
        )
    for name, v in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
        check_array(OP, name, v, shape=(c_out,))
    if conv_bias is not None:
        check_array(OP, "conv_bias", conv_bias, shape=(c_out,))
    check_nonnegative(OP, "var", var, " (a running variance)")
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, numbers.Real)
        or not epsilon > 0  # also rejects NaN; 0 turns a zero variance into NaN outputs
        or not math.isfinite(epsilon)
    ):
        raise ValueError(f"{OP}: epsilon must be a positive finite Python float, got {epsilon!r}")
    check_choice(OP, "activation", activation, list(ACTIVATIONS))
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"{OP}: block_sizes must be None or a jaxblocks.kernels.conv_bn.BlockSizes, "
            f"got {type(block_sizes).__name__}"
        )

    prec = resolve_precision(OP, precision)

    x2d = x.reshape(-1, c_in)  # [M, C_in]
    kwargs = dict(
        epsilon=float(epsilon), activation=activation, block_sizes=block_sizes, precision=prec
    )
    _, fn = select_implementation(
        OP, implementation, IMPLEMENTATIONS, x2d, w, scale, bias, mean, var, conv_bias, **kwargs
    )
    y = fn(x2d, w, scale, bias, mean, var, conv_bias, **kwargs)  # [M, C_out]
    return jnp.reshape(y, (*x.shape[:-1], c_out))
