"""cSE / sSE / scSE (Roy et al., arXiv 1803.02579, 1808.08127): NumPy references, modes, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.scse import (
    SCSE_MODES,
    ChannelSE,
    ChannelSpatialSE,
    SpatialSE,
    channel_se_gate,
    combine_se,
    spatial_se_gate,
)

# Non-zero random biases so the references check that the biases are used.
_RANDOM = dict(bias_init=nn.initializers.normal(0.5))
SHAPES = {"2d": (2, 5, 7, 6), "3d": (2, 3, 4, 5, 6)}  # odd, non-power-of-two sizes; C = 6


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape) + 0.2


def _init(module, x, seed=1):
    return nn.unbox(module.init(jax.random.key(seed), x))["params"]


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _np_cse(x, p):
    """The official ``ChannelSELayer[3D]`` computed in NumPy, float64, on the channels-first
    layout with torch-shaped weights (``fc.weight`` is ``[out, in]``)."""
    x = np.moveaxis(np.asarray(x, np.float64), -1, 1)  # [B, C, *S]
    b, c = x.shape[:2]
    w1, b1 = np.asarray(p["fc1_kernel"], np.float64).T, np.asarray(p["fc1_bias"], np.float64)
    w2, b2 = np.asarray(p["fc2_kernel"], np.float64).T, np.asarray(p["fc2_bias"], np.float64)
    z = x.reshape(b, c, -1).mean(axis=2)  # [B, C]
    s = _sigmoid(np.maximum(z @ w1.T + b1, 0.0) @ w2.T + b2)  # [B, C]
    out = x * s.reshape((b, c) + (1,) * (x.ndim - 2))
    return np.moveaxis(out, 1, -1)


def _np_sse(x, p):
    """The official ``SpatialSELayer[3D]`` (1×1 conv C→1, sigmoid, scale) in NumPy, float64."""
    x = np.moveaxis(np.asarray(x, np.float64), -1, 1)  # [B, C, *S]
    w = np.asarray(p["kernel"], np.float64)[:, 0]  # [C]
    q = _sigmoid(np.tensordot(x, w, axes=([1], [0])) + float(p["bias"][0]))  # [B, *S]
    return np.moveaxis(x * q[:, None], 1, -1)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("mode", SCSE_MODES)
def test_output_shapes(dim, mode):
    x = _x(SHAPES[dim])
    m = ChannelSpatialSE(mode=mode)
    y = m.apply({"params": _init(m, x)}, x)
    c_out = 2 * x.shape[-1] if mode == "concat" else x.shape[-1]
    assert y.shape == x.shape[:-1] + (c_out,) and y.dtype == x.dtype
    for mod in (ChannelSE(), SpatialSE()):
        assert mod.apply({"params": _init(mod, x)}, x).shape == x.shape


@pytest.mark.parametrize("reduction_ratio, hidden", [(2, 3), (4, 1), (1, 6)])
def test_param_shapes(reduction_ratio, hidden):
    x = _x(SHAPES["2d"])
    p = _init(ChannelSpatialSE(reduction_ratio=reduction_ratio), x)
    shapes = jax.tree.map(jnp.shape, p)
    assert shapes == {
        "cse": {
            "fc1_kernel": (6, hidden),
            "fc1_bias": (hidden,),
            "fc2_kernel": (hidden, 6),
            "fc2_bias": (6,),
        },
        "sse": {"kernel": (6, 1), "bias": (1,)},
    }
    # one set of parameters serves 2-D and 3-D inputs
    p3 = _init(ChannelSpatialSE(reduction_ratio=reduction_ratio), _x(SHAPES["3d"]))
    assert jax.tree.map(jnp.shape, p3) == shapes


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_channel_se_matches_numpy(dim):
    x = _x(SHAPES[dim])
    m = ChannelSE(reduction_ratio=2, **_RANDOM)
    p = _init(m, x)
    y = m.apply({"params": p}, x)
    np.testing.assert_allclose(np.asarray(y), _np_cse(x, p), rtol=1e-5, atol=1e-6)
    gate = channel_se_gate(x, p["fc1_kernel"], p["fc1_bias"], p["fc2_kernel"], p["fc2_bias"])
    assert gate.shape == (x.shape[0], x.shape[-1])
    assert float(jnp.std(gate)) > 1e-3  # the gates differ between channels: a real test


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_spatial_se_matches_numpy(dim):
    x = _x(SHAPES[dim])
    m = SpatialSE(**_RANDOM)
    p = _init(m, x)
    y = m.apply({"params": p}, x)
    np.testing.assert_allclose(np.asarray(y), _np_sse(x, p), rtol=1e-5, atol=1e-6)
    gate = spatial_se_gate(x, p["kernel"], p["bias"])
    assert gate.shape == x.shape[:-1] + (1,)
    assert float(jnp.std(gate)) > 1e-3


_NP_COMBINE = {
    "max": np.maximum,
    "add": np.add,
    "mul": np.multiply,
    "concat": lambda a, b: np.concatenate([a, b], axis=-1),
}


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("mode", SCSE_MODES)
def test_modes_combine_separate_cse_and_sse(dim, mode):
    x = _x(SHAPES[dim])
    m = ChannelSpatialSE(reduction_ratio=3, mode=mode, **_RANDOM)
    p = _init(m, x)
    y = np.asarray(m.apply({"params": p}, x))
    cse = ChannelSE(reduction_ratio=3).apply({"params": p["cse"]}, x)
    sse = SpatialSE().apply({"params": p["sse"]}, x)
    np.testing.assert_allclose(y, np.asarray(combine_se(cse, sse, mode)), rtol=1e-6, atol=0)
    # the rule itself, against NumPy on the NumPy branches
    expected = _NP_COMBINE[mode](_np_cse(x, p["cse"]), _np_sse(x, p["sse"]))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    if mode == "max":  # both branches win somewhere, so "max" is not secretly one branch
        c, s = np.asarray(cse), np.asarray(sse)
        assert np.any(c > s) and np.any(s > c)


def test_bad_inputs():
    x = _x(SHAPES["2d"])
    for bad in (_x((2, 7, 6)), _x((1, 2, 3, 4, 5, 6))):
        for mod in (ChannelSE(), SpatialSE(), ChannelSpatialSE()):
            with pytest.raises(ValueError, match=r"x must be .*shape \("):
                mod.init(jax.random.key(0), bad)
    with pytest.raises(ValueError, match="mode='sum' must be one of"):
        ChannelSpatialSE(mode="sum").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="mode='sum' must be one of"):
        combine_se(x, x, "sum")
    with pytest.raises(ValueError, match=r"sse has shape \(2, 5, 7, 3\)"):
        combine_se(x, x[..., :3], "add")
    # C // r < 1: C = 6, r = 7
    for mod in (ChannelSE(reduction_ratio=7), ChannelSpatialSE(reduction_ratio=7)):
        with pytest.raises(ValueError, match=r"channels // reduction_ratio = 6 // 7 = 0"):
            mod.init(jax.random.key(0), x)
    for r in (0, -2):
        with pytest.raises(ValueError, match=f"reduction_ratio={r} must be >= 1"):
            ChannelSE(reduction_ratio=r).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="reduction_ratio=2.0 must be an int"):
        ChannelSE(reduction_ratio=2.0).init(jax.random.key(0), x)


@pytest.mark.parametrize("mode", SCSE_MODES)
def test_jit_and_grad_finite(mode):
    x = _x(SHAPES["3d"])
    m = ChannelSpatialSE(mode=mode, **_RANDOM)
    p = _init(m, x)

    @jax.jit
    def loss(p, x):
        return jnp.sum(jnp.sin(m.apply({"params": p}, x)))

    np.testing.assert_allclose(loss(p, x), loss.__wrapped__(p, x), rtol=1e-5)
    gp, gx = jax.grad(loss, argnums=(0, 1))(p, x)
    for g in jax.tree.leaves((gp, gx)):
        assert np.all(np.isfinite(np.asarray(g))) and float(jnp.max(jnp.abs(g))) > 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype(dtype):
    x = _x(SHAPES["2d"])
    m = ChannelSpatialSE(dtype=dtype, **_RANDOM)
    p = _init(m, x)
    y = m.apply({"params": p}, x)
    assert y.dtype == dtype
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))  # param_dtype storage
    ref = functools.partial(ChannelSpatialSE(**_RANDOM).apply, {"params": p})(x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=5e-2, atol=5e-2)
    # bf16 input with dtype=None: computation promoted to the fp32 parameters
    yb = ChannelSpatialSE().apply({"params": p}, x.astype(jnp.bfloat16))
    assert yb.dtype == jnp.float32
