"""HNeRV / NeRV++ models: shapes, parameter counts (the README Bunny model against the official
width solve and a torch rebuild of the official ``HNeRV``), the whole model against that rebuild
on the same weights, embedding quantisation, bits per pixel by hand, the video evaluation, the
video-fitting data set, task and report, and errors."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.models.hnerv import (
    HNERV_PARAMS,
    HNERV_PRESETS,
    HNeRV,
    HNeRVConfig,
    NeRVPlusPlus,
    bits_per_pixel,
    decoder_param_count,
    dequantize_embedding,
    evaluate_video,
    quantize_decoder_params,
    quantize_embedding,
    solve_fc_dim,
    video_bpp,
)
from jaxblocks.registry import create_model

TINY = dict(frame_size=(16, 16), enc_strides=(2, 2, 2, 2), enc_dims=(8, 8, 8, 8),
            dec_strides=(2, 2, 2, 2), fc_dim=16, lower_width=4)  # fmt: skip


def _count(tree) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def _frames(seed, n=2, size=16):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3))


@pytest.mark.parametrize("cls", [HNeRV, NeRVPlusPlus])
def test_tiny_models_encode_decode_shapes_and_range(cls):
    m = cls(**TINY)
    x = _frames(0)
    v = m.init(jax.random.key(0), x)
    e = m.apply(v, x, method="encode")
    assert e.shape == (2, 1, 1, 8)
    y = m.apply(v, x)
    assert y.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(m.apply(v, e, method="decode"), y, atol=1e-6)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # Content-adaptive: different frames give different embeddings.
    assert not np.allclose(e[0], e[1])


def test_stem_pixel_shuffle_when_encoder_downsamples_more_than_the_decoder_upsamples():
    # ∏enc = 16, ∏dec = 4: a 1×1 stem to fc_dim·16 channels shuffled by fc = 4.
    m = HNeRV(frame_size=(16, 16), enc_strides=(4, 4), enc_dims=(8, 8), dec_strides=(2, 2),
              fc_dim=6, lower_width=4)  # fmt: skip
    x = _frames(1)
    v = m.init(jax.random.key(0), x)
    assert v["params"]["stem"]["kernel"].shape == (1, 1, 8, 6 * 16)
    assert m.apply(v, x).shape == (2, 16, 16, 3)


def test_bunny_preset_count_and_the_official_width_solve():
    cfg = HNERV_PRESETS["hnerv_bunny_1.5m"]
    assert solve_fc_dim(1.5, 132, (640, 1280), cfg) == cfg.fc_dim == 68
    m = create_model("hnerv_bunny_1.5m")
    x = jax.ShapeDtypeStruct((1, 640, 1280, 3), jnp.float32)
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    assert _count(v) == HNERV_PARAMS["hnerv_bunny_1.5m"] == 1_794_436
    values, tensors = decoder_param_count(v["params"])
    assert _count(v["params"]["encoder"]) == 306_160
    # README "1.5M" = decoder (without the head, as the official counts) + 16·2·4·132 embeddings.
    assert values - 3 * 3 * 28 * 3 - 3 + 16 * 2 * 4 * 132 == 1_504_413
    assert tensors == 2 + 2 * 5 + 2
    assert jax.eval_shape(m.apply, v, x).shape == (1, 640, 1280, 3)


def test_demo_presets_have_equal_size_within_ten_percent():
    counts = {}
    for name in ("hnerv_video_demo", "nervpp_video_demo"):
        m = create_model(name)
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        counts[name] = _count(jax.eval_shape(m.init, jax.random.key(0), x))
    assert isinstance(create_model("nervpp_video_demo"), NeRVPlusPlus)
    assert counts == {"hnerv_video_demo": 108_080, "nervpp_video_demo": 106_991}
    assert abs(counts["nervpp_video_demo"] / counts["hnerv_video_demo"] - 1) < 0.1


@pytest.mark.parametrize("bits", [2, 6, 8, 12])
def test_quantize_embedding_error_is_at_most_half_a_step(bits):
    x = jax.random.normal(jax.random.key(bits), (5, 2, 3, 16)) * 3.0 + 1.0
    q = quantize_embedding(x, bits)
    assert q.codes.shape == x.shape
    assert q.codes.dtype == (jnp.uint8 if bits <= 8 else jnp.uint16)
    assert int(q.codes.min()) == 0 and int(q.codes.max()) == 2**bits - 1
    np.testing.assert_allclose(q.minimum, x.min())
    np.testing.assert_allclose(q.scale, (x.max() - x.min()) / (2**bits - 1), rtol=1e-6)
    err = jnp.abs(dequantize_embedding(q) - x)
    assert float(err.max()) <= float(q.scale) / 2 * (1 + 1e-4)
    # Not trivially exact: the error is a sizeable part of the half step.
    assert float(err.max()) > float(q.scale) / 4


def test_quantize_embedding_constant_tensor_and_bad_inputs():
    q = quantize_embedding(jnp.full((3, 4), 0.7), 6)
    np.testing.assert_allclose(dequantize_embedding(q), 0.7, rtol=1e-6)
    with pytest.raises(ValueError, match=r"quantize_embedding: bits must be an int in \[1, 16\]"):
        quantize_embedding(jnp.ones(3), 0)
    with pytest.raises(ValueError, match="quantize_embedding: bits must be an int"):
        quantize_embedding(jnp.ones(3), 6.0)
    with pytest.raises(ValueError, match=r"non-empty floating array, got dtype int32 shape \(3,\)"):
        quantize_embedding(jnp.ones(3, jnp.int32), 6)


def test_bits_per_pixel_by_hand_on_a_tiny_model():
    m = HNeRV(**TINY)
    v = m.init(jax.random.key(0), _frames(2))
    # Decoder by hand: stem 8→16 (1×1), widths 13, 11, 9, 8 with kernels 1, 3, 5, 5, head → 3.
    w = [16, 13, 11, 9, 8]
    ks = [1, 3, 5, 5]
    dec = 8 * 16 + 16
    for i in range(4):
        dec += w[i] * w[i + 1] * 4 * ks[i] ** 2 + w[i + 1] * 4
    dec += 8 * 3 * 9 + 3
    assert decoder_param_count(v["params"]) == (dec, 12)
    # 10 frames of 16×16: embeddings 10·1·1·8 at 6 bit, weights at 8 bit, 13 tensors × 2 × 16.
    want = (80 * 6 + dec * 8 + 13 * 2 * 16) / (10 * 16 * 16)
    assert video_bpp(v["params"], (10, 1, 1, 8), (10, 16, 16)) == pytest.approx(want)
    assert bits_per_pixel(100, 1000, 50, 4, 8, 0) == pytest.approx((400 + 8000) / 50)
    with pytest.raises(ValueError, match="bits_per_pixel: num_pixels must be positive, got 0"):
        bits_per_pixel(1, 1, 0)
    with pytest.raises(ValueError, match="bits_per_pixel: num_decoder_params must be >= 0"):
        bits_per_pixel(1, -1, 10)


def test_quantize_decoder_params_leaves_the_encoder_alone():
    m = HNeRV(**TINY)
    v = m.init(jax.random.key(0), _frames(3))
    q, n = quantize_decoder_params(v["params"], 4)
    assert n == 12
    for a, b in zip(
        jax.tree.leaves(v["params"]["encoder"]), jax.tree.leaves(q["encoder"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    k, kq = v["params"]["head"]["kernel"], q["head"]["kernel"]
    assert len(np.unique(np.asarray(kq))) <= 16 and not np.allclose(k, kq)
    step = (k.max() - k.min()) / 15
    assert float(jnp.abs(k - kq).max()) <= float(step) / 2 * (1 + 1e-4)


def test_evaluate_video_quantisation_costs_psnr_and_counts_bits():
    m = HNeRV(**TINY)
    x = _frames(4, n=5)
    v = m.init(jax.random.key(0), x)
    # Perturbed weights: at init the output is ≈ 0.5 everywhere and quantisation barely shows.
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    v = jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape)
                                  for a, k in zip(leaves, keys, strict=True)])  # fmt: skip
    r = evaluate_video(m, v, x, embed_bits=2, model_bits=3, batch_size=2)
    assert r["psnr"].shape == r["psnr_embed_q"].shape == r["psnr_all_q"].shape == (5,)
    out = m.apply(v, x)
    mse = np.mean((np.asarray(out) - np.asarray(x)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(r["psnr"], -10 * np.log10(mse), rtol=1e-4)
    # The quantised path, rebuilt step by step.
    e = m.apply(v, x, method="encode")
    eq = dequantize_embedding(quantize_embedding(e, 2))
    qp, _ = quantize_decoder_params(v["params"], 3)
    out_q = m.apply({"params": qp}, eq, method="decode")
    assert float(jnp.abs(out_q - out).max()) > 1e-4
    mse_q = np.mean((np.asarray(out_q) - np.asarray(x)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(r["psnr_all_q"], -10 * np.log10(mse_q), rtol=1e-5)
    assert r["embedding_values"] == 5 * 8
    assert r["bpp"] == pytest.approx(video_bpp(v["params"], (5, 1, 1, 8), (5, 16, 16), 2, 3))
    with pytest.raises(ValueError, match=r"evaluate_video: frames must be \[N, H, W, C\]"):
        evaluate_video(m, v, x[0])


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="HNeRVConfig.out_act must be one of"):
        HNeRVConfig(out_act="relu")
    with pytest.raises(ValueError, match="HNeRVConfig.block must be one of"):
        HNeRVConfig(block="vit")
    with pytest.raises(ValueError, match=r"prod\(enc_strides\)=4 must be a multiple of"):
        HNeRVConfig(frame_size=(8, 8), enc_strides=(2, 2), enc_dims=(4, 4), dec_strides=(3,))
    with pytest.raises(ValueError, match=r"frame_size \(20, 20\) must be divisible by"):
        HNeRVConfig(frame_size=(20, 20), enc_strides=(8,), enc_dims=(4,), dec_strides=(8,))
    with pytest.raises(ValueError, match="need one entry per stage"):
        HNeRVConfig(enc_strides=(2, 2), enc_dims=(4,))
    m = HNeRV(**TINY)
    v = m.init(jax.random.key(0), _frames(5))
    with pytest.raises(ValueError, match=r"HNeRV.encode: frames must be \[B, H, W, 3\], got shape "
                                         r"\(2, 16, 16, 1\)"):  # fmt: skip
        m.apply(v, jnp.ones((2, 16, 16, 1)))
    with pytest.raises(ValueError, match=r"NeRVPlusPlus.decode: embedding must be \[B, h, w, 8\]"):
        nv = NeRVPlusPlus(**TINY)
        nv.apply(nv.init(jax.random.key(0), _frames(5)), jnp.ones((2, 1, 1, 4)), method="decode")
    with pytest.raises(ValueError, match=r"HNeRVEncoder: frame size \(12, 12\)"):
        m.apply(v, jnp.ones((1, 12, 12, 3)))


# --- the video-fitting plug-ins ----------------------------------------------------------------


def test_moving_shapes_video_is_deterministic_and_moves():
    from jaxblocks.data.moving_shapes import moving_shapes_video

    a = moving_shapes_video(6, 16, seed=3)
    assert a.shape == (6, 16, 16, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, moving_shapes_video(6, 16, seed=3))
    assert not np.array_equal(a, moving_shapes_video(6, 16, seed=4))
    assert np.abs(np.diff(a, axis=0)).mean() > 1e-3  # frames change
    with pytest.raises(ValueError, match="moving_shapes_video: need frames >= 1, size >= 8"):
        moving_shapes_video(4, 4)


def test_video_fitting_task_and_dataset():
    from jaxblocks.train import config as config_lib
    from jaxblocks.train.data import make_datasets
    from jaxblocks.train.tasks import get_task

    cfg = config_lib.load_config("hnerv_video", "smoke")
    train, (xt, yt), nc = make_datasets(cfg)
    assert nc == 0 and train.x.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(train.x, train.y)
    np.testing.assert_array_equal(xt, train.x)  # fitting: the test set is the video itself
    task = get_task("video_fitting")
    p = jax.random.uniform(jax.random.key(0), (3, 4, 4, 3))
    t = jax.random.uniform(jax.random.key(1), (3, 4, 4, 3))
    m = task.metrics(p, t)
    mse = np.mean((np.asarray(p) - np.asarray(t)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(m["loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(m["psnr"], -10 * np.log10(mse), rtol=1e-5)
    assert task.main_metric == "psnr" and task.higher_is_better
    with pytest.raises(ValueError, match=r"video_fitting: model output \(3, 4, 4, 3\) does not"):
        task.metrics(p, t[:, :2])


def test_video_fitting_report_on_a_fitted_stand_in(tmp_path):
    from jaxblocks.train import config as config_lib
    from jaxblocks.train.reports import REPORTS

    cfg = config_lib.load_config("hnerv_video", "smoke")
    m = create_model(cfg.model.name, **dict(cfg.model.kwargs))
    v = m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    res = types.SimpleNamespace(state=types.SimpleNamespace(params=v["params"]), final_step=7)
    table = REPORTS["video_fitting"](cfg, str(tmp_path), [("", res)])
    assert "hnerv_video_demo (8 frames 16×16, 7 steps)" in table
    assert "| embeddings 6-bit + decoder 8-bit |" in table
    assert "Stored: 64 embedding values" in table
    with pytest.raises(ValueError, match="report 'video_fitting': needs a finished run"):
        REPORTS["video_fitting"](cfg, str(tmp_path), [])


# --- torch: the official HNeRV rebuilt ---------------------------------------------------------


def _torch_hnerv(cfg: HNeRVConfig):
    """The official ``HNeRV`` (ConvNeXt encoder, 1×1 stem + GELU + reshape, NeRV blocks,
    Conv3×3 head, (tanh + 1)/2), re-expressed from model_all.py."""
    import torch
    from torch import nn

    from tests.blocks.test_hnerv import _torch_official

    _, _, Encoder, NeRVBlockT = _torch_official()

    class HNeRVT(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder(cfg.enc_strides, cfg.enc_dims)
            self.fc = cfg.fc
            ngf = cfg.fc_dim
            self.stem = nn.Conv2d(cfg.enc_dims[-1], ngf * self.fc**2, 1)
            blocks = []
            for i, s in enumerate(cfg.dec_strides):
                new = int(max(round(ngf / cfg.reduce), cfg.lower_width))
                blocks.append(NeRVBlockT(ngf, new, s, min(cfg.ks_dec1 + 2 * i, cfg.ks_dec2)))
                ngf = new
            self.blocks = nn.ModuleList(blocks)
            self.head = nn.Conv2d(ngf, 3, 3, 1, 1)

        def forward(self, x):
            e = self.encoder(x)
            y = nn.functional.gelu(self.stem(e))
            n, _, h, w = y.shape
            f = self.fc
            y = y.view(n, -1, f, f, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, -1, f * h, f * w)
            for b in self.blocks:
                y = b(y)
            return torch.tanh(self.head(y)) * 0.5 + 0.5

    return HNeRVT()


@pytest.mark.torch
def test_official_torch_hnerv_bunny_count():
    t = _torch_hnerv(HNERV_PRESETS["hnerv_bunny_1.5m"])
    assert sum(p.numel() for p in t.parameters()) == HNERV_PARAMS["hnerv_bunny_1.5m"]


@pytest.mark.torch
def test_hnerv_matches_the_official_model_on_the_same_weights():
    import torch

    from tests.blocks.test_hnerv import _load_encoder, _to_torch

    cfg = HNeRVConfig(frame_size=(16, 16), enc_strides=(4, 2), enc_dims=(8, 6),
                      dec_strides=(2, 2), fc_dim=10, lower_width=4)  # fmt: skip
    m = HNeRV.from_config(cfg)
    x = _frames(6)
    v = m.init(jax.random.key(1), x)
    leaves, tree = jax.tree.flatten(v["params"])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    p = jax.tree.unflatten(tree, [a + 0.1 * jax.random.normal(k, a.shape)
                                  for a, k in zip(leaves, keys, strict=True)])  # fmt: skip
    t = _torch_hnerv(cfg)
    _load_encoder(t.encoder, p["encoder"], cfg.enc_strides)
    for tm, name in [(t.stem, "stem"), (t.head, "head")] + [
        (b.conv, f"blocks_{i}") for i, b in enumerate(t.blocks)
    ]:
        src = p[name]["conv"] if name.startswith("blocks") else p[name]
        tm.weight.data, tm.bias.data = _to_torch(src["kernel"]), _to_torch(src["bias"])
    with torch.no_grad():
        want = t(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    got = m.apply({"params": p}, x)
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=2e-5)
