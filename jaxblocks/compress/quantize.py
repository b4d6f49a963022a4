"""Fake quantisation, integer storage and model-wide recipes: the core under CBQ (Ding et al.,
https://arxiv.org/abs/2312.07950) and blockwise quantisation (BCT, Dong & Chen,
https://arxiv.org/abs/2304.01483).

A `QuantSpec` says how a tensor is quantised: ``bits`` (2–8), symmetric (``q = round(x / s)``
in ``[-2^(b-1), 2^(b-1) - 1]`` with ``s = max|x| / (2^(b-1) - 1)``) or asymmetric
(``q = round(x / s) + z`` in ``[0, 2^b - 1]`` with ``s = (max − min) / (2^b − 1)`` and the zero
point ``z = round(−min / s)``), and the granularity of the scales:

* ``"tensor"``: one scale;
* ``"channel"``: one per index of ``axis`` (e.g. the output channel, ``axis=-1`` of a Flax
  kernel);
* ``"group"``: one per ``group_size`` consecutive entries along ``axis`` and per index of every
  other axis (GPTQ/AWQ-style groups along a Dense kernel's input axis, ``axis=0``);
* ``"block"``: one per ``block_shape`` tile of the last two axes (BCT's tile-wise scales).

`fake_quant` is quantise-then-dequantise with the straight-through estimator (gradient 1 inside
the representable range, 0 where values were clipped — none with max-based scales), `quantize`
returns the integers and scales (`QuantizedTensor`), `pack_int`/`unpack_int` store them 8/4/2 to
a byte, and `quantize_model` applies a recipe to every matching parameter of a model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

__all__ = [
    "GRANULARITIES",
    "QuantSpec",
    "QuantizedTensor",
    "compute_scales",
    "quantize",
    "dequantize",
    "fake_quant",
    "pack_int",
    "unpack_int",
    "quantize_model",
]

GRANULARITIES = ("tensor", "channel", "group", "block")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantise one tensor (see the module docstring).

    Attributes:
      bits: 2 to 8.
      symmetric: signed integers around 0 (True) or unsigned with a zero point (False).
      granularity: one of `GRANULARITIES`.
      axis: the channel axis (``"channel"``) or the grouped axis (``"group"``).
      group_size: entries per group along ``axis`` (``"group"``).
      block_shape: tile of the last two axes (``"block"``).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    axis: int = -1
    group_size: int = 128
    block_shape: tuple[int, int] = (64, 64)

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be an int in [2, 8], got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.group_size < 1 or min(self.block_shape) < 1 or len(self.block_shape) != 2:
            raise ValueError(
                f"QuantSpec: group_size {self.group_size} and block_shape {self.block_shape} "
                "must be positive (block_shape has two entries)"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def _grouped(x: Array, spec: QuantSpec) -> tuple[Array, tuple[int, ...]]:
    """``x`` reshaped so that each scale's entries share the axes returned (reduce over them)."""
    if spec.granularity == "tensor":
        return x, tuple(range(x.ndim))
    axis = spec.axis % x.ndim if x.ndim else 0
    if x.ndim == 0:
        raise ValueError(f"quantize: {spec.granularity} scales need an array, got a scalar")
    if spec.granularity == "channel":
        return x, tuple(a for a in range(x.ndim) if a != axis)
    if spec.granularity == "group":
        n = x.shape[axis]
        if n % spec.group_size:
            raise ValueError(
                f"quantize: axis {spec.axis} of shape {x.shape} has {n} entries, not a multiple "
                f"of group_size={spec.group_size}"
            )
        shape = (*x.shape[:axis], n // spec.group_size, spec.group_size, *x.shape[axis + 1 :])
        return x.reshape(shape), (axis + 1,)
    # block: tiles of the last two axes
    if x.ndim < 2:
        raise ValueError(f"quantize: block scales need >= 2 axes, got shape {x.shape}")
    (m, n), (bm, bn) = x.shape[-2:], spec.block_shape
    if m % bm or n % bn:
        raise ValueError(
            f"quantize: the last two axes {(m, n)} of shape {x.shape} are not multiples of "
            f"block_shape={spec.block_shape}"
        )
    lead = x.shape[:-2]
    return x.reshape(*lead, m // bm, bm, n // bn, bn), (len(lead) + 1, len(lead) + 3)


def compute_scales(x: Array, spec: QuantSpec) -> tuple[Array, Array]:
    """``(scale, zero_point)`` broadcastable against the grouped view of ``x`` (fp32; the zero
    point is 0 for symmetric specs). All-zero groups get scale 1 (their values stay 0)."""
    g, red = _grouped(x.astype(jnp.float32), spec)
    if spec.symmetric:
        amax = jnp.max(jnp.abs(g), axis=red, keepdims=True)
        scale = jnp.where(amax > 0, amax / spec.qmax, 1.0)
        return scale, jnp.zeros_like(scale)
    lo = jnp.minimum(jnp.min(g, axis=red, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(g, axis=red, keepdims=True), 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / spec.qmax, 1.0)
    return scale, jnp.round(-lo / scale)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """Integers ``q`` (int8 for symmetric, uint8 for asymmetric specs, in the grouped view), the
    fp32 ``scale`` and ``zero_point``, the `QuantSpec` and the original shape and dtype."""

    q: Array
    scale: Array
    zero_point: Array
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: Any

    @property
    def nbytes_packed(self) -> int:
        """Bytes of the integers packed `QuantSpec.bits` per value plus fp32 scales/zeros."""
        values = math.ceil(self.q.size * self.spec.bits / 8)
        meta = self.scale.size * 4 * (1 if self.spec.symmetric else 2)
        return values + meta


def quantize(x: Array, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest quantisation of ``x`` with ``spec`` (`QuantizedTensor`)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize: x must be floating point, got {x.dtype}")
    scale, zero = compute_scales(x, spec)
    g, _ = _grouped(x.astype(jnp.float32), spec)
    q = jnp.clip(jnp.round(g / scale) + zero, spec.qmin, spec.qmax)
    q = q.astype(jnp.int8 if spec.symmetric else jnp.uint8)
    return QuantizedTensor(q, scale, zero, spec, tuple(x.shape), x.dtype)


def dequantize(qt: QuantizedTensor) -> Array:
    """``(q − zero_point) · scale`` back in the original shape and dtype."""
    x = (qt.q.astype(jnp.float32) - qt.zero_point) * qt.scale
    return x.reshape(qt.shape).astype(qt.dtype)


def fake_quant(x: Array, spec: QuantSpec) -> Array:
    """Quantise-dequantise ``x`` with the straight-through estimator: the forward pass sees the
    quantised values, the gradient passes where ``x`` was inside the representable range."""
    x = jnp.asarray(x)
    scale, zero = compute_scales(jax.lax.stop_gradient(x), spec)
    g, _ = _grouped(x.astype(jnp.float32), spec)
    lo, hi = (spec.qmin - zero) * scale, (spec.qmax - zero) * scale
    inside = (g >= lo) & (g <= hi)  # gradient 1 inside the range (ends included), 0 outside
    clipped = jnp.where(inside, g, jax.lax.stop_gradient(jnp.clip(g, lo, hi)))
    rounded = (jnp.clip(jnp.round(g / scale) + zero, spec.qmin, spec.qmax) - zero) * scale
    out = clipped + jax.lax.stop_gradient(rounded - clipped)
    return out.reshape(x.shape).astype(x.dtype)


def pack_int(q: Array, bits: int) -> np.ndarray:
    """Pack integer values (signed or unsigned, within ``bits``) into uint8, ``8 / bits`` per
    byte, little end first; the tail is zero-padded. ``bits`` in {2, 4, 8}."""
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_int: bits must be 2, 4 or 8, got {bits!r}")
    v = np.asarray(q).astype(np.int64).ravel()
    lo = -(2 ** (bits - 1)) if v.size and v.min() < 0 else 0
    if v.size and (v.min() < lo or v.max() > lo + 2**bits - 1):
        raise ValueError(f"pack_int: values in [{v.min()}, {v.max()}] do not fit {bits} bits")
    per = 8 // bits
    u = (v & (2**bits - 1)).astype(np.uint8)
    u = np.concatenate([u, np.zeros((-len(u)) % per, np.uint8)]).reshape(-1, per)
    shifts = (np.arange(per) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(u << shifts, axis=1).astype(np.uint8)


def unpack_int(packed: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """Inverse of `pack_int`: the first ``count`` values, as int8 (``signed``) or uint8."""
    if bits not in (2, 4, 8):
        raise ValueError(f"unpack_int: bits must be 2, 4 or 8, got {bits!r}")
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    u = ((np.asarray(packed, np.uint8)[:, None] >> shifts) & (2**bits - 1)).ravel()[:count]
    if not signed:
        return u.astype(np.uint8)
    s = u.astype(np.int16)
    return np.where(s >= 2 ** (bits - 1), s - 2**bits, s).astype(np.int8)


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def quantize_model(
    variables: Mapping[str, Any], recipe: Mapping[str, QuantSpec]
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Fake-quantise every parameter whose "/"-joined path matches a recipe pattern
    (``re.search``, first match wins; e.g. ``{r"kernel$": QuantSpec(bits=4, granularity=
    "group", axis=0, group_size=32)}``); other variables are returned unchanged.

    Returns ``(variables, report)`` where ``report[path]`` holds the tensor's ``bits``,
    ``compression`` (fp32 bytes / packed bytes including scales) and relative ``error``
    (‖x̂ − x‖ / ‖x‖).
    """
    if "params" not in variables:
        raise ValueError(f"quantize_model: variables need a 'params' collection, got "
                         f"{sorted(variables)}")  # fmt: skip
    rules = [(re.compile(p), s) for p, s in recipe.items()]
    report: dict[str, dict[str, float]] = {}

    def one(keys, x):
        path = _path(keys)
        spec = next((s for pat, s in rules if pat.search(path)), None)
        if spec is None or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            return x
        qt = quantize(x, spec)
        xq = dequantize(qt)
        err = float(jnp.linalg.norm((xq - x).ravel()) / jnp.maximum(jnp.linalg.norm(x.ravel()),
                                                                      1e-30))  # fmt: skip
        report[path] = {"bits": spec.bits, "compression": x.size * 4 / qt.nbytes_packed,
                        "error": err}  # fmt: skip
        return xq

    params = jax.tree_util.tree_map_with_path(one, variables["params"])
    if not report:
        raise ValueError(f"quantize_model: no parameter matches the recipe {list(recipe)}")
    return {**variables, "params": params}, report
