"""UnMix-TNS: test-time normalization with K mixed statistic components per BatchNorm layer.

Tomar, Vray, Thiran, Bozorgtabar, "Un-Mixing Test-Time Normalization Statistics: Combatting
Label Temporal Correlation", ICLR 2024 (https://openreview.net/forum?id=xyxU99Nutg).

Three pieces: the math as a pure function (`unmix_tns_normalize`), the state initialised from a
trained model's BatchNorm running statistics (`unmix_tns_init_state`), and a converter that runs
any trained Flax model with every `flax.linen.BatchNorm` — and the BN inside every `ConvBN` /
`LinearBN` — replaced by UnMix-TNS without touching the model's code (`unmix_tns_apply`, built on
`flax.linen.intercept_methods`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from jaxblocks.layers.conv_bn import ConvBN, LinearBN
from jaxblocks.typing import Array, Float

__all__ = [
    "UNMIX_TNS_COLLECTION",
    "unmix_tns",
    "unmix_tns_apply",
    "unmix_tns_init_state",
    "unmix_tns_momentum",
    "unmix_tns_normalize",
]

# Collection holding the per-layer components {"means": [K, C], "vars": [K, C]}, laid out like
# the model's `batch_stats` (one entry per BatchNorm module path).
UNMIX_TNS_COLLECTION = "unmix_tns"


def unmix_tns_momentum(batch_size: int, batch_size_max: int = 64, bn_momentum: float = 0.9):
    """Component update rate ``λ = 1 − bn_momentum^(B / B_max)``.

    ``bn_momentum`` is the source BN's Flax decay (official: PyTorch momentum 0.1 ⇒
    ``λ = 1 − (1 − 0.1)^(B/B_max)``, the same number).
    """
    return 1.0 - bn_momentum ** (batch_size / batch_size_max)


def unmix_tns_normalize(
    x: Float[Array, "B *S C"],
    scale: Float[Array, " C"] | None,
    bias: Float[Array, " C"] | None,
    means: Float[Array, "K C"],
    vars_: Float[Array, "K C"],
    *,
    temperature: float = 0.07,
    momentum: float | Array = 0.1,
    epsilon: float = 1e-5,
) -> tuple[Array, Array, Array]:
    """UnMix-TNS normalization of one layer; returns ``(y, new_means, new_vars)`` (float32).

    With instance statistics ``μ̃_i, σ̃²_i`` of sample i over the spatial axes (biased):

      ``p_ik = softmax_k(cos(μ̃_i, μ_k) / τ)``  (no gradient);
      ``μ̄_ik = (1−p_ik) μ_k + p_ik μ̃_i``,  ``σ̄²_ik = (1−p_ik) σ²_k + p_ik σ̃²_i``;
      ``μ_i = mean_k μ̄_ik``,  ``σ²_i = mean_k σ̄²_ik + mean_k μ̄²_ik − μ_i²`` (mixture variance);
      ``y = scale (x − μ_i)/√(σ²_i + ε) + bias``;
      ``μ_k ← μ_k + λ mean_i p_ik (μ̃_i − μ_k)``, same for ``σ²_k`` (λ = ``momentum``).
    """
    if x.ndim < 3:
        raise ValueError(
            f"unmix_tns_normalize: x must be [B, *spatial, C] with a spatial axis, got {x.shape}"
        )
    k, c = means.shape
    if vars_.shape != (k, c) or x.shape[-1] != c:
        raise ValueError(
            f"unmix_tns_normalize: means {means.shape} / vars {vars_.shape} must be [K, C] with "
            f"C = x.shape[-1] = {x.shape[-1]}"
        )
    x32 = x.astype(jnp.float32)
    b = x.shape[0]
    spatial = tuple(range(1, x.ndim - 1))
    mu_i = jnp.mean(x32, axis=spatial)  # [B, C]
    bshape = (b,) + (1,) * len(spatial) + (c,)
    var_i = jnp.mean(jnp.square(x32 - mu_i.reshape(bshape)), axis=spatial)  # [B, C]
    mu_i_sg, var_i_sg = jax.lax.stop_gradient(mu_i), jax.lax.stop_gradient(var_i)

    def unit(v):
        return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-24))

    cos = jnp.einsum("bc,kc->bk", unit(mu_i_sg), unit(means))  # [B, K]
    p = jax.lax.stop_gradient(jax.nn.softmax(cos / temperature, axis=-1))  # [B, K]
    pe = p[:, :, None]  # [B, K, 1]
    mu_bar = (1.0 - pe) * means[None] + pe * mu_i[:, None, :]  # [B, K, C]
    var_bar = (1.0 - pe) * vars_[None] + pe * var_i[:, None, :]  # [B, K, C]
    mu = jnp.mean(mu_bar, axis=1)  # [B, C]
    var = jnp.mean(var_bar, axis=1) + jnp.mean(jnp.square(mu_bar), axis=1) - jnp.square(mu)
    var = jnp.maximum(var, 0.0)
    y = (x32 - mu.reshape(bshape)) * jax.lax.rsqrt(var.reshape(bshape) + epsilon)
    if scale is not None:
        y = y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (c,))
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (c,))
    d_mean = jnp.einsum("bk,bkc->kc", p, mu_i_sg[:, None, :] - means[None]) / b
    d_var = jnp.einsum("bk,bkc->kc", p, var_i_sg[:, None, :] - vars_[None]) / b
    new_means = means + momentum * d_mean
    new_vars = vars_ + momentum * d_var
    return y, new_means, new_vars


def unmix_tns_init_state(
    batch_stats: Any, num_components: int = 16, *, key: Array, alpha: float = 0.5
) -> Any:
    """UnMix-TNS components for every BatchNorm in ``batch_stats`` (dicts with ``mean``/``var``).

    Official initialisation: ``μ_k = μ_src + √(α K/(K−1)) σ_src ξ_k`` with ξ ~ N(0, I) and
    ``σ²_k = (1 − α) σ²_src`` (for K = 1: the source statistics, α = 0). The spread makes the
    uniform mixture of the K components have the source mean and variance in expectation.
    Returns a tree with ``{"means": [K, C], "vars": [K, C]}`` at each BatchNorm's path.
    """
    if num_components < 1:
        raise ValueError(f"unmix_tns_init_state: num_components={num_components} must be >= 1")
    if num_components == 1:
        alpha = 0.0
    counter = [0]

    def walk(tree):
        if isinstance(tree, dict) and "mean" in tree and "var" in tree:
            counter[0] += 1
            mean = jnp.asarray(tree["mean"], jnp.float32)
            var = jnp.asarray(tree["var"], jnp.float32)
            sub = jax.random.fold_in(key, counter[0])
            xi = jax.random.normal(sub, (num_components,) + mean.shape, jnp.float32)
            spread = math.sqrt(alpha * num_components / max(num_components - 1, 1))
            means = mean[None] + spread * jnp.sqrt(var)[None] * xi
            vars_ = jnp.broadcast_to((1.0 - alpha) * var, (num_components,) + var.shape)
            return {"means": means, "vars": vars_}
        if isinstance(tree, dict):
            return {k: walk(v) for k, v in tree.items() if isinstance(v, dict)}
        return tree

    state = walk(dict(batch_stats))
    if counter[0] == 0:
        raise ValueError("unmix_tns_init_state: no BatchNorm statistics (mean/var) found")
    return state


@contextlib.contextmanager
def unmix_tns(
    *, temperature: float = 0.07, batch_size_max: int = 64, bn_momentum: float | None = None
) -> Iterator[None]:
    """Within this context every bound `flax.linen.BatchNorm` that has UnMix-TNS state (the
    ``"unmix_tns"`` collection) normalizes with UnMix-TNS instead, whatever its
    ``use_running_average``; the components are updated when the collection is mutable.
    `ConvBN` / `LinearBN` layers with state do the same with their BN, whatever their mode
    (conv or dense, then UnMix-TNS with the layer's ``scale``/``bias``, then ``residual`` and
    the activation); they need un-folded variables and the main BN (``use_aux=False``).

    ``bn_momentum`` (Flax decay) defaults to each BatchNorm's own ``momentum``.
    """

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if not (
            isinstance(mod, (nn.BatchNorm, ConvBN, LinearBN))
            and context.method_name == "__call__"
            and mod.has_variable(UNMIX_TNS_COLLECTION, "means")
        ):
            return next_fun(*args, **kwargs)
        if not isinstance(mod, nn.BatchNorm):
            return _convbn_unmix(mod, args, kwargs, temperature, batch_size_max, bn_momentum)
        if mod.axis not in (-1, args[0].ndim - 1):
            raise ValueError("unmix_tns: only channels-last BatchNorm (axis=-1) is supported")
        x = args[0]
        scale = mod.get_variable("params", "scale") if mod.use_scale else None
        bias = mod.get_variable("params", "bias") if mod.use_bias else None
        y = _normalize_layer(mod, x, scale, bias, temperature, batch_size_max, bn_momentum)
        return y.astype(mod.dtype if mod.dtype is not None else x.dtype)

    with nn.intercept_methods(interceptor):
        yield


def _normalize_layer(mod, y, scale, bias, temperature, batch_size_max, bn_momentum):
    """UnMix-TNS of ``y`` with the layer's components (updated when the collection is mutable);
    fp32 result. ``mod`` is the bound BatchNorm / ConvBN / LinearBN holding the state."""
    decay = mod.momentum if bn_momentum is None else bn_momentum
    y, new_means, new_vars = unmix_tns_normalize(
        y,
        scale,
        bias,
        mod.get_variable(UNMIX_TNS_COLLECTION, "means"),
        mod.get_variable(UNMIX_TNS_COLLECTION, "vars"),
        temperature=temperature,
        momentum=unmix_tns_momentum(y.shape[0], batch_size_max, decay),
        epsilon=mod.epsilon,
    )
    if mod.is_mutable_collection(UNMIX_TNS_COLLECTION):
        mod.put_variable(UNMIX_TNS_COLLECTION, "means", new_means)
        mod.put_variable(UNMIX_TNS_COLLECTION, "vars", new_vars)
    return y


def _convbn_unmix(mod, args, kwargs, temperature, batch_size_max, bn_momentum):
    """A `ConvBN` / `LinearBN` call with its BN replaced by UnMix-TNS (see `unmix_tns`)."""
    where = f"unmix_tns: {type(mod).__name__} at {'/'.join(mod.scope.path)!r}"
    if kwargs.get("use_aux", False):
        raise ValueError(f"{where}: use_aux=True is not supported (UnMix-TNS replaces the main BN)")
    if not mod.has_variable("params", "scale"):
        raise ValueError(
            f"{where}: needs un-folded variables (params scale/bias); deploy (folded) variables "
            "have no BatchNorm left to replace"
        )
    x = args[0]
    params = meta.unbox(mod.variables["params"])
    # The layer's linear map alone: the same module as a deploy-mode layer whose bias is the
    # conv/dense bias (zero without one).
    linear = mod.clone(parent=None, activation=None, aux_bn=False, mode=None)
    bias = params.get("conv_bias", params.get("dense_bias"))
    if bias is None:
        bias = jnp.zeros((params["kernel"].shape[-1],), params["kernel"].dtype)
    y = linear.apply({"params": {"kernel": params["kernel"], "bias": bias}}, x, "deploy")
    y = _normalize_layer(
        mod, y, params["scale"], params["bias"], temperature, batch_size_max, bn_momentum
    )
    dtype = mod.dtype if mod.dtype is not None else x.dtype
    y = y.astype(dtype)
    residual = kwargs.get("residual")
    if residual is not None:
        y = y + residual.astype(dtype)
    return mod.activation(y) if mod.activation is not None else y


def unmix_tns_apply(
    model: nn.Module,
    variables: Any,
    state: Any,
    *args: Any,
    temperature: float = 0.07,
    batch_size_max: int = 64,
    bn_momentum: float | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Run a trained BatchNorm ``model`` with UnMix-TNS (test-time); returns ``(out, new_state)``.

    UnMix-TNS — Tomar et al., ICLR 2024 (https://openreview.net/forum?id=xyxU99Nutg).
    Test-time batch norm (TBN: normalize with the test batch's statistics) breaks when test
    batches are not i.i.d. — e.g. a video or a stream sorted by label, where a batch holds one
    class and its statistics erase the class signal. UnMix-TNS keeps K statistic components
    per BN layer (initialised around the source running statistics, `unmix_tns_init_state`),
    normalizes *each sample* with a mixture of the components pulled towards its own instance
    statistics (cosine-similarity softmax, τ = 0.07), and updates the components online, so a
    label-correlated batch cannot drag the statistics to one class.

    This wraps any Flax model whose norms are `flax.linen.BatchNorm` or live in `ConvBN` /
    `LinearBN` layers (e.g. the registry ResNets and MobileNetV2; no change to its code):
    ``variables`` are the trained variables, ``state`` the ``"unmix_tns"`` collection, ``args``/
    ``kwargs`` go to ``model.apply`` (e.g. ``train=False``). Jit it with ``model`` static.

    Official code (devavratTomar/unmixtns ``UnMixTNS2d``) and ours: same equations, K = 16,
    τ = 0.07, α = 0.5, λ = 1 − (1 − 0.1)^{B/B_max} with B_max = 64; the official code swaps the
    BN modules in place (``replace_bn_layers``); we intercept ``BatchNorm.__call__`` instead.
    Its ``UnMixTNS1d`` (BN over features without spatial axes) uses the source statistics; here
    a BatchNorm on a ``[B, C]`` input raises (instance statistics need a spatial axis).

    Example:
      >>> state = unmix_tns_init_state(variables["batch_stats"], 16, key=jax.random.key(0))
      >>> logits, state = unmix_tns_apply(model, variables, state, x, train=False)
    """
    with unmix_tns(temperature=temperature, batch_size_max=batch_size_max, bn_momentum=bn_momentum):
        out, upd = model.apply(
            {**variables, UNMIX_TNS_COLLECTION: state},
            *args,
            mutable=[UNMIX_TNS_COLLECTION],
            **kwargs,
        )
    return out, upd[UNMIX_TNS_COLLECTION]
