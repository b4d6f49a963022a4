"""Cross-block post-training quantisation of LLMs (Ding et al., "CBQ: Cross-Block Quantization
for Large Language Models", ICLR 2025, https://arxiv.org/abs/2312.07950).

Where GPTQ/OmniQuant-style methods calibrate one layer or one block at a time, CBQ reconstructs a
sliding **window of consecutive blocks** (cross-block dependency, CBD: window 2, overlap 1 by
default), so that a block's quantisation is tuned for what the following block does with its
output. Here, as pure functions over the parameter pytree of a language model whose repeated
layers are the top-level parameters ``<prefix>_0 … <prefix>_{L-1}`` (`TransformerLM`'s
``blocks_i``, `GLALM`'s ``layer_i``; any such Linen LM):

* **CFP**, coarse-to-fine preprocessing (`detect_outliers`): coarse candidates above the
  quartile fence ``Q3 + λ1·(Q3 − Q1)``, then the fine cut among the sorted candidates that
  maximises the gap between the outlier set and the reserved set minus the outliers' own
  spread, ``(min O − max R)² − λ2·Var(O)``. Weights (`truncate_weight_outliers`): per output
  channel, the outliers are truncated to the largest reserved magnitude. Activations
  (`outlier_channel_scales`, `migrate_scales`): the outlier channels of a normalisation's output
  are divided by ``s = (max|x_c| / max reserved)^α`` in the norm's scale and bias and the rows of
  every linear layer it feeds are multiplied by ``s`` (an exact transform in float).
* **LoRA-Rounding** (`init_lora_rounding`, `lora_rounded_weight`): AdaRound's learned rounding
  ``W_q = s·(clip(⌊W/s⌋ + h(V) + z) − z)`` with the rectified sigmoid ``h`` (values in [0, 1], so
  every weight stays within one step of its floor), but the rounding logits are low rank,
  ``V = V₀ + A·B`` (rank r), and hard rounding ``h = [V ≥ 0]`` at the end.
* **Reconstruction** (`cbq_quantize`): per window, Adam (optax) on the LoRA factors and the
  per-channel/group log step sizes to match the float window's outputs from float inputs, with
  the quantised window fed the quantised model's activations; loss = L2 + KL between the
  softmax over the hidden features (the paper's), plus AdaRound's annealed rounding
  regulariser.
* Recipes (`RECIPES`: W4A8, W4A4, W2A16): asymmetric min-max weights per output channel (W2A16:
  groups of 64 along the input axis), activations per token, dynamic. `rtn_quantize` is the
  round-to-nearest baseline through `quantize_model`; `quantized_apply` runs an LM with its
  linear layers' inputs fake-quantised (`TransformerLM`'s ``act_quant`` hook,
  `cbq_activation_quant`; other LMs through `flax.linen.intercept_methods`).

Deviations (no official code was found; this follows the paper's text): ``V₀`` is AdaRound's
initialisation from the fractional part of ``W/s`` (so training starts from the float weights
and the untrained hard rounding is round-to-nearest), ``A`` random and ``B`` zero as in LoRA;
the fine-detection objective and ``α = 0.5`` are this module's reading of the paper; only a
normalisation's output is rescaled (inputs of out-projections and down-projections, which
follow attention or a non-linearity, get no migration); the quantised window is trained on the
quantised model's activations only (not also on float ones); embeddings, the final norm and the
LM head stay in float, as in the paper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from jaxblocks.compress.quantize import (
    QuantizedTensor,
    QuantSpec,
    dequantize,
    fake_quant,
    quantize,
    quantize_model,
)

__all__ = [
    "RECIPES",
    "CBQRecipe",
    "cbq_activation_quant",
    "cbq_loss",
    "cbq_quantize",
    "detect_outliers",
    "init_lora_rounding",
    "lora_rounded_weight",
    "migrate_scales",
    "outlier_channel_scales",
    "per_token_fake_quant",
    "quantized_apply",
    "rectified_sigmoid",
    "rtn_quantize",
    "truncate_weight_outliers",
]

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid (Nagel et al. 2020)
_LINEARS = (nn.Dense, nn.DenseGeneral)
_NORMS = (nn.LayerNorm, nn.RMSNorm)
_BLOCK = re.compile(r"^(.+)_(\d+)$")
# `TransformerBlock`'s ``act_quant`` names of the activations that enter a linear layer, with
# the number of feature axes (the attention output is [B, T, H, D]).
_LINEAR_INPUTS = {"ln1": 1, "attn_out": 2, "ln2": 1, "gelu": 1}


# --- recipes -----------------------------------------------------------------------------------


def _fit(n: int, size: int) -> int:
    """The largest divisor of ``n`` that is at most ``size``."""
    return next(b for b in range(min(size, n), 0, -1) if n % b == 0)


@dataclasses.dataclass(frozen=True)
class CBQRecipe:
    """Bit widths and weight granularity of a CBQ quantisation.

    Attributes:
      weight_bits: 2 to 8, asymmetric min-max scales.
      act_bits: 2 to 8, per-token dynamic asymmetric; None keeps activations float (A16).
      group_size: None: one scale per output channel; else groups of this many inputs (shrunk
        to the largest divisor of the input width where it does not divide).
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    group_size: int | None = None

    def __post_init__(self):
        for f in ("weight_bits", "act_bits"):
            b = getattr(self, f)
            if f == "act_bits" and b is None:
                continue
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
                raise ValueError(f"CBQRecipe.{f} must be an int in [2, 8], got {b!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise ValueError(
                f"CBQRecipe.group_size must be None or an int >= 1, got {self.group_size!r}"
            )

    @property
    def name(self) -> str:
        return f"W{self.weight_bits}A{16 if self.act_bits is None else self.act_bits}"

    def weight_spec(self, n_in: int) -> QuantSpec:
        """The `QuantSpec` of a weight viewed as ``[n_in, n_out]``: groups along the input axis
        (the whole axis for per-channel scales)."""
        g = n_in if self.group_size is None else _fit(n_in, self.group_size)
        return QuantSpec(self.weight_bits, symmetric=False, granularity="group", axis=0,
                         group_size=g)  # fmt: skip


RECIPES: dict[str, CBQRecipe] = {
    "W4A8": CBQRecipe(4, 8),
    "W4A4": CBQRecipe(4, 4),
    "W2A16": CBQRecipe(2, None, group_size=64),
}
CBQ_RECIPES = RECIPES  # the name re-exported by `jaxblocks.compress`


def _recipe(recipe) -> CBQRecipe:
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be a CBQRecipe or one of {sorted(RECIPES)}, got "
                             f"{recipe!r}")  # fmt: skip
        return RECIPES[recipe]
    if not isinstance(recipe, CBQRecipe):
        raise ValueError(f"recipe must be a CBQRecipe or a RECIPES name, got {recipe!r}")
    return recipe


# --- activations -------------------------------------------------------------------------------


def per_token_fake_quant(x: Float[Array, "..."], bits: int, feature_axes: int = 1) -> Array:
    """Dynamic per-token asymmetric fake quantisation (STE): one scale and zero point per index
    of the leading axes, over the last ``feature_axes`` axes."""
    if not 1 <= feature_axes <= x.ndim:
        raise ValueError(f"per_token_fake_quant: feature_axes must be in [1, {x.ndim}] for x of "
                         f"shape {x.shape}, got {feature_axes}")  # fmt: skip
    f = math.prod(x.shape[x.ndim - feature_axes :])
    spec = QuantSpec(bits, symmetric=False, granularity="channel", axis=0)
    return fake_quant(x.reshape(-1, f), spec).reshape(x.shape)


def cbq_activation_quant(recipe: CBQRecipe | str) -> Callable[[Array, str], Array] | None:
    """`TransformerLM`'s ``act_quant(x, name)`` hook: per-token quantisation of every activation
    that enters a linear layer (LayerNorm outputs, attention output, GELU output); None for A16.
    """
    recipe = _recipe(recipe)
    if recipe.act_bits is None:
        return None
    bits = recipe.act_bits

    def act_quant(x: Array, name: str) -> Array:
        n = _LINEAR_INPUTS.get(name)
        return x if n is None else per_token_fake_quant(x, bits, n)

    return act_quant


def _n_in(m: nn.Module) -> int:
    axis = getattr(m, "axis", -1)
    return len(axis) if isinstance(axis, tuple | list) else 1


def _quantise_linear_inputs(bits: int, select: Callable[[tuple[str, ...]], bool]):
    """A context quantising per token the input of every Dense/DenseGeneral whose scope path
    ``select`` accepts (`flax.linen.intercept_methods`)."""

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, _LINEARS) and args:
            if select(tuple(m.scope.path)):
                args = (per_token_fake_quant(args[0], bits, _n_in(m)), *args[1:])
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def quantized_apply(model: nn.Module, recipe: CBQRecipe | str) -> Callable[[Any, Array], Array]:
    """``fn(variables, tokens) -> logits``: ``model`` with the inputs of its blocks' linear
    layers fake-quantised per token (``recipe.act_bits``; plain ``model.apply`` for A16). Models
    with an ``act_quant`` attribute get `cbq_activation_quant`; others are intercepted.

    Example::

        qvars, _ = rtn_quantize(model, variables, "W4A8")
        logits = quantized_apply(model, "W4A8")(qvars, tokens)
    """
    recipe = _recipe(recipe)
    if recipe.act_bits is None:
        return model.apply
    if "act_quant" in {f.name for f in dataclasses.fields(model)}:
        return model.clone(act_quant=cbq_activation_quant(recipe)).apply

    def apply(variables, tokens):
        blocks = set(_block_names(variables["params"]))
        sel = lambda p: len(p) > 1 and p[0] in blocks  # noqa: E731
        with _quantise_linear_inputs(recipe.act_bits, sel):
            return model.apply(variables, tokens)

    return apply


# --- coarse-to-fine preprocessing --------------------------------------------------------------


def detect_outliers(
    values: Float[Array, "... N"], *, lambda1: float = 1.5, lambda2: float = 1.0
) -> Bool[Array, "... N"]:
    """CFP's outlier detection over the last axis of ``values`` (magnitudes).

    Coarse: candidates are the values above ``Q3 + lambda1 · (Q3 − Q1)`` (quartiles of the
    axis). Fine: of the candidates sorted in decreasing order, the top ``k`` are the outliers,
    with ``k`` maximising ``(min O_k − max R_k)² − lambda2 · Var(O_k)`` (the gap between the
    outlier set ``O_k`` and the reserved rest ``R_k``, less the outliers' own spread). No
    candidates: no outliers.

    Returns:
      A boolean mask, True at the outliers.
    """
    v = jnp.asarray(values, jnp.float32)
    if v.ndim < 1 or v.shape[-1] < 2:
        raise ValueError(f"detect_outliers: values need a last axis of >= 2 entries, got shape "
                         f"{v.shape}")  # fmt: skip
    if lambda1 < 0 or lambda2 < 0:
        raise ValueError(f"detect_outliers: lambda1 and lambda2 must be >= 0, got {lambda1}, "
                         f"{lambda2}")  # fmt: skip
    return _detect(v, float(lambda1), float(lambda2))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _detect(v: Array, lambda1: float, lambda2: float) -> Array:
    """The body of `detect_outliers` (compiled once per shape)."""
    n = v.shape[-1]
    up = jnp.sort(v, axis=-1)  # one sort serves the quartiles and the fine selection

    def quartile(q):  # linear interpolation, as `jnp.quantile`
        pos = q * (n - 1)
        i = int(math.floor(pos))
        j = min(i + 1, n - 1)
        return up[..., i : i + 1] + (pos - i) * (up[..., j : j + 1] - up[..., i : i + 1])

    q1, q3 = quartile(0.25), quartile(0.75)
    n_cand = jnp.sum(v > q3 + lambda1 * (q3 - q1), axis=-1, keepdims=True)  # [..., 1]
    s = jnp.flip(up, axis=-1)  # decreasing
    k = jnp.arange(1, n, dtype=jnp.float32).reshape((1,) * (v.ndim - 1) + (n - 1,))
    mean = jnp.cumsum(s, axis=-1)[..., :-1] / k
    var = jnp.maximum(jnp.cumsum(s * s, axis=-1)[..., :-1] / k - mean * mean, 0.0)
    gap = s[..., :-1] - s[..., 1:]  # min(O_k) − max(R_k)
    score = jnp.where(k <= n_cand, gap * gap - lambda2 * var, -jnp.inf)
    k_best = jnp.argmax(score, axis=-1, keepdims=True)  # index of the smallest outlier
    cut = jnp.take_along_axis(s, k_best, axis=-1)
    return (v >= cut) & (n_cand > 0)


def truncate_weight_outliers(
    w: Float[Array, "I O"], *, lambda1: float = 1.5, lambda2: float = 1.0
) -> tuple[Array, Bool[Array, "I O"]]:
    """CFP for weights: per output channel (column), the outliers of ``|w|`` are truncated to
    the largest magnitude left in the channel, keeping their sign. Returns ``(w, mask)``."""
    if w.ndim != 2:
        raise ValueError(f"truncate_weight_outliers: w must be [I, O], got shape {w.shape}")
    a = jnp.abs(w)
    mask = detect_outliers(a.T, lambda1=lambda1, lambda2=lambda2).T
    keep = jnp.max(jnp.where(mask, 0.0, a), axis=0, keepdims=True)  # [1, O]
    return jnp.where(mask, jnp.sign(w) * keep, w).astype(w.dtype), mask


def outlier_channel_scales(
    absmax: Float[Array, " C"], *, lambda1: float = 1.5, lambda2: float = 1.0, alpha: float = 0.5
) -> tuple[Float[Array, " C"], Bool[Array, " C"]]:
    """CFP for activations: ``(s, mask)``, the channel-wise scales (``(max|x_c| / r)^alpha`` on
    the outlier channels, ``r`` the largest reserved channel maximum; 1 elsewhere)."""
    absmax = jnp.asarray(absmax, jnp.float32)
    if absmax.ndim != 1:
        raise ValueError(f"outlier_channel_scales: absmax must be [C], got shape {absmax.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"outlier_channel_scales: alpha must be in [0, 1], got {alpha}")
    mask = detect_outliers(absmax, lambda1=lambda1, lambda2=lambda2)
    r = jnp.max(jnp.where(mask, 0.0, absmax))
    s = jnp.where(mask, (absmax / jnp.maximum(r, 1e-12)) ** alpha, 1.0)
    return s, mask


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _set(tree: dict, path: str, value) -> dict:
    """A copy of the nested dict ``tree`` with ``path`` replaced (the rest shared)."""
    head, _, rest = path.partition("/")
    return {**tree, head: _set(tree[head], rest, value) if rest else value}


def migrate_scales(
    block_params: Mapping[str, Any],
    norm: str,
    linears: Sequence[str],
    s: Float[Array, " C"],
) -> dict[str, Any]:
    """Divide the outputs of normalisation ``norm`` (its ``scale`` and ``bias``) by ``s`` and
    multiply the input rows of the ``linears`` it feeds (paths of their modules) by ``s``: the
    block computes the same function in float, with smaller activation outliers."""
    p = dict(block_params)
    node = _get(p, norm)
    if "scale" not in node or node["scale"].shape != s.shape:
        got = {k: tuple(x.shape) for k, x in node.items()}
        raise ValueError(f"migrate_scales: normalisation {norm!r} needs a scale of shape "
                         f"{s.shape} to divide, got {got}")  # fmt: skip
    for lin in linears:
        k = _get(p, f"{lin}/kernel")
        if k.shape[0] != s.shape[0]:
            raise ValueError(f"migrate_scales: {lin}/kernel of shape {k.shape} does not take "
                             f"{s.shape[0]} input channels")  # fmt: skip
    for leaf in ("scale", "bias"):
        if leaf in node:
            p = _set(p, f"{norm}/{leaf}", node[leaf] / s.astype(node[leaf].dtype))
    for lin in linears:
        k = _get(p, f"{lin}/kernel")
        p = _set(p, f"{lin}/kernel", k * s.reshape((-1,) + (1,) * (k.ndim - 1)).astype(k.dtype))
    return p


# --- LoRA-Rounding -----------------------------------------------------------------------------


def rectified_sigmoid(v: Array) -> Array:
    """AdaRound's ``clip(σ(v)·(ζ − γ) + γ, 0, 1)`` with ζ = 1.1, γ = −0.1."""
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _matrix(w: Array, n_in: int) -> Array:
    return w.reshape(math.prod(w.shape[:n_in]), -1)


def _grouped(w2: Array, spec: QuantSpec) -> Array:
    i, o = w2.shape
    return w2.reshape(i // spec.group_size, spec.group_size, o)  # [G, g, O]


def init_lora_rounding(
    w: Float[Array, "..."], spec: QuantSpec, *, n_in: int = 1, rank: int = 4, key: Array
) -> tuple[dict[str, Array], dict[str, Array]]:
    """LoRA-Rounding state of the weight ``w`` (a kernel whose first ``n_in`` axes are inputs),
    quantised with ``spec`` (`CBQRecipe.weight_spec`) on its ``[I, O]`` view.

    Returns ``(learned, frozen)``: the learned ``a [I, r]`` (normal), ``b [r, O]`` (zero) and
    ``log_step`` (0: the min-max step), and the frozen min-max ``scale``, ``zero`` point and the
    AdaRound logits ``v0`` with ``h(v0)`` the fractional part of ``w / scale``.
    """
    if spec.granularity != "group" or spec.axis != 0 or spec.symmetric:
        raise ValueError(f"init_lora_rounding: spec must be asymmetric groups along axis 0 "
                         f"(CBQRecipe.weight_spec), got {spec}")  # fmt: skip
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"init_lora_rounding: rank must be an int >= 1, got {rank!r}")
    if not 1 <= n_in < w.ndim:
        raise ValueError(f"init_lora_rounding: n_in must be in [1, {w.ndim - 1}] for w of shape "
                         f"{w.shape}, got {n_in}")  # fmt: skip
    w2 = _matrix(w.astype(jnp.float32), n_in)
    i, o = w2.shape
    g = _grouped(w2, spec)
    lo = jnp.minimum(jnp.min(g, axis=1, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(g, axis=1, keepdims=True), 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / spec.qmax, 1.0)  # as `compute_scales`
    zero = jnp.round(-lo / scale)
    x = g / scale
    frac = x - jnp.floor(x)
    p = (frac - GAMMA) / (ZETA - GAMMA)  # in [1/12, 11/12]: finite logits
    v0 = jnp.log(p) - jnp.log1p(-p)
    r = min(rank, i, o)
    learned = {
        "a": jax.random.normal(key, (i, r), jnp.float32),
        "b": jnp.zeros((r, o), jnp.float32),
        "log_step": jnp.zeros_like(scale),
    }
    return learned, {"scale": scale, "zero": zero, "v0": v0}


def _rounding(learned, frozen) -> tuple[Array, Array]:
    """``(V, step)`` of a LoRA-Rounding state (V in the grouped view)."""
    v = frozen["v0"] + (learned["a"] @ learned["b"]).reshape(frozen["v0"].shape)
    return v, frozen["scale"] * jnp.exp(learned["log_step"])


def lora_rounded_weight(
    w: Float[Array, "..."],
    learned: Mapping[str, Array],
    frozen: Mapping[str, Array],
    spec: QuantSpec,
    *,
    n_in: int = 1,
    hard: bool = False,
) -> Array:
    """``s·(clip(⌊w/s⌋ + h(V) + z, qmin, qmax) − z)`` in the shape and dtype of ``w``: soft
    (``h`` the rectified sigmoid, differentiable in ``a``, ``b`` and the step) or ``hard``
    (``h = [V ≥ 0]``, integers on the quantisation grid)."""
    g = _grouped(_matrix(w.astype(jnp.float32), n_in), spec)
    v, step = _rounding(learned, frozen)
    h = (v >= 0).astype(jnp.float32) if hard else rectified_sigmoid(v)
    q = jnp.clip(jnp.floor(g / step) + h + frozen["zero"], spec.qmin, spec.qmax)
    return ((q - frozen["zero"]) * step).reshape(w.shape).astype(w.dtype)


def _round_reg(learned, frozen, beta) -> Array:
    """AdaRound's ``mean(1 − |2h − 1|^β)``: 0 when every ``h`` is 0 or 1."""
    v, _ = _rounding(learned, frozen)
    return jnp.mean(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


# --- the model's blocks ------------------------------------------------------------------------


def _block_names(params: Mapping[str, Any]) -> list[str]:
    """The repeated layers: the largest family ``<prefix>_<i>`` of top-level parameters."""
    fams: dict[str, list[tuple[int, str]]] = {}
    for k in params:
        m = _BLOCK.match(str(k))
        if m:
            fams.setdefault(m.group(1), []).append((int(m.group(2)), str(k)))
    if not fams:
        raise ValueError(f"variables: no repeated blocks '<name>_<i>' among the top-level "
                         f"parameters {sorted(params)}")  # fmt: skip
    fam = max(fams.values(), key=len)
    return [k for _, k in sorted(fam)]


@dataclasses.dataclass
class _Trace:
    """What one float forward pass tells about the LM's blocks."""

    names: list[str]
    modules: list[nn.Module]  # unbound clones, one per block
    kwargs: dict[str, Any]  # keyword arguments the LM passes to a block (e.g. the mask)
    linears: dict[str, int]  # in-block module path -> number of input axes
    feeds: dict[str, list[str]]  # in-block norm path -> the linears it feeds
    x0: Array | None = None  # input of the first block
    absmax: dict[tuple[str, str], Array] = dataclasses.field(default_factory=dict)


def _trace(model: nn.Module, variables, tokens: Array | None) -> _Trace:
    """Run ``model`` once (eagerly on ``tokens``; shapes only when None) recording its blocks,
    their linear layers, which normalisation feeds which linear, and the per-channel maxima of
    every normalisation output (activation outliers)."""
    names = _block_names(variables["params"])
    index = {n: i for i, n in enumerate(names)}
    modules: dict[str, nn.Module] = {}
    kwargs: dict[str, Any] = {}
    linears: dict[str, int] = {}
    norm_out: dict[str, Array] = {}
    lin_in: dict[str, Array] = {}
    absmax: dict[tuple[str, str], Array] = {}
    x0 = []
    concrete = tokens is not None

    def interceptor(next_fun, args, kw, context):
        m, path = context.module, tuple(context.module.scope.path)
        if context.method_name != "__call__" or not path or path[0] not in index:
            return next_fun(*args, **kw)
        if len(path) == 1:
            if path[0] not in modules:
                modules[path[0]] = m.clone(parent=None, name=None)
            if path[0] == names[0] and not x0:
                x0.append(args[0])
                kwargs.update(kw)
            return next_fun(*args, **kw)
        inner = "/".join(path[1:])
        out = next_fun(*args, **kw)
        if isinstance(m, _LINEARS) and path[0] == names[0]:
            linears[inner] = _n_in(m)
            if concrete:
                lin_in[inner] = args[0]
        if isinstance(m, _NORMS) and concrete:
            a = jnp.abs(out.astype(jnp.float32))
            absmax[(path[0], inner)] = jnp.max(a.reshape(-1, a.shape[-1]), axis=0)
            if path[0] == names[0]:
                norm_out[inner] = out
        return out

    with nn.intercept_methods(interceptor):
        if concrete:
            model.apply(variables, tokens)
        else:
            jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 16), jnp.int32))
    feeds = {
        nm: [ln for ln, x in lin_in.items() if x.shape == y.shape and bool(jnp.all(x == y))]
        for nm, y in norm_out.items()
    }
    return _Trace(names, [modules[n] for n in names], kwargs, linears,
                  {k: v for k, v in feeds.items() if v}, x0[0] if x0 else None,
                  absmax)  # fmt: skip


def _run_block(module: nn.Module, params, x: Array, kwargs, act_bits: int | None) -> Array:
    ctx = (contextlib.nullcontext() if act_bits is None
           else _quantise_linear_inputs(act_bits, lambda p: True))  # fmt: skip
    with ctx:
        out = module.apply({"params": params}, x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _check_model(fn: str, model, variables):
    if not isinstance(model, nn.Module):
        raise ValueError(f"{fn}: model must be a flax.linen Module, got {type(model).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(f"{fn}: variables need a 'params' collection")


# --- round-to-nearest --------------------------------------------------------------------------


def rtn_quantize(
    model: nn.Module, variables: Mapping[str, Any], recipe: CBQRecipe | str
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Round-to-nearest baseline: every linear kernel of the blocks quantised with
    ``recipe.weight_spec`` on its ``[inputs, outputs]`` view through `quantize_model`.
    Returns ``(variables, report)`` (`quantize_model`'s per-tensor report)."""
    _check_model("rtn_quantize", model, variables)
    recipe = _recipe(recipe)
    params = nn.unbox(variables["params"])
    tr = _trace(model, {**variables, "params": params}, None)
    view, rules, shapes = params, {}, {}
    for b in tr.names:
        for lin, n_in in tr.linears.items():
            path = f"{b}/{lin}/kernel"
            k = _get(params, path)
            w2 = _matrix(k, n_in)
            view, shapes[path] = _set(view, path, w2), k.shape
            rules["^" + re.escape(path) + "$"] = recipe.weight_spec(w2.shape[0])
    q, report = quantize_model({"params": view}, rules)
    out = q["params"]
    for path, shape in shapes.items():
        out = _set(out, path, _get(out, path).reshape(shape))
    return {**variables, "params": out}, report


# --- cross-block reconstruction ----------------------------------------------------------------


def cbq_loss(
    y_q: Float[Array, "... C"], y_fp: Float[Array, "... C"], kl_weight: float = 1.0
) -> tuple[Array, tuple[Array, Array]]:
    """CBQ's reconstruction loss: mean squared error plus ``kl_weight`` times the KL divergence
    ``KL(softmax(y_fp) ‖ softmax(y_q))`` over the features, averaged over tokens. Returns
    ``(loss, (l2, kl))``."""
    y_q, y_fp = y_q.astype(jnp.float32), y_fp.astype(jnp.float32)
    l2 = jnp.mean((y_q - y_fp) ** 2)
    lp, lq = jax.nn.log_softmax(y_fp, axis=-1), jax.nn.log_softmax(y_q, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))
    return l2 + kl_weight * kl, (l2, kl)


def _windows(depth: int, window: int, overlap: int) -> list[tuple[int, int]]:
    stride, out, s = window - overlap, [], 0
    while True:
        out.append((s, min(s + window, depth)))
        if s + window >= depth:
            return out
        s += stride


def _check_int(fn, name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {v!r}")


def cbq_quantize(
    model: nn.Module,
    variables: Mapping[str, Any],
    tokens: Int[Array, "N T"],
    recipe: CBQRecipe | str,
    *,
    window: int = 2,
    overlap: int = 1,
    steps: int = 200,
    batch_size: int = 4,
    rank: int = 4,
    learning_rate: float = 1e-2,
    step_learning_rate: float = 1e-3,
    kl_weight: float = 1.0,
    round_weight: float = 1e-3,
    cfp: bool = True,
    lambda1: float = 1.5,
    lambda2: float = 1.0,
    alpha: float = 0.5,
    key: Array | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, float]], list[dict[str, Any]]]:
    """CBQ of an LM's blocks on the calibration sequences ``tokens``.

    1. CFP (``cfp``): activation-outlier channels of every normalisation are migrated into the
       linear layers it feeds, then weight outliers are truncated per output channel.
    2. Windows of ``window`` blocks sliding by ``window − overlap``: the window's LoRA-Rounding
       factors and log step sizes (a block in two windows keeps its state) are fitted with Adam
       for ``steps`` minibatches of ``batch_size`` sequences, so that the quantised window
       (soft rounding, per-token activations) on the quantised model's inputs matches the float
       window on float inputs (`cbq_loss` + ``round_weight`` × the rounding regulariser, whose
       exponent anneals from 20 to 2 after the first 20% of the steps). Blocks leaving the
       window are hard-rounded.

    Args:
      model, variables: the float LM and its variables (repeated blocks ``<name>_<i>``).
      tokens: ``[N, T]`` integer calibration sequences.
      recipe: a `CBQRecipe` or a `RECIPES` name.
      learning_rate, step_learning_rate: Adam rates of the LoRA factors and the log steps
        (0 freezes the steps at min-max).

    Returns:
      ``(variables, report, windows)``: the variables with every block's linear kernels on the
      quantisation grid (other parameters float; normalisations rescaled by CFP; parameters
      unboxed), `quantize_model`-style ``report[path]`` (``bits``, ``compression``, ``error``
      against the float kernel), and per window its blocks and the calibration MSE of the
      window's output with round-to-nearest weights (``mse_rtn``) and with CBQ's (``mse_cbq``),
      both from the same quantised inputs.

    Example::

        qvars, report, windows = cbq_quantize(model, variables, calib, "W4A8", steps=100)
        logits = quantized_apply(model, "W4A8")(qvars, tokens)
    """
    fn = "cbq_quantize"
    _check_model(fn, model, variables)
    recipe = _recipe(recipe)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.shape[0] < 1:
        raise ValueError(f"{fn}: tokens must be integer [N, T] calibration sequences, got "
                         f"{tokens.dtype}{tuple(tokens.shape)}")  # fmt: skip
    _check_int(fn, "window", window, 1)
    _check_int(fn, "overlap", overlap, 0)
    if overlap >= window:
        raise ValueError(f"{fn}: overlap must be < window, got overlap={overlap}, "
                         f"window={window}")  # fmt: skip
    for name, v in (("steps", steps), ("batch_size", batch_size), ("rank", rank)):
        _check_int(fn, name, v, 1)
    if batch_size > tokens.shape[0]:
        raise ValueError(f"{fn}: batch_size {batch_size} exceeds the {tokens.shape[0]} "
                         f"calibration sequences")  # fmt: skip
    key = jax.random.key(0) if key is None else key

    fp = nn.unbox(variables["params"])
    tr = _trace(model, {**variables, "params": fp}, tokens)
    if not tr.linears:
        raise ValueError(f"{fn}: the blocks {tr.names[0]}… contain no Dense/DenseGeneral layer")
    names, depth = tr.names, len(tr.names)

    specs = {lin: recipe.weight_spec(_matrix(_get(fp[names[0]], f"{lin}/kernel"), n).shape[0])
             for lin, n in tr.linears.items()}  # fmt: skip
    bits = recipe.act_bits

    @jax.jit
    def prepare(p, absmax, key):
        """CFP of one block (activations first: the migration rescales weights), then the
        LoRA-Rounding state of each of its linear kernels."""
        if cfp:
            for norm, lins in tr.feeds.items():
                if "scale" in _get(p, norm):
                    s, _ = outlier_channel_scales(absmax[norm], lambda1=lambda1,
                                                  lambda2=lambda2, alpha=alpha)  # fmt: skip
                    p = migrate_scales(p, norm, lins, s)
            for lin, n_in in tr.linears.items():
                k = _get(p, f"{lin}/kernel")
                w2, _ = truncate_weight_outliers(_matrix(k, n_in), lambda1=lambda1,
                                                 lambda2=lambda2)  # fmt: skip
                p = _set(p, f"{lin}/kernel", w2.reshape(k.shape))
        lrn, frz = {}, {}
        for lin, n_in in tr.linears.items():
            key, sub = jax.random.split(key)
            lrn[lin], frz[lin] = init_lora_rounding(_get(p, f"{lin}/kernel"), specs[lin],
                                                    n_in=n_in, rank=rank, key=sub)  # fmt: skip
        return p, lrn, frz

    def weights(b_params, lrn, frz, hard):
        for lin, n_in in tr.linears.items():
            k = _get(b_params, f"{lin}/kernel")
            k = lora_rounded_weight(k, lrn[lin], frz[lin], specs[lin], n_in=n_in, hard=hard)
            b_params = _set(b_params, f"{lin}/kernel", k)
        return b_params

    def rtn(b_params):
        for lin, n_in in tr.linears.items():
            k = _get(b_params, f"{lin}/kernel")
            k = dequantize(quantize(_matrix(k, n_in), specs[lin])).reshape(k.shape)
            b_params = _set(b_params, f"{lin}/kernel", k)
        return b_params

    def run(mods, ps, x, bits):
        for m, p in zip(mods, ps, strict=True):
            x = _run_block(m, p, x, tr.kwargs, bits)
        return x

    opt = optax.multi_transform(
        {"round": optax.adam(learning_rate), "step": optax.adam(step_learning_rate)},
        lambda tree: [{lin: {k: "step" if k == "log_step" else "round" for k in st}
                       for lin, st in d.items()} for d in tree],
    )  # fmt: skip

    def loss_fn(lrn, frz, ps, mods, xq, yfp, beta, reg_on):
        qps = [weights(p, lr, fz, False) for p, lr, fz in zip(ps, lrn, frz, strict=True)]
        loss, (l2, kl) = cbq_loss(run(mods, qps, xq, bits), yfp, kl_weight)
        regs = [_round_reg(lr[lin], fz[lin], beta) for lr, fz in zip(lrn, frz, strict=True)
                for lin in lr]  # fmt: skip
        reg = sum(regs) / len(regs)
        return loss + reg_on * round_weight * reg, (l2, kl, reg)

    compiled: dict[tuple[int, ...], dict[str, Callable]] = {}

    def functions(mods) -> dict[str, Callable]:
        """Jitted functions of a window of ``mods`` (compiled once for equal windows)."""
        ids = tuple(id(m) for m in mods)
        if ids in compiled:
            return compiled[ids]

        def step(lrn, st, frz, ps, xq, yfp, beta, reg_on):
            (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(
                lrn, frz, ps, mods, xq, yfp, beta, reg_on)  # fmt: skip
            upd, st = opt.update(g, st, lrn)
            return optax.apply_updates(lrn, upd), st, aux

        compiled[ids] = {
            "step": jax.jit(step),
            "float": jax.jit(lambda ps, x: run(mods, ps, x, None)),
            "quant": jax.jit(lambda ps, x: run(mods, ps, x, bits)),
        }
        return compiled[ids]

    qp, learned, frozen = {}, {}, {}
    for b in names:
        key, sub = jax.random.split(key)
        absmax = {norm: tr.absmax[(b, norm)] for norm in tr.feeds}
        qp[b], learned[b], frozen[b] = prepare(fp[b], absmax, sub)
    finalise = jax.jit(lambda p, lrn, frz: weights(p, lrn, frz, True))
    rtn = jax.jit(rtn)

    x_fp = x_q = tr.x0
    n = tokens.shape[0]
    out = dict(fp)
    log = []
    warm = int(0.2 * steps)
    for s, e in _windows(depth, window, overlap):
        wn = names[s:e]
        mods = tuple(tr.modules[s:e])
        fns = functions(mods)
        y_fp = fns["float"]([fp[b] for b in wn], x_fp)  # float target from float inputs
        lrn, frz, ps = [learned[b] for b in wn], [frozen[b] for b in wn], [qp[b] for b in wn]
        st = opt.init(lrn)
        for t in range(steps):
            key, sub = jax.random.split(key)
            idx = jax.random.choice(sub, n, (batch_size,), replace=False)
            beta = 20.0 + (2.0 - 20.0) * max(t - warm, 0) / max(steps - warm, 1)
            lrn, st, _ = fns["step"](lrn, st, frz, ps, x_q[idx], y_fp[idx], beta,
                                     float(t >= warm))  # fmt: skip
        learned.update(zip(wn, lrn, strict=True))
        # the window's error from the same quantised inputs: round-to-nearest vs CBQ
        err = {name: float(jnp.mean((fns["quant"](w, x_q) - y_fp) ** 2)) for name, w in (
            ("mse_rtn", [rtn(fp[b]) for b in wn]),
            ("mse_cbq", [finalise(p, lr, fz) for p, lr, fz in zip(ps, lrn, frz, strict=True)]),
        )}  # fmt: skip
        log.append({"blocks": tuple(wn), **err})
        done = wn if e == depth else names[s : s + window - overlap]
        for b in done:
            out[b] = finalise(qp[b], learned[b], frozen[b])
        if e < depth:
            k = len(done)
            head = functions(mods[:k])
            x_q = head["quant"]([out[b] for b in done], x_q)
            x_fp = head["float"]([fp[b] for b in done], x_fp)

    report = {}
    for b in names:
        for lin, n_in in tr.linears.items():
            path = f"{b}/{lin}/kernel"
            w, wq = _get(fp, path), _get(out, path)
            _, step = _rounding(learned[b][lin], frozen[b][lin])
            spec = specs[lin]
            qt = QuantizedTensor(_grouped(_matrix(wq, n_in), spec), step, frozen[b][lin]["zero"],
                                 spec, tuple(w.shape), w.dtype)  # fmt: skip
            err = float(jnp.linalg.norm((wq - w).ravel()) / jnp.maximum(
                jnp.linalg.norm(w.ravel()), 1e-30))  # fmt: skip
            report[path] = {"bits": spec.bits, "compression": w.size * 4 / qt.nbytes_packed,
                            "error": err}  # fmt: skip
    return {**variables, "params": out}, report, log
