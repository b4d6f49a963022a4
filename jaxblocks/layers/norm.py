"""Normalization layers beyond Flax's own: Ghost BN, PowerNorm, EvoNorm, WS + BCN, RepBN/PRepBN.

Every module follows `flax.linen.BatchNorm` conventions: channels last, statistics computed in
float32 and the output cast to ``dtype``, running statistics in the ``batch_stats`` collection with
``momentum`` used as a *decay* (``r <- momentum * r + (1 - momentum) * batch``; PyTorch's momentum
``m`` corresponds to ``1 - m`` here) and biased (``1/n``) batch variance, and
``use_running_average`` given either to the constructor or the call (`nn.merge_param`).

The math of each layer lives in a small pure function next to it (``ghost_batch_norm``,
``power_norm``, ``evonorm_b0``, ``evonorm_s0``, ``weight_standardize``, ``batch_channel_norm``,
``rep_batch_norm``), so it can be tested alone and reused outside Linen.

Also here: ``LayerNorm`` (Flax's, re-exported) and the BN-only training helpers
(``bn_only_mask``, ``bn_only_labels``, ``bn_only_optimizer``, ``bn_only_init``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.linen import LayerNorm as LayerNorm  # Ba et al. 2016, arXiv 1607.06450 (re-export)

from jaxblocks.typing import Array, Float

__all__ = [
    "BatchChannelNorm",
    "EvoNormB0",
    "EvoNormS0",
    "GhostBatchNorm",
    "LayerNorm",
    "POWER_NORM_BACKWARD_COLLECTION",
    "PRepBN",
    "PowerNorm",
    "RepBN",
    "WSConv",
    "batch_channel_norm",
    "bn_only_init",
    "bn_only_labels",
    "bn_only_mask",
    "bn_only_optimizer",
    "evonorm_b0",
    "evonorm_s0",
    "fold_repbn_into_dense",
    "ghost_batch_norm",
    "power_norm",
    "prepbn_lambda",
    "rep_batch_norm",
    "repbn_affine",
    "sequential_ema",
    "weight_standardize",
]

Initializer = Callable[..., Array]
Dtype = Any

# PowerNorm keeps the backward's running statistic nu in its own collection: the trainer
# differentiates the loss with respect to it and stores the "gradient" (= the updated nu).
POWER_NORM_BACKWARD_COLLECTION = "power_norm_backward"


# --------------------------------------------------------------------------------------------
# shared helpers


def _check_features(x: Array, name: str, min_ndim: int = 2) -> None:
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name}: input must have at least {min_ndim} dims (batch, ..., channels), "
            f"got shape {x.shape}"
        )
    if x.shape[-1] == 0 or x.shape[0] == 0:
        raise ValueError(f"{name}: input has an empty batch or channel axis, shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: input must be floating point, got dtype {x.dtype}")


def _moments(x32: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Mean and biased variance over ``axes`` (two-pass, float32)."""
    mean = jnp.mean(x32, axis=axes)
    centred = x32 - jnp.expand_dims(mean, axes)
    return mean, jnp.mean(jnp.square(centred), axis=axes)


def _bc(v: Array, ndim: int) -> Array:
    """Reshape a per-channel vector to broadcast against a rank-``ndim`` channels-last array."""
    return v.reshape((1,) * (ndim - 1) + (v.shape[-1],))


def _affine(y32: Array, scale: Array | None, bias: Array | None) -> Array:
    if scale is not None:
        y32 = y32 * _bc(scale.astype(jnp.float32), y32.ndim)
    if bias is not None:
        y32 = y32 + _bc(bias.astype(jnp.float32), y32.ndim)
    return y32


def _out_dtype(module_dtype: Dtype | None, x: Array) -> Dtype:
    return module_dtype if module_dtype is not None else x.dtype


def _largest_divisor_at_most(n: int, k: int) -> int:
    k = max(1, min(n, k))
    while n % k:
        k -= 1
    return k


def _num_groups(name: str, channels: int, groups: int | None, group_size: int | None) -> int:
    if (groups is None) == (group_size is None):
        raise ValueError(f"{name}: give exactly one of groups={groups} and group_size={group_size}")
    if group_size is not None:
        if group_size <= 0 or channels % group_size:
            raise ValueError(
                f"{name}: group_size={group_size} must be positive and divide the {channels} "
                "channels"
            )
        return channels // group_size
    if groups <= 0 or channels % groups:
        raise ValueError(
            f"{name}: groups={groups} must be positive and divide the {channels} channels"
        )
    return groups


# --------------------------------------------------------------------------------------------
# Ghost Batch Normalization (Hoffer et al. 2017)


def ghost_batch_norm(
    x: Float[Array, "B *S C"],
    scale: Float[Array, " C"] | None,
    bias: Float[Array, " C"] | None,
    ghost_batch_size: int,
    epsilon: float = 1e-5,
) -> tuple[Array, Float[Array, "G C"], Float[Array, "G C"]]:
    """Batch norm with statistics per ghost batch of ``ghost_batch_size`` consecutive samples.

    Returns ``(y, means, vars)`` with one row of statistics per ghost batch (biased variance).
    A batch no larger than ``ghost_batch_size`` is one ghost batch (plain batch norm).
    """
    b = x.shape[0]
    if ghost_batch_size <= 0:
        raise ValueError(f"ghost_batch_norm: ghost_batch_size={ghost_batch_size} must be > 0")
    g = min(ghost_batch_size, b)
    if b % g:
        raise ValueError(
            f"ghost_batch_norm: batch size {b} must be a multiple of ghost_batch_size={g} "
            "(or at most ghost_batch_size)"
        )
    k = b // g
    xg = x.astype(jnp.float32).reshape((k, g) + x.shape[1:])  # [k, g, *S, C]
    axes = tuple(range(1, xg.ndim - 1))
    means, var = _moments(xg, axes)  # [k, C]
    shape = (k,) + (1,) * (xg.ndim - 2) + (x.shape[-1],)
    y = (xg - means.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + epsilon)
    return _affine(y, scale, bias).reshape(x.shape), means, var


def sequential_ema(running: Float[Array, " C"], stats: Float[Array, "G C"], momentum: float):
    """EMA applied to each row of ``stats`` in order: ``r <- m r + (1 - m) s_l`` for l = 1..k.

    Closed form ``r_k = m^k r_0 + sum_l (1 - m) m^(k - l) s_l`` (Hoffer et al. 2017, §4).
    """
    k = stats.shape[0]
    powers = momentum ** jnp.arange(k - 1, -1, -1, dtype=jnp.float32)  # m^(k-l), l = 1..k
    return (momentum**k) * running + (1.0 - momentum) * jnp.einsum("k,kc->c", powers, stats)


class GhostBatchNorm(nn.Module):
    """Ghost Batch Normalization — Hoffer, Hubara, Soudry 2017, https://arxiv.org/abs/1705.08741.

    Batch norm whose training statistics come from *virtual* ("ghost") batches of
    ``ghost_batch_size`` consecutive samples instead of the whole batch, keeping the regularising
    noise of small batches while training with a large one. At evaluation it is ordinary batch
    norm with the running statistics. With ``ghost_batch_size >= batch`` it equals
    `flax.linen.BatchNorm` exactly (forward and running statistics).

    Running statistics (momentum convention): one EMA step per ghost batch, in order, with
    ``momentum`` as the decay: ``r <- momentum * r + (1 - momentum) * stat_l`` — the paper's
    sequential update (§4). The paper's code (eladhoffer/bigBatch ``main_gbn.py``) gets the same
    effect by running plain BN forward/backward per chunk; MosaicML Composer instead divides the
    momentum by the number of chunks (≈ one step with the mean of the ghost statistics), and
    Keras' ``virtual_batch_size`` averages them; we follow the paper. Under SPMD ``jit`` the
    ghost batches are slices of the *global* batch (samples ``[l*g, (l+1)*g)``), not per device.

    Attributes:
      ghost_batch_size: samples per ghost batch; the batch must be a multiple of it (or smaller).
      use_running_average: evaluate with running statistics (or pass it to ``__call__``).
      momentum: EMA decay of the running statistics (Flax convention).
      epsilon: added to the variance.
      dtype: output dtype (default: the input's); statistics are always float32.
      param_dtype, use_bias, use_scale, bias_init, scale_init: as in `flax.linen.BatchNorm`.

    Example:
      >>> gbn = GhostBatchNorm(ghost_batch_size=4)
      >>> x = jnp.ones((8, 5, 5, 3))
      >>> v = gbn.init(jax.random.key(0), x, use_running_average=False)
      >>> y, upd = gbn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    """

    ghost_batch_size: int
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(
        self, x: Float[Array, "B *S C"], use_running_average: bool | None = None
    ) -> Float[Array, "B *S C"]:
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        _check_features(x, "GhostBatchNorm")
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = (
            self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale else None
        )
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else None
        if ura:
            inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
            y = (x.astype(jnp.float32) - _bc(ra_mean.value, x.ndim)) * _bc(inv, x.ndim)
            y = _affine(y, scale, bias)
        else:
            y, means, var = ghost_batch_norm(x, scale, bias, self.ghost_batch_size, self.epsilon)
            if not self.is_initializing():
                ra_mean.value = sequential_ema(ra_mean.value, means, self.momentum)
                ra_var.value = sequential_ema(ra_var.value, var, self.momentum)
        return y.astype(_out_dtype(self.dtype, x))


# --------------------------------------------------------------------------------------------
# PowerNorm (Shen et al. 2020)


def _group_scaling(x32: Array, group_num: int, epsilon: float) -> Array:
    """Divide each token by the RMS over each of ``group_num`` channel groups (GroupScaling1D)."""
    c = x32.shape[-1]
    xg = x32.reshape(x32.shape[:-1] + (group_num, c // group_num))  # [..., G, C/G]
    ms = jnp.mean(jnp.square(xg), axis=-1, keepdims=True)
    return (xg * jax.lax.rsqrt(ms + epsilon)).reshape(x32.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _power_norm_core(x, fwd_inv, bwd_inv, nu, weights, alpha_bwd):
    # z = x / psi: the forward treats the statistic as a constant (fwd_inv: [C]).
    del bwd_inv, nu, weights, alpha_bwd
    return x * fwd_inv[None, :]


def _power_norm_core_fwd(x, fwd_inv, bwd_inv, nu, weights, alpha_bwd):
    return x * fwd_inv[None, :], (x, fwd_inv, bwd_inv, nu, weights)


def _power_norm_core_bwd(alpha_bwd, res, g):
    # Approximate backward through the running statistic (Shen et al., Algorithm 1; official
    # PowerFunction.backward). g is the cotangent of z, i.e. gamma * dL/dy.
    x, fwd_inv, bwd_inv, nu, weights = res
    z = x * fwd_inv[None, :]  # [N, C] tokens x channels
    w = weights[:, None]  # [N, 1] 1 for real tokens, 0 for padding
    n = jnp.maximum(jnp.sum(weights), 1.0)
    gamma_t = jnp.sum(w * z * z, axis=0) / n  # Γ = mean(z²)   [C]
    lambda_t = jnp.sum(w * g * z, axis=0) / n  # Λ = mean(g z)  [C]
    g_tilde = g - w * nu[None, :] * z  # correction only on real tokens
    dx = g_tilde * bwd_inv[None, :]
    nu_new = nu * (1.0 - (1.0 - alpha_bwd) * gamma_t) + (1.0 - alpha_bwd) * lambda_t
    zeros = jnp.zeros_like(fwd_inv)
    # nu's cotangent slot carries its *update*: differentiating w.r.t. nu returns nu_t.
    return dx, zeros, jnp.zeros_like(bwd_inv), nu_new, jnp.zeros_like(weights)


_power_norm_core.defvjp(_power_norm_core_fwd, _power_norm_core_bwd)


def power_norm(
    x: Float[Array, "*N C"],
    scale: Float[Array, " C"] | None,
    bias: Float[Array, " C"] | None,
    psi2: Float[Array, " C"],
    nu: Float[Array, " C"],
    step: Array | int,
    *,
    mask: Array | None = None,
    train: bool = True,
    epsilon: float = 1e-5,
    alpha_fwd: float = 0.9,
    alpha_bwd: float = 0.9,
    warmup_steps: int = 10000,
    group_num: int | None = 1,
    backward_scale: Literal["batch", "running"] = "batch",
) -> tuple[Array, Array]:
    """PowerNorm as a pure function; returns ``(y, psi2_new)`` (``psi2`` unchanged in eval).

    ``x`` is ``[..., C]`` (e.g. ``[B, T, C]``); ``mask`` (``x.shape[:-1]``, True = real token)
    excludes padding from every statistic. ``step`` counts earlier training steps (0-based).
    Training, ``s = mean_tokens(x²)`` (after group scaling):

      warm-up (step < warmup_steps): ``z = x / sqrt(s + eps)``;
        ``psi2 <- step/(step+1) psi2 + s/(step+1)`` then the EMA below (official code order);
      after: ``z = x / sqrt(psi2 + eps)``;
      always: ``psi2 <- alpha_fwd psi2 + (1 - alpha_fwd) s``;  ``y = scale z + bias``.

    Backward (custom VJP; ``g = scale * dL/dy``): ``g~ = g - nu z`` (real tokens),
    ``dL/dx = g~ / sqrt(s + eps)`` (``backward_scale="batch"``, official code) or
    ``g~ / sqrt(psi2 + eps)`` (``"running"``, the paper's ``g~/psi``), and the cotangent returned
    for ``nu`` is its update ``nu (1 - (1 - alpha_bwd) mean(z²)) + (1 - alpha_bwd) mean(g z)``.
    """
    if backward_scale not in ("batch", "running"):
        raise ValueError(f"power_norm: backward_scale={backward_scale!r}; use 'batch' or 'running'")
    c = x.shape[-1]
    x32 = x.astype(jnp.float32)
    if group_num is not None:
        if group_num <= 0 or c % group_num:
            raise ValueError(f"power_norm: group_num={group_num} must divide the {c} channels")
        x32 = _group_scaling(x32, group_num, epsilon)
    if not train:
        y = x32 * _bc(jax.lax.rsqrt(psi2 + epsilon), x32.ndim)
    else:
        tokens = x32.reshape(-1, c)  # [N, C]
        if mask is None:
            weights = jnp.ones((tokens.shape[0],), jnp.float32)
        else:
            if mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"power_norm: mask shape {mask.shape} must equal x.shape[:-1]={x.shape[:-1]}"
                )
            weights = mask.reshape(-1).astype(jnp.float32)
        n = jnp.maximum(jnp.sum(weights), 1.0)
        s = jax.lax.stop_gradient(jnp.sum(weights[:, None] * tokens**2, axis=0) / n)  # [C]
        step = jnp.asarray(step, jnp.float32)
        warm = step < warmup_steps
        batch_inv = jax.lax.rsqrt(s + epsilon)
        fwd_inv = jnp.where(warm, batch_inv, jax.lax.rsqrt(psi2 + epsilon))
        bwd_inv = batch_inv if backward_scale == "batch" else fwd_inv
        z = _power_norm_core(tokens, fwd_inv, bwd_inv, nu, weights, alpha_bwd)
        y = z.reshape(x.shape)
        psi_c = jnp.where(warm, psi2 * step / (step + 1.0) + s / (step + 1.0), psi2)
        psi2 = jax.lax.stop_gradient(alpha_fwd * psi_c + (1.0 - alpha_fwd) * s)
    return _affine(y, scale, bias), psi2


class PowerNorm(nn.Module):
    """PowerNorm — Shen, Yao, Gholami, Mahoney, Keutzer 2020, https://arxiv.org/abs/2003.07845.

    Batch normalization for transformers: no mean subtraction (divide by the quadratic mean),
    the *running* quadratic mean ψ² in the training forward (after a warm-up that uses the batch
    one), and an approximate backward through the running statistic with its own running state
    ν. Inputs are ``[..., C]`` tokens (e.g. ``[B, T, C]``) with an optional padding ``mask``
    (``x.shape[:-1]``, True = real token) that removes padding from every statistic. Before the
    norm each token is divided by its RMS per channel group (``GroupScaling1D``; ``group_num`` =
    number of attention heads in the official fairseq setup; ``None`` turns it off).

    State: ``batch_stats/psi2`` (init 1) and ``batch_stats/step`` (int32 step counter driving the
    warm-up), updated in training like BatchNorm's statistics; ``ν`` lives in the separate
    collection ``POWER_NORM_BACKWARD_COLLECTION`` (``"power_norm_backward"``, init 0) because a
    backward pass cannot write a Flax collection: a `jax.custom_vjp` returns the updated ν as the
    *cotangent* of ν. To train with it, differentiate the loss w.r.t. that collection too and
    store the result as the new ν (the "gradient" is not a gradient — never give it to an
    optimizer)::

        def loss(params, nu):
            y, upd = model.apply({"params": params, "batch_stats": bs,
                                  "power_norm_backward": nu}, x, mask=m,
                                 use_running_average=False, mutable=["batch_stats"])
            ...
        (l, upd), (g_params, nu) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, nu)

    A trainer that differentiates only ``params`` still works; ν then stays 0 (plain
    straight-through of the running statistic).

    Where the official code (sIncerass/powernorm ``mask_powernorm.py``) differs, and what we do:
      * its backward divides by the **batch** quadratic mean √(s+ε), the paper's Algorithm 1 by
        ψ; ``backward_scale="batch"`` (default) follows the code, ``"running"`` the paper;
      * its backward means Γ, Λ run over all T·B positions including padding; ours use only real
        tokens, and padded tokens get no ν-correction (their gradient is ``g/scale``);
      * its warm-up uses the batch statistic while ``iter <= warmup`` but the cumulative average
        while ``iter < warmup``; we use ``step < warmup_steps`` for both (0-based step);
      * the paper's ``α_b`` update and the code's ``ema_gz`` are the same with ν = (1−α_b)·ema_gz.
    Default ``warmup_steps=10000`` is the class default; fairseq's ``NormSelect`` passes 1000.

    Attributes:
      use_running_average: evaluate with ψ² (or pass it to ``__call__``).
      alpha_fwd: decay of ψ² (Flax convention; official 0.9).
      alpha_bwd: decay in the ν update (official 0.9).
      epsilon: added to quadratic means (official 1e-5).
      warmup_steps: training steps that use the batch quadratic mean.
      group_num: channel groups of the pre-norm group scaling (None: off).
      backward_scale: ``"batch"`` (official code) or ``"running"`` (paper).
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as in BatchNorm.

    Example:
      >>> pn = PowerNorm(warmup_steps=0, group_num=2)
      >>> x, m = jnp.ones((2, 5, 8)), jnp.ones((2, 5), bool)
      >>> v = pn.init(jax.random.key(0), x, use_running_average=False)
      >>> y, upd = pn.apply(v, x, mask=m, use_running_average=False, mutable=["batch_stats"])
    """

    use_running_average: bool | None = None
    alpha_fwd: float = 0.9
    alpha_bwd: float = 0.9
    epsilon: float = 1e-5
    warmup_steps: int = 10000
    group_num: int | None = 1
    backward_scale: Literal["batch", "running"] = "batch"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "*N C"],
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
    ) -> Float[Array, "*N C"]:
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        _check_features(x, "PowerNorm")
        c = x.shape[-1]
        psi2 = self.variable("batch_stats", "psi2", lambda: jnp.ones((c,), jnp.float32))
        step = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        nu = self.variable(
            POWER_NORM_BACKWARD_COLLECTION, "nu", lambda: jnp.zeros((c,), jnp.float32)
        )
        scale = (
            self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale else None
        )
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else None
        y, psi2_new = power_norm(
            x,
            scale,
            bias,
            psi2.value,
            nu.value,
            step.value,
            mask=mask,
            train=not ura,
            epsilon=self.epsilon,
            alpha_fwd=self.alpha_fwd,
            alpha_bwd=self.alpha_bwd,
            warmup_steps=self.warmup_steps,
            group_num=self.group_num,
            backward_scale=self.backward_scale,
        )
        if not ura and not self.is_initializing():
            psi2.value = psi2_new
            step.value = step.value + 1
        return y.astype(_out_dtype(self.dtype, x))


# --------------------------------------------------------------------------------------------
# EvoNorm (Liu et al. 2020)


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


# --------------------------------------------------------------------------------------------
# Weight Standardization + Batch-Channel Normalization (Qiao et al. 2019)


def weight_standardize(kernel: Array, epsilon: float = 1e-5, *, unbiased: bool = False) -> Array:
    """``(W - mean(W)) / sqrt(var(W) + eps)`` per output channel (last axis; fan-in axes reduced).

    Computed in float32 and cast back to the kernel's dtype.
    """
    k32 = kernel.astype(jnp.float32)
    axes = tuple(range(kernel.ndim - 1))
    mean = jnp.mean(k32, axis=axes, keepdims=True)
    n = 1
    for a in axes:
        n *= kernel.shape[a]
    ddof = 1 if unbiased and n > 1 else 0
    var = jnp.sum(jnp.square(k32 - mean), axis=axes, keepdims=True) / (n - ddof)
    return ((k32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(kernel.dtype)


class WSConv(nn.Conv):
    """Weight-Standardized convolution — Qiao et al. 2019, https://arxiv.org/abs/1903.10520.

    A `flax.linen.Conv` whose kernel is standardized per output channel over its fan-in
    (kernel window × input channels / groups) on every call: ``Ŵ = (W − mean W)/√(var W + ε)``.
    Meant to be followed by a normalization layer (GroupNorm or `BatchChannelNorm`); with it,
    micro-batch training (1–2 images per device) matches large-batch BN. The stored parameter is
    the raw ``kernel``, so checkpoints have `nn.Conv` layout (HWIO); standardization is done in
    float32 (big_vision's ``StdConv`` idiom: override ``param``).

    Where implementations differ: the paper's BCN repository (``imagenet/models/layers.py``)
    uses the *unbiased* variance with ε 1e-5 inside the square root; the WeightStandardization
    README snippet divides by ``std + 1e-5``; timm ``StdConv2d`` uses the biased variance with
    ε 1e-6 (1e-8 in BiT). We use the biased variance with ε inside the root (the paper's
    equation); ``ws_unbiased=True`` with ``ws_epsilon=1e-5`` reproduces the official layers.py.

    Attributes (besides `nn.Conv`'s):
      ws_epsilon: ε of the standardization.
      ws_unbiased: divide the variance by n−1 (official BCN code) instead of n.

    Example:
      >>> conv = WSConv(features=16, kernel_size=(3, 3), use_bias=False)
      >>> x = jnp.ones((1, 8, 8, 3))
      >>> y = conv.apply(conv.init(jax.random.key(0), x), x)
    """

    ws_epsilon: float = 1e-5
    ws_unbiased: bool = False

    def param(self, name: str, init_fn: Callable[..., Any], *init_args: Any, **init_kwargs: Any):
        value = super().param(name, init_fn, *init_args, **init_kwargs)
        if name == "kernel":
            value = weight_standardize(value, self.ws_epsilon, unbiased=self.ws_unbiased)
        return value


def batch_channel_norm(
    x: Float[Array, "B *S C"],
    mean: Float[Array, " C"],
    var: Float[Array, " C"],
    bn_scale: Float[Array, " C"] | None,
    bn_bias: Float[Array, " C"] | None,
    scale: Float[Array, " G"] | None,
    bias: Float[Array, " G"] | None,
    num_groups: int,
    epsilon: float = 1e-5,
) -> Array:
    """BCN: batch step ``(x - mean)/sqrt(var + eps) * bn_scale + bn_bias``, then per-sample group
    norm over (spatial, channels of the group) without affine, then a per-group affine."""
    x32 = x.astype(jnp.float32)
    y = (x32 - _bc(mean, x.ndim)) * _bc(jax.lax.rsqrt(var + epsilon), x.ndim)
    y = _affine(y, bn_scale, bn_bias)
    c = x.shape[-1]
    yg = y.reshape(x.shape[:-1] + (num_groups, c // num_groups))  # [B, *S, G, C/G]
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    gmean, gvar = _moments(yg, axes)  # [B, G]
    bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (num_groups, 1)
    yg = (yg - gmean.reshape(bshape)) * jax.lax.rsqrt(gvar.reshape(bshape) + epsilon)
    gshape = (1,) * (x.ndim - 1) + (num_groups, 1)
    if scale is not None:
        yg = yg * scale.astype(jnp.float32).reshape(gshape)
    if bias is not None:
        yg = yg + bias.astype(jnp.float32).reshape(gshape)
    return yg.reshape(x.shape)


class BatchChannelNorm(nn.Module):
    """Batch-Channel Normalization — Qiao et al. 2019, https://arxiv.org/abs/1911.09738.

    Batch normalization followed by channel (group) normalization: ``x̂ = BN(x)`` with a
    per-channel affine, then ``GN_G(x̂)`` without affine, then a per-group affine ``γ_g, β_g``.
    The batch step brings in the batch-level information GN lacks; the group step makes the
    output well-conditioned per sample. Use after `WSConv`.

    Micro-batch mode (``estimate=True``, default; the paper's ``EstBN``): the batch step *always*
    normalizes with the running estimates μ̂, σ̂² (training too), which in training are first
    updated by EMA from the batch (no gradient flows through them) — so batch size 1–2 works.
    As in the official ``EstBN``, the variance estimate is taken around the old running mean,
    ``σ̂² <- m σ̂² + (1−m) mean((x − μ̂_old)²)``, and the *updated* estimates normalize the
    current batch. ``estimate=False`` is ordinary BN (batch
    statistics in training), the official large-batch setting.

    Official code: joe-siyuan-qiao/Batch-Channel-Normalization (README ``BCNorm``/``EstBN``):
    per-*group* affine of shape (1, G, 1) — we follow it; ``EstBN``'s update rate
    ``estbn_moving_speed`` is a buffer set from outside (0 by default, i.e. frozen); we use a
    Flax-style decay ``momentum`` (0.99) instead. ε 1e-5 in both steps as in the official code.

    Attributes:
      num_groups: G for the channel step (default 32); or ``group_size``.
      group_size: channels per group instead of ``num_groups``.
      estimate: micro-batch mode (running estimates in training too).
      use_running_average: evaluation mode (or pass it to ``__call__``).
      momentum: EMA decay of the running estimates.
      epsilon: ε of both steps.
      dtype, param_dtype: output and parameter dtypes.

    Example:
      >>> bcn = BatchChannelNorm(num_groups=4)
      >>> x = jnp.ones((1, 8, 8, 16))
      >>> v = bcn.init(jax.random.key(0), x, use_running_average=False)
    """

    num_groups: int | None = 32
    group_size: int | None = None
    estimate: bool = True
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "B *S C"], use_running_average: bool | None = None
    ) -> Float[Array, "B *S C"]:
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        _check_features(x, "BatchChannelNorm", min_ndim=3)
        c = x.shape[-1]
        groups = _num_groups(
            "BatchChannelNorm", c, None if self.group_size else self.num_groups, self.group_size
        )
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        bn_scale = self.param("bn_scale", nn.initializers.ones, (c,), self.param_dtype)
        bn_bias = self.param("bn_bias", nn.initializers.zeros, (c,), self.param_dtype)
        scale = self.param("scale", nn.initializers.ones, (groups,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (groups,), self.param_dtype)
        mean, var = ra_mean.value, ra_var.value
        if not ura:
            axes = tuple(range(x.ndim - 1))
            m = self.momentum
            if self.estimate:
                # Official EstBN order: update the estimates from this batch (no gradient,
                # variance around the *old* running mean), then normalize with the new ones.
                x32 = jax.lax.stop_gradient(x.astype(jnp.float32))
                bmean = jnp.mean(x32, axis=axes)
                bvar = jnp.mean(jnp.square(x32 - _bc(mean, x.ndim)), axis=axes)
                mean = m * mean + (1 - m) * bmean
                var = m * var + (1 - m) * bvar
                new_mean, new_var = mean, var
            else:
                mean, var = _moments(x.astype(jnp.float32), axes)
                new_mean = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
                new_var = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
            if not self.is_initializing():
                ra_mean.value, ra_var.value = new_mean, new_var
        y = batch_channel_norm(x, mean, var, bn_scale, bn_bias, scale, bias, groups, self.epsilon)
        return y.astype(_out_dtype(self.dtype, x))


# --------------------------------------------------------------------------------------------
# RepBN / PRepBN (Guo et al. 2024, SLAB)


def rep_batch_norm(
    x: Float[Array, "*N C"],
    alpha: Array,
    mean: Float[Array, " C"],
    var: Float[Array, " C"],
    scale: Float[Array, " C"],
    bias: Float[Array, " C"],
    epsilon: float = 1e-5,
) -> Array:
    """RepBN with given statistics: ``(x - mean)/sqrt(var + eps) * scale + bias + alpha * x``."""
    x32 = x.astype(jnp.float32)
    bn = (x32 - _bc(mean, x.ndim)) * _bc(jax.lax.rsqrt(var + epsilon), x.ndim)
    return _affine(bn, scale, bias) + alpha.astype(jnp.float32) * x32


class RepBN(nn.Module):
    """RepBN — Guo, Chen, Tang, Wang 2024 (SLAB), https://arxiv.org/abs/2405.11582.

    Batch norm over tokens plus a learnable scaled identity: ``RepBN(x) = BN(x) + α·x`` with a
    scalar α (init 1). Statistics run over every axis but the last (all tokens of all samples).
    At inference it is a per-channel affine ``a ⊙ x + b`` (`repbn_affine`) that folds into the
    following Dense layer (`fold_repbn_into_dense`), so a transformer with RepBN pays nothing
    for its norms.

    Official code (xinghaochen/SLAB ``classification/models/prepbn.py``): ``nn.BatchNorm1d``
    (PyTorch momentum 0.1 = decay 0.9 here, ε 1e-5, unbiased running variance — ours is biased,
    Flax convention), α init 1 (the LLaMA variant inits α and BN's γ, β to 0: pass
    ``alpha_init=0``, ``scale_init=zeros``). The optional ``mask`` (``x.shape[:-1]``) drops
    padding from the statistics, as the LLaMA variant does.

    Attributes:
      use_running_average: evaluate with running statistics (or pass it to ``__call__``).
      momentum: running-statistics decay (0.9 = PyTorch 0.1).
      epsilon: BN ε.
      alpha_init: initial α.
      dtype, param_dtype, scale_init, bias_init: as in BatchNorm.

    Example:
      >>> m = RepBN()
      >>> x = jnp.ones((2, 16, 8))
      >>> v = m.init(jax.random.key(0), x, use_running_average=False)
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    alpha_init: float = 1.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "*N C"],
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
        update_stats: bool | Array = True,
    ) -> Float[Array, "*N C"]:
        """``update_stats`` (possibly traced) gates the running-statistics update in training."""
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        _check_features(x, "RepBN")
        c = x.shape[-1]
        alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (), self.param_dtype)
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if ura:
            mean, var = ra_mean.value, ra_var.value
        else:
            tokens = x.astype(jnp.float32).reshape(-1, c)  # [N, C]
            if mask is None:
                mean, var = _moments(tokens, (0,))
            else:
                if mask.shape != x.shape[:-1]:
                    raise ValueError(
                        f"RepBN: mask shape {mask.shape} must equal x.shape[:-1]={x.shape[:-1]}"
                    )
                w = mask.reshape(-1, 1).astype(jnp.float32)
                n = jnp.maximum(jnp.sum(w), 1.0)
                mean = jnp.sum(w * tokens, axis=0) / n
                var = jnp.sum(w * jnp.square(tokens - mean[None, :]), axis=0) / n
            if not self.is_initializing():
                m = self.momentum
                new_mean = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
                new_var = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
                ra_mean.value = jnp.where(update_stats, new_mean, ra_mean.value)
                ra_var.value = jnp.where(update_stats, new_var, ra_var.value)
        y = rep_batch_norm(x, alpha, mean, var, scale, bias, self.epsilon)
        return y.astype(_out_dtype(self.dtype, x))


def repbn_affine(variables: dict, epsilon: float = 1e-5) -> tuple[Array, Array]:
    """Inference-time RepBN as ``(a, b)`` with ``RepBN(x) = a * x + b`` (float32).

    ``variables`` holds ``params/{alpha,scale,bias}`` and ``batch_stats/{mean,var}`` of one RepBN.
    """
    p, s = variables["params"], variables["batch_stats"]
    inv = p["scale"].astype(jnp.float32) * jax.lax.rsqrt(s["var"] + epsilon)
    a = inv + p["alpha"].astype(jnp.float32)
    b = p["bias"].astype(jnp.float32) - s["mean"] * inv
    return a, b


def fold_repbn_into_dense(repbn_variables: dict, dense_params: dict, epsilon: float = 1e-5):
    """Fold an inference RepBN into the Dense that follows it: ``Dense(RepBN(x)) = Dense'(x)``.

    With ``RepBN(x) = a x + b`` and a Flax kernel ``[C_in, C_out]``:
    ``kernel' = a[:, None] * kernel`` and ``bias' = b @ kernel + bias``. Returns new Dense params
    (``bias`` added if the Dense had none). Exact (no padding involved), unlike a fold into a
    padded convolution.
    """
    a, b = repbn_affine(repbn_variables, epsilon)
    kernel = dense_params["kernel"]
    k32 = kernel.astype(jnp.float32)
    new_bias = b @ k32
    if "bias" in dense_params:
        new_bias = new_bias + dense_params["bias"].astype(jnp.float32)
    return {
        **dense_params,
        "kernel": (a[:, None] * k32).astype(kernel.dtype),
        "bias": new_bias.astype(dense_params.get("bias", kernel).dtype),
    }


def prepbn_lambda(step: Array | int, total_steps: int, warmup_steps: int = 0, r0: float = 1.0):
    """PRepBN's λ at training call ``step`` (0-based): 1 during the LN warm-up, then
    ``r0 * max(total - (step - warmup), 0) / total`` (linear decay 1 → 0, official LinearNorm)."""
    step = jnp.asarray(step, jnp.float32)
    left = jnp.maximum(total_steps - (step - warmup_steps), 0.0)
    lam = r0 * left / total_steps
    return jnp.where(step < warmup_steps, 1.0, lam)


class PRepBN(nn.Module):
    """Progressive RepBN — Guo, Chen, Tang, Wang 2024 (SLAB), https://arxiv.org/abs/2405.11582.

    Trains a transformer norm that starts as LayerNorm and ends as the foldable `RepBN`:
    ``PRepBN(x) = λ·LN(x) + (1−λ)·RepBN(x)`` with λ decaying linearly 1 → 0 over
    ``total_steps`` training calls (after ``warmup_steps`` calls of pure LN). At evaluation it is
    RepBN alone, which folds into the next Dense (`fold_repbn_into_dense`).

    The step is explicit state: ``batch_stats/step`` (int32), advanced by one per training call;
    pass ``step=`` to ``__call__`` to drive λ from the optimizer step instead (then the counter
    is left alone). Official code (``LinearNorm``) keeps the same counter as hidden buffers
    (``warm`` counting down, then ``iter``); λ = ``r0·iter/total`` at each call, as here
    (`prepbn_lambda`). During the warm-up the official code skips RepBN entirely; we compute it
    but do not update its running statistics, which gives the same outputs and statistics.
    Schedules in SLAB: 60k steps (DeiT, SLAB-Swin), 300k (Swin/PVT-PRepBN).

    Attributes:
      total_steps: steps of the linear decay of λ.
      warmup_steps: initial steps of pure LayerNorm.
      r0: starting λ after warm-up (official default 1).
      use_running_average: evaluation mode (RepBN only).
      ln_epsilon: LayerNorm ε (PyTorch default 1e-5, as used by SLAB).
      bn_epsilon, momentum, alpha_init: RepBN settings.
      dtype, param_dtype: output and parameter dtypes.

    Example:
      >>> m = PRepBN(total_steps=100)
      >>> x = jnp.ones((2, 16, 8))
      >>> v = m.init(jax.random.key(0), x, use_running_average=False)
    """

    total_steps: int = 60000
    warmup_steps: int = 0
    r0: float = 1.0
    use_running_average: bool | None = None
    ln_epsilon: float = 1e-5
    bn_epsilon: float = 1e-5
    momentum: float = 0.9
    alpha_init: float = 1.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "*N C"],
        use_running_average: bool | None = None,
        *,
        step: Array | int | None = None,
        mask: Array | None = None,
    ) -> Float[Array, "*N C"]:
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if self.total_steps <= 0:
            raise ValueError(f"PRepBN: total_steps={self.total_steps} must be > 0")
        counter = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        repbn = RepBN(
            momentum=self.momentum,
            epsilon=self.bn_epsilon,
            alpha_init=self.alpha_init,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            name="repbn",
        )
        ln = nn.LayerNorm(
            epsilon=self.ln_epsilon, dtype=jnp.float32, param_dtype=self.param_dtype, name="ln"
        )
        out_dtype = _out_dtype(self.dtype, x)
        if ura:
            return repbn(x, use_running_average=True).astype(out_dtype)
        t = counter.value if step is None else step
        lam = prepbn_lambda(t, self.total_steps, self.warmup_steps, self.r0)
        in_warmup = jnp.asarray(t) < self.warmup_steps
        y_ln = ln(x.astype(jnp.float32))
        y_bn = repbn(x, use_running_average=False, mask=mask, update_stats=~in_warmup)
        if step is None and not self.is_initializing():
            counter.value = counter.value + 1
        return (lam * y_ln + (1.0 - lam) * y_bn).astype(out_dtype)


# --------------------------------------------------------------------------------------------
# BN-only training (Frankle, Schwab, Morcos 2021)


def _path_names(path: tuple) -> tuple[str, ...]:
    out = []
    for k in path:
        name = getattr(k, "key", None)
        if name is None:
            name = getattr(k, "name", None)
        if name is None:
            name = getattr(k, "idx", k)
        out.append(str(name))
    return tuple(out)


def _is_box(x: Any) -> bool:
    # Logically-partitioned params (nn.Partitioned) count as one leaf, so masks and re-inits
    # work on boxed and unboxed trees alike (a bool in a box's place is a valid optax prefix).
    return isinstance(x, nn.meta.AxisMetadata)


def _bn_leaf_paths(params: Any, norm_leaves: Sequence[str]) -> set[tuple[str, ...]]:
    """Paths of `scale`-style leaves: a module that has a ``scale`` leaf is a norm module."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
    paths = {_path_names(p) for p, _ in flat}
    modules_with_scale = {p[:-1] for p in paths if p and p[-1] == "scale"}
    return {p for p in paths if p and p[-1] in norm_leaves and p[:-1] in modules_with_scale}


def bn_only_mask(
    params: Any,
    *,
    extra_trainable: Sequence[str] = (),
    norm_leaves: Sequence[str] = ("scale", "bias"),
) -> Any:
    """Trainable mask for BN-only training (Frankle et al. 2021, https://arxiv.org/abs/2003.00152).

    Returns a pytree like ``params`` with True for the normalization affine parameters and False
    for everything else. A leaf counts as a norm parameter when its name is in ``norm_leaves``
    (``scale``/``bias``) and its module also holds a ``scale`` leaf — so BatchNorm modules
    (and BN parameters stored next to a ``kernel``, as in a fused ConvBN) are trainable, while a
    Conv/Dense ``bias`` (no ``scale`` next to it) is frozen. Note that this also selects other
    norms with a ``scale`` (LayerNorm, GroupNorm); pass a narrower ``params`` subtree or post-edit
    the mask if that matters. ``extra_trainable``: regular expressions matched (``re.search``)
    against the ``/``-joined path, e.g. ``("^head/",)`` to also train the output layer (the
    paper's "output layer trainable" variant; default: frozen, the BN-only setting).

    Use as ``optax.masked(tx, mask)`` for the trainable part plus zeroed updates for the rest —
    `bn_only_optimizer` does exactly that.
    """
    norm = _bn_leaf_paths(params, tuple(norm_leaves))
    pats = [re.compile(p) for p in extra_trainable]

    def label(path, _):
        names = _path_names(path)
        return names in norm or any(p.search("/".join(names)) for p in pats)

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_box)


def bn_only_labels(params: Any, **kwargs: Any) -> Any:
    """``bn_only_mask`` as ``optax.multi_transform`` labels: ``"trainable"`` / ``"frozen"``."""
    mask = bn_only_mask(params, **kwargs)
    return jax.tree_util.tree_map(lambda m: "trainable" if m else "frozen", mask, is_leaf=_is_box)


def bn_only_optimizer(tx: optax.GradientTransformation, params: Any, **kwargs: Any):
    """``tx`` on the BN affine parameters, zero updates (frozen) everywhere else.

    ``kwargs`` go to `bn_only_mask` (``extra_trainable``, ``norm_leaves``).
    """
    return optax.multi_transform(
        {"trainable": tx, "frozen": optax.set_to_zero()}, bn_only_labels(params, **kwargs)
    )


def bn_only_init(
    params: Any,
    key: Array,
    scheme: Literal["uniform", "fixed", "positivenegative", "oneone"] = "uniform",
    **kwargs: Any,
) -> Any:
    """Re-initialize the BN affine parameters (as `bn_only_mask` finds them, without
    ``extra_trainable``) following the paper's code.

    open_lth ``bn_initializers``: ``uniform`` (γ ~ U[0, 1], β = 0; the paper's default for
    ResNets), ``fixed`` (γ = 1, β = 0), ``oneone`` (γ = 1, β = 1), ``positivenegative``
    (γ ~ U[−1, 1], β = 0). Other parameters are returned unchanged.
    """
    if scheme not in ("uniform", "fixed", "positivenegative", "oneone"):
        raise ValueError(f"bn_only_init: unknown scheme {scheme!r}")
    norm = _bn_leaf_paths(params, tuple(kwargs.get("norm_leaves", ("scale", "bias"))))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, box), k in zip(leaves, keys, strict=True):
        names = _path_names(path)
        name = names[-1]
        leaf = box.unbox() if _is_box(box) else box
        if names not in norm or name not in ("scale", "bias"):
            out.append(box)
            continue
        if name == "bias":
            new = jnp.full_like(leaf, 1.0 if scheme == "oneone" else 0.0)
        elif scheme == "uniform":
            new = jax.random.uniform(k, leaf.shape, leaf.dtype, 0.0, 1.0)
        elif scheme == "positivenegative":
            new = jax.random.uniform(k, leaf.shape, leaf.dtype, -1.0, 1.0)
        else:
            new = jnp.ones_like(leaf)
        out.append(box.replace_boxed(new) if _is_box(box) else new)
    return jax.tree_util.tree_unflatten(treedef, out)
