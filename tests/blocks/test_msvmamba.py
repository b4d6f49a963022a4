"""Multi-Scale VMamba blocks (arXiv 2405.14174): MultiScaleSS2D against an independent NumPy
formulation of the official ``SS2D.forward`` (``multiscale_4scan_12``: parameter set 0 for the
three half-resolution directions concatenated into one sequential scan, set 1 for the
full-resolution row-major scan, torch's bilinear rule), the official parameter layout and
count, ConvFFN against its equation, the VSS block's residual form, dtypes, drop path and bad
inputs. The whole model against a torch rebuild of the official VSSM is in
tests/models/test_msvmamba.py."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.msvmamba import ConvFFN, MSVMambaBlock, MultiScaleSS2D, upsample_bilinear

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def _x(shape=(2, 6, 5, 16), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _perturbed(variables, seed=1):
    """Initial variables with every leaf moved by noise, so no init symmetry hides a bug."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )


# --------------------------------------------------------------------- NumPy oracle (official)


def _np_ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dwconv(x, p, stride):
    """torch Conv2d(groups=C, padding=(k-1)//2, stride) in NHWC; kernel [k, k, 1, C]."""
    k = p["kernel"].shape[0]
    pad = (k - 1) // 2
    B, H, W, C = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    out = np.zeros((B, Ho, Wo, C))
    for i in range(k):
        for j in range(k):
            out += (
                xp[:, i : i + stride * Ho : stride, j : j + stride * Wo : stride]
                * p["kernel"][i, j, 0]
            )
    return out + p["bias"]


def _np_scan(u, xw, dtw, dtb, A_log, Dskip):
    """Sequential selective scan of one parameter set over ``u [B, L, D]`` (Mamba's S6)."""
    R, N = dtw.shape[1], A_log.shape[1]
    x_dbl = u @ xw.T  # [B, L, R + 2N]
    dt, Bm, Cm = x_dbl[..., :R], x_dbl[..., R : R + N], x_dbl[..., R + N :]
    delta = np.log1p(np.exp(dt @ dtw.T + dtb))  # softplus, [B, L, D]
    A = -np.exp(A_log)  # [D, N]
    h = np.zeros((u.shape[0], u.shape[2], N))
    ys = []
    for t in range(u.shape[1]):
        h = (
            np.exp(delta[:, t, :, None] * A) * h
            + (delta[:, t] * u[:, t])[..., None] * Bm[:, t, None]
        )
        ys.append((h * Cm[:, t, None]).sum(-1) + Dskip * u[:, t])
    return np.stack(ys, 1)


def _np_interp_bilinear(y, H, W):
    """torch F.interpolate(mode="bilinear", align_corners=False), written per output pixel."""
    B, h, w, C = y.shape
    out = np.zeros((B, H, W, C))
    for i in range(H):
        si = max((i + 0.5) * h / H - 0.5, 0.0)
        i0 = min(int(np.floor(si)), h - 1)
        i1, ai = min(i0 + 1, h - 1), si - i0
        for j in range(W):
            sj = max((j + 0.5) * w / W - 0.5, 0.0)
            j0 = min(int(np.floor(sj)), w - 1)
            j1, aj = min(j0 + 1, w - 1), sj - j0
            out[:, i, j] = ((1 - ai) * (1 - aj) * y[:, i0, j0] + (1 - ai) * aj * y[:, i0, j1]
                            + ai * (1 - aj) * y[:, i1, j0] + ai * aj * y[:, i1, j1])  # fmt: skip
    return out


def numpy_ms2d(x, p, scan=_np_scan):
    """The official multi-scale SS2D forward, re-expressed in NumPy (float64)."""
    silu = lambda a: a / (1 + np.exp(-a))
    B, H, W, C = x.shape
    D = p["out_norm"]["scale"].shape[0]
    xz = x @ p["in_proj"]["kernel"]
    xi, z = xz[..., :D], silu(xz[..., D:])
    x0 = silu(_np_dwconv(xi, p["conv2d"], 1))
    x1 = silu(_np_dwconv(xi, p["conv2d_b1"], 2))
    h, w = x1.shape[1:3]
    sets = [
        (p["x_proj_weight"][k], p["dt_projs_weight"][k], p["dt_projs_bias"][k],
         p["A_logs"][k * D : (k + 1) * D], p["Ds"][k * D : (k + 1) * D])
        for k in (0, 1)
    ]  # fmt: skip
    # low resolution: [row-major reversed | column-major | column-major reversed], one scan
    hori_r = x1.reshape(B, h * w, D)[:, ::-1]
    vert = x1.transpose(0, 2, 1, 3).reshape(B, w * h, D)
    vert_r = vert[:, ::-1]
    y1 = _np_ln(scan(np.concatenate([hori_r, vert, vert_r], 1), *sets[0]), p["out_norm"])
    L = h * w
    y1 = (
        y1[:, :L][:, ::-1].reshape(B, h, w, D)
        + y1[:, L : 2 * L].reshape(B, w, h, D).transpose(0, 2, 1, 3)
        + y1[:, 2 * L :][:, ::-1].reshape(B, w, h, D).transpose(0, 2, 1, 3)
    )
    y0 = _np_ln(scan(x0.reshape(B, H * W, D), *sets[1]), p["out_norm"]).reshape(B, H, W, D)
    y = y0 + _np_interp_bilinear(y1, H, W)
    if "se" in p:
        s = np.maximum(y.mean((1, 2)) @ p["se"]["fc1"]["kernel"], 0) @ p["se"]["fc2"]["kernel"]
        y = y / (1 + np.exp(-s))[:, None, None]
    y = y * z
    return y @ p["out_proj"]["kernel"]


@pytest.mark.parametrize("implementation", ["reference", None])
def test_ms2d_matches_numpy_official_forward(implementation):
    x = _x((2, 5, 7, 8), seed=3)  # odd H, W: low-res 3×4, upsampled 3→5, 4→7
    op = MultiScaleSS2D(d_state=2, implementation=implementation)
    v = _perturbed(nn.unbox(jit(op.init)(jax.random.key(0), x)))
    got = np.asarray(jit(op.apply)(v, x))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    want = numpy_ms2d(np.asarray(x, np.float64), p)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_low_res_scan_runs_on_across_the_joins():
    """The three half-resolution directions are one sequence: the oracle with the state reset
    at each join (three separate scans sharing set 0) gives a different output."""
    x = _x((1, 4, 4, 8), seed=5)
    op = MultiScaleSS2D(d_state=2, se_reduction=None)
    v = _perturbed(nn.unbox(jit(op.init)(jax.random.key(0), x)))
    got = np.asarray(jit(op.apply)(v, x))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    assert "se" not in p
    np.testing.assert_allclose(got, numpy_ms2d(np.asarray(x, np.float64), p), rtol=2e-4,
                               atol=2e-5)  # fmt: skip

    def reset_at_joins(u, *args):  # low-res sequence (3 × 2·2 tokens): three separate scans
        if u.shape[1] != 12:
            return _np_scan(u, *args)
        return np.concatenate([_np_scan(c, *args) for c in np.split(u, 3, axis=1)], 1)

    reset = numpy_ms2d(np.asarray(x, np.float64), p, scan=reset_at_joins)
    assert np.max(np.abs(reset - got)) > 1e-3


def test_upsample_bilinear_matches_torch_rule():
    y = np.asarray(_x((2, 3, 4, 5), seed=7), np.float64)
    for H, W in [(5, 7)]:  # ceil(H/2) -> H for odd H: not an exact 2x
        np.testing.assert_allclose(
            upsample_bilinear(jnp.asarray(y, jnp.float32), H, W),
            _np_interp_bilinear(y, H, W),
            rtol=1e-5,
            atol=1e-6,
        )


def test_convffn_matches_its_equation():
    x = _x((1, 4, 4, 8))
    ffn = ConvFFN()
    v = nn.unbox(jit(ffn.init)(jax.random.key(0), x))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    want = numpy_convffn(np.asarray(x, np.float64), p)
    np.testing.assert_allclose(jit(ffn.apply)(v, x), want, rtol=1e-4, atol=1e-5)
    # torch's default init: U(±1/√fan_in) for weights and biases
    assert (
        np.abs(p["linear1"]["bias"]).max() <= 8**-0.5 and np.abs(p["dwc"]["kernel"]).max() <= 1 / 3
    )
    assert np.abs(p["linear1"]["bias"]).max() > 0


def test_nano_block_official_layout_and_count():
    C = 48
    block = MSVMambaBlock.nano(implementation="reference")
    x = _x((1, 8, 8, C))
    v = nn.unbox(jax.eval_shape(block.init, jax.random.key(0), x))
    p = v["params"]
    d, R, N, K = 2 * C, 3, 1, 2  # d_inner, ceil(C/16), d_state, 1 + ms_split[0]
    assert set(p) == {"norm", "op", "norm2", "ffn"}
    op = p["op"]
    assert set(op) == {"in_proj", "conv2d", "conv2d_b1", "x_proj_weight", "dt_projs_weight",
                       "dt_projs_bias", "A_logs", "Ds", "out_norm", "se", "out_proj"}  # fmt: skip
    shapes = {k: op[k].shape for k in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias",
                                       "A_logs", "Ds")}  # fmt: skip
    assert shapes == {"x_proj_weight": (K, R + 2 * N, d), "dt_projs_weight": (K, d, R),
                      "dt_projs_bias": (K, d), "A_logs": (K * d, N), "Ds": (K * d,)}  # fmt: skip
    assert op["conv2d_b1"]["kernel"].shape == (7, 7, 1, d)
    # numel of the official layers.0.blocks.0 of vssm_nano_224_ms (counted with torch)
    assert _count(p) == 34_704


def test_block_init_follows_the_official_recipe():
    C = 16
    block = MSVMambaBlock.nano()
    v = nn.unbox(jit(block.init)(jax.random.key(0), _x((1, 6, 6, C))))
    op = jax.tree.map(np.asarray, v["params"]["op"])
    d = 2 * C
    np.testing.assert_array_equal(op["Ds"], np.ones(2 * d))
    np.testing.assert_array_equal(op["A_logs"], np.zeros((2 * d, 1)))  # log(1), d_state 1
    dt = np.log1p(np.exp(op["dt_projs_bias"]))  # softplus: Δ in [1e-3, 0.1]
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert np.abs(op["x_proj_weight"]).max() <= d**-0.5  # torch Linear default U(±1/√D)
    assert np.abs(op["dt_projs_weight"]).max() <= 1.0  # U(±R^-½), R = 1
    assert 0.015 < op["in_proj"]["kernel"].std() < 0.025  # normal(0.02)
    assert np.abs(op["conv2d"]["bias"]).max() > 0  # torch default conv bias, not zeros


def numpy_convffn(x, p):
    h = x @ p["linear1"]["kernel"] + p["linear1"]["bias"]
    g = h + _np_dwconv(h, p["dwc"], 1)
    gelu = 0.5 * g * (1 + np.vectorize(math.erf)(g / np.sqrt(2)))
    return gelu @ p["linear2"]["kernel"] + p["linear2"]["bias"]


def test_block_matches_numpy_official_forward():
    """``x + MS2D(LN(x))`` then ``+ ConvFFN(LN(·))`` (the official VSSBlock, drop path off)."""
    x = _x((1, 5, 4, 8))
    block = MSVMambaBlock.nano()
    v = _perturbed(nn.unbox(jit(block.init)(jax.random.key(0), x)))
    y = jit(block.apply)(v, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    h = np.asarray(x, np.float64)
    h = h + numpy_ms2d(_np_ln(h, p["norm"]), p["op"])
    want = h + numpy_convffn(_np_ln(h, p["norm2"]), p["ffn"])
    np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)


def test_block_bf16_ss2d_variant_and_drop_path():
    x = _x((2, 4, 3, 8))
    block = MSVMambaBlock(d_state=2, multiscale=False, drop_path=0.5, dtype=jnp.bfloat16)
    v = jit(block.init)(jax.random.key(0), x)
    y = jit(block.apply)(v, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert "se" not in nn.unbox(v)["params"]["op"]
    f = jit(lambda v, x, k: block.apply(v, x, train=True, rngs={"dropout": k}))
    y_tr = f(v, x, jax.random.key(3))
    assert y_tr.shape == x.shape and np.all(np.isfinite(np.asarray(y_tr, np.float32)))
    assert not np.allclose(np.asarray(y_tr, np.float32), np.asarray(y, np.float32))


def test_bad_inputs_are_value_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"MultiScaleSS2D: x must be NHWC.*\(2, 16, 8\)"):
        MultiScaleSS2D().init(key, jnp.ones((2, 16, 8)))
    with pytest.raises(ValueError, match=r"MultiScaleSS2D: x must be NHWC.*\(2, 4, 0, 8\)"):
        MultiScaleSS2D().init(key, jnp.ones((2, 4, 0, 8)))
    with pytest.raises(ValueError, match="MultiScaleSS2D: x must be floating point.*int32"):
        MultiScaleSS2D().init(key, jnp.ones((1, 4, 4, 8), jnp.int32))
    with pytest.raises(ValueError, match="d_state must be >= 1.*d_state=0"):
        MultiScaleSS2D(d_state=0).init(key, jnp.ones((1, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"MSVMambaBlock: x must be NHWC.*\(4, 8\)"):
        MSVMambaBlock().init(key, jnp.ones((4, 8)))
