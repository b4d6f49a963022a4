"""ConvBN and LinearBN with Train / Eval / Tune / Deploy modes.

Paper: "Efficient ConvBN Blocks for Transfer Learning and Beyond", You et al., ICLR 2024,
https://arxiv.org/abs/2305.11624.

A convolution followed by BatchNorm, ``z = γ (conv(x, ω) + b − μ) / √(σ² + ε) + β``, in one of
four modes:

* ``train``:  batch statistics; the running statistics are updated (Flax semantics: biased
  variance, ``momentum`` is the decay) when applied with ``mutable=["batch_stats"]``.
* ``eval``:   running statistics, conv and BN affine trainable; conv then a per-channel affine
  (what ``flax.linen.Conv`` + ``flax.linen.BatchNorm(use_running_average=True)`` compute).
* ``tune``:   the paper's proposal. The BN is folded into the conv on the fly, in fp32, inside
  autodiff: ``ω' = ω·γ/√(σ²+ε)``, ``b' = β + γ(b − μ)/√(σ²+ε)``, ``z = conv(x, ω') + b'``. Outputs
  and gradients (w.r.t. ``x, ω, b, γ, β``) equal eval mode, but the backward pass keeps only the
  conv input and the kernel-sized ``ω'`` instead of the input *and* the conv output.
* ``deploy``: a plain conv with the folded ``kernel`` and ``bias`` (see `fold_for_deploy`).

Memory in tune and deploy modes (see BENCHMARKS.md, "convbn_modes"): ReLU and ReLU6 given as the
``activation`` (and the optional ``residual`` added before it) run through `relu_saving_output` /
`relu6_saving_output`, whose backward derives the mask from the *output*. That output is the next
layer's conv input, which the backward keeps anyway, so a ConvBN+ReLU layer stores nothing of its
own beyond kernel-sized tensors; the conv's backward reads its inputs only once the cotangent
exists (`linear_backward_late`), so XLA cannot hoist layout copies of them into the forward.
Pass a residual branch as ``residual=`` (added before the activation) to get the same for the
add+ReLU of a residual block. 1x1 stride-1 ungrouped convs and `LinearBN` go through
``jaxblocks.kernels.conv_bn.api.pointwise_conv_bn`` in tune mode (Pallas kernels on GPU/TPU).
Train and eval modes apply the activation and conv exactly as given: the plain Flax baseline.
These are `jax.custom_vjp` functions, so tune and deploy modes support reverse-mode autodiff
only (no ``jax.jvp``/``jacfwd``); train and eval support both.

Which mode runs is decided in one place, `resolve_convbn_mode`, used by `ConvBN`, `LinearBN` and
the models built from them (``ResNet``, ``MobileNetV2``). First match wins:

1. the ``mode`` call argument;
2. Flax-style ``train=``: ``True`` is ``"train"``; ``False`` is the innermost `convbn_mode`
   context, else the ``mode`` attribute, when that is a running-statistics mode
   (``eval``/``tune``/``deploy``), otherwise ``"eval"``;
3. the innermost ``with convbn_mode(...)`` context;
4. the module's ``mode`` attribute;
5. nothing asked: ``"train"`` when the ``batch_stats`` collection is mutable (or while
   initializing); otherwise a ValueError naming the layer. This follows ``flax.linen.BatchNorm``,
   which raises rather than silently normalising with batch statistics and dropping the update:
   ask for evaluation with ``mode="eval"``, ``train=False`` or ``convbn_mode("eval")``, for
   training with ``mutable=["batch_stats"]`` (or ``mode="train"`` / ``train=True``).

`convbn_mode` is a `jax.make_user_context`, so a ``jax.jit`` function traced under one mode is
re-traced (not wrongly reused) under another.

Inputs are promoted as ``flax.linen.Conv`` promotes them: integer (and bool) inputs compute in
float32 unless ``dtype`` is set, never truncated; floating inputs keep their dtype.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from jax import lax

from jaxblocks.typing import Array, Float

CONVBN_MODES: tuple[str, ...] = ("train", "eval", "tune", "deploy")
# The modes that normalise with the running statistics (what ``train=False`` may keep).
RUNNING_STATS_MODES: tuple[str, ...] = ("eval", "tune", "deploy")
DEFAULT_EPSILON = 1e-5

# Logical axis names of the parameters (mapped to mesh axes by the trainer's rules).
CONV_AXES = ("conv_in", "conv_out")
LINEAR_AXES = ("embed", "mlp")

_MODE_CONTEXT = jax.make_user_context(default_value=None)

Initializer = Callable[..., Any]


# ----------------------------------------------------------------------------------------------
# Mode switching.


def _check_mode(where: str, mode: Any) -> str:
    if mode not in CONVBN_MODES:
        raise ValueError(f"{where} must be one of {list(CONVBN_MODES)}, got {mode!r}")
    return mode


@contextlib.contextmanager
def convbn_mode(mode: str) -> Iterator[None]:
    """Run every `ConvBN` / `LinearBN` inside the block in ``mode`` (whole-model switch).

    Works on any Linen model built from these layers, including a user's own nested modules; the
    variables are unchanged for ``train``/``eval``/``tune`` (``deploy`` needs `fold_for_deploy`).
    A mode passed to a layer's call still wins; the innermost context wins over outer ones and
    over the layers' ``mode`` attributes. The context takes part in ``jax.jit``'s cache key.

    Example::

        with convbn_mode("tune"):
            grads = jax.jit(jax.grad(loss))(params, batch_stats, x)
    """
    _check_mode("convbn_mode: mode", mode)
    with _MODE_CONTEXT(mode):
        yield


def active_convbn_mode() -> str | None:
    """The mode set by the innermost active `convbn_mode` context, or None."""
    return _MODE_CONTEXT.value


# Benchmarks only (ablations): the memory measures of tune/deploy (lean activations, late
# backward) are used when None in tune/deploy; True/False forces them on/off in every mode.
_LEAN = jax.make_user_context(default_value=None)


# ----------------------------------------------------------------------------------------------
# Pure math (fp32 statistics), shared by the modules, `fold_for_deploy` and the tests.


def _per_channel(v: Array, ndim: int) -> Array:
    """A [C] vector shaped to broadcast over the last axis of a rank-``ndim`` array."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def fold_factor(scale: Array, var: Array, epsilon: float = DEFAULT_EPSILON) -> Array:
    """``γ / √(σ² + ε)`` in fp32, the per-output-channel factor of the fold."""
    return scale.astype(jnp.float32) * lax.rsqrt(var.astype(jnp.float32) + epsilon)


def fold(
    kernel: Array,
    scale: Array,
    bias: Array,
    mean: Array,
    var: Array,
    conv_bias: Array | None = None,
    *,
    epsilon: float = DEFAULT_EPSILON,
) -> tuple[Array, Array]:
    """Fold BatchNorm into the preceding conv/dense: returns fp32 ``(ω·c, β + c·(b − μ))``.

    ``c = γ/√(σ²+ε)`` broadcasts over the last kernel axis, which is the output channel for
    Conv (HWIO, also grouped and depthwise) and Dense alike.
    """
    c = fold_factor(scale, var, epsilon)
    new_kernel = kernel.astype(jnp.float32) * _per_channel(c, kernel.ndim)
    shift = -mean.astype(jnp.float32)
    if conv_bias is not None:
        shift = shift + conv_bias.astype(jnp.float32)
    return new_kernel, bias.astype(jnp.float32) + c * shift


def bn_batch_stats(y: Array) -> tuple[Array, Array]:
    """Per-channel batch mean and biased variance over all but the last axis, in fp32.

    Two-pass (``mean((y − mean)²)``), not Flax's default ``E[y²] − E[y]²``; equal up to rounding
    and safer for large means.
    """
    axes = tuple(range(y.ndim - 1))
    y32 = y.astype(jnp.float32)
    mean = jnp.mean(y32, axis=axes)
    var = jnp.mean(jnp.square(y32 - _per_channel(mean, y.ndim)), axis=axes)
    return mean, var


def update_running_stats(
    ra_mean: Array, ra_var: Array, mean: Array, var: Array, momentum: float
) -> tuple[Array, Array]:
    """Flax's exponential moving average: ``r ← momentum·r + (1 − momentum)·batch``."""
    mean = lax.stop_gradient(mean)
    var = lax.stop_gradient(var)
    return (
        momentum * ra_mean + (1.0 - momentum) * mean,
        momentum * ra_var + (1.0 - momentum) * var,
    )


def bn_normalize(
    y: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float, dtype: Any
) -> Array:
    """``(y − μ)·γ/√(σ²+ε) + β`` in fp32 (Flax BatchNorm's form), cast to ``dtype``."""
    mul = scale.astype(jnp.float32) * lax.rsqrt(var.astype(jnp.float32) + epsilon)
    ch = lambda v: _per_channel(v.astype(jnp.float32), y.ndim)
    out = (y.astype(jnp.float32) - ch(mean)) * ch(mul) + ch(bias)
    return out.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Activations whose backward keeps only their output.


@jax.custom_vjp
def relu_saving_output(z: Array) -> Array:
    """``max(z, 0)`` whose backward keeps the output ``y`` (mask ``y > 0``), not a mask of ``z``.

    Same values and gradients as `jax.nn.relu` (gradient 0 at 0 and at NaN). When ``y`` is the next
    conv's input, the backward keeps it anyway, so the activation costs no extra memory. ``y``
    passes an `optimization_barrier`: otherwise XLA fuses ``max(z, 0)`` into the backward's mask
    and keeps ``z`` (the conv output) alive instead, which is what this function avoids.
    """
    return jnp.maximum(z, 0)


def _relu_fwd(z):
    y = lax.optimization_barrier(jnp.maximum(z, 0))
    return y, y


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu_saving_output.defvjp(_relu_fwd, _relu_bwd)


@jax.custom_vjp
def relu6_saving_output(z: Array) -> Array:
    """``min(max(z, 0), 6)`` whose backward keeps the output (mask ``0 < y < 6``).

    Same values and gradients as `jax.nn.relu6`.
    """
    return jnp.minimum(jnp.maximum(z, 0), 6)


def _relu6_fwd(z):
    y = lax.optimization_barrier(jnp.minimum(jnp.maximum(z, 0), 6))
    return y, y


def _relu6_bwd(y, g):
    return (jnp.where((y > 0) & (y < 6), g, jnp.zeros_like(g)),)


relu6_saving_output.defvjp(_relu6_fwd, _relu6_bwd)

# ----------------------------------------------------------------------------------------------
# A linear map whose backward starts only once the cotangent exists.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def linear_backward_late(linear: Callable[[Array, Array], Array], x: Array, w: Array) -> Array:
    """``linear(x, w)`` (conv or dense) with the usual residuals ``x, w`` and the usual backward.

    The backward reads ``x`` and ``w`` through an `optimization_barrier` tied to the cotangent, so
    any layout copy XLA makes of them for the weight-gradient conv (XLA:CPU transposes ``x``) is
    made inside the backward and freed at once, instead of right after the forward conv and held
    to the end of the step.
    """
    return linear(x, w)


def _late_fwd(linear, x, w):
    return linear(x, w), (x, w)


def _late_bwd(linear, res, g):
    x, w, g = lax.optimization_barrier((*res, g))
    _, vjp = jax.vjp(linear, x, w)
    return vjp(g)


linear_backward_late.defvjp(_late_fwd, _late_bwd)


# Activations the layers recognise (by identity): their lean form, their `pointwise_conv_bn` name.
_LEAN_FORMS = ((jax.nn.relu, relu_saving_output), (jax.nn.relu6, relu6_saving_output))
_KERNEL_NAMES = (
    (None, None),
    (jax.nn.relu, "relu"),
    (jax.nn.relu6, "relu6"),
    (jax.nn.silu, "silu"),
    (jax.nn.gelu, "gelu"),  # tanh approximation, as the op
)


def _kernel_activation(activation: Callable | None) -> tuple[bool, str | None]:
    for fn, name in _KERNEL_NAMES:
        if activation is fn:
            return True, name
    return False, None


def _activate(z: Array, activation: Callable | None, lean: bool) -> Array:
    if activation is None:
        return z
    if lean:
        activation = next((f for a, f in _LEAN_FORMS if activation is a), activation)
    return activation(z)


# ----------------------------------------------------------------------------------------------
# The shared mode logic of ConvBN and LinearBN.


def compute_dtype(dtype: Any, x: Array) -> Any:
    """The compute dtype of a layer with ``dtype`` attribute on input ``x``.

    ``dtype`` when set; else a floating ``x`` keeps its dtype and an integer or bool ``x`` is
    promoted to float32 (as ``flax.linen.Conv`` promotes it with its float32 kernel), so integer
    images are never truncated.
    """
    if dtype is not None:
        return dtype
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return x.dtype
    return jnp.promote_types(x.dtype, jnp.float32)


def _path(module: nn.Module) -> str:
    path = "/".join(module.scope.path) if module.scope is not None else ""
    return f"{type(module).__name__} at {path!r}" if path else type(module).__name__


def resolve_train(module: nn.Module, train: bool | None) -> bool:
    """Flax-style ``train`` of a BatchNorm model's call: the bool given, else True while
    initializing or when ``batch_stats`` is mutable, else a ValueError naming the model and
    saying how to ask (the rule of every registered BatchNorm model).

    Example::

        @nn.compact
        def __call__(self, x, *, train: bool | None = None):
            train = resolve_train(self, train)
    """
    who = type(module).__name__
    if train is not None:
        if not isinstance(train, bool):
            raise TypeError(f"{who}: train must be a bool or None, got {train!r}")
        return train
    if module.is_initializing() or module.is_mutable_collection("batch_stats"):
        return True
    raise ValueError(
        f"{who}: train=None and the 'batch_stats' collection is not mutable, so BatchNorm could "
        "not update its running statistics. To evaluate, pass train=False; to train, apply "
        "with mutable=['batch_stats'] (or pass train=True)."
    )


def resolve_convbn_mode(
    module: nn.Module, mode: str | None = None, train: bool | None = None
) -> str:
    """The ConvBN mode a call of ``module`` runs in: the one precedence of this package.

    First match wins: (1) ``mode``; (2) ``train``: True is "train", False is the innermost
    `convbn_mode` context, else the module's ``mode`` attribute, when that is a running-statistics
    mode (eval/tune/deploy), otherwise "eval"; (3) the innermost `convbn_mode` context; (4) the
    module's ``mode`` attribute; (5) "train" when the ``batch_stats`` collection is mutable or the
    module is initializing, otherwise a ValueError that names the module and says how to ask.

    Args:
      module: the bound module being called (`ConvBN`, `LinearBN`, or a model such as ``ResNet``
        whose ``mode`` attribute is the default of its layers); named in errors.
      mode: the ``mode`` call argument (None: not given).
      train: the Flax-style ``train`` call argument (None: not given).

    Returns:
      One of `CONVBN_MODES`.

    Example::

        class MyNet(nn.Module):
            mode: str | None = None

            @nn.compact
            def __call__(self, x, mode=None, *, train=None):
                mode = resolve_convbn_mode(self, mode, train)
                return ConvBN(8, (3, 3))(x, mode)
    """
    where = _path(module)
    if mode is not None:
        return _check_mode(f"{where}: the `mode` call argument", mode)
    ctx = active_convbn_mode()
    attr = getattr(module, "mode", None)
    if attr is not None:
        _check_mode(f"{where}: the `mode` attribute", attr)
    if train is not None:
        if not isinstance(train, bool):
            raise TypeError(f"{where}: train must be a bool or None, got {train!r}")
        if train:
            return "train"
        kept = ctx if ctx is not None else attr
        return kept if kept in RUNNING_STATS_MODES else "eval"
    if ctx is not None:
        return ctx
    if attr is not None:
        return attr
    if module.is_initializing() or module.is_mutable_collection("batch_stats"):
        return "train"
    raise ValueError(
        f"{where}: no ConvBN mode was asked for and the 'batch_stats' collection is not mutable, "
        "so train mode could not update the running statistics. To evaluate, pass mode='eval' "
        "(or train=False, or run under `with convbn_mode('eval'):`); to train, apply with "
        "mutable=['batch_stats'] (or pass mode='train' / train=True)."
    )


def _check_variables(module: nn.Module, mode: str, bias_name: str, use_bias: bool) -> None:
    """Clear errors for missing variables (instead of Flax's ScopeParamNotFoundError)."""
    if module.is_initializing():
        return
    where = _path(module)
    has = lambda col, name: module.has_variable(col, name)
    is_deploy = has("params", "kernel") and has("params", "bias") and not has("params", "scale")
    if mode == "deploy":
        if has("params", "scale") or has("batch_stats", "mean"):
            raise ValueError(
                f"{where}: mode='deploy' needs folded variables params {{kernel, bias}}, got "
                "un-folded train/eval/tune variables (params scale, batch_stats mean/var); "
                "convert them with fold_for_deploy(variables)"
            )
        for name in ("kernel", "bias"):
            if not has("params", name):
                raise ValueError(f"{where}: mode='deploy' needs params[{name!r}], it is missing")
        return
    if is_deploy:
        raise ValueError(
            f"{where}: mode={mode!r} needs params {{kernel, scale, bias}} and batch_stats "
            "{mean, var}, got deploy (folded) variables params {kernel, bias}; use mode='deploy' "
            "with them, or the un-folded variables"
        )
    want = ["kernel", "scale", "bias"] + ([bias_name] if use_bias else [])
    want += ["scale_aux", "bias_aux"] if module.aux_bn else []
    for name in want:
        if not has("params", name):
            raise ValueError(
                f"{where}: mode={mode!r} needs params[{name!r}], it is missing "
                f"(expected params {{{', '.join(want)}}})"
            )
    for name in ("mean", "var") + (("mean_aux", "var_aux") if module.aux_bn else ()):
        if not has("batch_stats", name):
            raise ValueError(
                f"{where}: mode={mode!r} needs batch_stats[{name!r}], it is missing; pass the "
                "'batch_stats' collection to apply (e.g. model.apply({'params': p, "
                "'batch_stats': s}, x))"
            )


def _lean(mode: str) -> bool:
    forced = _LEAN.value
    return (mode in ("tune", "deploy")) if forced is None else bool(forced)


def _apply_modes(
    module: nn.Module,
    x: Array,
    *,
    mode: str,
    residual: Array | None,
    kernel_shape: tuple[int, ...],
    kernel_axes: tuple[str | None, ...],
    bias_name: str,
    use_bias: bool,
    linear: Callable[[Array, Array], Array],
    pointwise: bool,
    use_aux: bool = False,
) -> Array:
    """Everything but the linear map itself, which ``linear(x, kernel)`` supplies."""
    features = kernel_shape[-1]
    dtype = compute_dtype(module.dtype, x)
    out_axes = (kernel_axes[-1],)
    if not isinstance(use_aux, bool):
        raise TypeError(f"{_path(module)}: use_aux must be a bool, got {use_aux!r}")
    if use_aux and not module.aux_bn:
        raise ValueError(
            f"{_path(module)}: use_aux=True needs the auxiliary BatchNorm; build the layer (or "
            "the model) with aux_bn=True"
        )
    if use_aux and mode == "deploy":
        raise ValueError(
            f"{_path(module)}: use_aux=True is not available in mode='deploy' (fold_for_deploy "
            "folds the main BatchNorm only; the auxiliary one is a training-time device)"
        )
    _check_variables(module, mode, bias_name, use_bias)
    param = lambda name, init, shape, axes: module.param(
        name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype
    )
    kernel = param("kernel", module.kernel_init, kernel_shape, kernel_axes)
    x = x.astype(dtype)
    if residual is not None:
        residual = residual.astype(dtype)
    act = module.activation
    lean = _lean(mode)
    lin = functools.partial(linear_backward_late, linear) if lean else linear

    def finish(z: Array) -> Array:
        if residual is not None:
            z = z + residual
        return _activate(z, act, lean)

    if mode == "deploy":
        bias = param("bias", module.bias_init, (features,), out_axes)
        z = lin(x, kernel.astype(dtype)) + _per_channel(bias.astype(dtype), x.ndim)
        return finish(z)

    conv_bias = param(bias_name, module.bias_init, (features,), out_axes) if use_bias else None
    scale = param("scale", module.scale_init, (features,), out_axes)
    bias = param("bias", module.bias_init, (features,), out_axes)
    ra_mean = module.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = module.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if module.aux_bn:  # both sets always exist, so the variable tree does not depend on use_aux
        aux = (
            param("scale_aux", module.scale_init, (features,), out_axes),
            param("bias_aux", module.bias_init, (features,), out_axes),
            module.variable("batch_stats", "mean_aux", jnp.zeros, (features,), jnp.float32),
            module.variable("batch_stats", "var_aux", jnp.ones, (features,), jnp.float32),
        )
        if use_aux:
            scale, bias, ra_mean, ra_var = aux

    if mode == "tune":
        known, act_name = _kernel_activation(act)
        if pointwise and lean and residual is None and known:
            y = _pointwise_conv_bn(
                x, kernel, scale, bias, ra_mean.value, ra_var.value, conv_bias, module, act_name
            )
            if y is not None:
                return y
        w, b = fold(
            kernel, scale, bias, ra_mean.value, ra_var.value, conv_bias, epsilon=module.epsilon
        )
        z = lin(x, w.astype(dtype)) + _per_channel(b.astype(dtype), x.ndim)
        return finish(z)

    y = lin(x, kernel.astype(dtype))
    if conv_bias is not None:
        y = y + _per_channel(conv_bias.astype(dtype), y.ndim)
    if mode == "eval":
        mean, var = ra_mean.value, ra_var.value
    else:  # train
        if math.prod(y.shape[:-1]) == 0:
            raise ValueError(
                f"{type(module).__name__}: train mode computes batch statistics, but x of shape "
                f"{x.shape} holds no samples; use mode='eval'/'tune' (running statistics) or "
                "skip empty batches"
            )
        mean, var = bn_batch_stats(y)
        if not module.is_initializing() and module.is_mutable_collection("batch_stats"):
            ra_mean.value, ra_var.value = update_running_stats(
                ra_mean.value, ra_var.value, mean, var, module.momentum
            )
    return finish(bn_normalize(y, mean, var, scale, bias, module.epsilon, dtype))


def _pointwise_conv_bn(x, kernel, scale, bias, mean, var, conv_bias, module, act_name):
    """Tune mode of a 1x1 / dense layer through the fused op; None if the op is unavailable."""
    try:
        from jaxblocks.kernels.conv_bn.api import pointwise_conv_bn
    except ImportError:  # the op folder is optional for the layer
        return None
    w = kernel.reshape(kernel.shape[-2:])  # [1, ..., 1, Cin, Cout] -> [Cin, Cout]
    return pointwise_conv_bn(
        x,
        w,
        scale,
        bias,
        mean,
        var,
        conv_bias=conv_bias,
        epsilon=module.epsilon,
        activation=act_name,
        implementation=module.implementation,
    )


# ----------------------------------------------------------------------------------------------
# Modules.


def _tuple(name: str, value: int | Sequence[int], n: int, where: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(
            f"{where}: {name} must be a positive int or {n} positive ints (one per spatial "
            f"dimension of kernel_size), got {value!r}"
        )
    return value


def _padding(padding: Any, n: int, where: str) -> str | tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{where}: padding must be 'SAME', 'VALID' or pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * n
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != n or any(len(p) != 2 for p in pads):
        raise ValueError(
            f"{where}: padding must be 'SAME', 'VALID', an int, or {n} (low, high) pairs, "
            f"got {padding!r}"
        )
    return pads


class ConvBN(nn.Module):
    """Convolution + BatchNorm (+ activation) with train/eval/tune/deploy modes.

    "Efficient ConvBN Blocks for Transfer Learning and Beyond" (https://arxiv.org/abs/2305.11624).
    Unlike ``nn.Conv`` followed by ``nn.BatchNorm``, one module owns both, so in ``tune`` mode it
    can fold the (frozen) running statistics into the kernel on the fly: eval-mode outputs and
    gradients at deploy-mode memory. 1D/2D/3D (the length of ``kernel_size``), channels-last.

    Attributes:
      features: output channels.
      kernel_size: spatial kernel size; its length N sets the rank, input ``[B, *spatial(N), C]``.
      strides, kernel_dilation: an int or N ints.
      padding: ``"SAME"``, ``"VALID"``, an int, or N ``(low, high)`` pairs.
      feature_group_count: groups (``C`` for depthwise); must divide ``C`` and ``features``.
      use_conv_bias: add a conv bias ``conv_bias`` before the BN (redundant with BN, default off).
      activation: optional callable after the BN (and after ``residual``), e.g. ``nn.relu``.
      mode: ``"train"``, ``"eval"``, ``"tune"`` or ``"deploy"``, the default when the call asks
        for none (see `resolve_convbn_mode`); None: ``"train"`` when ``batch_stats`` is mutable,
        otherwise an error.
      momentum: decay of the running statistics (Flax convention; PyTorch's 0.1 is 0.9 here).
      epsilon: BN epsilon.
      dtype: compute dtype (None: the input's, integer inputs promoted to float32); statistics
        and the fold are always fp32.
      param_dtype: parameter storage dtype.
      kernel_init, scale_init, bias_init: initializers (``bias_init`` also for ``conv_bias``).
      implementation: passed to ``pointwise_conv_bn`` (1x1, stride-1, ungrouped, tune mode).
      aux_bn: also keep an auxiliary BatchNorm (``scale_aux``, ``bias_aux``, ``mean_aux``,
        ``var_aux``; AdvProp / ConAdv): calls with ``use_aux=True`` normalise adversarial inputs
        with it, in every mode but deploy, and train-mode calls update only the statistics of
        the BN they use. `fold_for_deploy` folds the main BN and drops the auxiliary one.

    Variables: params ``kernel`` (spatial..., C/groups, features), optional ``conv_bias``,
    ``scale``, ``bias`` (and ``scale_aux``, ``bias_aux``); batch_stats ``mean``, ``var``
    (biased; and ``mean_aux``, ``var_aux``). Deploy: params ``kernel``, ``bias``.

    Example::

        layer = ConvBN(64, (3, 3), activation=nn.relu)
        variables = layer.init(jax.random.key(0), x)
        y, updates = layer.apply(variables, x, mutable=["batch_stats"])   # train
        y = layer.apply(variables, x, mode="tune")                        # == eval, less memory
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence[int | tuple[int, int]] = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_conv_bias: bool = False
    activation: Callable | None = None
    mode: str | None = None
    momentum: float = 0.9
    epsilon: float = DEFAULT_EPSILON
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    implementation: str | None = None
    aux_bn: bool = False

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "B *S C"],
        mode: str | None = None,
        *,
        train: bool | None = None,
        residual: Float[Array, "B *S2 F"] | None = None,
        use_aux: bool = False,
    ) -> Float[Array, "B *S2 F"]:
        """Apply the layer in ``mode`` (or Flax-style ``train``; see `resolve_convbn_mode`).

        ``residual`` (output-shaped) is added before the activation; ``use_aux`` normalises with
        the auxiliary BatchNorm (needs ``aux_bn=True``)."""
        where = _path(self)
        mode = resolve_convbn_mode(self, mode, train)
        if isinstance(self.kernel_size, int):
            raise TypeError(f"{where}: kernel_size must be a sequence of ints, e.g. (3, 3)")
        ks = _tuple("kernel_size", self.kernel_size, len(self.kernel_size), where)
        n = len(ks)
        if not hasattr(x, "ndim") or x.ndim != n + 2:
            shape = getattr(x, "shape", type(x).__name__)
            raise ValueError(
                f"{where}: x must have rank {n + 2} ([batch, *spatial({n}), channels]) for a "
                f"kernel_size of length {n}, got shape {shape}"
            )
        strides = _tuple("strides", self.strides, n, where)
        dilation = _tuple("kernel_dilation", self.kernel_dilation, n, where)
        padding = _padding(self.padding, n, where)
        groups = self.feature_group_count
        cin = x.shape[-1]
        if not isinstance(groups, int) or groups <= 0 or cin % groups or self.features % groups:
            raise ValueError(
                f"{where}: feature_group_count={groups!r} must be a positive int dividing the "
                f"input channels (x.shape[-1]={cin}) and features={self.features}"
            )
        kernel_shape = (*ks, cin // groups, self.features)
        if self.has_variable("params", "kernel"):
            have = meta.unbox(self.get_variable("params", "kernel")).shape
            if tuple(have) != kernel_shape:
                raise ValueError(
                    f"{where}: x has {cin} channels, which with feature_group_count={groups} "
                    f"needs a kernel of shape {kernel_shape}, but the existing params['kernel'] "
                    f"has shape {tuple(have)} (expected input channels: {have[-2] * groups})"
                )
        dn = lax.ConvDimensionNumbers(
            lhs_spec=(0, n + 1, *range(1, n + 1)),
            rhs_spec=(n + 1, n, *range(n)),
            out_spec=(0, n + 1, *range(1, n + 1)),
        )

        def conv(inp: Array, kernel: Array) -> Array:
            return lax.conv_general_dilated(
                inp,
                kernel,
                window_strides=strides,
                padding=padding,
                rhs_dilation=dilation,
                dimension_numbers=dn,
                feature_group_count=groups,
            )

        unpadded = padding in ("SAME", "VALID") or all(p == (0, 0) for p in padding)
        pointwise = all(k == 1 for k in ks) and all(s == 1 for s in strides) and groups == 1
        return _apply_modes(
            self,
            x,
            mode=mode,
            residual=residual,
            kernel_shape=kernel_shape,
            kernel_axes=(None,) * n + CONV_AXES,
            bias_name="conv_bias",
            use_bias=self.use_conv_bias,
            linear=conv,
            pointwise=pointwise and unpadded,
            use_aux=use_aux,
        )


class LinearBN(nn.Module):
    """Dense + BatchNorm over features (+ activation) with train/eval/tune/deploy modes.

    "Efficient ConvBN Blocks for Transfer Learning and Beyond" (https://arxiv.org/abs/2305.11624)
    applied to a Dense layer (as PyTorch's fold pass does for Linear+BatchNorm1d): the statistics
    are per output feature over all leading axes of ``x``.

    Attributes: as `ConvBN` (``aux_bn`` included), without the conv geometry; ``use_dense_bias``
    adds ``dense_bias``.

    Example::

        head = LinearBN(128, activation=nn.relu)
        variables = head.init(jax.random.key(0), x)          # x: [B, Cin] or [B, T, Cin]
        y = head.apply(variables, x, mode="eval")
    """

    features: int
    use_dense_bias: bool = False
    activation: Callable | None = None
    mode: str | None = None
    momentum: float = 0.9
    epsilon: float = DEFAULT_EPSILON
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    implementation: str | None = None
    aux_bn: bool = False

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "*B C"],
        mode: str | None = None,
        *,
        train: bool | None = None,
        residual: Float[Array, "*B F"] | None = None,
        use_aux: bool = False,
    ) -> Float[Array, "*B F"]:
        """Apply the layer in ``mode`` (or Flax-style ``train``; see `resolve_convbn_mode`).

        ``residual`` (output-shaped) is added before the activation; ``use_aux`` normalises with
        the auxiliary BatchNorm (needs ``aux_bn=True``)."""
        where = _path(self)
        mode = resolve_convbn_mode(self, mode, train)
        if not hasattr(x, "ndim") or x.ndim < 2:
            shape = getattr(x, "shape", type(x).__name__)
            raise ValueError(
                f"{where}: x must have rank >= 2 ([..., batch, features]), got shape {shape}"
            )
        cin = x.shape[-1]
        kernel_shape = (cin, self.features)
        if self.has_variable("params", "kernel"):
            have = meta.unbox(self.get_variable("params", "kernel")).shape
            if tuple(have) != kernel_shape:
                raise ValueError(
                    f"{where}: x has {cin} features (x.shape[-1]) but the existing "
                    f"params['kernel'] has shape {tuple(have)} (expected input features: "
                    f"{have[0]})"
                )

        def dense(inp: Array, kernel: Array) -> Array:
            return lax.dot_general(inp, kernel, (((inp.ndim - 1,), (0,)), ((), ())))

        return _apply_modes(
            self,
            x,
            mode=mode,
            residual=residual,
            kernel_shape=kernel_shape,
            kernel_axes=LINEAR_AXES,
            bias_name="dense_bias",
            use_bias=self.use_dense_bias,
            linear=dense,
            pointwise=True,
            use_aux=use_aux,
        )


# ----------------------------------------------------------------------------------------------
# Whole-model fold.

_CONV_BIAS_NAMES = ("conv_bias", "dense_bias")


def _is_convbn(params: Any, stats: Any) -> bool:
    if not isinstance(params, Mapping) or not isinstance(stats, Mapping):
        return False
    keys = set(params)
    return (
        {"kernel", "scale", "bias"} <= keys
        and keys <= {"kernel", "scale", "bias", "scale_aux", "bias_aux", *_CONV_BIAS_NAMES}
        and not any(isinstance(v, Mapping) for v in params.values())
        and {"mean", "var"} <= set(stats)
    )


def fold_for_deploy(
    variables: Mapping[str, Any], *, epsilon: float = DEFAULT_EPSILON
) -> dict[str, Any]:
    """Turn a whole model's train/eval/tune variables into deploy variables.

    Every ConvBN / LinearBN subtree (params ``kernel, scale, bias[, conv_bias|dense_bias]`` with
    batch_stats ``mean, var`` at the same path) becomes params ``kernel, bias`` with the BN folded
    in (fp32, stored in the kernel's dtype), and its batch_stats are dropped (an auxiliary BN,
    ``aux_bn=True``, is dropped too: deploy uses the main one); every other variable is kept.
    The model applied in ``deploy`` mode to the result matches ``eval`` mode.

    The layers do not store their epsilon: ``epsilon`` (default 1e-5, the layers' default) must
    match the one the layers were built with.

    Args:
      variables: ``{"params": ..., "batch_stats": ..., ...}`` as returned by ``init``.
      epsilon: the BN epsilon of the layers.

    Returns:
      A new variables dict (plain dicts; logical-partitioning boxes are kept on ``kernel``).
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "fold_for_deploy: variables must be a mapping with a 'params' collection "
            f"(as returned by model.init), got {type(variables).__name__}"
        )
    stats = variables.get("batch_stats", {})
    if not stats:
        raise ValueError(
            "fold_for_deploy: variables have no 'batch_stats' collection; they are already "
            "folded or not from a ConvBN/LinearBN model"
        )
    folded_paths: list[tuple[str, ...]] = []

    def walk(params: Any, st: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(params, Mapping):
            return params
        if _is_convbn(params, st):
            folded_paths.append(path)
            kernel_box = params["kernel"]
            bias_box = params["bias"]
            kernel = meta.unbox(kernel_box)
            cb = next((meta.unbox(params[n]) for n in _CONV_BIAS_NAMES if n in params), None)
            w, b = fold(
                kernel,
                meta.unbox(params["scale"]),
                meta.unbox(bias_box),
                meta.unbox(st["mean"]),
                meta.unbox(st["var"]),
                cb,
                epsilon=epsilon,
            )
            rebox = lambda box, v: box.replace_boxed(v) if isinstance(box, meta.AxisMetadata) else v
            return {
                "kernel": rebox(kernel_box, w.astype(kernel.dtype)),
                "bias": rebox(bias_box, b.astype(meta.unbox(bias_box).dtype)),
            }
        sub_stats = st if isinstance(st, Mapping) else {}
        return {k: walk(v, sub_stats.get(k, {}), (*path, k)) for k, v in params.items()}

    new_params = walk(variables["params"], stats, ())
    if not folded_paths:
        raise ValueError(
            "fold_for_deploy: found no ConvBN/LinearBN variables (params kernel/scale/bias with "
            "batch_stats mean/var at the same path)"
        )

    def prune(st: Any, path: tuple[str, ...]) -> Any:
        if path in folded_paths or not isinstance(st, Mapping):
            return None if path in folded_paths else st
        out = {}
        for k, v in st.items():
            pv = prune(v, (*path, k))
            if pv is not None and not (isinstance(pv, Mapping) and not pv):
                out[k] = pv
        return out

    out = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    out["params"] = new_params
    rest = prune(stats, ())
    if rest:
        out["batch_stats"] = rest
    return out
