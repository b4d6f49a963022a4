"""FFNet / MetaMixer blocks (https://arxiv.org/abs/2406.02021): RepVGGDW, token and channel
mixers, FFBlock and PatchMerging against an independent NumPy formulation on the modules' own
parameters, eval == deploy after `reparameterize`, bad-input errors, and (with torch) a torch
rebuild of the official modules on the same weights, including the official ``fuse``."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.ffnet import (
    Conv2dBN,
    FFBlock,
    PatchMerging,
    RepVGGDW,
    TokenMixer,
    merge_repvggdw,
    reparameterize,
    se_width,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
EPS = 1e-5
_erf = np.vectorize(math.erf)


def _rand(seed: int, shape) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def random_variables(module, x, seed: int = 1):
    """Well-scaled random variables with non-trivial BN statistics and layer scales, drawn with
    NumPy on the abstract structure (no compile)."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = path[-1].key
        z = rng.standard_normal(a.shape).astype(np.float32)
        if name == "kernel":  # HWIO or [in, out]: variance 1 / fan_in
            return jnp.asarray(z / np.sqrt(np.prod(a.shape[:-1])))
        if name == "scale" or name.endswith("layer_scale"):
            return jnp.asarray(1.0 + 0.2 * z)
        if name == "var":
            return jnp.asarray(0.5 + 0.5 * np.abs(z))
        return jnp.asarray((0.3 if name == "mean" else 0.1) * z)  # bias, running mean

    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x))
    return jax.tree_util.tree_map_with_path(draw, abstract)


# ----------------------------------------------------------------------------- NumPy reference


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_conv(x, w, b=None, stride=1, groups=1):
    """Grouped 2-D conv, padding k // 2 (torch semantics), HWIO kernel, float64."""
    k = w.shape[0]
    p = k // 2
    bsz, h, wd, c = x.shape
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho, wo = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
    cout = w.shape[-1]
    out = np.zeros((bsz, ho, wo, cout))
    for i in range(k):
        for j in range(k):
            patch = xp[
                :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride
            ]
            pg = patch.reshape(bsz, ho, wo, groups, c // groups)
            wg = w[i, j].reshape(c // groups, groups, cout // groups)  # out index g * (O/G) + o
            out += np.einsum("bhwgc,cgo->bhwgo", pg, wg).reshape(bsz, ho, wo, cout)
    return out if b is None else out + b


def np_bn(y, p, s):
    return (y - s["mean"]) / np.sqrt(s["var"] + EPS) * p["scale"] + p["bias"]


def np_conv_bn(x, p, s, stride=1, groups=1):
    return np_bn(np_conv(x, p["c"]["kernel"], stride=stride, groups=groups), p["bn"], s["bn"])


def np_repvggdw(x, p, s, stride=1):
    c = x.shape[-1]
    return np_conv_bn(x, p["conv"], s["conv"], stride, c) + np_conv_bn(
        x, p["conv1"], s["conv1"], stride, c
    )


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _dw(x, p, s, k, with_bn):
    c = x.shape[-1]
    if k == 7:
        return np_repvggdw(x, p, s)
    if with_bn:
        return np_conv_bn(x, p, s, groups=c)
    return np_conv(x, p["kernel"], p["bias"], groups=c)


def np_block(x, p, s, k, k1, k2, use_se):
    """FFBlock in eval mode from the official equations, float64."""
    t, ts = p["token_mixer"], s["token_mixer"]
    y = np_conv_bn(x, t["fc"], ts["fc"])
    y = _gelu(_dw(y, t["conv1"], ts.get("conv1"), k1, False))
    y = _dw(y, t["conv2"], ts.get("conv2"), k2, False)
    x = x + y * p.get("token_layer_scale", 1.0)
    if use_se:
        g = x.mean(axis=(1, 2))
        g = np.maximum(g @ p["se"]["down"]["kernel"] + p["se"]["down"]["bias"], 0.0)
        g = 1.0 / (1.0 + np.exp(-(g @ p["se"]["up"]["kernel"] + p["se"]["up"]["bias"])))
        x = x * g[:, None, None, :]
    m, ms = p["channel_mixer"], s["channel_mixer"]
    y = _dw(x, m["conv"], ms["conv"], k, True)
    y = _gelu(np_conv(y, m["fc1"]["kernel"], m["fc1"]["bias"]))
    y = np_conv(y, m["fc2"]["kernel"], m["fc2"]["bias"])
    return x + y * p.get("channel_layer_scale", 1.0)


def np_patch_merging(x, p, s):
    y = np_repvggdw(x, p["proj_0"], s["proj_0"], stride=2)
    q, qs = p["proj_1"], s["proj_1"]
    return np_conv(np_bn(y, q["bn"], qs["bn"]), q["conv"]["kernel"]) + y


def _close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.max(np.abs(want))))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("features,stride", [(None, 1), (12, 2)])
def test_repvggdw_eval_equals_deploy_and_numpy(features, stride):
    x = _rand(0, (2, 9, 11, 6))  # odd sizes; (12, 2): channel multiplier 2, stride 2
    rep = RepVGGDW(features, stride=stride)
    v = random_variables(rep, x)
    want = np_repvggdw(np.asarray(x, np.float64), *_f64((v["params"], v["batch_stats"])), stride)
    got = jit(functools.partial(rep.apply, train=False))(v, x)
    _close(got, want)
    deployed = reparameterize(v)
    assert set(deployed) == {"params"}  # no batch statistics left
    assert jax.tree.map(jnp.shape, deployed["params"]) == {
        "conv": {"c": {"kernel": (7, 7, 1, features or 6), "bias": (features or 6,)}}
    }
    merged = merge_repvggdw(v["params"], v["batch_stats"])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, deployed["params"], merged)))
    fast = jit(rep.clone(deploy=True).apply)(deployed, x)
    np.testing.assert_allclose(fast, got, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(got))))


@pytest.mark.parametrize(
    "k,k1,k2,use_se,ls",
    [(3, 3, 3, False, False), (7, 3, 7, True, True)],
    ids=["ffnet1_early", "rep7_se_layerscale"],
)
def test_ffblock_matches_numpy_and_deploy(k, k1, k2, use_se, ls):
    x = _rand(1, (2, 7, 8, 16))
    block = FFBlock(kernel_size=k, kernel_size1=k1, kernel_size2=k2, use_se=use_se,
                    use_layer_scale=ls)  # fmt: skip
    v = random_variables(block, x, seed=2)
    got = jit(functools.partial(block.apply, train=False))(v, x)
    want = np_block(np.asarray(x, np.float64), *_f64((v["params"], v["batch_stats"])), k, k1, k2,
                    use_se)  # fmt: skip
    _close(got, want)
    assert ("token_layer_scale" in v["params"]) == ls and ("se" in v["params"]) == use_se
    if use_se:
        assert v["params"]["se"]["down"]["kernel"].shape == (16, se_width(16)) == (16, 8)
    deployed = reparameterize(v)
    assert "batch_stats" not in deployed
    fast = jit(block.clone(deploy=True).apply)(deployed, x)
    _close(fast, got)


def test_patch_merging_matches_numpy_and_deploy():
    x = _rand(2, (2, 9, 9, 8))
    pm = PatchMerging(16)
    v = random_variables(pm, x, seed=3)
    got = jit(functools.partial(pm.apply, train=False))(v, x)
    assert got.shape == (2, 5, 5, 16)
    _close(got, np_patch_merging(np.asarray(x, np.float64), *_f64((v["params"], v["batch_stats"]))))
    deployed = reparameterize(v)
    assert set(deployed["params"]["proj_1"]) == {"conv"}
    assert deployed["params"]["proj_1"]["conv"]["kernel"].shape == (1, 1, 16, 16)
    _close(jit(pm.clone(deploy=True).apply)(deployed, x), got)


def test_train_mode_uses_batch_statistics():
    x = _rand(3, (4, 6, 6, 8))
    block = FFBlock(kernel_size=7, kernel_size1=7, kernel_size2=3)
    v = random_variables(block, x, seed=4)
    y, upd = jit(functools.partial(block.apply, train=True, mutable=["batch_stats"]))(v, x)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved)), "train mode must update every running statistic"
    # a token mixer's fc normalised by batch statistics has zero mean per channel
    fc, _ = jit(functools.partial(Conv2dBN(8).init_with_output, train=True))(jax.random.key(0), x)
    assert float(jnp.max(jnp.abs(jnp.mean(fc, axis=(0, 1, 2))))) < 1e-5
    assert not np.allclose(y, jit(block.apply)(v, x), atol=1e-3)


def test_bad_inputs_raise_clear_errors():
    x = _rand(4, (2, 8, 8, 4))
    key = jax.random.key(0)
    init = lambda module, x: jax.eval_shape(module.init, key, x)  # traces, checks, no compile
    with pytest.raises(ValueError, match=r"RepVGGDW: kernel_size must be odd.*got 5"):
        init(RepVGGDW(kernel_size=5), x)
    with pytest.raises(ValueError, match=r"features=6 must be a multiple of the input channels 4"):
        init(RepVGGDW(6), x)
    with pytest.raises(ValueError, match=r"FFBlock: x must be \[B, H, W, C\].*\(8, 8, 4\)"):
        init(FFBlock(), x[0])
    with pytest.raises(ValueError, match=r"TokenMixer: x must be .*\(2, 64, 4\)"):
        init(TokenMixer(), x.reshape(2, 64, 4))
    with pytest.raises(ValueError, match=r"TokenMixer: kernel_size2 must be an odd positive int"):
        init(TokenMixer(3, 4), x)
    with pytest.raises(ValueError, match=r"Conv2dBN: x has 4 channels .* groups=3"):
        init(Conv2dBN(6, groups=3), x)
    with pytest.raises(ValueError, match=r"PatchMerging: out_features must be a positive int"):
        init(PatchMerging(), x)
    v = random_variables(RepVGGDW(), x)
    with pytest.raises(ValueError, match="already reparameterized"):
        reparameterize(reparameterize(v))
    with pytest.raises(ValueError, match="already merged"):
        merge_repvggdw(reparameterize(v)["params"], {})


# ----------------------------------------------------------------------------- torch oracle


def official_torch_modules():
    """A rebuild of the official classes of ysj9909/FFNet ``models/ffnet.py`` (f3c3e4c), same
    module names, forward and ``fuse`` (SE is timm's ``SqueezeExcite``, as imported there)."""
    import torch
    from timm.layers import SqueezeExcite
    from torch import nn as tnn

    class Conv2d_BN(tnn.Sequential):  # noqa: N801
        def __init__(self, a, b, ks=1, stride=1, pad=0, groups=1):
            super().__init__()
            self.add_module("c", tnn.Conv2d(a, b, ks, stride, pad, 1, groups, bias=False))
            self.add_module("bn", tnn.BatchNorm2d(b))

        @torch.no_grad()
        def fuse(self):
            c, bn = self._modules.values()
            w = bn.weight / (bn.running_var + bn.eps) ** 0.5
            b = bn.bias - bn.running_mean * w
            w = c.weight * w[:, None, None, None]
            m = tnn.Conv2d(w.size(1) * c.groups, w.size(0), w.shape[2:], stride=c.stride,
                           padding=c.padding, groups=c.groups)  # fmt: skip
            m.weight.data.copy_(w)
            m.bias.data.copy_(b)
            return m

    class BN_Conv2d(tnn.Sequential):  # noqa: N801
        def __init__(self, a, b):
            super().__init__()
            self.add_module("bn", tnn.BatchNorm2d(a))
            self.add_module("c", tnn.Conv2d(a, b, 1, 1, 0, bias=False))

        @torch.no_grad()
        def fuse(self):
            bn, c = self._modules.values()
            w = bn.weight / (bn.running_var + bn.eps) ** 0.5
            b = (bn.bias - bn.running_mean * w) @ c.weight.squeeze(-1).squeeze(-1).T
            m = tnn.Conv2d(c.in_channels, c.out_channels, 1)
            m.weight.data.copy_(c.weight * w[None, :, None, None])
            m.bias.data.copy_(b)
            return m

    class RepVGGDW(tnn.Module):
        def __init__(self, in_dim, out_dim, ks=7, stride=1):
            super().__init__()
            self.in_dim, self.out_dim, self.ks, self.stride = in_dim, out_dim, ks, stride
            self.conv = Conv2d_BN(in_dim, out_dim, ks, stride, ks // 2, groups=in_dim)
            ks_ = ks // 2
            self.conv1 = Conv2d_BN(in_dim, out_dim, ks_, stride, ks_ // 2, groups=in_dim)

        def forward(self, x):
            return self.conv(x) + self.conv1(x)

        @torch.no_grad()
        def fuse(self):
            conv, conv1 = self.conv.fuse(), self.conv1.fuse()
            m = tnn.Conv2d(self.in_dim, self.out_dim, self.ks, stride=self.stride,
                           padding=self.ks // 2, groups=self.in_dim)  # fmt: skip
            m.weight.data.copy_(conv.weight + tnn.functional.pad(conv1.weight, [2, 2, 2, 2]))
            m.bias.data.copy_(conv.bias + conv1.bias)
            return m

    class ResidualBlock(tnn.Module):
        def __init__(self, main, dim, use_layer_scale, init=1e-5):
            super().__init__()
            self.main, self.use_layer_scale = main, use_layer_scale
            if use_layer_scale:
                self.layer_scale = tnn.Parameter(init * torch.ones((dim, 1, 1)))

        def forward(self, x):
            y = self.main(x)
            return (y * self.layer_scale if self.use_layer_scale else y) + x

    def dw(dim, ks, with_bn):
        if ks == 7:
            return RepVGGDW(dim, dim, ks)
        if with_bn:
            return Conv2d_BN(dim, dim, ks, 1, ks // 2, groups=dim)
        return tnn.Conv2d(dim, dim, ks, 1, ks // 2, groups=dim)

    class Token_Mixer(tnn.Module):  # noqa: N801
        def __init__(self, dim, ks1, ks2):
            super().__init__()
            self.fc = Conv2d_BN(dim, dim)
            self.conv1, self.act, self.conv2 = dw(dim, ks1, False), tnn.GELU(), dw(dim, ks2, False)

        def forward(self, x):
            return self.conv2(self.act(self.conv1(self.fc(x))))

    class Channel_Mixer(tnn.Module):  # noqa: N801
        def __init__(self, dim, ks, expansion_ratio):
            super().__init__()
            hidden = int(dim * expansion_ratio)
            self.conv = dw(dim, ks, True)
            self.fc1, self.act = tnn.Conv2d(dim, hidden, 1, 1, 0), tnn.GELU()
            self.fc2 = tnn.Conv2d(hidden, dim, 1, 1, 0)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.conv(x))))

    class FFBlock(tnn.Module):
        def __init__(self, dim, kernel_size, use_se, expansion_ratio, ks1, ks2, use_ls):
            super().__init__()
            self.token_mixer = tnn.Sequential(
                ResidualBlock(Token_Mixer(dim, ks1, ks2), dim, use_ls),
                SqueezeExcite(dim, 0.25) if use_se else tnn.Identity(),
            )
            self.channel_mixer = ResidualBlock(
                Channel_Mixer(dim, kernel_size, expansion_ratio), dim, use_ls
            )

        def forward(self, x):
            return self.channel_mixer(self.token_mixer(x))

    class Conv2d_BN_skip(tnn.Sequential):  # noqa: N801
        def __init__(self, dim):
            super().__init__()
            self.dim = dim
            self.conv = BN_Conv2d(dim, dim)

        def forward(self, x):
            return self.conv(x) + x

        @torch.no_grad()
        def fuse(self):
            conv = self.conv.fuse()
            conv.weight.data.add_(torch.eye(self.dim)[:, :, None, None])
            return conv

    class PatchMerging(tnn.Module):
        def __init__(self, dim, out_dim):
            super().__init__()
            self.proj = tnn.Sequential(RepVGGDW(dim, out_dim, 7, 2), Conv2d_BN_skip(out_dim))

        def forward(self, x):
            return self.proj(x)

    def replace_batchnorm(net):  # export_model.py
        for name, child in net.named_children():
            if hasattr(child, "fuse"):
                fused = child.fuse()
                setattr(net, name, fused)
                replace_batchnorm(fused)
            else:
                replace_batchnorm(child)

    return dict(Conv2d_BN=Conv2d_BN, FFBlock=FFBlock, PatchMerging=PatchMerging,
                replace_batchnorm=replace_batchnorm)  # fmt: skip


# Flax path component -> official module path.
_TORCH_PREFIX = {
    "token_mixer": "token_mixer.0.main",
    "token_layer_scale": "token_mixer.0.layer_scale",
    "se": "token_mixer.1",
    "channel_mixer": "channel_mixer.main",
    "channel_layer_scale": "channel_mixer.layer_scale",
    "proj_0": "proj.0",
    "proj_1": "proj.1.conv",
    "down": "fc1",
    "up": "fc2",
}
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}  # fmt: skip


def torch_state_dict(variables, rename=None) -> dict[str, np.ndarray]:
    """The official state dict of FFNet variables (OIHW convs, (C, 1, 1) layer scales);
    ``rename`` maps the Flax path of a leaf's module (a list of names) to a list of official
    names first (the model's stages)."""
    out = {}
    for collection in ("params", "batch_stats"):
        for path, a in jax.tree_util.tree_leaves_with_path(variables.get(collection, {})):
            keys = [p.key for p in path]
            parents, leaf = keys[:-1], keys[-1]
            names = [_TORCH_PREFIX.get(k, k) for k in parents]
            if parents[-2:] == ["proj_1", "conv"]:
                names[-1] = "c"  # BNConvSkip's 1x1 conv is the official BN_Conv2d's ``c``
            names = rename(names) if rename else names
            a = np.asarray(a)
            if leaf.endswith("layer_scale"):
                names, a = [*names, _TORCH_PREFIX[leaf]], a.reshape(-1, 1, 1)
            else:
                names.append(_TORCH_LEAF[leaf])
                if a.ndim == 4:
                    a = a.transpose(3, 2, 0, 1)
                elif a.ndim == 2:  # SE's Dense -> 1x1 conv; the head's -> Linear
                    a = a.T[:, :, None, None] if "se" in parents else a.T
            out[".".join(names)] = a
    return out


def load_torch(module, variables, rename=None):
    """Load FFNet variables into a torch rebuild of the official module; eval mode."""
    import torch

    sd = torch_state_dict(variables, rename)
    want = {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(sd) == want, sorted(set(sd) ^ want)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                           strict=False)  # fmt: skip
    return module.eval()


def run_torch(module, x):
    import torch

    with torch.no_grad():
        y = module(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
    return y.numpy().transpose(0, 2, 3, 1) if y.ndim == 4 else y.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("k,k1,k2,use_se,ls", [(3, 3, 3, False, False), (7, 7, 7, True, True)])
def test_ffblock_and_patch_merging_match_official_torch(k, k1, k2, use_se, ls):
    import torch

    torch.set_num_threads(1)
    mods = official_torch_modules()
    x = _rand(5, (2, 9, 9, 16))
    block = FFBlock(kernel_size=k, kernel_size1=k1, kernel_size2=k2, use_se=use_se,
                    use_layer_scale=ls)  # fmt: skip
    v = random_variables(block, x, seed=6)
    tb = load_torch(mods["FFBlock"](16, k, use_se, 3.0, k1, k2, ls), v)
    got = jit(functools.partial(block.apply, train=False))(v, x)
    _close(got, run_torch(tb, x))
    mods["replace_batchnorm"](tb)  # the official fuse vs reparameterize
    _close(jit(block.clone(deploy=True).apply)(reparameterize(v), x), run_torch(tb, x))

    if not use_se:
        return  # PatchMerging once
    pm = PatchMerging(32)
    v = random_variables(pm, x, seed=7)
    tp = load_torch(mods["PatchMerging"](16, 32), v)
    got = jit(functools.partial(pm.apply, train=False))(v, x)
    _close(got, run_torch(tp, x))
    mods["replace_batchnorm"](tp)
    _close(jit(pm.clone(deploy=True).apply)(reparameterize(v), x), run_torch(tp, x))
