"""ConvBN / LinearBN auxiliary BatchNorm (AdvProp / ConAdv): selection, statistics, fold, models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from jaxblocks.layers.conv_bn import ConvBN, LinearBN, fold_for_deploy
from jaxblocks.models.mobilenet import MobileNetV2
from jaxblocks.models.resnet import ResNet
from tests.kernels.harness import assert_close, rel_rms

AUX = ("scale_aux", "bias_aux", "mean_aux", "var_aux")
LAYERS = {
    "conv": (
        lambda **kw: ConvBN(6, (3, 3), use_conv_bias=True, activation=nn.relu, **kw),
        (2, 7, 7, 4),
    ),
    "linear": (lambda **kw: LinearBN(5, activation=nn.relu6, **kw), (3, 4, 6)),
}


def _randomize(variables, seed=0):
    """Random, distinct values for every BN parameter and statistic (main and auxiliary)."""
    keys = iter(jax.random.split(jax.random.key(seed), 256))

    def walk(tree):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = walk(v)
                continue
            val, key = meta.unbox(v), next(keys)
            if k.startswith(("var", "scale")):
                new = jax.random.uniform(key, val.shape, val.dtype, 0.3, 3.0)
            elif k.startswith(("mean", "bias", "conv_bias")):
                new = jax.random.normal(key, val.shape, val.dtype)
            else:
                new = val
            out[k] = v.replace_boxed(new) if isinstance(v, meta.AxisMetadata) else new
        return out

    return {col: walk(tree) for col, tree in variables.items()}


def _split(variables, *, aux: bool):
    """Variables of the plain layer (no aux_bn) holding the main or the auxiliary BN."""
    p, s = dict(variables["params"]), dict(variables["batch_stats"])
    if aux:
        p["scale"], p["bias"] = p["scale_aux"], p["bias_aux"]
        s["mean"], s["var"] = s["mean_aux"], s["var_aux"]
    for k in ("scale_aux", "bias_aux"):
        p.pop(k)
    for k in ("mean_aux", "var_aux"):
        s.pop(k)
    return {"params": p, "batch_stats": s}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("mode", ["train", "eval", "tune"])
def test_aux_bn_is_a_second_batchnorm_selected_per_call(kind, mode):
    make, shape = LAYERS[kind]
    layer, plain = make(aux_bn=True), make()
    x = jax.random.normal(jax.random.key(1), shape)
    variables = _randomize(layer.init(jax.random.key(0), x))
    assert set(AUX[:2]) <= set(variables["params"]) and set(AUX[2:]) <= set(
        variables["batch_stats"]
    )
    mut = ["batch_stats"] if mode == "train" else False
    for use_aux in (False, True):
        got = layer.apply(variables, x, mode, use_aux=use_aux, mutable=mut)
        want = plain.apply(_split(variables, aux=use_aux), x, mode, mutable=mut)
        if mode != "train":
            assert_close(got, want, tol=1e-6)
            continue
        (y, upd), (y_want, upd_want) = got, want
        assert_close(y, y_want, tol=1e-6)
        # Train mode updates the statistics of the BN it used, and only those.
        new, old = upd["batch_stats"], variables["batch_stats"]
        used, other = (("mean_aux", "var_aux"), ("mean", "var"))[:: 1 if use_aux else -1]
        for a, b in zip(used, ("mean", "var"), strict=True):
            np.testing.assert_allclose(new[a], upd_want["batch_stats"][b], rtol=1e-6)
            assert not np.allclose(new[a], old[a])
        for a in other:
            np.testing.assert_array_equal(new[a], old[a])
    # The two BNs really differ on these inputs (the checks above could tell them apart).
    y_main = layer.apply(variables, x, mode, mutable=mut)
    y_aux = layer.apply(variables, x, mode, use_aux=True, mutable=mut)
    assert rel_rms(jax.tree.leaves(y_aux)[0], jax.tree.leaves(y_main)[0]) > 0.05


def test_aux_bn_tune_gradients_equal_eval_gradients():
    make, shape = LAYERS["conv"]
    layer = make(aux_bn=True)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = _randomize(layer.init(jax.random.key(0), x))
    cot = jax.random.normal(jax.random.key(2), (2, 7, 7, 6))

    def grads(mode):
        def f(params, x):
            y = layer.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, mode, use_aux=True
            )
            return jnp.sum(y * cot)

        return meta.unbox(jax.grad(f, argnums=(0, 1))(variables["params"], x))

    g_tune, g_eval = grads("tune"), grads("eval")
    assert_close(g_tune, g_eval, tol=1e-5)
    # Only the auxiliary affine gets a gradient from an auxiliary call.
    assert float(jnp.abs(g_eval[0]["scale"]).max()) == 0.0
    assert float(jnp.abs(g_eval[0]["scale_aux"]).max()) > 0.0


def test_aux_bn_errors_name_the_layer_and_argument():
    make, shape = LAYERS["conv"]
    x = jnp.ones(shape)
    plain = make()
    v = plain.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"ConvBN.*use_aux=True.*aux_bn=True"):
        plain.apply(v, x, "eval", use_aux=True)
    layer = make(aux_bn=True)
    va = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"use_aux=True is not available in mode='deploy'"):
        layer.apply(fold_for_deploy(va), x, "deploy", use_aux=True)
    with pytest.raises(TypeError, match=r"use_aux must be a bool"):
        layer.apply(va, x, "eval", use_aux="yes")
    # Variables without the auxiliary BN (a checkpoint of a plain layer) -> a clear error.
    with pytest.raises(ValueError, match=r"params\['scale_aux'\], it is missing"):
        layer.apply(v, x, "eval")


def test_fold_for_deploy_drops_the_aux_bn_and_matches_eval():
    make, shape = LAYERS["conv"]
    layer = make(aux_bn=True)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = _randomize(layer.init(jax.random.key(0), x))
    folded = fold_for_deploy(variables)
    assert set(folded) == {"params"} and set(folded["params"]) == {"kernel", "bias"}
    assert_close(layer.apply(folded, x, "deploy"), layer.apply(variables, x, "eval"), tol=1e-5)


@pytest.mark.parametrize(
    "model",
    [
        ResNet(stage_sizes=(1, 1), block="basic", num_classes=3, width=4, stem="small"),
        ResNet(stage_sizes=(1,), block="bottleneck", num_classes=3, width=4, stem="imagenet"),
        MobileNetV2(num_classes=3, width_multiplier=0.25, stem_strides=1),
    ],
    ids=["resnet_basic", "resnet_bottleneck", "mobilenet_v2"],
)
def test_models_route_use_aux_to_every_convbn(model):
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    aux_model = model.clone(aux_bn=True)
    variables = aux_model.init(jax.random.key(0), x)
    n_convbn = sum(1 for path, _ in _paths(variables["batch_stats"]) if path[-1] == "mean")
    n_aux = sum(1 for path, _ in _paths(variables["batch_stats"]) if path[-1] == "mean_aux")
    assert n_convbn == n_aux > 0
    # Train-mode call with use_aux: every auxiliary statistic moves, no main one does.
    _, upd = aux_model.apply(variables, x, train=True, use_aux=True, mutable=["batch_stats"])
    for path, old in _paths(variables["batch_stats"]):
        new = _get(upd["batch_stats"], path)
        if path[-1] == "var_aux":
            assert not np.allclose(new, old), path
        elif path[-1] == "mean_aux":  # may stay ~0 after a BN without activation: any change
            assert not np.array_equal(new, old), path
        else:
            np.testing.assert_array_equal(new, old)
    # Eval: the auxiliary BN holds different statistics now, so the logits differ.
    v2 = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
    y_main = aux_model.apply(v2, x, train=False)
    y_aux = aux_model.apply(v2, x, train=False, use_aux=True)
    assert rel_rms(y_aux, y_main) > 1e-3
    # Without aux_bn the model refuses use_aux, naming a layer.
    plain_vars = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"ConvBN at .*aux_bn=True"):
        model.apply(plain_vars, x, train=False, use_aux=True)


def _paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))
        else:
            yield (*prefix, k), np.asarray(v)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)
