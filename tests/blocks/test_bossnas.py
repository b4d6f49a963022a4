"""BossNAS HyTra candidates (arXiv 2103.12424): ResConv / ResAtt against a torch rebuild of the
official modules on the same weights, the attention formula against NumPy, input checks."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.bossnas import ResAtt, ResConv, bossnas_attention

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def _rand(seed: int, shape, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def random_variables(model, *args, seed: int = 1, **kwargs):
    """Well-scaled random variables with non-trivial BN statistics (NumPy on the abstract tree)."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = path[-1].key
        z = rng.standard_normal(a.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(z / np.sqrt(np.prod(a.shape[:-1])))
        if name == "scale":
            return jnp.asarray(1.0 + 0.2 * z)
        if name == "var":
            return jnp.asarray(0.5 + 0.5 * np.abs(z))
        return jnp.asarray((0.3 if name == "mean" else 0.1) * z)

    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs))
    return jax.tree_util.tree_map_with_path(draw, abstract)


# ----------------------------------------------------------------------------- torch rebuild


def torch_modules():
    """The official retraining candidates (boss_candidates/{bot_op,resnet_op}.py), rebuilt
    (avg-down shortcut, timm's SEModule); ``bossnet`` builds the official BossNet."""
    import torch
    from timm.layers import create_attn
    from torch import nn as tnn

    class Attention(tnn.Module):
        def __init__(self, dim, heads, dim_head):
            super().__init__()
            self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
            self.to_qkv = tnn.Conv2d(dim, heads * dim_head * 3, 1, bias=False)

        def forward(self, x):
            b, c, h, w = x.shape
            q, k, v = self.to_qkv(x).view(b, 3 * self.heads, self.dim_head, h * w).chunk(3, 1)
            q = q * self.scale
            attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
            return (v @ attn).reshape(b, -1, h, w)

    def peg(dim, stride):
        return tnn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim)

    def shortcut(dim, dim_out, stride):
        if stride == 1 and dim == dim_out:
            return tnn.Identity()
        pool = tnn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
        return tnn.Sequential(
            pool if stride == 2 else tnn.Identity(),
            tnn.Conv2d(dim, dim_out, 1, bias=False),
            tnn.BatchNorm2d(dim_out),
        )

    class TResAtt(tnn.Module):
        def __init__(self, dim, dim_out, heads, dim_head, stride, act):
            super().__init__()
            inner = heads * dim_head
            self.shortcut = shortcut(dim, dim_out, stride)
            self.proj = tnn.Sequential(
                tnn.Conv2d(dim, inner, 1, bias=False), peg(inner, stride), tnn.BatchNorm2d(inner)
            )
            self.net = tnn.Sequential(
                act(),
                Attention(inner, heads, dim_head),
                tnn.BatchNorm2d(inner),
                act(),
                tnn.Conv2d(inner, dim_out, 1, bias=False),
                tnn.BatchNorm2d(dim_out),
            )
            self.activation = act()

        def forward(self, x):
            return self.activation(self.net(self.proj(x)) + self.shortcut(x))

    class TResConv(tnn.Module):
        def __init__(self, inplanes, planes, stride, act, se):
            super().__init__()
            out = planes * 4
            self.downsample = shortcut(inplanes, out, stride)
            self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
            self.peg = peg(planes, stride)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, padding=1, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.conv3 = tnn.Conv2d(planes, out, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(out)
            self.se = create_attn("se", out) if se else None
            self.act = act()

        def forward(self, x):
            r = self.downsample(x)
            x = self.act(self.bn1(self.peg(self.conv1(x))))
            x = self.act(self.bn2(self.conv2(x)))
            x = self.bn3(self.conv3(x))
            if self.se is not None:
                x = self.se(x)
            return self.act(x + r)

    def bossnet(
        encoding,
        channels=(64, 128, 256, 512),
        stem=64,
        heads=(1, 2, 4, 8),
        dim_head=64,
        act=tnn.SiLU,
        se=True,
        num_classes=1000,
    ):
        layers = [
            tnn.Conv2d(3, stem, 7, 2, 3, bias=False),
            tnn.BatchNorm2d(stem),
            act(),
            tnn.MaxPool2d(3, 2, 1),
        ]
        inplanes = stem
        for s, (planes, enc) in enumerate(zip(channels, encoding, strict=True)):
            stride = 1 if s == 0 else 2
            if not enc:
                layers += [
                    tnn.Conv2d(inplanes, planes * 4, 3, 2, 1, bias=False),
                    tnn.BatchNorm2d(planes * 4),
                    act(),
                ]
            for k, c in enumerate(enc):
                st = stride if k == 0 else 1
                if c == 0:
                    layers.append(TResAtt(inplanes, planes * 4, heads[s], dim_head, st, act))
                else:
                    layers.append(TResConv(inplanes, planes, st, act, se))
                inplanes = planes * 4
        layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(inplanes, num_classes)]
        return tnn.Sequential(*layers)

    return torch, TResConv, TResAtt, bossnet


def to_torch(tmod, variables, names):
    """Copy flax ``variables`` into torch module ``tmod``; ``names[torch prefix] = flax path``."""
    import torch

    sd = {}
    for prefix, fpath in names.items():
        p, s = variables["params"], variables.get("batch_stats", {})
        for k in fpath.split("/"):
            p, s = p[k], s.get(k, {})
        if "kernel" in p:
            k = np.asarray(p["kernel"])
            sd[prefix + ".weight"] = k.T if k.ndim == 2 else k.transpose(3, 2, 0, 1)
            if "bias" in p:
                sd[prefix + ".bias"] = np.asarray(p["bias"])
        else:  # BatchNorm
            sd[prefix + ".weight"], sd[prefix + ".bias"] = (
                np.asarray(p["scale"]),
                np.asarray(p["bias"]),
            )
            sd[prefix + ".running_mean"], sd[prefix + ".running_var"] = (
                np.asarray(s["mean"]),
                np.asarray(s["var"]),
            )
            sd[prefix + ".num_batches_tracked"] = np.array(0)
    own = tmod.state_dict()
    assert set(sd) == set(own), sorted(set(sd) ^ set(own))
    tmod.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    return tmod.eval()


def resconv_names(prefix="", flax_prefix=""):
    n = {
        f"{prefix}conv1": "conv1",
        f"{prefix}peg": "peg",
        f"{prefix}bn1": "bn1",
        f"{prefix}conv2": "conv2",
        f"{prefix}bn2": "bn2",
        f"{prefix}conv3": "conv3",
        f"{prefix}bn3": "bn3",
        f"{prefix}se.fc1": "se_fc1",
        f"{prefix}se.fc2": "se_fc2",
        f"{prefix}downsample.1": "shortcut_conv",
        f"{prefix}downsample.2": "shortcut_bn",
    }
    return {k: flax_prefix + v for k, v in n.items()}


def resatt_names(prefix="", flax_prefix=""):
    n = {
        f"{prefix}proj.0": "proj_conv",
        f"{prefix}proj.1": "peg",
        f"{prefix}proj.2": "proj_bn",
        f"{prefix}net.1.to_qkv": "to_qkv",
        f"{prefix}net.2": "attn_bn",
        f"{prefix}net.4": "out_conv",
        f"{prefix}net.5": "out_bn",
        f"{prefix}shortcut.1": "shortcut_conv",
        f"{prefix}shortcut.2": "shortcut_bn",
    }
    return {k: flax_prefix + v for k, v in n.items()}


# ----------------------------------------------------------------------------- tests


def test_attention_matches_numpy_formula():
    qkv = _rand(0, (2, 7, 3 * 2 * 4))
    got = np.asarray(bossnas_attention(qkv, heads=2))
    x = np.asarray(qkv, np.float64).reshape(2, 7, 3, 2, 4)
    q, k, v = x[:, :, 0], x[:, :, 1], x[:, :, 2]  # [B, N, H, D]
    logits = np.einsum("blhd,bmhd->bhlm", q, k) / 2.0
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    want = np.einsum("bhlm,blhd->bmhd", w, v).reshape(2, 7, 8)  # v @ attn: transposed
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 3 \\* heads"):
        bossnas_attention(qkv, heads=5)


def test_shapes_and_bad_inputs():
    x = _rand(0, (2, 7, 7, 32))
    v = random_variables(ResConv(planes=16, stride=2), x)
    assert jax.eval_shape(functools.partial(ResConv(16, 2).apply, train=False), v, x).shape == (
        2,
        4,
        4,
        64,
    )
    assert (
        "shortcut_conv"
        not in nn.unbox(jax.eval_shape(ResAtt(32, 2, 8).init, jax.random.key(0), x))["params"]
    )
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        ResConv(planes=8, stride=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="x must be NHWC"):
        ResAtt(out_features=32).init(jax.random.key(0), x[0])


@pytest.mark.torch
@pytest.mark.parametrize("stride", [1, 2])
def test_resconv_matches_official_torch(stride):
    torch, TResConv, _, _ = torch_modules()
    x = _rand(3, (2, 7, 7, 32))
    block = ResConv(planes=16, stride=stride)
    v = random_variables(block, x)
    got = jit(functools.partial(block.apply, train=False))(v, x)
    ref = to_torch(TResConv(32, 16, stride, torch.nn.SiLU, True), v, resconv_names())
    with torch.no_grad():
        want = ref(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("stride,dim", [(1, 64), (2, 32)])
def test_resatt_matches_official_torch(stride, dim):
    torch, _, TResAtt, _ = torch_modules()
    x = _rand(4, (2, 7, 7, dim))
    block = ResAtt(out_features=64, heads=2, dim_head=8, stride=stride)
    v = random_variables(block, x)
    got = jit(functools.partial(block.apply, train=False))(v, x)
    names = resatt_names()
    if stride == 1:  # identity shortcut
        names = {k: n for k, n in names.items() if "shortcut" not in k}
    ref = to_torch(TResAtt(dim, 64, 2, 8, stride, torch.nn.SiLU), v, names)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
