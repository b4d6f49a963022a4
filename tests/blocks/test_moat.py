"""MOAT blocks (https://arxiv.org/abs/2210.01820): the relative position bias against NumPy
(an explicit loop and deeplab2's one-hot einsum lookup), its bilinear resize against a NumPy
half-pixel resize (and torch's ``interpolate``), window attention against per-window attention
and against global attention, MBConv and MOAT blocks against NumPy formulations on the same
weights (and MBConv against torch ops), and the input errors."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.moat import (
    MBConvBlock,
    MOATAttention,
    MOATBlock,
    avg_pool_same,
    relative_position_bias,
    resize_relative_position_table,
    window_partition,
    window_reverse,
)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
_erf = np.vectorize(math.erf)


def _rand(seed: int, shape, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def _random_variables(module, x, seed: int = 1):
    """Well-scaled random variables with non-trivial BN/LN affine and running statistics."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = path[-1].key
        z = rng.standard_normal(a.shape).astype(np.float32)
        if name == "kernel":
            qkv = len(a.shape) == 3 and path[-2].key in ("q", "k", "v")  # [C, heads, K]
            fan_in = a.shape[0] if qkv else np.prod(a.shape[:-1])
            return jnp.asarray(z / np.sqrt(fan_in))
        if name == "scale":
            return jnp.asarray(1.0 + 0.2 * z)
        if name == "var":
            return jnp.asarray(0.5 + 0.5 * np.abs(z))
        if name == "relative_position_embedding":
            return jnp.asarray(0.5 * z)
        return jnp.asarray((0.3 if name == "mean" else 0.1) * z)  # bias, running mean

    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x))
    return jax.tree_util.tree_map_with_path(draw, abstract)


# ----------------------------------------------------------------------------- NumPy reference


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding (the odd pixel at the end)."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _depthwise(x, w, stride):
    """x [B, H, W, C], w [k, k, C]; TF "SAME" padding."""
    k = w.shape[0]
    (t, b), (l, r) = _same_pads(x.shape[1], k, stride), _same_pads(x.shape[2], k, stride)
    xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    ho, wo = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for di in range(k):
        for dj in range(k):
            patch = xp[:, di : di + stride * ho : stride, dj : dj + stride * wo : stride]
            out += patch * w[di, dj]
    return out


def _avg_pool(x, p, stride):
    """Average over the valid pixels of each "SAME"-padded window."""
    t, l = _same_pads(x.shape[1], p, stride)[0], _same_pads(x.shape[2], p, stride)[0]
    ho, wo = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * stride - t, j * stride - l
            win = x[:, max(r0, 0) : r0 + p, max(c0, 0) : c0 + p]
            out[:, i, j] = win.mean(axis=(1, 2))
    return out


def _bn(x, p, s, eps=1e-3):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _pw(x, p):
    """1x1 conv: kernel [1, 1, C, D] (+ bias)."""
    y = x @ p["kernel"][0, 0]
    return y + p["bias"] if "bias" in p else y


def _np_mbconv(x, p, s, stride, pool, se):
    c_out = p["shrink_conv"]["kernel"].shape[-1]
    shortcut = _avg_pool(x, pool, stride) if stride > 1 else x
    if x.shape[-1] != c_out:
        shortcut = _pw(shortcut, p["shortcut_conv"])
    y = _pw(_bn(x, p["pre_norm"], s["pre_norm"]), p["expand_conv"])
    y = _gelu(_bn(y, p["expand_norm"], s["expand_norm"]))
    y = _depthwise(y, p["depthwise_conv"]["kernel"][:, :, 0], stride)
    y = _gelu(_bn(y, p["depthwise_norm"], s["depthwise_norm"]))
    if se:
        q = p["se"]
        g = _pw(y.mean(axis=(1, 2), keepdims=True), q["reduce_conv2d"])
        g = g / (1.0 + np.exp(-g))  # swish
        g = _pw(g, q["expand_conv2d"])
        y = y / (1.0 + np.exp(-g))  # y * sigmoid(g)
    return shortcut + _pw(y, p["shrink_conv"])


def _np_resize_axis(t, n_out, axis):
    """TF2 ``tf.image.resize`` bilinear along one axis: half-pixel centres, clamped edges."""
    n_in = t.shape[axis]
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    lo = np.floor(src)
    frac = src - lo
    i0 = np.clip(lo, 0, n_in - 1).astype(int)
    i1 = np.clip(lo + 1, 0, n_in - 1).astype(int)
    shape = [1] * t.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    return np.take(t, i0, axis) * (1 - frac) + np.take(t, i1, axis) * frac


def _np_bias_loop(table, h, w):
    """bias[n, (i, j), (x, y)] = table[n, x - i + h - 1, y - j + w - 1], resized first."""
    t = _np_resize_axis(_np_resize_axis(table, 2 * h - 1, 1), 2 * w - 1, 2)
    n = table.shape[0]
    out = np.zeros((n, h * w, h * w))
    for i in range(h):
        for j in range(w):
            for x in range(h):
                for y in range(w):
                    out[:, i * w + j, x * w + y] = t[:, x - i + h - 1, y - j + w - 1]
    return out


def _np_bias_einsum(table, h, w):
    """deeplab2's ``reindex_2d_einsum_lookup`` with ``generate_lookup_tensor`` (no resize)."""

    def lookup(n):
        m = np.zeros((n, n, 2 * n - 1))
        for i in range(n):
            for x in range(n):
                m[i, x, x - i + n - 1] = 1
        return m

    r = np.einsum("nhw,ixh->nixw", table, lookup(h))
    r = np.einsum("nixw,jyw->nijxy", r, lookup(w))
    return r.reshape(table.shape[0], h * w, h * w)


def _np_attention(x, p, head_size):
    """MOATAttention on one map x [B, h, w, C] -> [B, h w, C]."""
    b, h, w, c = x.shape
    t = x.reshape(b, h * w, c)
    q, k, v = (np.einsum("blc,cnk->blnk", t, p[n]["kernel"]) + p[n]["bias"] for n in "qkv")
    logits = np.einsum("bsnk,btnk->bnst", q, k) / np.sqrt(head_size)
    if "relative_position_embedding" in p:
        logits = logits + _np_bias_loop(p["relative_position_embedding"], h, w)[None]
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = np.einsum("bnst,btnk->bsnk", a, v)
    return np.einsum("bsnk,nkc->bsc", y, p["o"]["kernel"]) + p["o"]["bias"]


def _np_moat(x, p, s, stride, pool, head_size, window):
    y = _np_mbconv(x, p, s, stride, pool, se=False)
    b, h, w, c = y.shape
    wh, ww = window or (h, w)
    z = _ln(y, p["attention_norm"])
    out = np.zeros_like(y)
    for i in range(0, h, wh):  # attention inside each window, written out
        for j in range(0, w, ww):
            a = _np_attention(z[:, i : i + wh, j : j + ww], p["attention"], head_size)
            out[:, i : i + wh, j : j + ww] = a.reshape(b, wh, ww, c)
    return y + out


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ----------------------------------------------------------------------------- tests


def test_relative_position_bias_matches_numpy():
    h, w = 3, 4
    table = np.asarray(_rand(0, (2, 2 * h - 1, 2 * w - 1)), np.float64)
    got = np.asarray(relative_position_bias(jnp.asarray(table, jnp.float32), h, w))
    assert got.shape == (2, h * w, h * w)
    np.testing.assert_allclose(got, _np_bias_loop(table, h, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, _np_bias_einsum(table, h, w), rtol=1e-6, atol=1e-6)
    # depends only on the offset: a token attending to itself gets the table's centre
    centre = np.repeat(table[:, h - 1, w - 1][:, None], h * w, 1)
    np.testing.assert_allclose(np.diagonal(got, axis1=1, axis2=2), centre, rtol=1e-6)


@pytest.mark.parametrize("h,w", [(4, 6), (2, 1)])  # table 7x7 stretched / shrunk
def test_resized_relative_position_bias_matches_numpy(h, w):
    table = np.asarray(_rand(1, (3, 7, 7)), np.float64)
    t32 = jnp.asarray(table, jnp.float32)
    resized = resize_relative_position_table(t32, 2 * h - 1, 2 * w - 1)
    want = _np_resize_axis(_np_resize_axis(table, 2 * h - 1, 1), 2 * w - 1, 2)
    np.testing.assert_allclose(resized, want, rtol=1e-5, atol=1e-6)
    got = relative_position_bias(t32, h, w)
    np.testing.assert_allclose(got, _np_bias_loop(table, h, w), rtol=1e-5, atol=1e-6)
    assert resize_relative_position_table(t32, 7, 7) is t32  # no resize at the learned size


@pytest.mark.torch
def test_resize_matches_torch_interpolate():
    """tf.image.resize (bilinear, half-pixel) == torch's interpolate(align_corners=False)."""
    import torch

    table = np.asarray(_rand(2, (3, 13, 13)))
    for size in ((27, 31), (5, 3), (13, 13)):
        want = torch.nn.functional.interpolate(
            torch.tensor(table)[None], size=size, mode="bilinear", align_corners=False
        )[0].numpy()
        got = resize_relative_position_table(jnp.asarray(table), *size)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_window_partition_round_trip_and_order():
    x = _rand(3, (2, 4, 6, 5))
    win = window_partition(x, 2, 3)
    assert win.shape == (2 * 2 * 2, 2, 3, 5)
    np.testing.assert_array_equal(win[1], x[0, 0:2, 3:6])  # batch 0, window row 0, column 1
    np.testing.assert_array_equal(win[2], x[0, 2:4, 0:3])
    np.testing.assert_array_equal(window_reverse(win, 4, 6), x)


def test_avg_pool_same_matches_numpy():
    x = np.asarray(_rand(4, (2, 7, 6, 3)))
    for pool in (2, 3):
        got = avg_pool_same(jnp.asarray(x), pool, 2)
        np.testing.assert_allclose(got, _avg_pool(x, pool, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,c_in,size", [(2, 8, 7), (1, 16, 5)])
def test_mbconv_matches_numpy(stride, c_in, size):
    block = MBConvBlock(16, stride=stride, pool_size=3 if stride == 2 else 2)
    x = _rand(5, (2, size, size, c_in))
    v = _random_variables(block, x)
    assert ("shortcut_conv" in v["params"]) == (c_in != 16)
    assert v["params"]["se"]["reduce_conv2d"]["kernel"].shape == (1, 1, 64, 4)  # int(16 * 0.25)
    got = jit(functools.partial(block.apply, train=False))(v, x)
    p, s = _f64(v["params"]), _f64(v["batch_stats"])
    want = _np_mbconv(np.asarray(x, np.float64), p, s, stride, block.pool_size, se=True)
    assert got.shape == want.shape == (2, -(-size // stride), -(-size // stride), 16)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("window", [(2, 2), None])
def test_moat_block_matches_numpy(window):
    block = MOATBlock(32, stride=2, head_size=16, window_size=window, position_embedding_size=3)
    x = _rand(6, (2, 8, 8, 16))
    v = _random_variables(block, x)
    assert "se" not in v["params"]  # the MOAT block's MBConv has no SE
    assert v["params"]["attention"]["relative_position_embedding"].shape == (2, 5, 5)
    assert v["params"]["attention"]["q"]["kernel"].shape == (32, 2, 16)
    got = jit(functools.partial(block.apply, train=False))(v, x)
    p, s = _f64(v["params"]), _f64(v["batch_stats"])
    want = _np_moat(np.asarray(x, np.float64), p, s, 2, 2, 16, window)
    assert got.shape == (2, 4, 4, 32)
    assert _rel(got, want) < 1e-5


def test_window_attention_equals_global_when_the_window_covers_the_map():
    x = _rand(7, (2, 8, 6, 16))
    glob = MOATBlock(32, stride=2, head_size=16, position_embedding_size=4)
    v = _random_variables(glob, x)
    apply = lambda m: jit(functools.partial(m.apply, train=False))(v, x)  # noqa: E731
    y_global = apply(glob)
    np.testing.assert_allclose(apply(glob.clone(window_size=(4, 3))), y_global, rtol=1e-6,
                               atol=1e-6)  # fmt: skip
    # smaller windows see less context: a different result
    assert _rel(apply(glob.clone(window_size=(2, 3))), y_global) > 1e-3


def test_attention_without_position_embedding():
    attn = MOATAttention(head_size=8, use_relative_position=False)
    x = _rand(8, (2, 3, 5, 16))
    v = _random_variables(attn, x)
    assert set(v["params"]) == {"q", "k", "v", "o"}
    got = attn.apply(v, x)
    want = _np_attention(np.asarray(x, np.float64), _f64(v["params"]), 8)
    assert _rel(got, want) < 1e-5


def test_train_mode_updates_statistics_and_drop_path():
    block = MOATBlock(16, stride=1, head_size=8, drop_path=0.5, position_embedding_size=2)
    x = _rand(9, (4, 4, 4, 16))
    v = _random_variables(block, x)

    @functools.partial(jit, static_argnums=1)
    def run(key, deterministic):
        return block.apply(v, x, train=True, deterministic=deterministic,
                           mutable=["batch_stats"], rngs={"dropout": key})  # fmt: skip

    y_det, upd = run(jax.random.key(1), True)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved))
    a, b, a2 = (run(jax.random.key(k), False)[0] for k in (1, 2, 1))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4 and float(jnp.max(jnp.abs(a - y_det))) > 1e-4
    np.testing.assert_array_equal(a, a2)


def test_bad_inputs_are_value_errors():
    x = _rand(10, (1, 8, 8, 16))
    with pytest.raises(ValueError, match=r"window_size=\(3, 3\).*\(4, 4\).*\(1, 8, 8, 16\)"):
        MOATBlock(32, stride=2, head_size=16, window_size=(3, 3)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"window_size=\(2,\)"):
        MOATBlock(32, head_size=16, window_size=(2,)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="features=24 must be a multiple of head_size=16"):
        MOATBlock(24, head_size=16).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"x must be \[B, H, W, C\].*\(8, 8, 16\)"):
        MBConvBlock(16).init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match=r"12 channels.*head_size 8"):
        MOATAttention(head_size=8).init(jax.random.key(0), jnp.ones((1, 2, 2, 12)))
    with pytest.raises(ValueError, match=r"table must be \[heads, 2P-1, 2P-1\]"):
        relative_position_bias(jnp.ones((5, 5)), 3, 3)


@pytest.mark.torch
def test_mbconv_matches_torch_ops():
    """The MBConv block rebuilt from torch ops (conv2d with TF "SAME" padding, grouped
    depthwise conv, batch_norm in eval, exact GELU, SiLU SE) on the same weights."""
    import torch
    import torch.nn.functional as F

    block = MBConvBlock(24, stride=2, pool_size=3)
    x = _rand(11, (2, 9, 8, 12))
    v = _random_variables(block, x, seed=3)
    got = jit(functools.partial(block.apply, train=False))(v, x)
    p, s = v["params"], v["batch_stats"]
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731

    def conv(z, q, stride=1, groups=1):
        w = t(q["kernel"]).permute(3, 2, 0, 1)  # HWIO -> OIHW
        k = w.shape[-1]
        (pt, pb), (pl, pr) = _same_pads(z.shape[2], k, stride), _same_pads(z.shape[3], k, stride)
        z = F.pad(z, (pl, pr, pt, pb))
        return F.conv2d(z, w, t(q["bias"]) if "bias" in q else None, stride, groups=groups)

    def bn(z, name):
        return F.batch_norm(z, t(s[name]["mean"]), t(s[name]["var"]), t(p[name]["scale"]),
                            t(p[name]["bias"]), False, 0.0, 1e-3)  # fmt: skip

    with torch.no_grad():
        z = t(x).permute(0, 3, 1, 2)
        (pt, pb), (pl, pr) = _same_pads(9, 3, 2), _same_pads(8, 3, 2)
        ones = F.pad(torch.ones_like(z[:, :1]), (pl, pr, pt, pb))
        pooled = F.avg_pool2d(F.pad(z, (pl, pr, pt, pb)), 3, 2) / F.avg_pool2d(ones, 3, 2)
        shortcut = conv(pooled, p["shortcut_conv"])
        y = F.gelu(bn(conv(bn(z, "pre_norm"), p["expand_conv"]), "expand_norm"))
        y = F.gelu(bn(conv(y, p["depthwise_conv"], 2, groups=96), "depthwise_norm"))
        g = y.mean(dim=(2, 3), keepdim=True)
        g = conv(F.silu(conv(g, p["se"]["reduce_conv2d"])), p["se"]["expand_conv2d"])
        y = conv(y * torch.sigmoid(g), p["shrink_conv"])
        want = (shortcut + y).permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape == (2, 5, 4, 24)
    assert _rel(got, want) < 1e-5
