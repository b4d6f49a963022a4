"""ConvBN / LinearBN: the four modes against each other and against flax.linen Conv + BatchNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from jaxblocks.layers.conv_bn import (
    CONVBN_MODES,
    ConvBN,
    LinearBN,
    bn_batch_stats,
    convbn_mode,
    fold,
    fold_for_deploy,
    relu6_saving_output,
    relu_saving_output,
    resolve_convbn_mode,
)
from tests.kernels.harness import assert_close, rel_rms

# (name, layer kwargs, input shape): 1D/2D/3D, strided, dilated, grouped, depthwise, 1x1.
CASES = [
    ("2d_bias_relu", dict(features=6, kernel_size=(3, 3), use_conv_bias=True), (2, 7, 7, 4)),
    ("1d_strided", dict(features=5, kernel_size=(3,), strides=2), (2, 9, 3)),
    ("3d", dict(features=4, kernel_size=(2, 3, 3), padding="VALID"), (2, 4, 5, 5, 3)),
    ("grouped", dict(features=6, kernel_size=(3, 3), feature_group_count=2), (2, 6, 6, 4)),
    ("depthwise", dict(features=8, kernel_size=(3, 3), feature_group_count=4), (2, 6, 6, 4)),
    ("dilated", dict(features=4, kernel_size=(3, 3), kernel_dilation=2), (2, 8, 8, 3)),
    ("pointwise", dict(features=5, kernel_size=(1, 1)), (2, 5, 5, 6)),
    ("pad_pairs_s2", dict(features=4, kernel_size=(3, 3), strides=2, padding=1), (2, 7, 7, 3)),
]
ACTIVATIONS = {"none": None, "relu": nn.relu, "relu6": nn.relu6, "silu": nn.silu}


def _randomize(variables, seed=0):
    """Non-trivial BN parameters and running statistics (not the init's ones/zeros)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def walk(tree, col):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = walk(v, col)
                continue
            val = meta.unbox(v)
            key = next(keys)
            if col == "batch_stats" and k == "var":
                new = jax.random.uniform(key, val.shape, val.dtype, 0.3, 3.0)
            elif k == "scale":
                new = jax.random.uniform(key, val.shape, val.dtype, 0.5, 2.0)
            elif k in ("bias", "conv_bias", "dense_bias", "mean"):
                new = jax.random.normal(key, val.shape, val.dtype)
            else:
                new = val
            out[k] = v.replace_boxed(new) if isinstance(v, meta.AxisMetadata) else new
        return out

    return {col: walk(tree, col) for col, tree in variables.items()}


def _setup(kwargs, shape, activation=None, seed=0, dtype=jnp.float32, layer_dtype=None):
    layer = ConvBN(**kwargs, activation=activation, dtype=layer_dtype)
    x = jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32).astype(dtype)
    variables = _randomize(layer.init(jax.random.key(seed), x), seed)
    return layer, x, variables


def _grads(layer, variables, x, mode, cot, residual=None):
    """Gradients of <layer(x), cot> w.r.t. x and every param (not the batch stats)."""

    def f(params, x):
        y = layer.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            mode,
            residual=residual,
        )
        return jnp.sum(y.astype(jnp.float32) * cot), y

    vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (_, y), g = vg(variables["params"], x)
    return y, meta.unbox(g)


# Every geometry with relu; the other activations on a 3x3 and a 1x1 (fused-op) layer.
TUNE_CASES = [(*c, "relu") for c in CASES] + [
    (*c, act) for c in (CASES[0], CASES[6]) for act in ("none", "relu6", "silu")
]


@pytest.mark.parametrize(
    "name,kwargs,shape,act", TUNE_CASES, ids=[f"{c[0]}-{c[3]}" for c in TUNE_CASES]
)
def test_tune_equals_eval_outputs_and_every_gradient(name, kwargs, shape, act):
    layer, x, variables = _setup(kwargs, shape, ACTIVATIONS[act])
    y_eval = layer.apply(variables, x, "eval")
    cot = jax.random.normal(jax.random.key(7), y_eval.shape)
    y_e, g_e = _grads(layer, variables, x, "eval", cot)
    y_t, g_t = _grads(layer, variables, x, "tune", cot)
    assert_close(y_t, y_e, tol=1e-5, name="out")
    assert_close(g_t[1], g_e[1], tol=1e-5, name="d_x")
    want = {"kernel", "scale", "bias"} | ({"conv_bias"} if kwargs.get("use_conv_bias") else set())
    assert set(g_t[0]) == want
    for k in want:
        assert_close(g_t[0][k], g_e[0][k], tol=1e-5, name=f"d_{k}")


def test_tune_equals_eval_with_residual():
    kwargs = dict(features=4, kernel_size=(3, 3))
    layer, x, variables = _setup(kwargs, (2, 6, 6, 4), nn.relu)
    res = jax.random.normal(jax.random.key(3), (2, 6, 6, 4))
    cot = jax.random.normal(jax.random.key(7), (2, 6, 6, 4))

    def f(mode):
        def loss(params, x, res):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            return jnp.sum(layer.apply(v, x, mode, residual=res) * cot)

        return jax.grad(loss, argnums=(0, 1, 2))(variables["params"], x, res)

    assert_close(meta.unbox(f("tune")), meta.unbox(f("eval")), tol=1e-5, name="grads")
    deploy = layer.apply(fold_for_deploy(variables), x, "deploy", residual=res)
    assert_close(deploy, layer.apply(variables, x, "eval", residual=res), tol=1e-5)


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=[c[0] for c in CASES])
def test_deploy_equals_eval_after_fold(name, kwargs, shape):
    layer, x, variables = _setup(kwargs, shape, nn.relu)
    deploy_vars = fold_for_deploy(variables)
    assert set(deploy_vars) == {"params"}
    assert set(deploy_vars["params"]) == {"kernel", "bias"}
    assert_close(layer.apply(deploy_vars, x, "deploy"), layer.apply(variables, x, "eval"), tol=1e-5)


def _flax_pair(kwargs, x, variables, *, train):
    """flax.linen.Conv + BatchNorm on the same weights (the independent implementation)."""

    class Ref(nn.Module):
        @nn.compact
        def __call__(self, x):
            n = len(kwargs["kernel_size"])
            y = nn.Conv(
                kwargs["features"],
                kwargs["kernel_size"],
                strides=kwargs.get("strides", 1),
                padding=kwargs.get("padding", "SAME"),
                kernel_dilation=kwargs.get("kernel_dilation", 1),
                feature_group_count=kwargs.get("feature_group_count", 1),
                use_bias=kwargs.get("use_conv_bias", False),
                name="conv",
            )(x)
            del n
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(y)

    p = meta.unbox(variables["params"])
    conv = {"kernel": p["kernel"]} | ({"bias": p["conv_bias"]} if "conv_bias" in p else {})
    ref_vars = {
        "params": {"conv": conv, "bn": {"scale": p["scale"], "bias": p["bias"]}},
        "batch_stats": {"bn": variables["batch_stats"]},
    }
    return Ref().apply(ref_vars, x, mutable=["batch_stats"] if train else False)


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=[c[0] for c in CASES])
def test_train_and_eval_match_flax_conv_batchnorm(name, kwargs, shape):
    layer, x, variables = _setup(kwargs, shape)
    # eval
    assert_close(
        layer.apply(variables, x, "eval"), _flax_pair(kwargs, x, variables, train=False), tol=1e-5
    )
    # train: output and running-statistics update
    y, upd = layer.apply(variables, x, "train", mutable=["batch_stats"])
    y_ref, upd_ref = _flax_pair(kwargs, x, variables, train=True)
    assert_close(y, y_ref, tol=1e-5, name="train out")
    assert_close(upd["batch_stats"], upd_ref["batch_stats"]["bn"], tol=1e-5, name="stats")


def test_train_mode_running_stats_follow_flax_formula_and_batch_stats_normalize():
    kwargs = dict(features=6, kernel_size=(3, 3), use_conv_bias=True)
    layer = ConvBN(**kwargs, momentum=0.8, scale_init=nn.initializers.ones)
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3)) * 3.0 + 1.0
    variables = layer.init(jax.random.key(0), x)
    stats = {"mean": jnp.linspace(-1, 1, 6), "var": jnp.linspace(0.5, 2, 6)}
    variables = {"params": variables["params"], "batch_stats": stats}
    y, upd = layer.apply(variables, x, mutable=["batch_stats"])  # default mode: train
    p = meta.unbox(variables["params"])
    conv = jax.lax.conv_general_dilated(
        x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    conv = conv + p["conv_bias"].reshape(1, 1, 1, -1)
    mean = conv.mean(axis=(0, 1, 2))
    var = conv.var(axis=(0, 1, 2))  # biased
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.8 * stats["mean"] + 0.2 * mean, 1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.8 * stats["var"] + 0.2 * var, 1e-5)
    # scale 1, bias 0: the output is normalized by the batch statistics
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, atol=1e-3)
    m2, v2 = bn_batch_stats(conv)
    np.testing.assert_allclose(m2, mean, atol=1e-5)
    np.testing.assert_allclose(v2, var, rtol=1e-5)
    # not mutable: batch statistics still used, nothing updated, no error
    y2 = layer.apply(variables, x, "train")
    np.testing.assert_allclose(y2, y, atol=1e-6)
    # init does not count as a step: running stats start at zeros/ones
    init = layer.init(jax.random.key(0), x)
    np.testing.assert_array_equal(init["batch_stats"]["mean"], 0.0)
    np.testing.assert_array_equal(init["batch_stats"]["var"], 1.0)


@pytest.mark.parametrize("mode", ["eval", "tune", "deploy"])
def test_bf16_with_fp32_fold(mode):
    """bf16 compute, fp32 fold and statistics: within bf16 rounding of the fp32 eval output.

    Running variances span 1e-5..3 so the fold factor γ/√(σ²+ε) spans ~300x; the fold is done in
    fp32 and only the folded kernel is rounded to bf16 (tolerance: rel-RMS 2e-2).
    """
    kwargs = dict(features=8, kernel_size=(3, 3))
    layer, x, variables = _setup(kwargs, (2, 6, 6, 8), nn.relu)
    variables["batch_stats"]["var"] = jnp.geomspace(1e-5, 3.0, 8)
    ref = layer.apply(variables, x, "eval")
    vars_ = fold_for_deploy(variables) if mode == "deploy" else variables
    lo = ConvBN(**kwargs, activation=nn.relu, dtype=jnp.bfloat16)
    y = lo.apply(vars_, x, mode)
    assert y.dtype == jnp.bfloat16
    assert_close(y, ref, dtype=jnp.bfloat16, name=mode)
    # bf16 inputs with dtype=None compute in bf16 as well
    assert lo.clone(dtype=None).apply(vars_, x.astype(jnp.bfloat16), mode).dtype == jnp.bfloat16
    if mode == "tune":  # gradients too
        cot = jax.random.normal(jax.random.key(2), ref.shape)
        _, g_ref = _grads(layer, variables, x, "eval", cot)
        _, g = _grads(lo, variables, x.astype(jnp.bfloat16), "tune", cot)
        for k in ("kernel", "scale", "bias"):
            assert g[0][k].dtype == jnp.float32
            assert_close(g[0][k], g_ref[0][k], dtype=jnp.bfloat16, name=f"d_{k}")


class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = ConvBN(8, (3, 3), activation=nn.relu, mode="train")(x)
        return ConvBN(8, (1, 1), activation=nn.relu)(x)


class _UserModel(nn.Module):
    """A user's own model: ConvBN inside a submodule, a plain Dense, a LinearBN head."""

    @nn.compact
    def __call__(self, x):
        x = _Inner(name="body")(x)
        x = nn.Dense(6)(x.mean(axis=(1, 2)))
        return LinearBN(5, activation=nn.relu, name="head")(x)


def _user_setup():
    model = _UserModel()
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
    variables = _randomize(model.init(jax.random.key(0), x))
    return model, x, variables


def test_whole_model_switching_on_nested_user_model():
    model, x, variables = _user_setup()
    cot = jax.random.normal(jax.random.key(5), (4, 5))
    # One jitted apply for every mode: the context is part of jit's cache key.
    apply = jax.jit(model.apply)

    @jax.jit
    def grads_tune_and_eval(params, x):
        def loss(params, x, mode):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            with convbn_mode(mode):
                return jnp.sum(model.apply(v, x) * cot)

        g = lambda mode: jax.grad(loss, argnums=(0, 1))(params, x, mode)
        return g("tune"), g("eval")

    with convbn_mode("eval"):
        y_eval = apply(variables, x)
    with convbn_mode("tune"):
        y_tune = apply(variables, x)
    assert_close(y_tune, y_eval, tol=1e-5)
    g_tune, g_eval = meta.unbox(grads_tune_and_eval(variables["params"], x))
    assert_close(g_tune, g_eval, tol=1e-5, name="grads")
    # eval really uses the running statistics (differs from the train-mode attribute)
    y_train = model.apply(variables, x, mutable=["batch_stats"])[0]
    assert rel_rms(y_train, y_eval) > 1e-2
    # innermost context wins; variables are unchanged by the switch (same dict in all modes)
    with convbn_mode("train"), convbn_mode("eval"):
        np.testing.assert_allclose(apply(variables, x), y_eval, atol=1e-6)
    # deploy on the whole model after fold_for_deploy; other variables are kept
    deploy_vars = fold_for_deploy(variables)
    assert "Dense_0" in deploy_vars["params"] and "batch_stats" not in deploy_vars
    assert set(deploy_vars["params"]["head"]) == {"kernel", "bias"}
    with convbn_mode("deploy"):
        assert_close(apply(deploy_vars, x), y_eval, tol=1e-5)


def test_mode_is_part_of_the_jit_cache_key():
    model, x, variables = _user_setup()
    f = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"])[0])
    with convbn_mode("train"):
        y_train = f(variables, x)
    with convbn_mode("eval"):
        y_eval = f(variables, x)  # must re-trace, not reuse the train trace
    with convbn_mode("eval"):
        np.testing.assert_allclose(y_eval, model.apply(variables, x), atol=1e-6)
    assert rel_rms(y_train, y_eval) > 1e-2


class _Probe(nn.Module):
    """Returns the mode `resolve_convbn_mode` picks for its call (no variables)."""

    mode: str | None = None

    @nn.compact
    def __call__(self, mode=None, *, train=None):
        return resolve_convbn_mode(self, mode, train)


# (call mode, train, context, attribute, mutable batch_stats) -> resolved mode: every level.
PRECEDENCE = [
    # 1. the call argument wins over everything
    (("tune", True, "eval", "deploy", False), "tune"),
    (("train", False, "eval", "eval", False), "train"),
    # 2. train=True is train; train=False keeps a running-statistics context, else attribute
    ((None, True, "eval", "tune", False), "train"),
    ((None, False, "tune", None, False), "tune"),
    ((None, False, "deploy", "eval", False), "deploy"),
    ((None, False, None, "deploy", False), "deploy"),
    ((None, False, "train", "tune", True), "eval"),
    ((None, False, None, "train", True), "eval"),
    ((None, False, None, None, True), "eval"),
    # 3. the context wins over the attribute
    ((None, None, "eval", "train", True), "eval"),
    ((None, None, "train", "deploy", False), "train"),
    # 4. the attribute
    ((None, None, None, "tune", False), "tune"),
    ((None, None, None, "train", False), "train"),
    # 5. nothing asked: train only when batch_stats is mutable
    ((None, None, None, None, True), "train"),
]


@pytest.mark.parametrize("case,want", PRECEDENCE)
def test_mode_precedence_every_level(case, want):
    mode, train, ctx, attr, mutable = case
    probe = _Probe(mode=attr)
    kwargs = {"mutable": ["batch_stats"]} if mutable else {}

    def run():
        out = probe.apply({}, mode, train=train, **kwargs)
        return out[0] if mutable else out

    if ctx is None:
        assert run() == want
    else:
        with convbn_mode(ctx):
            assert run() == want
        with convbn_mode("train" if ctx != "train" else "eval"), convbn_mode(ctx):
            assert run() == want  # the innermost context


def test_nothing_asked_without_mutable_batch_stats_is_an_error():
    probe = _Probe()
    with pytest.raises(ValueError, match=r"_Probe: no ConvBN mode was asked for"):
        probe.apply({})
    assert probe.init_with_output(jax.random.key(0))[0] == "train"  # initializing: train
    assert probe.apply({}, mutable=True)[0] == "train"
    with pytest.raises(TypeError, match=r"train must be a bool or None, got 1"):
        probe.apply({}, train=1)


def _layer_cases():
    conv = ConvBN(4, (3, 3), activation=nn.relu)
    dense = LinearBN(4, activation=nn.relu)
    return {"ConvBN": (conv, (2, 5, 5, 3)), "LinearBN": (dense, (6, 3))}


@pytest.mark.parametrize("kind", ["ConvBN", "LinearBN"])
def test_layer_mode_precedence(kind):
    layer, shape = _layer_cases()[kind]
    x = jax.random.normal(jax.random.key(1), shape)
    variables = _randomize(layer.init(jax.random.key(0), x))
    folded = fold_for_deploy(variables)
    y_train, upd = layer.apply(variables, x, "train", mutable=["batch_stats"])
    y_eval = layer.apply(variables, x, "eval")
    assert rel_rms(y_train, y_eval) > 1e-2  # the two statistics really differ
    same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # 1. call argument over train=, context and attribute
    with convbn_mode("eval"):
        same(layer.clone(mode="eval").apply(variables, x, "train", train=False), y_train)
    # 2. train=True / train=False
    with convbn_mode("eval"):
        same(layer.apply(variables, x, train=True), y_train)
    same(layer.apply(variables, x, train=False), y_eval)
    same(layer.clone(mode="train").apply(variables, x, train=False), y_eval)
    with convbn_mode("deploy"):  # train=False keeps deploy: folded variables work
        same(layer.apply(folded, x, train=False), y_eval)
    same(layer.clone(mode="deploy").apply(folded, x, train=False), y_eval)
    # 3. context over attribute
    with convbn_mode("eval"):
        same(layer.clone(mode="train").apply(variables, x), y_eval)
    with convbn_mode("train"), convbn_mode("eval"):  # innermost
        same(layer.apply(variables, x), y_eval)
    # 4. attribute
    same(layer.clone(mode="eval").apply(variables, x), y_eval)
    # 5. nothing asked: train with mutable batch_stats (updated), else an error naming the layer
    y, upd5 = layer.apply(variables, x, mutable=["batch_stats"])
    same(y, y_train)
    assert_close(upd5, upd, tol=1e-6)
    assert not np.allclose(upd5["batch_stats"]["mean"], variables["batch_stats"]["mean"])
    with pytest.raises(
        ValueError,
        match=rf"{kind}: no ConvBN mode .*mode='eval' .*train=False.*convbn_mode\('eval'\).*"
        r"mutable=\['batch_stats'\]",
    ):
        layer.apply(variables, x)
    assert CONVBN_MODES == ("train", "eval", "tune", "deploy")


def test_mode_error_names_the_nested_layer():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return ConvBN(4, (3, 3), name="stem")(x)

    net = Net()
    x = jnp.ones((1, 4, 4, 2))
    variables = net.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"ConvBN at 'stem': no ConvBN mode was asked for"):
        net.apply(variables, x)
    with convbn_mode("eval"):
        assert net.apply(variables, x).shape == (1, 4, 4, 4)


@pytest.mark.parametrize("int_dtype", [jnp.int8, jnp.int32, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize("mode", ["train", "eval", "tune"])
def test_integer_inputs_are_promoted_not_truncated(int_dtype, mode):
    key = jax.random.key(3)
    if int_dtype == jnp.bool_:
        x_int = jax.random.bernoulli(key, 0.5, (2, 6, 6, 3))
    else:
        hi = 100 if int_dtype != jnp.uint8 else 255
        lo = -100 if int_dtype != jnp.uint8 else 0
        x_int = jax.random.randint(key, (2, 6, 6, 3), lo, hi).astype(int_dtype)
    x_f = x_int.astype(jnp.float32)
    for layer, xi, xf in (
        (ConvBN(4, (3, 3), activation=nn.relu), x_int, x_f),
        (LinearBN(4), x_int[:, 0, 0], x_f[:, 0, 0]),
    ):
        variables = _randomize(layer.init(jax.random.key(0), xi))
        y_int = layer.apply(variables, xi, mode)
        y_f = layer.apply(variables, xf, mode)
        assert y_int.dtype == jnp.float32
        np.testing.assert_array_equal(y_int, y_f)
        # the fractional part survives (an int compute dtype would truncate it)
        assert not np.allclose(y_f, np.round(y_f))
    # an explicit dtype still wins
    conv = ConvBN(4, (3, 3))
    variables = conv.init(jax.random.key(0), x_int)
    assert conv.clone(dtype=jnp.bfloat16).apply(variables, x_int, mode).dtype == jnp.bfloat16


@pytest.mark.parametrize("mode", ["train", "eval", "tune"])
def test_linear_bn_modes(mode):
    layer = LinearBN(7, use_dense_bias=True, activation=nn.relu)
    x = jax.random.normal(jax.random.key(1), (3, 4, 5))  # extra leading dim: stats over B, T
    variables = _randomize(layer.init(jax.random.key(0), x))
    p = meta.unbox(variables["params"])
    st = variables["batch_stats"]
    with jax.numpy_rank_promotion("allow"):  # the reference broadcasts [F] over [B, T, F]
        h = x @ p["kernel"] + p["dense_bias"]
        if mode == "train":
            mean, var = h.mean(axis=(0, 1)), h.var(axis=(0, 1))
        else:
            mean, var = st["mean"], st["var"]
        want = jax.nn.relu((h - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"])
    assert_close(layer.apply(variables, x, mode), want, tol=1e-5)
    if mode == "tune":
        cot = jax.random.normal(jax.random.key(3), want.shape)
        _, g_t = _grads(layer, variables, x, "tune", cot)
        _, g_e = _grads(layer, variables, x, "eval", cot)
        assert_close(g_t, g_e, tol=1e-5, name="grads")
        deploy = layer.apply(fold_for_deploy(variables), x, "deploy")
        assert_close(deploy, want, tol=1e-5)


def test_fold_function_and_logical_axes():
    layer, x, variables = _setup(
        dict(features=4, kernel_size=(3, 3), use_conv_bias=True), (1, 4, 4, 2)
    )
    p, st = meta.unbox(variables["params"]), variables["batch_stats"]
    w, b = fold(p["kernel"], p["scale"], p["bias"], st["mean"], st["var"], p["conv_bias"])
    c = p["scale"] / jnp.sqrt(st["var"] + 1e-5)
    np.testing.assert_allclose(w, p["kernel"] * c.reshape(1, 1, 1, -1), rtol=1e-6)
    np.testing.assert_allclose(b, p["bias"] + c * (p["conv_bias"] - st["mean"]), rtol=1e-5)
    spec = nn.get_partition_spec(variables["params"])
    assert tuple(spec["kernel"]) == (None, None, "conv_in", "conv_out")
    assert tuple(spec["scale"]) == ("conv_out",)
    head = LinearBN(3).init(jax.random.key(0), jnp.ones((2, 4)))
    assert tuple(nn.get_partition_spec(head["params"])["kernel"]) == ("embed", "mlp")
    # deploy init creates the folded layout directly
    dep = layer.clone(mode="deploy").init(jax.random.key(0), x)
    assert set(dep) == {"params"} and set(dep["params"]) == {"kernel", "bias"}


def test_lean_relus_match_jax():
    z = jnp.array([-2.0, -0.0, 0.0, 0.5, 5.9, 6.0, 7.0, jnp.nan])
    for lean, ref in ((relu_saving_output, jax.nn.relu), (relu6_saving_output, jax.nn.relu6)):
        np.testing.assert_array_equal(lean(z), ref(z))
        g = jax.grad(lambda z, f=lean: jnp.sum(f(z) * jnp.arange(8.0)))(z)
        g_ref = jax.grad(lambda z, f=ref: jnp.sum(f(z) * jnp.arange(8.0)))(z)
        np.testing.assert_array_equal(g, g_ref)


def _temp_bytes(model, variables, x, mode):
    def loss(params, stats, x):
        with convbn_mode(mode):
            return jnp.mean(model.apply({"params": params, **stats}, x) ** 2)

    stats = {k: v for k, v in variables.items() if k != "params"}
    compiled = jax.jit(jax.grad(loss)).lower(variables["params"], stats, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("act,groups", [(nn.relu, 1), (nn.relu6, 16)], ids=["relu", "dw-relu6"])
def test_tune_mode_backward_keeps_about_one_tensor_per_layer(act, groups):
    """Tune keeps each layer's conv input only (XLA:CPU temp memory), eval also the conv output."""

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(6):
                x = ConvBN(16, (3, 3), feature_group_count=groups, activation=act)(x)
            return x

    model, x = Stack(), jnp.ones((8, 16, 16, 16))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    act_bytes = x.size * 4
    eval_b = _temp_bytes(model, variables, x, "eval")
    tune_b = _temp_bytes(model, variables, x, "tune")
    deploy_b = _temp_bytes(model, jax.eval_shape(fold_for_deploy, variables), x, "deploy")
    assert tune_b <= 0.6 * eval_b, (tune_b / act_bytes, eval_b / act_bytes)
    # 6 layer outputs + backward transients (9 measured, eval 19)
    assert tune_b <= 10 * act_bytes, tune_b / act_bytes
    assert abs(tune_b - deploy_b) <= act_bytes


# ---------------------------------------------------------------------------------------------
# Bad inputs.


def test_errors_name_the_argument():
    layer = ConvBN(4, (3, 3))
    x = jnp.ones((2, 5, 5, 3))
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x must have rank 4 .*kernel_size of length 2"):
        layer.init(jax.random.key(0), jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match=r"x has 5 channels.*params\['kernel'\].*\(3, 3, 3, 4\)"):
        layer.apply(variables, jnp.ones((2, 5, 5, 5)), "eval")
    with pytest.raises(ValueError, match=r"feature_group_count=2 must .*x.shape\[-1\]=3"):
        ConvBN(4, (3, 3), feature_group_count=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"strides must be .* 2 positive ints"):
        ConvBN(4, (3, 3), strides=(1, 1, 1)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"padding must be"):
        ConvBN(4, (3, 3), padding="FULL").init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"kernel_size must be a sequence"):
        ConvBN(4, 3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x has 5 features .*params\['kernel'\]"):
        head = LinearBN(3)
        head.apply(head.init(jax.random.key(0), jnp.ones((2, 4))), jnp.ones((2, 5)), "eval")
    with pytest.raises(ValueError, match=r"LinearBN.*x must have rank >= 2"):
        LinearBN(3).init(jax.random.key(0), jnp.ones((4,)))


def test_unknown_mode_errors():
    layer = ConvBN(4, (3, 3))
    x = jnp.ones((1, 4, 4, 2))
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"`mode` attribute must be one of .*'fold'"):
        layer.clone(mode="fold").apply(variables, x)
    with pytest.raises(ValueError, match=r"`mode` call argument must be one of .*'Eval'"):
        layer.apply(variables, x, "Eval")
    with pytest.raises(ValueError, match=r"convbn_mode: mode must be one of .*'inference'"):
        with convbn_mode("inference"):
            pass


def test_deploy_and_unfolded_variables_are_not_mixed_up():
    layer = ConvBN(4, (3, 3))
    x = jnp.ones((1, 4, 4, 2))
    variables = layer.init(jax.random.key(0), x)
    deploy_vars = fold_for_deploy(variables)
    for mode in ("train", "eval", "tune"):
        with pytest.raises(ValueError, match=rf"mode='{mode}' needs .*got deploy \(folded\)"):
            layer.apply(deploy_vars, x, mode)
    with pytest.raises(ValueError, match=r"mode='deploy' needs folded .*fold_for_deploy"):
        layer.apply(variables, x, "deploy")
    with pytest.raises(ValueError, match=r"needs batch_stats\['mean'\], it is missing"):
        layer.apply({"params": variables["params"]}, x, "tune")
    with pytest.raises(ValueError, match=r"needs params\['conv_bias'\]"):
        layer.clone(use_conv_bias=True).apply(variables, x, "eval")
    with pytest.raises(ValueError, match=r"fold_for_deploy: variables have no 'batch_stats'"):
        fold_for_deploy(deploy_vars)
    with pytest.raises(ValueError, match=r"fold_for_deploy: found no ConvBN"):
        fold_for_deploy({"params": {"Dense_0": {"kernel": x}}, "batch_stats": {"a": {}}})


@pytest.mark.parametrize("mode", CONVBN_MODES)
def test_nan_input_propagates(mode):
    kwargs = dict(features=4, kernel_size=(3, 3), padding="VALID")
    layer, x, variables = _setup(kwargs, (2, 7, 7, 3))
    x = x.at[0, 0, 0, 0].set(jnp.nan)
    vars_ = fold_for_deploy(variables) if mode == "deploy" else variables
    y = layer.apply(vars_, x, mode)
    if mode == "train":  # batch statistics: the NaN reaches every output of the batch
        assert bool(jnp.all(jnp.isnan(y)))
    else:  # only the outputs whose window covers the NaN
        assert bool(jnp.all(jnp.isnan(y[0, 0, 0])))
        assert bool(jnp.all(jnp.isfinite(y[1])))
        assert bool(jnp.all(jnp.isfinite(y[0, 1:, 1:])))
