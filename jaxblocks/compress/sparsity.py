"""Sparsity: gradual magnitude pruning and random-graph masks, for any parameter tree.

* Zhu & Gupta, "To prune, or not to prune", https://arxiv.org/abs/1710.01878: the sparsity
  rises from ``initial`` to ``final`` as s(t) = final + (initial − final)(1 − (t − t0)/(n Δt))³
  between ``begin`` and ``end``, re-pruning every ``frequency`` steps (`polynomial_sparsity`).
* Masks keep the largest magnitudes (`magnitude_mask`), unstructured or in 1×b blocks (Elsen et
  al., "Fast Sparse ConvNets", https://arxiv.org/abs/1911.09723, use 1×4 and 1×2).
* Darji, "Investigating Sparsity in Recurrent Neural Networks", https://arxiv.org/abs/2407.20601:
  magnitude pruning of input and recurrent weights, and fixed masks drawn from random graphs
  (`watts_strogatz_mask`, `barabasi_albert_mask`).
* `prune`: an optax transformation that applies the masks to the parameters after each update
  (so pruned weights stay exactly zero) and recomputes them on the schedule; the trainer's
  ``optimizer.pruning`` config uses it.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array

__all__ = [
    "polynomial_sparsity",
    "magnitude_mask",
    "watts_strogatz_mask",
    "barabasi_albert_mask",
    "sparsity_of",
    "prune",
    "PruneState",
]


def polynomial_sparsity(
    step: Array | int,
    final: float,
    *,
    initial: float = 0.0,
    begin: int = 0,
    end: int = 1000,
    frequency: int = 100,
) -> Array:
    """Zhu & Gupta's cubic schedule at ``step`` (held at ``initial`` before ``begin`` and at
    ``final`` after ``end``; changes only every ``frequency`` steps)."""
    if not 0.0 <= initial <= final < 1.0:
        raise ValueError(f"polynomial_sparsity: need 0 <= initial <= final < 1, got "
                         f"{initial}, {final}")  # fmt: skip
    if end <= begin or frequency < 1:
        raise ValueError(f"polynomial_sparsity: need end > begin and frequency >= 1, got "
                         f"begin={begin}, end={end}, frequency={frequency}")  # fmt: skip
    t = jnp.asarray(step, jnp.float32)
    t = jnp.floor((t - begin) / frequency) * frequency + begin  # the last pruning step
    frac = jnp.clip((t - begin) / (end - begin), 0.0, 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


def magnitude_mask(w: Array, sparsity: Array | float, block: tuple[int, int] = (1, 1)) -> Array:
    """A 0/1 mask (``w``'s dtype) zeroing the ``sparsity`` fraction of ``w`` with the smallest
    magnitudes; with ``block=(1, b)`` whole 1×b blocks of the last axis go together, ranked by
    their L1 norm. Ties at the threshold are kept, so the achieved sparsity can be slightly
    lower than asked."""
    bh, bw = block
    if bh != 1 or bw < 1:
        raise ValueError(f"magnitude_mask: block must be (1, b) with b >= 1, got {block}")
    if w.ndim < 1 or w.shape[-1] % bw:
        raise ValueError(
            f"magnitude_mask: the last axis of shape {w.shape} is not a multiple of block {bw}"
        )
    score = jnp.abs(w.astype(jnp.float32)).reshape(*w.shape[:-1], w.shape[-1] // bw, bw).sum(-1)
    flat = score.ravel()
    k = jnp.floor(jnp.asarray(sparsity, jnp.float32) * flat.size).astype(jnp.int32)
    threshold = jnp.where(k > 0, jnp.sort(flat)[jnp.maximum(k - 1, 0)], -1.0)
    keep = score > threshold
    return jnp.repeat(keep, bw, axis=-1).reshape(w.shape).astype(w.dtype)


def watts_strogatz_mask(n_in: int, n_out: int, k: int, p: float, seed: int) -> np.ndarray:
    """``[n_in, n_out]`` 0/1 mask from a Watts–Strogatz small-world graph: input unit i connects
    to the ``k`` output units nearest its position on a ring (``k`` even), each edge rewired to
    a random output unit with probability ``p``."""
    if k < 2 or k % 2 or k > n_out:
        raise ValueError(f"watts_strogatz_mask: k must be even, 2 <= k <= n_out, got k={k}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"watts_strogatz_mask: p must be in [0, 1], got {p}")
    rng = np.random.default_rng(seed)
    mask = np.zeros((n_in, n_out), np.float32)
    for i in range(n_in):
        centre = round(i * n_out / n_in)
        ring = [(centre + d) % n_out for d in range(-k // 2, k // 2)]  # k ring neighbours
        row = set(ring)
        for j in ring:
            if rng.random() < p:  # rewire this edge to an output unit not yet connected
                free = [c for c in range(n_out) if c not in row]
                if free:
                    row.discard(j)
                    row.add(int(rng.choice(free)))
        mask[i, sorted(row)] = 1.0
    return mask


def barabasi_albert_mask(n: int, m: int, seed: int) -> np.ndarray:
    """``[n, n]`` symmetric 0/1 mask of a Barabási–Albert preferential-attachment graph: each new
    node links to ``m`` existing nodes chosen with probability proportional to their degree
    (a recurrent weight mask: hub units with many connections)."""
    if not 1 <= m < n:
        raise ValueError(f"barabasi_albert_mask: need 1 <= m < n, got m={m}, n={n}")
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, n), np.float32)
    mask[: m + 1, : m + 1] = 1.0 - np.eye(m + 1, dtype=np.float32)  # a seed clique
    for new in range(m + 1, n):
        degree = mask[:new, :new].sum(1)
        targets = rng.choice(new, size=m, replace=False, p=degree / degree.sum())
        mask[new, targets] = mask[targets, new] = 1.0
    return mask


def sparsity_of(tree: Any) -> float:
    """Fraction of exact zeros over the leaves of ``tree``."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    total = sum(x.size for x in leaves)
    return float(sum((x == 0).sum() for x in leaves) / max(total, 1))


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


class PruneState(NamedTuple):
    """``count`` of updates so far and the current 0/1 ``masks`` (1 for unpruned leaves)."""

    count: Array
    masks: Any


def prune(
    final: float,
    *,
    include: str = r"kernel$",
    initial: float = 0.0,
    begin: int = 0,
    end: int = 1000,
    frequency: int = 100,
    block: tuple[int, int] = (1, 1),
    min_ndim: int = 2,
) -> optax.GradientTransformation:
    """Gradual magnitude pruning as the last link of an optax chain.

    Leaves whose "/"-joined path matches ``include`` (and with at least ``min_ndim`` axes) get a
    mask; every ``frequency`` steps between ``begin`` and ``end`` the mask is recomputed from
    the updated weights at `polynomial_sparsity`'s level; in every step the returned updates
    are ``(params + updates) · mask − params``, so pruned weights are exactly zero after the
    step and stay so.
    """
    pattern = re.compile(include)

    def selected(params):
        return jax.tree_util.tree_map_with_path(
            lambda k, x: bool(pattern.search(_path(k))) and x.ndim >= min_ndim, params
        )

    def init(params):
        sel = selected(params)
        if not any(jax.tree.leaves(sel)):
            raise ValueError(f"prune: include={include!r} matches no parameter with "
                             f">= {min_ndim} axes")  # fmt: skip
        masks = jax.tree.map(lambda x: jnp.ones_like(x), params)
        return PruneState(jnp.zeros((), jnp.int32), masks)

    def update(updates, state, params=None, **extra_args):
        del extra_args  # e.g. AGVM's half gradients, passed to every link of a chain
        if params is None:
            raise ValueError("prune needs params (optax.apply_updates-style update with params)")
        sel = selected(params)
        step = state.count
        level = polynomial_sparsity(step, final, initial=initial, begin=begin, end=end,
                                    frequency=frequency)  # fmt: skip
        refresh = (step >= begin) & (step <= end) & ((step - begin) % frequency == 0)
        new_params = jax.tree.map(lambda p, u: p + u, params, updates)

        def one(s, p, m):
            if not s:
                return m
            return jnp.where(refresh, magnitude_mask(p * m, level, block), m)

        masks = jax.tree.map(one, sel, new_params, state.masks)
        out = jax.tree.map(lambda p, np_, m: np_ * m - p, params, new_params, masks)
        return out, PruneState(step + 1, masks)

    return optax.GradientTransformation(init, update)
