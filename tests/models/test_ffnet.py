"""FFNet (https://arxiv.org/abs/2406.02021): the whole FFNet-1 structure at tiny size in eval
== deploy after `reparameterize`, stage features and train-mode statistics, the
train and deploy parameter counts of every preset against the official code, and errors."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.ffnet import (
    FFNET_DEPLOY_PARAMS,
    FFNET_PARAMS,
    FFNET_PRESETS,
    FFNetConfig,
    ffnet_param_count,
    reparameterize,
)
from jaxblocks.registry import create_model, model_info
from tests.blocks.test_ffnet import (
    load_torch,
    official_torch_modules,
    random_variables,
    run_torch,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
# FFNet-1's structure (kernel sizes 3 / 3, 3, 7, 7; no layer scale) at tiny widths.
TINY_FFNET1 = dict(embed_dims=(8, 16, 32, 64), in_dim=8, depths=(1, 1, 2, 1), num_classes=10)


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny():
    model = create_model("ffnet_1", **TINY_FFNET1)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3), jnp.float32)
    return model, x, random_variables(model, x, seed=1)


def test_eval_equals_deploy(tiny):
    model, x, v = tiny
    want = jit(functools.partial(model.apply, train=False))(v, x)
    deployed = reparameterize(v)
    # only the final BatchNorm keeps statistics (the official export does not fuse it)
    assert set(deployed["batch_stats"]) == {"norm"}
    stage = deployed["params"]["stages_2"]
    assert set(stage["downsample"]["proj_0"]) == {"conv"}  # merged RepVGGDW
    assert set(stage["blocks_0"]["token_mixer"]["conv1"]) == {"conv"}
    assert set(stage["blocks_0"]["channel_mixer"]["conv"]) == {"c"}  # 3x3 Conv2d_BN fused
    fast = model.clone(deploy=True)
    cfg = FFNetConfig(**TINY_FFNET1)
    assert _count(deployed["params"]) == ffnet_param_count(cfg, deploy=True)
    assert _count(v["params"]) == ffnet_param_count(cfg)
    got = jit(fast.apply)(deployed, x)
    assert got.shape == (2, 10) and float(jnp.max(jnp.abs(want[0] - want[1]))) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_features_and_train_statistics(tiny):
    model, x, v = tiny
    feats = jax.eval_shape(functools.partial(model.apply, train=False, features=True), v, x)
    assert [f.shape for f in feats] == [(2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 32), (2, 1, 1, 64)]
    pooled = jax.eval_shape(functools.partial(model.clone(num_classes=0).apply, train=False),
                            {**v, "params": {k: p for k, p in v["params"].items() if k != "head"}},
                            x)  # fmt: skip
    assert pooled.shape == (2, 64)

    # train mode (gradients of the tiny model are checked by the registry test)
    out, upd = jit(functools.partial(model.apply, mutable=["batch_stats"]))(v, x)
    assert out.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out)))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved)), "train mode must update every running statistic"


@pytest.mark.parametrize("name", sorted(FFNET_PRESETS))
def test_param_counts_train_and_deploy(name):
    """Train form: the registry's published count (official ``model.parameters()``); deploy
    form: the count after the official ``replace_batchnorm`` (the README's rounded #params)."""
    cfg = FFNET_PRESETS[name]
    assert model_info(name).published_params == FFNET_PARAMS[name] == ffnet_param_count(cfg)
    assert FFNET_DEPLOY_PARAMS[name] == ffnet_param_count(cfg, deploy=True)
    model = create_model(name, deploy=True)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    assert _count(nn.unbox(abstract)["params"]) == FFNET_DEPLOY_PARAMS[name]
    assert FFNET_DEPLOY_PARAMS["ffnet_1"] == 13_660_152 and FFNET_PARAMS["ffnet_1"] == 13_775_656


def test_input_train_flag_and_config_errors(tiny):
    model, x, v = tiny
    with pytest.raises(ValueError, match=r"FFNet: x must be NHWC .*\(32, 32, 3\)"):
        model.apply(v, x[0], train=False)
    with pytest.raises(ValueError, match="train=False"):
        model.apply(v, x)
    with pytest.raises(ValueError, match="deploy=True is the inference form"):
        model.clone(deploy=True).apply(reparameterize(v), x, train=True)
    with pytest.raises(ValueError, match=r"kernel_sizes1 must have one entry per stage"):
        FFNetConfig(kernel_sizes1=(3, 7))
    with pytest.raises(ValueError, match=r"multiple of the previous one"):
        FFNetConfig(embed_dims=(80, 120, 240, 480))
    with pytest.raises(ValueError, match=r"odd positive ints"):
        FFNetConfig(kernel_sizes=(3, 3, 4, 3))
    with pytest.raises(ValueError, match=r"depths must be"):
        create_model("ffnet_1", depths=())


def _official_ffnet(mods, cfg):
    """The official ``FFNet`` (models/ffnet.py) rebuilt from the official blocks."""
    import torch
    from torch import nn as tnn

    class FFNet(tnn.Module):
        def __init__(self):
            super().__init__()
            e = cfg.embed_dims
            conv_bn = mods["Conv2d_BN"]
            self.patch_embed = tnn.Sequential(
                conv_bn(3, cfg.in_dim, 3, 2, 1), tnn.GELU(), conv_bn(cfg.in_dim, e[0], 3, 2, 1)
            )
            self.stages = tnn.ModuleList()
            for i, depth in enumerate(cfg.depths):
                stage = [mods["PatchMerging"](e[i - 1], e[i])] if i > 0 else []
                for d in range(depth):
                    stage.append(mods["FFBlock"](
                        e[i], cfg.kernel_sizes[i], cfg.use_ses[i] and d % 2 == 0,
                        cfg.expansion_ratios[i], cfg.kernel_sizes1[i], cfg.kernel_sizes2[i],
                        cfg.use_layer_scale))  # fmt: skip
                self.stages.append(tnn.Sequential(*stage))
            self.norm = tnn.BatchNorm2d(e[-1])
            self.head = tnn.Linear(e[-1], cfg.num_classes)

        def forward(self, x):
            x = self.patch_embed(x)
            for stage in self.stages:
                x = stage(x)
            return self.head(torch.flatten(self.norm(x).mean((2, 3)), 1))

    return FFNet()


def _official_names(names: list[str]) -> list[str]:
    """``patch_embed_0`` -> ``patch_embed.0``; ``stages_i/downsample`` -> ``stages.i.0``;
    ``stages_i/blocks_j`` -> ``stages.i.{j + 1}`` (``stages.0.j`` in the first stage)."""
    if names[0].startswith("patch_embed_"):
        return ["patch_embed", names[0].rpartition("_")[2], *names[1:]]
    if not names[0].startswith("stages_"):
        return names
    i = int(names[0].rpartition("_")[2])
    if names[1] == "downsample":
        return ["stages", str(i), "0", *names[2:]]
    j = int(names[1].rpartition("_")[2]) + (i > 0)
    return ["stages", str(i), str(j), *names[2:]]


@pytest.mark.torch
def test_matches_official_torch_model():
    """Stem, stage order, PatchMerging, SE on even blocks only, layer scale, final BN and head
    against the official FFNet rebuilt in torch, in eval and after the official fuse."""
    import torch

    torch.set_num_threads(1)
    cfg = FFNetConfig(num_classes=5, embed_dims=(8, 16), in_dim=8, depths=(1, 2),
                      kernel_sizes=(3, 7), kernel_sizes1=(3, 7), kernel_sizes2=(7, 3),
                      use_gelus=(True, True), use_ses=(False, True), expansion_ratios=(3, 2),
                      use_layer_scale=True)  # fmt: skip
    model = create_model("ffnet_1", **dataclasses.asdict(cfg))
    x = jax.random.normal(jax.random.key(3), (2, 24, 24, 3), jnp.float32)
    v = random_variables(model, x, seed=5)
    assert "se" in v["params"]["stages_1"]["blocks_0"]
    assert "se" not in v["params"]["stages_1"]["blocks_1"]
    mods = official_torch_modules()
    tm = load_torch(_official_ffnet(mods, cfg), v, _official_names)
    want = run_torch(tm, x)
    got = jit(functools.partial(model.apply, train=False))(v, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))
    mods["replace_batchnorm"](tm)
    assert sum(p.numel() for p in tm.parameters()) == ffnet_param_count(cfg, deploy=True)
    got = jit(model.clone(deploy=True).apply)(reparameterize(v), x)
    np.testing.assert_allclose(got, run_torch(tm, x), rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(want))))  # fmt: skip
