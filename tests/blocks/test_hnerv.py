"""HNeRV / NeRV++ blocks: NeRV block and ConvNeXt encoder against a torch rebuild of the official
modules (haochen-rye/HNeRV ``model_all.py``) on the same weights; NeRV++'s bilinear skip against
a direct bilinear formula; shapes, residual structure and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.blocks.hnerv import (
    ConvNeXtBlock,
    HNeRVEncoder,
    NeRVBlock,
    NeRVPlusPlusBlock,
    SeparableConvResBlock,
    bilinear_upsample,
    nerv_kernel_size,
    nerv_widths,
)


def _rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _bilinear_reference(x: np.ndarray, s: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling written out: output pixel i samples input
    coordinate (i + 0.5)/s − 0.5, clamped to the edge, and blends the two neighbours."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape

    def axis_weights(n):
        src = np.clip((np.arange(n * s) + 0.5) / s - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis_weights(h)
    x0, x1, fx = axis_weights(w)
    rows = x[:, y0] * (1 - fy)[None, :, None, None] + x[:, y1] * fy[None, :, None, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


def test_schedule_helpers_match_the_official_arguments():
    # --ks 0_1_5: kernels 1, 3, 5, 5, 5; --reduce 1.2 --lower_width 12 from fc_dim 68.
    assert [nerv_kernel_size(i, 1, 5) for i in range(5)] == [1, 3, 5, 5, 5]
    assert nerv_widths(68, 5, 1.2, 12) == (57, 48, 40, 33, 28)
    assert nerv_widths(20, 4, 1.2, 12) == (17, 14, 12, 12)


@pytest.mark.parametrize("scale", [2, 3])
def test_bilinear_upsample_matches_the_direct_formula(scale):
    x = _rand(0, (2, 5, 4, 3))
    got = bilinear_upsample(x, scale)
    assert got.shape == (2, 5 * scale, 4 * scale, 3)
    np.testing.assert_allclose(got, _bilinear_reference(x, scale), atol=1e-5)


def test_nerv_block_shapes_and_formula():
    x = _rand(1, (2, 3, 4, 6))
    blk = NeRVBlock(5, stride=2, kernel_size=3)
    v = blk.init(jax.random.key(0), x)
    assert v["params"]["conv"]["kernel"].shape == (3, 3, 6, 20)
    y = blk.apply(v, x)
    assert y.shape == (2, 6, 8, 5)
    # Output channel c at sub-pixel (i, j) is conv channel c·4 + 2i + j (torch's PixelShuffle).
    conv = jax.lax.conv_general_dilated(
        x, v["params"]["conv"]["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    conv = conv + v["params"]["conv"]["bias"].reshape(1, 1, 1, -1)
    want = jax.nn.gelu(conv[:, :, :, 4 * 3 + 2 * 1 + 0], approximate=False)
    np.testing.assert_allclose(y[:, 1::2, 0::2, 3], want, atol=1e-5)


def test_scrb_is_identity_when_its_last_pointwise_conv_is_zero():
    x = _rand(2, (1, 6, 6, 4))
    blk = SeparableConvResBlock()
    v = blk.init(jax.random.key(0), x)
    assert v["params"]["dw0"]["kernel"].shape == (3, 3, 1, 4)  # depthwise
    assert v["params"]["pw1"]["kernel"].shape == (1, 1, 4, 4)
    assert not np.allclose(blk.apply(v, x), x)
    p = jax.tree.map(lambda a: a, v["params"])
    p["pw1"] = jax.tree.map(jnp.zeros_like, p["pw1"])
    np.testing.assert_array_equal(blk.apply({"params": p}, x), x)


def test_nerv_plus_plus_skip_path_is_bilinear_upsampling():
    # With the main path silenced (UB conv and both SCRBs' last pointwise convs zero: GELU(0) = 0
    # and each SCRB is the identity), the block is exactly the bilinear skip.
    x = _rand(3, (2, 4, 5, 6))
    blk = NeRVPlusPlusBlock(6, stride=2, kernel_size=3)
    v = blk.init(jax.random.key(0), x)
    assert "skip_proj" not in v["params"]  # same width: identity skip
    p = dict(v["params"])
    p["up"] = jax.tree.map(jnp.zeros_like, p["up"])
    for k in ("scrb_in", "scrb_out"):
        p[k] = dict(p[k], pw1=jax.tree.map(jnp.zeros_like, p[k]["pw1"]))
    y = blk.apply({"params": p}, x)
    assert y.shape == (2, 8, 10, 6)
    np.testing.assert_allclose(y, _bilinear_reference(x, 2), atol=1e-5)
    # With the trained path on, the output differs from the skip alone.
    assert not np.allclose(blk.apply(v, x), y, atol=1e-3)


def test_nerv_plus_plus_projects_the_skip_when_the_width_changes():
    x = _rand(4, (1, 3, 3, 8))
    blk = NeRVPlusPlusBlock(5, stride=3, kernel_size=1)
    v = blk.init(jax.random.key(0), x)
    assert v["params"]["skip_proj"]["kernel"].shape == (1, 1, 8, 5)
    assert blk.apply(v, x).shape == (1, 9, 9, 5)


def test_encoder_shapes():
    x = _rand(5, (2, 16, 24, 3))
    enc = HNeRVEncoder(strides=(2, 4), dims=(8, 4))
    v = enc.init(jax.random.key(0), x)
    assert enc.apply(v, x).shape == (2, 2, 3, 4)
    assert v["params"]["stage0_block0"]["gamma"].shape == (8,)
    np.testing.assert_allclose(v["params"]["stage0_block0"]["gamma"], 1e-6)


def test_bad_inputs_raise():
    x = _rand(6, (1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"NeRVBlock: x must be NHWC .* got shape \(4, 4, 3\)"):
        NeRVBlock(4).init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match="NeRVBlock: kernel_size must be odd and positive, got 2"):
        NeRVBlock(4, kernel_size=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="NeRVBlock: stride must be a positive int, got 0"):
        NeRVBlock(4, stride=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="SeparableConvResBlock: kernel_size must be odd, got 4"):
        SeparableConvResBlock(4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"HNeRVEncoder: frame size \(4, 4\) .* \(3,\) = 3"):
        HNeRVEncoder(strides=(3,), dims=(4,)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"HNeRVEncoder: x must be NHWC \[B, H, W, C\] with 3"):
        HNeRVEncoder(strides=(2,), dims=(4,)).init(jax.random.key(0), x[..., :2])
    with pytest.raises(ValueError, match="HNeRVEncoder: strides .* one entry per stage"):
        HNeRVEncoder(strides=(2, 2), dims=(4,)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="ConvNeXtBlock: x must be NHWC .* with 5 channel"):
        ConvNeXtBlock(5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="bilinear_upsample: scale must be a positive int"):
        bilinear_upsample(x, 0)


# --- torch: the official modules rebuilt ------------------------------------------------------


def _to_torch(a):
    import torch

    a = np.asarray(a)
    if a.ndim == 4:  # HWIO -> OIHW
        a = a.transpose(3, 2, 0, 1)
    elif a.ndim == 2:  # [in, out] -> [out, in]
        a = a.T
    return torch.from_numpy(np.array(a, np.float32, copy=True, order="C"))


def _torch_official():
    """The official ConvNeXt encoder pieces and NeRVBlock, re-expressed (model_all.py)."""
    import torch
    from torch import nn

    class LayerNormCF(nn.Module):  # channels_first LayerNorm of the official code
        def __init__(self, c):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

        def forward(self, x):
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            return (
                self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6))
                + self.bias[:, None, None]
            )

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.dwconv = nn.Conv2d(d, d, 7, padding=3, groups=d)
            self.norm = nn.LayerNorm(d, eps=1e-6)
            self.pwconv1, self.pwconv2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.gamma = nn.Parameter(1e-6 * torch.ones(d))

        def forward(self, x):
            y = self.dwconv(x).permute(0, 2, 3, 1)
            y = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(y))))
            return x + (self.gamma * y).permute(0, 3, 1, 2)

    class Encoder(nn.Module):
        def __init__(self, strides, dims):
            super().__init__()
            self.down, self.stages = nn.ModuleList(), nn.ModuleList()
            cin = 3
            for i, (s, d) in enumerate(zip(strides, dims, strict=True)):
                conv = nn.Conv2d(cin, d, s, stride=s)
                self.down.append(nn.Sequential(conv, LayerNormCF(d)) if i == 0
                                 else nn.Sequential(LayerNormCF(cin), conv))  # fmt: skip
                self.stages.append(Block(d))
                cin = d

        def forward(self, x):
            for down, stage in zip(self.down, self.stages, strict=True):
                x = stage(down(x))
            return x

    class NeRVBlockT(nn.Module):
        def __init__(self, cin, cout, s, k):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout * s * s, k, 1, (k - 1) // 2)
            self.shuffle = nn.PixelShuffle(s)

        def forward(self, x):
            return nn.functional.gelu(self.shuffle(self.conv(x)))

    return LayerNormCF, Block, Encoder, NeRVBlockT


def _load_encoder(tenc, params, strides):
    for i in range(len(strides)):
        conv_idx, norm_idx = (0, 1) if i == 0 else (1, 0)
        c, n = params[f"down{i}_conv"], params[f"down{i}_norm"]
        tenc.down[i][conv_idx].weight.data = _to_torch(c["kernel"])
        tenc.down[i][conv_idx].bias.data = _to_torch(c["bias"])
        tenc.down[i][norm_idx].weight.data = _to_torch(n["scale"])
        tenc.down[i][norm_idx].bias.data = _to_torch(n["bias"])
        b, tb = params[f"stage{i}_block0"], tenc.stages[i]
        for name in ("dwconv", "norm", "pwconv1", "pwconv2"):
            w = b[name].get("kernel", b[name].get("scale"))
            getattr(tb, name).weight.data = _to_torch(w)
            getattr(tb, name).bias.data = _to_torch(b[name]["bias"])
        tb.gamma.data = _to_torch(b["gamma"])


@pytest.mark.torch
def test_encoder_matches_the_official_convnext_encoder():
    import torch

    _, _, Encoder, _ = _torch_official()
    strides, dims = (2, 2, 2), (8, 8, 4)
    x = jax.random.uniform(jax.random.key(7), (2, 16, 16, 3))
    enc = HNeRVEncoder(strides, dims)
    v = enc.init(jax.random.key(1), x)
    # Every parameter perturbed (zero biases, unit norms and 1e-6 gammas would hide mistakes).
    leaves, tree = jax.tree.flatten(v["params"])
    p = jax.tree.unflatten(tree, [a + 0.2 * _rand(i, a.shape) for i, a in enumerate(leaves)])
    tenc = Encoder(strides, dims)
    _load_encoder(tenc, p, strides)
    with torch.no_grad():
        want = tenc(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    got = enc.apply({"params": p}, x)
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=2e-5, rtol=1e-4)


@pytest.mark.torch
def test_nerv_block_matches_the_official_block():
    import torch

    *_, NeRVBlockT = _torch_official()
    x = _rand(8, (2, 3, 5, 6))
    blk = NeRVBlock(4, stride=3, kernel_size=5)
    v = blk.init(jax.random.key(2), x)
    t = NeRVBlockT(6, 4, 3, 5)
    t.conv.weight.data = _to_torch(v["params"]["conv"]["kernel"])
    t.conv.bias.data = _to_torch(v["params"]["conv"]["bias"] + 0.1)
    p = {"conv": dict(v["params"]["conv"], bias=v["params"]["conv"]["bias"] + 0.1)}
    with torch.no_grad():
        want = t(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(blk.apply({"params": p}, x), want.transpose(0, 2, 3, 1),
                               atol=1e-5)  # fmt: skip


@pytest.mark.torch
def test_bilinear_upsample_matches_torch_interpolate():
    import torch

    x = _rand(9, (1, 3, 5, 2))
    t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    want = torch.nn.functional.interpolate(t, scale_factor=2, mode="bilinear",
                                           align_corners=False).numpy()  # fmt: skip
    np.testing.assert_allclose(bilinear_upsample(x, 2), want.transpose(0, 2, 3, 1), atol=1e-6)
