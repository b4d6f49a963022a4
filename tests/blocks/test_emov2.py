"""EMOv2 (https://arxiv.org/abs/2412.06674): window partitions, EW-MHSA with padding against a
direct NumPy loop over windows, the i²RMB against NumPy and (with torch) against a torch rebuild
of the official ``iiRMB`` / ``EW_MHSA_*`` on the same weights, and bad-input errors."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.emov2 import (
    EWMHSA,
    IIRMB,
    ew_mhsa_attention,
    gelu,
    pad_to_window,
    window_merge,
    window_partition,
)

_erf = np.vectorize(math.erf)


# Correctness checks on tiny inputs: unoptimised XLA compiles several times faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def _rand(seed: int, shape) -> jax.Array:
    """Seeded standard-normal float32 input (NumPy: no per-shape compile of jax.random)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _apply(module, variables, x, **kwargs):
    """``module.apply`` under one fast-compiled jit (cheaper than op-by-op dispatch)."""
    return jit(functools.partial(module.apply, **kwargs))(variables, x)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def _random_variables(module, x, seed: int = 1, **kwargs):
    """float32 random variables of ``module`` on ``x`` (drawn with NumPy on the abstract tree):
    kernels with variance 1 / fan_in, norm scales around 1, biases, layer scale ~1 (so the
    residual branch matters), running statistics far from 0 / 1."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = path[-1].key
        z = rng.standard_normal(a.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(z / np.sqrt(np.prod(a.shape[:-1])))
        if name in ("scale", "ls"):
            return jnp.asarray(1.0 + 0.2 * z)
        if name == "var":
            return jnp.asarray(0.5 + 0.5 * np.abs(z))
        return jnp.asarray((0.3 if name == "mean" else 0.1) * z)

    abstract = nn.unbox(jax.eval_shape(functools.partial(module.init, **kwargs),
                                       jax.random.key(0), x))  # fmt: skip
    return jax.tree_util.tree_map_with_path(draw, abstract)


# ----------------------------------------------------------------------------- NumPy references


def _np_window_attention(qk, v, heads, window, modes):
    """Direct loop: for every window, gather its pixels by explicit indices, attend per head."""
    b, hp, wp, c2 = qk.shape
    c, cv = c2 // 2, v.shape[-1]
    k_dim, v_dim = c // heads, cv // heads
    wh, ww = window
    n1, n2 = hp // wh, wp // ww
    out = np.zeros(v.shape, np.float64)
    for mode in modes:
        for i in range(n1):
            for j in range(n2):
                if mode == "close":
                    rows, cols = [i * wh + a for a in range(wh)], [j * ww + e for e in range(ww)]
                else:  # remote: every n1-th row / n2-th column, starting at (i, j)
                    rows, cols = [a * n1 + i for a in range(wh)], [e * n2 + j for e in range(ww)]
                pix = [(r, s) for r in rows for s in cols]
                for bi in range(b):
                    for h in range(heads):
                        q = np.stack([qk[bi, r, s, h * k_dim : (h + 1) * k_dim] for r, s in pix])
                        k = np.stack([qk[bi, r, s, c + h * k_dim : c + (h + 1) * k_dim]
                                      for r, s in pix])  # fmt: skip
                        vv = np.stack([v[bi, r, s, h * v_dim : (h + 1) * v_dim] for r, s in pix])
                        logits = q @ k.T / math.sqrt(k_dim)
                        p = np.exp(logits - logits.max(-1, keepdims=True))
                        y = (p / p.sum(-1, keepdims=True)) @ vv
                        for t, (r, s) in enumerate(pix):
                            out[bi, r, s, h * v_dim : (h + 1) * v_dim] += y[t]
    return out


def _np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _np_silu(x):
    return x / (1.0 + np.exp(-x))


def _np_conv1x1(x, p, bias=True):
    y = x @ np.asarray(p["kernel"], np.float64)[0, 0]
    return y + np.asarray(p["bias"], np.float64) if bias else y


def _np_ew_mhsa(x, p, dim_head, window_size, mode, act):
    """Pad with zeros, 1x1 convs, window attention by the loop, crop."""
    b, h, w, c = x.shape
    ws = window_size
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    xp = np.zeros((b, hp, wp, c))
    xp[:, :h, :w] = x
    qk = _np_conv1x1(xp, p["qk"])
    v = act(_np_conv1x1(xp, p["v"]))
    modes = ("remote", "close") if mode == "hybrid" else (mode,)
    return _np_window_attention(qk, v, c // dim_head, (ws, ws), modes)[:, :h, :w]


def _np_ln(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_bn(x, p, s, eps=1e-6):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def _np_dwconv(x, kernel, stride):
    """Depthwise conv, zero padding ceil((k - s) / 2) on every side, by explicit sums."""
    k = kernel.shape[0]
    pad = math.ceil((k - stride) / 2)
    b, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.zeros((b, ho, wo, c))
    for a in range(k):
        for e in range(k):
            out += (
                xp[:, a : a + stride * ho : stride, e : e + stride * wo : stride] * kernel[a, e, 0]
            )
    return out


def _np_iirmb(x, v, *, norm, stride, dim_head, window_size, mode, act, skip):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    s = jax.tree.map(lambda a: np.asarray(a, np.float64), v.get("batch_stats", {}))
    y = _np_ln(x, p["norm"]) if norm == "ln" else _np_bn(x, p["norm"], s["norm"])
    if mode == "conv":
        y = act(_np_conv1x1(y, p["eops_0"]))
    else:
        y = _np_ew_mhsa(y, p["eops_0"], dim_head, window_size, mode, act)
    cl = p["conv_local"]
    y_l = _np_silu(_np_bn(_np_dwconv(y, cl["conv"]["kernel"], stride), cl["norm"],
                          s["conv_local"]["norm"]))  # fmt: skip
    y = y + y_l if skip else y_l
    y = _np_conv1x1(y, p["proj"], bias=False) * p["ls"]
    return x + y if skip else y


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("mode", ["close", "remote"])
def test_window_partition_groups_the_right_pixels_and_merges_back(mode):
    h, w, wh, ww = 6, 8, 3, 2
    x = jnp.arange(2 * h * w * 1, dtype=jnp.float32).reshape(2, h, w, 1)
    y = window_partition(x, (wh, ww), mode)
    n1, n2 = h // wh, w // ww
    assert y.shape == (2, n1, n2, wh * ww, 1)
    for i in range(n1):
        for j in range(n2):
            if mode == "close":
                want = x[0, i * wh : (i + 1) * wh, j * ww : (j + 1) * ww]
            else:
                want = x[0, i::n1, j::n2]
            np.testing.assert_array_equal(y[0, i, j, :, 0], np.asarray(want).reshape(-1))
    np.testing.assert_array_equal(window_merge(y, (wh, ww), mode), x)


def test_pad_to_window():
    x = _rand(0, (1, 5, 9, 2))
    xp, window = pad_to_window(x, 4)
    assert xp.shape == (1, 8, 12, 2) and window == (4, 4)
    np.testing.assert_array_equal(xp[:, :5, :9], x)
    assert float(jnp.abs(xp[:, 5:]).max()) == 0.0 and float(jnp.abs(xp[:, :, 9:]).max()) == 0.0
    xg, window = pad_to_window(x, 0)  # global attention: the whole map is one window
    assert xg.shape == x.shape and window == (5, 9)


@pytest.mark.parametrize("modes", [("remote",), ("close",), ("remote", "close")])
def test_window_attention_matches_loop(modes):
    qk, v = _rand(0, (2, 6, 4, 16)), _rand(1, (2, 6, 4, 12))
    y = ew_mhsa_attention(qk, v, heads=2, window=(3, 2), modes=modes)
    want = _np_window_attention(np.asarray(qk, np.float64), np.asarray(v, np.float64), 2,
                                (3, 2), modes)  # fmt: skip
    assert y.shape == v.shape and y.dtype == v.dtype
    assert _rel(y, want) < 1e-5


@pytest.mark.parametrize("mode", ["remote", "close", "hybrid"])
def test_ew_mhsa_with_padding_matches_loop(mode):
    # 7 x 5 map, window 3: padded to 9 x 6, the padding attends as keys (k, v = conv biases)
    x = _rand(0, (2, 7, 5, 8))
    attn = EWMHSA(12, dim_head=4, window_size=3, mode=mode, qkv_bias=True, act=gelu)
    variables = _random_variables(attn, x)
    y = _apply(attn, variables, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    want = _np_ew_mhsa(np.asarray(x, np.float64), p, 4, 3, mode, _np_gelu)
    assert y.shape == (2, 7, 5, 12)
    assert _rel(y, want) < 1e-5
    if mode == "hybrid":  # both partitions contribute
        remote = _apply(attn.clone(mode="remote"), variables, x)
        close = _apply(attn.clone(mode="close"), variables, x)
        assert _rel(remote + close, y) < 1e-5 and _rel(remote, y) > 0.1


def test_ew_mhsa_global_window_and_attention_dropout():
    x = _rand(0, (1, 4, 5, 8))
    attn = EWMHSA(8, dim_head=4, window_size=0, mode="close", qkv_bias=True)
    variables = _random_variables(attn, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    qk = _np_conv1x1(np.asarray(x, np.float64), p["qk"])
    v = np.maximum(_np_conv1x1(np.asarray(x, np.float64), p["v"]), 0.0)
    want = _np_window_attention(qk, v, 2, (4, 5), ("close",))
    y = _apply(attn, variables, x)
    assert _rel(y, want) < 1e-5
    dropped = attn.clone(attn_drop=0.5)
    y1 = _apply(dropped, variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(_apply(dropped, variables, x), y)
    assert _rel(y1, want) > 1e-2


# ----------------------------------------------------------------------------- i²RMB


@pytest.mark.parametrize(
    "cfg",
    [
        dict(norm="ln", stride=1, mode="hybrid", cin=16, cout=16),
        dict(norm="bn", stride=2, mode="conv", cin=8, cout=16),
        dict(norm="bn", stride=1, mode="conv", cin=16, cout=16),
    ],
    ids=["ln-hybrid-skip", "bn-conv-stride2", "bn-conv-skip"],
)
def test_iirmb_matches_numpy(cfg):
    x = _rand(0, (2, 7, 9, cfg["cin"]))
    act, np_act = (gelu, _np_gelu) if cfg["mode"] == "hybrid" else (nn.silu, _np_silu)
    block = IIRMB(cfg["cout"], exp_ratio=2.5 if cfg["mode"] == "hybrid" else 2.0,
                  norm=cfg["norm"], act=act, dw_kernel=5, stride=cfg["stride"], dim_head=8,
                  window_size=4, eops=(cfg["mode"],), qkv_bias=True,
                  has_skip=cfg["stride"] == 1)  # fmt: skip
    variables = _random_variables(block, x)
    y = _apply(block, variables, x)
    skip = cfg["stride"] == 1 and cfg["cin"] == cfg["cout"]
    want = _np_iirmb(np.asarray(x, np.float64), variables, norm=cfg["norm"],
                     stride=cfg["stride"], dim_head=8, window_size=4, mode=cfg["mode"],
                     act=np_act, skip=skip)  # fmt: skip
    assert y.shape == want.shape
    assert _rel(y, want) < 1e-5


def test_iirmb_init_layer_scale_and_skip():
    x = _rand(0, (2, 6, 6, 16))
    block = IIRMB(16, exp_ratio=2.0, norm="ln", act=gelu, dim_head=8, eops=("hybrid",))
    variables = jit(block.init)(jax.random.key(1), x)
    p = nn.unbox(variables)["params"]
    assert sorted(p) == ["conv_local", "eops_0", "ls", "norm", "proj"]
    assert sorted(p["eops_0"]) == ["qk", "v"] and "bias" not in p["proj"]
    np.testing.assert_allclose(p["ls"], 1e-6)
    y = _apply(block, variables, x)
    assert float(jnp.max(jnp.abs(y - x))) < 1e-4  # layer scale 1e-6: the block starts near x
    # no layer scale, no skip (stride 2): the branch alone
    down = IIRMB(24, exp_ratio=4.0, stride=2, ls_init=0.0, has_skip=False)
    v = jax.eval_shape(down.init, jax.random.key(1), x)
    assert "ls" not in v["params"] and "bias" not in v["params"]["eops_0"]
    y = jax.eval_shape(functools.partial(down.apply, train=False), v, x)
    assert y.shape == (2, 3, 3, 24)


def test_bad_inputs_raise_value_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"IIRMB: x must be \[B, H, W, C\].*\(2, 8, 16\)"):
        IIRMB(16).init(key, _rand(0, (2, 8, 16)))
    with pytest.raises(ValueError, match=r"IIRMB: x has 12 input channels.*dim_head=8"):
        IIRMB(12, eops=("hybrid",), dim_head=8).init(key, _rand(0, (1, 4, 4, 12)))
    with pytest.raises(ValueError, match=r"IIRMB: norm must be"):
        IIRMB(8, norm="gn").init(key, _rand(0, (1, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"IIRMB: eops must be"):
        IIRMB(8, eops=("dcn",)).init(key, _rand(0, (1, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"EWMHSA: features=9 must be a multiple of the 2 heads"):
        EWMHSA(9, dim_head=4).init(key, _rand(0, (1, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"EWMHSA: mode must be"):
        EWMHSA(8, dim_head=4, mode="shifted").init(key, _rand(0, (1, 4, 4, 8)))
    with pytest.raises(ValueError, match=r"shape \(1, 5, 4, 2\) is not a multiple of the window"):
        window_partition(_rand(0, (1, 5, 4, 2)), (2, 2), "close")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        window_partition(_rand(0, (1, 4, 4, 2)), (2, 2), "shifted")
    with pytest.raises(ValueError, match=r"qk channels 6 must be 2 \* heads \* K"):
        ew_mhsa_attention(_rand(0, (1, 2, 2, 6)), _rand(1, (1, 2, 2, 4)), heads=2, window=(2, 2))


def test_bf16_compute_keeps_fp32_params():
    x = _rand(0, (1, 5, 5, 16)).astype(jnp.bfloat16)
    block = IIRMB(16, norm="ln", dim_head=8, eops=("hybrid",), window_size=3, dtype=jnp.bfloat16)
    variables = nn.unbox(jax.eval_shape(block.init, jax.random.key(1), x))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables["params"]))
    assert jax.eval_shape(block.apply, variables, x).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- torch oracle


def _torch_reference():
    """A torch rebuild of the official model/lib_emo/emo2.py (zhangzjn/EMOv2): ConvNormAct,
    LayerNorm2d, EW_MHSA_{Remote,Close,Hybrid}, iiRMB and EMO2, with attn_pre=False,
    v_group=False (every released model), the same einops patterns and layer order."""
    import torch
    from einops import rearrange
    from torch import nn as tnn

    eps = 1e-6
    acts = {"none": tnn.Identity, "relu": tnn.ReLU, "silu": tnn.SiLU, "gelu": tnn.GELU}

    class LayerNorm2d(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm = tnn.LayerNorm(dim, eps)

        def forward(self, x):
            x = rearrange(x, "b c h w -> b h w c")
            return rearrange(self.norm(x), "b h w c -> b c h w")

    norms = {
        "none": lambda d: tnn.Identity(),
        "bn_2d": lambda d: tnn.BatchNorm2d(d, eps=eps),
        "ln_2d": LayerNorm2d,
    }

    class ConvNormAct(tnn.Module):
        def __init__(self, dim_in, dim_out, kernel_size, stride=1, groups=1, bias=False,
                     norm_layer="bn_2d", act_layer="relu"):  # fmt: skip
            super().__init__()
            padding = math.ceil((kernel_size - stride) / 2)
            self.conv = tnn.Conv2d(dim_in, dim_out, kernel_size, stride, padding, 1, groups, bias)
            self.norm = norms[norm_layer](dim_out)
            self.act = acts[act_layer]()

        def forward(self, x):
            return self.act(self.norm(self.conv(x)))

    class Conv(tnn.Module):
        def __init__(self, dim_in, dim_mid, bias, act_layer):
            super().__init__()
            self.net = ConvNormAct(dim_in, dim_mid, 1, bias=bias, norm_layer="none",
                                   act_layer=act_layer)  # fmt: skip

        def forward(self, x):
            return self.net(x)

    class EWMHSA(tnn.Module):
        def __init__(self, dim_in, dim_mid, mode, act_layer, dim_head, window_size, qkv_bias):
            super().__init__()
            self.mode, self.dim_head, self.window_size = mode, dim_head, window_size
            self.num_head = dim_in // dim_head
            self.scale = dim_head**-0.5
            self.qk = ConvNormAct(dim_in, dim_in * 2, 1, bias=qkv_bias, norm_layer="none",
                                  act_layer="none")  # fmt: skip
            self.v = ConvNormAct(dim_in, dim_mid, 1, bias=qkv_bias, norm_layer="none",
                                 act_layer=act_layer)  # fmt: skip

        def _attend(self, qk, v, pattern, inverse, n1, n2):
            qk = rearrange(qk, pattern, n1=n1, n2=n2)
            v = rearrange(v, pattern, n1=n1, n2=n2)
            h, w = qk.shape[-2:]
            qk = rearrange(qk, "b (qk heads dim_head) h w -> qk b heads (h w) dim_head", qk=2,
                           heads=self.num_head, dim_head=self.dim_head)  # fmt: skip
            attn = ((qk[0] @ qk[1].transpose(-2, -1)) * self.scale).softmax(dim=-1)
            v = rearrange(v, "b (heads dim_head) h w -> b heads (h w) dim_head",
                          heads=self.num_head)  # fmt: skip
            y = rearrange(attn @ v, "b heads (h w) dim_head -> b (heads dim_head) h w",
                          heads=self.num_head, h=h, w=w)  # fmt: skip
            return rearrange(y, inverse, n1=n1, n2=n2)

        def forward(self, x):
            _, _, hh, ww = x.shape
            ws_h, ws_w = (hh, ww) if self.window_size <= 0 else (self.window_size,) * 2
            pad_r, pad_b = (ws_w - ww % ws_w) % ws_w, (ws_h - hh % ws_h) % ws_h
            x = torch.nn.functional.pad(x, (0, pad_r, 0, pad_b, 0, 0))
            n1, n2 = (hh + pad_b) // ws_h, (ww + pad_r) // ws_w
            qk, v = self.qk(x), self.v(x)
            remote = ("b c (h1 n1) (w1 n2) -> (b n1 n2) c h1 w1",
                      "(b n1 n2) c h1 w1 -> b c (h1 n1) (w1 n2)")  # fmt: skip
            close = ("b c (n1 h1) (n2 w1) -> (b n1 n2) c h1 w1",
                     "(b n1 n2) c h1 w1 -> b c (n1 h1) (n2 w1)")  # fmt: skip
            parts = {"remote": [remote], "close": [close], "hybrid": [remote, close]}[self.mode]
            y = sum(self._attend(qk, v, *p, n1, n2) for p in parts)
            return y[:, :, :hh, :ww]

    class LayerScale2D(tnn.Module):
        def __init__(self, dim, init_values):
            super().__init__()
            self.gamma = tnn.Parameter(init_values * torch.ones(1, dim, 1, 1))

        def forward(self, x):
            return x * self.gamma

    class IIRMB(tnn.Module):
        def __init__(self, dim_in, dim_out, has_skip=True, exp_ratio=1.0, norm_layer="bn_2d",
                     act_layer="relu", dw_ks=3, stride=1, dim_head=64, window_size=7,
                     hybrid_eops=(0,), qkv_bias=False, ls_value=1e-6):  # fmt: skip
            super().__init__()
            self.norm = norms[norm_layer](dim_in)
            dim_mid = int(dim_in * exp_ratio)
            self.has_skip = dim_in == dim_out and stride == 1 and has_skip
            names = {1: "remote", 2: "close", 3: "hybrid"}
            self.eops = tnn.ModuleList(
                Conv(dim_in, dim_mid, qkv_bias, act_layer) if e == 0 else
                EWMHSA(dim_in, dim_mid, names[e], act_layer, dim_head, window_size, qkv_bias)
                for e in hybrid_eops
            )  # fmt: skip
            self.conv_local = ConvNormAct(dim_mid, dim_mid, dw_ks, stride, groups=dim_mid,
                                          act_layer="silu")  # fmt: skip
            self.proj = ConvNormAct(dim_mid, dim_out, 1, norm_layer="none", act_layer="none")
            self.ls = LayerScale2D(dim_out, ls_value)

        def forward(self, x):
            shortcut = x
            x = self.norm(x)
            xs = [eop(x) for eop in self.eops]
            x = sum(xs) if len(xs) > 1 else xs[0]
            x_l = self.conv_local(x)
            x = (x + x_l) if self.has_skip else x_l
            x = self.proj(x)
            return (shortcut + self.ls(x)) if self.has_skip else self.ls(x)

    class EMO2(tnn.Module):
        def __init__(self, num_classes=1000, depths=(1, 2, 4, 2), embed_dims=(64, 128, 256, 512),
                     exp_ratios=(4.0,) * 4, norm_layers=("bn_2d", "bn_2d", "ln_2d", "ln_2d"),
                     act_layers=("silu", "silu", "gelu", "gelu"), dw_kss=(5,) * 4,
                     dim_heads=(32,) * 4, window_sizes=(7,) * 4,
                     hybrid_eopss=((0,), (0,), (3,), (3,)), qkv_bias=True):  # fmt: skip
            super().__init__()
            pre = embed_dims[0] // 2
            self.stage0 = tnn.ModuleList([
                ConvNormAct(3, pre, 3, 2, bias=True, act_layer="silu"),
                ConvNormAct(pre, pre, 3, 1, groups=pre, act_layer="silu"),
                ConvNormAct(pre, pre, 1, norm_layer="none", act_layer="none"),
            ])  # fmt: skip
            for i, depth in enumerate(depths):
                layers = []
                for j in range(depth):
                    first = j == 0
                    layers.append(IIRMB(
                        pre, embed_dims[i], has_skip=not first,
                        exp_ratio=exp_ratios[i] * 2 if first else exp_ratios[i],
                        norm_layer=norm_layers[i], act_layer=act_layers[i], dw_ks=dw_kss[i],
                        stride=2 if first else 1, dim_head=dim_heads[i],
                        window_size=window_sizes[i],
                        hybrid_eops=(0,) if first else hybrid_eopss[i], qkv_bias=qkv_bias,
                    ))  # fmt: skip
                    pre = embed_dims[i]
                setattr(self, f"stage{i + 1}", tnn.ModuleList(layers))
            self.n_stages = len(depths)
            self.norm = norms[norm_layers[-1]](embed_dims[-1])
            self.head = tnn.Linear(embed_dims[-1], num_classes)

        def forward(self, x, features=False):
            outs = []
            for blk in self.stage0:
                x = blk(x)
            for i in range(self.n_stages):
                for blk in getattr(self, f"stage{i + 1}"):
                    x = blk(x)
                outs.append(x)
            if features:
                return outs
            return self.head(self.norm(x).mean(dim=(2, 3)))

    return {"EWMHSA": EWMHSA, "IIRMB": IIRMB, "EMO2": EMO2}


def torch_to_flax(state_dict) -> dict:
    """Official EMOv2 state dict -> Flax ``{"params", "batch_stats"}`` of the modules here."""
    params, stats = {}, {}
    for key, value in state_dict.items():
        a = value.detach().cpu().numpy().astype(np.float32)
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        path = []
        it = iter(range(len(parts) - 1))
        for i in it:
            p = parts[i]
            if p == "stage0":
                path.append(f"stem_{parts[i + 1]}")
                next(it)
            elif p.startswith("stage"):
                path += [f"stages_{int(p[5:]) - 1}", f"blocks_{parts[i + 1]}"]
                next(it)
            elif p == "eops":
                path.append(f"eops_{parts[i + 1]}")
                next(it)
            elif p == "net" or (p in ("conv", "norm") and path[-1:] in (["qk"], ["v"], ["proj"])):
                continue  # Conv.net / qk.conv / v.conv / proj.conv: a plain conv here
            elif p == "conv" and path and path[-1].startswith("eops_"):
                continue
            elif p == "norm" and parts[i - 1] == "norm":
                continue  # LayerNorm2d.norm
            elif p == "ls":
                path.append("ls")
            else:
                path.append(p)
        leaf = parts[-1]
        if leaf == "gamma":
            tree, path, a = params, path, a.reshape(-1)
        elif leaf in ("running_mean", "running_var"):
            tree, path = stats, [*path, "mean" if leaf == "running_mean" else "var"]
        elif leaf == "weight" and a.ndim == 4:
            tree, path, a = params, [*path, "kernel"], a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif leaf == "weight" and a.ndim == 2:
            tree, path, a = params, [*path, "kernel"], a.T
        elif leaf == "weight":
            tree, path = params, [*path, "scale"]
        else:
            tree, path = params, [*path, leaf]
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(a)
    out = {"params": params}
    if stats:
        out["batch_stats"] = stats
    return out


def randomize_torch(module, seed: int = 0):
    """Random weights, norm affines, layer scales (~1) and BN statistics, in place."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") or (p.ndim == 1 and "norm" in name and "weight" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + 0.5 * torch.randn(m.running_var.shape, generator=g).abs())
    return module.eval()


@pytest.mark.torch
@pytest.mark.parametrize("mode", ["remote", "close", "hybrid"])
def test_ew_mhsa_matches_official_torch(mode):
    import torch

    ref = randomize_torch(_torch_reference()["EWMHSA"](16, 40, mode, "gelu", 8, 4, True), seed=1)
    x = np.asarray(_rand(0, (2, 9, 6, 16)))  # 9 x 6: padded to 12 x 8
    with torch.no_grad():
        want = ref(torch.tensor(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    attn = EWMHSA(40, dim_head=8, window_size=4, mode=mode, qkv_bias=True, act=gelu)
    y = _apply(attn, torch_to_flax(ref.state_dict()), jnp.asarray(x))
    assert _rel(y, want) < 1e-5


@pytest.mark.torch
@pytest.mark.parametrize(
    "cfg",
    [
        dict(cin=20, cout=20, stride=1, norm="ln_2d", act="gelu", eops=(3,)),
        dict(cin=20, cout=20, stride=1, norm="ln_2d", act="gelu", eops=(1, 2)),
        dict(cin=12, cout=20, stride=2, norm="bn_2d", act="silu", eops=(0,)),
    ],
    ids=["ln-hybrid", "ln-remote+close", "bn-conv-stride2"],
)
def test_iirmb_matches_official_torch(cfg):
    import torch

    names = {0: "conv", 1: "remote", 2: "close", 3: "hybrid"}
    skip = cfg["stride"] == 1
    ref = _torch_reference()["IIRMB"](
        cfg["cin"], cfg["cout"], has_skip=skip, exp_ratio=3.5, norm_layer=cfg["norm"],
        act_layer=cfg["act"], dw_ks=5, stride=cfg["stride"], dim_head=10, window_size=3,
        hybrid_eops=cfg["eops"], qkv_bias=True,
    )  # fmt: skip
    ref = randomize_torch(ref, seed=2)
    x = np.asarray(_rand(0, (2, 7, 8, cfg["cin"])))
    with torch.no_grad():
        want = ref(torch.tensor(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    block = IIRMB(cfg["cout"], exp_ratio=3.5, norm=cfg["norm"][:2],
                  act=gelu if cfg["act"] == "gelu" else nn.silu, dw_kernel=5,
                  stride=cfg["stride"], dim_head=10, window_size=3,
                  eops=tuple(names[e] for e in cfg["eops"]), qkv_bias=True,
                  has_skip=skip)  # fmt: skip
    y = _apply(block, torch_to_flax(ref.state_dict()), jnp.asarray(x))
    assert y.shape == want.shape
    assert _rel(y, want) < 1e-5
