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
* Per-parameter-group learning rates and weight decay by regex over the ``/``-joined parameter
  path (``optimizer.param_groups``, `optax.multi_transform`), as safari trains long-convolution
  kernels with their own learning rate and no weight decay (Fu et al. 2023, arXiv:2302.06646).
* AGVM (Xue et al. 2022, arXiv:2210.11078) lives in `jaxblocks.train.agvm`; it starts after the
  warm-up by default (`agvm_start_step`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxblocks.compress.sparsity import prune
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


def lr_scale_factor(cfg: ml_collections.ConfigDict) -> float:
    """The batch-size scaling rule's multiplier: 1, ``B/B0`` (linear) or ``√(B/B0)`` (sqrt)."""
    o = cfg.optimizer
    r = cfg.batch_size / o.base_batch_size
    if o.lr_scaling == "linear":
        return r
    if o.lr_scaling == "sqrt":
        return math.sqrt(r)
    if o.lr_scaling == "none":
        return 1.0
    raise ValueError(f"optimizer.lr_scaling must be none/linear/sqrt, got {o.lr_scaling!r}")


def scaled_learning_rate(cfg: ml_collections.ConfigDict) -> float:
    """Peak learning rate after the batch-size scaling rule."""
    return cfg.optimizer.learning_rate * lr_scale_factor(cfg)


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


def warmup_steps(cfg: ml_collections.ConfigDict, num_steps: int, num_train_examples: int) -> int:
    """Warm-up length in optimizer steps (``warmup_steps``/``_epochs``/``_examples``, times the
    regime factor, at most ``num_steps``)."""
    o = cfg.optimizer
    if o.warmup_epochs >= 0 or o.warmup_examples >= 0:
        warm = resolve_steps(
            -1,
            o.warmup_epochs,
            o.warmup_examples,
            steps_per_epoch=num_train_examples / cfg.batch_size,
            batch_size=cfg.batch_size,
            what="warm-up",
        )
    else:
        warm = int(o.warmup_steps)
    return min(warm * regime_factor(cfg), num_steps)


def make_schedule(
    cfg: ml_collections.ConfigDict,
    num_steps: int,
    num_train_examples: int,
    *,
    peak: float | None = None,
) -> optax.Schedule:
    """Warm-up (linear from 0) then constant / cosine / step decay, all in optimizer steps.

    ``peak``: the peak rate (default: `scaled_learning_rate`; parameter groups pass their own).
    """
    o = cfg.optimizer
    peak = scaled_learning_rate(cfg) if peak is None else peak
    warm = warmup_steps(cfg, num_steps, num_train_examples)
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


def agvm_start_step(cfg: ml_collections.ConfigDict, num_steps: int, num_train_examples: int) -> int:
    """``agvm.start_step``, with the default ``-1`` resolved to the end of the warm-up (the
    official AgvmOptimizerHook starts after warm-up: ``lr_update_start_iter`` defaults to
    ``warmup_iters`` and it warns when started earlier)."""
    start = int(cfg.agvm.start_step)
    if start == -1:
        return warmup_steps(cfg, num_steps, num_train_examples)
    if start < 0:
        raise ValueError(f"config.agvm.start_step must be >= 0 or -1 (after warm-up), got {start}")
    return start


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


def _base_optimizer(
    o: ml_collections.ConfigDict, schedule: optax.ScalarOrSchedule, weight_decay: float
) -> optax.GradientTransformation:
    if o.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, decay_mask),
            optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov),
        )
    if o.name == "adamw":
        return optax.adamw(
            schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=weight_decay, mask=decay_mask
        )
    if o.name == "lars":
        return lars(
            schedule,
            weight_decay=weight_decay,
            trust_coefficient=o.trust_coefficient,
            momentum=o.momentum,
            nesterov=o.nesterov,
        )
    if o.name == "lamb":
        return lamb(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=weight_decay)
    raise ValueError(f"optimizer.name: unknown optimizer {o.name!r}")


def _path(path: tuple) -> str:
    return "/".join(bn_only._path_names(path))


def param_group_labels(params: Any, groups: Any) -> Any:
    """Label per leaf for ``optimizer.param_groups``: ``"group<i>"`` of the first group whose
    ``pattern`` matches (``re.search``) the ``/``-joined path, else ``"default"``.

    Raises ValueError naming a pattern that matches no parameter (a typo would otherwise
    silently train everything with the default settings).
    """
    pats = [re.compile(g["pattern"]) for g in groups]
    used = [False] * len(pats)

    def label(path, _):
        name = _path(path)
        for i, p in enumerate(pats):
            if p.search(name):
                used[i] = True
                return f"group{i}"
        return "default"

    labels = jax.tree_util.tree_map_with_path(label, params, is_leaf=bn_only._is_box)
    for i, ok in enumerate(used):
        if not ok:
            names = [_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"config.optimizer.param_groups[{i}]: pattern {groups[i]['pattern']!r} matches "
                f"no parameter (or only ones an earlier group took); parameters: {shown}"
            )
    return labels


def make_optimizer(
    cfg: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    *,
    params: Any = None,
    group_schedules: Any = None,
) -> optax.GradientTransformation:
    """The optimizer of ``cfg.optimizer`` (clip → optimizer per parameter group → freeze mask).

    Args:
      cfg: full config.
      schedule: learning rate per optimizer step.
      params: (abstract) parameter tree, needed for the BN-only freeze mask and for
        ``optimizer.param_groups``.
      group_schedules: one schedule per entry of ``optimizer.param_groups`` (`make_schedules`
        builds them); a group without ``"lr"`` may use ``None`` (the main schedule).

    With ``optimizer.param_groups`` the update is an `optax.multi_transform` over the groups:
    each is the same optimizer with its own schedule and weight decay (decay still masked off
    ``ndim <= 1`` leaves), and every parameter no group matches uses the main settings.
    """
    o = cfg.optimizer
    groups = tuple(o.get("param_groups", ()) or ())
    tx = _base_optimizer(o, schedule, o.weight_decay)
    if groups:
        if params is None:
            raise ValueError("optimizer.param_groups needs the (abstract) params")
        group_schedules = list(group_schedules or [None] * len(groups))
        if len(group_schedules) != len(groups):
            raise ValueError(
                f"make_optimizer: {len(group_schedules)} group schedules for {len(groups)} "
                "optimizer.param_groups"
            )
        transforms = {"default": tx}
        for i, g in enumerate(groups):
            wd = g.get("weight_decay")
            sched = group_schedules[i] if group_schedules[i] is not None else schedule
            transforms[f"group{i}"] = _base_optimizer(
                o, sched, o.weight_decay if wd is None else float(wd)
            )
        labels = param_group_labels(params, groups)
        used = set(jax.tree.leaves(labels))
        tx = optax.multi_transform({k: v for k, v in transforms.items() if k in used}, labels)
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


def pruning_transform(
    cfg: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation | None:
    """Gradual magnitude pruning of ``optimizer.pruning`` (`jaxblocks.compress.prune`), or None
    when ``final`` is 0. ``begin``/``end`` are fractions of the run's steps."""
    pr = cfg.optimizer.pruning
    if float(pr.final) == 0.0:
        return None
    if not 0.0 <= pr.begin < pr.end <= 1.0:
        raise ValueError(
            f"config.optimizer.pruning: need 0 <= begin < end <= 1 (fractions of the run), got "
            f"begin={pr.begin}, end={pr.end}"
        )
    begin = int(pr.begin * num_steps)
    end = max(int(pr.end * num_steps), begin + 1)
    return prune(
        float(pr.final),
        include=pr.include,
        initial=float(pr.initial),
        begin=begin,
        end=end,
        frequency=max(1, int(pr.frequency)),
        block=(1, int(pr.block)),
    )


def make_schedules(
    cfg: ml_collections.ConfigDict, num_steps: int, num_train_examples: int
) -> tuple[optax.Schedule, list[optax.Schedule | None]]:
    """The main schedule and one per ``optimizer.param_groups`` entry (None when the group sets
    no ``"lr"``). A group's peak is its ``lr`` scaled by the same batch-size rule as
    ``learning_rate``; warm-up and decay have the same shape."""
    main = make_schedule(cfg, num_steps, num_train_examples)
    factor = lr_scale_factor(cfg)
    out: list[optax.Schedule | None] = []
    for g in tuple(cfg.optimizer.get("param_groups", ()) or ()):
        lr = g.get("lr")
        if lr is None:
            out.append(None)
            continue
        out.append(make_schedule(cfg, num_steps, num_train_examples, peak=float(lr) * factor))
    return main, out
