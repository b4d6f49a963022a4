"""Blockwise compression of a whole Transformer without retraining (Dong & Chen, "BCT:
Blockwise Compression of Transformers without Retraining", https://arxiv.org/abs/2304.01483).

BCT quantises every tensor a Transformer touches, weights and activations alike (embeddings,
the matrix products, GELU, softmax, LayerNorm, the residual adds), in small blocks, each with
its own scale, so that an outlier only costs the precision of its block; no calibration set and
no retraining. Here:

* `bct_weights` fake-quantises every floating parameter: matrices in 2-D tiles
  (``QuantSpec(granularity="block")``), vectors (biases, LayerNorm scales) in groups along
  their axis; `quantize_model`'s per-tensor report gives bits, compression and error.
* `bct_activation_quant` returns the ``act_quant`` hook of `jaxblocks.layers.SelfAttention` /
  `TransformerBlock` / `TransformerLM`: every intermediate is fake-quantised in groups of
  ``block`` along its last axis (the scores and probabilities along the key axis).
* `bct_compress` applies both to a model and its variables.

Deviation: the paper's integer-only kernels (its look-up-table GELU and softmax) are simulated by
fake quantisation in floating point; the error this measures is the quantisation error, not an
integer implementation's. Tensors whose size is not a multiple of the block get one block per
whole axis (the block shrinks to fit) rather than padding.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxblocks.compress.quantize import QuantSpec, fake_quant, quantize_model

__all__ = [
    "BCTRecipe",
    "bct_activation_quant",
    "bct_compress",
    "bct_weights",
    "mean_compression",
]


@dataclasses.dataclass(frozen=True)
class BCTRecipe:
    """Bits and block size of a BCT compression.

    Attributes:
      weight_bits, act_bits: integer widths (2–8); ``act_bits=None`` leaves activations float.
      block: block length (activations, vectors) and tile side (matrices).
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    block: int = 64

    def __post_init__(self):
        if not 2 <= self.weight_bits <= 8 or (
            self.act_bits is not None and not 2 <= self.act_bits <= 8
        ):
            raise ValueError(f"BCTRecipe: bits must be in [2, 8], got {self}")
        if self.block < 1:
            raise ValueError(f"BCTRecipe: block must be >= 1, got {self.block}")

    @property
    def name(self) -> str:
        a = "16" if self.act_bits is None else str(self.act_bits)
        return f"W{self.weight_bits}A{a}"


def _fit(n: int, block: int) -> int:
    """The largest divisor of ``n`` that is at most ``block``."""
    return next(b for b in range(min(block, n), 0, -1) if n % b == 0)


def _group_spec(bits: int, n: int, block: int) -> QuantSpec:
    return QuantSpec(bits=bits, granularity="group", axis=-1, group_size=_fit(n, block))


def bct_weights(
    variables: Mapping[str, Any], recipe: BCTRecipe
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Fake-quantise every floating parameter blockwise; returns ``(variables, report)``."""
    params = variables["params"]
    rules: dict[str, QuantSpec] = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = "/".join(str(getattr(k, "key", k)) for k in keys)
        shape = tuple(leaf.shape)
        if len(shape) >= 2:
            m, n = shape[-2], shape[-1]
            tile = (_fit(m, recipe.block), _fit(n, recipe.block))
            spec = QuantSpec(bits=recipe.weight_bits, granularity="block", block_shape=tile)
        else:
            spec = _group_spec(recipe.weight_bits, shape[-1] if shape else 1, recipe.block)
        rules["^" + re.escape(path) + "$"] = spec
    return quantize_model(variables, rules)


def bct_activation_quant(recipe: BCTRecipe) -> Callable[[jax.Array, str], jax.Array] | None:
    """The ``act_quant(x, name)`` hook: groups of ``recipe.block`` along the last axis."""
    if recipe.act_bits is None:
        return None
    bits, block = recipe.act_bits, recipe.block

    def act_quant(x: jax.Array, name: str) -> jax.Array:
        del name  # every activation is treated alike
        return fake_quant(x, _group_spec(bits, x.shape[-1], block)).astype(x.dtype)

    return act_quant


def bct_compress(
    model: nn.Module, variables: Mapping[str, Any], recipe: BCTRecipe
) -> tuple[nn.Module, dict[str, Any], dict[str, dict[str, float]]]:
    """``(model with the activation hook, quantised variables, per-tensor report)``; the model
    must take an ``act_quant`` attribute (`TransformerLM` does).

    Example::

        qmodel, qvars, report = bct_compress(model, variables, BCTRecipe(8, 8, block=64))
        logits = qmodel.apply(qvars, tokens)
    """
    if not hasattr(model, "act_quant"):
        raise ValueError(f"bct_compress: {type(model).__name__} has no act_quant attribute")
    qvars, report = bct_weights(variables, recipe)
    return model.clone(act_quant=bct_activation_quant(recipe)), qvars, report


def mean_compression(report: Mapping[str, Mapping[str, float]], variables) -> float:
    """fp32 bytes over quantised bytes of all reported tensors together."""
    sizes = {
        "/".join(str(getattr(k, "key", k)) for k in keys): leaf.size
        for keys, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    }
    fp = sum(4 * sizes[p] for p in report)
    packed = sum(4 * sizes[p] / r["compression"] for p, r in report.items())
    return fp / packed if packed else 1.0
