"""UniFormer blocks (arXiv 2201.09450): DPE and the token helpers against NumPy, bad-input
errors, and (with torch) CBlock, SABlock and the light EvoSABlock chain against torch rebuilds
of the official modules (Sense-X/UniFormer ``uniformer.py`` / ``uniformer_light.py``) on the
same weights."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.uniformer import (
    DPE,
    MHSA,
    CBlock,
    EvoSABlock,
    PatchEmbed,
    SABlock,
    merge_tokens,
    pool_global_attention,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def _rand(seed: int, shape, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def random_variables(module, *args, seed: int = 1, **kwargs):
    """Well-scaled random variables with non-trivial norms and BN statistics, drawn with NumPy
    on the abstract structure of ``module.init(key, *args, **kwargs)``."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = path[-1].key
        z = rng.standard_normal(a.shape).astype(np.float32)
        if name == "kernel":  # HWIO or [in, out]: variance 1 / fan_in
            return jnp.asarray(z / np.sqrt(np.prod(a.shape[:-1])))
        if name == "scale":
            return jnp.asarray(1.0 + 0.2 * z)
        if name == "var":
            return jnp.asarray(0.5 + 0.5 * np.abs(z))
        if name.startswith("gamma"):
            return jnp.asarray(0.5 + 0.2 * z)
        return jnp.asarray((0.3 if name in ("mean", "cls_token") else 0.1) * z)

    abstract = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract))


# ----------------------------------------------------------------------------- NumPy


def test_dpe_matches_numpy():
    x = _rand(0, (2, 5, 6, 4))
    dpe = DPE()
    v = random_variables(dpe, x)
    assert v["params"]["kernel"].shape == (3, 3, 1, 4) and v["params"]["bias"].shape == (4,)
    got = jit(dpe.apply)(v, x)
    k, b = (np.asarray(a, np.float64) for a in (v["params"]["kernel"], v["params"]["bias"]))
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(xp[:, i : i + 5, j : j + 6] * k[i, j, 0] for i in range(3) for j in range(3))
    np.testing.assert_allclose(got, np.asarray(x) + conv + b, rtol=1e-5, atol=1e-5)


def test_token_helpers_match_numpy():
    x, s = np.asarray(_rand(0, (2, 5, 3))), np.abs(np.asarray(_rand(1, (2, 5)))) + 0.1
    want = (s[:, :, None] / s.sum(1)[:, None, None] * x).sum(1, keepdims=True)
    np.testing.assert_allclose(merge_tokens(jnp.asarray(x), jnp.asarray(s)), want, rtol=1e-5)
    g = np.abs(np.asarray(_rand(2, (2, 5 * 7)))) + 0.1  # 5x7 map: floor pooling to 2x3
    got = np.asarray(pool_global_attention(jnp.asarray(g), 5, 7))
    pooled = g.reshape(2, 5, 7)[:, :4, :6].reshape(2, 2, 2, 3, 2).mean(axis=(2, 4)).reshape(2, 6)
    pooled = pooled * g.sum(1, keepdims=True) / pooled.sum(1, keepdims=True)
    np.testing.assert_allclose(got, pooled, rtol=1e-5)
    np.testing.assert_allclose(got.sum(1), g.sum(1), rtol=1e-5)


def test_bad_inputs_are_value_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"CBlock: x must be \[B, H, W, C\].*\(2, 8, 16\)"):
        CBlock().init(key, jnp.ones((2, 8, 16)))
    with pytest.raises(ValueError, match=r"SABlock: 24 channels \(x.shape\[-1\]\).*head_dim=16"):
        SABlock(head_dim=16).init(key, jnp.ones((1, 2, 2, 24)))
    with pytest.raises(ValueError, match=r"MHSA: x must be \[B, N, C\].*\(4, 16\)"):
        MHSA(head_dim=8).init(key, jnp.ones((4, 16)))
    with pytest.raises(ValueError, match="DPE: kernel_size must be odd"):
        DPE(kernel_size=4).init(key, jnp.ones((1, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"PatchEmbed: x of shape \(1, 3, 3, 3\) is smaller"):
        PatchEmbed(8, 4).init(key, jnp.ones((1, 3, 3, 3)))
    x, cls = jnp.ones((2, 4, 4, 16)), jnp.ones((2, 1, 16))
    evo = EvoSABlock(head_dim=8, prune_ratio=0.5)
    with pytest.raises(ValueError, match="prune_ratio < 1 needs the global_attn"):
        evo.init(key, cls, x)
    with pytest.raises(
        ValueError, match=r"global_attn must be \[B, H \* W\] = \(2, 16\).*\(2, 4\)"
    ):
        evo.init(key, cls, x, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"cls_token must be \[B, 1, C\] = \(2, 1, 16\)"):
        evo.init(key, jnp.ones((2, 16)), x, jnp.ones((2, 16)))


def test_cblock_train_mode_and_drop_path():
    x = _rand(0, (2, 4, 4, 8))
    block = CBlock(mlp_ratio=2.0, drop_path=0.5)
    v = random_variables(block, x)

    @jit
    def train(v, x, key):
        return block.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})

    y_eval = jit(functools.partial(block.apply, train=False))(v, x)
    (y_a, upd), (y_b, _) = train(v, x, jax.random.key(3)), train(v, x, jax.random.key(4))
    assert float(jnp.max(jnp.abs(y_a - y_eval))) > 1e-3
    assert float(jnp.max(jnp.abs(y_a - y_b))) > 1e-3  # drop path follows the rng
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved))


# ----------------------------------------------------------------------------- torch oracles


@functools.cache
def torch_modules():
    """torch rebuilds of the official modules (uniformer.py; uniformer_light.py's EvoSABlock
    with its module-level global state), written as the official code reads."""
    import torch
    from torch import nn as tnn

    class Mlp(tnn.Module):
        def __init__(self, dim, hidden, conv=False):
            super().__init__()
            layer = (lambda i, o: tnn.Conv2d(i, o, 1)) if conv else tnn.Linear
            self.fc1, self.act, self.fc2 = layer(dim, hidden), tnn.GELU(), layer(hidden, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    state = {"global_attn": 0}  # uniformer_light.py's globals

    class Attention(tnn.Module):
        def __init__(self, dim, num_heads, trade_off=None):
            super().__init__()
            self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
            self.qkv, self.proj = tnn.Linear(dim, dim * 3), tnn.Linear(dim, dim)
            self.trade_off = trade_off

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            if self.trade_off is not None:  # the light model's global-score update
                t, ga = self.trade_off, state["global_attn"]
                if isinstance(ga, int):
                    state["global_attn"] = torch.mean(attn[:, :, 0, 1:], dim=1)
                elif ga.shape[1] == n - 1:
                    state["global_attn"] = (1 - t) * ga + t * torch.mean(attn[:, :, 0, 1:], dim=1)
                else:
                    cls_attn = torch.mean(attn[:, :, 0, 1:-1], dim=1)
                    ga[:, : (n - 2)] = (1 - t) * ga[:, : (n - 2)] + t * cls_attn
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class CBlock(tnn.Module):
        def __init__(self, dim, mlp_ratio, ls=False):
            super().__init__()
            self.pos_embed = tnn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.norm1, self.norm2 = tnn.BatchNorm2d(dim), tnn.BatchNorm2d(dim)
            self.conv1, self.conv2 = tnn.Conv2d(dim, dim, 1), tnn.Conv2d(dim, dim, 1)
            self.attn = tnn.Conv2d(dim, dim, 5, padding=2, groups=dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), conv=True)
            self.ls = ls
            if ls:
                self.gamma_1 = tnn.Parameter(torch.ones(1, dim, 1, 1))
                self.gamma_2 = tnn.Parameter(torch.ones(1, dim, 1, 1))

        def forward(self, x):
            g1, g2 = (self.gamma_1, self.gamma_2) if self.ls else (1, 1)
            x = x + self.pos_embed(x)
            x = x + g1 * self.conv2(self.attn(self.conv1(self.norm1(x))))
            return x + g2 * self.mlp(self.norm2(x))

    class SABlock(tnn.Module):
        def __init__(self, dim, head_dim, mlp_ratio, ls=False):
            super().__init__()
            self.pos_embed = tnn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.norm1, self.norm2 = tnn.LayerNorm(dim, eps=1e-6), tnn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, dim // head_dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
            self.ls = ls
            if ls:
                self.gamma_1, self.gamma_2 = (tnn.Parameter(torch.ones(dim)) for _ in "12")

        def forward(self, x):
            g1, g2 = (self.gamma_1, self.gamma_2) if self.ls else (1, 1)
            x = x + self.pos_embed(x)
            b, c, h, w = x.shape
            x = x.flatten(2).transpose(1, 2)
            x = x + g1 * self.attn(self.norm1(x))
            x = x + g2 * self.mlp(self.norm2(x))
            return x.transpose(1, 2).reshape(b, c, h, w)

    def easy_gather(x, indices):
        b, n, c = x.shape
        offset = torch.arange(b, dtype=torch.long).view(b, 1) * n
        return x.reshape(b * n, c)[(indices + offset).view(-1)].reshape(b, indices.shape[1], c)

    class EvoSABlock(tnn.Module):
        """uniformer_light.py's EvoSABlock, eval branch; token indices kept as the official
        code keeps them (floats concatenated to the tokens)."""

        def __init__(self, dim, head_dim, mlp_ratio, prune_ratio, trade_off, downsample, ls=False):
            super().__init__()
            self.pos_embed = tnn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.norm1, self.norm2 = tnn.LayerNorm(dim, eps=1e-6), tnn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, dim // head_dim, trade_off)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
            self.prune_ratio, self.downsample, self.ls = prune_ratio, downsample, ls
            if ls:
                self.gamma_1, self.gamma_2 = (tnn.Parameter(torch.ones(dim)) for _ in "12")
                if prune_ratio != 1:
                    self.gamma_3 = tnn.Parameter(torch.ones(dim))

        def forward(self, cls_token, x):
            g1, g2 = (self.gamma_1, self.gamma_2) if self.ls else (1, 1)
            x = x + self.pos_embed(x)
            b, c, h, w = x.shape
            x = x.flatten(2).transpose(1, 2)
            if self.prune_ratio == 1:
                x = torch.cat([cls_token, x], dim=1)
                x = x + g1 * self.attn(self.norm1(x))
                x = x + g2 * self.mlp(self.norm2(x))
                cls_token, x = x[:, :1], x[:, 1:]
                return cls_token, x.transpose(1, 2).reshape(b, c, h, w)
            n = x.shape[1]
            n_ = int(n * self.prune_ratio)
            indices = torch.argsort(state["global_attn"], dim=1, descending=True)
            ti = state["token_indices"]
            x_ga_ti = torch.cat((x, state["global_attn"].unsqueeze(-1), ti.unsqueeze(-1)), dim=-1)
            x_ga_ti = easy_gather(x_ga_ti, indices)
            x_sorted, ga, ti = x_ga_ti[:, :, :-2], x_ga_ti[:, :, -2], x_ga_ti[:, :, -1]
            state["global_attn"] = ga
            x_info, x_drop, score = x_sorted[:, :n_], x_sorted[:, n_:], ga[:, n_:]
            weight = score / torch.sum(score, dim=1, keepdim=True)
            rep_token = torch.sum(weight.unsqueeze(-1) * x_drop, dim=1, keepdim=True)
            x = torch.cat((cls_token, x_info, rep_token), dim=1)
            tmp = self.attn(self.norm1(x))
            fast = tmp[:, -1:]
            x = x + g1 * tmp
            tmp = self.mlp(self.norm2(x))
            fast = fast + tmp[:, -1:]
            x = x + g2 * tmp
            x_drop = x_drop + (self.gamma_3 if self.ls else 1) * fast.expand(-1, n - n_, -1)
            cls_token, x = x[:, :1, :], x[:, 1:-1, :]
            x_sorted = torch.cat((x, x_drop), dim=1)
            ga = state["global_attn"]
            old_scale = torch.sum(ga, dim=1, keepdim=True)
            indices = torch.argsort(ti, dim=1)
            x_ga_ti = easy_gather(torch.cat((x_sorted, ga.unsqueeze(-1), ti.unsqueeze(-1)), -1),
                                  indices)  # fmt: skip
            x_patch, ga, ti = x_ga_ti[:, :, :-2], x_ga_ti[:, :, -2], x_ga_ti[:, :, -1]
            state["token_indices"] = ti
            if self.downsample:
                ga = tnn.functional.avg_pool2d(ga.reshape(b, 1, h, w), 2, 2).view(b, -1)
                ga = ga * (old_scale / torch.sum(ga, dim=1, keepdim=True))
            state["global_attn"] = ga
            return cls_token, x_patch.transpose(1, 2).reshape(b, c, h, w)

    return dict(Mlp=Mlp, Attention=Attention, CBlock=CBlock, SABlock=SABlock,
                EvoSABlock=EvoSABlock, state=state)  # fmt: skip


def load_into_torch(module, variables) -> None:
    """Copy Flax variables into a torch module by name (``blocks3.0`` <-> ``blocks3_0``,
    ``proj.0`` <-> ``proj_0``): conv HWIO -> OIHW, linear [in, out] -> [out, in]."""
    import torch

    params, stats = variables["params"], variables.get("batch_stats", {})
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, tensor in tensors.items():
        if name.endswith("num_batches_tracked"):
            continue
        parts = []
        for p in name.split("."):
            if p.isdigit():
                parts[-1] = f"{parts[-1]}_{p}"
            else:
                parts.append(p)
        *path, leaf = parts
        tree = stats if leaf.startswith("running_") else params
        for p in path:
            tree = tree[p]
        if leaf == "weight":
            value = np.asarray(tree["kernel" if tensor.ndim > 1 else "scale"])
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        else:
            value = np.asarray(tree[{"running_mean": "mean", "running_var": "var"}.get(leaf, leaf)])
        value = np.array(value, np.float64).reshape(tensor.shape)
        with torch.no_grad():
            tensor.copy_(torch.as_tensor(value, dtype=tensor.dtype))


def to_torch(x):
    import torch

    x = np.asarray(x, np.float64)
    return torch.as_tensor(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x)


def from_torch(t):
    t = t.detach().numpy()
    return t.transpose(0, 2, 3, 1) if t.ndim == 4 else t


@pytest.mark.torch
def test_cblock_matches_official():
    layer_scale = None  # the light models' CBlock layer scale is covered by the model test
    x = _rand(0, (2, 6, 5, 16))
    block = CBlock(mlp_ratio=3.0, layer_scale_init=layer_scale)
    v = random_variables(block, x)
    got = jit(functools.partial(block.apply, train=False))(v, x)
    ref = torch_modules()["CBlock"](16, 3.0, ls=layer_scale is not None).double().eval()
    load_into_torch(ref, v)
    np.testing.assert_allclose(got, from_torch(ref(to_torch(x))), rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_sablock_matches_official():
    x = _rand(0, (2, 3, 5, 32))
    block = SABlock(head_dim=8, mlp_ratio=4.0, layer_scale_init=0.5)
    v = random_variables(block, x)
    got = jit(block.apply)(v, x)
    ref = torch_modules()["SABlock"](32, 8, 4.0, ls=True).double().eval()
    load_into_torch(ref, v)
    np.testing.assert_allclose(got, from_torch(ref(to_torch(x))), rtol=1e-4, atol=1e-4)


class _EvoChain(nn.Module):
    """First block (sets the score), a pruning block, a pruning block that pools the score."""

    ls: float | None = None

    @nn.compact
    def __call__(self, cls, x):
        kw = dict(head_dim=8, mlp_ratio=3.0, layer_scale_init=self.ls)
        cls, x, g = EvoSABlock(name="b0", **kw)(cls, x)
        cls, x, g = EvoSABlock(prune_ratio=0.5, trade_off=0.5, name="b1", **kw)(cls, x, g)
        return EvoSABlock(prune_ratio=0.4, trade_off=0.3, downsample=True, name="b2", **kw)(
            cls, x, g
        )


@pytest.mark.torch
@pytest.mark.parametrize("layer_scale", [0.5])  # with gamma_1..3; without: the model test
def test_evo_block_chain_matches_official(layer_scale):
    import torch

    cls, x = _rand(0, (2, 1, 16), 0.5), _rand(1, (2, 4, 5, 16))
    chain = _EvoChain(layer_scale)
    v = random_variables(chain, cls, x)
    got_cls, got_x, got_g = jit(chain.apply)(v, cls, x)
    mods = torch_modules()
    ls = layer_scale is not None
    blocks = [
        mods["EvoSABlock"](16, 8, 3.0, 1, 1, False, ls),
        mods["EvoSABlock"](16, 8, 3.0, 0.5, 0.5, False, ls),
        mods["EvoSABlock"](16, 8, 3.0, 0.4, 0.3, True, ls),
    ]
    state = mods["state"]
    state["global_attn"] = 0
    state["token_indices"] = torch.arange(20, dtype=torch.long).unsqueeze(0).expand(2, -1)
    tc, tx = torch.as_tensor(np.asarray(cls, np.float64)), to_torch(x)
    with torch.no_grad():
        for i, blk in enumerate(blocks):
            blk.double().eval()
            load_into_torch(blk, {"params": v["params"][f"b{i}"]})
            tc, tx = blk(tc, tx)
    np.testing.assert_allclose(got_x, from_torch(tx), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_cls, tc.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_g, state["global_attn"].numpy(), rtol=1e-4, atol=1e-6)
    assert got_g.shape == (2, 2 * 2)
    if ls:
        assert "gamma_3" in v["params"]["b1"] and "gamma_3" not in v["params"]["b0"]
