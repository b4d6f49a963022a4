"""UnMix-TNS vs its equations, state init, the BatchNorm interceptor, and the label-sorted
test-stream demo (digits): test-time BN collapses, UnMix-TNS recovers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from jaxblocks.layers.conv_bn import ConvBN, fold_for_deploy
from jaxblocks.layers.unmix_tns import (
    UNMIX_TNS_COLLECTION,
    unmix_tns_apply,
    unmix_tns_init_state,
    unmix_tns_momentum,
    unmix_tns_normalize,
)
from jaxblocks.models.resnet import ResNet
from tests.kernels.harness import assert_close, rel_rms


def _np(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _reference(x, scale, bias, means, vars_, tau, lam, eps):
    b, c = x.shape[0], x.shape[-1]
    sp = tuple(range(1, x.ndim - 1))
    mu_i, var_i = x.mean(sp), x.var(sp)  # [B, C]
    cos = (mu_i / np.linalg.norm(mu_i, axis=-1, keepdims=True)) @ (
        means / np.linalg.norm(means, axis=-1, keepdims=True)
    ).T
    p = np.exp(cos / tau - (cos / tau).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # [B, K]
    mu_bar = (1 - p[..., None]) * means[None] + p[..., None] * mu_i[:, None]
    var_bar = (1 - p[..., None]) * vars_[None] + p[..., None] * var_i[:, None]
    mu = mu_bar.mean(1)
    var = var_bar.mean(1) + (mu_bar**2).mean(1) - mu**2
    shp = (b,) + (1,) * len(sp) + (c,)
    y = (x - mu.reshape(shp)) / np.sqrt(var.reshape(shp) + eps) * scale + bias
    new_m = means + lam * np.einsum("bk,bkc->kc", p, mu_i[:, None] - means[None]) / b
    new_v = vars_ + lam * np.einsum("bk,bkc->kc", p, var_i[:, None] - vars_[None]) / b
    return y, new_m, new_v


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unmix_tns_matches_equations(dtype):
    ks = jax.random.split(jax.random.key(0), 5)
    x = (jax.random.normal(ks[0], (4, 3, 3, 6)) + 0.5).astype(dtype)
    means = jax.random.normal(ks[1], (5, 6))
    vars_ = 0.5 + jax.random.uniform(ks[2], (5, 6))
    scale = 1 + 0.2 * jax.random.normal(ks[3], (6,))
    bias = 0.2 * jax.random.normal(ks[4], (6,))
    y, nm, nv = unmix_tns_normalize(
        x, scale, bias, means, vars_, temperature=0.07, momentum=0.3, epsilon=1e-5
    )
    ry, rm, rv = _reference(_np(x), _np(scale), _np(bias), _np(means), _np(vars_), 0.07, 0.3, 1e-5)
    assert_close(y, ry, dtype=dtype)
    assert_close(nm, rm, dtype=dtype)
    assert_close(nv, rv, dtype=dtype)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(unmix_tns_normalize(x, scale, bias, means, vars_)[0])))(
        x.astype(jnp.float32)
    )
    assert np.all(np.isfinite(_np(g)))
    # batch size 1 is per-sample: the first sample's output does not depend on the others
    y1, _, _ = unmix_tns_normalize(x[:1], scale, bias, means, vars_)
    assert_close(y1, _np(y)[:1], dtype=dtype)


def test_unmix_tns_state_init_and_errors():
    bs = {"bn0": {"mean": jnp.full((4,), 0.5), "var": jnp.full((4,), 4.0)}, "dense": {}}
    st = unmix_tns_init_state(bs, 1, key=jax.random.key(0))
    assert set(st) == {"bn0", "dense"} and st["dense"] == {}
    assert_close(st["bn0"]["means"], np.full((1, 4), 0.5), tol=0)
    assert_close(st["bn0"]["vars"], np.full((1, 4), 4.0), tol=0)
    big = unmix_tns_init_state(
        {"bn": {"mean": jnp.zeros((3,)), "var": jnp.full((3,), 4.0)}}, 4096, key=jax.random.key(1)
    )["bn"]
    # the uniform mixture of components keeps the source variance (α = 0.5 split)
    mix_var = _np(big["vars"]).mean(0) + _np(big["means"]).var(0)
    np.testing.assert_allclose(mix_var, 4.0, rtol=0.1)
    np.testing.assert_allclose(_np(big["vars"])[0], 2.0)
    assert unmix_tns_momentum(64, 64, 0.9) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no BatchNorm"):
        unmix_tns_init_state({"dense": {}}, 4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_components"):
        unmix_tns_init_state(bs, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="spatial axis"):
        unmix_tns_normalize(jnp.ones((2, 4)), None, None, jnp.ones((3, 4)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"\[K, C\]"):
        unmix_tns_normalize(jnp.ones((2, 2, 4)), None, None, jnp.ones((3, 5)), jnp.ones((3, 5)))


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(16, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = nn.Conv(32, (3, 3), strides=2)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(10)(x.mean((1, 2)))


def test_interceptor_k1_is_instance_norm():
    # K = 1: p = 1, so every sample is normalized with its own instance statistics.
    m = _Net()
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 1))
    v = m.init(jax.random.key(1), x, train=False)
    st = unmix_tns_init_state(v["batch_stats"], 1, key=jax.random.key(2))
    out, new = unmix_tns_apply(m, v, st, x, train=False)

    class _IN(nn.Module):  # same net with BatchNorm replaced by instance norm + BN affine
        @nn.compact
        def __call__(self, x):
            def inorm(h, name):
                mu, var = h.mean((1, 2), keepdims=True), h.var((1, 2), keepdims=True)
                p = v["params"][name]
                s = p["scale"].reshape(1, 1, 1, -1)
                return (h - mu) / jnp.sqrt(var + 1e-5) * s + p["bias"].reshape(1, 1, 1, -1)

            h = nn.Conv(16, (3, 3), name="Conv_0")(x)
            h = nn.relu(inorm(h, "BatchNorm_0"))
            h = nn.Conv(32, (3, 3), strides=2, name="Conv_1")(h)
            h = nn.relu(inorm(h, "BatchNorm_1"))
            return nn.Dense(10, name="Dense_0")(h.mean((1, 2)))

    want = _IN().apply({"params": v["params"]}, x)
    assert_close(out, want, tol=1e-5)
    assert set(new) == {"BatchNorm_0", "BatchNorm_1"}
    assert UNMIX_TNS_COLLECTION == "unmix_tns"
    # without the context, the model is untouched (BatchNorm with running statistics)
    assert_close(m.apply(v, x, train=False), m.apply(v, x, train=False), tol=0)
    with pytest.raises(ValueError, match="spatial axis"):
        bn = nn.BatchNorm(use_running_average=True)
        bv = bn.init(jax.random.key(0), jnp.ones((2, 4)))
        unmix_tns_apply(
            bn,
            bv,
            unmix_tns_init_state(bv["batch_stats"], 2, key=jax.random.key(0)),
            jnp.ones((2, 4)),
        )


def test_label_sorted_stream_tbn_degrades_unmix_recovers():
    d = load_digits()
    xs = (d.images / 16.0).astype(np.float32)[..., None]
    ys = d.target
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(xs))
    tr, te = perm[:1200], perm[1200:]
    m = _Net()
    v = m.init(jax.random.key(0), xs[:2], train=True)
    tx = optax.adam(1e-2)
    params, bs = v["params"], v["batch_stats"]
    opt = tx.init(params)

    @jax.jit
    def step(params, bs, opt, x, y):
        def lf(p):
            lo, u = m.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=True)
            return optax.softmax_cross_entropy_with_integer_labels(lo, y).mean(), u

        (_, u), g = jax.value_and_grad(lf, has_aux=True)(params)
        up, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, up), u["batch_stats"], opt

    for _ in range(120):
        idx = rng.choice(tr, 64)
        params, bs, opt = step(params, bs, opt, xs[idx], ys[idx])
    # settle the running statistics on the final weights (train-mode passes, no updates)
    recal = jax.jit(
        lambda bs, x: m.apply(
            {"params": params, "batch_stats": bs}, x, train=True, mutable=["batch_stats"]
        )[1]["batch_stats"]
    )
    for _ in range(30):
        bs = recal(bs, xs[rng.choice(tr, 128)])
    var = {"params": params, "batch_stats": bs}
    x_te, y_te = xs[te], ys[te]
    order = np.argsort(y_te, kind="stable")  # temporally correlated: one class after another
    x_sorted, y_sorted = x_te[order], y_te[order]
    b = 64
    n = (len(x_te) // b) * b

    def accuracy(logits, y):
        return float((np.concatenate(logits).argmax(-1) == y[:n]).mean())

    tbn = jax.jit(lambda x: m.apply(var, x, train=True, mutable=["batch_stats"])[0])
    acc_source = float((np.asarray(m.apply(var, x_te, train=False)).argmax(-1) == y_te).mean())
    acc_tbn_iid = accuracy([tbn(x_te[i : i + b]) for i in range(0, n, b)], y_te)
    acc_tbn_sorted = accuracy([tbn(x_sorted[i : i + b]) for i in range(0, n, b)], y_sorted)
    run = jax.jit(lambda s, x: unmix_tns_apply(m, var, s, x, train=False))
    state = unmix_tns_init_state(bs, 16, key=jax.random.key(1))
    logits = []
    for i in range(0, n, b):
        lo, state = run(state, x_sorted[i : i + b])
        logits.append(lo)
    acc_unmix_sorted = accuracy(logits, y_sorted)
    msg = (
        f"source {acc_source:.3f} tbn-iid {acc_tbn_iid:.3f} tbn-sorted {acc_tbn_sorted:.3f} "
        f"unmix-sorted {acc_unmix_sorted:.3f}"
    )
    print(msg)
    assert acc_source > 0.85 and acc_tbn_iid > 0.85, msg  # the model works, TBN works on i.i.d.
    assert acc_tbn_sorted < 0.7, msg  # label-sorted batches break test-time BN
    assert acc_unmix_sorted > 0.8 and acc_unmix_sorted > acc_tbn_sorted + 0.25, msg


def _randomize_bn(v):
    """Trained-looking BN variables: random scale/bias and running mean/var."""
    keys = iter(jax.random.split(jax.random.key(7), 16))
    p, bs = dict(v["params"]), dict(v["batch_stats"])
    for name in ("BatchNorm_0", "BatchNorm_1"):
        c = p[name]["scale"].shape
        p[name] = {
            "scale": jax.random.uniform(next(keys), c, minval=0.5, maxval=2.0),
            "bias": jax.random.normal(next(keys), c),
        }
        bs[name] = {
            "mean": jax.random.normal(next(keys), c),
            "var": jax.random.uniform(next(keys), c, minval=0.3, maxval=3.0),
        }
    return {"params": p, "batch_stats": bs}


class _ConvBNNet(nn.Module):
    """`_Net` written with ConvBN layers (conv bias kept, as nn.Conv's default)."""

    @nn.compact
    def __call__(self, x, train: bool):
        mode = "train" if train else "eval"
        x = ConvBN(16, (3, 3), use_conv_bias=True, activation=nn.relu, name="c0")(x, mode)
        x = ConvBN(32, (3, 3), strides=2, use_conv_bias=True, activation=nn.relu, name="c1")(
            x, mode
        )
        return nn.Dense(10, name="Dense_0")(x.mean((1, 2)))


def test_convbn_layers_take_unmix_tns_like_conv_plus_batchnorm():
    # The same weights as nn.Conv + nn.BatchNorm and as ConvBN: identical outputs and updates.
    x = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
    v = _randomize_bn(_Net().init(jax.random.key(1), x, train=False))
    p, bs = v["params"], v["batch_stats"]
    cv = {
        "params": {
            "c0": {**p["Conv_0"], "conv_bias": p["Conv_0"]["bias"], **p["BatchNorm_0"]},
            "c1": {**p["Conv_1"], "conv_bias": p["Conv_1"]["bias"], **p["BatchNorm_1"]},
            "Dense_0": p["Dense_0"],
        },
        "batch_stats": {"c0": bs["BatchNorm_0"], "c1": bs["BatchNorm_1"]},
    }
    assert_close(_ConvBNNet().apply(cv, x, train=False), _Net().apply(v, x, train=False), tol=1e-5)
    st = unmix_tns_init_state(bs, 16, key=jax.random.key(2))
    cst = {"c0": st["BatchNorm_0"], "c1": st["BatchNorm_1"]}
    want, want_st = unmix_tns_apply(_Net(), v, st, x, train=False)
    got, got_st = unmix_tns_apply(_ConvBNNet(), cv, cst, x, train=False)
    assert_close(got, want, tol=1e-5)
    for a, b in (("c0", "BatchNorm_0"), ("c1", "BatchNorm_1")):
        assert_close(got_st[a], want_st[b], tol=1e-5)
        assert not np.allclose(got_st[a]["means"], cst[a]["means"])  # the components moved
    # UnMix-TNS really replaced the running statistics (eval mode would differ).
    assert rel_rms(got, _ConvBNNet().apply(cv, x, train=False)) > 1e-2


def test_convbn_unmix_tns_residual_activation_and_errors():
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    r = jax.random.normal(jax.random.key(1), (4, 6, 6, 5))
    plain = ConvBN(5, (3, 3))
    v = plain.init(jax.random.key(2), x)
    st = unmix_tns_init_state(v["batch_stats"], 4, key=jax.random.key(3))
    y, _ = unmix_tns_apply(plain, v, st, x)
    y_res, _ = unmix_tns_apply(plain, v, st, x, residual=r)
    y_act, _ = unmix_tns_apply(plain.clone(activation=nn.relu), v, st, x, residual=r)
    assert_close(y_res, y + r, tol=1e-6)  # residual added after the normalization …
    assert_close(y_act, nn.relu(y + r), tol=1e-6)  # … and before the activation
    with pytest.raises(ValueError, match=r"use_aux=True is not supported"):
        aux = ConvBN(5, (3, 3), aux_bn=True)
        va = aux.init(jax.random.key(2), x)
        unmix_tns_apply(
            aux, va, unmix_tns_init_state(va["batch_stats"], 2, key=jax.random.key(0)), x,
            use_aux=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"un-folded variables"):
        unmix_tns_apply(plain, fold_for_deploy(v), st, x, "deploy")


def test_unmix_tns_covers_every_convbn_of_a_registry_resnet():
    model = ResNet(stage_sizes=(1, 1), block="basic", num_classes=4, width=4, stem="small")
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
    v = model.init(jax.random.key(1), x)
    st = unmix_tns_init_state(v["batch_stats"], 8, key=jax.random.key(2))
    out, new = jax.jit(lambda s, x: unmix_tns_apply(model, v, s, x, train=False))(st, x)
    assert out.shape == (6, 4) and np.all(np.isfinite(out))
    old_leaves, new_leaves = jax.tree.leaves(st), jax.tree.leaves(new)
    # 6 ConvBNs: the stem, two in layer1_0, two and the downsample shortcut in layer2_0.
    assert len(new_leaves) == len(old_leaves) == 2 * 6
    for a, b in zip(old_leaves, new_leaves, strict=True):
        assert not np.allclose(a, b)
