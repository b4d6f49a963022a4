"""Poincaré ball (https://arxiv.org/abs/2303.14027): gyrovector identities in closed form, the
midpoint, the midpoint batch norm, the Poincaré conv against a NumPy loop on the same weights,
identity initialisation, finiteness at the boundary, and bad-input errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from jaxblocks.layers.norm.poincare import PoincareBatchNorm, poincare_batch_norm
from jaxblocks.layers.poincare import (
    PoincareConv2d,
    PoincareLinear,
    beta_concat_scale,
    beta_concatenate,
    beta_split,
    conformal_factor,
    dist,
    expmap,
    expmap0,
    gyration,
    logmap,
    logmap0,
    mobius_add,
    poincare_fully_connected,
    poincare_midpoint,
    project,
    transp,
)

C = 0.7


def _points(key, shape, c=C, radius=0.9):
    """Random ball points with norms up to ``radius/√c``."""
    k1, k2 = jax.random.split(key)
    d = jax.random.normal(k1, shape)
    d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
    r = radius * jax.random.uniform(k2, shape[:-1] + (1,)) / np.sqrt(c)
    return d * r


def _close(a, b, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


def test_mobius_addition_identities(key):
    kx, ky = jax.random.split(key)
    x, y = _points(kx, (6, 5)), _points(ky, (6, 5))
    _close(mobius_add(x, jnp.zeros_like(x), C), x)
    _close(mobius_add(jnp.zeros_like(x), x, C), x)
    _close(mobius_add(-x, x, C), jnp.zeros_like(x), atol=1e-6)
    _close(mobius_add(-x, mobius_add(x, y, C), C), y, atol=2e-5)  # left cancellation
    # not commutative: x ⊕ y = gyr[x, y](y ⊕ x)
    assert float(jnp.max(jnp.abs(mobius_add(x, y, C) - mobius_add(y, x, C)))) > 1e-2
    _close(mobius_add(x, y, C), gyration(x, y, mobius_add(y, x, C), C), atol=2e-5)


def test_exp_log_maps_invert_and_distance_formula(key):
    kx, ky, kv = jax.random.split(key, 3)
    x, y = _points(kx, (6, 4)), _points(ky, (6, 4))
    v = 0.8 * jax.random.normal(kv, (6, 4))
    _close(expmap0(logmap0(x, C), C), x, atol=2e-5)
    _close(logmap0(expmap0(v, C), C), v, atol=1e-4)
    _close(expmap(x, logmap(x, y, C), C), y, atol=1e-4)
    d = dist(x, y, C)
    # d = 2/√c artanh(√c ‖-x ⊕ y‖), symmetric, and the Riemannian length of log_x y
    want = 2.0 / np.sqrt(C) * np.arctanh(np.sqrt(C) * np.linalg.norm(mobius_add(-x, y, C), axis=-1))
    _close(d, want, rtol=1e-5)
    _close(d, dist(y, x, C), rtol=1e-5)
    lam = conformal_factor(x, C)[..., 0]
    _close(d, lam * jnp.linalg.norm(logmap(x, y, C), axis=-1), rtol=1e-4)
    _close(dist(jnp.zeros_like(y), y, C), 2.0 * jnp.linalg.norm(logmap0(y, C), axis=-1), rtol=1e-5)
    _close(dist(x, x, C), jnp.zeros(6), atol=1e-3)


def test_gyration_closed_form_and_transport_isometry(key):
    ku, kv, kw = jax.random.split(key, 3)
    u, v, w = _points(ku, (5, 3)), _points(kv, (5, 3)), _points(kw, (5, 3))
    four_additions = mobius_add(-mobius_add(u, v, C), mobius_add(u, mobius_add(v, w, C), C), C)
    _close(gyration(u, v, w, C), four_additions, atol=2e-5)  # the official ag_gyration form
    t = 1.5 * jax.random.normal(kw, (5, 3))  # a tangent vector
    pt = transp(u, v, t, C)
    lu, lv = conformal_factor(u, C), conformal_factor(v, C)
    _close(lv * jnp.linalg.norm(pt, axis=-1, keepdims=True),
           lu * jnp.linalg.norm(t, axis=-1, keepdims=True), rtol=1e-5)  # fmt: skip


def test_midpoint(key):
    x = _points(key, (4,))
    same = jnp.broadcast_to(x, (7, 4))
    _close(poincare_midpoint(same, C)[0], x, atol=1e-6)
    # small curvature: the Euclidean mean
    pts = jax.random.normal(key, (9, 3))
    _close(poincare_midpoint(pts, 1e-7)[0], jnp.mean(pts, axis=0), atol=1e-5)
    # two points: the geodesic midpoint, at half the distance from each
    a, b = _points(jax.random.key(1), (3,)), _points(jax.random.key(2), (3,))
    m = poincare_midpoint(jnp.stack([a, b]), C)[0]
    _close(dist(a, m, C), dist(b, m, C), rtol=1e-4)
    _close(dist(a, m, C), dist(a, b, C) / 2, rtol=1e-4)
    # several batch axes at once, and uniform weights equal the plain midpoint
    grid = _points(jax.random.key(3), (2, 3, 4))
    flat = poincare_midpoint(grid.reshape(6, 4), C)
    _close(poincare_midpoint(grid, C, batch_axis=(0, 1)).reshape(1, 4), flat, atol=1e-6)
    _close(poincare_midpoint(grid.reshape(6, 4), C, weights=jnp.full((6,), 0.3)), flat, atol=1e-6)


def test_beta_concatenation(key):
    for n_i, n in ((3, 27), (8, 72), (5, 5)):
        want = scipy.special.beta(n / 2, 0.5) / scipy.special.beta(n_i / 2, 0.5)
        assert beta_concat_scale(n_i, n) == pytest.approx(want, rel=1e-10)
    xs = [_points(jax.random.key(i), (2, d)) for i, d in enumerate((3, 5, 2))]
    y = beta_concatenate(xs, C)
    assert y.shape == (2, 10) and bool(jnp.all(C * jnp.sum(y**2, -1) < 1))
    for a, b in zip(beta_split(y, (3, 5, 2), C), xs, strict=True):
        _close(a, b, atol=2e-5)
    with pytest.raises(ValueError, match=r"sizes \(3, 3\).*shape \(2, 10\)"):
        beta_split(y, (3, 3), C)


def _np_project(y, c):
    maxnorm = (1 - 4e-3) / np.sqrt(c)  # the official float32 projection
    yn = np.linalg.norm(y, axis=-1, keepdims=True)
    return np.where(yn > maxnorm, y / yn * maxnorm, y)


def _np_expmap0(v, c):
    n = np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-15) * np.sqrt(c)
    return _np_project(np.tanh(n) * v / n, c)


def _np_logmap0(y, c):
    n = np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-15) * np.sqrt(c)
    return np.arctanh(n) * y / n


def _np_fc(x, z, r, c, official=False):
    """The official linreg.py poincare_fully_connected, float64, one point at a time."""
    sc = np.sqrt(c)
    x2 = np.sum(x * x)
    lam = 2 * (1 - c * x2) if official else 2 / (1 - c * x2)
    zn = np.linalg.norm(z, axis=0)
    v = (
        2
        * zn
        / sc
        * np.arcsinh(
            sc * lam / zn * (x @ z) * np.cosh(2 * sc * r) - (lam - 1) * np.sinh(2 * sc * r)
        )
    )
    w = np.sinh(sc * v) / sc
    return w / (1 + np.sqrt(1 + c * np.sum(w * w)))


def _np_conv(x, kernel, bias, c, k, stride, pad, official=False):
    """Direct loop: β scale, patch (channel, row, column order), expmap0, FC, project, logmap0."""
    b, h, w, ch = x.shape
    kh, kw = k
    scale = scipy.special.beta(ch * kh * kw / 2, 0.5) / scipy.special.beta(ch / 2, 0.5)
    xp = np.pad(x * scale, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = np.zeros((b, ho, wo, kernel.shape[1]))
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                win = xp[n, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
                patch = np.transpose(win, (2, 0, 1)).reshape(-1)  # F.unfold order
                y = _np_fc(_np_expmap0(patch, c), kernel, bias, c, official)
                out[n, i, j] = _np_logmap0(_np_project(y, c), c)
    return out


@pytest.mark.parametrize(
    "k, stride, pad, mlr_lambda",
    [((3, 3), 1, 1, "hnn++"), ((3, 2), 2, 1, "official"), ((1, 1), 2, 0, "hnn++")],
)
def test_conv_matches_numpy_loop(key, k, stride, pad, mlr_lambda):
    x = 0.7 * jax.random.normal(key, (2, 7, 6, 3))
    conv = PoincareConv2d(5, k, stride, pad, c=0.1, mlr_lambda=mlr_lambda)
    params = nn.unbox(conv.init(jax.random.key(1), x))["params"]
    rng = np.random.default_rng(0)
    kernel = np.asarray(params["kernel"], np.float64) + 0.2 * rng.standard_normal(
        params["kernel"].shape
    )
    bias = 0.3 * rng.standard_normal(5)
    y = conv.apply({"params": {"kernel": jnp.float32(kernel), "bias": jnp.float32(bias)}}, x)
    want = _np_conv(np.asarray(x, np.float64), kernel, bias, 0.1, k, stride, pad,
                    official=mlr_lambda == "official")  # fmt: skip
    assert y.shape == want.shape
    _close(y, want, atol=2e-5, rtol=1e-4)


def test_identity_init(key):
    # ½ I with the HNN++ conformal factor is exactly the identity on tangent vectors
    x = 0.5 * jax.random.normal(key, (4, 6))
    layer = PoincareLinear(6, c=0.3)
    _close(layer.apply(layer.init(key, x), x), x, atol=1e-5)
    img = jax.random.normal(key, (2, 4, 4, 5))
    conv = PoincareConv2d(5, (1, 1), c=0.3)
    _close(conv.apply(conv.init(key, img), img), img, atol=1e-5)
    # the official repository's λ = 2(1 - c‖x‖²) is the identity only to first order
    official = layer.clone(mlr_lambda="official")
    y = official.apply(official.init(key, x), x)
    assert float(jnp.max(jnp.abs(y - x))) > 1e-2


def _np_batch_norm(v, mean, var, c, eps=1e-6):
    """The official PoincareBatchNorm.forward in float64, with its ag_gyration (four Möbius
    additions) for the transport."""

    def madd(x, y):
        x2, y2 = np.sum(x * x, -1, keepdims=True), np.sum(y * y, -1, keepdims=True)
        xy = np.sum(x * y, -1, keepdims=True)
        return ((1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y) / (
            1 + 2 * c * xy + c * c * x2 * y2
        )

    def lam(x):
        return 2 / (1 - c * np.sum(x * x, -1, keepdims=True))

    sc = np.sqrt(c)
    x = _np_expmap0(v, c)
    mu = _np_expmap0(mean, c)[None]
    g2 = 1 / (1 - c * np.sum(x * x, -1, keepdims=True))
    m = np.sum(g2 * x, 0, keepdims=True) / (np.sum(g2) - len(x) / 2)
    m = m / (1 + np.sqrt(1 - c * np.sum(m * m)))
    d = 2 / sc * np.arctanh(sc * np.linalg.norm(madd(-x, m), axis=-1))
    z = madd(-m, x)
    zn = np.linalg.norm(z, axis=-1, keepdims=True)
    log_m = 2 / (sc * lam(m)) * np.arctanh(sc * zn) * z / zn
    gyr = madd(-madd(mu, -m), madd(mu, madd(-m, log_m)))  # gyr[mu, -m] log_m
    u = np.sqrt(var / (np.mean(d**2) + eps)) * gyr * lam(m) / lam(mu)
    un = np.linalg.norm(u, axis=-1, keepdims=True)
    second = np.tanh(sc * lam(mu) * un / 2) * u / (sc * un)
    return _np_logmap0(_np_project(madd(mu, second), c), c)


def test_batch_norm_matches_official_formulas_and_centres(key):
    kx, km = jax.random.split(key)
    x = 1.3 * jax.random.normal(kx, (3, 4, 5, 6)) + 0.4  # off-centre points
    bn = PoincareBatchNorm(c=0.1)
    variables = bn.init(key, x)
    assert jax.tree.map(jnp.shape, nn.unbox(variables))["params"] == {"mean": (6,), "var": ()}
    y = bn.apply(variables, x)
    assert y.shape == x.shape and "batch_stats" not in variables
    mean, var = 0.3 * jax.random.normal(km, (6,)), jnp.float32(0.8)
    y2 = bn.apply({"params": {"mean": mean, "var": var}}, x)
    want = _np_batch_norm(np.asarray(x, np.float64).reshape(-1, 6), np.asarray(mean, np.float64),
                          0.8, 0.1)  # fmt: skip
    _close(y2.reshape(-1, 6), want, atol=2e-5, rtol=1e-4)
    # the output's Fréchet variance about the target mean is var·σ²/(σ²+ε), exactly
    pts = expmap0(y.reshape(-1, 6), 0.1)
    _, m_in, s2 = poincare_batch_norm(x.reshape(-1, 6), jnp.zeros(6), jnp.float32(1.0), 0.1)
    _close(jnp.mean(dist(pts, jnp.zeros_like(pts), 0.1) ** 2), s2 / (s2 + 1e-6), rtol=1e-4)
    # with s = 1 the re-centring is a gyro-translation: the output midpoint is exactly 0 ...
    exact = bn.apply({"params": {"mean": jnp.zeros(6), "var": s2 + 1e-6}}, x)
    m_out = poincare_midpoint(expmap0(exact.reshape(-1, 6), 0.1), 0.1)
    assert float(jnp.linalg.norm(m_in)) > 0.3 and float(jnp.linalg.norm(m_out)) < 1e-5
    # ... and with rescaling it stays close to 0 (the midpoint is not scale-covariant)
    m_out = poincare_midpoint(pts, 0.1)
    assert float(jnp.linalg.norm(m_out)) < 0.1 * float(jnp.sqrt(jnp.mean(jnp.sum(pts**2, -1))))


def _boundary_fns(x, y, z, t, c):
    return {
        "logmap0": lambda x: logmap0(x, c),
        "expmap0": lambda x: expmap0(30.0 * x, c),
        "project": lambda x: project(x, c),
        "mobius_add": lambda x: mobius_add(x, y, c) + mobius_add(-x, x, c),
        "dist": lambda x: dist(x, y, c) + dist(x, x, c),
        "logmap": lambda x: logmap(y, x, c) + logmap(x, y, c),
        "expmap": lambda x: expmap(x, t, c),
        "transp": lambda x: transp(x, y, t, c),
        "midpoint": lambda x: poincare_midpoint(jnp.concatenate([x, y]), c),
        "fully_connected": lambda x: poincare_fully_connected(x, z, 0.1 * jnp.ones(3), c),
        "batch_norm": lambda x: poincare_batch_norm(logmap0(x, c), jnp.zeros(5), 1.0, c)[0],
    }


# c is traced, so both curvatures share one (unoptimised) compile.
@jax.jit(compiler_options={"xla_backend_optimization_level": 0})
def _boundary_values_and_grads(x, y, z, t, c):
    return {
        name: jax.value_and_grad(lambda x, f=f: jnp.sum(jnp.sin(f(x))))(x)
        for name, f in _boundary_fns(x, y, z, t, c).items()
    }


@pytest.mark.parametrize("c", [1.0, 0.1])
def test_finite_values_and_gradients_at_the_boundary(key, c):
    kx, ky, kz = jax.random.split(key, 3)
    d = jax.random.normal(kx, (8, 5))
    d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
    x = d * jnp.float32(1.0 / np.sqrt(c) - 1e-7)  # on the float32 boundary
    assert x.dtype == jnp.float32
    y = _points(ky, (8, 5), c, radius=0.5)
    z = jax.random.normal(kz, (5, 3))
    t = jax.random.normal(kz, (8, 5))
    out = _boundary_values_and_grads(x, y, z, t, jnp.float32(c))
    for name, (value, grad) in out.items():
        assert bool(jnp.isfinite(value)), f"{name}: non-finite value"
        assert bool(jnp.all(jnp.isfinite(grad))), f"{name}: non-finite gradient"
    # the exponential map never leaves the ball, however long the vector
    far = expmap0(1e4 * t, c)
    assert float(jnp.max(jnp.linalg.norm(far, axis=-1))) <= (1 - 4e-3) / np.sqrt(c) * (1 + 1e-6)
    # the zero vector: finite value and gradient
    zero = jnp.zeros((2, 5))
    g = jax.grad(lambda v: jnp.sum(logmap0(expmap0(v, c), c)))(zero)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_bad_inputs(key):
    x = jax.random.normal(key, (2, 5, 5, 3))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"c={bad} must be > 0"):
            expmap0(x, bad)
        with pytest.raises(ValueError, match=r"PoincareConv2d: c=.* must be > 0"):
            PoincareConv2d(4, c=bad).init(key, x)
        with pytest.raises(ValueError, match=r"PoincareBatchNorm: c=.* must be > 0"):
            PoincareBatchNorm(c=bad).init(key, x)
    with pytest.raises(ValueError, match=r"PoincareConv2d: x must be NHWC.*\(5, 5, 3\) \(rank 3\)"):
        PoincareConv2d(4).init(key, x[0])
    with pytest.raises(ValueError, match=r"smaller than kernel_size=\(7, 7\)"):
        PoincareConv2d(4, (7, 7)).init(key, x)
    with pytest.raises(ValueError, match=r"mlr_lambda='ganea'"):
        PoincareLinear(4, mlr_lambda="ganea").init(key, x)
    with pytest.raises(ValueError, match=r"PoincareBatchNorm: input must have at least 2 dims"):
        PoincareBatchNorm().init(key, x[0, 0, 0])
