"""NiNformer (https://arxiv.org/abs/2403.02411): gating unit and block against NumPy on the
modules' own parameters, the shared LayerNorm, the fixed sequence length, dropout, the model's
parameter count and gradients, and (with torch) the classifier against torch.nn layers."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.ninformer import MixerGatingUnit, NiNBlock, mixer_gate
from jaxblocks.models.ninformer import NiNformer, NiNformerConfig, ninformer_param_count

_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _ffn(x, p):
    h = _gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _np_mgu(x, p):
    m = p["mixer"]
    u = x @ p["proj"]["kernel"] + p["proj"]["bias"]
    t = _ffn(np.swapaxes(_ln(x, m["token_norm"]), 1, 2), m["token_mlp"])  # over the sequence
    v = x + np.swapaxes(t, 1, 2)
    v = v + _ffn(_ln(v, m["channel_norm"]), m["channel_mlp"])
    return u * v


def _np_block(x, p):
    x = x + _np_mgu(_ln(x, p["norm"]), p["mgu"])
    return x + _ffn(_ln(x, p["norm"]), p["ffn"])  # the same LayerNorm parameters twice


def _perturbed(variables, seed):
    """float64 NumPy params; LayerNorm scale/bias moved off 1/0 so they matter."""
    leaves, treedef = jax.tree.flatten(nn.unbox(variables)["params"])
    rng = np.random.default_rng(seed)
    out = [np.asarray(a, np.float64) + 0.3 * rng.standard_normal(a.shape) for a in leaves]
    return jax.tree.unflatten(treedef, out)


def _rel(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - b) ** 2)) / np.sqrt(np.mean(b**2)))


def test_gating_unit_matches_numpy(key):
    x = jax.random.normal(key, (2, 6, 5))
    mgu = MixerGatingUnit(seq_len=6, token_dim=7, channel_dim=9)
    p = _perturbed(mgu.init(jax.random.key(1), x), seed=0)
    y = mgu.apply({"params": jax.tree.map(jnp.float32, p)}, x)
    want = _np_mgu(np.asarray(x, np.float64), p)
    assert y.shape == x.shape
    assert _rel(y, want) < 1e-5
    # the gate is a plain product: no sigmoid, no split halves
    u = np.asarray(x, np.float64) @ p["proj"]["kernel"] + p["proj"]["bias"]
    assert not np.allclose(np.asarray(y), u, atol=1e-2)
    np.testing.assert_array_equal(mixer_gate(jnp.array([2.0, -3.0]), jnp.array([4.0, 5.0])),
                                  np.array([8.0, -15.0]))  # fmt: skip


def test_block_matches_numpy_with_one_shared_layer_norm(key):
    x = jax.random.normal(key, (2, 4, 6))
    block = NiNBlock(d_model=6, d_ffn=10, seq_len=4)
    variables = block.init(jax.random.key(1), x)
    params = nn.unbox(variables)["params"]
    # One LayerNorm at block level (the official NiNBlock reuses self.norm); the two inside the
    # mixer are its token and channel norms.
    assert sorted(params) == ["ffn", "mgu", "norm"]
    n_ln = sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
               if "norm" in jax.tree_util.keystr(path) and path[-1].key == "scale")  # fmt: skip
    assert n_ln == 3
    p = _perturbed(variables, seed=1)
    y = block.apply({"params": jax.tree.map(jnp.float32, p)}, x)
    assert _rel(y, _np_block(np.asarray(x, np.float64), p)) < 1e-5
    # with two different norms (the usual pre-norm block) the result would differ
    other = {"scale": p["norm"]["scale"] + 0.5, "bias": p["norm"]["bias"]}
    x64 = np.asarray(x, np.float64)
    h = x64 + _np_mgu(_ln(x64, p["norm"]), p["mgu"])
    two_norms = h + _ffn(_ln(h, other), p["ffn"])
    assert _rel(y, two_norms) > 1e-2


def test_wrong_sequence_length_is_a_value_error(key):
    block = NiNBlock(d_model=6, d_ffn=10, seq_len=4)
    variables = block.init(key, jnp.ones((1, 4, 6)))
    with pytest.raises(ValueError, match=r"sequence length 5.*seq_len=4"):
        block.apply(variables, jax.random.normal(key, (1, 5, 6)))
    with pytest.raises(ValueError, match=r"d_model=6"):
        block.apply(variables, jax.random.normal(key, (1, 4, 7)))
    with pytest.raises(ValueError, match=r"rank 2"):
        block.apply(variables, jax.random.normal(key, (4, 6)))
    model = NiNformer(d_model=8, d_ffn=16, num_layers=1)
    with pytest.raises(ValueError, match=r"x must be NHWC images \[batch, 32, 32, 3\]"):
        model.init(key, jnp.ones((1, 28, 28, 3)))
    with pytest.raises(ValueError, match="divisible"):
        NiNformerConfig(image_size=30)


def test_dropout_follows_deterministic_flag(key):
    x = jax.random.normal(key, (2, 4, 6))
    block = NiNBlock(d_model=6, d_ffn=10, seq_len=4, dropout=0.5)
    variables = block.init(jax.random.key(1), x)
    y_eval = block.apply(variables, x)
    y_eval2 = block.apply(variables, x, deterministic=True, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(y_eval, y_eval2)
    drop = lambda k: block.apply(variables, x, deterministic=False, rngs={"dropout": k})  # noqa: E731
    a, b, a2 = drop(jax.random.key(3)), drop(jax.random.key(4)), drop(jax.random.key(3))
    np.testing.assert_array_equal(a, a2)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    assert float(jnp.max(jnp.abs(a - y_eval))) > 1e-3
    # rate 0: the training form equals the eval form
    block0 = block.clone(dropout=0.0)
    train0 = block0.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(train0, y_eval)


def test_model_forward_grad_and_param_count(key):
    cfg = NiNformerConfig(image_size=16, d_model=16, d_ffn=24, num_layers=1, num_classes=5)
    model = NiNformer.from_config(cfg)
    x = jax.random.normal(key, (2, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    n = sum(a.size for a in jax.tree.leaves(nn.unbox(variables)["params"]))
    assert n == ninformer_param_count(cfg)
    # the official CIFAR-10 classifier, counted layer by layer by hand:
    # patcher 12,544 + 4 x 659,264 per block + head 2,570
    assert ninformer_param_count(NiNformerConfig()) == 2_652_170

    def loss(params):
        logits = model.apply({"params": params}, x, deterministic=False,
                             rngs={"dropout": jax.random.key(2)})  # fmt: skip
        return jnp.mean(jnp.square(logits)), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert logits.shape == (2, 5)
    leaves = jax.tree.leaves(nn.unbox(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


@pytest.mark.torch
def test_classifier_matches_torch_layers(key):
    """The classifier rebuilt from torch.nn layers (Conv2d, LayerNorm, Linear, GELU) as the
    official NiNformerImageClassification wires them, on the same weights."""
    import torch

    cfg = NiNformerConfig(image_size=8, d_model=6, d_ffn=10, num_layers=2, num_classes=3)
    model = NiNformer.from_config(cfg)
    x = jax.random.normal(key, (2, 8, 8, 3))
    p = _perturbed(model.init(jax.random.key(1), x), seed=2)
    y = model.apply({"params": jax.tree.map(jnp.float32, p)}, x)

    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731

    def lin(q):
        m = torch.nn.Linear(*q["kernel"].shape).double()
        m.weight.data, m.bias.data = t(q["kernel"]).T.contiguous(), t(q["bias"])
        return m

    def ln(q):
        m = torch.nn.LayerNorm(q["scale"].shape[0]).double()
        m.weight.data, m.bias.data = t(q["scale"]), t(q["bias"])
        return m

    def ffn(q, z):
        return lin(q["fc2"])(torch.nn.functional.gelu(lin(q["fc1"])(z)))

    conv = torch.nn.Conv2d(3, 6, 4, 4).double()
    conv.weight.data = t(p["patcher"]["kernel"]).permute(3, 2, 0, 1).contiguous()
    conv.bias.data = t(p["patcher"]["bias"])
    with torch.no_grad():
        z = conv(t(x).permute(0, 3, 1, 2))
        z = z.permute(0, 2, 3, 1).reshape(2, -1, 6)
        for i in range(cfg.num_layers):
            q = p[f"blocks_{i}"]
            norm, m = ln(q["norm"]), q["mgu"]["mixer"]
            h = norm(z)
            v = h + ffn(m["token_mlp"], ln(m["token_norm"])(h).transpose(1, 2)).transpose(1, 2)
            v = v + ffn(m["channel_mlp"], ln(m["channel_norm"])(v))
            z = z + lin(q["mgu"]["proj"])(h) * v
            z = z + ffn(q["ffn"], norm(z))
        want = lin(p["classifier"])(z.mean(dim=1)).numpy()
    assert _rel(y, want) < 1e-5
