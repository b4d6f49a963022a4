"""SS2D: cross-scan and cross-merge identities, SS2D against a per-direction computation with the
reference scan, and dtypes (Multi-Scale VMamba's MS2D: tests/blocks/test_msvmamba.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels.selective_scan.api import selective_scan
from jaxblocks.layers.ssm import (
    ALL_DIRECTIONS,
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
