"""CRAFT: windows, position tables and rectangle-window attention against NumPy; the blocks and
the whole model against a torch rebuild of the official modules
(AVC2-UESTC/CRAFT-SR ``basicsr/archs/craft_arch.py``) on the same weights; errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.craft import (
    HFB,
    HFERB,
    SRWAB,
    img2windows,
    rect_window_attention,
    relative_position_tables,
    windows2img,
)
from jaxblocks.models.craft import CRAFT, CRAFT_PARAMS, CRAFTConfig


def _rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_window_partition_round_trip():
    x = _rand(0, (2, 8, 12, 3))
    w = img2windows(x, 4, 3)  # 2 · 2 · 4 windows of 12 tokens
    assert w.shape == (16, 12, 3)
    # Window (b=1, row 1, col 2) is the 4×3 block at rows 4:8, cols 6:9, row-major.
    np.testing.assert_array_equal(w[8 + 4 + 2], x[1, 4:8, 6:9].reshape(12, 3))
    np.testing.assert_array_equal(windows2img(w, 4, 3, 8, 12), x)
    with pytest.raises(ValueError, match=r"img2windows: x of shape \(2, 8, 12, 3\)"):
        img2windows(x, 3, 3)
    with pytest.raises(ValueError, match=r"windows2img: x must be .* got shape \(16, 12, 3\)"):
        windows2img(w, 4, 4, 8, 12)


@pytest.mark.parametrize("window", [(2, 3), (4, 2)])
def test_relative_position_tables_give_each_pairs_offset(window):
    hs, ws = window
    offsets, index = relative_position_tables(hs, ws)
    assert offsets.shape == ((2 * hs - 1) * (2 * ws - 1), 2) and index.shape == (hs * ws,) * 2
    coords = [(i, j) for i in range(hs) for j in range(ws)]
    for a, (qi, qj) in enumerate(coords):
        for b, (ki, kj) in enumerate(coords):
            np.testing.assert_array_equal(offsets[index[a, b]], (qi - ki, qj - kj))


def _numpy_window_attention(q, k, v, bias, window, heads, scale):
    """Per window and head: softmax(q kᵀ·scale + bias) v, with explicit loops."""
    q, k, v, bias = (np.asarray(t, np.float64) for t in (q, k, v, bias))
    b, h, w, c = q.shape
    hs, ws = window
    d = c // heads
    out = np.zeros_like(q)
    for bi in range(b):
        for r0 in range(0, h, hs):
            for c0 in range(0, w, ws):
                qw, kw, vw = (
                    t[bi, r0 : r0 + hs, c0 : c0 + ws].reshape(hs * ws, c) for t in (q, k, v)
                )
                o = np.zeros((hs * ws, c))
                for hd in range(heads):
                    sl = slice(hd * d, (hd + 1) * d)
                    logits = qw[:, sl] @ kw[:, sl].T * scale + bias[hd]
                    p = np.exp(logits - logits.max(-1, keepdims=True))
                    o[:, sl] = (p / p.sum(-1, keepdims=True)) @ vw[:, sl]
                out[bi, r0 : r0 + hs, c0 : c0 + ws] = o.reshape(hs, ws, c)
    return out


def test_rect_window_attention_matches_numpy():
    window, heads = (2, 4), 3
    q, k, v = (_rand(i, (2, 4, 8, 12)) for i in range(3))
    bias = _rand(3, (heads, 8, 8))
    got = jax.jit(rect_window_attention, static_argnums=(4, 5, 6))(
        q, k, v, bias, window, heads, 0.5
    )
    want = _numpy_window_attention(q, k, v, bias, window, heads, 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"bias must be \[3, 8, 8\], got shape \(3, 4, 4\)"):
        rect_window_attention(q, k, v, bias[:, :4, :4], window, heads, 0.5)


def _np_layernorm(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_dense(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def _np_dwconv3(x, p):
    """Depthwise 3×3, zero padding 1: x [B, H, W, C], kernel [3, 3, 1, C]."""
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    k = p["kernel"][:, :, 0]
    out = sum(xp[:, i : i + h, j : j + w] * k[i, j] for i in range(3) for j in range(3))
    return out + p["bias"]


def test_srwab_attention_with_dynamic_position_bias_and_lepe_matches_numpy():
    """The SRWAB's token mixer rebuilt in NumPy from its parameters: H-Rwin on the first half of
    the channels, V-Rwin (transposed windows) on the second, both rolled by half a window, the
    dynamic position bias MLP gathered by relative offset, plus the depthwise conv of V (LePE)."""
    dim, heads, split = 32, 4, (2, 4)
    blk = SRWAB(dim=dim, num_heads=heads, split_size=split, shift=True)
    x = _rand(0, (2, 8, 8, dim))
    v = _random_variables(blk, x, seed=2)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    xn = np.asarray(x, np.float64)
    qkv = _np_dense(_np_layernorm(xn, p["norm1"]), p["qkv"])
    q, k, vv = np.split(qkv, 3, axis=-1)
    half = dim // 2
    outs = []
    for i, window in enumerate((split, split[::-1])):
        shift = (window[0] // 2, window[1] // 2)
        part = [np.roll(t[..., i * half : (i + 1) * half], (-shift[0], -shift[1]), (1, 2))
                for t in (q, k, vv)]  # fmt: skip
        dp = p[f"attns_{i}"]
        offsets, index = relative_position_tables(*window)
        pos = _np_dense(offsets.astype(np.float64), dp["pos_proj"])
        for j in (1, 2, 3):
            pos = _np_dense(np.maximum(_np_layernorm(pos, dp[f"pos{j}_norm"]), 0), dp[f"pos{j}_fc"])
        n = window[0] * window[1]
        bias = pos[index.reshape(-1)].reshape(n, n, heads // 2).transpose(2, 0, 1)
        o = _numpy_window_attention(*part, bias, window, heads // 2, (half / (heads // 2)) ** -0.5)
        outs.append(np.roll(o, shift, (1, 2)))
    att = np.concatenate(outs, -1) + _np_dwconv3(vv, p["get_v"])
    y = xn + _np_dense(att, p["proj"])
    h = _np_dense(_np_layernorm(y, p["norm2"]), p["mlp_fc1"])
    h = 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2)))
    want = y + _np_dense(h, p["mlp_fc2"])
    np.testing.assert_allclose(jax.jit(blk.apply)(v, x), want, rtol=1e-4, atol=1e-4)


def test_registered_counts_and_errors():
    assert CRAFT_PARAMS == {"craft_x2": 737_756, "craft_x3": 744_251, "craft_x4": 753_344}
    blk = SRWAB(dim=32, num_heads=2, split_size=(2, 4))
    with pytest.raises(ValueError, match=r"SRWAB: x must be \[B, H, W, C\] with C=32, got shape"):
        blk.init(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
    with pytest.raises(ValueError, match=r"SRWAB: x of shape \(1, 6, 8, 32\): H and W must be "):
        blk.init(jax.random.key(0), jnp.ones((1, 6, 8, 32)))
    with pytest.raises(ValueError, match="no units"):
        SRWAB(dim=16, num_heads=2, split_size=(2, 4)).init(
            jax.random.key(0), jnp.ones((1, 4, 4, 16))
        )
    with pytest.raises(ValueError, match=r"HFB: x must be \[B, H, W, C\] with C=8"):
        HFB(dim=8, num_heads=2).init(
            jax.random.key(0), jnp.ones((1, 4, 4, 4)), jnp.ones((1, 4, 4, 4))
        )
    model = CRAFT(embed_dim=32, depths=(1,), num_heads=(2,), split_size=(2, 4))
    with pytest.raises(ValueError, match=r"CRAFT: x must be NHWC with 3 channel\(s\), got shape"):
        model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    strict = CRAFT(
        embed_dim=32, depths=(1,), num_heads=(2,), split_size=(2, 4), pad_to_window=False
    )
    with pytest.raises(ValueError, match=r"CRAFT: x of shape \(1, 6, 8, 3\).*pad_to_window=False"):
        strict.init(jax.random.key(0), jnp.ones((1, 6, 8, 3)))
    with pytest.raises(ValueError, match="depths"):
        CRAFTConfig(depths=(2, 2), num_heads=(6,))
    with pytest.raises(ValueError, match="num_heads"):
        CRAFTConfig(num_heads=(5, 6, 6, 6))
    with pytest.raises(ValueError, match="upscale must be a positive int"):
        CRAFTConfig(upscale=2.0)


def test_padding_mirrors_and_crops():
    """An 11×10 input is mirror-padded to 12×12 (windows 2×4 / 4×2) and the output cropped."""
    model = CRAFT(upscale=3, in_chans=1, embed_dim=32, depths=(1,), num_heads=(2,),
                  split_size=(2, 4))  # fmt: skip
    x = jax.random.uniform(jax.random.key(0), (1, 11, 10, 1))
    v = _random_variables(model, x, seed=1)
    y = jax.jit(model.apply)(v, x)
    assert y.shape == (1, 33, 30, 1)
    xp = jnp.pad(x, ((0, 0), (0, 1), (0, 2), (0, 0)), mode="symmetric")
    np.testing.assert_allclose(y, jax.jit(model.apply)(v, xp)[:, :33, :30], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# torch rebuild of the official modules (NCHW, same names), for the equivalence tests.


def _torch_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn as tnn

    def img2windows_t(img, hs, ws):
        b, c, h, w = img.shape
        img = img.view(b, c, h // hs, hs, w // ws, ws)
        return img.permute(0, 2, 4, 3, 5, 1).contiguous().reshape(-1, hs * ws, c)

    def windows2img_t(x, hs, ws, h, w):
        b = int(x.shape[0] / (h * w / hs / ws))
        x = x.view(b, h // hs, w // ws, hs, ws, -1)
        return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)

    class Mlp(tnn.Module):
        def __init__(self, d, hidden):
            super().__init__()
            self.fc1, self.act, self.fc2 = tnn.Linear(d, hidden), tnn.GELU(), tnn.Linear(hidden, d)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class DynamicPosBias(tnn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.pos_dim = dim // 4
            self.pos_proj = tnn.Linear(2, self.pos_dim)
            mk = lambda o: tnn.Sequential(  # noqa: E731
                tnn.LayerNorm(self.pos_dim), tnn.ReLU(), tnn.Linear(self.pos_dim, o)
            )
            self.pos1, self.pos2, self.pos3 = mk(self.pos_dim), mk(self.pos_dim), mk(num_heads)

        def forward(self, biases):
            return self.pos3(self.pos2(self.pos1(self.pos_proj(biases))))

    class AttentionRegular(tnn.Module):
        def __init__(self, dim, idx, split_size, num_heads):
            super().__init__()
            self.num_heads = num_heads
            self.scale = (dim // num_heads) ** -0.5
            self.H_sp, self.W_sp = split_size if idx == 0 else split_size[::-1]
            self.pos = DynamicPosBias(dim // 4, num_heads)

        def im2win(self, x, h, w):
            b, n, c = x.shape
            x = img2windows_t(
                x.transpose(-2, -1).contiguous().view(b, c, h, w), self.H_sp, self.W_sp
            )
            x = x.reshape(-1, self.H_sp * self.W_sp, self.num_heads, c // self.num_heads)
            return x.permute(0, 2, 1, 3).contiguous()

        def forward(self, qkv, h, w, rpi, rpe_biases):
            q, k, v = qkv[0], qkv[1], qkv[2]
            c = q.shape[-1]
            q, k, v = self.im2win(q, h, w), self.im2win(k, h, w), self.im2win(v, h, w)
            attn = (q * self.scale) @ k.transpose(-2, -1)
            n = self.H_sp * self.W_sp
            rpb = self.pos(rpe_biases)[rpi.view(-1)].view(n, n, -1).permute(2, 0, 1)
            attn = torch.softmax(attn + rpb.unsqueeze(0), dim=-1)
            x = (attn @ v).transpose(1, 2).reshape(-1, n, c)
            return windows2img_t(x, self.H_sp, self.W_sp, h, w)

    def rpi_tables(hs, ws):
        offsets, index = relative_position_tables(hs, ws)  # checked against loops above
        return torch.from_numpy(offsets), torch.from_numpy(index.astype(np.int64))

    class SRWAB_T(tnn.Module):
        def __init__(self, dim, num_heads, split_size, shift_size, mlp_ratio=2.0):
            super().__init__()
            self.shift_size = shift_size
            self.norm1 = tnn.LayerNorm(dim)
            self.qkv = tnn.Linear(dim, dim * 3)
            self.proj = tnn.Linear(dim, dim)
            self.get_v = tnn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
            self.attns = tnn.ModuleList(
                [AttentionRegular(dim // 2, i, split_size, num_heads // 2) for i in range(2)]
            )
            self.norm2 = tnn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
            self.tables = [rpi_tables(*split_size), rpi_tables(*split_size[::-1])]

        def forward(self, x, x_size):
            h, w = x_size
            b, _, c = x.shape
            shortcut = x
            qkv = self.qkv(self.norm1(x)).reshape(b, -1, 3, c).permute(2, 0, 1, 3)
            v = qkv[2].transpose(-2, -1).contiguous().view(b, c, h, w)
            (bh, rh), (bv, rv) = self.tables
            s0, s1 = self.shift_size
            if s0 > 0 or s1 > 0:
                qkv = qkv.view(3, b, h, w, c)
                q0 = torch.roll(qkv[..., : c // 2], shifts=(-s0, -s1), dims=(2, 3))
                q1 = torch.roll(qkv[..., c // 2 :], shifts=(-s1, -s0), dims=(2, 3))
                x1 = self.attns[0](q0.reshape(3, b, h * w, c // 2), h, w, rh, bh)
                x2 = self.attns[1](q1.reshape(3, b, h * w, c // 2), h, w, rv, bv)
                x1 = torch.roll(x1, shifts=(s0, s1), dims=(1, 2))
                x2 = torch.roll(x2, shifts=(s1, s0), dims=(1, 2))
            else:
                x1 = self.attns[0](qkv[..., : c // 2], h, w, rh, bh)
                x2 = self.attns[1](qkv[..., c // 2 :], h, w, rv, bv)
            att = torch.cat([x1, x2], dim=-1).view(b, -1, c)
            att = att + self.get_v(v).permute(0, 2, 3, 1).contiguous().view(b, -1, c)
            x = shortcut + self.proj(att)
            return x + self.mlp(self.norm2(x))

    class HFERB_T(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.mid = dim // 2
            self.act = tnn.GELU()
            self.last_fc = tnn.Conv2d(dim, dim, 1)
            self.fc = tnn.Conv2d(self.mid, self.mid, 1)
            self.max_pool = tnn.MaxPool2d(3, 1, 1)
            self.conv = tnn.Conv2d(self.mid, self.mid, 3, 1, 1)

        def forward(self, x):
            lfe = self.act(self.conv(x[:, : self.mid]))
            hfe = self.act(self.fc(self.max_pool(x[:, self.mid :])))
            return x + self.last_fc(torch.cat([lfe, hfe], dim=1))

    class InterAttn(tnn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads = num_heads
            self.temperature = tnn.Parameter(torch.ones(num_heads, 1, 1))
            self.q = tnn.Conv2d(dim, dim, 1, bias=False)
            self.q_dwconv = tnn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
            self.kv = tnn.Conv2d(dim, dim * 2, 1, bias=False)
            self.kv_dwconv = tnn.Conv2d(dim * 2, dim * 2, 3, 1, 1, groups=dim * 2, bias=False)
            self.project_out = tnn.Conv2d(dim, dim, 1, bias=False)

        def forward(self, low, high):
            b, c, h, w = low.shape
            q = self.q_dwconv(self.q(high))
            k, v = self.kv_dwconv(self.kv(low)).chunk(2, dim=1)
            q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            attn = torch.softmax((q @ k.transpose(-2, -1)) * self.temperature, dim=-1)
            return self.project_out((attn @ v).reshape(b, c, h, w))

    class WithBiasLN(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = tnn.Parameter(torch.ones(dim))
            self.bias = tnn.Parameter(torch.zeros(dim))

        def forward(self, x):
            mu = x.mean(-1, keepdim=True)
            sigma = x.var(-1, keepdim=True, unbiased=False)
            return (x - mu) / torch.sqrt(sigma + 1e-5) * self.weight + self.bias

    class LayerNorm4d(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.body = WithBiasLN(dim)

        def forward(self, x):
            return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class FeedForward(tnn.Module):
        def __init__(self, dim, factor):
            super().__init__()
            hid = int(dim * factor)
            self.project_in = tnn.Conv2d(dim, hid * 2, 1, bias=False)
            self.dwconv = tnn.Conv2d(hid * 2, hid * 2, 3, 1, 1, groups=hid * 2, bias=False)
            self.project_out = tnn.Conv2d(hid, dim, 1, bias=False)

        def forward(self, x):
            x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
            return self.project_out(F.gelu(x1) * x2)

    class HFB_T(tnn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.norm1, self.attn = LayerNorm4d(dim), InterAttn(dim, num_heads)
            self.norm2, self.ffn = LayerNorm4d(dim), FeedForward(dim, 2.66)

        def forward(self, low, high):
            x = low + self.attn(self.norm1(low), high)
            return x + self.ffn(self.norm2(x))

    class CRFB_T(tnn.Module):
        def __init__(self, dim, depth, num_heads, split):
            super().__init__()
            self.depth = depth
            self.srwa_blocks = tnn.ModuleList([
                SRWAB_T(dim, num_heads, split,
                        (0, 0) if i % 2 == 0 else (split[0] // 2, split[1] // 2))
                for i in range(2 * depth)
            ])  # fmt: skip
            self.hfer_blocks = tnn.ModuleList([HFERB_T(dim) for _ in range(depth)])
            self.hf_blocks = tnn.ModuleList([HFB_T(dim, num_heads) for _ in range(depth)])

        def forward(self, x, x_size):
            b, c, h, w = x.shape
            for i in range(self.depth):
                low = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
                low = self.srwa_blocks[2 * i + 1](self.srwa_blocks[2 * i](low, x_size), x_size)
                low = low.reshape(b, h, w, c).permute(0, 3, 1, 2)
                x = self.hf_blocks[i](low, self.hfer_blocks[i](x))
            return x

    class RCRFG_T(tnn.Module):
        def __init__(self, dim, depth, num_heads, split):
            super().__init__()
            self.residual_group = CRFB_T(dim, depth, num_heads, split)
            self.conv = tnn.Conv2d(dim, dim, 3, 1, 1)

        def forward(self, x, x_size):
            return self.conv(self.residual_group(x, x_size)) + x

    class CRAFT_T(tnn.Module):
        def __init__(self, in_chans, embed_dim, depths, num_heads, split, upscale):
            super().__init__()
            mean = (0.4488, 0.4371, 0.4040) if in_chans == 3 else (0.0,) * in_chans
            self.mean = torch.tensor(mean).view(1, in_chans, 1, 1)
            self.conv_first = tnn.Conv2d(in_chans, embed_dim, 3, 1, 1)
            self.layers = tnn.ModuleList(
                [RCRFG_T(embed_dim, d, nh, split) for d, nh in zip(depths, num_heads, strict=True)]
            )
            self.norm = LayerNorm4d(embed_dim)
            self.conv_after_body = tnn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
            self.upsample = tnn.Sequential(
                tnn.Conv2d(embed_dim, upscale**2 * in_chans, 3, 1, 1), tnn.PixelShuffle(upscale)
            )

        def forward(self, x):
            x = x - self.mean
            f = self.conv_first(x)
            y = f
            for layer in self.layers:
                y = layer(y, x.shape[2:])
            f = self.conv_after_body(self.norm(y)) + f
            return self.upsample(f) + self.mean

    return dict(SRWAB=SRWAB_T, HFERB=HFERB_T, HFB=HFB_T, CRAFT=CRAFT_T)


def _torch_name(path: tuple[str, ...]) -> str:
    out = []
    for i, p in enumerate(path[:-1]):
        m = re.fullmatch(r"(srwa_blocks|hfer_blocks|hf_blocks|attns|layers)_(\d+)", p)
        if m:
            out += [m[1], m[2]] + (["pos"] if m[1] == "attns" else [])
        elif m := re.fullmatch(r"pos(\d)_(norm|fc)", p):
            out += [f"pos{m[1]}", "0" if m[2] == "norm" else "2"]
        elif m := re.fullmatch(r"mlp_(fc\d)", p):
            out += ["mlp", m[1]]
        elif p in ("norm1", "norm2") and i > 0 and path[i - 1].startswith("hf_blocks"):
            out += [p, "body"]  # HFB's channel LayerNorms (the official WithBias_LayerNorm)
        elif p == "norm" and i == 0:
            out += ["norm", "body"]
        elif p == "upsample":
            out += ["upsample", "0"]
        else:
            out.append(p)
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join([*out, leaf])


def _load(torch_module, params, hfb_root=False):
    """Copy Flax params into the torch rebuild by name; strict, so every weight is covered."""
    import torch

    state = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in kp)
        if hfb_root and path[0] in ("norm1", "norm2"):
            path = (path[0], "body", *path[1:])
            name = ".".join(path[:-1] + ({"scale": "weight"}.get(path[-1], path[-1]),))
        else:
            name = _torch_name(path)
        a = np.array(leaf, np.float32)
        if path[-1] == "kernel":
            a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
        state[name] = torch.from_numpy(np.ascontiguousarray(a))
    torch_module.load_state_dict(state, strict=True)
    return torch_module.eval()


def _random_variables(module, *args, seed=0):
    """Seeded random variables of ``module`` without compiling its init: matrices and kernels
    with std 1/√fan_in, vectors (biases, LayerNorm gains, temperatures) 0.2-perturbed around
    their init (0 or 1), so every parameter matters."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)

    def draw(kp, s):
        name = kp[-1].key
        if len(s.shape) >= 2:
            fan_in = int(np.prod(s.shape[:-1])) if name == "kernel" else s.shape[0]
            return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), jnp.float32)
        base = 1.0 if name in ("scale", "temperature") else 0.0
        return jnp.asarray(base + 0.2 * rng.standard_normal(s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _nchw(x):
    import torch

    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.mark.torch
@pytest.mark.parametrize("shift", [False, True])
def test_srwab_matches_official_torch(shift):
    import torch

    mods = _torch_modules()
    dim, heads, split = 32, 4, (2, 4)
    blk = SRWAB(dim=dim, num_heads=heads, split_size=split, shift=shift)
    x = _rand(0, (2, 8, 12, dim))
    v = _random_variables(blk, x, seed=2)
    ref = _load(mods["SRWAB"](dim, heads, split, (1, 2) if shift else (0, 0)), v["params"])
    with torch.no_grad():
        want = ref(torch.from_numpy(np.array(x).reshape(2, 96, dim)), (8, 12)).numpy()
    np.testing.assert_allclose(
        jax.jit(blk.apply)(v, x), want.reshape(2, 8, 12, dim), rtol=1e-4, atol=1e-4
    )


@pytest.mark.torch
def test_hferb_and_hfb_match_official_torch():
    import torch

    mods = _torch_modules()
    x, high = _rand(0, (2, 5, 6, 8)), _rand(1, (2, 5, 6, 8))
    hferb = HFERB(dim=8)
    v = _random_variables(hferb, x, seed=3)
    ref = _load(mods["HFERB"](8), v["params"])
    with torch.no_grad():
        want = ref(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(jax.jit(hferb.apply)(v, x), want, rtol=1e-5, atol=1e-5)

    hfb = HFB(dim=8, num_heads=2)
    v = _random_variables(hfb, x, high, seed=5)
    ref = _load(mods["HFB"](8, 2), v["params"], hfb_root=True)
    with torch.no_grad():
        want = ref(_nchw(x), _nchw(high)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(jax.jit(hfb.apply)(v, x, high), want, rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_craft_matches_official_torch():
    """Two groups (2 and 4 heads), RGB with the DIV2K mean, ×3."""
    in_chans, upscale = 3, 3
    import torch

    mods = _torch_modules()
    kw = dict(embed_dim=32, depths=(1, 1), num_heads=(2, 4), split_size=(2, 4))
    model = CRAFT(upscale=upscale, in_chans=in_chans, **kw)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, in_chans))
    v = _random_variables(model, x, seed=2)
    ref = _load(mods["CRAFT"](in_chans, 32, (1, 1), (2, 4), (2, 4), upscale), v["params"])
    with torch.no_grad():
        want = ref(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(jax.jit(model.apply)(v, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_official_rebuild_has_the_registered_parameter_counts():
    mods = _torch_modules()
    for r, name in ((2, "craft_x2"), (3, "craft_x3"), (4, "craft_x4")):
        m = mods["CRAFT"](3, 48, (2,) * 4, (6,) * 4, (4, 16), r)
        assert sum(p.numel() for p in m.parameters()) == CRAFT_PARAMS[name]
