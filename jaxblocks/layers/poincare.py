"""Poincaré ball operations and layers: Möbius addition, exp/log maps, midpoint, Poincaré FC/conv.

van Spengler, Berkhout, Mettes, "Poincaré ResNet", ICCV 2023, https://arxiv.org/abs/2303.14027.
Official code: maxvanspengler/poincare-resnet (``models/manifolds/math/diffgeom.py``,
``diffgeom_autograd.py``, ``midpoint.py``, ``linreg.py``, ``models/nn/modules/linear.py`` and
``convolution.py``). The fully-connected layer is Shimizu et al.'s HNN++
(https://arxiv.org/abs/2006.08210).

The ball of curvature ``-c`` (``c > 0``) is ``{x : c‖x‖² < 1}``; ``λ_x = 2 / (1 - c‖x‖²)`` is
its conformal factor. Every function takes the vector axis as ``axis`` (default last) and
broadcasts over the others.

Numerics, as the official code: norms are clamped below at 1e-15 and the denominators of Möbius
addition, gyration and ``λ`` at 1e-15; `project` pulls points back inside the ball of radius
``(1 - eps)/√c`` with the official ``eps`` (4e-3 in float32, 1e-5 in float64), and `expmap0`,
`expmap` and the Poincaré FC end with it. One addition (deviation): the argument of ``artanh``
(`logmap0`, `logmap`, `dist`) is clamped to ``1 - 1e-7`` (float32; 1e-15 in float64), as
geoopt's ``artanh``; the official code relies on its projections alone and returns inf/NaN for
an input on or beyond the boundary. Values strictly inside the projected ball are unaffected.
The official manual backward passes (``diffgeom_autograd.py``) are not ported: JAX autodiff of
the clamped forward is finite at the boundary (tested), and XLA fuses the elementwise graph,
which was the reason for the manual derivations.

All math runs in float32 (float64 inputs stay float64) and returns that dtype; the modules cast
their outputs to ``dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.typing import Array, Float

__all__ = [
    "MIN_NORM",
    "MlrLambda",
    "PoincareConv2d",
    "PoincareLinear",
    "beta_concat_scale",
    "beta_concatenate",
    "beta_split",
    "check_curvature",
    "conformal_factor",
    "dist",
    "expmap",
    "expmap0",
    "gyration",
    "identity_init",
    "logmap",
    "logmap0",
    "mobius_add",
    "poincare_conv2d",
    "poincare_fully_connected",
    "poincare_hyperplane_dists",
    "poincare_midpoint",
    "project",
    "project_eps",
    "transp",
]

Dtype = Any
# Which conformal factor the HNN++ hyperplane distance uses (see `poincare_hyperplane_dists`).
MlrLambda = Literal["hnn++", "official"]

# The official clamp of norms and denominators.
MIN_NORM = 1e-15


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _ftype(x: Array) -> Dtype:
    return jnp.float64 if jnp.asarray(x).dtype == jnp.float64 else jnp.float32


def _f(x: Array, dtype: Dtype | None = None) -> Array:
    x = jnp.asarray(x)
    return x.astype(dtype or _ftype(x))


def check_curvature(who: str, c: Any) -> None:
    """Raise a ValueError unless a concrete curvature ``c`` is a finite number > 0.

    Traced values (``c`` inside `jit`) are not checked.
    """
    if isinstance(c, jax.core.Tracer):
        return
    arr = np.asarray(c)
    if arr.ndim != 0:
        raise ValueError(f"{who}: c must be a scalar curvature > 0, got shape {arr.shape}")
    if not np.isfinite(arr) or not float(arr) > 0.0:
        raise ValueError(f"{who}: c={float(arr)!r} must be > 0 (the ball has curvature -c)")


def _sqnorm(x: Array, axis: int) -> Array:
    return jnp.sum(jnp.square(x), axis=axis, keepdims=True)


def _norm(x: Array, axis: int) -> Array:
    # ‖x‖ clamped at 1e-15 as the official clamp_min; clamping the square keeps the gradient at
    # x = 0 finite (zero) where sqrt's would be inf.
    return jnp.sqrt(jnp.maximum(_sqnorm(x, axis), MIN_NORM**2))


def _atanh_max(dtype: Dtype) -> float:
    return 1.0 - (1e-15 if dtype == jnp.float64 else 1e-7)


def _artanh(x: Array) -> Array:
    return jnp.arctanh(jnp.minimum(x, _atanh_max(x.dtype)))


def _c(c: Any, dtype: Dtype) -> Array:
    check_curvature("poincare", c)
    return jnp.asarray(c, dtype)


# --------------------------------------------------------------------------------------------
# Poincaré ball: the official ``diffgeom.py`` / ``midpoint.py`` math.
# --------------------------------------------------------------------------------------------


def project_eps(dtype: Dtype) -> float:
    """The official projection margin: 4e-3 in float32, 1e-5 in float64."""
    return 1e-5 if dtype == jnp.float64 else 4e-3


def project(x: Float[Array, "*B D"], c: Any, axis: int = -1, eps: float | None = None) -> Array:
    """Rescale points with ``‖x‖ > (1 - eps)/√c`` onto that sphere (the official ``dg_project``).

    ``eps=None`` is the official margin (`project_eps`).
    """
    x = _f(x)
    eps = project_eps(x.dtype) if eps is None else eps
    c = _c(c, x.dtype)
    maxnorm = (1.0 - eps) / jnp.sqrt(c + MIN_NORM)
    norm = _norm(x, axis)
    return jnp.where(norm > maxnorm, x / norm * maxnorm, x)


def conformal_factor(x: Float[Array, "*B D"], c: Any, axis: int = -1) -> Array:
    """``λ_x = 2 / (1 - c‖x‖²)`` (denominator clamped at 1e-15), keeping the vector axis."""
    x = _f(x)
    return 2.0 / jnp.maximum(1.0 - _c(c, x.dtype) * _sqnorm(x, axis), MIN_NORM)


def mobius_add(x: Float[Array, "*B D"], y: Float[Array, "*B D"], c: Any, axis: int = -1) -> Array:
    """Möbius addition ``x ⊕_c y``.

    ``((1 + 2c⟨x,y⟩ + c‖y‖²) x + (1 - c‖x‖²) y) / (1 + 2c⟨x,y⟩ + c²‖x‖²‖y‖²)``.
    """
    dtype = jnp.promote_types(_ftype(x), _ftype(y))
    x, y = _f(x, dtype), _f(y, dtype)
    c = _c(c, dtype)
    x2, y2 = _sqnorm(x, axis), _sqnorm(y, axis)
    xy = jnp.sum(x * y, axis=axis, keepdims=True)
    num = (1.0 + 2.0 * c * xy + c * y2) * x + (1.0 - c * x2) * y
    den = 1.0 + 2.0 * c * xy + c * c * x2 * y2
    return num / jnp.maximum(den, MIN_NORM)


def expmap0(v: Float[Array, "*B D"], c: Any, axis: int = -1) -> Array:
    """Exponential map at the origin, ``tanh(√c‖v‖) v / (√c‖v‖)``, then `project`."""
    v = _f(v)
    sc = jnp.sqrt(_c(c, v.dtype))
    s = _norm(v, axis) * sc
    return project(jnp.tanh(s) * v / s, c, axis)


def logmap0(y: Float[Array, "*B D"], c: Any, axis: int = -1) -> Array:
    """Logarithmic map at the origin, ``artanh(√c‖y‖) y / (√c‖y‖)`` (the inverse of `expmap0`)."""
    y = _f(y)
    s = _norm(y, axis) * jnp.sqrt(_c(c, y.dtype))
    return _artanh(s) * y / s


def expmap(x: Float[Array, "*B D"], v: Float[Array, "*B D"], c: Any, axis: int = -1) -> Array:
    """Exponential map at ``x``: ``x ⊕ tanh(√c λ_x ‖v‖ / 2) v / (√c‖v‖)``, then `project`."""
    dtype = jnp.promote_types(_ftype(x), _ftype(v))
    x, v = _f(x, dtype), _f(v, dtype)
    sc = jnp.sqrt(_c(c, dtype))
    vn = _norm(v, axis)
    second = jnp.tanh(sc * conformal_factor(x, c, axis) * vn / 2.0) * v / (sc * vn)
    return project(mobius_add(x, second, c, axis), c, axis)


def logmap(x: Float[Array, "*B D"], y: Float[Array, "*B D"], c: Any, axis: int = -1) -> Array:
    """Logarithmic map at ``x``: ``2/(√c λ_x) artanh(√c‖-x ⊕ y‖) (-x ⊕ y)/‖-x ⊕ y‖``."""
    dtype = jnp.promote_types(_ftype(x), _ftype(y))
    x, y = _f(x, dtype), _f(y, dtype)
    sc = jnp.sqrt(_c(c, dtype))
    z = mobius_add(-x, y, c, axis)
    zn = _norm(z, axis)
    return 2.0 / (sc * conformal_factor(x, c, axis)) * _artanh(sc * zn) * z / zn


def gyration(
    u: Float[Array, "*B D"],
    v: Float[Array, "*B D"],
    w: Float[Array, "*B D"],
    c: Any,
    axis: int = -1,
) -> Array:
    """``gyr[u, v] w = ⊖(u ⊕ v) ⊕ (u ⊕ (v ⊕ w))``, in the official closed form (``dg_gyration``).

    The official default (``ag_gyration``) evaluates the four Möbius additions instead; the two
    are equal (tested), and the closed form, linear in ``w``, stays accurate for a tangent
    vector ``w`` outside the ball.
    """
    dtype = jnp.promote_types(jnp.promote_types(_ftype(u), _ftype(v)), _ftype(w))
    u, v, w = _f(u, dtype), _f(v, dtype), _f(w, dtype)
    c = _c(c, dtype)
    u2, v2 = _sqnorm(u, axis), _sqnorm(v, axis)
    uv = jnp.sum(u * v, axis=axis, keepdims=True)
    uw = jnp.sum(u * w, axis=axis, keepdims=True)
    vw = jnp.sum(v * w, axis=axis, keepdims=True)
    c2 = c * c
    a = -c2 * uw * v2 + c * vw + 2.0 * c2 * uv * vw
    b = -c2 * vw * u2 - c * uw
    d = 1.0 + 2.0 * c * uv + c2 * u2 * v2
    return w + 2.0 * (a * u + b * v) / jnp.maximum(d, MIN_NORM)


def transp(
    x: Float[Array, "*B D"],
    y: Float[Array, "*B D"],
    v: Float[Array, "*B D"],
    c: Any,
    axis: int = -1,
) -> Array:
    """Parallel transport of ``v ∈ T_x`` to ``T_y``: ``gyr[y, -x] v · λ_x / λ_y``."""
    lx, ly = conformal_factor(x, c, axis), conformal_factor(y, c, axis)
    return gyration(y, -_f(x), v, c, axis) * lx / ly


def dist(
    x: Float[Array, "*B D"], y: Float[Array, "*B D"], c: Any, axis: int = -1, keepdims: bool = False
) -> Array:
    """Geodesic distance ``d_c(x, y) = 2/√c · artanh(√c ‖-x ⊕_c y‖)``."""
    z = mobius_add(-_f(x), y, c, axis)
    sc = jnp.sqrt(_c(c, z.dtype))
    # unclamped norm at 0 would give a NaN gradient; the clamp changes d by < 2e-15
    d = 2.0 / sc * _artanh(sc * _norm(z, axis))
    return d if keepdims else jnp.squeeze(d, axis)


def poincare_midpoint(
    x: Float[Array, "*N D"],
    c: Any,
    axis: int = -1,
    batch_axis: int | Sequence[int] = 0,
    weights: Array | None = None,
) -> Array:
    """Poincaré (gyro)midpoint of the points along ``batch_axis`` (the official
    ``poincare_midpoint``), keeping the reduced axes with size 1.

    ``m = ½ ⊗_c (Σ λ_i x_i / Σ (λ_i - 1))`` with ``½ ⊗_c v = v / (1 + √(1 - c‖v‖²))``;
    equivalently (as the code) ``Σ γ_i² x_i / (Σ γ_i² - N/2)`` with ``γ_i² = 1/(1 - c‖x_i‖²)``.
    ``weights`` (broadcastable to ``x`` without its vector axis) give the weighted midpoint.
    """
    x = _f(x)
    c = _c(c, x.dtype)
    axes = (batch_axis,) if isinstance(batch_axis, int) else tuple(batch_axis)
    gamma_sq = 1.0 / jnp.maximum(1.0 - c * _sqnorm(x, axis), MIN_NORM)
    if weights is None:
        count = math.prod(x.shape[a] for a in axes)
        num = jnp.sum(gamma_sq * x, axis=axes, keepdims=True)
        den = jnp.sum(gamma_sq, axis=axes, keepdims=True) - count / 2.0
    else:
        w = jnp.expand_dims(_f(weights, x.dtype), axis)
        num = jnp.sum(w * gamma_sq * x, axis=axes, keepdims=True)
        den = jnp.sum(w * (gamma_sq - 0.5), axis=axes, keepdims=True)
    m = num / den
    # γ_m/(1 + γ_m) m with the official clamp √(1 - c‖m‖²) ≥ 1e-15 (squared here, so that a
    # rounding step past the boundary gives the boundary instead of NaN).
    return m / (1.0 + jnp.sqrt(jnp.maximum(1.0 - c * _sqnorm(m, axis), MIN_NORM**2)))


# --------------------------------------------------------------------------------------------
# β-concatenation and the HNN++ fully-connected layer (official ``linreg.py``).
# --------------------------------------------------------------------------------------------


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def beta_concat_scale(n_i: int, n: int) -> float:
    """``B(n/2, ½) / B(n_i/2, ½)``: the tangent-space factor of HNN++ β-concatenation of an
    ``n_i``-dimensional block into an ``n``-dimensional vector (official
    ``beta_n / beta_ni``)."""
    if n_i < 1 or n < n_i:
        raise ValueError(f"beta_concat_scale: need 1 <= n_i <= n, got n_i={n_i}, n={n}")
    return math.exp(_log_beta(n / 2.0, 0.5) - _log_beta(n_i / 2.0, 0.5))


def beta_concatenate(xs: Sequence[Float[Array, "*B Di"]], c: Any) -> Float[Array, "*B D"]:
    """HNN++ β-concatenation of ball points along the last axis.

    ``expmap0(concat_i(B(n/2,½)/B(n_i/2,½) · logmap0(x_i)))`` with ``n = Σ n_i``.
    """
    if not xs:
        raise ValueError("beta_concatenate: xs is empty; expected at least one [..., n_i] array")
    n = sum(x.shape[-1] for x in xs)
    parts = [beta_concat_scale(x.shape[-1], n) * logmap0(x, c) for x in xs]
    return expmap0(jnp.concatenate(parts, axis=-1), c)


def beta_split(x: Float[Array, "*B D"], sizes: Sequence[int], c: Any) -> list[Array]:
    """The inverse of `beta_concatenate`: split the last axis into blocks of ``sizes``."""
    n = x.shape[-1]
    if sum(sizes) != n or any(s < 1 for s in sizes):
        raise ValueError(f"beta_split: sizes {tuple(sizes)} must be positive and sum to the last "
                         f"axis of x, shape {x.shape}")  # fmt: skip
    v = logmap0(x, c)
    bounds = np.cumsum(sizes)[:-1].tolist()
    return [
        expmap0(p / beta_concat_scale(p.shape[-1], n), c) for p in jnp.split(v, bounds, axis=-1)
    ]


def poincare_hyperplane_dists(
    x: Float[Array, "*B I"],
    z: Float[Array, "I O"],
    r: Float[Array, " O"] | None,
    c: Any,
    mlr_lambda: MlrLambda = "hnn++",
) -> Float[Array, "*B O"]:
    """HNN++ Poincaré MLR: signed distances ``v_k(x)`` of ``x`` to the hyperplanes ``(z_k, r_k)``.

    ``v_k = 2‖z_k‖/√c · asinh(√c λ ⟨x, z_k⟩/‖z_k‖ cosh(2√c r_k) - (λ - 1) sinh(2√c r_k))``.

    ``mlr_lambda="hnn++"`` uses the conformal factor ``λ = 2/(1 - c‖x‖²)`` of the HNN++ paper
    and of the authors' later library (HypLL ``poincare_hyperplane_dists``);
    ``"official"`` reproduces the Poincaré ResNet repository's ``linreg.py``, which writes
    ``λ = 2(1 - c‖x‖²)`` (equal to first order at the origin).
    """
    x = _f(x)
    z = _f(z, x.dtype)
    c = _c(c, x.dtype)
    sc = jnp.sqrt(c)
    one_minus = 1.0 - c * _sqnorm(x, -1)
    if mlr_lambda == "hnn++":
        lam = 2.0 / jnp.maximum(one_minus, MIN_NORM)
    elif mlr_lambda == "official":
        lam = 2.0 * one_minus
    else:
        raise ValueError(f"poincare_hyperplane_dists: mlr_lambda={mlr_lambda!r}; expected "
                         "'hnn++' or 'official'")  # fmt: skip
    lead = (1,) * (x.ndim - 1)
    z_norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(z), axis=0), MIN_NORM**2))
    z_norm = z_norm.reshape(lead + z_norm.shape)  # [1.., O]
    xz = jnp.matmul(x, z, precision=jax.lax.Precision.HIGHEST)  # [..., O]
    if r is None:
        arg = sc * lam / z_norm * xz
    else:
        two_scr = 2.0 * sc * _f(r, x.dtype).reshape(lead + (-1,))
        arg = sc * lam / z_norm * xz * jnp.cosh(two_scr) - (lam - 1.0) * jnp.sinh(two_scr)
    return 2.0 * z_norm / sc * jnp.arcsinh(arg)


def poincare_fully_connected(
    x: Float[Array, "*B I"],
    z: Float[Array, "I O"],
    bias: Float[Array, " O"] | None,
    c: Any,
    mlr_lambda: MlrLambda = "hnn++",
) -> Float[Array, "*B O"]:
    """HNN++ Poincaré fully-connected layer on ball points (official ``fully_connected``).

    ``w = sinh(√c v(x))/√c`` from the hyperplane distances ``v`` (`poincare_hyperplane_dists`),
    ``y = w / (1 + √(1 + c‖w‖²))``, then `project`. Evaluated in an overflow-free form (same
    value) where the official code overflows for large ``v``.
    """
    v = poincare_hyperplane_dists(x, z, bias, c, mlr_lambda)
    sc = jnp.sqrt(_c(c, v.dtype))
    t = sc * v
    # √c·y = s/(1 + √(1 + ‖s‖²)) with s = sinh(t), evaluated as ŝ/(e^-a + √(e^-2a + ‖ŝ‖²))
    # with ŝ = s·e^-a, a = max|t|: the same value, but no overflow of sinh or ‖s‖² for large
    # t (in float32 the literal form gives NaN once |t| > 89 and 0 once ‖s‖² overflows).
    a = jax.lax.stop_gradient(jnp.max(jnp.abs(t), axis=-1, keepdims=True))
    s_hat = (jnp.exp(t - a) - jnp.exp(-t - a)) / 2.0
    ea = jnp.exp(-a)
    y = s_hat / (ea + jnp.sqrt(ea * ea + _sqnorm(s_hat, -1))) / sc
    return project(y, c)


def _patches(x: Array, k: tuple[int, int], stride: int, padding: int) -> Array:
    """``[B, H', W', C·kh·kw]`` patches in torch ``F.unfold`` order (channel slowest), zero-padded.

    Strided slices rather than `conv_general_dilated_patches`: exact on every backend (the
    latter is a convolution with a one-hot kernel, rounded at default GPU/TPU precision).
    """
    b, h, w, ch = x.shape
    kh, kw = k
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    cols = [
        x[:, i : i + (ho - 1) * stride + 1 : stride, j : j + (wo - 1) * stride + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]  # kh·kw × [B, H', W', C]
    p = jnp.stack(cols, axis=-1)  # [B, H', W', C, kh·kw]
    return p.reshape(b, ho, wo, ch * kh * kw)


def poincare_conv2d(
    x: Float[Array, "B H W C"],
    kernel: Float[Array, "K O"],
    bias: Float[Array, " O"] | None,
    c: Any,
    kernel_size: tuple[int, int],
    stride: int = 1,
    padding: int = 0,
    mlr_lambda: MlrLambda = "hnn++",
) -> Float[Array, "B h w O"]:
    """Poincaré 2-D convolution on tangent vectors at the origin (official
    ``PoincareConvolution2d.forward``), channels-last.

    Scale ``x`` by the β-concatenation factor ``B(C·kh·kw/2, ½)/B(C/2, ½)``, take the
    ``kh×kw`` patches (``F.unfold`` order: channel, row, column), map each patch with `expmap0`,
    apply `poincare_fully_connected` with ``kernel`` ``[C·kh·kw, O]``, and return `logmap0` of
    the result. Output side ``(H + 2·padding - kh) // stride + 1``.
    """
    kh, kw = kernel_size
    ch = x.shape[-1]
    x = _f(x) * beta_concat_scale(ch, ch * kh * kw)
    p = expmap0(_patches(x, (kh, kw), stride, padding), c)
    y = poincare_fully_connected(p, kernel, bias, c, mlr_lambda)
    return logmap0(y, c)


# --------------------------------------------------------------------------------------------
# Linen modules.
# --------------------------------------------------------------------------------------------


def identity_init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
    """The paper's identity initialisation ``½ · I`` (``torch.eye(in, out) / 2``): the ½ counters
    the 2 in the hyperplane distance, so that a layer starts close to the identity."""
    del key
    return 0.5 * jnp.eye(shape[0], shape[1], dtype=dtype)


def _normal_init(fan: int) -> Any:
    # official id_init=False: N(0, (2·in·out)^-1/2)
    return nn.initializers.normal(stddev=(2.0 * fan) ** -0.5)


def _check_mlr_lambda(who: str, mlr_lambda: str) -> None:
    if mlr_lambda not in ("hnn++", "official"):
        raise ValueError(f"{who}: mlr_lambda={mlr_lambda!r}; expected 'hnn++' or 'official'")


class PoincareLinear(nn.Module):
    """Poincaré fully-connected layer (Poincaré ResNet, https://arxiv.org/abs/2303.14027; HNN++
    https://arxiv.org/abs/2006.08210): tangent vectors in, tangent vectors out.

    As the official ``PoincareLinear``: `expmap0` of the input, `poincare_fully_connected` with
    ``kernel`` (the official ``z``, ``[in, out]``) and ``bias``, `logmap0`. Unlike a Möbius
    matrix-vector layer (HNN), each output coordinate comes from a hyperplane distance, and the
    identity initialisation (`identity_init`) keeps norms over depth.

    Attributes:
      features: outputs.
      c: curvature (> 0; the ball has curvature ``-c``), fixed as the official default.
      use_bias: learnable hyperplane offsets (zeros at init).
      id_init: ``½ I`` kernel init (official default); False: ``N(0, (2·in·out)^-1/2)``.
      mlr_lambda: see `poincare_hyperplane_dists`.
      dtype: output dtype (None: the input's); the math runs in float32.
      param_dtype: parameter dtype.

    Example:
      >>> import jax
      >>> layer = PoincareLinear(4)
      >>> x = jax.random.normal(jax.random.key(0), (2, 6))
      >>> layer.apply(layer.init(jax.random.key(1), x), x).shape
      (2, 4)
    """

    features: int
    c: float = 0.1
    use_bias: bool = True
    id_init: bool = True
    mlr_lambda: MlrLambda = "hnn++"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "*B I"]) -> Float[Array, "*B O"]:
        check_curvature("PoincareLinear", self.c)
        _check_mlr_lambda("PoincareLinear", self.mlr_lambda)
        if x.ndim < 1 or x.shape[-1] < 1:
            raise ValueError(f"PoincareLinear: x must be [..., in_features], got shape {x.shape}")
        n_in = x.shape[-1]
        init = identity_init if self.id_init else _normal_init(n_in * self.features)
        z = self.param(
            "kernel",
            nn.with_logical_partitioning(init, ("embed", "mlp")),
            (n_in, self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                (self.features,),
                self.param_dtype,
            )
        y = poincare_fully_connected(expmap0(x, self.c), z, bias, self.c, self.mlr_lambda)
        return logmap0(y, self.c).astype(self.dtype or x.dtype)


class PoincareConv2d(nn.Module):
    """Poincaré 2-D convolution (Poincaré ResNet, https://arxiv.org/abs/2303.14027), NHWC tangent
    vectors in and out.

    As the official ``PoincareConvolution2d`` (`poincare_conv2d`): the receptive field of each
    output pixel is β-concatenated (tangent-space scaling, unfold, `expmap0`) into one point of
    a ``C·kh·kw``-dimensional ball, and a Poincaré fully-connected layer maps it to ``features``
    dimensions; the result is returned through `logmap0`. Parameters are laid out as the
    official ``weights`` ``[C·kh·kw, O]`` (rows in ``F.unfold`` order: channel, row, column)
    and ``bias`` ``[O]``; ``kernel`` is initialised to ``½ I`` (identity init).

    Deviation: the output side is ``(H + 2p - k) // s + 1`` (``F.unfold``'s); the official
    reshape uses ``(H - k + 1 + 2p) // s``, equal for the even sizes it is used with.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)``.
      stride, padding: as torch's (symmetric zero padding, in tangent space).
      c: curvature (> 0).
      use_bias, id_init, mlr_lambda: see `PoincareLinear`.
      dtype: output dtype (None: the input's); the math runs in float32.
      param_dtype: parameter dtype.

    Example:
      >>> import jax
      >>> conv = PoincareConv2d(8, (3, 3), padding=1)
      >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
      >>> conv.apply(conv.init(jax.random.key(1), x), x).shape
      (2, 8, 8, 8)
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    stride: int = 1
    padding: int = 0
    c: float = 0.1
    use_bias: bool = True
    id_init: bool = True
    mlr_lambda: MlrLambda = "hnn++"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B h w O"]:
        check_curvature("PoincareConv2d", self.c)
        _check_mlr_lambda("PoincareConv2d", self.mlr_lambda)
        kh, kw = self.kernel_size
        if x.ndim != 4:
            raise ValueError(f"PoincareConv2d: x must be NHWC [batch, height, width, channels], "
                             f"got shape {x.shape} (rank {x.ndim})")  # fmt: skip
        if self.stride < 1 or self.padding < 0 or kh < 1 or kw < 1:
            raise ValueError(f"PoincareConv2d: need stride >= 1, padding >= 0, kernel_size >= 1; "
                             f"got stride={self.stride}, padding={self.padding}, "
                             f"kernel_size={self.kernel_size}")  # fmt: skip
        h, w = x.shape[1] + 2 * self.padding, x.shape[2] + 2 * self.padding
        if h < kh or w < kw:
            raise ValueError(f"PoincareConv2d: x of shape {x.shape} with padding={self.padding} "
                             f"is smaller than kernel_size={self.kernel_size}")  # fmt: skip
        n_in = x.shape[-1] * kh * kw
        init = identity_init if self.id_init else _normal_init(n_in * self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, ("conv_in", "conv_out")),
            (n_in, self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                (self.features,),
                self.param_dtype,
            )
        y = poincare_conv2d(
            x, kernel, bias, self.c, (kh, kw), self.stride, self.padding, self.mlr_lambda
        )
        return y.astype(self.dtype or x.dtype)
