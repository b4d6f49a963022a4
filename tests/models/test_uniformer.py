"""UniFormer (arXiv 2201.09450): tiny models forward, stage features, gradients, the light
models' training output, bad inputs, and (with torch) whole tiny models against a torch
rebuild of the official ``UniFormer`` / ``UniFormer_Light`` on the same weights."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.uniformer import UniFormer, UniFormerConfig
from jaxblocks.registry import create_model, model_info
from tests.blocks.test_uniformer import (
    load_into_torch,
    random_variables,
    to_torch,
    torch_modules,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
TINY = dict(model_info("uniformer_small").tiny)
TINY_LIGHT = dict(model_info("uniformer_xxs").tiny)


def _rand(seed: int, shape) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_tiny_structure_and_features():
    """Shapes only (jax.eval_shape); the numbers are checked against torch below and the
    registry test runs init, jit and gradients of both tiny models."""
    model = create_model("uniformer_small", **TINY)
    x = _rand(0, (2, 32, 32, 3))
    v = random_variables(model, x)
    assert set(v["params"]) == {"patch_embed1", "patch_embed2", "patch_embed3", "patch_embed4",
                                "blocks1_0", "blocks2_0", "blocks3_0", "blocks4_0", "norm",
                                "head"}  # fmt: skip
    assert set(v["params"]["blocks1_0"]) == {"pos_embed", "norm1", "conv1", "attn", "conv2",
                                             "norm2", "mlp"}  # fmt: skip
    assert v["params"]["blocks1_0"]["attn"]["kernel"].shape == (5, 5, 1, 16)  # depthwise 5x5
    assert set(v["params"]["blocks3_0"]["attn"]) == {"qkv", "proj"}
    logits = jax.eval_shape(functools.partial(model.apply, train=False), v, x)
    assert logits.shape == (2, 10)
    feats = jax.eval_shape(functools.partial(model.apply, train=False, features=True), v, x)
    assert [f.shape for f in feats] == [(2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 48), (2, 1, 1, 64)]


def test_light_model_outputs():
    model = create_model("uniformer_xxs", **TINY_LIGHT)
    x = _rand(0, (2, 32, 32, 3))
    v = random_variables(model, x)
    assert {"cls_token", "cls_upsample", "norm_cls", "head_cls"} <= set(v["params"])
    assert v["params"]["cls_token"].shape == (1, 1, 48)
    # conv stem (two stride-2 conv-BN), stages 3-4 of EvoSABlocks
    assert set(v["params"]["patch_embed1"]) == {"proj_0", "proj_1", "proj_3", "proj_4"}
    assert "gamma_3" not in v["params"]["blocks3_1"]  # no layer scale in the presets
    train = jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    (logits, cls_logits), _ = train(v, x)  # the official training output: both heads
    assert logits.shape == cls_logits.shape == (2, 10)
    assert bool(jnp.all(jnp.isfinite(cls_logits)))
    assert float(jnp.max(jnp.abs(logits - cls_logits))) > 1e-3
    eval_logits = jax.eval_shape(functools.partial(model.apply, train=False), v, x)
    assert isinstance(eval_logits, jax.ShapeDtypeStruct) and eval_logits.shape == (2, 10)
    feats = jax.eval_shape(functools.partial(model.apply, train=False, features=True), v, x)
    assert [f.shape for f in feats] == [(2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 48), (2, 1, 1, 64)]
    pooled = jax.eval_shape(functools.partial(model.clone(num_classes=0).apply, train=True,
                                              mutable=["batch_stats"]), v, x)[0]  # fmt: skip
    assert pooled.shape == (2, 64)


def test_bad_inputs_are_value_errors():
    model = create_model("uniformer_small", **TINY)
    with pytest.raises(ValueError, match=r"x of shape \(1, 16, 32, 3\) is too small.*32"):
        model.init(jax.random.key(0), jnp.ones((1, 16, 32, 3)))
    with pytest.raises(ValueError, match=r"x must be NHWC \[B, H, W, C\], got shape \(32, 32, 3\)"):
        model.init(jax.random.key(0), jnp.ones((32, 32, 3)))
    with pytest.raises(ValueError, match=r"embed_dims\[2:\] = \(48, 64\).*head_dim=20"):
        UniFormerConfig(embed_dims=(16, 32, 48, 64), head_dim=20)
    with pytest.raises(ValueError, match="depths must have 4 entries"):
        UniFormerConfig(depths=(1, 1, 1))
    with pytest.raises(ValueError, match=r"prune_ratios must hold one entry per block.*\(8, 3\)"):
        UniFormerConfig(prune_ratios=((1.0,), (0.5,)), trade_offs=((1.0,), (0.5,)))
    with pytest.raises(ValueError, match="both be set"):
        UniFormerConfig(prune_ratios=((1.0,) * 8, (0.5,) * 3))
    with pytest.raises(ValueError, match=r"prune_ratios\[0\]\[0\] = 1"):
        UniFormerConfig(depths=(1, 1, 1, 1), prune_ratios=((0.5,), (0.5,)),
                        trade_offs=((1.0,), (0.5,)))  # fmt: skip


def torch_uniformer(cfg: UniFormerConfig):
    """The official UniFormer / UniFormer_Light (eval forward) rebuilt from the torch blocks of
    tests/blocks/test_uniformer.py."""
    import torch
    from torch import nn as tnn

    mods = torch_modules()
    light = cfg.prune_ratios is not None
    ls = cfg.layer_scale_init is not None
    dims, depths = cfg.embed_dims, cfg.depths

    class PatchEmbed(tnn.Module):
        def __init__(self, p, cin, cout):
            super().__init__()
            self.norm, self.proj = tnn.LayerNorm(cout), tnn.Conv2d(cin, cout, p, p)

        def forward(self, x):
            x = self.proj(x)
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class HeadEmbedding(tnn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.proj = tnn.Sequential(
                tnn.Conv2d(cin, cout // 2, 3, 2, 1), tnn.BatchNorm2d(cout // 2), tnn.GELU(),
                tnn.Conv2d(cout // 2, cout, 3, 2, 1), tnn.BatchNorm2d(cout),
            )  # fmt: skip

        def forward(self, x):
            return self.proj(x)

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed1 = (
                HeadEmbedding(3, dims[0]) if cfg.conv_stem else PatchEmbed(4, 3, dims[0])
            )
            for s in (1, 2, 3):
                setattr(self, f"patch_embed{s + 1}", PatchEmbed(2, dims[s - 1], dims[s]))
            for s in (0, 1):
                blocks = [mods["CBlock"](dims[s], cfg.mlp_ratios[s], ls and light)
                          for _ in range(depths[s])]  # fmt: skip
                setattr(self, f"blocks{s + 1}", tnn.ModuleList(blocks))
            for s in (2, 3):
                if light:
                    blocks = [mods["EvoSABlock"](dims[s], cfg.head_dim, cfg.mlp_ratios[s],
                                                 cfg.prune_ratios[s - 2][i],
                                                 cfg.trade_offs[s - 2][i],
                                                 s == 2 and i == depths[s] - 1, ls)
                              for i in range(depths[s])]  # fmt: skip
                else:
                    blocks = [mods["SABlock"](dims[s], cfg.head_dim, cfg.mlp_ratios[s], ls)
                              for _ in range(depths[s])]  # fmt: skip
                setattr(self, f"blocks{s + 1}", tnn.ModuleList(blocks))
            if light:
                self.cls_token = tnn.Parameter(torch.zeros(1, 1, dims[2]))
                self.cls_upsample = tnn.Linear(dims[2], dims[3])
            self.norm = tnn.BatchNorm2d(dims[3])
            self.head = tnn.Linear(dims[3], cfg.num_classes)

        def forward(self, x):
            x = self.patch_embed1(x)
            for blk in self.blocks1:
                x = blk(x)
            x = self.patch_embed2(x)
            for blk in self.blocks2:
                x = blk(x)
            x = self.patch_embed3(x)
            cls = self.cls_token.expand(x.shape[0], -1, -1) if light else None
            state = mods["state"]
            for s in (3, 4):
                if s == 4:
                    cls = self.cls_upsample(cls) if light else None
                    x = self.patch_embed4(x)
                n = x.shape[2] * x.shape[3]
                if s == 3:
                    state["global_attn"] = 0
                state["token_indices"] = torch.arange(n).unsqueeze(0).expand(x.shape[0], -1)
                for blk in getattr(self, f"blocks{s}"):
                    if light:
                        cls, x = blk(cls, x)
                    else:
                        x = blk(x)
            x = self.norm(x)
            return self.head(x.flatten(2).mean(-1))

    return Net().double().eval()


@pytest.mark.torch
@pytest.mark.parametrize("light", [False, True], ids=["standard", "light"])
def test_matches_official_rebuild(light):
    import torch

    name, overrides = ("uniformer_xxs", TINY_LIGHT) if light else ("uniformer_small", TINY)
    if light:  # the light models' CBlock and EvoSABlock layer scale, more tokens to prune
        overrides = {**overrides, "layer_scale_init": 0.5}
    model = create_model(name, **overrides)
    cfg = UniFormerConfig(**{k: getattr(model, k) for k in UniFormerConfig.__dataclass_fields__})
    x = _rand(0, (2, 64, 64, 3))
    v = random_variables(model, x)
    got = jit(functools.partial(model.apply, train=False))(v, x)
    net = torch_uniformer(cfg)
    load_into_torch(net, nn.unbox(v))
    with torch.no_grad():
        want = net(to_torch(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_from_config_matches_registry():
    cfg = UniFormerConfig(**TINY)
    a = UniFormer.from_config(cfg)
    assert repr(a) == repr(create_model("uniformer_small", **TINY))
