"""Stage features of the vision backbones: ``model.apply(variables, x, features=True)`` returns
every stage's output (timm's ``features_only``) for dense heads and composite backbones.

One preset per family, built with its registration's ``tiny`` overrides and traced with
`jax.eval_shape`: the features are NHWC with the batch kept and the resolution never increasing
from stage to stage; they are computed from the classifier's own parameters (an init with
``features=True`` creates a subset of the full model's parameters, same names and shapes, so
pretrained weights give features). On ResNet, numerically: the last stage's output is what the
classifier pools.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.registry import create_model, example_input, model_info

# (preset, number of stages at the tiny overrides)
FAMILIES = {
    "resnet18": 4,
    "mobilenet_v2": 5,
    "inception_next_atto": None,
    "unireplknet_a": None,
    "ffnet_1": None,
    "tiny_moat_0": None,
    "nextvit_small": None,
    "uniformer_xxs": None,
    "emov2_1m": None,
    "raftmlp_s": None,
    "bossnet_t0": None,
    "convfirst_net_tiny": None,
    "hyperbolic_resnet20": None,
    "msvmamba_nano": 4,
    "mcunet_in1": 5,
    "slab_pvt_tiny": 4,
    "slab_swin_tiny": 4,
}


def _call_kwargs(model) -> dict:
    params = inspect.signature(type(model).__call__).parameters
    if "train" in params:
        return {"train": False}
    if "deterministic" in params:
        return {"deterministic": True}
    return {}


def _flat(tree) -> dict:
    return {
        jax.tree_util.keystr(path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_features_are_the_stage_outputs_of_the_classifier(name):
    tiny = model_info(name).tiny
    model = create_model(name, **tiny)
    x = example_input(name, **tiny)
    kw = _call_kwargs(model)
    full = jax.eval_shape(lambda: model.init(jax.random.key(0), x, **kw))
    feats_only = jax.eval_shape(lambda: model.init(jax.random.key(0), x, features=True, **kw))
    full_p, feat_p = _flat(full["params"]), _flat(feats_only["params"])
    assert feat_p and set(feat_p) < set(full_p), "features=True must not create new parameters"
    assert all(full_p[k] == v for k, v in feat_p.items())

    # Traced only (the numerics are ResNet's test below and each family's own tests).
    feats = jax.eval_shape(lambda v: model.apply(v, x, features=True, **kw), full)
    assert isinstance(feats, tuple) and len(feats) >= 2
    if FAMILIES[name] is not None:
        assert len(feats) == FAMILIES[name]
    sizes = []
    for f in feats:
        assert f.ndim == 4 and f.shape[0] == x.shape[0], f.shape
        sizes.append(f.shape[1] * f.shape[2])
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]


def test_resnet_last_feature_is_what_the_head_pools():
    tiny = model_info("resnet18").tiny
    model = create_model("resnet18", **dict(tiny, num_classes=0))
    x = jax.random.normal(jax.random.key(3), example_input("resnet18", **tiny).shape)
    variables = model.init(jax.random.key(0), x, train=False)
    feats = model.apply(variables, x, features=True, train=False)
    pooled = model.apply(variables, x, train=False)
    assert [f.shape[-1] for f in feats] == [tiny["width"] * 2**i for i in range(4)]
    np.testing.assert_allclose(
        np.asarray(jnp.mean(feats[-1], axis=(1, 2))), np.asarray(pooled), rtol=1e-5, atol=1e-6
    )


def test_mobilenet_features_end_each_resolution():
    model = create_model("mobilenet_v2", num_classes=10)
    x = jnp.zeros((1, 64, 64, 3))
    feats = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, features=True,
                                                          train=False)[0])  # fmt: skip
    assert [f.shape for f in feats] == [
        (1, 32, 32, 16), (1, 16, 16, 24), (1, 8, 8, 32), (1, 4, 4, 96), (1, 2, 2, 320)
    ]  # fmt: skip
