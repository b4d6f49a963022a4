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
``half_grads`` only apply the current multipliers. The official code uses Adam-preconditioned
gradients for the cosine when the optimizer is Adam; this implementation uses the raw gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AGVMState(NamedTuple):
    multipliers: jax.Array  # [G] f32, the EMA s_i
    count: jax.Array  # int32 optimizer steps seen
    inner: Any


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


def agvm(
    inner: optax.GradientTransformation,
    labels: Any,
    num_groups: int,
    *,
    momentum: float = 0.97,
    interval: int = 5,
    start_step: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` with AGVM per-group learning-rate multipliers.

    Args:
      inner: the base optimizer (its output update is what gets scaled).
      labels: pytree like the params with an int group index per leaf (see `group_labels`).
      num_groups: number of groups; group 0 is the reference (the paper's backbone).
      momentum: EMA decay of the multipliers (0.97 in the paper).
      interval: statistic recomputed when ``count % interval == 0`` …
      start_step: … and ``count >= start_step`` (after warm-up).

    The returned transformation's ``update(updates, state, params, half_grads=None)`` takes the
    two half-batch gradients ``(g_A, g_B)`` as ``half_grads`` on the steps that refresh the
    statistic.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return AGVMState(
            multipliers=jnp.ones((num_groups,), jnp.float32),
            count=jnp.zeros((), jnp.int32),
            inner=inner.init(params),
        )

    def update_fn(updates, state, params=None, *, half_grads=None, **extra):
        mult = state.multipliers
        if half_grads is not None:
            d = variance_proxy(half_grads[0], half_grads[1], labels, num_groups)
            new = momentum * mult + (1.0 - momentum) * multipliers_from_variance(d)
            due = (state.count % interval == 0) & (state.count >= start_step)
            mult = jnp.where(due, new, mult)
        updates, inner_state = inner.update(updates, state.inner, params, **extra)
        active = state.count >= start_step
        updates = jax.tree.map(
            lambda u, lab: jnp.where(active, u * mult[lab].astype(u.dtype), u), updates, labels
        )
        return updates, AGVMState(mult, state.count + 1, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
