"""EvoNorm-B0 and EvoNorm-S0 (Liu et al. 2020): normalization-activation layers found by search."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.layers.norm._common import (
    Dtype,
    Initializer,
    _affine,
    _bc,
    _check_features,
    _largest_divisor_at_most,
    _moments,
    _num_groups,
    _out_dtype,
)
from jaxblocks.typing import Array, Float

__all__ = ["EvoNormB0", "EvoNormS0", "evonorm_b0", "evonorm_s0"]


def evonorm_b0(
    x: Float[Array, "B *S C"],
    v: Float[Array, " C"],
    scale: Float[Array, " C"],
    bias: Float[Array, " C"],
    batch_var: Float[Array, " C"],
    epsilon: float = 1e-5,
) -> Array:
    """EvoNorm-B0: ``x / max(sqrt(batch_var + eps), v x + sqrt(var_hw(x) + eps)) * scale + bias``.

    ``batch_var`` is the variance over (batch, spatial) in training or the running one at eval;
    ``var_hw`` the per-sample, per-channel variance over the spatial axes (both biased).
    """
    x32 = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    _, inst_var = _moments(x32, spatial)
    inst_std = jnp.sqrt(jnp.expand_dims(inst_var, spatial) + epsilon)
    left = _bc(jnp.sqrt(batch_var + epsilon), x.ndim)
    right = _bc(v.astype(jnp.float32), x.ndim) * x32 + inst_std
    y = x32 / jnp.maximum(left, right)
    return _affine(y, scale, bias)


def evonorm_s0(
    x: Float[Array, "B *S C"],
    v: Float[Array, " C"],
    scale: Float[Array, " C"],
    bias: Float[Array, " C"],
    groups: int,
    epsilon: float = 1e-5,
) -> Array:
    """EvoNorm-S0: ``x sigmoid(v x) / sqrt(var_group(x) + eps) * scale + bias``.

    ``var_group`` is the per-sample variance over (spatial, channels of the group), biased.
    """
    x32 = x.astype(jnp.float32)
    c = x.shape[-1]
    xg = x32.reshape(x.shape[:-1] + (groups, c // groups))  # [B, *S, G, C/G]
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    _, var = _moments(xg, axes)  # [B, G]
    std = jnp.sqrt(var + epsilon).reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (groups, 1))
    y = (xg / std).reshape(x.shape) * jax.nn.sigmoid(_bc(v.astype(jnp.float32), x.ndim) * x32)
    return _affine(y, scale, bias)


class EvoNormB0(nn.Module):
    """EvoNorm-B0 — Liu, Brock, Simonyan, Le 2020, https://arxiv.org/abs/2004.02967.

    A batch-dependent normalization-activation layer found by search, replacing BN+ReLU:
    ``y = x / max(√(s²_{b,h,w}+ε), v·x + √(s²_{h,w}+ε)) · γ + β`` — the larger of the batch
    std (running variance at evaluation) and a learned instance-std term. NHWC (any number of
    spatial axes ≥ 1). ``apply_act=False`` returns only ``γ·x + β`` (the official
    ``nonlinearity=False`` path).

    Official code: tensorflow/tpu ``resnet_model.py::evonorm`` (decay 0.9, ε 1e-5, biased
    ``tf.nn.moments`` variances, v/γ init 1, β 0) — we follow it. timm's ``EvoNorm2dB0`` differs:
    ε 1e-3 and an unbiased (n/(n−1)) running variance; pass ``epsilon=1e-3`` to match its
    forward. ``momentum`` is the decay of the running variance (Flax convention; TF decay 0.9 =
    PyTorch momentum 0.1).

    Attributes:
      use_running_average: evaluate with the running variance (or pass it to ``__call__``).
      momentum: running-variance decay (default 0.9 as in the official code).
      epsilon: added to both variances.
      apply_act: False keeps only the affine transform.
      dtype, param_dtype, scale_init, bias_init, v_init: dtypes and initializers.

    Example:
      >>> m = EvoNormB0()
      >>> x = jnp.ones((2, 4, 4, 8))
      >>> v = m.init(jax.random.key(0), x, use_running_average=False)
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    apply_act: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    v_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(
        self, x: Float[Array, "B *S C"], use_running_average: bool | None = None
    ) -> Float[Array, "B *S C"]:
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        _check_features(x, "EvoNormB0", min_ndim=3)
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        if not self.apply_act:
            y = _affine(x.astype(jnp.float32), scale, bias)
            return y.astype(_out_dtype(self.dtype, x))
        v = self.param("v", self.v_init, (c,), self.param_dtype)
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if ura:
            var = ra_var.value
        else:
            _, var = _moments(x.astype(jnp.float32), tuple(range(x.ndim - 1)))
            if not self.is_initializing():
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        y = evonorm_b0(x, v, scale, bias, var, self.epsilon)
        return y.astype(_out_dtype(self.dtype, x))


class EvoNormS0(nn.Module):
    """EvoNorm-S0 — Liu, Brock, Simonyan, Le 2020, https://arxiv.org/abs/2004.02967.

    The batch-independent sibling of EvoNorm-B0 (no running statistics, so train = eval and any
    batch size works): ``y = x·σ(v·x) / √(s²_{h,w,c/g}(x)+ε) · γ + β`` — a SiLU-like gate divided
    by the group standard deviation. NHWC. ``group_size``, when given, wins over ``groups``
    (as in timm).

    Official code (tensorflow/tpu ``evonorm``): 32 groups, reduced to the largest divisor of C
    when 32 does not divide it, ε 1e-5, biased variance — we follow it (``groups`` is reduced
    the same way; ``group_size`` must divide C). timm's ``EvoNorm2dS0`` takes the same
    ``groups``/``group_size`` arguments but raises instead of reducing; its ``S0a`` variant uses
    ε 1e-3 and the std of the un-gated input (same formula here).

    Attributes:
      groups: number of channel groups (default 32; reduced to a divisor of C).
      group_size: channels per group instead of ``groups``.
      epsilon: added to the group variance.
      apply_act: False keeps only the affine transform (official ``nonlinearity=False``).
      dtype, param_dtype, scale_init, bias_init, v_init: dtypes and initializers.

    Example:
      >>> m = EvoNormS0(groups=4)
      >>> x = jnp.ones((1, 4, 4, 8))
      >>> y = m.apply(m.init(jax.random.key(0), x), x)
    """

    groups: int | None = 32
    group_size: int | None = None
    epsilon: float = 1e-5
    apply_act: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    v_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: Float[Array, "B *S C"]) -> Float[Array, "B *S C"]:
        _check_features(x, "EvoNormS0", min_ndim=3)
        c = x.shape[-1]
        if self.group_size is None and self.groups is not None and self.groups > 0:
            groups = _largest_divisor_at_most(c, self.groups)
        else:
            groups = _num_groups(
                "EvoNormS0", c, self.groups if self.group_size is None else None, self.group_size
            )
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        if not self.apply_act:
            y = _affine(x.astype(jnp.float32), scale, bias)
            return y.astype(_out_dtype(self.dtype, x))
        v = self.param("v", self.v_init, (c,), self.param_dtype)
        y = evonorm_s0(x, v, scale, bias, groups, self.epsilon)
        return y.astype(_out_dtype(self.dtype, x))
