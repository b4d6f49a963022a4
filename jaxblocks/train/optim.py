"""Optimizers and learning-rate recipes for large-batch training, composed from optax.

* SGD + momentum, AdamW, LARS (You et al. 2017, arXiv:1708.03888) and LAMB (You et al. 2020,
  arXiv:1904.00962). Weight decay *and* trust ratios are masked off biases and normalization
  parameters (every leaf with ``ndim <= 1``), the common large-batch practice; optax's own
  `optax.lars` masks nothing by default and `optax.lamb` never masks the trust ratio.
* Learning-rate scaling rules: linear ``lr·B/B0`` (Goyal et al.) and square-root
  ``lr·√(B/B0)`` (Hoffer et al. 2017); warm-up then cosine or step decay.
* Regime adaptation (Hoffer et al. 2017, arXiv:1705.08741): every step count is multiplied by
  ``⌈B/B0⌉`` so a large batch gets as many updates as the small-batch regime.
* Durations in steps, epochs or examples.
* BN-only training (Frankle et al. 2021, arXiv:2003.00152) as a freeze mask: every leaf but the
  BatchNorm scale/bias gets `optax.set_to_zero` (`jaxblocks.train.bn_only.bn_only_optimizer`),
  and the BN parameters are re-initialised as in the paper's code (`bn_only_init`).
* AGVM (Xue et al. 2022, arXiv:2210.11078) lives in `jaxblocks.train.agvm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxblocks.train import bn_only

# --------------------------------------------------------------------------------------------
# Durations and schedules
# --------------------------------------------------------------------------------------------


def resolve_steps(
    steps: float,
    epochs: float,
    examples: float,
    *,
    steps_per_epoch: float,
    batch_size: int,
    what: str,
) -> int:
    """Exactly one of steps/epochs/examples (the others negative) → a step count."""
    given = [
        (n, v)
        for n, v in (("steps", steps), ("epochs", epochs), ("examples", examples))
        if v is not None and v >= 0
    ]
    if len(given) != 1:
        raise ValueError(
            f"{what}: set exactly one of *_steps, *_epochs, *_examples (>= 0), got {given}"
        )
    name, v = given[0]
    if name == "steps":
        return int(v)
    if name == "epochs":
        return int(round(v * steps_per_epoch))
    return int(math.ceil(v / batch_size))


def regime_factor(cfg: ml_collections.ConfigDict) -> int:
    """Hoffer et al.'s ⌈B / B_small⌉ (1 when regime adaptation is off)."""
    o = cfg.optimizer
    if not o.regime_adaptation:
        return 1
    return max(1, math.ceil(cfg.batch_size / o.regime_base_batch_size))


def scaled_learning_rate(cfg: ml_collections.ConfigDict) -> float:
    """Peak learning rate after the batch-size scaling rule."""
    o = cfg.optimizer
    r = cfg.batch_size / o.base_batch_size
    if o.lr_scaling == "linear":
        return o.learning_rate * r
    if o.lr_scaling == "sqrt":
        return o.learning_rate * math.sqrt(r)
    if o.lr_scaling == "none":
        return o.learning_rate
    raise ValueError(f"optimizer.lr_scaling must be none/linear/sqrt, got {o.lr_scaling!r}")


def total_steps(cfg: ml_collections.ConfigDict, num_train_examples: int) -> int:
    spe = num_train_examples / cfg.batch_size
    n = resolve_steps(
        cfg.train_steps,
        cfg.train_epochs,
        cfg.train_examples,
        steps_per_epoch=spe,
        batch_size=cfg.batch_size,
        what="train duration",
    )
    return n * regime_factor(cfg)


def make_schedule(
    cfg: ml_collections.ConfigDict, num_steps: int, num_train_examples: int
) -> optax.Schedule:
    """Warm-up (linear from 0) then constant / cosine / step decay, all in optimizer steps."""
    o = cfg.optimizer
    peak = scaled_learning_rate(cfg)
    spe = num_train_examples / cfg.batch_size
    if o.warmup_epochs >= 0 or o.warmup_examples >= 0:
        warm = resolve_steps(
            -1,
            o.warmup_epochs,
            o.warmup_examples,
            steps_per_epoch=spe,
            batch_size=cfg.batch_size,
            what="warm-up",
        )
    else:
        warm = int(o.warmup_steps)
    warm = min(warm * regime_factor(cfg), num_steps)
    rest = max(num_steps - warm, 1)
    if o.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif o.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=o.end_lr_fraction)
    elif o.schedule == "step":
        bounds = {int(round(f * num_steps)) - warm: o.step_decay for f in o.step_boundaries}
        after = optax.piecewise_constant_schedule(peak, {k: v for k, v in bounds.items() if k > 0})
    else:
        raise ValueError(f"optimizer.schedule must be constant/cosine/step, got {o.schedule!r}")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay and a trust ratio: matrices and conv kernels
    (``ndim > 1``); False for biases and normalization scales/offsets."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def bn_only_init(params: Any, key: jax.Array, scheme: str) -> Any:
    """BN-only initialisation of the BN affine parameters (`jaxblocks.train.bn_only.bn_only_init`;
    ``"uniform"`` — γ ~ U[0, 1], β = 0 — is the paper's default for ResNets); ``"keep"`` leaves
    the model's own initialisation."""
    if scheme == "keep":
        return params
    return bn_only.bn_only_init(params, key, scheme)


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float,
    trust_coefficient: float,
    momentum: float,
    nesterov: bool = False,
    mask: Any | Callable[[Any], Any] = decay_mask,
    eps: float = 0.0,
) -> optax.GradientTransformation:
    """LARS with weight decay and trust ratio masked off ``ndim <= 1`` leaves.

    Per leaf: ``u = g + β·w`` (masked), ``u ← η·‖w‖/‖u‖·u`` (masked; 1 if a norm is 0),
    ``v ← m·v + lr·u``, ``w ← w − v`` — optax's ordering (`optax.lars`)."""
    return optax.lars(
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=mask,
        trust_coefficient=trust_coefficient,
        eps=eps,
        trust_ratio_mask=mask,
        momentum=momentum,
        nesterov=nesterov,
    )


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: Any | Callable[[Any], Any] = decay_mask,
) -> optax.GradientTransformation:
    """LAMB: Adam direction ``r = m̂/(√v̂+ε)``, ``u = r + λw`` (masked), trust ratio
    ``‖w‖/‖u‖`` (masked — unlike `optax.lamb`), ``w ← w − lr·ratio·u``."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask),
        optax.masked(optax.scale_by_trust_ratio(), mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def make_optimizer(
    cfg: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    *,
    params: Any = None,
) -> optax.GradientTransformation:
    """The optimizer of ``cfg.optimizer`` (clip → optimizer → freeze mask).

    Args:
      cfg: full config.
      schedule: learning rate per optimizer step.
      params: (abstract) parameter tree, needed for the BN-only freeze mask.
    """
    o = cfg.optimizer
    if o.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(o.weight_decay, decay_mask),
            optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov),
        )
    elif o.name == "adamw":
        tx = optax.adamw(
            schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
        )
    elif o.name == "lars":
        tx = lars(
            schedule,
            weight_decay=o.weight_decay,
            trust_coefficient=o.trust_coefficient,
            momentum=o.momentum,
            nesterov=o.nesterov,
        )
    elif o.name == "lamb":
        tx = lamb(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        raise ValueError(f"optimizer.name: unknown optimizer {o.name!r}")
    if o.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    if o.freeze == "bn_only":
        if params is None:
            raise ValueError("optimizer.freeze='bn_only' needs the (abstract) params")
        if not any(jax.tree.leaves(bn_only.bn_only_mask(params))):
            raise ValueError("optimizer.freeze='bn_only': the model has no BatchNorm parameters")
        tx = bn_only.bn_only_optimizer(tx, params)
    elif o.freeze != "none":
        raise ValueError(f"optimizer.freeze must be none/bn_only, got {o.freeze!r}")
    return tx
