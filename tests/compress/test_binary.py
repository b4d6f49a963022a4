"""Binary layers and MST-compression: STE, layers against sign convolutions, Hamming counts, the
MST against scipy and brute force, the minimum-depth root, exact delta evaluation, operation
counts, the distance regulariser, errors."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy.sparse.csgraph import minimum_spanning_tree

from jaxblocks.compress.binary import (
    BinaryConv,
    BinaryDense,
    MSTPlan,
    binarize,
    binary_conv,
    binary_dense,
    count_ops,
    delta_conv,
    hamming_distances,
    mst_distance_penalty,
    mst_plan,
    relaxed_hamming,
)


def _sign(a):
    a = np.asarray(a, np.float32)
    return np.where(a >= 0, 1.0, -1.0).astype(np.float32)


def _correlated_kernel(seed, shape, flip=0.08):
    """±1 kernel whose channels are noisy copies of a few prototypes (and one exact duplicate)."""
    rng = np.random.default_rng(seed)
    *lead, cout = shape
    n = int(np.prod(lead))
    protos = _sign(rng.normal(size=(n, 3)))
    w = protos[:, rng.integers(0, 3, cout)]
    w = np.where(rng.random((n, cout)) < flip, -w, w)
    w[:, -1] = w[:, 0]  # distance 0 between two channels
    return w.reshape(shape).astype(np.float32)


def _tree_weight(parents, dist):
    return sum(int(dist[j, p]) for j, p in enumerate(parents) if p >= 0)


# ------------------------------------------------------------------------------- binarize / STE


def test_binarize_values_and_clipped_ste():
    x = jax.random.normal(jax.random.key(0), (40,)) * 2
    x = x.at[:5].set(jnp.array([0.0, 1.0, -1.0, 1.5, -3.0]))
    y = binarize(x)
    np.testing.assert_array_equal(y, _sign(x))
    assert y[0] == 1.0  # sign(0) = +1
    g = jax.grad(lambda v: jnp.sum(binarize(v) * jnp.arange(40.0)))(x)
    want = np.where(np.abs(np.asarray(x)) <= 1, np.arange(40.0), 0.0)  # ends included
    np.testing.assert_array_equal(g, want)
    assert binarize(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "strides,padding,binarize_inputs,scale",
    [(1, "SAME", True, True), ((2, 3), "VALID", True, False), (2, "SAME", False, True)],
)
def test_binary_conv_equals_sign_conv(strides, padding, binarize_inputs, scale):
    x = jax.random.normal(jax.random.key(1), (2, 9, 11, 5))
    layer = BinaryConv(6, (3, 2), strides=strides, padding=padding,
                       binarize_inputs=binarize_inputs, scale_weights=scale)  # fmt: skip
    variables = nn.unbox(layer.init(jax.random.key(2), x))
    kernel = np.asarray(variables["params"]["kernel"])
    y = layer.apply(variables, x)
    xin = _sign(x) if binarize_inputs else np.asarray(x)
    st = (strides, strides) if isinstance(strides, int) else strides
    ref = lax.conv_general_dilated(
        xin, _sign(kernel), st, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )  # fmt: skip
    if scale:
        ref = ref * np.abs(kernel).mean(axis=(0, 1, 2)).reshape(1, 1, 1, -1)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    # gradients reach the latent kernel through the STE and are finite
    g = jax.grad(lambda v: jnp.sum(jnp.sin(layer.apply(v, x))))(variables)
    gk = np.asarray(g["params"]["kernel"])
    assert np.all(np.isfinite(gk)) and np.abs(gk).sum() > 0


def test_binary_dense_and_bias():
    x = jax.random.normal(jax.random.key(3), (4, 3, 10))
    layer = BinaryDense(7, use_bias=True, bias_init=jax.nn.initializers.normal(1.0))
    variables = nn.unbox(layer.init(jax.random.key(4), x))
    p = variables["params"]
    k, b = np.asarray(p["kernel"]), np.asarray(p["bias"])
    ref = _sign(x) @ _sign(k) * np.abs(k).mean(0).reshape(1, 1, -1) + b.reshape(1, 1, -1)
    np.testing.assert_allclose(layer.apply(variables, x), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Hamming and MST


def test_hamming_distances_match_direct_count():
    w = _sign(jax.random.normal(jax.random.key(5), (3, 3, 4, 9)))
    d = np.asarray(hamming_distances(w))
    flat = w.reshape(-1, 9)
    want = np.array([[np.sum(flat[:, i] != flat[:, j]) for j in range(9)] for i in range(9)])
    np.testing.assert_array_equal(d, want)
    assert d.dtype == np.int32
    # a latent kernel gives the distances of its signs; works under jit
    latent = jax.random.normal(jax.random.key(6), (12, 9))
    np.testing.assert_array_equal(
        jax.jit(hamming_distances)(latent), hamming_distances(_sign(latent))
    )


def _brute_force_mst_weight(dist):
    """Minimum over all c^(c-2) labelled trees (Prüfer sequences)."""
    c = dist.shape[0]
    best = np.inf
    for seq in itertools.product(range(c), repeat=c - 2):
        degree = np.ones(c, int)
        for s in seq:
            degree[s] += 1
        total = 0
        for s in seq:
            leaf = int(np.flatnonzero(degree == 1)[0])
            total += dist[leaf, s]
            degree[leaf] -= 1
            degree[s] -= 1
        u, v = np.flatnonzero(degree == 1)
        best = min(best, total + dist[u, v])
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mst_weight_matches_scipy_and_brute_force(seed):
    w = _correlated_kernel(seed, (2, 2, 3, 12), flip=0.2)
    dist = np.asarray(hamming_distances(w)).astype(np.int64)
    plan = mst_plan(w)
    # scipy drops zero-weight edges: shift every off-diagonal weight by 1
    c = dist.shape[0]
    shifted = (dist + 1) * (1 - np.eye(c, dtype=np.int64))
    want = int(minimum_spanning_tree(shifted).sum()) - (c - 1)
    assert plan.total_distance == want == _tree_weight(plan.parents, dist)
    small = dist[:6, :6]
    assert mst_plan(w[..., :6]).total_distance == _brute_force_mst_weight(small)


def test_plan_is_a_tree_and_root_has_minimum_depth():
    w = _correlated_kernel(3, (3, 3, 2, 16), flip=0.15)
    plan = mst_plan(w)
    c = 16
    assert isinstance(plan, MSTPlan) and plan.parents[plan.root] == -1
    assert sorted(plan.order.tolist()) == list(range(c)) and plan.order[0] == plan.root
    pos = {int(v): i for i, v in enumerate(plan.order)}
    for j in range(c):
        if j != plan.root:
            assert pos[int(plan.parents[j])] < pos[j]
            assert plan.node_depth[j] == plan.node_depth[plan.parents[j]] + 1
    depths = [mst_plan(w, root=r).depth for r in range(c)]
    assert plan.depth == min(depths) and plan.root == int(np.argmin(depths))
    assert max(depths) > min(depths)  # the choice matters on this kernel
    # the edge set (and weight) does not depend on the root
    assert {mst_plan(w, root=r).total_distance for r in range(c)} == {plan.total_distance}


# -------------------------------------------------------------------------- delta evaluation


@pytest.mark.parametrize(
    "shape,strides,padding,root",
    [
        ((3, 3, 5, 11), 1, "SAME", None),
        ((3, 2, 3, 7), (2, 3), "VALID", None),
        ((5, 3, 2, 9), 2, ((1, 2), (0, 1)), 4),
        ((1, 1, 6, 5), 1, "SAME", 0),
    ],
)
def test_delta_conv_is_exact(shape, strides, padding, root):
    w = _correlated_kernel(sum(shape), shape, flip=0.25)
    x = binarize(jax.random.normal(jax.random.key(7), (2, 9, 7, shape[2])))
    plan = mst_plan(w, root=root)
    y = delta_conv(x, w, plan, strides=strides, padding=padding)
    ref = binary_conv(x, w, strides=strides, padding=padding, scale_weights=False)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    np.testing.assert_array_equal(y, ref)
    # also traceable (plan and kernel static) and exact for real inputs up to rounding
    xr = jax.random.normal(jax.random.key(8), x.shape)
    yj = jax.jit(lambda v: delta_conv(v, w, plan, strides=strides, padding=padding))(xr)
    refr = binary_conv(xr, w, strides=strides, padding=padding, binarize_inputs=False,
                       scale_weights=False)  # fmt: skip
    np.testing.assert_allclose(yj, refr, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------- op counts


def test_count_ops_hand_built():
    # channel 1 differs from 0 in one weight, channel 2 from 1 in one (from 0 in two)
    w = np.array([[1, 1, -1], [1, 1, 1], [1, 1, 1], [1, -1, -1]], np.float32)  # [cin 4, cout 3]
    plan = mst_plan(w)
    assert plan.root == 1 and plan.depth == 1 and plan.total_distance == 2
    ops = count_ops(w, plan)
    # dense: 4 · 3; MST: 4 (root) + (1 + 1) + (1 + 1)
    assert ops == {"positions": 1, "dense": 12, "mst": 8, "ratio": 1.5}
    conv = count_ops(w.reshape(1, 1, 4, 3), plan, (5, 4), strides=2, padding="VALID")
    assert conv["positions"] == 3 * 2 and conv["dense"] == 72 and conv["mst"] == 48


def test_count_ops_below_dense_for_correlated_kernels():
    w = _correlated_kernel(9, (3, 3, 8, 32), flip=0.05)
    ops = count_ops(w, mst_plan(w), (14, 14))
    assert ops["positions"] == 196 and ops["mst"] < ops["dense"] and ops["ratio"] > 5


# ------------------------------------------------------------------------------- regulariser


def test_penalty_matches_hard_mst_at_low_temperature():
    latent = jax.random.normal(jax.random.key(10), (3, 3, 4, 10))
    plan = mst_plan(latent)
    pen = jax.jit(lambda k: mst_distance_penalty(k, temperature=1e-6))(latent)
    np.testing.assert_allclose(pen, plan.total_distance, rtol=1e-5)
    d = np.asarray(hamming_distances(latent))
    all_pairs = mst_distance_penalty(latent, temperature=1e-6, edges="all")
    np.testing.assert_allclose(all_pairs, np.triu(d, 1).sum(), rtol=1e-5)
    # the relaxation is a smooth upper bound of the self-distance 0 that vanishes as T -> 0
    diag = [np.diag(relaxed_hamming(latent, t)).max() for t in (1.0, 0.1, 1e-6)]
    assert diag[0] > diag[1] > diag[2] >= 0 and diag[2] < 1e-3


@pytest.mark.parametrize("edges", ["mst", "all"])
def test_penalty_descent_reduces_mst_distance(edges):
    latent = 0.5 * jax.random.normal(jax.random.key(11), (3, 3, 4, 12))
    step = jax.jit(jax.value_and_grad(lambda k: mst_distance_penalty(k, 1.0, edges=edges)))
    before = mst_plan(latent).total_distance
    first, _ = step(latent)
    for _ in range(30):
        value, g = step(latent)
        latent = latent - 0.05 * g
    assert float(value) < 0.8 * float(first)
    assert mst_plan(latent).total_distance < 0.8 * before


# ------------------------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    w = _correlated_kernel(0, (3, 3, 4, 6))
    x = binarize(jax.random.normal(jax.random.key(12), (1, 8, 8, 4)))
    plan = mst_plan(w)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height"):
        delta_conv(x[0], w, plan)
    with pytest.raises(ValueError, match=r"kernel must have shape \[kh, kw, cin=5"):
        delta_conv(jnp.ones((1, 8, 8, 5)), w, plan)
    with pytest.raises(ValueError, match="only ±1 values"):
        delta_conv(x, w * 0.5, plan)
    with pytest.raises(ValueError, match="MSTPlan over 5 channels"):
        delta_conv(x, w[..., :5], plan)
    with pytest.raises(ValueError, match="padding must be"):
        delta_conv(x, w, plan, padding="FULL")
    with pytest.raises(ValueError, match="root must be a channel index in"):
        mst_plan(w, root=6)
    with pytest.raises(ValueError, match=r"binary_kernel must have shape \[..., cin, cout\]"):
        hamming_distances(jnp.ones(5))
    with pytest.raises(ValueError, match="input_hw must be"):
        count_ops(w, plan)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mst_distance_penalty(w, temperature=0.0)
    with pytest.raises(ValueError, match="edges must be"):
        mst_distance_penalty(w, edges="tree")
    with pytest.raises(ValueError, match=r"BinaryConv: x must have shape"):
        BinaryConv(4).init(jax.random.key(0), jnp.ones((8, 8, 3)))
    variables = BinaryConv(4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"kernel of shape \(3, 3, 5, 4\)"):
        BinaryConv(4).apply(variables, jnp.ones((1, 8, 8, 5)))
    with pytest.raises(ValueError, match=r"BinaryDense: x with 4 features needs a kernel of sha"):
        BinaryDense(3).apply({"params": {"kernel": jnp.ones((5, 3))}}, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"latent_kernel must have shape \[cin=4"):
        binary_dense(jnp.ones((2, 4)), jnp.ones((5, 3)))
