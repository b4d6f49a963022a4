"""EMOv2 (arXiv 2412.06674): model configuration errors, stage features, parameter layout and
counts, and (with torch) the whole model against a torch rebuild of the official ``EMO2``."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.emov2 import EMOV2_PARAMS, EMOV2_PRESETS, EMOv2, EMOv2Config
from jaxblocks.registry import create_model, model_info
from tests.blocks.test_emov2 import (
    _rand,
    _random_variables,
    _rel,
    _torch_reference,
    randomize_torch,
    torch_to_flax,
)
from tests.kernels.harness import leaves_changed

# Correctness checks on tiny inputs: unoptimised XLA compiles several times faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
TINY = dict(model_info("emov2_1m").tiny)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"embed_dims must have one entry per stage"):
        EMOv2Config(embed_dims=(32, 48, 80))
    with pytest.raises(ValueError, match=r"norms must be 'bn' or 'ln'"):
        EMOv2Config(norms=("bn", "bn", "gn", "ln"))
    with pytest.raises(ValueError, match=r"eops must be non-empty tuples"):
        EMOv2Config(eops=(("conv",), ("conv",), ("swin",), ("hybrid",)))
    with pytest.raises(ValueError, match=r"stage 2: embed_dims=80 must be a multiple of "
                                         r"dim_heads=32"):  # fmt: skip
        EMOv2Config(dim_heads=(16, 16, 32, 20))
    with pytest.raises(ValueError, match=r"acts must be in"):
        create_model("emov2_1m", acts=("silu", "silu", "gelu", "swish"))
    model = create_model("emov2_1m", **TINY)
    with pytest.raises(ValueError, match=r"x must be NHWC \[B, H, W, C\], got shape \(32, 32, 3\)"):
        model.init(jax.random.key(0), jnp.ones((32, 32, 3)))


def test_stage_features_pooled_features_and_logits():
    model = create_model("emov2_1m", **TINY)
    x = _rand(0, (2, 40, 40, 3))  # stage maps 10, 5, 3, 2: window 3 pads stage 4 (2 -> 3)
    variables = _random_variables(model, x)
    feats = jax.eval_shape(functools.partial(model.apply, train=False, features=True), variables, x)
    dims = TINY["embed_dims"]
    want = [(2, s, s, c) for s, c in zip((10, 5, 3, 2), dims, strict=True)]
    assert [f.shape for f in feats] == want
    logits = jit(functools.partial(model.apply, train=False))(variables, x)
    assert logits.shape == (2, 10) and np.all(np.isfinite(np.asarray(logits)))
    pooled = model.clone(num_classes=0)
    v0 = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "head"}}
    assert jax.eval_shape(functools.partial(pooled.apply, train=False), v0, x).shape == (
        2,
        dims[-1],
    )
    with pytest.raises(ValueError, match="train=None"):
        model.apply(variables, x)


def test_parameter_layout():
    model = EMOv2()
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3))))
    p = abstract["params"]
    assert sorted(p) == ["head", "norm", "stages_0", "stages_1", "stages_2", "stages_3",
                         "stem_0", "stem_1", "stem_2"]  # fmt: skip
    assert [len(p[f"stages_{i}"]) for i in range(4)] == [2, 2, 8, 3]
    first, attn = p["stages_2"]["blocks_0"], p["stages_2"]["blocks_1"]
    assert first["eops_0"]["kernel"].shape == (1, 1, 48, 288)  # conv EOP, 48 * 2 * 3.0
    assert first["conv_local"]["conv"]["kernel"].shape == (5, 5, 1, 288)
    assert attn["eops_0"]["qk"]["kernel"].shape == (1, 1, 80, 160)
    assert attn["eops_0"]["v"]["kernel"].shape == (1, 1, 80, 240)
    assert "scale" in attn["norm"] and "norm" not in abstract["batch_stats"]["stages_2"]["blocks_1"]
    assert p["stem_0"]["conv"]["bias"].shape == (16,) and "bias" not in p["stem_1"]["conv"]


@pytest.mark.torch
def test_param_counts_and_layout_match_official():
    """The official constructors' numel() (torch rebuild), and the same tree as a converted
    official state dict (every name and shape)."""
    emo2 = _torch_reference()["EMO2"]
    for name, cfg in EMOV2_PRESETS.items():
        ref = emo2(
            depths=cfg.depths, embed_dims=cfg.embed_dims, exp_ratios=cfg.exp_ratios,
            dim_heads=cfg.dim_heads, window_sizes=cfg.window_sizes,
        )  # fmt: skip
        assert sum(p.numel() for p in ref.parameters()) == EMOV2_PARAMS[name], name
        if name == "emov2_1m":
            want = jax.tree.map(lambda a: a.shape, torch_to_flax(ref.state_dict()))
            model = EMOv2.from_config(cfg)
            x = jnp.ones((1, 32, 32, 3))
            abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
            assert jax.tree.map(lambda a: a.shape, abstract) == want


@pytest.mark.torch
def test_model_matches_official_torch():
    import torch

    kw = {k: v for k, v in TINY.items() if k != "num_classes"}
    ref = _torch_reference()["EMO2"](num_classes=10, **kw)
    ref = randomize_torch(ref, seed=3)
    x = np.asarray(_rand(0, (2, 40, 40, 3)))
    with torch.no_grad():
        xt = torch.tensor(x.transpose(0, 3, 1, 2))
        want = ref(xt).numpy()
        want_feats = [f.numpy().transpose(0, 2, 3, 1) for f in ref(xt, features=True)]
    model = create_model("emov2_1m", **TINY)
    variables = torch_to_flax(ref.state_dict())
    y = jit(functools.partial(model.apply, train=False))(variables, jnp.asarray(x))
    assert _rel(y, want) < 1e-4
    feats = jit(functools.partial(model.apply, train=False, features=True))(variables, x)
    for f, w in zip(feats, want_feats, strict=True):
        assert _rel(f, w) < 1e-4


def test_train_mode_updates_batch_stats_and_drop_path_needs_rng():
    model = create_model("emov2_1m", **TINY, drop_path_rate=0.2)
    x = _rand(0, (2, 32, 32, 3))
    variables = _random_variables(model, x)
    apply = jit(functools.partial(model.apply, mutable=["batch_stats"]))
    y1, upd = apply(variables, x, rngs={"dropout": jax.random.key(1)})
    y2, _ = apply(variables, x, rngs={"dropout": jax.random.key(2)})
    assert _rel(y1, y2) > 1e-6  # different drop-path masks
    moved = leaves_changed(upd["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(moved))
