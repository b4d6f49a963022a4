"""Penalties the trainer adds to the training loss, built from ``config.regularizers``.

`build_regularizer(cfg)` returns ``fn(params) -> (penalty, metrics)`` or None; the train step
adds the penalty to the task loss and logs the metrics (e.g. ``lorth``, the unweighted sum).
The kernels are chosen from the parameters' shapes when the step is traced, so a pattern that
matches nothing, or a kernel that admits no orthogonal convolution, stops the run at its first
compile with an error naming it. Today: the L_orth penalty of orthogonal convolutions
(`jaxblocks.compress.lorth_penalty`, Achour et al., https://arxiv.org/abs/2108.05623) and the
MST-distance penalty of binary layers (`jaxblocks.compress.mst_distance_penalty`, Vo et al.,
https://arxiv.org/abs/2308.13735); both may be on at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxblocks.compress import check_orthogonal_conv_exists, lorth_penalty, mst_distance_penalty

Regularizer = Callable[[Any], tuple[jax.Array, dict[str, jax.Array]]]


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def lorth_kernels(cfg: ml_collections.ConfigDict, params: Any) -> dict[str, int]:
    """``{path: stride}`` of the conv kernels the L_orth penalty covers (checked to admit an
    orthogonal convolution, else a ValueError naming the kernel)."""
    r = cfg.regularizers
    include = re.compile(r.lorth_include)
    rules = [(re.compile(pat), int(stride)) for pat, stride in tuple(r.lorth_strides)]
    chosen = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _path(keys)
        shape = getattr(leaf, "shape", ())
        if len(shape) != 4 or shape[0] != shape[1] or not include.search(path):
            continue
        stride = next((s for pat, s in rules if pat.search(path)), 1)
        try:
            check_orthogonal_conv_exists(shape, stride)
        except ValueError as e:
            raise ValueError(
                f"config.regularizers.lorth_include matches {path!r}, {e}; narrow the pattern "
                "or set its stride in regularizers.lorth_strides"
            ) from None
        chosen[path] = stride
    if not chosen:
        raise ValueError(
            f"config.regularizers.lorth_weight > 0 but lorth_include={r.lorth_include!r} matches "
            "no square 4-D conv kernel"
        )
    return chosen


def mst_kernels(cfg: ml_collections.ConfigDict, params: Any) -> list[str]:
    """Paths of the kernels the MST-distance penalty covers (a ValueError when none match)."""
    include = re.compile(cfg.regularizers.mst_include)
    chosen = [
        _path(keys)
        for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if getattr(leaf, "ndim", 0) >= 2 and include.search(_path(keys))
    ]
    if not chosen:
        raise ValueError(
            f"config.regularizers.mst_weight > 0 but mst_include="
            f"{cfg.regularizers.mst_include!r} matches no kernel"
        )
    return chosen


def _lorth(cfg: ml_collections.ConfigDict, weight: float) -> Regularizer:
    def fn(p):
        kernels = lorth_kernels(cfg, p)
        total = jnp.zeros((), jnp.float32)
        for keys, leaf in jax.tree_util.tree_flatten_with_path(p)[0]:
            path = _path(keys)
            if path in kernels:
                total = total + lorth_penalty(leaf, kernels[path])
        return weight * total, {"lorth": total}

    return fn


def _mst(cfg: ml_collections.ConfigDict, weight: float) -> Regularizer:
    temperature = float(cfg.regularizers.mst_temperature)
    if not temperature > 0:
        raise ValueError(f"config.regularizers.mst_temperature must be > 0, got {temperature}")

    def fn(p):
        kernels = set(mst_kernels(cfg, p))
        total = jnp.zeros((), jnp.float32)
        for keys, leaf in jax.tree_util.tree_flatten_with_path(p)[0]:
            if _path(keys) in kernels:
                total = total + mst_distance_penalty(leaf, temperature)
        return weight * total, {"mst_distance": total}

    return fn


def build_regularizer(cfg: ml_collections.ConfigDict) -> Regularizer | None:
    """The configured penalties as ``fn(params) -> (weighted penalty, metrics)``, or None."""
    parts = []
    for name, make in (("lorth_weight", _lorth), ("mst_weight", _mst)):
        weight = float(cfg.regularizers.get(name, 0.0))
        if weight < 0:
            raise ValueError(f"config.regularizers.{name} must be >= 0, got {weight}")
        if weight > 0:
            parts.append(make(cfg, weight))
    if not parts:
        return None

    def fn(p):
        total, metrics = jnp.zeros((), jnp.float32), {}
        for part in parts:
            penalty, m = part(p)
            total = total + penalty
            metrics.update(m)
        return total, metrics

    return fn
