"""Fast pure-JAX `pointwise_conv_bn`: the BatchNorm folded into the weight, one matmul.

    s  = scale * rsqrt(var + eps)                   (fp32, [C_out])
    w' = (w * s).astype(x.dtype)                    (the fold, in fp32, cast once)
    b' = bias + s * (conv_bias - mean)              (fp32, [C_out])
    y  = act(x @ w' + b')                           (fp32 accumulation, output in x.dtype)

The custom VJP keeps the residuals minimal: ``x`` and kernel-sized tensors, plus one
activation-sized tensor only where the activation needs it (the output ``y`` for relu/relu6,
which the next layer holds anyway; the pre-activation for silu/gelu; nothing without an
activation). The activation helpers below use only elementwise `jnp` ops so that the Pallas
kernels call the same code inside their bodies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715


def activate(pre, activation):
    """act(pre) with plain elementwise ops (usable inside Pallas kernels); fp32 in and out."""
    if activation is None:
        return pre
    if activation == "relu":
        return jnp.maximum(pre, 0.0)
    if activation == "relu6":
        return jnp.minimum(jnp.maximum(pre, 0.0), 6.0)
    if activation == "silu":
        return pre / (1.0 + jnp.exp(-pre))
    if activation == "gelu":  # tanh approximation, as jax.nn.gelu(approximate=True)
        return 0.5 * pre * (1.0 + jnp.tanh(_GELU_C * (pre + _GELU_A * pre * pre * pre)))
    raise ValueError(f"unknown activation {activation!r}")


def residual_kind(activation) -> str | None:
    """What the backward pass needs of the forward besides ``x``.

    None: nothing (identity); "out": the output (relu, relu6: the mask is recovered from the
    output); "pre": the pre-activation (silu, gelu).
    """
    if activation is None:
        return None
    return "out" if activation in ("relu", "relu6") else "pre"


def activation_grad(res, activation):
    """act'(pre) in fp32, from the residual chosen by `residual_kind` (fp32 in)."""
    if activation is None:
        return jnp.ones_like(res)
    if activation == "relu":  # res = y = max(pre, 0): y > 0 exactly where pre > 0
        return jnp.where(res > 0.0, 1.0, 0.0)
    if activation == "relu6":  # res = y = clip(pre, 0, 6)
        return jnp.where((res > 0.0) & (res < 6.0), 1.0, 0.0)
    if activation == "silu":  # res = pre
        sig = 1.0 / (1.0 + jnp.exp(-res))
        return sig * (1.0 + res * (1.0 - sig))
    if activation == "gelu":  # res = pre
        t = jnp.tanh(_GELU_C * (res + _GELU_A * res * res * res))
        return 0.5 * (1.0 + t) + 0.5 * res * (1.0 - t * t) * _GELU_C * (
            1.0 + 3.0 * _GELU_A * res * res
        )
    raise ValueError(f"unknown activation {activation!r}")


def fold_vectors(scale, bias, mean, var, conv_bias, epsilon):
    """The per-channel part of the fold, fp32: (s, r, shift, cbm) with r = rsqrt(var + eps),
    s = scale * r, cbm = conv_bias - mean, shift = bias + s * cbm."""
    f32 = lambda a: a.astype(jnp.float32)
    r = jax.lax.rsqrt(f32(var) + epsilon)
    s = f32(scale) * r
    cbm = -f32(mean) if conv_bias is None else f32(conv_bias) - f32(mean)
    return s, r, f32(bias) + s * cbm, cbm


def fold_weight(w, s, dtype):
    """w' = w * s in fp32, cast once to the matmul dtype ([C_in, C_out])."""
    return (w.astype(jnp.float32) * s[None, :]).astype(dtype)


def param_grads(dwf, dbp, w, s, r, cbm, args):
    """Gradients of (w, scale, bias, conv_bias) from dw' = x^T dz and db' = sum_rows dz (fp32).

    w' = w * s, b' = bias + s * cbm, s = scale * r:
      dw = dw' * s;  dbias = db';  dconv_bias = s * db';
      dscale = r * (sum_i dw'[i] * w[i] + db' * cbm).
    ``args`` = (w, scale, bias, conv_bias) primals, for the cotangent dtypes.
    """
    w_, scale, bias, conv_bias = args
    dw = (dwf * s[None, :]).astype(w_.dtype)
    ds = jnp.sum(dwf * w.astype(jnp.float32), axis=0) + dbp * cbm
    dscale = (r * ds).astype(scale.dtype)
    dbias = dbp.astype(bias.dtype)
    dcb = None if conv_bias is None else (s * dbp).astype(conv_bias.dtype)
    return dw, dscale, dbias, dcb


def _forward(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, precision):
    s, r, shift, cbm = fold_vectors(scale, bias, mean, var, conv_bias, epsilon)
    wf = fold_weight(w, s, x.dtype)
    pre = jnp.dot(x, wf, preferred_element_type=jnp.float32, precision=precision)  # [M, C_out]
    pre = pre + shift[None, :]  # fp32
    y = activate(pre, activation).astype(x.dtype)
    # XLA:CPU otherwise fuses the activation into consumers and keeps `pre` alive for them.
    y = jax.lax.optimization_barrier(y)
    kind = residual_kind(activation)
    res = None if kind is None else (y if kind == "out" else pre.astype(x.dtype))
    return y, (x, w, wf, s, r, cbm, res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _pointwise_conv_bn(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, precision):
    return _forward(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, precision)[0]


def _fwd(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, precision):
    y, res = _forward(x, w, scale, bias, mean, var, conv_bias, epsilon, activation, precision)
    # The primals below are only read for their dtypes (zero-size views keep them cheap).
    meta = (scale[:0], bias[:0], mean[:0], var[:0], None if conv_bias is None else conv_bias[:0])
    return y, (res, meta)


def _bwd(epsilon, activation, precision, residuals, dy):
    # Tie the residuals to the incoming gradient so transposed copies of x are made here, in
    # the backward, and freed at once (not made in the forward and held for the whole step).
    residuals, dy = jax.lax.optimization_barrier((residuals, dy))
    (x, w, wf, s, r, cbm, res), (scale0, bias0, mean0, var0, cb0) = residuals
    dz = dy.astype(jnp.float32)
    if res is not None:
        dz = dz * activation_grad(res.astype(jnp.float32), activation)  # [M, C_out] fp32
    dz_lo = dz.astype(x.dtype)  # matmul operands in the compute dtype, fp32 accumulation
    mm = functools.partial(jnp.dot, preferred_element_type=jnp.float32, precision=precision)
    dx = mm(dz_lo, wf.T).astype(x.dtype)  # [M, C_in]
    dwf = mm(x.T, dz_lo)  # [C_in, C_out]
    dbp = jnp.sum(dz, axis=0)  # [C_out]
    dw, dscale, dbias, dcb = param_grads(dwf, dbp, w, s, r, cbm, (w, scale0, bias0, cb0))
    c_out = w.shape[1]
    dmean = jnp.zeros((c_out,), mean0.dtype)  # running statistics: constants of the step
    dvar = jnp.zeros((c_out,), var0.dtype)
    return dx, dw, dscale, dbias, dmean, dvar, dcb


_pointwise_conv_bn.defvjp(_fwd, _bwd)


def pointwise_conv_bn_xla(
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
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
):
    """Folded pointwise conv + BN + activation on ``x`` [M, C_in] (see the module docstring);
    ``precision`` goes to the three matmuls (forward, dx, dw')."""
    args = (x, w, scale, bias, mean, var, conv_bias, float(epsilon), activation)
    return _pointwise_conv_bn(*args, jax.lax.Precision(precision))
