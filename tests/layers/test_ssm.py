"""SS2D / MS2D: cross-scan and cross-merge identities, SS2D against a per-direction computation
with the reference scan, MS2D's structure (shapes, upsampling, branches) and dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels.selective_scan.api import selective_scan
from jaxblocks.layers.ssm import (
    ALL_DIRECTIONS,
    MS2D,
    SS2D,
    cross_merge,
    cross_scan,
    ss2d_scan,
)
from tests.kernels.harness import assert_close


def _map(shape=(2, 3, 5, 4), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def test_cross_scan_orders():
    x = jnp.arange(2 * 3).reshape(1, 2, 3, 1).astype(jnp.float32)  # [[0 1 2], [3 4 5]]
    xs = np.asarray(cross_scan(x))[0, :, 0]
    np.testing.assert_array_equal(xs[0], [0, 1, 2, 3, 4, 5])  # row-major
    np.testing.assert_array_equal(xs[1], [0, 3, 1, 4, 2, 5])  # column-major
    np.testing.assert_array_equal(xs[2], [5, 4, 3, 2, 1, 0])
    np.testing.assert_array_equal(xs[3], [5, 2, 4, 1, 3, 0])


def test_cross_merge_inverts_each_direction_and_is_the_transpose():
    x = _map()
    B, H, W, C = x.shape
    xs = jax.jit(cross_scan)(x)
    np.testing.assert_allclose(cross_merge(xs, H, W), 4 * x, rtol=1e-6)
    for d in ALL_DIRECTIONS:
        np.testing.assert_array_equal(cross_merge(cross_scan(x, (d,)), H, W, (d,)), x)
    ys = jax.random.normal(jax.random.key(1), xs.shape)
    (merge_t,) = jax.linear_transpose(lambda t: cross_merge(t, H, W), ys)(x)
    np.testing.assert_allclose(merge_t, xs, rtol=1e-6)
    # <scan(x), ys> = <x, merge(ys)>
    np.testing.assert_allclose(jnp.vdot(xs, ys), jnp.vdot(x, cross_merge(ys, H, W)), rtol=1e-5)
    with pytest.raises(ValueError, match="K=4 and L=H·W=15"):
        cross_merge(ys[:, :3], H, W)


def _direct_ss2d(x, params, directions):
    """Each direction on its own: explicit index permutation, reference scan, un-permute, sum."""
    x_proj, dt_w, dt_b, A_logs, Ds = params
    B, H, W, D = x.shape
    idx = np.arange(H * W).reshape(H, W)
    orders = {0: idx.ravel(), 1: idx.T.ravel(), 2: idx.ravel()[::-1], 3: idx.T.ravel()[::-1]}
    R, N = dt_w.shape[-1], A_logs.shape[-1]
    out = jnp.zeros((B, H * W, D))
    flat = x.reshape(B, H * W, D)
    for k, d in enumerate(directions):
        order = orders[d]
        u = jnp.swapaxes(flat[:, order], 1, 2)  # [B, D, L]
        dbl = jnp.einsum("cd,bdl->bcl", x_proj[k], u)
        dt = jnp.einsum("dr,brl->bdl", dt_w[k], dbl[:, :R])
        rows = slice(k * D, (k + 1) * D)
        y = selective_scan(
            u,
            dt,
            -jnp.exp(A_logs[rows]),
            dbl[:, R : R + N],
            dbl[:, R + N :],
            Ds[rows],
            delta_bias=dt_b[k],
            delta_softplus=True,
            implementation="reference",
        )
        out = out.at[:, order].add(jnp.swapaxes(y, 1, 2))
    return out.reshape(B, H, W, D)


def test_ss2d_scan_matches_direct_per_direction_computation():
    layer = SS2D(d_state=3, ssm_ratio=1.0, implementation="reference")
    x = _map((2, 3, 4, 8), seed=2)
    variables = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x))
    params = tuple(
        variables["params"]["_ScanParams_0"][n]
        for n in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")
    )
    u = _map((2, 3, 4, 8), seed=3)
    B, H, W, D = u.shape
    fn = lambda u, p: cross_merge(ss2d_scan(cross_scan(u), *p, implementation="xla"), H, W)
    got = jax.jit(fn)(u, params)
    want = _direct_ss2d(u, params, ALL_DIRECTIONS)
    assert_close(got, want, tol=1e-5)


@pytest.mark.slow
def test_ss2d_layer_shapes_dtype_and_gradients():
    x = _map((2, 5, 6, 16))
    layer = SS2D(d_state=4, dtype=jnp.bfloat16, implementation="reference")
    variables = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x))
    y = jax.jit(layer.apply)(variables, x)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    p = variables["params"]["_ScanParams_0"]
    assert p["x_proj_weight"].shape == (4, 1 + 2 * 4, 32)  # dt_rank ceil(16/16)
    assert p["A_logs"].shape == (4 * 32, 4)
    loss = lambda v: jnp.sum(layer.apply(v, x).astype(jnp.float32) ** 2)
    g = jax.jit(jax.grad(loss))(variables)
    assert all(np.all(np.isfinite(np.asarray(l, np.float32))) for l in jax.tree.leaves(g))


@pytest.mark.parametrize("hw", [(7, 5)])
def test_ms2d_shapes_and_branches(hw):
    H, W = hw
    x = _map((2, H, W, 8), seed=4)
    layer = MS2D(d_state=1, implementation="reference")
    variables = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x))
    apply = jax.jit(layer.apply)
    y = apply(variables, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    p = variables["params"]
    assert p["conv2d_b1"]["kernel"].shape == (7, 7, 1, 16)  # depthwise 7×7 on d_inner
    assert p["_ScanParams_0"]["Ds"].shape == (4 * 16,)  # 1 full-res + 3 low-res scans
    assert "se" in p
    # the low-resolution branch matters: perturbing its conv changes the output
    p2 = jax.tree.map(lambda a: a, variables)
    p2["params"]["conv2d_b1"]["kernel"] = 2.0 * p["conv2d_b1"]["kernel"]
    assert float(jnp.max(jnp.abs(apply(p2, x) - y))) > 1e-4


def test_ms2d_low_res_branch_is_upsampled_bilinearly():
    """jax.image.resize 'bilinear' (half-pixel centres) equals torch's align_corners=False x2."""
    y1 = _map((1, 3, 4, 2), seed=5)
    up = jax.image.resize(y1, (1, 6, 8, 2), "bilinear")
    a = np.asarray(y1)[0, :, :, 0]

    def torch_like(i, n_in):  # align_corners=False source index and weights, clamped at 0
        s = max((i + 0.5) / 2 - 0.5, 0.0)
        i0 = int(np.floor(s))
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    want = np.zeros((6, 8))
    for i in range(6):
        r0, r1, fr = torch_like(i, 3)
        for j in range(8):
            c0, c1, fc = torch_like(j, 4)
            top = a[r0, c0] * (1 - fc) + a[r0, c1] * fc
            bot = a[r1, c0] * (1 - fc) + a[r1, c1] * fc
            want[i, j] = top * (1 - fr) + bot * fr
    np.testing.assert_allclose(np.asarray(up)[0, :, :, 0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ms2d_bf16_and_no_se():
    x = _map((1, 6, 6, 8), seed=6)
    layer = MS2D(d_state=2, se_reduction=None, dtype=jnp.bfloat16, implementation="reference")
    variables = jax.jit(layer.init)(jax.random.key(1), x)
    y = jax.jit(layer.apply)(variables, x)
    assert y.dtype == jnp.bfloat16 and "se" not in variables["params"]
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
