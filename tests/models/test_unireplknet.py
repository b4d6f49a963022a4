"""UniRepLKNet models (arXiv 2311.15599): presets, kernel tables, parameter counts (official, both
forms), layout, re-parameterisation of a whole model, errors."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.unireplknet import (
    DEFAULT_KERNEL_SIZES,
    UNIREPLKNET_DEPLOY_PARAMS,
    UNIREPLKNET_LARGE_PRESETS,
    UNIREPLKNET_PARAMS,
    UNIREPLKNET_PRESETS,
    UniRepLKNet,
    UniRepLKNetConfig,
    default_kernel_sizes,
    reparameterize,
    unireplknet_param_count,
)
from jaxblocks.registry import create_model, list_models, model_info

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
ALL_PRESETS = {**UNIREPLKNET_PRESETS, **UNIREPLKNET_LARGE_PRESETS}
TINY = dict(
    depths=(1, 1, 2, 1),
    dims=(16, 32, 48, 64),
    kernel_sizes=((3,), (7,), (13, 3), (5,)),
    num_classes=7,
)
# The official README's #params column (millions, as printed).
README_PARAMS_M = {"a": 4.4, "f": 6.2, "p": 10.7, "n": 18.3, "t": 31, "s": 56, "b": 98,
                   "l": 218, "xl": 386}  # fmt: skip


def _n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, size: int = 32):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))


def _random_variables(model, x, seed: int):
    """Random params around 0 (LN/BN scales around 1, layer scale ~0.3) and random running
    statistics, shapes from `jax.eval_shape` (NumPy draws: nothing compiled)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
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


# ----------------------------------------------------------------------------- presets


def test_presets_are_the_official_ones():
    want = {
        "a": ((2, 2, 6, 2), (40, 80, 160, 320)),
        "f": ((2, 2, 6, 2), (48, 96, 192, 384)),
        "p": ((2, 2, 6, 2), (64, 128, 256, 512)),
        "n": ((2, 2, 8, 2), (80, 160, 320, 640)),
        "t": ((3, 3, 18, 3), (80, 160, 320, 640)),
        "s": ((3, 3, 27, 3), (96, 192, 384, 768)),
        "b": ((3, 3, 27, 3), (128, 256, 512, 1024)),
        "l": ((3, 3, 27, 3), (192, 384, 768, 1536)),
        "xl": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    }
    assert {f"unireplknet_{k}" for k in want} == set(ALL_PRESETS)
    for k, (depths, dims) in want.items():
        cfg = ALL_PRESETS[f"unireplknet_{k}"]
        assert (cfg.depths, cfg.dims, cfg.kernel_sizes) == (depths, dims, None)
    registered = set(list_models("unireplknet*"))
    assert registered == {f"unireplknet_{k}" for k in "afpnts"}
    info = model_info("unireplknet_a")
    assert info.arxiv == "2311.15599" and info.published_params == 4_649_060


def test_default_kernel_sizes_are_the_official_tables():
    # Transcribed from the official default_UniRepLKNet_*_kernel_sizes.
    afp = ((3, 3), (13, 13), (13, 13, 13, 13, 13, 13), (13, 13))
    n = ((3, 3), (13, 13), (13,) * 8, (13, 13))
    t = (
        (3, 3, 3),
        (13, 13, 13),
        (13, 3, 13, 3, 13, 3, 13, 3, 13, 3, 13, 3, 13, 3, 13, 3, 13, 3),
        (13, 13, 13),
    )
    s = ((3, 3, 3), (13, 13, 13),
         (13, 3, 3, 13, 3, 3, 13, 3, 3, 13, 3, 3, 13, 3, 3, 13, 3, 3, 13, 3, 3, 13, 3, 3, 13, 3,
          3), (13, 13, 13))  # fmt: skip
    assert default_kernel_sizes((2, 2, 6, 2)) == afp
    assert default_kernel_sizes((2, 2, 8, 2)) == n
    assert default_kernel_sizes((3, 3, 18, 3)) == t
    assert default_kernel_sizes((3, 3, 27, 3)) == s
    assert len(DEFAULT_KERNEL_SIZES) == 4
    with pytest.raises(ValueError, match=r"no default kernel sizes for depths=\(1, 2\)"):
        default_kernel_sizes((1, 2))


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("name", sorted(ALL_PRESETS))
def test_param_counts_closed_form_equal_official(name):
    cfg = ALL_PRESETS[name]
    assert unireplknet_param_count(cfg) == UNIREPLKNET_PARAMS[name]
    deploy = dataclasses.replace(cfg, deploy=True)
    assert unireplknet_param_count(deploy) == UNIREPLKNET_DEPLOY_PARAMS[name]
    # The README's rounded #params are the deploy form's, to the printed digit.
    printed = README_PARAMS_M[name.removeprefix("unireplknet_")]
    unit = 1.0 if float(printed).is_integer() else 0.1
    assert abs(UNIREPLKNET_DEPLOY_PARAMS[name] / 1e6 - printed) < unit, name


@pytest.mark.parametrize("name", ["unireplknet_a", "unireplknet_t", "unireplknet_b"])
def test_param_counts_eval_shape_both_forms(name):
    cfg = ALL_PRESETS[name]
    for deploy, want in ((False, UNIREPLKNET_PARAMS), (True, UNIREPLKNET_DEPLOY_PARAMS)):
        abstract = _abstract(UniRepLKNet.from_config(cfg, deploy=deploy))
        assert _n_params(abstract["params"]) == want[name], (name, deploy)
        assert ("batch_stats" in abstract) is not deploy


def test_tiny_config_counts_and_layout():
    cfg = UniRepLKNetConfig(**TINY)
    abstract = _abstract(UniRepLKNet.from_config(cfg))
    assert _n_params(abstract["params"]) == unireplknet_param_count(cfg)
    p = jax.tree.map(jnp.shape, abstract["params"])
    # Official names: downsample_layers.0.{0,1,3,4} (stem), downsample_layers.i.{0,1}, stages.i.j.
    assert p["downsample_layers_0_0"] == {"kernel": (3, 3, 3, 8), "bias": (8,)}
    assert p["downsample_layers_0_1"] == {"scale": (8,), "bias": (8,)}
    assert p["downsample_layers_0_3"] == {"kernel": (3, 3, 8, 16), "bias": (16,)}
    assert p["downsample_layers_2_0"] == {"kernel": (3, 3, 32, 48), "bias": (48,)}
    assert p["stages_1_0"]["dwconv"]["lk_origin"] == {"kernel": (7, 7, 1, 32)}
    assert p["stages_2_1"]["dwconv"] == {"kernel": (3, 3, 1, 48)}
    assert p["norm"] == {"scale": (64,), "bias": (64,)}
    assert p["head"] == {"kernel": (64, 7), "bias": (7,)}


# ----------------------------------------------------------------------------- numerics


def test_model_reparameterize_equivalence_and_train_mode():
    model = UniRepLKNet(**TINY)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    v = _random_variables(model, x, 1)
    y = jit(functools.partial(model.apply, train=False))(v, x)
    assert y.shape == (2, 7) and bool(jnp.all(jnp.isfinite(y)))
    fast = UniRepLKNet(**TINY, deploy=True)
    dv = reparameterize(v)
    assert set(dv) == {"params"}  # UniRepLKNet's only BatchNorms are in the blocks
    assert jax.tree.map(jnp.shape, dv) == jax.tree.map(jnp.shape, _abstract(fast))
    y_fast = jit(fast.apply)(dv, x)
    err = float(jnp.max(jnp.abs(y_fast - y)))
    assert err <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(y)))), err
    # Train mode normalises with the batch statistics and moves every running statistic.
    y_train, upd = jit(functools.partial(model.apply, mutable=["batch_stats"]))(v, x)
    assert float(jnp.max(jnp.abs(y_train - y))) > 1e-3
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved))


def test_head_init_scale_and_features():
    one_stage = dict(depths=(1,), dims=(16,), kernel_sizes=((3,),), num_classes=7)
    x = jnp.ones((1, 8, 8, 3))
    base = nn.unbox(jit(UniRepLKNet(**one_stage).init)(jax.random.key(0), x))["params"]["head"]
    scaled = UniRepLKNet(**one_stage, head_init_scale=0.25)
    head = nn.unbox(jit(scaled.init)(jax.random.key(0), x))["params"]["head"]
    np.testing.assert_allclose(head["kernel"], 0.25 * base["kernel"], rtol=1e-6)
    assert float(jnp.std(base["kernel"])) == pytest.approx(0.02, rel=0.3)  # trunc_normal(0.02)
    x = jnp.ones((1, 32, 32, 3))
    features = UniRepLKNet(**{**TINY, "num_classes": 0})
    out = jax.eval_shape(
        functools.partial(features.apply, train=False), _abstract(features), x
    )  # fmt: skip
    assert out.shape == (1, 64)
    model = create_model("unireplknet_a", **TINY)
    assert isinstance(model, UniRepLKNet) and model.kernel_sizes == TINY["kernel_sizes"]


def test_bf16_and_non_square_inputs():
    model = UniRepLKNet(**TINY, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 40, 56, 3), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(abstract))
    out = jax.eval_shape(functools.partial(model.apply, train=False), abstract, x)
    assert out.shape == (2, 7) and out.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- errors


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match=r"unsupported sizes \[19\]; supported are \[0, 3, 5, 7"):
        UniRepLKNetConfig(**{**TINY, "kernel_sizes": ((3,), (19,), (13, 3), (5,))})
    with pytest.raises(ValueError, match="one tuple per stage with one entry per block"):
        UniRepLKNetConfig(**{**TINY, "kernel_sizes": ((3,), (7,), (13,), (5,))})
    with pytest.raises(ValueError, match="no default kernel sizes for depths"):
        UniRepLKNetConfig(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))
    with pytest.raises(ValueError, match=r"dims must have one entry >= 4 per stage"):
        UniRepLKNetConfig(**{**TINY, "dims": (15, 32, 48, 64)})
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        UniRepLKNetConfig(**{**TINY, "drop_path_rate": 1.0})
    model = UniRepLKNet(**TINY)
    with pytest.raises(ValueError, match=r"NHWC \[B, H, W, C\], got shape \(32, 32, 3\)"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((32, 32, 3)))
    abstract = _abstract(model)
    with pytest.raises(ValueError, match="pass train=False"):
        jax.eval_shape(model.apply, abstract, jnp.ones((1, 32, 32, 3)))
    fast = UniRepLKNet(**TINY, deploy=True)
    with pytest.raises(ValueError, match="deploy=True is the inference form"):
        jax.eval_shape(functools.partial(fast.apply, train=True), _abstract(fast),
                       jnp.ones((1, 32, 32, 3)))  # fmt: skip
