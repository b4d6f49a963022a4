"""Poincaré midpoint batch normalization (Poincaré ResNet, https://arxiv.org/abs/2303.14027).

van Spengler, Berkhout, Mettes, ICCV 2023; official code maxvanspengler/poincare-resnet
``models/nn/modules/batchnorm.py`` (``PoincareBatchNorm``, ``PoincareBatchNorm2d``) and
``models/manifolds/math/midpoint.py``. Riemannian batch norm of Lou et al.
(https://arxiv.org/abs/2003.00335) with the Fréchet mean replaced by the closed-form Poincaré
midpoint.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxblocks.layers.norm._common import Dtype, _check_features, _out_dtype
from jaxblocks.layers.poincare import (
    check_curvature,
    dist,
    expmap,
    expmap0,
    logmap,
    logmap0,
    poincare_midpoint,
    transp,
)
from jaxblocks.typing import Array, Float

__all__ = ["POINCARE_BN_EPSILON", "PoincareBatchNorm", "poincare_batch_norm"]

# The official ε added to the Fréchet variance.
POINCARE_BN_EPSILON = 1e-6


def poincare_batch_norm(
    v: Float[Array, "N C"],
    mean: Float[Array, " C"],
    var: Float[Array, ""],
    c: float,
    epsilon: float = POINCARE_BN_EPSILON,
) -> tuple[Float[Array, "N C"], Float[Array, "1 C"], Float[Array, ""]]:
    """Poincaré midpoint batch norm of ``N`` points given as tangent vectors at the origin.

    With ``x_i = exp_0(v_i)``, the batch midpoint ``m`` (`poincare_midpoint`), the Fréchet
    variance ``σ² = mean_i d_c(x_i, m)²`` and the target mean ``μ = exp_0(mean)``:
    ``y_i = log_0(exp_μ(√(var/(σ² + ε)) · PT_{m→μ}(log_m x_i)))`` (official
    ``PoincareBatchNorm.forward``).

    Returns:
      ``(y [N, C] in float32, the midpoint m [1, C], the variance σ²)``.
    """
    x = expmap0(v, c)
    mu = expmap0(mean, c)[None, :]  # [1, C]
    m = poincare_midpoint(x, c, axis=-1, batch_axis=0)  # [1, C]
    sigma2 = jnp.mean(jnp.square(dist(x, m, c)))
    u = transp(m, mu, logmap(m, x, c), c)  # [N, C] in T_μ
    # The official code takes √(var/(σ²+ε)) of the learned scalar var too, so a negative var
    # gives NaN there as here; it is left unconstrained as in the official code.
    u = jnp.sqrt(jnp.asarray(var, u.dtype) / (sigma2 + epsilon)) * u
    return logmap0(expmap(mu, u, c), c), m, sigma2


class PoincareBatchNorm(nn.Module):
    """Poincaré midpoint batch normalization (https://arxiv.org/abs/2303.14027).

    Normalizes points of the Poincaré ball in the Riemannian sense: re-centres the batch's
    Poincaré midpoint on a learned mean by parallel transport and rescales the geodesic spread
    to a learned variance (`poincare_batch_norm`). Inputs and outputs are tangent vectors at the
    origin, as in Poincaré ResNet. Every position of the leading axes is one point: for NHWC
    feature maps each pixel's channel vector, over batch and space (the official
    ``PoincareBatchNorm2d``), for ``[B, C]`` each row (``PoincareBatchNorm``).

    Batch statistics are always used, in training and at test time, as in the official code,
    whose ``running_mean``/``running_var`` buffers are never updated or read; so there is no
    ``batch_stats`` collection and no train/eval switch, and outputs depend on the whole batch.

    Parameters as the official: ``mean`` ``[C]`` (tangent vector of the target mean, zeros) and a
    scalar ``var`` (ones). The curvature is fixed (the official ``learnable=False`` default);
    ε = 1e-6 is added to the variance. The math runs in float32.

    Attributes:
      c: curvature (> 0; the ball has curvature ``-c``).
      epsilon: added to the batch's Fréchet variance.
      dtype: output dtype (None: the input's).
      param_dtype: parameter dtype.

    Example:
      >>> import jax
      >>> bn = PoincareBatchNorm(c=0.1)
      >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
      >>> bn.apply(bn.init(jax.random.key(1), x), x).shape
      (2, 4, 4, 8)
    """

    c: float = 0.1
    epsilon: float = POINCARE_BN_EPSILON
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B *S C"]) -> Float[Array, "B *S C"]:
        check_curvature("PoincareBatchNorm", self.c)
        if self.epsilon < 0:
            raise ValueError(f"PoincareBatchNorm: epsilon={self.epsilon!r} must be >= 0")
        _check_features(x, "PoincareBatchNorm")
        ch = x.shape[-1]
        mean = self.param(
            "mean", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (ch,),
            self.param_dtype,
        )  # fmt: skip
        var = self.param("var", nn.initializers.ones, (), self.param_dtype)
        y, _, _ = poincare_batch_norm(x.reshape(-1, ch), mean, var, self.c, self.epsilon)
        return y.reshape(x.shape).astype(_out_dtype(self.dtype, x))
