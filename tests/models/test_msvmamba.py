"""MSVMamba (arXiv 2405.14174): preset counts (eval_shape), stage features and odd sizes, bad
inputs, `convert_official` on a synthetic state dict with the official key names and shapes
(round trip, unknown / missing keys, shape mismatches), and (with torch) a tiny model against a
torch rebuild of the official ``VSSM`` (vmamba.py, ``multiscale_4scan_12``) on the same weights,
through `convert_official`."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.msvmamba import MSVMAMBA_PARAMS, MSVMamba, convert_official
from jaxblocks.registry import create_model, example_input

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
TINY = dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=5, d_state=2)


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def official_layout(dims, depths, num_classes=1000, d_state=1, patch=4, in_chans=3):
    """Key -> shape of the official ``VSSM.state_dict()`` (ms_vssm configs), from vmamba.py."""
    out = {
        "patch_embed.0.weight": (dims[0], in_chans, patch, patch),
        "patch_embed.0.bias": (dims[0],),
        "patch_embed.2.weight": (dims[0],),
        "patch_embed.2.bias": (dims[0],),
    }
    for i, (C, depth) in enumerate(zip(dims, depths, strict=True)):
        D, R, N = 2 * C, math.ceil(C / 16), d_state
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            out |= {
                b + "norm.weight": (C,), b + "norm.bias": (C,),
                b + "op.x_proj_weight": (2, R + 2 * N, D), b + "op.dt_projs_weight": (2, D, R),
                b + "op.dt_projs_bias": (2, D), b + "op.A_logs": (2 * D, N), b + "op.Ds": (2 * D,),
                b + "op.out_norm.weight": (D,), b + "op.out_norm.bias": (D,),
                b + "op.se.fc.0.weight": (D // 8, D), b + "op.se.fc.2.weight": (D, D // 8),
                b + "op.in_proj.weight": (2 * D, C),
                b + "op.conv2d.weight": (D, 1, 3, 3), b + "op.conv2d.bias": (D,),
                b + "op.conv2d_b1.weight": (D, 1, 7, 7), b + "op.conv2d_b1.bias": (D,),
                b + "op.out_proj.weight": (C, D),
                b + "convFFN.linear1.weight": (2 * C, C, 1, 1),
                b + "convFFN.linear1.bias": (2 * C,),
                b + "convFFN.linear2.weight": (C, 2 * C, 1, 1), b + "convFFN.linear2.bias": (C,),
                b + "convFFN.dwc.weight": (2 * C, 1, 3, 3), b + "convFFN.dwc.bias": (2 * C,),
                b + "norm2.weight": (C,), b + "norm2.bias": (C,),
            }  # fmt: skip
        if i < len(dims) - 1:
            out |= {
                f"layers.{i}.downsample.reduction.weight": (dims[i + 1], 4 * C),
                f"layers.{i}.downsample.norm.weight": (4 * C,),
                f"layers.{i}.downsample.norm.bias": (4 * C,),
            }
    out |= {"classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],)}
    if num_classes:
        out |= {"classifier.head.weight": (num_classes, dims[-1]),
                "classifier.head.bias": (num_classes,)}  # fmt: skip
    return out


def _random_state_dict(layout, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in layout.items()}


def to_official(params):
    """Flax params -> official key -> array: the inverse mapping, written out independently."""
    out = {}
    leaf_name = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    module_name = {
        "patch_embed": "patch_embed.0", "patch_norm": "patch_embed.2",
        "norm": "classifier.norm", "head": "classifier.head",
    }  # fmt: skip
    inner = {("se", "fc1"): "se.fc.0", ("se", "fc2"): "se.fc.2"}
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        a = np.asarray(a)
        if names[0] in module_name:
            key = f"{module_name[names[0]]}.{leaf_name[names[1]]}"
        elif names[0].endswith("_downsample"):
            key = f"layers.{names[0].split('_')[1]}.downsample.{names[1]}.{leaf_name[names[2]]}"
        else:
            _, i, _, j = names[0].split("_")
            rest = names[1:]
            if rest[0] == "ffn":
                rest = ["convFFN"] + rest[1:]
            if len(rest) == 4:
                rest = [rest[0], inner[tuple(rest[1:3])], rest[3]]
            # the scan parameters (op/A_logs ...) keep their names
            rest[-1] = leaf_name.get(rest[-1], rest[-1])
            key = f"layers.{i}.blocks.{j}." + ".".join(rest)
        if names[-1] == "kernel":
            if a.ndim == 4:  # conv [kh, kw, I, O] -> [O, I, kh, kw]
                a = a.transpose(3, 2, 0, 1)
            elif key.startswith("layers") and ".convFFN.linear" in key:  # Dense -> 1×1 conv
                a = a.T[:, :, None, None]
            else:
                a = a.T
        out[key] = a
    return out


def test_preset_counts_and_layout():
    """eval_shape counts equal the official constructor's; the layout written from vmamba.py
    sums to the same number and holds the official nano shapes."""
    for name, n in MSVMAMBA_PARAMS.items():
        v = jax.eval_shape(create_model(name).init, jax.random.key(0), example_input(name))
        assert _count(nn.unbox(v)["params"]) == n
    nano = official_layout((48, 96, 192, 384), (1, 2, 5, 2))
    assert sum(int(np.prod(s)) for s in nano.values()) == 6_864_136
    assert nano["layers.1.blocks.0.op.x_proj_weight"] == (2, 8, 192)
    assert nano["layers.1.blocks.0.op.A_logs"] == (384, 1)
    micro = official_layout((64, 128, 256, 512), (1, 2, 5, 2))
    tiny = official_layout((96, 192, 384, 768), (1, 2, 9, 2))
    assert sum(int(np.prod(s)) for s in micro.values()) == MSVMAMBA_PARAMS["msvmamba_micro"]
    assert sum(int(np.prod(s)) for s in tiny.values()) == MSVMAMBA_PARAMS["msvmamba_tiny"]


def test_convert_official_round_trip_and_errors():
    layout = official_layout(TINY["dims"], TINY["depths"], TINY["num_classes"], TINY["d_state"])
    sd = _random_state_dict(layout)
    variables = convert_official(sd)  # architecture inferred from the keys
    p = variables["params"]
    np.testing.assert_array_equal(
        p["layers_1_blocks_1"]["op"]["in_proj"]["kernel"],
        sd["layers.1.blocks.1.op.in_proj.weight"].T,
    )
    np.testing.assert_array_equal(
        p["layers_0_blocks_0"]["op"]["conv2d_b1"]["kernel"][2, 5, 0],
        sd["layers.0.blocks.0.op.conv2d_b1.weight"][:, 0, 2, 5],
    )
    np.testing.assert_array_equal(
        p["layers_2_blocks_0"]["op"]["A_logs"], sd["layers.2.blocks.0.op.A_logs"]
    )
    back = to_official(p)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    model = MSVMamba(**TINY)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3))))
    assert jax.tree.map(lambda a: a.shape, p) == jax.tree.map(lambda a: a.shape, abstract["params"])
    assert _count(p) == sum(int(np.prod(s)) for s in layout.values())

    with pytest.raises(ValueError, match=r"unknown official key 'layers.0.blocks.0.op.bogus'"):
        convert_official({**sd, "layers.0.blocks.0.op.bogus": np.zeros(3)}, model)
    with pytest.raises(ValueError, match=r"'layers.0.blocks.3.norm.weight'.*not a parameter"):
        convert_official({**sd, "layers.0.blocks.3.norm.weight": np.zeros(8)}, model)
    missing = {k: v for k, v in sd.items() if k != "layers.1.blocks.0.op.Ds"}
    with pytest.raises(
        ValueError, match=r"missing.*'layers.1.blocks.0.op.Ds' \(-> layers_1_blocks_0/op/Ds\)"
    ):
        convert_official(missing, model)
    bad = {**sd, "layers.0.blocks.0.op.x_proj_weight": np.zeros((4, 5, 16))}
    with pytest.raises(
        ValueError, match=r"'layers.0.blocks.0.op.x_proj_weight' has shape \(4, 5, 16\)"
    ):
        convert_official(bad, model)
    with pytest.raises(ValueError, match="state_dict must be a mapping"):
        convert_official([1, 2])


def test_features_odd_sizes_and_pooled_output():
    model = MSVMamba(**{**TINY, "num_classes": 0, "depths": (1, 1, 1, 1)})
    x = jax.random.normal(jax.random.key(0), (2, 36, 44, 3))  # 9×11 tokens: padded merges
    v = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
    feats = jax.eval_shape(functools.partial(model.apply, features=True), v, x)
    assert [f.shape for f in feats] == [(2, 9, 11, 8), (2, 5, 6, 16), (2, 3, 3, 24), (2, 2, 2, 32)]
    assert jax.eval_shape(model.apply, v, x).shape == (2, 32)


def test_bad_inputs_are_value_errors():
    model, key = MSVMamba(**TINY), jax.random.key(0)
    with pytest.raises(ValueError, match=r"MSVMamba: x must be NHWC.*\(32, 32, 3\)"):
        model.init(key, jnp.ones((32, 32, 3)))
    with pytest.raises(ValueError, match=r"\(1, 32, 32, 4\) must have in_chans=3"):
        model.init(key, jnp.ones((1, 32, 32, 4)))
    with pytest.raises(ValueError, match=r"\(1, 3, 32, 3\) is too small.*patch_size=4"):
        model.init(key, jnp.ones((1, 3, 32, 3)))
    with pytest.raises(ValueError, match=r"depths \(1, 1\) and dims \(8, 16, 24\)"):
        MSVMamba(depths=(1, 1), dims=(8, 16, 24)).init(key, jnp.ones((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        create_model("msvmamba_nano", drop_path_rate=1.5)


# ------------------------------------------------------------------ torch rebuild of the official


@functools.cache
def torch_vssm_class():
    """The official ``VSSM`` (vmamba.py) with the ms_vssm options, rebuilt in torch with the
    official module names; the CUDA selective scan replaced by a sequential loop."""
    import torch
    import torch.nn.functional as F
    from torch import nn as tnn

    def selective_scan(u, delta, A, Bm, Cm, D, delta_bias):
        """u, delta [B, D, L]; A [D, N]; Bm, Cm [B, N, L] (one group)."""
        delta = F.softplus(delta + delta_bias[None, :, None])
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        ys = []
        for t in range(u.shape[2]):
            dt = delta[:, :, t, None]
            h = torch.exp(dt * A) * h + dt * Bm[:, None, :, t] * u[:, :, t, None]
            ys.append((h * Cm[:, None, :, t]).sum(-1) + D * u[:, :, t])
        return torch.stack(ys, -1)

    class Permute(tnn.Module):
        def __init__(self, *dims):
            super().__init__()
            self.dims = dims

        def forward(self, x):
            return x.permute(*self.dims)

    class SEModule(tnn.Module):
        def __init__(self, c, r=8):
            super().__init__()
            self.fc = tnn.Sequential(tnn.Linear(c, c // r, bias=False), tnn.ReLU(),
                                     tnn.Linear(c // r, c, bias=False), tnn.Sigmoid())  # fmt: skip

        def forward(self, x):  # NCHW
            return x * self.fc(x.mean((2, 3)))[:, :, None, None]

    class ConvFFN(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.linear1, self.linear2 = tnn.Conv2d(c, 2 * c, 1), tnn.Conv2d(2 * c, c, 1)
            self.dwc = tnn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=2 * c)

        def forward(self, x):
            x = self.linear1(x)
            return self.linear2(F.gelu(x + self.dwc(x)))

    class SS2D(tnn.Module):
        def __init__(self, C, N):
            super().__init__()
            D, R = 2 * C, math.ceil(C / 16)
            self.D, self.R, self.N = D, R, N
            self.in_proj = tnn.Linear(C, 2 * D, bias=False)
            self.conv2d = tnn.Conv2d(D, D, 3, padding=1, groups=D)
            self.conv2d_b1 = tnn.Conv2d(D, D, 7, stride=2, padding=3, groups=D)
            self.x_proj_weight = tnn.Parameter(torch.randn(2, R + 2 * N, D) * D**-0.5)
            self.dt_projs_weight = tnn.Parameter(torch.randn(2, D, R) * R**-0.5)
            self.dt_projs_bias = tnn.Parameter(torch.randn(2, D) - 3.0)
            self.A_logs = tnn.Parameter(torch.randn(2 * D, N) * 0.5)
            self.Ds = tnn.Parameter(torch.randn(2 * D))
            self.out_norm = tnn.LayerNorm(D)
            self.se = SEModule(D)
            self.out_proj = tnn.Linear(D, C, bias=False)

        def scan(self, x, k):  # x [B, D, L], parameter set k
            D, R, N = self.D, self.R, self.N
            x_dbl = torch.einsum("bdl,cd->bcl", x, self.x_proj_weight[k])
            dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=1)
            dts = torch.einsum("brl,dr->bdl", dts, self.dt_projs_weight[k])
            y = selective_scan(x, dts, -torch.exp(self.A_logs[k * D : (k + 1) * D]), Bs, Cs,
                               self.Ds[k * D : (k + 1) * D], self.dt_projs_bias[k])  # fmt: skip
            return self.out_norm(y.transpose(1, 2))  # [B, L, D]

        def forward(self, x):  # [B, H, W, C]
            b, h, w, _ = x.shape
            x, z = self.in_proj(x).chunk(2, dim=-1)
            z = F.silu(z)
            x = x.permute(0, 3, 1, 2)
            x0, x1 = F.silu(self.conv2d(x)), F.silu(self.conv2d_b1(x))
            h1, w1 = x1.shape[2:]
            seq = torch.cat([x1.flatten(2).flip(-1), x1.transpose(2, 3).flatten(2),
                             x1.transpose(2, 3).flatten(2).flip(-1)], dim=2)  # fmt: skip
            y1, y0 = self.scan(seq, 0), self.scan(x0.flatten(2), 1)
            L = h1 * w1
            y1 = (y1[:, :L].flip(-2).view(b, h1, w1, -1)
                  + y1[:, L : 2 * L].view(b, w1, h1, -1).transpose(1, 2)
                  + y1[:, 2 * L :].flip(-2).view(b, w1, h1, -1).transpose(1, 2))  # fmt: skip
            y1 = F.interpolate(y1.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                               align_corners=False)  # fmt: skip
            y = y0.view(b, h, w, -1) + y1.permute(0, 2, 3, 1)
            y = self.se(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return self.out_proj(y * z)

    class VSSBlock(tnn.Module):
        def __init__(self, C, N):
            super().__init__()
            self.norm, self.op = tnn.LayerNorm(C), SS2D(C, N)
            self.convFFN, self.norm2 = ConvFFN(C), tnn.LayerNorm(C)

        def forward(self, x):
            x = x + self.op(self.norm(x))
            return x + self.convFFN(self.norm2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    class PatchMerging2D(tnn.Module):
        def __init__(self, c, out):
            super().__init__()
            self.reduction, self.norm = tnn.Linear(4 * c, out, bias=False), tnn.LayerNorm(4 * c)

        def forward(self, x):
            H, W = x.shape[1:3]
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                           x[:, 1::2, 1::2]], -1)  # fmt: skip
            return self.reduction(self.norm(x))

    class VSSM(tnn.Module):
        def __init__(self, dims, depths, num_classes, d_state):
            super().__init__()
            self.patch_embed = tnn.Sequential(tnn.Conv2d(3, dims[0], 4, 4), Permute(0, 2, 3, 1),
                                              tnn.LayerNorm(dims[0]))  # fmt: skip
            self.layers = tnn.ModuleList(
                tnn.Sequential(
                    OrderedDict(
                        blocks=tnn.Sequential(
                            *[VSSBlock(dims[i], d_state) for _ in range(depths[i])]
                        ),
                        downsample=(
                            PatchMerging2D(dims[i], dims[i + 1])
                            if i < len(dims) - 1
                            else tnn.Identity()
                        ),
                    )
                )  # fmt: skip
                for i in range(len(dims))
            )
            self.classifier = tnn.Sequential(OrderedDict(
                norm=tnn.LayerNorm(dims[-1]), head=tnn.Linear(dims[-1], num_classes)
            ))  # fmt: skip

        def forward(self, x):
            x = self.patch_embed(x)
            feats = []
            for layer in self.layers:
                x = layer.blocks(x)
                feats.append(x)
                x = layer.downsample(x)
            x = self.classifier.norm(x).mean((1, 2))
            return self.classifier.head(x), feats

    return VSSM


@pytest.mark.torch
def test_tiny_model_matches_torch_rebuild_of_official_vssm():
    import torch

    torch.manual_seed(0)
    tmodel = torch_vssm_class()(TINY["dims"], TINY["depths"], TINY["num_classes"], TINY["d_state"])
    with torch.no_grad():
        for name, prm in tmodel.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                prm.add_(0.3 * torch.randn_like(prm))
    sd = tmodel.state_dict()
    layout = official_layout(TINY["dims"], TINY["depths"], TINY["num_classes"], TINY["d_state"])
    assert {k: tuple(v.shape) for k, v in sd.items()} == layout
    x = np.random.default_rng(0).standard_normal((2, 3, 28, 36)).astype(np.float32)  # 7×9 tokens
    with torch.no_grad():
        logits, feats = tmodel(torch.from_numpy(x))
    model = MSVMamba(**TINY)
    variables = convert_official(sd, model)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    got = jit(functools.partial(model.apply, features=True))(variables, xj)
    for g, f in zip(got, feats, strict=True):
        np.testing.assert_allclose(g, f.numpy(), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(jit(model.apply)(variables, xj), logits.numpy(), rtol=2e-4,
                               atol=2e-5)  # fmt: skip
