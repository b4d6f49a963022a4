"""UniRepLKNet blocks (arXiv 2311.15599): branch tables, GRN, SE, the Dilated Reparam Block, the
UniRepLKNet block against a functional reference, re-parameterisation, the 1-D use, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxblocks.blocks.unireplknet import (
    DILATED_REPARAM_BRANCHES,
    GRN,
    DilatedReparamBlock,
    SEBlock,
    UniRepLKNetBlock,
    dilate_kernel,
    dilated_reparam_branches,
    global_response_norm,
    merge_dilated_branches,
    pad_kernel_to,
    reparameterize,
    reparameterize_block,
)

# Correctness checks on tiny inputs: unoptimised XLA compiles several times faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
HI = lax.Precision.HIGHEST
EPS = 1e-5

# Transcribed from the official DilatedReparamBlock.__init__ (kernel_sizes, dilates) lists.
OFFICIAL_TABLE = {
    17: ([5, 9, 3, 3, 3], [1, 2, 4, 5, 7]),
    15: ([5, 7, 3, 3, 3], [1, 2, 3, 5, 7]),
    13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]),
    11: ([5, 5, 3, 3, 3], [1, 2, 3, 4, 5]),
    9: ([5, 5, 3, 3], [1, 2, 3, 4]),
    7: ([5, 3, 3], [1, 2, 3]),
    5: ([3, 3], [1, 2]),
}


def _rand(seed: int, shape, scale: float = 1.0) -> jax.Array:
    # NumPy draws: eager jax.random would compile once per shape.
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _random_variables(module, x, seed: int, **kwargs):
    """Random variables of ``module`` (shapes from `jax.eval_shape`, nothing compiled): params
    ~ N(0, 0.3^2) (BatchNorm scales around 1), running means ~ N(0, 0.5^2), running variances
    ~ U[0.3, 2], so every fold and every branch is exercised."""
    init = functools.partial(module.init, **kwargs)
    shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0), x))
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, a in flat:
        collection, name = path[0].key, path[-1].key
        if collection == "batch_stats" and name == "var":
            value = rng.uniform(0.3, 2.0, a.shape)
        elif collection == "batch_stats":
            value = 0.5 * rng.standard_normal(a.shape)
        else:
            value = (1.0 if name == "scale" else 0.0) + 0.3 * rng.standard_normal(a.shape)
        leaves.append(jnp.asarray(value, jnp.float32))
    return jax.tree.unflatten(treedef, leaves)


def _c(v, ndim: int):
    """A [C] vector shaped to broadcast over the last axis (rank promotion is strict)."""
    return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


def _dwconv(x, kernel, rate: int = 1):
    """Reference depthwise conv: lax.conv_general_dilated with rhs_dilation, 'same' padding."""
    d = x.ndim - 2
    pad = [(rate * (k - 1) // 2,) * 2 for k in kernel.shape[:d]]
    dn = ("NHWC", "HWIO", "NHWC") if d == 2 else ("NWC", "WIO", "NWC")
    return lax.conv_general_dilated(
        x, kernel, (1,) * d, pad, rhs_dilation=(rate,) * d, dimension_numbers=dn,
        feature_group_count=x.shape[-1], precision=HI,
    )  # fmt: skip


def _bn(y, p, s):
    return (y - _c(s["mean"], y.ndim)) / jnp.sqrt(_c(s["var"], y.ndim) + EPS) * _c(
        p["scale"], y.ndim
    ) + _c(p["bias"], y.ndim)


def _grn_np(x, gamma, beta):
    """ConvNeXt-V2 / UniRepLKNet GRNwithNHWC in float64 NumPy."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim - 1))
    g = np.sqrt(np.sum(x**2, axis=axes, keepdims=True))
    n = g / (np.mean(g, axis=-1, keepdims=True) + 1e-6)
    return (np.asarray(gamma, np.float64) * n + 1.0) * x + np.asarray(beta, np.float64)


def _dilated_sum(v, x, kernel_size: int):
    """BN(DW_k(x)) + sum_i BN(DW_{k_i, r_i}(x)) with running statistics."""
    p, s = v["params"], v["batch_stats"]
    out = _bn(_dwconv(x, p["lk_origin"]["kernel"]), p["origin_bn"], s["origin_bn"])
    for k, r in zip(*OFFICIAL_TABLE[kernel_size], strict=True):
        conv, bn = f"dil_conv_k{k}_{r}", f"dil_bn_k{k}_{r}"
        out = out + _bn(_dwconv(x, p[conv]["kernel"], r), p[bn], s[bn])
    return out


_dilated_reference = jit(_dilated_sum, static_argnums=2)


@functools.partial(jit, static_argnums=2)
def _block_reference(v, x, kernel_size: int):
    """The official UniRepLKNetBlock.forward in eval mode, written out functionally."""
    p, s = v["params"], v["batch_stats"]
    nd = x.ndim
    if kernel_size >= 7:
        y = _dilated_sum({"params": p["dwconv"], "batch_stats": s["dwconv"]}, x, kernel_size)
    elif kernel_size > 0:
        y = _dwconv(x, p["dwconv"]["kernel"])
    else:
        y = x
    if kernel_size > 0:
        y = _bn(y, p["norm"], s["norm"])
    pooled = jnp.mean(y, axis=tuple(range(1, nd - 1)))  # SE: [B, C]
    h = jax.nn.relu(jnp.dot(pooled, p["se"]["down"]["kernel"], precision=HI)
                    + _c(p["se"]["down"]["bias"], 2))  # fmt: skip
    gate = jax.nn.sigmoid(jnp.dot(h, p["se"]["up"]["kernel"], precision=HI)
                          + _c(p["se"]["up"]["bias"], 2))  # fmt: skip
    y = y * jnp.reshape(gate, (x.shape[0],) + (1,) * (nd - 2) + (-1,))
    h = jnp.dot(y, p["pwconv1"]["kernel"], precision=HI) + _c(p["pwconv1"]["bias"], nd)
    h = 0.5 * h * (1.0 + jax.scipy.special.erf(h / np.sqrt(2.0)))  # exact GELU
    h = global_response_norm(h, p["grn"]["gamma"], p["grn"]["beta"])  # checked vs NumPy
    y = _bn(jnp.dot(h, p["pwconv2"]["kernel"], precision=HI), p["pwconv2_bn"], s["pwconv2_bn"])
    return x + _c(p["gamma"], nd) * y


def _close(a, b, tol: float = 1e-5, what: str = ""):
    """max |a - b| <= tol * max(1, max |b|): fp32 sums of many terms, reassociated."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err, ref = np.max(np.abs(a - b)), max(1.0, float(np.max(np.abs(b))))
    assert err <= tol * ref, f"{what}: max |diff| {err:.3g} > {tol} * {ref:.3g}"


# ----------------------------------------------------------------------------- tables


def test_branch_table_is_the_official_one():
    assert sorted(DILATED_REPARAM_BRANCHES) == sorted(OFFICIAL_TABLE)
    for k, (sizes, rates) in OFFICIAL_TABLE.items():
        assert dilated_reparam_branches(k) == tuple(zip(sizes, rates, strict=True))
        for k_i, r in dilated_reparam_branches(k):
            e = r * (k_i - 1) + 1
            assert e <= k and e % 2 == 1, (k, k_i, r)


@pytest.mark.parametrize("k", [3, 4, 19, 21, 31])
def test_unsupported_kernel_names_the_supported_ones(k):
    with pytest.raises(ValueError, match=rf"kernel_size={k}.*\[5, 7, 9, 11, 13, 15, 17\]"):
        dilated_reparam_branches(k)
    with pytest.raises(ValueError, match=rf"kernel_size={k}.*\[5, 7, 9, 11, 13, 15, 17\]"):
        DilatedReparamBlock(kernel_size=k).init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))


# ----------------------------------------------------------------------------- GRN, SE


@pytest.mark.parametrize("shape", [(2, 5, 7, 12), (3, 11, 8)])
def test_grn_matches_numpy(shape):
    x = _rand(0, shape, 2.0)
    gamma, beta = _rand(1, shape[-1:]), _rand(2, shape[-1:])
    want = _grn_np(x, gamma, beta)
    np.testing.assert_allclose(global_response_norm(x, gamma, beta), want, rtol=1e-5, atol=1e-5)
    module = GRN()
    v = jit(module.init)(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, nn.unbox(v))["params"] == {"gamma": shape[-1:],
                                                            "beta": shape[-1:]}  # fmt: skip
    apply = jit(module.apply)
    np.testing.assert_array_equal(apply(v, x), x)  # zero init: identity
    y = apply({"params": {"gamma": gamma, "beta": beta}}, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    no_bias = jit(GRN(use_bias=False).apply)({"params": {"gamma": gamma}}, x)
    np.testing.assert_allclose(no_bias, _grn_np(x, gamma, 0.0), rtol=1e-5, atol=1e-5)
    assert global_response_norm(x.astype(jnp.bfloat16), gamma, beta).dtype == jnp.bfloat16


def test_se_block_has_biases_and_quarter_width():
    x = _rand(0, (2, 5, 6, 16))
    se = SEBlock()
    v = _random_variables(se, x, 1)
    shapes = jax.tree.map(jnp.shape, v["params"])
    assert shapes == {"down": {"kernel": (16, 4), "bias": (4,)},
                      "up": {"kernel": (4, 16), "bias": (16,)}}  # fmt: skip
    p = v["params"]
    pooled = jnp.mean(x, axis=(1, 2))
    h = jax.nn.relu(pooled @ p["down"]["kernel"] + _c(p["down"]["bias"], 2))
    gate = jax.nn.sigmoid(h @ p["up"]["kernel"] + _c(p["up"]["bias"], 2))
    np.testing.assert_allclose(
        jit(se.apply)(v, x), x * gate[:, None, None, :], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"SEBlock: 3 channels.*C >= 4"):
        se.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("rate", [1, 2, 3])
def test_dilate_kernel_equals_transposed_conv_with_stride_rate(rate):
    kernel = _rand(0, (3, 5, 1, 6))  # non-square, depthwise HWIO
    # The official way: conv_transpose2d(kernel, 1x1 identity, stride=rate) per channel.
    as_images = jnp.transpose(kernel[:, :, 0, :], (2, 0, 1))[..., None]  # [C, kh, kw, 1]
    want = lax.conv_transpose(
        as_images, jnp.ones((1, 1, 1, 1)), (rate, rate), ((0, 0), (0, 0)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    want = jnp.transpose(want[..., 0], (1, 2, 0))[:, :, None, :]
    got = dilate_kernel(kernel, rate)
    assert got.shape == (2 * rate + 1, 4 * rate + 1, 1, 6)
    np.testing.assert_array_equal(got, want)
    padded = pad_kernel_to(dilate_kernel(_rand(1, (3, 3, 1, 2)), rate), 13)
    assert padded.shape == (13, 13, 1, 2)
    with pytest.raises(ValueError, match="cannot be centred in size 5"):
        pad_kernel_to(_rand(1, (7, 7, 1, 2)), 5)


@pytest.mark.parametrize("kernel_size", [7, 13, 17])
def test_merge_dilated_branches_equals_direct_dilated_convs(kernel_size):
    x = _rand(0, (2, 19, 17, 8))  # not square, larger than the kernel
    block = DilatedReparamBlock(kernel_size=kernel_size)
    v = _random_variables(block, x, 3)
    p, s = v["params"], v["batch_stats"]
    kernel, bias = merge_dilated_branches(v)
    assert kernel.shape == (kernel_size, kernel_size, 1, 8) and bias.shape == (8,)

    # Each branch alone: its dilated, padded, BN-fused kernel equals the dilated conv + BN.
    @jit
    def branches(p, s, x):
        pairs = []
        for k, r in zip(*OFFICIAL_TABLE[kernel_size], strict=True):
            conv, bn = f"dil_conv_k{k}_{r}", f"dil_bn_k{k}_{r}"
            one = {"params": {"lk_origin": {"kernel": jnp.zeros_like(p["lk_origin"]["kernel"])},
                              "origin_bn": p["origin_bn"], conv: p[conv], bn: p[bn]},
                   "batch_stats": {"origin_bn": {"mean": jnp.zeros(8), "var": jnp.ones(8) - EPS},
                                   bn: s[bn]}}  # fmt: skip
            k1, b1 = merge_dilated_branches(one)
            b1 = b1 - p["origin_bn"]["bias"]  # the zero large kernel's BN adds only its bias
            want = _bn(_dwconv(x, p[conv]["kernel"], r), p[bn], s[bn])
            pairs.append((_dwconv(x, k1) + _c(b1, 4), want))
        return pairs

    for (k, r), (got, want) in zip(
        zip(*OFFICIAL_TABLE[kernel_size], strict=True), branches(p, s, x), strict=True
    ):
        _close(got, want, what=f"branch k{k} r{r}")
    want = _dilated_reference(v, x, kernel_size)
    _close(jit(_dwconv)(x, kernel) + _c(bias, 4), want, what="merged")
    # The module in eval and in deploy form agree with the same reference.
    _close(jit(block.apply)(v, x), want, what="train form, eval")
    deploy = DilatedReparamBlock(kernel_size=kernel_size, deploy=True)
    dv = {"params": {"lk_origin": {"kernel": kernel, "bias": bias}}}
    _close(jit(deploy.apply)(dv, x), want, what="deploy form")
    assert jax.tree.structure(reparameterize(v)) == jax.tree.structure(dv)
    with pytest.raises(ValueError, match="already in deploy form"):
        merge_dilated_branches(dv)


# ----------------------------------------------------------------------------- the block


def test_block_layout_matches_the_official_one():
    x = _rand(0, (1, 8, 8, 16))

    def shapes_of(block):
        return jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(block.init, jax.random.key(0), x)))

    shapes = shapes_of(UniRepLKNetBlock(kernel_size=13))["params"]
    assert set(shapes) == {"dwconv", "norm", "se", "pwconv1", "grn", "pwconv2", "pwconv2_bn",
                           "gamma"}  # fmt: skip
    assert shapes["dwconv"]["lk_origin"] == {"kernel": (13, 13, 1, 16)}  # no bias
    assert shapes["dwconv"]["dil_conv_k7_2"] == {"kernel": (7, 7, 1, 16)}
    assert shapes["pwconv1"] == {"kernel": (16, 64), "bias": (64,)}
    assert shapes["pwconv2"] == {"kernel": (64, 16)}  # no bias: BN follows
    assert shapes["grn"] == {"gamma": (64,), "beta": (64,)}
    assert shapes_of(UniRepLKNetBlock(kernel_size=3))["params"]["dwconv"] == {
        "kernel": (3, 3, 1, 16)
    }
    none = shapes_of(UniRepLKNetBlock(kernel_size=0))["params"]
    assert "dwconv" not in none and "norm" not in none
    fast = shapes_of(UniRepLKNetBlock(kernel_size=13, deploy=True))
    assert "batch_stats" not in fast
    shapes = fast["params"]
    assert shapes["dwconv"] == {"lk_origin": {"kernel": (13, 13, 1, 16), "bias": (16,)}}
    assert shapes["grn"] == {"gamma": (64,)}
    assert shapes["pwconv2"] == {"kernel": (64, 16), "bias": (16,)}
    assert "gamma" not in shapes and "norm" not in shapes
    # Initial values: layer scale 1e-6, GRN zeros (identity), no biases in the convs.
    v = nn.unbox(jit(UniRepLKNetBlock(kernel_size=0).init)(jax.random.key(0), x))["params"]
    np.testing.assert_array_equal(v["gamma"], np.full(16, 1e-6, np.float32))
    np.testing.assert_array_equal(v["grn"]["gamma"], np.zeros(64, np.float32))
    np.testing.assert_array_equal(v["grn"]["beta"], np.zeros(64, np.float32))


@pytest.mark.parametrize("kernel_size", [0, 3, 5, 11, 13])
def test_block_matches_reference_and_reparameterizes(kernel_size):
    x = _rand(0, (2, 9, 10, 16), 2.0)
    block = UniRepLKNetBlock(kernel_size=kernel_size)
    v = _random_variables(block, x, 5)
    y = jit(block.apply)(v, x)  # train=False: running statistics
    _close(y, _block_reference(v, x, kernel_size), what="vs reference")
    assert float(jnp.max(jnp.abs(y - x))) > 0.1
    fast = UniRepLKNetBlock(kernel_size=kernel_size, deploy=True)
    dv = reparameterize(v)
    want_tree = nn.unbox(jax.eval_shape(fast.init, jax.random.key(0), x))
    assert jax.tree.structure(dv) == jax.tree.structure(want_tree)
    assert jax.tree.map(jnp.shape, dv) == jax.tree.map(jnp.shape, want_tree)
    _close(jit(fast.apply)(dv, x), y, what="deploy vs train form")
    # reparameterize_block is what reparameterize applies; the deploy form is a fixed point.
    same = reparameterize_block(v["params"], v["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, same, dv["params"])
    jax.tree.map(np.testing.assert_array_equal, reparameterize(dv), dv)


def test_model_tree_reparameterizes_every_block():
    """A tree of several blocks (as in a stage) is walked; other leaves are kept."""

    class Stack(nn.Module):
        deploy: bool = False

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16, name="proj")(x)
            x = UniRepLKNetBlock(7, deploy=self.deploy, name="b0")(x)
            return UniRepLKNetBlock(3, deploy=self.deploy, name="b1")(x)

    x = _rand(0, (2, 8, 8, 5))
    v = _random_variables(Stack(), x, 7)
    dv = reparameterize(v)
    np.testing.assert_array_equal(dv["params"]["proj"]["kernel"], v["params"]["proj"]["kernel"])
    _close(jit(Stack(deploy=True).apply)(dv, x), jit(Stack().apply)(v, x), what="stack")


def test_block_layer_scale_residual_and_train_mode():
    x = _rand(0, (4, 6, 6, 8))
    block = UniRepLKNetBlock(kernel_size=7)
    v = _random_variables(block, x, 9)
    zero = {**v, "params": {**v["params"], "gamma": jnp.zeros(8)}}
    evaluate = jit(block.apply)
    np.testing.assert_array_equal(evaluate(zero, x), x)  # the branch is scaled by gamma
    y_train, upd = jit(functools.partial(block.apply, train=True, mutable=["batch_stats"]))(v, x)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved)), "train mode must update every running statistic"
    assert float(jnp.max(jnp.abs(y_train - evaluate(v, x)))) > 1e-3
    # Drop path: each sample keeps the whole branch (scaled by 1 / (1 - rate)) or drops it.
    xs = _rand(1, (16, 6, 6, 8))
    dp = UniRepLKNetBlock(kernel_size=0, drop_path=0.5)
    vd = _random_variables(dp, xs, 11)
    train = jit(
        functools.partial(dp.apply, train=True, mutable=["batch_stats"]),
        static_argnames="deterministic",
    )
    y = train(vd, xs, deterministic=False, rngs={"dropout": jax.random.key(2)})[0]
    full = train(vd, xs, deterministic=True)[0]
    dropped = [bool(jnp.all(y[i] == xs[i])) for i in range(16)]
    assert 0 < sum(dropped) < 16, dropped
    for i in range(16):
        if not dropped[i]:
            _close(y[i], xs[i] + 2.0 * (full[i] - xs[i]), what=f"kept sample {i}")


def test_block_bf16_follows_dtype():
    x = _rand(0, (2, 6, 6, 8))
    block = UniRepLKNetBlock(kernel_size=7, dtype=jnp.bfloat16)
    v = nn.unbox(jax.eval_shape(block.init, jax.random.key(0), x))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    assert jax.eval_shape(block.apply, v, x).dtype == jnp.bfloat16
    y, state = jax.eval_shape(
        functools.partial(block.apply, train=True, mutable=["batch_stats", "intermediates"],
                          capture_intermediates=True), v, x,
    )  # fmt: skip
    assert y.dtype == jnp.bfloat16
    inner = [a.dtype for a in jax.tree.leaves(state["intermediates"])]
    assert inner.count(jnp.bfloat16) >= len(inner) - 1, inner  # all but the fp32 input


# ----------------------------------------------------------------------------- 1-D use


@pytest.mark.parametrize("kernel_size", [5, 13])
def test_1d_block_equals_2d_block_on_width_one_images(kernel_size):
    """[B, T, C] with k-kernels == [B, T, 1, C] with k x k kernels keeping their centre column."""
    x = _rand(0, (2, 23, 12))
    block2d = UniRepLKNetBlock(kernel_size=kernel_size)
    v2 = _random_variables(block2d, x[:, :, None, :], 13)

    def to_1d(path, a):  # the centre column of every k_i x k_i kernel
        return a[:, a.shape[1] // 2] if path[-1].key == "kernel" and a.ndim == 4 else a

    v1 = jax.tree_util.tree_map_with_path(to_1d, v2)
    block1d = UniRepLKNetBlock(kernel_size=kernel_size, spatial_dims=1)
    want_tree = nn.unbox(jax.eval_shape(block1d.init, jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, v1) == jax.tree.map(jnp.shape, want_tree)
    y1 = jit(block1d.apply)(v1, x)
    y2 = jit(block2d.apply)(v2, x[:, :, None, :])[:, :, 0, :]
    _close(y1, y2, what="1-D vs 2-D")
    _close(y1, _block_reference(v1, x, kernel_size), what="1-D vs reference")
    fast = UniRepLKNetBlock(kernel_size=kernel_size, spatial_dims=1, deploy=True)
    _close(jit(fast.apply)(reparameterize(v1), x), y1, what="1-D deploy")


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_name_the_argument():
    with pytest.raises(
        ValueError, match=r"kernel_size=4 is not supported; expected 0 \(no conv\), 3 or 5"
    ):
        UniRepLKNetBlock(kernel_size=4).init(jax.random.key(0), jnp.ones((1, 8, 8, 8)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\] \(4-D\).*\(8, 8, 8\)"):
        UniRepLKNetBlock(kernel_size=3).init(jax.random.key(0), jnp.ones((8, 8, 8)))
    with pytest.raises(ValueError, match=r"\[B, T, C\] \(3-D\).*\(1, 8, 8, 8\)"):
        UniRepLKNetBlock(3, spatial_dims=1).init(jax.random.key(0), jnp.ones((1, 8, 8, 8)))
    with pytest.raises(ValueError, match="spatial_dims must be 1 or 2, got 3"):
        DilatedReparamBlock(7, spatial_dims=3).init(jax.random.key(0), jnp.ones((1, 8, 8, 8)))
    with pytest.raises(ValueError, match="rate must be an int >= 1"):
        dilate_kernel(jnp.ones((3, 3, 1, 2)), 0)
    with pytest.raises(ValueError, match="merge_dilated_branches: variables must be"):
        merge_dilated_branches({"params": {"kernel": jnp.ones(3)}})
    with pytest.raises(ValueError, match="reparameterize_block: params have no 'pwconv2_bn'"):
        reparameterize_block({"pwconv2": {}}, {})
