"""RaftMLP (arXiv 2108.04384): parameter counts, other input sizes, stage features, bad inputs,
gradients, and (with torch) the whole classifier against a torch rebuild of the official
``RaftMLP``/``SerialPermutedLevel`` forward on the same weights, at and away from the training
resolution."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.raftmlp import (
    RAFTMLP_PRESETS,
    RaftMLP,
    RaftMLPConfig,
    level_grids,
    raftmlp_param_count,
)
from jaxblocks.registry import model_info

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Small but complete: 3 levels, embeddings with 1 and 2 kernels, rafts of 2 and 3, depth 2.
SMALL = RaftMLPConfig(
    num_classes=7,
    image_size=16,
    dims=(6, 12, 12),
    depths=(1, 2, 1),
    patch_sizes=(4, 2, 2),
    raft_sizes=(2, 3, 2),
    embedding_kernels=((4, 8), (2, 4), (2,)),
)


def _random_variables(model, x, seed):
    """Well-scaled random params on the abstract structure (no real init): kernels with
    variance 1/fan_in, LayerNorm scale/bias off 1/0."""
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
    rng = np.random.default_rng(seed)

    def draw(path, a):
        z = rng.standard_normal(a.shape).astype(np.float32)
        if path[-1].key == "kernel":
            return jnp.asarray(z / np.sqrt(a.shape[0]))
        return jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + 0.2 * z)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.partial(jax.jit, compiler_options=FAST_COMPILE, static_argnames=("model", "features"))
def _apply(variables, x, model, features=False):
    return model.apply(variables, x, features=features)


def test_param_counts():
    model = RaftMLP.from_config(SMALL)
    x = jnp.ones((1, 16, 16, 3))
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) == (
        raftmlp_param_count(SMALL)
    )
    # the exact counts of the official code at the ImageNet settings (paper: 9.9M/21.4M/36.2M)
    counts = {n: raftmlp_param_count(c) for n, c in RAFTMLP_PRESETS.items()}
    assert counts == {"raftmlp_s": 9_868_768, "raftmlp_m": 21_413_632, "raftmlp_l": 36_184_672}
    for name, n in counts.items():
        published = model_info(name).published_params
        assert abs(n - published) <= 0.005 * published
    assert level_grids(224, (4, 2, 2, 2)) == [56, 28, 14, 7]
    assert level_grids(30, (4, 2, 2)) == [8, 4, 2]  # ceil, as the official code
    # the token mixers are sized by the training grid (4 in level 0) times the raft size 2
    v = params["levels_0"]["blocks_0"]["token_mixing"]["vertical"]["mlp"]["fc1"]["kernel"]
    assert v.shape == (2 * 4, 2 * 2 * 4)


def test_other_input_sizes_and_stage_features():
    model = RaftMLP.from_config(SMALL)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = _random_variables(model, x, seed=0)
    feats = _apply(variables, x, model, features=True)
    assert [f.shape for f in feats] == [(2, 4, 4, 6), (2, 2, 2, 12), (2, 1, 1, 12)]
    logits = _apply(variables, x, model)
    assert logits.shape == (2, 7)
    # any H, W: each level pads up (bicubic) to a multiple of its patch, the token mixing runs
    # on the training grid, the rest at the input's grid
    cases = [
        ((2, 13, 22, 3), [(4, 6), (2, 3), (1, 2)]),
        ((1, 40, 9, 3), [(10, 3), (5, 2), (3, 1)]),
    ]
    for shape, grids in cases:
        xs = jax.random.normal(jax.random.key(1), shape)
        feats = _apply(variables, xs, model, features=True)
        assert [f.shape[1:3] for f in feats] == grids
        out = _apply(variables, xs, model)
        assert out.shape == (shape[0], 7) and bool(jnp.all(jnp.isfinite(out)))
    # num_classes=0: pooled, normalised features
    pooled = RaftMLP.from_config(SMALL, num_classes=0)
    v0 = {"params": {k: v for k, v in variables["params"].items() if k != "classifier"}}
    assert _apply(v0, x, pooled).shape == (2, 12)


def test_bad_inputs_are_value_errors():
    model = RaftMLP.from_config(SMALL)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"x must be NHWC images \[batch, height, width, 3\].*"
                                         r"got shape \(1, 16, 16, 4\)"):  # fmt: skip
        jax.eval_shape(model.init, key, jnp.ones((1, 16, 16, 4)))
    with pytest.raises(ValueError, match=r"got shape \(16, 16, 3\)"):
        jax.eval_shape(model.init, key, jnp.ones((16, 16, 3)))
    with pytest.raises(ValueError, match=r"dims\[1\]=12 must be divisible by raft_sizes\[1\]=5"):
        RaftMLPConfig(dims=(6, 12), depths=(1, 1), patch_sizes=(4, 2), raft_sizes=(2, 5),
                      embedding_kernels=((4,), (2,)))  # fmt: skip
    with pytest.raises(ValueError, match=r"embedding_kernels\[0\]=\(2, 4\) must start with "
                                         r"patch_sizes\[0\]=4"):  # fmt: skip
        RaftMLPConfig(dims=(6,), depths=(1,), patch_sizes=(4,), raft_sizes=(2,),
                      embedding_kernels=((2, 4),))  # fmt: skip
    with pytest.raises(ValueError, match=r"raft_sizes=\(2,\) must have one entry per level"):
        RaftMLPConfig(dims=(6, 12), depths=(1, 1), patch_sizes=(4, 2), raft_sizes=(2,),
                      embedding_kernels=((4,), (2,)))  # fmt: skip


def test_gradients_are_finite():
    model = RaftMLP.from_config(SMALL, drop_path=0.2)
    x = jax.random.normal(jax.random.key(0), (2, 12, 20, 3))  # off the training size
    variables = _random_variables(model, x, seed=1)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def grad(params):
        def loss(p):
            out = model.apply({"params": p}, x, deterministic=False,
                              rngs={"dropout": jax.random.key(2)})  # fmt: skip
            return jnp.mean(jnp.square(out))

        return jax.grad(loss)(params)

    g = jax.tree.leaves(grad(variables["params"]))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in g)
    assert sum(float(jnp.sum(jnp.abs(a))) > 0 for a in g) > 0.9 * len(g)


# ------------------------------------------------------------ torch rebuild of the official code


def _torch_official_forward(params, img, cfg):
    """The official ``RaftMLP.forward`` (``shortcut=False``) with ``SerialPermutedLevel``,
    functional torch ops on NCHW ``img``; the einops patterns of ``libs/modules.py`` written as
    reshape/permute, each next to its pattern."""
    import torch
    import torch.nn.functional as F

    def t(a):
        return torch.from_numpy(np.array(a, np.float32))

    def linear(x, p):
        return F.linear(x, t(p["kernel"]).T, t(p["bias"]))

    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), t(p["scale"]), t(p["bias"]), 1e-5)

    def mlp(x, p):
        return linear(F.gelu(linear(x, p["fc1"])), p["fc2"])

    def permuted_block(x, p, spatial, c, r):
        b, rows, _ = x.shape
        c1, o1 = c // r, rows // (c // r)
        # b (c1 o1) (c2 o2) -> b (o1 o2) (c1 c2)
        y = x.reshape(b, c1, o1, r, spatial).permute(0, 2, 4, 1, 3).reshape(b, o1 * spatial, c)
        y = ln(y, p["norm"])
        # b (o1 o2) (c1 c2) -> b (c1 o1) (c2 o2)
        y = y.reshape(b, o1, spatial, c1, r).permute(0, 3, 1, 4, 2).reshape(b, rows, r * spatial)
        return mlp(y, p["mlp"]) + x

    x = img
    ph = cfg.image_size
    for i, c in enumerate(cfg.dims):
        lp = params[f"levels_{i}"]
        p, r, ks = cfg.patch_sizes[i], cfg.raft_sizes[i], cfg.embedding_kernels[i]
        ph = math.ceil(ph / p)
        _, _, h, w = x.shape
        gh, gw = math.ceil(h / p), math.ceil(w / p)
        if h % p or w % p:
            x = F.interpolate(x, (gh * p, gw * p), mode="bicubic", align_corners=False)
        s = min(ks)
        cols = [F.unfold(x, k, stride=s, padding=(k - s) // 2).transpose(1, 2) for k in ks]
        x = linear(torch.cat(cols, dim=2), lp["embedding"])  # b (h w) c
        b, co = x.shape[0], c // r
        for j in range(cfg.depths[i]):
            bp = lp[f"blocks_{j}"]
            tm = bp["token_mixing"]
            # RaftShrink
            if (gh, gw) == (ph, ph):
                # b (h w) (chw co) -> b (co w) (chw h)
                y = x.reshape(b, gh, gw, r, co).permute(0, 4, 2, 3, 1).reshape(b, co * gw, r * gh)
            else:
                # b (h w) (chw co) -> b (chw co) h w
                y = x.transpose(1, 2).reshape(b, c, gh, gw)
                y = F.interpolate(y, (ph, ph), mode="bicubic", align_corners=False)
                # b (chw co) h w -> b (co w) (chw h)
                y = y.reshape(b, r, co, ph, ph).permute(0, 2, 4, 1, 3).reshape(b, co * ph, r * ph)
            y = permuted_block(y, tm["vertical"], ph, c, r)
            # b (co w) (chw h) -> b (co h) (chw w)
            y = y.reshape(b, co, ph, r, ph).permute(0, 1, 4, 3, 2).reshape(b, co * ph, r * ph)
            y = permuted_block(y, tm["horizontal"], ph, c, r)
            # RaftExpansion
            if (gh, gw) == (ph, ph):
                # b (co h) (chw w) -> b (h w) (chw co)
                x = y.reshape(b, co, ph, r, ph).permute(0, 2, 4, 3, 1).reshape(b, ph * ph, c)
            else:
                # b (co h) (chw w) -> b (chw co) h w
                y = y.reshape(b, co, ph, r, ph).permute(0, 3, 1, 2, 4).reshape(b, c, ph, ph)
                y = F.interpolate(y, (gh, gw), mode="bicubic", align_corners=False)
                # b (chw co) h w -> b (h w) (chw co)
                x = y.reshape(b, c, gh * gw).transpose(1, 2)
            cm = bp["channel_mixing"]
            x = mlp(ln(x, cm["norm"]), cm["mlp"]) + x  # ChannelBlock
        x = x.transpose(1, 2).reshape(b, c, gh, gw)  # ToPixel: b (h w) c -> b c h w
    y = ln(x.permute(0, 2, 3, 1), params["norm"]).mean(dim=(1, 2))
    return linear(y, params["classifier"])


@pytest.mark.torch
def test_matches_torch_rebuild_of_the_official_model():
    import torch

    model = RaftMLP.from_config(SMALL)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = _random_variables(model, x, seed=3)
    params = jax.tree.map(np.asarray, variables["params"])
    # the training size, then sizes that need padding to the patch and grid resizes
    for shape in [(2, 16, 16, 3), (2, 13, 22, 3)]:
        xs = np.array(jax.random.normal(jax.random.key(shape[1]), shape))
        with torch.no_grad():
            want = _torch_official_forward(
                params, torch.from_numpy(xs).permute(0, 3, 1, 2).contiguous(), SMALL
            ).numpy()
        got = np.asarray(_apply(variables, jnp.asarray(xs), model))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=str(shape))
        assert float(np.std(want)) > 0.1
