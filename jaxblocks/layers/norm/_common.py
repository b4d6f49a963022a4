"""Helpers shared by the normalization modules: input checks, float32 moments, broadcasting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxblocks.typing import Array

Initializer = Callable[..., Array]
Dtype = Any


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
