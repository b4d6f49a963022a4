"""RepBN and PRepBN (Guo et al. 2024, SLAB): batch norm plus a scaled identity, foldable."""

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
    _moments,
    _out_dtype,
)
from jaxblocks.typing import Array, Float

__all__ = [
    "PRepBN",
    "RepBN",
    "fold_repbn_into_dense",
    "prepbn_lambda",
    "rep_batch_norm",
    "repbn_affine",
]


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

    ``norm_kind="rms"`` replaces the LayerNorm by RMSNorm (``x·rsqrt(mean(x²) + ε)·γ``, no
    bias), as SLAB's LLaMA variant (``llama/modeling/llama-350M/modeling_llama.py``:
    ``LinearNorm(norm1=LlamaRMSNorm, norm2=RepBN)``, both with ε = ``rms_norm_eps`` = 1e-6,
    RepBN's α, γ and β initialised to 0: pass ``ln_epsilon=bn_epsilon=1e-6, alpha_init=0,
    bn_scale_init=0``). That variant advances its counter once every 16 calls (gradient
    accumulation), warm-up 10k and decay 18k counter steps; drive it here with ``step=``.

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
      ln_epsilon: LayerNorm (or RMSNorm) ε (PyTorch default 1e-5; SLAB-DeiT/PVT use 1e-6).
      norm_kind: ``"layer"`` (LayerNorm, the vision models) or ``"rms"`` (RMSNorm, LLaMA).
      bn_epsilon, momentum, alpha_init: RepBN settings.
      bn_scale_init: initial value of RepBN's BN scale γ (1; the LLaMA variant: 0).
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
    norm_kind: str = "layer"
    bn_epsilon: float = 1e-5
    momentum: float = 0.9
    alpha_init: float = 1.0
    bn_scale_init: float = 1.0
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
        if self.norm_kind not in ("layer", "rms"):
            raise ValueError(f"PRepBN: norm_kind={self.norm_kind!r} must be 'layer' or 'rms'")
        counter = self.variable("batch_stats", "step", lambda: jnp.zeros((), jnp.int32))
        repbn = RepBN(
            momentum=self.momentum,
            epsilon=self.bn_epsilon,
            alpha_init=self.alpha_init,
            scale_init=nn.initializers.constant(self.bn_scale_init),
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            name="repbn",
        )
        if self.norm_kind == "rms":
            ln = nn.RMSNorm(
                epsilon=self.ln_epsilon, dtype=jnp.float32, param_dtype=self.param_dtype, name="rms"
            )
        else:
            ln = nn.LayerNorm(
                epsilon=self.ln_epsilon, dtype=jnp.float32, param_dtype=self.param_dtype, name="ln"
            )
        out_dtype = _out_dtype(self.dtype, x)
        if ura:
            if self.is_initializing():  # an eval-mode init still creates the training norm
                ln(x.astype(jnp.float32))
            return repbn(x, use_running_average=True).astype(out_dtype)
        t = counter.value if step is None else step
        lam = prepbn_lambda(t, self.total_steps, self.warmup_steps, self.r0)
        in_warmup = jnp.asarray(t) < self.warmup_steps
        y_ln = ln(x.astype(jnp.float32))
        y_bn = repbn(x, use_running_average=False, mask=mask, update_stats=~in_warmup)
        if step is None and not self.is_initializing():
            counter.value = counter.value + 1
        return (lam * y_ln + (1.0 - lam) * y_bn).astype(out_dtype)
