"""A-SDM (`jaxblocks.models.asdm_unet`): pruning maps the teacher's weights exactly, CLME-CondConv
is the weighted sum of K convolutions, GRI attention against a direct NumPy formulation, the
distillation objective, the ``diffusion_distill`` task and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.asdm_unet import (
    ROUTE_BIAS,
    ASDMUNet,
    CLMECondConv,
    block_redundancy,
    cond_conv,
    gri_attention,
    prune_unet,
    removable_blocks,
)
from jaxblocks.models.diffusion_unet import DiffusionUNet, pack_labels
from jaxblocks.train.tasks import get_task

TINY = dict(widths=(8, 16), num_groups=4, num_heads=2, num_timesteps=50)
STUDENT = dict(removed=("mid_1", "up_1_1", "up_0_1"), condconv=(("mid_0", ("mid_1",)),))
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(f, **kw):
    return jax.jit(f, compiler_options=FAST_COMPILE, **kw)


def _inputs(b=2):
    x = jax.random.normal(jax.random.key(0), (b, 8, 8, 1))
    return x, jnp.array([3, 41][:b]), jnp.array([1, 10][:b])


@pytest.fixture(scope="module")
def teacher():
    model = DiffusionUNet(**TINY)
    x, t, y = _inputs()
    v = jit(model.init)(jax.random.key(1), x, t, y)
    # Perturb the zero-initialised convs so every block changes the output.
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noise = [0.05 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves, strict=True)]
    return model, jax.tree.unflatten(tree, [a + n for a, n in zip(leaves, noise, strict=True)])


def test_zero_removed_blocks_is_the_teacher(teacher):
    model, v = teacher
    x, t, y = _inputs()
    pruned = prune_unet(v, ())
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, pruned, v))
    got = ASDMUNet(**TINY).apply(pruned, x, t, y)
    np.testing.assert_allclose(got, model.apply(v, x, t, y), rtol=1e-6, atol=1e-6)


def test_prune_maps_weights_and_fits_the_student(teacher):
    _, v = teacher
    student = ASDMUNet(**TINY, **STUDENT)
    pruned = prune_unet(v, student.removed, student.condconv)["params"]
    x, t, y = _inputs()
    shapes = jax.eval_shape(student.init, jax.random.key(0), x, t, y)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(pruned)
    assert jax.tree.all(jax.tree.map(lambda s, a: s.shape == a.shape, shapes, pruned))
    p = v["params"]
    assert not {"mid_1", "up_1_1", "up_0_1"} & set(pruned)
    for k in set(pruned) - {"mid_0"}:  # untouched leaves are the teacher's arrays
        assert jax.tree.all(jax.tree.map(lambda a, b: a is b, pruned[k], p[k]))
    for conv in ("conv1", "conv2"):
        e = pruned["mid_0"][conv]
        np.testing.assert_array_equal(e["experts"][0], p["mid_0"][conv]["kernel"])
        np.testing.assert_array_equal(e["experts"][1], p["mid_1"][conv]["kernel"])
        np.testing.assert_array_equal(e["bias"][1], p["mid_1"][conv]["bias"])
        np.testing.assert_array_equal(e["route"]["bias"], [ROUTE_BIAS, -ROUTE_BIAS])


def test_condconv_routed_to_own_expert_is_the_plain_pruned_block(teacher):
    _, v = teacher
    x, t, y = _inputs()
    plain = ASDMUNet(**TINY, removed=("mid_1",))
    cc = plain.clone(condconv=(("mid_0", ("mid_1",)),))
    pv = prune_unet(v, ("mid_1",), cc.condconv)
    for conv in ("conv1", "conv2"):  # saturate the routing: r = [1, 0]
        pv["params"]["mid_0"][conv]["route"]["bias"] = jnp.array([60.0, -60.0])
    want = plain.apply(prune_unet(v, ("mid_1",)), x, t, y)
    np.testing.assert_allclose(cc.apply(pv, x, t, y), want, rtol=1e-5, atol=1e-5)
    # Incubation: pruning the donor first, then adding the CondConv with the teacher as donors.
    step2 = prune_unet(prune_unet(v, ("mid_1",)), (), cc.condconv, donors=v)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, step2, prune_unet(v, ("mid_1",),
                                                                        cc.condconv)))  # fmt: skip


@pytest.mark.parametrize("method,k", [("auto", 3), ("mix_kernels", 3), ("mix_outputs", 3),
                                      ("auto", 5)])  # fmt: skip
def test_cond_conv_is_weighted_sum_of_k_convolutions(method, k):
    ks = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(ks[0], (3, 5, 6, 4))
    experts = jax.random.normal(ks[1], (k, 3, 3, 4, 7))
    bias = jax.random.normal(ks[2], (k, 7))
    r = jax.random.uniform(ks[3], (3, k))
    got = cond_conv(x, experts, bias, r, method=method)
    dn = ("NHWC", "HWIO", "NHWC")
    per = [jax.lax.conv_general_dilated(x, experts[j], (1, 1), "SAME", dimension_numbers=dn)
           + bias[j][None, None, None, :] for j in range(k)]  # fmt: skip
    want = sum(r[:, j, None, None, None] * per[j] for j in range(k))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_cond_conv_methods_have_equal_gradients():
    ks = jax.random.split(jax.random.key(7), 4)
    args = (jax.random.normal(ks[0], (2, 5, 3, 4)), jax.random.normal(ks[1], (2, 3, 3, 4, 6)),
            jax.random.normal(ks[2], (2, 6)), jax.random.uniform(ks[3], (2, 2)))  # fmt: skip

    def loss(method):
        return lambda *a: jnp.sum(jnp.sin(cond_conv(*a, method=method)))

    g1 = jax.grad(loss("mix_kernels"), argnums=(0, 1, 2, 3))(*args)
    g2 = jax.grad(loss("mix_outputs"), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_clme_condconv_module_routing():
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 6))
    cond = jax.random.normal(jax.random.key(4), (2, 5))
    m = CLMECondConv(8, 3)
    v = m.init(jax.random.key(5), x, cond)
    p = v["params"]
    assert p["experts"].shape == (3, 3, 3, 6, 8) and p["route"]["kernel"].shape == (11, 3)
    r = jax.nn.sigmoid(jnp.array([ROUTE_BIAS, -ROUTE_BIAS, -ROUTE_BIAS]))
    want = cond_conv(x, p["experts"], p["bias"], jnp.broadcast_to(r, (2, 3)))
    np.testing.assert_allclose(m.apply(v, x, cond), want, rtol=1e-5, atol=1e-5)


def _gri_numpy(q, k, v, w):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hh, ww, nh, d = q.shape
    out = np.zeros_like(q)
    regions = [(i, j) for i in range(0, hh, w) for j in range(0, ww, w)]

    def softmax(s):
        e = np.exp(s - s.max())
        return e / e.sum()

    for bi in range(b):
        for h in range(nh):
            toks = [(i, j) for i in range(hh) for j in range(ww)]
            kall = np.array([k[bi, i, j, h] for i, j in toks])
            vall = np.array([v[bi, i, j, h] for i, j in toks])
            gq, gk, gctx = [], [], []
            for i0, j0 in regions:
                gq.append(q[bi, i0 : i0 + w, j0 : j0 + w, h].reshape(-1, d).mean(0))
                gk.append(k[bi, i0 : i0 + w, j0 : j0 + w, h].reshape(-1, d).mean(0))
                gctx.append(softmax(kall @ gq[-1] / np.sqrt(d)) @ vall)
            gk, gctx = np.array(gk), np.array(gctx)
            for i0, j0 in regions:
                kw = k[bi, i0 : i0 + w, j0 : j0 + w, h].reshape(-1, d)
                vw = v[bi, i0 : i0 + w, j0 : j0 + w, h].reshape(-1, d)
                for i in range(i0, i0 + w):
                    for j in range(j0, j0 + w):
                        keys, vals = np.concatenate([kw, gk]), np.concatenate([vw, gctx])
                        out[bi, i, j, h] = softmax(keys @ q[bi, i, j, h] / np.sqrt(d)) @ vals
    return out


def test_gri_attention_matches_numpy():
    ks = jax.random.split(jax.random.key(6), 3)
    q, k, v = (jax.random.normal(kk, (2, 4, 6, 2, 3)) for kk in ks)
    got = gri_attention(q, k, v, 2)
    np.testing.assert_allclose(got, _gri_numpy(q, k, v, 2), rtol=1e-4, atol=1e-5)


def test_gri_block_inherits_the_attention_layout(teacher):
    _, v = teacher
    x, t, y = _inputs()
    m = ASDMUNet(**TINY, gri_window=2)
    shapes = jax.eval_shape(m.init, jax.random.key(0), x, t, y)["params"]["mid_attn"]
    want = jax.tree.map(jnp.shape, v["params"]["mid_attn"])
    assert jax.tree.map(lambda s: s.shape, shapes) == want
    out = m.apply(v, x, t, y)  # the teacher's own attention weights, GRI pattern
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_distillation_zero_when_student_is_teacher(teacher):
    model, v = teacher
    packed = pack_labels(_inputs()[0], jnp.array([2, 7]))
    s = ASDMUNet(**TINY)
    got = s.apply({"params": v["params"], "teacher": {"params": v["params"]}}, packed)
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got[:, 2:], 0.0, atol=1e-10)
    np.testing.assert_allclose(got[:, 0], got[:, 1], rtol=1e-6)
    pred = model.apply(v, packed)  # the same t, ε draws: the task term is the teacher's MSE
    mse = jnp.mean(jnp.square(pred[..., 0] - pred[..., 1]).reshape(2, -1), axis=1)
    np.testing.assert_allclose(got[:, 1], mse, rtol=1e-5)
    m = get_task("diffusion_distill").metrics(got, None)
    np.testing.assert_allclose(m["loss"], got[:, 0])
    # A pruned student: positive KD terms, gradients for the student only (teacher frozen).
    st = ASDMUNet(**TINY, **STUDENT, gri_window=2)
    sp = prune_unet(v, st.removed, st.condconv)["params"]

    def loss(p):
        return jnp.mean(st.apply({"params": p, "teacher": {"params": v["params"]}}, packed)[:, 0])

    out = st.apply({"params": sp, "teacher": {"params": v["params"]}}, packed)
    assert bool(jnp.all(out[:, 2:] > 0))
    g = jax.grad(loss)(sp)
    assert bool(jnp.any(g["mid_0"]["conv1"]["experts"][1] != 0))


def test_block_redundancy_scores_every_removable_block(teacher):
    _, v = teacher
    x, t, y = _inputs(1)
    scores = block_redundancy(ASDMUNet(**TINY), v, x, t, y)
    assert set(scores) == set(removable_blocks(TINY["widths"], 1))
    assert all(s > 0 for s in scores.values())


def test_bad_inputs_raise(teacher):
    _, v = teacher
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="down_1_0.*cannot be pruned"):
        ASDMUNet(**TINY, removed=("down_1_0",)).init(jax.random.key(0), x, t, y)
    with pytest.raises(ValueError, match="condconv donors"):
        ASDMUNet(**TINY, condconv=(("mid_0", ("mid_1",)),)).init(jax.random.key(0), x, t, y)
    with pytest.raises(ValueError, match="gri_window=3"):
        ASDMUNet(**TINY, gri_window=3).init(jax.random.key(0), x, t, y)
    with pytest.raises(ValueError, match="x must be"):
        ASDMUNet(**TINY).init(jax.random.key(0), x[:, :4], t, y)
    with pytest.raises(ValueError, match="block 'mid_9'"):
        prune_unet(v, ("mid_9",))
    with pytest.raises(ValueError, match="donor up_1_1/conv1 kernel .* does not match"):
        prune_unet(v, ("up_1_1",), (("up_0_1", ("up_1_1",)),))
    with pytest.raises(ValueError, match="donor 'mid_1'.*must be pruned"):
        prune_unet(v, (), (("mid_0", ("mid_1",)),))
    with pytest.raises(ValueError, match="routing must be"):
        cond_conv(x, jnp.ones((2, 3, 3, 1, 4)), jnp.ones((2, 4)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="method='fast' must be one of"):
        cond_conv(x, jnp.ones((2, 3, 3, 1, 4)), jnp.ones((2, 4)), jnp.ones((1, 2)), method="fast")
    with pytest.raises(ValueError, match="window=3"):
        gri_attention(*(jnp.ones((1, 4, 4, 2, 3)),) * 3, 3)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        get_task("diffusion_distill").metrics(jnp.ones((2, 3)), None)
