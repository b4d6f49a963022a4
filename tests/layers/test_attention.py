"""Simplified linear attention (SLAB) vs its equation in numpy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.layers.attention import SimplifiedLinearAttention, simplified_linear_attention
from tests.kernels.harness import assert_close


def _np(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _sla_ref(q, k, v, eps=1e-6):
    # q, k: [B, T, H, K] (already ReLU'd), v: [B, S, H, V]
    att = np.einsum("bihc,bjhc->bhij", q, k)
    out = np.einsum("bhij,bjhd->bihd", att, v)
    den = np.einsum("bihc,bhc->bih", q, k.sum(1)) + eps
    return out / den[..., None]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("order", [None, "kv", "qk"])
def test_core_matches_equation(dtype, order):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.nn.relu(jax.random.normal(ks[0], (2, 7, 3, 4))).astype(dtype)
    k = jax.nn.relu(jax.random.normal(ks[1], (2, 9, 3, 4))).astype(dtype)
    v = jax.random.normal(ks[2], (2, 9, 3, 5)).astype(dtype)
    out = simplified_linear_attention(q, k, v, order=order)
    assert out.dtype == jnp.float32
    assert_close(out, _sla_ref(_np(q), _np(k), _np(v)), dtype=dtype)


def _dwconv_ref(img, kernel, bias):
    # img [N, h, w, D], kernel [k, k, 1, D] (flax depthwise), SAME zero padding
    n, h, w, d = img.shape
    kk = kernel.shape[0]
    p = kk // 2
    pad = np.pad(img, ((0, 0), (p, p), (p, p), (0, 0)))
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = (pad[:, i : i + kk, j : j + kk] * kernel[:, :, 0]).sum((1, 2))
    return out + bias


def _module_ref(x, p, heads, hw, eps=1e-6):
    b, n, c = x.shape
    d = c // heads
    qkv = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    q, k, v = np.split(qkv, 3, axis=-1)
    k = k + p["pos_emb"][None]
    q, k = np.maximum(q, 0), np.maximum(k, 0)
    q, k, v = (a.reshape(b, n, heads, d) for a in (q, k, v))
    att = _sla_ref(q, k, v, eps)
    img = v.transpose(0, 2, 1, 3).reshape(b * heads, hw[0], hw[1], d)
    dw = _dwconv_ref(img, p["dwc"]["kernel"], p["dwc"]["bias"])
    dw = dw.reshape(b, heads, n, d).transpose(0, 2, 1, 3)
    out = (att + dw).reshape(b, n, c)
    return out @ p["proj"]["kernel"] + p["proj"]["bias"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_matches_equation_non_square_grid(dtype):
    x = jax.random.normal(jax.random.key(1), (2, 12, 6)).astype(dtype)
    m = SimplifiedLinearAttention(num_heads=2, kernel_size=3)
    v = m.init(jax.random.key(2), x, (3, 4))
    leaves, tree = jax.tree.flatten(v["params"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    rand = [0.5 * jax.random.normal(kk, a.shape) for kk, a in zip(keys, leaves, strict=True)]
    v = {"params": jax.tree.unflatten(tree, rand)}
    y = m.apply(v, x, (3, 4))
    assert y.dtype == dtype and y.shape == x.shape
    ref = _module_ref(_np(x), jax.tree.map(_np, v["params"]), 2, (3, 4))
    assert_close(y, ref, dtype=dtype)
    g = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, (3, 4)).astype(jnp.float32) ** 2))(
        v["params"]
    )
    assert all(np.all(np.isfinite(_np(a))) for a in jax.tree.leaves(g))
    # batch size 1 and a square grid inferred from N
    x1 = jax.random.normal(jax.random.key(4), (1, 16, 6))
    v1 = m.init(jax.random.key(2), x1)
    assert m.apply(v1, x1).shape == (1, 16, 6)


def test_errors():
    m = SimplifiedLinearAttention(num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        m.init(jax.random.key(0), jnp.ones((1, 4, 6)))
    with pytest.raises(ValueError, match="square grid"):
        m.init(jax.random.key(0), jnp.ones((1, 6, 8)))
    with pytest.raises(ValueError, match="does not have"):
        m.init(jax.random.key(0), jnp.ones((1, 6, 8)), (2, 2))
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        m.init(jax.random.key(0), jnp.ones((4, 8)))
    with pytest.raises(ValueError, match="order"):
        simplified_linear_attention(*(jnp.ones((1, 2, 1, 2)),) * 3, order="softmax")
    with pytest.raises(ValueError, match="incompatible"):
        simplified_linear_attention(
            jnp.ones((1, 2, 1, 2)), jnp.ones((1, 3, 1, 3)), jnp.ones((1, 3, 1, 2))
        )
