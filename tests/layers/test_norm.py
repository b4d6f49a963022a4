"""Normalization layers vs their equations (numpy float64), train/eval, running statistics,
masks, batch size 1, gradients, PowerNorm's approximate backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers import norm as N
from tests.kernels.harness import assert_close

DTYPES = [jnp.float32, jnp.bfloat16]


def _x(shape, dtype=jnp.float32, seed=0, shift=0.5):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 1.5 + shift
    return x.astype(dtype)


def _np(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _rand_params(variables, seed=3):
    """Replace every param leaf by random values (so scale/bias are not the trivial 1/0)."""
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        (1.0 + 0.3 * jax.random.normal(k, p.shape, jnp.float32)).astype(p.dtype)
        for k, p in zip(keys, leaves, strict=True)
    ]
    return {**variables, "params": jax.tree.unflatten(tree, new)}


def _finite_grads(module, variables, x, **kw):
    def loss(params):
        y, _ = module.apply(
            {**variables, "params": params}, x, use_running_average=False, mutable=True, **kw
        )
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    g = jax.grad(loss)(variables["params"])
    for leaf in jax.tree.leaves(g):
        assert np.all(np.isfinite(_np(leaf)))
    return g


# ------------------------------------------------------------------------------- Ghost BN


@pytest.mark.parametrize("dtype", DTYPES)
def test_ghost_bn_matches_equation_and_sequential_ema(dtype):
    x = _x((12, 3, 3, 5), dtype)
    m = N.GhostBatchNorm(ghost_batch_size=4, momentum=0.8)
    v = _rand_params(m.init(jax.random.key(0), x, use_running_average=False))
    v["batch_stats"] = {"mean": jnp.full((5,), 0.3), "var": jnp.full((5,), 2.0)}
    y, upd = m.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    assert y.dtype == dtype
    xn, sc, bi = _np(x), _np(v["params"]["scale"]), _np(v["params"]["bias"])
    ref = np.empty_like(xn)
    r_mean, r_var = np.full(5, 0.3), np.full(5, 2.0)
    for l in range(3):
        xl = xn[4 * l : 4 * l + 4]
        mu, var = xl.mean((0, 1, 2)), xl.var((0, 1, 2))
        ref[4 * l : 4 * l + 4] = (xl - mu) / np.sqrt(var + 1e-5) * sc + bi
        r_mean = 0.8 * r_mean + 0.2 * mu
        r_var = 0.8 * r_var + 0.2 * var
    assert_close(y, ref, dtype=dtype)
    assert_close(upd["batch_stats"]["mean"], r_mean, tol=1e-5)
    assert_close(upd["batch_stats"]["var"], r_var, tol=1e-5)
    # evaluation uses the running statistics
    ye = m.apply({**v, **upd}, x, use_running_average=True)
    ref_e = (xn - r_mean) / np.sqrt(r_var + 1e-5) * sc + bi
    assert_close(ye, ref_e, dtype=dtype)


def test_ghost_bn_equals_batchnorm_when_ghost_is_batch():
    x = _x((6, 4, 4, 3))
    gbn = N.GhostBatchNorm(ghost_batch_size=6, momentum=0.9)
    bn = nn.BatchNorm(momentum=0.9, use_fast_variance=False)
    v = _rand_params(gbn.init(jax.random.key(0), x, use_running_average=False))
    v["batch_stats"] = {"mean": jnp.full((3,), 0.1), "var": jnp.full((3,), 1.5)}
    y1, u1 = gbn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    y2, u2 = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    assert_close(y1, y2, tol=1e-6)
    assert_close(u1, u2, tol=1e-6)
    # larger ghost size than batch: one ghost batch, still plain BN
    y3, _ = N.GhostBatchNorm(ghost_batch_size=64, momentum=0.9).apply(
        v, x, use_running_average=False, mutable=["batch_stats"]
    )
    assert_close(y3, y2, tol=1e-6)


def test_ghost_bn_batch_one_grads_and_errors():
    m = N.GhostBatchNorm(ghost_batch_size=4)
    x1 = _x((1, 3, 3, 2))
    v = m.init(jax.random.key(0), x1, use_running_average=False)
    y, _ = m.apply(v, x1, use_running_average=False, mutable=["batch_stats"])
    assert np.all(np.isfinite(_np(y)))
    _finite_grads(m, v, _x((8, 3, 3, 2)))
    with pytest.raises(ValueError, match="multiple of ghost_batch_size"):
        m.apply(v, _x((6, 3, 3, 2)), use_running_average=False, mutable=["batch_stats"])
    with pytest.raises(TypeError, match="floating point"):
        m.apply(v, jnp.ones((4, 3, 3, 2), jnp.int32), use_running_average=True)
    with pytest.raises(ValueError, match="ghost_batch_size"):
        N.ghost_batch_norm(x1, None, None, 0)


# ------------------------------------------------------------------------------- PowerNorm


def _pn_reference(x, mask, scale, bias, psi2, step, warmup, group_num, eps=1e-5, af=0.9):
    """Official MaskPowerNorm forward in float64 (tokens = every position; mask True = real)."""
    c = x.shape[-1]
    if group_num is not None:
        xg = x.reshape(x.shape[:-1] + (group_num, c // group_num))
        xg = xg / np.sqrt((xg**2).mean(-1, keepdims=True) + eps)
        x = xg.reshape(x.shape)
    tok = x.reshape(-1, c)[mask.reshape(-1)]
    s = (tok**2).mean(0)
    if step < warmup:
        z = x / np.sqrt(s + eps)
        psi2 = psi2 * step / (step + 1) + s / (step + 1)
    else:
        z = x / np.sqrt(psi2 + eps)
    psi2 = af * psi2 + (1 - af) * s
    return z * scale + bias, psi2, z, s


def _pn_apply(m, v, x, mask, nu):
    def f(params, x, nu):
        y, upd = m.apply(
            {**v, "params": params, N.POWER_NORM_BACKWARD_COLLECTION: {"nu": nu}},
            x,
            mask=mask,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return y, upd

    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("warm", [True, False])
def test_power_norm_forward_matches_equation(dtype, warm):
    x = _x((3, 7, 8), dtype)
    mask = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [4], [1]]))  # padding at the end
    m = N.PowerNorm(warmup_steps=10, group_num=2)
    v = _rand_params(m.init(jax.random.key(0), x, use_running_average=False))
    step = 3 if warm else 12
    psi0 = 0.5 + _np(jax.random.uniform(jax.random.key(9), (8,)))
    v["batch_stats"] = {"psi2": jnp.asarray(psi0, jnp.float32), "step": jnp.asarray(step)}
    y, upd = m.apply(v, x, mask=mask, use_running_average=False, mutable=["batch_stats"])
    sc, bi = _np(v["params"]["scale"]), _np(v["params"]["bias"])
    ref, psi_ref, _, _ = _pn_reference(_np(x), np.asarray(mask), sc, bi, psi0, step, 10, 2)
    assert y.dtype == dtype
    assert_close(y, ref, dtype=dtype)
    assert_close(upd["batch_stats"]["psi2"], psi_ref, dtype=dtype)
    assert int(upd["batch_stats"]["step"]) == step + 1
    # evaluation: running quadratic mean, no update
    ye = m.apply({**v, **upd}, x, use_running_average=True)
    xg = _np(x).reshape(3, 7, 2, 4)
    xg = (xg / np.sqrt((xg**2).mean(-1, keepdims=True) + 1e-5)).reshape(3, 7, 8)
    assert_close(ye, xg / np.sqrt(_np(upd["batch_stats"]["psi2"]) + 1e-5) * sc + bi, dtype=dtype)


def test_power_norm_padding_does_not_leak():
    x = _x((2, 6, 4))
    mask = jnp.asarray(np.arange(6)[None, :] < np.array([[6], [3]]))
    x2 = jnp.where(mask[..., None], x, 1e3 * _x((2, 6, 4), seed=5))
    m = N.PowerNorm(warmup_steps=0, group_num=None)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    nu = jnp.linspace(0.1, 0.4, 4)
    outs = []
    for xx in (x, x2):
        f = _pn_apply(m, v, xx, mask, nu)
        y, vjp, upd = jax.vjp(f, v["params"], xx, nu, has_aux=True)
        gp, gx, gnu = vjp(jnp.where(mask[..., None], _x(y.shape, seed=7), 0.0))
        outs.append((y, upd, gx, gnu))
    (y1, u1, gx1, nu1), (y2, u2, gx2, nu2) = outs
    keep = np.asarray(mask)
    assert_close(_np(y1)[keep], _np(y2)[keep], tol=1e-6)
    assert_close(u1["batch_stats"]["psi2"], u2["batch_stats"]["psi2"], tol=1e-6)
    assert_close(_np(gx1)[keep], _np(gx2)[keep], tol=1e-6)
    assert_close(nu1, nu2, tol=1e-6)


@pytest.mark.parametrize("backward_scale", ["batch", "running"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_power_norm_backward_matches_stated_formula(backward_scale, dtype):
    x = _x((2, 5, 6), dtype)
    mask = jnp.asarray(np.arange(5)[None, :] < np.array([[5], [3]]))
    m = N.PowerNorm(warmup_steps=0, group_num=None, backward_scale=backward_scale, alpha_bwd=0.8)
    v = _rand_params(m.init(jax.random.key(0), x, use_running_average=False))
    psi0 = 0.7 + _np(jax.random.uniform(jax.random.key(4), (6,)))
    v["batch_stats"] = {"psi2": jnp.asarray(psi0, jnp.float32), "step": jnp.asarray(5)}
    nu = jnp.asarray([0.3, -0.2, 0.1, 0.0, 0.5, -0.4])
    f = _pn_apply(m, v, x, mask, nu)
    y, vjp, upd = jax.vjp(f, v["params"], x, nu, has_aux=True)
    dy = _x(y.shape, dtype, seed=11)
    gp, gx, gnu = vjp(dy)
    # the stated approximate backward, in float64
    xn, dyn, sc, keep = _np(x), _np(dy), _np(v["params"]["scale"]), np.asarray(mask)
    s = (xn[keep] ** 2).mean(0)
    z = xn / np.sqrt(psi0 + 1e-5)
    g = dyn * sc
    gt = g - np.where(keep[..., None], _np(nu) * z, 0.0)
    denom = np.sqrt(s + 1e-5) if backward_scale == "batch" else np.sqrt(psi0 + 1e-5)
    dx_ref = gt / denom
    gam, lam = (z[keep] ** 2).mean(0), (g[keep] * z[keep]).mean(0)
    nu_ref = _np(nu) * (1 - 0.2 * gam) + 0.2 * lam
    assert gx.dtype == dtype
    assert_close(gx, dx_ref, dtype=dtype)
    assert_close(gnu, nu_ref, dtype=dtype)
    # scale/bias get the ordinary gradients sum(dy z), sum(dy)
    assert_close(gp["scale"], (dyn * z).sum((0, 1)), dtype=dtype)
    assert_close(gp["bias"], dyn.sum((0, 1)), dtype=dtype)


def test_power_norm_training_threads_nu_and_errors():
    x = _x((2, 4, 6))
    m = N.PowerNorm(warmup_steps=1, group_num=3)
    v = m.init(jax.random.key(0), x, use_running_average=False)
    assert float(jnp.abs(v[N.POWER_NORM_BACKWARD_COLLECTION]["nu"]).sum()) == 0.0

    def loss(params, nu, bs):
        y, upd = m.apply(
            {"params": params, "batch_stats": bs, N.POWER_NORM_BACKWARD_COLLECTION: nu},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.mean(jnp.square(y - 1.0)), upd

    params, nu, bs = v["params"], v[N.POWER_NORM_BACKWARD_COLLECTION], v["batch_stats"]
    for _ in range(3):
        (_, upd), (gp, nu) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, nu, bs)
        bs = upd["batch_stats"]
        assert all(np.all(np.isfinite(_np(a))) for a in jax.tree.leaves((gp, nu, bs)))
    assert int(bs["step"]) == 3
    assert float(jnp.abs(nu["nu"]).sum()) > 0.0
    # batch size 1, one token
    x1 = _x((1, 1, 6))
    y1, _ = m.apply(v, x1, use_running_average=False, mutable=["batch_stats"])
    assert np.all(np.isfinite(_np(y1)))
    with pytest.raises(ValueError, match="mask shape"):
        m.apply(v, x, mask=jnp.ones((2, 5), bool), use_running_average=False, mutable=True)
    with pytest.raises(ValueError, match="group_num"):
        N.PowerNorm(group_num=4).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match="backward_scale"):
        N.PowerNorm(backward_scale="psi").init(jax.random.key(0), x, use_running_average=False)


# ------------------------------------------------------------------------------- EvoNorm


@pytest.mark.parametrize("dtype", DTYPES)
def test_evonorm_b0_matches_equation_train_and_eval(dtype):
    x = _x((3, 4, 5, 6), dtype)
    m = N.EvoNormB0(momentum=0.9)
    v = _rand_params(m.init(jax.random.key(0), x, use_running_average=False))
    y, upd = m.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    xn, p = _np(x), {k: _np(a) for k, a in v["params"].items()}
    bvar = xn.var((0, 1, 2))
    ivar = xn.var((1, 2), keepdims=True)
    den = np.maximum(np.sqrt(bvar + 1e-5), p["v"] * xn + np.sqrt(ivar + 1e-5))
    assert y.dtype == dtype
    assert_close(y, xn / den * p["scale"] + p["bias"], dtype=dtype)
    rv = 0.9 * 1.0 + 0.1 * bvar
    assert_close(upd["batch_stats"]["var"], rv, dtype=dtype)
    ye = m.apply({**v, **upd}, x, use_running_average=True)
    den_e = np.maximum(np.sqrt(rv + 1e-5), p["v"] * xn + np.sqrt(ivar + 1e-5))
    assert_close(ye, xn / den_e * p["scale"] + p["bias"], dtype=dtype)
    _finite_grads(m, v, x)
    # no activation: affine only (official nonlinearity=False)
    ma = N.EvoNormB0(apply_act=False)
    va = _rand_params(ma.init(jax.random.key(0), x, use_running_average=True))
    ya = ma.apply(va, x, use_running_average=True)
    assert_close(ya, xn * _np(va["params"]["scale"]) + _np(va["params"]["bias"]), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_evonorm_s0_matches_equation(dtype):
    x = _x((2, 3, 4, 8), dtype)
    m = N.EvoNormS0(groups=4)
    v = _rand_params(m.init(jax.random.key(0), x))
    y = m.apply(v, x)
    xn, p = _np(x), {k: _np(a) for k, a in v["params"].items()}
    xg = xn.reshape(2, 3, 4, 4, 2)
    std = np.sqrt(xg.var((1, 2, 4), keepdims=True) + 1e-5)
    ref = (xg / std).reshape(xn.shape) * (1 / (1 + np.exp(-p["v"] * xn))) * p["scale"] + p["bias"]
    assert_close(y, ref, dtype=dtype)
    # sample-based: batch size 1 gives the same per-sample output
    assert_close(m.apply(v, x[:1]), _np(y)[:1], dtype=dtype)
    # group_size is the same grouping; groups=32 reduces to a divisor of C (official TF)
    assert_close(N.EvoNormS0(groups=None, group_size=2).apply(v, x), _np(y), dtype=dtype)
    x12 = _x((1, 2, 2, 12))
    v12 = N.EvoNormS0().init(jax.random.key(0), x12)
    y12 = N.EvoNormS0().apply(v12, x12)  # 32 -> 12 groups
    assert_close(y12, N.EvoNormS0(groups=12).apply(v12, x12), tol=1e-6)
    g = jax.grad(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x).astype(jnp.float32))))(
        v["params"]
    )
    assert all(np.all(np.isfinite(_np(a))) for a in jax.tree.leaves(g))


def test_evonorm_errors():
    with pytest.raises(ValueError, match="at least 3 dims"):
        N.EvoNormS0().init(jax.random.key(0), jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="group_size"):
        N.EvoNormS0(groups=None, group_size=3).init(jax.random.key(0), jnp.ones((1, 2, 2, 8)))
    with pytest.raises(ValueError, match="at least 3 dims"):
        N.EvoNormB0().init(jax.random.key(0), jnp.ones((2, 8)), use_running_average=False)


# ------------------------------------------------------------------------------- WS + BCN


@pytest.mark.parametrize("dtype", DTYPES)
def test_ws_conv_standardizes_kernel(dtype):
    x = _x((2, 5, 5, 3), dtype)
    ws = N.WSConv(4, (3, 3), dtype=dtype, ws_epsilon=1e-5)
    v = ws.init(jax.random.key(0), x)
    k = _np(v["params"]["kernel"])
    mu = k.mean((0, 1, 2))
    sd = np.sqrt(k.var((0, 1, 2)) + 1e-5)
    k_hat = (k - mu) / sd
    ref = nn.Conv(4, (3, 3), dtype=dtype).apply(
        {"params": {**v["params"], "kernel": jnp.asarray(k_hat, jnp.float32)}}, x
    )
    y = ws.apply(v, x)
    assert y.dtype == dtype
    assert_close(y, ref, dtype=dtype)
    std_k = _np(N.weight_standardize(v["params"]["kernel"]))
    np.testing.assert_allclose(std_k.mean((0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(std_k.var((0, 1, 2)), 1.0, atol=1e-3)
    # unbiased (official BCN code) divides by n - 1
    k_unb = (k - mu) / np.sqrt(k.var((0, 1, 2), ddof=1) + 1e-5)
    assert_close(N.weight_standardize(v["params"]["kernel"], unbiased=True), k_unb, tol=1e-6)
    g = jax.grad(lambda p: jnp.sum(ws.apply({"params": p}, x).astype(jnp.float32) ** 2))(
        v["params"]
    )
    assert np.all(np.isfinite(_np(g["kernel"])))
    # the gradient is orthogonal to the directions WS removes (mean and scale of each filter)
    gk = _np(g["kernel"]).reshape(-1, 4)
    np.testing.assert_allclose(gk.sum(0), 0.0, atol=1e-2 * np.abs(gk).max())


def _bcn_ref(x, mean, var, p, groups, eps=1e-5):
    y = (x - mean) / np.sqrt(var + eps) * p["bn_scale"] + p["bn_bias"]
    yg = y.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    ax = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    yg = (yg - yg.mean(ax, keepdims=True)) / np.sqrt(yg.var(ax, keepdims=True) + eps)
    yg = yg * p["scale"].reshape(groups, 1) + p["bias"].reshape(groups, 1)
    return yg.reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_channel_norm_estimate_mode(dtype):
    x = _x((2, 3, 3, 8), dtype)
    m = N.BatchChannelNorm(num_groups=4, momentum=0.7)
    v = _rand_params(m.init(jax.random.key(0), x, use_running_average=False))
    r_mean, r_var = np.linspace(-0.5, 0.5, 8), np.linspace(0.5, 2.0, 8)
    v["batch_stats"] = {
        "mean": jnp.asarray(r_mean, jnp.float32),
        "var": jnp.asarray(r_var, jnp.float32),
    }
    y, upd = m.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    p, xn = {k: _np(a) for k, a in v["params"].items()}, _np(x)
    bm = xn.mean((0, 1, 2))
    bv = ((xn - r_mean) ** 2).mean((0, 1, 2))  # around the old running mean (official EstBN)
    new_mean, new_var = 0.7 * r_mean + 0.3 * bm, 0.7 * r_var + 0.3 * bv
    assert y.dtype == dtype
    # training normalizes with the just-updated estimates, not the batch statistics
    assert_close(y, _bcn_ref(xn, new_mean, new_var, p, 4), dtype=dtype)
    assert_close(upd["batch_stats"]["mean"], new_mean, dtype=dtype)
    assert_close(upd["batch_stats"]["var"], new_var, dtype=dtype)
    # no gradient flows through the estimates: the input gradient equals the one with the
    # estimates held fixed (the eval path with the updated statistics)
    ev = {**v, **upd}
    gx_train = jax.grad(
        lambda x: jnp.sum(jnp.sin(m.apply(v, x, use_running_average=False, mutable=True)[0]))
    )(x.astype(jnp.float32))
    gx_eval = jax.grad(lambda x: jnp.sum(jnp.sin(m.apply(ev, x, use_running_average=True))))(
        x.astype(jnp.float32)
    )
    assert_close(gx_train, gx_eval, dtype=dtype)
    # micro-batch: a batch of one works and is normalized per sample by the group step
    y1, u1 = m.apply(v, x[:1], use_running_average=False, mutable=["batch_stats"])
    xs = xn[:1]
    m1 = 0.7 * r_mean + 0.3 * xs.mean((0, 1, 2))
    v1 = 0.7 * r_var + 0.3 * ((xs - r_mean) ** 2).mean((0, 1, 2))
    assert_close(y1, _bcn_ref(xs, m1, v1, p, 4), dtype=dtype)
    ye = m.apply(ev, x, use_running_average=True)
    assert_close(ye, _np(y), dtype=dtype)
    _finite_grads(m, v, x)


def test_batch_channel_norm_batch_mode_and_errors():
    x = _x((4, 3, 3, 8))
    m = N.BatchChannelNorm(num_groups=2, estimate=False, momentum=0.9)
    v = _rand_params(m.init(jax.random.key(0), x, use_running_average=False))
    y, upd = m.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    p, xn = {k: _np(a) for k, a in v["params"].items()}, _np(x)
    assert_close(y, _bcn_ref(xn, xn.mean((0, 1, 2)), xn.var((0, 1, 2)), p, 2), tol=1e-5)
    assert_close(upd["batch_stats"]["var"], 0.9 + 0.1 * xn.var((0, 1, 2)), tol=1e-5)
    with pytest.raises(ValueError, match="divide"):
        N.BatchChannelNorm(num_groups=3).init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match="at least 3 dims"):
        m.init(jax.random.key(0), jnp.ones((2, 8)), use_running_average=False)


# ------------------------------------------------------------------------------- RepBN / PRepBN


@pytest.mark.parametrize("dtype", DTYPES)
def test_repbn_equation_mask_and_fold(dtype):
    x = _x((2, 6, 8), dtype)
    mask = jnp.asarray(np.arange(6)[None, :] < np.array([[6], [2]]))
    m = N.RepBN(momentum=0.9)
    v = _rand_params(m.init(jax.random.key(0), x, use_running_average=False))
    y, upd = m.apply(v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    xn, p = _np(x), {k: _np(a) for k, a in v["params"].items()}
    tok = xn[np.asarray(mask)]
    mu, var = tok.mean(0), tok.var(0)
    ref = (xn - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"] + p["alpha"] * xn
    assert y.dtype == dtype
    assert_close(y, ref, dtype=dtype)
    assert_close(upd["batch_stats"]["mean"], 0.1 * mu, dtype=dtype)
    assert_close(upd["batch_stats"]["var"], 0.9 + 0.1 * var, dtype=dtype)
    # inference RepBN folded into the next Dense equals Dense(RepBN(x))
    ev = {**v, **upd}
    dense = nn.Dense(5)
    dv = dense.init(jax.random.key(2), x.astype(jnp.float32))
    dv = _rand_params(dv, seed=8)
    want = dense.apply(dv, m.apply(ev, x.astype(jnp.float32), use_running_average=True))
    folded = N.fold_repbn_into_dense(ev, dv["params"])
    got = dense.apply({"params": folded}, x.astype(jnp.float32))
    assert_close(got, want, tol=1e-5)
    with pytest.raises(ValueError, match="mask shape"):
        m.apply(v, x, use_running_average=False, mask=mask[:, :3], mutable=["batch_stats"])
    _finite_grads(m, v, x)


def test_prepbn_schedule_train_and_eval():
    x = _x((2, 4, 8))
    m = N.PRepBN(total_steps=4, warmup_steps=2)
    v = _rand_params(m.init(jax.random.key(0), x, use_running_average=False))
    lams = [float(N.prepbn_lambda(t, 4, 2)) for t in range(8)]
    assert lams == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    ln = nn.LayerNorm(epsilon=1e-5)
    rep = N.RepBN()
    state = v
    for t in range(7):
        y, upd = m.apply(state, x, use_running_average=False, mutable=["batch_stats"])
        y_ln = ln.apply({"params": state["params"]["ln"]}, x)
        sub = {"params": state["params"]["repbn"], "batch_stats": state["batch_stats"]["repbn"]}
        y_bn, upd_bn = rep.apply(sub, x, use_running_average=False, mutable=["batch_stats"])
        lam = lams[t]
        assert_close(y, lam * _np(y_ln) + (1 - lam) * _np(y_bn), tol=1e-5)
        if t < 2:  # pure-LN warm-up leaves the BN statistics alone
            assert_close(upd["batch_stats"]["repbn"], state["batch_stats"]["repbn"], tol=0)
        else:
            assert_close(upd["batch_stats"]["repbn"], upd_bn["batch_stats"], tol=1e-6)
        assert int(upd["batch_stats"]["step"]) == t + 1
        state = {**state, **upd}
    ye = m.apply(state, x, use_running_average=True)
    sub = {"params": state["params"]["repbn"], "batch_stats": state["batch_stats"]["repbn"]}
    assert_close(ye, rep.apply(sub, x, use_running_average=True), tol=1e-6)
    # explicit step drives lambda and leaves the counter alone
    y5, upd5 = m.apply(v, x, use_running_average=False, step=5, mutable=["batch_stats"])
    assert int(upd5["batch_stats"]["step"]) == 0
    assert np.all(np.isfinite(_np(y5)))
    with pytest.raises(ValueError, match="total_steps"):
        N.PRepBN(total_steps=0).init(jax.random.key(0), x, use_running_average=False)


def test_layernorm_is_flax():
    assert N.LayerNorm is nn.LayerNorm


def test_norm_package_reexports_each_family():
    from jaxblocks.layers.norm import batch, evonorm, repbn, weight_standardization

    assert N.GhostBatchNorm is batch.GhostBatchNorm and N.PowerNorm is batch.PowerNorm
    assert N.BatchChannelNorm is batch.BatchChannelNorm and N.EvoNormS0 is evonorm.EvoNormS0
    assert N.WSConv is weight_standardization.WSConv and N.PRepBN is repbn.PRepBN
    for name in N.__all__:
        assert getattr(N, name) is not None, name


def test_layers_import_no_optax():
    # The optimizer side of BN-only training lives in jaxblocks.train (layers are optimizer-free).
    import ast
    import pathlib

    import jaxblocks.layers

    root = pathlib.Path(jaxblocks.layers.__file__).parent
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "optax"]
    assert not bad, bad
    assert not hasattr(N, "bn_only_optimizer")
