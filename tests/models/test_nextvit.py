"""Next-ViT (arXiv 2207.05501): blocks, model, parameter count, reparameterisation, timm import."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.nextvit import (
    EfficientAttention,
    NextTransformerBlock,
    avg_pool_2x2_ceil,
    make_divisible,
    token_avg_pool,
)
from jaxblocks.interop.timm import load_timm_state_dict
from jaxblocks.models.nextvit import NextViTConfig, min_input_size, reparameterize
from jaxblocks.registry import create_model, model_info

# Correctness checks on tiny inputs: unoptimised XLA compiles several times faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
TINY = dict(model_info("nextvit_small").tiny)


def _rand(seed: int, shape, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _perturb(tree, seed: int, scale: float = 0.3):
    """Random values around the initial ones, so BN and the MLPs are far from identity."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)


def _random_variables(model, x, seed: int = 1):
    """Well-scaled random variables with non-trivial BN statistics, drawn with NumPy on the
    abstract structure (a real init of the whole model would compile for seconds)."""
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
        return jnp.asarray((0.3 if name == "mean" else 0.1) * z)  # bias, running mean

    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
    return jax.tree_util.tree_map_with_path(draw, abstract)


# ----------------------------------------------------------------------------- blocks


def test_make_divisible_and_ntb_split():
    assert make_divisible(int(256 * 0.75), 32) == 192
    assert make_divisible(int(1024 * 0.75), 32) == 768
    assert make_divisible(20, 32) == 32 and make_divisible(100, 64) == 128
    assert NextTransformerBlock(out_features=512).split_channels() == (384, 128)
    with pytest.raises(ValueError, match="MHCA part must be a positive multiple"):
        NextTransformerBlock(out_features=32).init(jax.random.key(0), jnp.ones((1, 4, 4, 32)))


def test_pools_match_torch_semantics():
    x = np.asarray(_rand(0, (2, 5, 7, 3)))
    y = np.asarray(avg_pool_2x2_ceil(jnp.asarray(x)))
    assert y.shape == (2, 3, 4, 3)
    # ceil mode, count_include_pad=False: the last row/column averages what exists
    np.testing.assert_allclose(y[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(y[:, 2, 3], x[:, 4, 6], rtol=1e-6)
    np.testing.assert_allclose(y[:, 2, 1], x[:, 4, 2:4].mean(axis=1), rtol=1e-6)
    t = np.asarray(_rand(1, (2, 18, 3)))
    p = np.asarray(token_avg_pool(jnp.asarray(t), 4))  # 18 tokens -> 4, remainder dropped
    np.testing.assert_allclose(p, t[:, :16].reshape(2, 4, 4, 3).mean(axis=2), rtol=1e-6)
    with pytest.raises(ValueError, match="fewer than the window"):
        token_avg_pool(jnp.asarray(t), 32)


def _emhsa_reference(p, s, x, heads, window):
    """E-MHSA in NumPy from the module's parameters (eval-mode BN on the pooled tokens)."""
    x = np.asarray(x, np.float64)
    p, s = jax.tree.map(lambda a: np.asarray(a, np.float64), (p, s))
    b, n, c = x.shape
    q = x @ p["q"]["kernel"] + p["q"]["bias"]
    m = n // window
    kv = x[:, : m * window].reshape(b, m, window, c).mean(axis=2)
    kv = (kv - s["mean"]) / np.sqrt(s["var"] + 1e-5)
    kv = kv * p["norm"]["scale"] + p["norm"]["bias"]
    k = kv @ p["k"]["kernel"] + p["k"]["bias"]
    v = kv @ p["v"]["kernel"] + p["v"]["bias"]
    d = c // heads
    qh, kh, vh = (a.reshape(b, -1, heads, d) for a in (q, k, v))
    logits = np.einsum("bnhd,bmhd->bhnm", qh, kh) / np.sqrt(d)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    y = np.einsum("bhnm,bmhd->bnhd", w, vh).reshape(b, n, c)
    return y @ p["proj"]["kernel"] + p["proj"]["bias"]


def test_efficient_attention_matches_formula():
    attn = EfficientAttention(head_dim=16, sr_ratio=2)
    x = _rand(0, (2, 18, 48))  # 3 heads; 18 tokens pooled in windows of 4 -> 4 keys
    v = nn.unbox(attn.init(jax.random.key(1), x))
    p = _perturb(v["params"], 2)
    s = {"mean": _rand(3, (48,), 0.3), "var": 0.5 + jnp.abs(_rand(4, (48,)))}
    got = jit(functools.partial(attn.apply, train=False))(
        {"params": p, "batch_stats": {"norm": s}}, x
    )
    want = _emhsa_reference(p, s, x, heads=3, window=4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # without reduction there is no BN
    plain = nn.unbox(EfficientAttention(head_dim=16).init(jax.random.key(1), x))
    assert set(plain["params"]) == {"q", "k", "v", "proj"} and "batch_stats" not in plain


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny():
    model = create_model("nextvit_small", **TINY)
    x = _rand(0, (2, 32, 32, 3))
    return model, x, _random_variables(model, x), jit(functools.partial(model.apply, train=False))


def test_tiny_forward_features_and_grad(tiny):
    model, x, v, evaluate = tiny
    logits = evaluate(v, x)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.max(jnp.abs(logits[0] - logits[1]))) > 1e-3
    feats = jax.eval_shape(functools.partial(model.apply, train=False, features=True), v, x)
    assert [f.shape for f in feats] == [(2, 8, 8, 32), (2, 4, 4, 64), (2, 2, 2, 96), (2, 1, 1, 128)]

    def loss(params):
        out, upd = model.apply({**v, "params": params}, x, mutable=["batch_stats"])
        return jnp.mean(jnp.square(out)), upd

    (value, upd), grads = jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
    assert np.isfinite(float(value))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))), path
    e_mhsa = grads["stages_1"]["blocks_0"]["e_mhsa"]
    assert float(jnp.max(jnp.abs(e_mhsa["v"]["kernel"]))) > 0  # one key: k has no gradient
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved)), "train mode must update every running statistic"


def test_train_flag_and_input_checks(tiny):
    model, x, v, evaluate = tiny
    with pytest.raises(ValueError, match="train=False"):
        model.apply(v, x)
    with pytest.raises(ValueError, match=r"too small.*at least 32"):
        model.apply(v, x[:, :16, :16], train=False)
    with pytest.raises(ValueError, match="ntb_periods must have one entry per stage"):
        NextViTConfig(ntb_periods=(0, 4))
    assert min_input_size(NextViTConfig()) == 32


def test_param_count_nextvit_small():
    model = create_model("nextvit_small")
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(abstract)["params"]))
    assert n == model_info("nextvit_small").published_params == 31_763_368


def test_reparameterize_matches_eval(tiny):
    model, x, v, evaluate = tiny
    deployed = reparameterize(v)
    block = deployed["params"]["stages_2"]["blocks_1"]  # an NTB with sr_ratio 2
    assert "norm1" not in block and "norm2" not in block and "norm" not in block["e_mhsa"]
    assert "norm" not in deployed["params"]["stages_0"]["blocks_0"]  # NCB pre-MLP BN
    want = evaluate(v, x)
    got = jit(functools.partial(model.clone(deploy=True).apply, train=False))(deployed, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
    with pytest.raises(ValueError, match="already reparameterized"):
        reparameterize(deployed)


# ----------------------------------------------------------------------------- timm interop


def _timm_layout_state_dict(variables) -> dict[str, np.ndarray]:
    """The timm state dict of ``variables``: ``name_<i>`` -> ``name.<i>``, HWIO -> OIHW,
    [in, out] -> [out, in], BN leaves and ``num_batches_tracked`` as torch names them."""
    sd: dict[str, np.ndarray] = {}
    leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}  # fmt: skip
    for path, a in jax.tree_util.tree_leaves_with_path(variables):
        names = [str(k.key) for k in path]
        modules = [re.sub(r"_(\d+)$", r".\1", n) for n in names[1:-1]]
        key = ".".join(modules).replace("head_fc", "head.fc") + "." + leaf_names[names[-1]]
        a = np.asarray(a)
        if names[-1] == "kernel":
            a = np.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 else a.T
        sd[key] = a
        if names[-1] == "mean":
            sd[key.replace("running_mean", "num_batches_tracked")] = np.array(3)
    return sd


def test_load_timm_state_dict_round_trip(tiny):
    _, _, v, _ = tiny
    overrides = {k: val for k, val in TINY.items() if k != "num_classes"}
    sd = _timm_layout_state_dict(v)
    assert sd["stages.1.blocks.0.e_mhsa.q.weight"].shape == (48, 48)
    assert sd["stages.1.blocks.0.mhca.group_conv3x3.weight"].shape == (16, 16, 3, 3)
    assert sd["head.fc.weight"].shape == (10, 128) and "stem.3.norm.running_var" in sd
    got = load_timm_state_dict("nextvit_small", sd, **overrides)  # num_classes from head.fc
    assert jax.tree.structure(got) == jax.tree.structure(v)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(v), strict=True
    ):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    del sd["stages.2.blocks.1.e_mhsa.norm.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): stages.2.blocks.1.e_mhsa.norm"):
        load_timm_state_dict("nextvit_small", sd, **overrides)


@pytest.mark.torch
def test_matches_timm_nextvit_small():
    import timm
    import torch

    torch.manual_seed(0)
    ref = timm.create_model("nextvit_small", pretrained=False).eval()
    with torch.no_grad():
        for m in ref.modules():  # non-trivial BN statistics and affine (BatchNorm1d/2d)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    variables = load_timm_state_dict("nextvit_small", ref.state_dict())
    model = create_model("nextvit_small")
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    got = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x_nhwc))
    assert got.shape == want.shape == (1, 1000)
    rel = np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want**2))
    assert rel < 1e-4, f"relative RMS error {rel:.2e}"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # timm's own reparameterize (merge_pre_bn) agrees with ours
    deployed = reparameterize(variables)
    got_deploy = jax.jit(functools.partial(model.clone(deploy=True).apply, train=False))(
        deployed, x_nhwc
    )
    for m in ref.modules():
        if hasattr(m, "reparameterize"):
            m.reparameterize()
    with torch.no_grad():
        want_deploy = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got_deploy, want_deploy, rtol=1e-4, atol=1e-4 * np.abs(want).max())
