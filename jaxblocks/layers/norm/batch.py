"""Batch-style normalization: Ghost BN, PowerNorm, Batch-Channel Normalization.

Each normalizes with statistics taken over the batch (per ghost batch, as a running quadratic
mean, or as running estimates followed by a per-sample group step) and keeps running statistics
in ``batch_stats`` with Flax's BatchNorm conventions (see `jaxblocks.layers.norm`).
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxblocks.layers.norm._common import (
    Dtype,
    Initializer,
    _affine,
    _bc,
    _check_features,
    _moments,
    _num_groups,
    _out_dtype,
)
from jaxblocks.typing import Array, Float

__all__ = [
    "POWER_NORM_BACKWARD_COLLECTION",
    "BatchChannelNorm",
    "GhostBatchNorm",
    "PowerNorm",
    "batch_channel_norm",
    "ghost_batch_norm",
    "power_norm",
    "sequential_ema",
]

# PowerNorm keeps the backward's running statistic nu in its own collection: the trainer
# differentiates the loss with respect to it and stores the "gradient" (= the updated nu).
POWER_NORM_BACKWARD_COLLECTION = "power_norm_backward"


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
# Batch-Channel Normalization (Qiao et al. 2019)


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
