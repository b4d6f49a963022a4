"""AGVM — Adaptive Gradient Variance Modulator (Xue et al., NeurIPS 2022, arXiv:2210.11078).

Large-batch dense-prediction training diverges when the modules of a network (backbone, neck,
heads) see very different gradient variance. AGVM measures each module group's variance with a
cheap proxy and rescales that group's learning rate to match the reference group (the backbone).

Per group ``i``, from the gradients ``g_A, g_B`` of two halves of the global batch (in the
official code: two halves of the workers):

* ``D_i = 1 − cos(g_A^i, g_B^i)`` (flattened over the group's leaves),
* ``μ_i = sqrt(clip((D_0 + 1e-6) / (D_i + 1e-6), 0.5, 10))``,
* ``s_i ← m·s_i + (1 − m)·μ_i`` with ``m = 0.97``,

recomputed every ``interval`` steps from ``start_step`` on; every step the group's update is
multiplied by ``s_i`` (equivalently, its learning rate). `agvm` wraps any optax transformation;
the statistic needs the two half-batch gradients, passed as the extra argument ``half_grads``
(`optax.GradientTransformationExtraArgs`) by the trainer's AGVM step. Steps that pass no
``half_grads`` only apply the current multipliers.

Which gradients enter the cosine (``precondition``):

* ``"none"``: the raw half gradients (the official rule for SGD-type optimizers).
* ``"adam"``: the official rule when the optimizer is Adam (``use_adam`` in Sense-X/AGVM
  ``agvm/optim/agvm_optimizer_hook.py``): each half gradient is preconditioned elementwise as
  ``g / (sqrt(β2·ν + (1 − β2)·g²) + ε)``, where ``ν`` is Adam's second-moment estimate before
  this step's update and ``g²`` is the half gradient's own square. The official hook reads
  ``ν`` from the optimizer (``exp_avg_sq``); here AGVM keeps its own fp32 copy,
  ``ν ← β2·ν + (1 − β2)·g²`` of the full (mean) gradient it receives every step, without bias
  correction — the same ``ν`` as `optax.scale_by_adam` when ``inner`` sees the same gradients
  (a clip inside ``inner`` makes Adam's ``ν`` see the clipped ones; AGVM's does not). At the
  first step ``ν = 0``, so the preconditioned gradient is ≈ ``sign(g)/sqrt(1 − β2)`` (the
  official hook has no ``exp_avg_sq`` yet at that point and is started after warm-up).

The trainer picks ``"adam"`` for the Adam-family optimizers (`resolve_precondition`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

PRECONDITIONS = ("none", "adam")
# Optimizers of `jaxblocks.train.optim` that keep Adam's second moment (LAMB's direction is Adam's).
ADAM_FAMILY = ("adam", "adamw", "lamb")


class AGVMState(NamedTuple):
    multipliers: jax.Array  # [G] f32, the EMA s_i
    count: jax.Array  # int32 optimizer steps seen
    inner: Any
    # fp32 second-moment EMA of the gradient, shaped like the params ("adam"); None ("none"), so
    # the default keeps no extra memory and the same pytree leaves as before the field existed.
    nu: Any = None


def group_labels(params: Any, groups: Sequence[str]) -> Any:
    """Group index per leaf: the position of the leaf's top-level name in ``groups``
    (0, the reference group, when absent)."""
    index = {g: i for i, g in enumerate(groups)}

    def one(path, _):
        top = path[0]
        name = str(getattr(top, "key", getattr(top, "name", top)))
        return index.get(name, 0)

    return jax.tree_util.tree_map_with_path(one, params)


def variance_proxy(g_a: Any, g_b: Any, labels: Any, num_groups: int) -> jax.Array:
    """``D_i = 1 − cos(g_A^i, g_B^i)`` per group, shape ``[num_groups]`` (fp32)."""
    dot = jnp.zeros((num_groups,), jnp.float32)
    na = jnp.zeros((num_groups,), jnp.float32)
    nb = jnp.zeros((num_groups,), jnp.float32)
    for a, b, lab in zip(
        jax.tree.leaves(g_a), jax.tree.leaves(g_b), jax.tree.leaves(labels), strict=True
    ):
        a = a.astype(jnp.float32)
        b = b.astype(jnp.float32)
        dot = dot.at[lab].add(jnp.vdot(a, b))
        na = na.at[lab].add(jnp.vdot(a, a))
        nb = nb.at[lab].add(jnp.vdot(b, b))
    cos = dot / jnp.maximum(jnp.sqrt(na * nb), 1e-30)
    return 1.0 - cos


def multipliers_from_variance(d: jax.Array) -> jax.Array:
    """``μ_i = sqrt(clip((D_0 + 1e-6) / (D_i + 1e-6), 0.5, 10))``."""
    return jnp.sqrt(jnp.clip((d[0] + 1e-6) / (d + 1e-6), 0.5, 10.0))


def adam_precondition(g: Any, nu: Any, b2: float, eps: float) -> Any:
    """``g / (sqrt(β2·ν + (1 − β2)·g²) + ε)`` per leaf, fp32 (the official hook's Adam branch)."""

    def one(g, v):
        g = g.astype(jnp.float32)
        return g / (jnp.sqrt(b2 * v + (1.0 - b2) * jnp.square(g)) + eps)

    return jax.tree.map(one, g, nu)


def resolve_precondition(cfg: ml_collections.ConfigDict) -> str:
    """``cfg.agvm.precondition`` with ``"auto"`` resolved from ``cfg.optimizer.name``: ``"adam"``
    for the Adam family (adam, adamw, lamb), ``"none"`` otherwise (sgd, lars)."""
    p = cfg.agvm.get("precondition", "auto")
    if p == "auto":
        return "adam" if cfg.optimizer.name in ADAM_FAMILY else "none"
    if p not in PRECONDITIONS:
        raise ValueError(
            f"config.agvm.precondition must be 'auto' or one of {PRECONDITIONS}, got {p!r}"
        )
    return p


def agvm(
    inner: optax.GradientTransformation,
    labels: Any,
    num_groups: int,
    *,
    momentum: float = 0.97,
    interval: int = 5,
    start_step: int = 0,
    precondition: str = "none",
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` with AGVM per-group learning-rate multipliers.

    Args:
      inner: the base optimizer (its output update is what gets scaled).
      labels: pytree like the params with an int group index per leaf (see `group_labels`).
      num_groups: number of groups; group 0 is the reference (the paper's backbone).
      momentum: EMA decay of the multipliers (0.97 in the paper).
      interval: statistic recomputed when ``count % interval == 0`` …
      start_step: … and ``count >= start_step`` (after warm-up).
      precondition: ``"none"`` (cosine of the raw half gradients) or ``"adam"`` (of the
        Adam-preconditioned ones, the official rule with Adam; keeps an fp32 ``ν`` the size of
        the params in the state).
      b2: Adam's second-moment decay β2 for ``"adam"``; use the inner optimizer's.
      eps: Adam's ε for ``"adam"``; use the inner optimizer's.

    The returned transformation's ``update(updates, state, params, half_grads=None)`` takes the
    two half-batch gradients ``(g_A, g_B)`` as ``half_grads`` on the steps that refresh the
    statistic.

    Example::

      params = {"backbone": jnp.ones(3), "head": jnp.ones(2)}
      labels = group_labels(params, ("backbone", "head"))
      tx = agvm(optax.adam(1e-3), labels, 2, interval=1, precondition="adam")
      state = tx.init(params)
      g_a = {"backbone": jnp.array([1.0, 2, 3]), "head": jnp.array([1.0, -1])}
      g_b = {"backbone": jnp.array([1.0, 2, 2]), "head": jnp.array([1.0, 1])}
      g = jax.tree.map(lambda a, b: (a + b) / 2, g_a, g_b)
      updates, state = tx.update(g, state, params, half_grads=(g_a, g_b))
    """
    if precondition not in PRECONDITIONS:
        raise ValueError(f"agvm: precondition must be one of {PRECONDITIONS}, got {precondition!r}")
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"agvm: b2 must be in [0, 1), got {b2!r}")
    if not eps > 0.0:
        raise ValueError(f"agvm: eps must be > 0, got {eps!r}")
    adam = precondition == "adam"
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        nu = None
        if adam:
            nu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return AGVMState(
            multipliers=jnp.ones((num_groups,), jnp.float32),
            count=jnp.zeros((), jnp.int32),
            inner=inner.init(params),
            nu=nu,
        )

    def update_fn(updates, state, params=None, *, half_grads=None, **extra):
        mult = state.multipliers
        if half_grads is not None:
            g_a, g_b = half_grads
            if adam:  # with ν from before this step, as the hook runs before optimizer.step()
                g_a = adam_precondition(g_a, state.nu, b2, eps)
                g_b = adam_precondition(g_b, state.nu, b2, eps)
            d = variance_proxy(g_a, g_b, labels, num_groups)
            new = momentum * mult + (1.0 - momentum) * multipliers_from_variance(d)
            due = (state.count % interval == 0) & (state.count >= start_step)
            mult = jnp.where(due, new, mult)
        nu = state.nu
        if adam:
            nu = jax.tree.map(
                lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g.astype(jnp.float32)), nu, updates
            )
        updates, inner_state = inner.update(updates, state.inner, params, **extra)
        active = state.count >= start_step
        updates = jax.tree.map(
            lambda u, lab: jnp.where(active, u * mult[lab].astype(u.dtype), u), updates, labels
        )
        return updates, AGVMState(mult, state.count + 1, inner_state, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
