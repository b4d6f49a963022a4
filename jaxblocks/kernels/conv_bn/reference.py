"""The specification of `pointwise_conv_bn`: a 1x1 convolution, BatchNorm on running statistics,
then an activation, computed unfolded in fp32.

With ``x`` flattened to rows ``x[m, i]`` (m over every leading position, i over C_in):

    conv[m, o] = sum_i x[m, i] * w[i, o] + conv_bias[o]
    bn[m, o]   = scale[o] * (conv[m, o] - mean[o]) / sqrt(var[o] + epsilon) + bias[o]
    y[m, o]    = act(bn[m, o])

``mean`` and ``var`` are running statistics, constants of the step: their cotangent is zero
(they are wrapped in `lax.stop_gradient`, so autodiff of this function agrees with every
implementation's custom VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# The activations the op fuses. "gelu" is the tanh approximation (`jax.nn.gelu`'s and
# `flax.linen.gelu`'s default).
ACTIVATIONS = {
    None: lambda z: z,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
}


def pointwise_conv_bn_reference(
    x,
    w,
    scale,
    bias,
    mean,
    var,
    conv_bias=None,
    *,
    epsilon=1e-5,
    activation=None,
    precision: lax.Precision = lax.Precision.HIGHEST,
):
    """act(BN(x @ w + conv_bias)) in fp32, unfolded; returns ``x.dtype``.

    Args:
      x: [..., C_in]; w: [C_in, C_out]; scale, bias, mean, var, conv_bias: [C_out].
      precision: of the one matmul (HIGHEST: full fp32, the specification).
    """
    f32 = lambda a: a.astype(jnp.float32)
    mean = lax.stop_gradient(f32(mean))
    var = lax.stop_gradient(f32(var))
    conv = jnp.einsum("...i,io->...o", f32(x), f32(w), precision=precision)
    per_channel = lambda v: jnp.reshape(v, (1,) * (conv.ndim - 1) + (-1,))  # [1, ..., C_out]
    if conv_bias is not None:
        conv = conv + per_channel(f32(conv_bias))
    std = jnp.sqrt(var + epsilon)
    bn = per_channel(f32(scale)) * (conv - per_channel(mean)) / per_channel(std)
    bn = bn + per_channel(f32(bias))
    return ACTIVATIONS[activation](bn).astype(x.dtype)
