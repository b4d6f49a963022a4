"""MOAT (arXiv 2210.01820): deeplab2's parameter counts with and without position embeddings,
the official layout (stem, head, per-block names), stage features, window attention at model
level, the official drop-path schedule, and the input/config errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.moat import (
    MOAT_PARAMS,
    MOAT_PARAMS_NO_PE,
    MOAT_PRESETS,
    MOATConfig,
    min_input_size,
    moat_drop_path_rates,
)
from jaxblocks.registry import create_model, model_info

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
TINY = dict(model_info("tiny_moat_0").tiny)


def _rand(seed: int, shape) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _abstract_params(name: str, size: int = 32, **overrides):
    model = create_model(name, **overrides)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]


def _count(params) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


def test_tiny_moat_0_counts_with_and_without_position_embedding():
    with_pe = _count(_abstract_params("tiny_moat_0"))
    no_pe = _count(_abstract_params("tiny_moat_0", relative_position_embedding=False))
    assert with_pe == MOAT_PARAMS["tiny_moat_0"] == 3_355_348
    assert no_pe == MOAT_PARAMS_NO_PE["tiny_moat_0"] == 3_332_232
    # the difference is the tables: 7 blocks x 4 heads x 27^2 (stride 16, P = 14)
    # + 2 blocks x 8 heads x 13^2 (stride 32, P = 7)
    assert with_pe - no_pe == 7 * 4 * 27**2 + 2 * 8 * 13**2
    # ... whatever the input resolution (the tables are resized, not re-learned)
    assert _count(_abstract_params("tiny_moat_0", size=64)) == with_pe


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MOAT_PRESETS))
def test_no_position_embedding_counts(name):
    params = _abstract_params(name, relative_position_embedding=False)
    assert _count(params) == MOAT_PARAMS_NO_PE[name]


def test_official_layout():
    params = _abstract_params("tiny_moat_0")
    assert {"stem_conv_0", "stem_norm_0", "stem_conv_1", "final_layer_norm"} <= set(params)
    assert "stem_norm_1" not in params  # no BN after the last stem conv
    assert params["logits_head"]["kernel"].shape == (1, 1, 256, 1000)
    assert params["stem_conv_0"]["bias"].shape == (32,)
    first = params["block_00_00"]  # 32 -> 32 at stride 2: pooled shortcut, no conv
    assert "shortcut_conv" not in first and "bias" not in first["expand_conv"]
    assert first["se"]["reduce_conv2d"]["kernel"].shape == (1, 1, 128, 8)
    moat = params["block_02_00"]
    assert moat["shortcut_conv"]["kernel"].shape == (1, 1, 64, 128) and "se" not in moat
    assert moat["attention"]["relative_position_embedding"].shape == (4, 27, 27)
    assert moat["attention"]["o"]["kernel"].shape == (4, 32, 128)
    assert params["block_03_01"]["attention"]["relative_position_embedding"].shape == (8, 13, 13)
    n_blocks = [sum(k.startswith(f"block_{s:02d}_") for k in params) for s in range(4)]
    assert n_blocks == [2, 3, 7, 2]


@pytest.fixture(scope="module")
def tiny():
    model = create_model("tiny_moat_0", **TINY)
    x = _rand(0, (2, 32, 32, 3))
    v = jit(model.init)(jax.random.key(1), x)
    return model, x, v, jit(functools.partial(model.apply, train=False))


def test_tiny_forward_and_features(tiny):
    model, x, v, evaluate = tiny
    logits = evaluate(v, x)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.max(jnp.abs(logits[0] - logits[1]))) > 1e-6
    feats = jax.eval_shape(functools.partial(model.apply, train=False, features=True), v, x)
    assert [f.shape for f in feats] == [(2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 16), (2, 1, 1, 32)]
    # the same parameters at another resolution (odd: TF "SAME" padding rounds up)
    feats = jax.eval_shape(functools.partial(model.apply, train=False, features=True), v,
                           jax.ShapeDtypeStruct((1, 72, 40, 3), jnp.float32))  # fmt: skip
    assert [f.shape[1:3] for f in feats] == [(18, 10), (9, 5), (5, 3), (3, 2)]
    pooled = jax.eval_shape(functools.partial(model.clone(num_classes=0).apply, train=False), v, x)
    assert pooled.shape == (2, 32)


def test_window_attention_covering_the_map_equals_global(tiny):
    model, x, v, evaluate = tiny
    windowed = model.clone(window_sizes=(None, None, (2, 2), (1, 1)))
    got = jit(functools.partial(windowed.apply, train=False))(v, x)
    np.testing.assert_allclose(got, evaluate(v, x), rtol=1e-5, atol=1e-5)


def test_drop_path_schedule_and_min_input_size():
    # official: survival_prob = 1 - rate * block_id / total_blocks
    rates = moat_drop_path_rates((2, 3), 0.5)
    np.testing.assert_allclose(sum(rates, []), [0.0, 0.1, 0.2, 0.3, 0.4])
    assert [len(r) for r in rates] == [2, 3]
    assert min_input_size(MOATConfig()) == 32
    # deeplab2's dense-task windows: 14 x 14 at stride 16, 7 x 7 at stride 32
    assert min_input_size(MOATConfig(window_sizes=(None, None, (14, 14), (7, 7)))) == 224


def test_train_flag_and_input_checks(tiny):
    model, x, v, _ = tiny
    with pytest.raises(ValueError, match="train=False"):
        model.apply(v, x)
    with pytest.raises(ValueError, match=r"x must be NHWC \[B, H, W, C\]"):
        model.apply(v, x[0], train=False)
    windowed = model.clone(window_sizes=(None, None, (2, 2), (2, 2)))
    with pytest.raises(ValueError, match=r"\(2, 48, 48, 3\).*stage 2 a \(3, 3\) map.*"
                       r"window_sizes\[2\]=\(2, 2\).*multiples of 64"):  # fmt: skip
        windowed.apply(v, _rand(1, (2, 48, 48, 3)), train=False)
    # the maps round up at each stride: 120 -> 60, 30, 15, 8, 4 tiles into 2 x 2 windows
    out = jax.eval_shape(functools.partial(windowed.apply, train=False), v,
                         jax.ShapeDtypeStruct((1, 120, 120, 3), jnp.float32))  # fmt: skip
    assert out.shape == (1, 10)
    with pytest.raises(ValueError, match="window_sizes must have one entry per stage"):
        MOATConfig(window_sizes=(None, (7, 7)))
    with pytest.raises(ValueError, match="block_types must be 'mbconv' or 'moat'"):
        MOATConfig(block_types=("mbconv", "mbconv", "moat", "attention"))
    with pytest.raises(ValueError, match="multiples of head_size 32"):
        MOATConfig(hidden_sizes=(32, 64, 128, 200))
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        MOATConfig(window_sizes=(None, None, (7,), None))
