"""TVConv (https://arxiv.org/abs/2203.10489): the per-pixel depthwise conv against a NumPy loop
over pixels and taps, equal kernels against a depthwise nn.Conv, deploy against the training
form, the fixed spatial size, gradients, and (with torch) the layer against torch.nn layers
wired as the official ``TVConv``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.tvconv import (
    TVConv,
    TVConvInvertedResidual,
    per_pixel_depthwise_conv,
    precompute_tvconv_weights,
)


def _np_per_pixel(x, weight, k, s, bias=None):
    """out[b, i, j, c] = Σ_{di, dj} W[i, j, c, di·k + dj] · x_pad[b, i·s + di, j·s + dj, c]."""
    b, _, _, c = x.shape
    h, w = weight.shape[:2]
    p = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = np.zeros((b, h, w, c))
    for i in range(h):
        for j in range(w):
            for di in range(k):
                for dj in range(k):
                    out[:, i, j, :] += weight[i, j, :, di * k + dj] * xp[:, i * s + di, j * s + dj]
            if bias is not None:
                out[:, i, j, :] += bias[i, j]
    return out


def _perturb(variables, seed, scale=0.3):
    leaves, treedef = jax.tree.flatten(nn.unbox(variables)["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [a + scale * jax.random.normal(k_, a.shape) for k_, a in zip(keys, leaves, strict=True)]
    return {**nn.unbox(variables), "params": jax.tree.unflatten(treedef, new)}


@pytest.mark.parametrize(("size", "k", "s"), [((7, 5), 3, 1), ((8, 6), 3, 2), ((5, 6), 5, 1)])
def test_per_pixel_conv_matches_numpy_loop(size, k, s):
    kx, kw, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, *size, 3))
    h, w = (size[0] + 2 * ((k - 1) // 2) - k) // s + 1, (size[1] + 2 * ((k - 1) // 2) - k) // s + 1
    weight = jax.random.normal(kw, (h, w, 3, k * k))
    bias = jax.random.normal(kb, (h, w, 3))
    y = jax.jit(per_pixel_depthwise_conv, static_argnums=(2, 3))(x, weight, k, s, bias)
    want = _np_per_pixel(*(np.asarray(a, np.float64) for a in (x, weight)), k, s, np.asarray(bias))
    assert y.shape == (2, h, w, 3)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s", [1, 2])
def test_equal_kernels_equal_a_depthwise_conv(s):
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 8, 8, 4))
    kernel = jax.random.normal(kw, (3, 3, 1, 4))  # HWIO, depthwise
    conv = nn.Conv(4, (3, 3), strides=s, padding=((1, 1), (1, 1)), feature_group_count=4,
                   use_bias=False)  # fmt: skip
    want = conv.apply({"params": {"kernel": kernel}}, x)
    taps = jnp.transpose(kernel[:, :, 0, :].reshape(9, 4))  # [C, k²], tap = di·3 + dj
    h = 8 // s
    weight = jnp.broadcast_to(taps[None, None], (h, h, 4, 9))
    np.testing.assert_allclose(per_pixel_depthwise_conv(x, weight, 3, s), want, rtol=1e-5,
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(("s", "use_bias"), [(1, True), (2, False)])
def test_deploy_equals_training_form_at_eval(s, use_bias):
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 4))
    block = TVConvInvertedResidual(features=4 if s == 1 else 6, h=8 // s, w=8 // s, strides=s,
                                   expand_ratio=2, use_bias=use_bias)  # fmt: skip
    v = _perturb(jax.jit(block.init)(jax.random.key(6), x), 7)
    train = jax.jit(lambda v: block.apply(v, x, train=True, mutable=["batch_stats"]))
    _, upd = train(v)  # non-trivial running statistics
    v = {**v, **upd}
    y = jax.jit(lambda v: block.apply(v, x, train=False))(v)
    deployed = jax.jit(precompute_tvconv_weights)(v)
    tv = deployed["params"]["tvconv"]
    assert sorted(tv) == (["bias", "weight"] if use_bias else ["weight"])
    assert tv["weight"].shape == (8 // s, 8 // s, 8 * 9)
    jax.tree.map(np.testing.assert_array_equal, deployed["batch_stats"], v["batch_stats"])
    y_dep = jax.jit(lambda v: block.clone(deploy=True).apply(v, x, train=False))(deployed)
    np.testing.assert_allclose(y_dep, y, rtol=1e-6, atol=1e-6)
    # the deploy form keeps the deploy shapes of init
    abstract = jax.eval_shape(block.clone(deploy=True).init, jax.random.key(0), x)
    assert jax.tree.map(lambda a: a.shape, nn.unbox(abstract)["params"]) == jax.tree.map(
        lambda a: a.shape, deployed["params"]
    )


def test_wrong_spatial_size_is_a_value_error():
    layer = TVConv(h=8, w=8)
    v = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    # the kernels vary over space: a constant input does not give a constant output (as any
    # translation-invariant conv would away from the border)
    const = layer.apply(_perturb(v, 4), jnp.ones((1, 8, 8, 3)))[0, 2:6, 2:6]
    assert float(jnp.std(const)) > 1e-3
    with pytest.raises(ValueError, match=r"\(1, 10, 8, 3\).*10x8 output.*h=8, w=8"):
        layer.apply(v, jax.random.normal(jax.random.key(1), (1, 10, 8, 3)))
    with pytest.raises(ValueError, match="expected input height/width 16x16"):
        layer.clone(strides=2).apply(v, jnp.ones((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="kernel_size=4 must be odd"):
        TVConv(h=8, w=8, kernel_size=4).init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="rank 3"):
        layer.apply(v, jnp.ones((8, 8, 3)))
    with pytest.raises(ValueError, match="weight has shape"):
        per_pixel_depthwise_conv(jnp.ones((1, 8, 8, 3)), jnp.ones((8, 8, 2, 9)), 3)


def test_gradients_finite_and_reach_the_generator():
    x = jax.random.normal(jax.random.key(8), (2, 6, 6, 4))
    block = TVConvInvertedResidual(features=4, h=6, w=6, expand_ratio=2, use_bias=True)
    v = block.init(jax.random.key(9), x)

    def loss(params, x):
        y, _ = block.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.square(y - 0.5))

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)
    for leaf in [*jax.tree.leaves(nn.unbox(gp)), gx]:
        assert bool(jnp.all(jnp.isfinite(leaf)))
    g = nn.unbox(gp)["tvconv"]
    assert float(jnp.max(jnp.abs(g["affinity_maps"]))) > 0
    assert float(jnp.max(jnp.abs(g["weight_layers"]["conv_0"]))) > 0
    assert float(jnp.max(jnp.abs(g["bias_layers"]["conv_out"]))) > 0


@pytest.mark.torch
def test_layer_matches_torch_layers():
    """TVConv rebuilt from torch.nn (Conv2d, LayerNorm([c, h, w]), Unfold) as the official
    ``TVConv.forward`` wires them, on the same weights (stride 2, with the bias maps)."""
    import torch

    x = jax.random.normal(jax.random.key(10), (2, 8, 6, 3))
    layer = TVConv(h=4, w=3, strides=2, use_bias=True, inter_layers=1)
    v = _perturb(layer.init(jax.random.key(11), x), seed=12)
    y = layer.apply(v, x)
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a), dtype=torch.float64), v["params"])
    chw = lambda a: a.permute(2, 0, 1)  # noqa: E731  [h, w, c] -> [c, h, w]

    def generator(q, maps):
        z = chw(maps)[None]
        for i in range(2):
            z = torch.nn.functional.conv2d(z, q[f"conv_{i}"].permute(3, 2, 0, 1), padding=1)
            z = torch.nn.functional.layer_norm(
                z, z.shape[1:], chw(q[f"norm_{i}_scale"]), chw(q[f"norm_{i}_bias"]), 1e-5
            )
            z = torch.relu(z)
        return torch.nn.functional.conv2d(z, q["conv_out"].permute(3, 2, 0, 1), padding=1)

    with torch.no_grad():
        xt = torch.tensor(np.asarray(x), dtype=torch.float64).permute(0, 3, 1, 2)
        weight = generator(p["weight_layers"], p["affinity_maps"]).view(1, 3, 9, 4, 3)
        cols = torch.nn.Unfold(3, 1, 1, 2)(xt).view(2, 3, 9, 4, 3)
        out = (weight * cols).sum(dim=2) + generator(p["bias_layers"], p["affinity_maps"])
        want = out.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
