"""SparK (arXiv 2301.03580): the sparse transform against NumPy, masks, the loss, the pretrainer
on two registered CNNs, and its bad inputs."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.analysis.spark import (
    LightDecoder,
    SparKPretrainer,
    active_at,
    normalize_patches,
    patchify,
    random_patch_mask,
    spark_loss,
    sparse_masking,
    unpatchify,
)
from jaxblocks.layers.conv_bn import ConvBN
from jaxblocks.registry import create_model

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST)


def _active(seed: int, b: int, h: int, w: int, ratio: float = 0.5) -> jax.Array:
    return random_patch_mask(jax.random.key(seed), b, h, w, ratio)


def _np_bn(y: np.ndarray, sel: np.ndarray, eps: float = 1e-5):
    """BatchNorm of the rows y[sel] only (biased variance), and those statistics."""
    rows = y[sel]  # [N_active, C]
    mean, var = rows.mean(0), rows.var(0)
    return (y - mean) / np.sqrt(var + eps), mean, var


def test_random_patch_mask_ratio_is_exact_and_keyed():
    a = random_patch_mask(jax.random.key(0), 6, 5, 4, 0.6)
    assert a.shape == (6, 5, 4) and a.dtype == jnp.bool_
    # round(20 * 0.4) = 8 visible in every image, as the official len_keep
    np.testing.assert_array_equal(np.asarray(a).reshape(6, -1).sum(1), 8)
    assert len({np.asarray(r).tobytes() for r in a}) > 1  # images get different masks
    np.testing.assert_array_equal(a, random_patch_mask(jax.random.key(0), 6, 5, 4, 0.6))
    assert not np.array_equal(a, random_patch_mask(jax.random.key(1), 6, 5, 4, 0.6))


def test_active_at_repeats_each_patch():
    a = jnp.array([[[True, False], [False, False]]])
    up = np.asarray(active_at(a, 4, 6))
    assert up.shape == (1, 4, 6) and up[0, :2, :3].all() and up.sum() == 6


def test_sparse_conv_zeroes_holes_and_equals_dense_conv_of_masked_input():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    active = _active(1, 2, 4, 4)
    conv = nn.Conv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)))
    v = conv.init(jax.random.key(2), x)
    xm = x * active_at(active, 8, 8)[..., None]
    with sparse_masking(active):
        y = conv.apply(v, xm)
    dense = conv.apply(v, xm)
    m = np.asarray(active_at(active, 4, 4))
    assert y.shape == (2, 4, 4, 5)
    np.testing.assert_array_equal(np.asarray(y)[~m], 0.0)
    np.testing.assert_allclose(np.asarray(y)[m], np.asarray(dense)[m], rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(dense)[~m]).max() > 1e-3  # the dense conv did fill the holes


def test_sparse_convbn_train_mode_is_bn_over_active_positions():
    x = jax.random.normal(jax.random.key(3), (3, 8, 8, 4)) + 0.5
    active = _active(4, 3, 4, 4)
    layer = ConvBN(6, (3, 3), padding=((1, 1), (1, 1)), activation=nn.relu, momentum=0.8)
    v = nn.unbox(layer.init(jax.random.key(5), x))
    params = jax.tree.map(lambda p: p + 0.3, v["params"])  # non-trivial scale and bias
    v = {**v, "params": params}
    xm = x * active_at(active, 8, 8)[..., None]
    with sparse_masking(active):
        y, upd = layer.apply(v, xm, mode="train", mutable=["batch_stats"])
    conv = jax.lax.conv_general_dilated(xm, params["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    m = np.asarray(active_at(active, 8, 8))
    norm, mean, var = _np_bn(np.asarray(conv, np.float64), m)
    want = (
        np.maximum(norm * np.asarray(params["scale"]) + np.asarray(params["bias"]), 0)
        * m[..., None]
    )
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.2 * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.8 + 0.2 * var, rtol=1e-4, atol=1e-5)
    # eval mode: running statistics, holes still empty
    with sparse_masking(active):
        ye = layer.apply({**v, **upd}, xm, mode="eval")
    assert np.all(np.asarray(ye)[~m] == 0) and np.abs(np.asarray(ye)[m]).max() > 0


def test_sparse_flax_batchnorm_and_layernorm():
    x = jax.random.normal(jax.random.key(6), (2, 4, 4, 5)) * 2 + 1
    active = _active(7, 2, 2, 2)
    m = np.asarray(active_at(active, 4, 4))
    bn = nn.BatchNorm(use_running_average=False, epsilon=1e-5)
    v = bn.init(jax.random.key(0), x)
    with sparse_masking(active):
        y, _ = bn.apply(v, x, mutable=["batch_stats"])
    want = _np_bn(np.asarray(x, np.float64), m)[0] * m[..., None]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
    ln = nn.LayerNorm()
    v = ln.init(jax.random.key(0), x)
    with sparse_masking(active):
        y = ln.apply(v, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ln.apply(v, x)) * m[..., None], atol=1e-6)
    # Dense on a feature map is a 1x1 conv (masked); on pooled features (a head) left alone
    dense = nn.Dense(3, bias_init=nn.initializers.ones)
    v = dense.init(jax.random.key(0), x)
    with sparse_masking(active):
        y4, y2 = dense.apply(v, x), dense.apply(v, x[:, 0, 0])
    np.testing.assert_allclose(np.asarray(y4), np.asarray(dense.apply(v, x)) * m[..., None])
    np.testing.assert_allclose(y2, dense.apply(v, x[:, 0, 0]))


def test_patches_and_per_patch_normalisation():
    x = jax.random.uniform(jax.random.key(8), (2, 8, 12, 3))
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    np.testing.assert_array_equal(p[1, 4], np.asarray(x)[1, 4:8, 4:8].reshape(-1))
    np.testing.assert_array_equal(unpatchify(p, 4, 8, 12), x)
    norm, mean, std = normalize_patches(p)
    pn = np.asarray(p, np.float64)
    want = (pn - pn.mean(-1, keepdims=True)) / np.sqrt(pn.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(norm, want, rtol=1e-5, atol=1e-5)


def test_loss_only_on_masked_patches():
    k = jax.random.split(jax.random.key(9), 3)
    pred = jax.random.normal(k[0], (3, 8, 12))
    target = jax.random.uniform(k[1], (3, 8, 12))
    active = random_patch_mask(k[2], 3, 2, 4, 0.5).reshape(3, 8)
    loss = spark_loss(pred, target, active)["loss"]
    noise = jax.random.normal(jax.random.key(10), target.shape)
    changed_visible = target + noise * active[..., None]
    changed_masked = target + noise * ~active[..., None]
    np.testing.assert_allclose(spark_loss(pred, changed_visible, active)["loss"], loss, rtol=1e-6)
    assert np.all(np.abs(spark_loss(pred, changed_masked, active)["loss"] - loss) > 1e-3)
    norm = np.asarray(normalize_patches(target)[0])
    sq = ((np.asarray(pred) - norm) ** 2).mean(-1)
    hidden = ~np.asarray(active)
    np.testing.assert_allclose(loss, (sq * hidden).sum(1) / hidden.sum(1), rtol=1e-5)


ENCODERS = {
    # ResNet, 3x3 stem, three stages: stride 4 on 16x16 -> 4x4 patches of 4x4 pixels
    "resnet18": ({"width": 8, "stage_sizes": (1, 1, 1), "stem": "small"}, 16, 4),
    # MobileNetV2 at width 0.25, stride-1 stem: stride 16 on 32x32 -> 2x2 patches
    "mobilenet_v2": ({"width_multiplier": 0.25, "stem_strides": 1}, 32, 16),
}


# MobileNetV2's case compiles ~17 inverted residuals (~50 s on 2 cores): `make test-slow`; the
# ResNet case runs in CI, and test_registry builds the registered `spark` model.
@pytest.mark.parametrize(
    "encoder",
    [
        pytest.param(e, marks=[pytest.mark.slow] if e == "mobilenet_v2" else [])
        for e in sorted(ENCODERS)
    ],
)
def test_pretrainer_on_registered_cnns(encoder):
    kw, size, stride = ENCODERS[encoder]
    model = create_model("spark", encoder=encoder, decoder_width=16, mask_ratio=0.5, **kw)
    x = jax.random.uniform(jax.random.key(11), (2, size, size, 1))
    v = nn.unbox(jit(model.init)(jax.random.key(12), x))
    # the encoder's variables sit where the plain classifier has them (fine-tuning transfer)
    plain = jax.eval_shape(create_model(encoder, num_classes=10, **kw).init, jax.random.key(0), x)
    for col in ("params", "batch_stats"):
        own = {k for k in v[col] if not k.startswith("spark_")}
        assert own == set(plain[col]) - {"fc", "classifier"}, col
        for name in own:
            shapes = jax.tree.map(lambda a: a.shape, v[col][name])
            assert shapes == jax.tree.map(lambda a: a.shape, nn.unbox(plain[col][name]))
    rest = {k: c for k, c in v.items() if k != "params"}
    n = (size // stride) ** 2

    def loss_fn(params, x, active):
        out, upd = model.apply({"params": params, **rest}, x, active, mutable=["batch_stats"])
        return spark_loss(**out)["loss"].mean(), (out, upd)

    if encoder == "resnet18":  # gradients on one encoder (the compile is the test's cost)
        f = jit(jax.value_and_grad(loss_fn, has_aux=True))
    else:
        f = jit(lambda p, x, a: (loss_fn(p, x, a), None))
    active = _active(13, 2, size // stride, size // stride, 0.5)
    (loss, (out, upd)), g = f(v["params"], x, active)
    assert out["active"].shape == (2, n) and out["pred"].shape == out["target"].shape
    np.testing.assert_array_equal(out["active"], active.reshape(2, n))
    np.testing.assert_allclose(out["target"], patchify(x, stride))
    assert np.isfinite(float(loss)) and float(loss) > 0
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree.leaves(moved))  # sparse BN updated every running statistic
    # Holes are empty for the encoder: the pixels of masked patches change nothing it computes
    # (BN statistics included), so the reconstruction is made from the visible pixels only.
    hole = ~active_at(active, size, size)[..., None]
    x2 = x + hole * jax.random.normal(jax.random.key(17), x.shape)
    (_, (out2, _)), _ = f(v["params"], x2, active)
    np.testing.assert_allclose(out2["pred"], out["pred"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(out2["target"], out["target"])
    if g is not None:
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))
        assert float(jnp.max(jnp.abs(g["spark_mask_token_0"]))) > 0
        assert float(jnp.max(jnp.abs(g["conv1"]["kernel"]))) > 0


def test_pretrainer_draws_masks_from_the_rng():
    enc = create_model("resnet18", width=4, stage_sizes=(1, 1), stem="small", num_classes=0)
    model = SparKPretrainer(enc, decoder_width=8)  # stride 2 on 8x8: 16 patches, 6 visible
    x = jax.random.uniform(jax.random.key(14), (3, 8, 8, 1))
    v = model.init(jax.random.key(15), x)
    a1 = model.apply(v, x, train=False, rngs={"dropout": jax.random.key(1)})["active"]
    a2 = model.apply(v, x, train=False, rngs={"dropout": jax.random.key(2)})["active"]
    a0 = model.apply(v, x, train=False)["active"]  # no rng: a fixed mask
    assert a1.shape == (3, 16)
    np.testing.assert_array_equal(np.asarray(a1).sum(1), 6)
    assert not np.array_equal(a1, a2)
    np.testing.assert_array_equal(a0, model.apply(v, x, train=False)["active"])


def test_light_decoder_shapes():
    dec = LightDecoder(stride=4, width=8, out_channels=2)
    to_dec = [jnp.ones((1, 2, 2, 8)), None]
    v = dec.init(jax.random.key(0), to_dec, "train")
    assert dec.apply(v, to_dec, "eval").shape == (1, 8, 8, 2)


def test_bad_inputs_raise_clear_errors():
    for ratio in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            random_patch_mask(jax.random.key(0), 1, 4, 4, ratio)
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            create_model("spark", encoder="resnet18", mask_ratio=ratio)
    enc = create_model("resnet18", width=4, stage_sizes=(1, 1, 1), stem="small", num_classes=0)
    model = SparKPretrainer(enc, decoder_width=8)
    with pytest.raises(ValueError, match="divisible by the encoder's total stride"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 18, 18, 1)))
    with pytest.raises(ValueError, match="keeps 0 of 1 patches"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="active must be bool"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8, 8, 1)),
                       jnp.ones((1, 3, 3), bool))  # fmt: skip
    with pytest.raises(ValueError, match="x must be NHWC"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((8, 8, 1)))
    with pytest.raises(ValueError, match="active must be bool"):
        with sparse_masking(jnp.ones((2, 2))):
            pass
    with pytest.raises(ValueError, match="2-D image layers"):
        conv = nn.Conv(2, (3,))
        x = jnp.ones((1, 8, 2))
        v = conv.init(jax.random.key(0), x)
        with sparse_masking(jnp.ones((1, 2, 2), bool)):
            conv.apply(v, x)


@pytest.mark.torch
def test_unet_block_and_sparse_bn_match_official_torch():
    torch = pytest.importorskip("torch")
    from jaxblocks.analysis.spark import UNetBlock

    # Official decoder.UNetBlock(cin=6, cout=4) in train mode (batch statistics).
    x = jax.random.normal(jax.random.key(20), (2, 3, 3, 6))
    block = UNetBlock(4)
    v = nn.unbox(block.init(jax.random.key(21), x, "train"))
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), v["params"])
    up = torch.nn.ConvTranspose2d(6, 6, kernel_size=4, stride=2, padding=1, bias=True)
    c1 = torch.nn.Conv2d(6, 6, 3, padding=1, bias=False)
    c2 = torch.nn.Conv2d(6, 4, 3, padding=1, bias=False)
    bn1, bn2 = torch.nn.BatchNorm2d(6), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        # Flax's transposed conv is a conv of the dilated input: torch's weight flipped.
        up.weight.copy_(p["up_sample"]["kernel"].flip(0, 1).permute(2, 3, 0, 1))
        up.bias.copy_(p["up_sample"]["bias"])
        for conv, bn, name in ((c1, bn1, "conv1"), (c2, bn2, "conv2")):
            conv.weight.copy_(p[name]["kernel"].permute(3, 2, 0, 1))
            bn.weight.copy_(p[name]["scale"] + 0.5)
            bn.bias.copy_(p[name]["bias"] - 0.25)
    seq = torch.nn.Sequential(up, c1, bn1, torch.nn.ReLU6(), c2, bn2).train()
    want = seq(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    for name in ("conv1", "conv2"):
        v["params"][name]["scale"] = v["params"][name]["scale"] + 0.5
        v["params"][name]["bias"] = v["params"][name]["bias"] - 0.25
    got, _ = block.apply(v, x, "train", mutable=["batch_stats"])
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-4)

    # Official sp_bn_forward: BatchNorm1d over the active positions, zeros elsewhere.
    y = jax.random.normal(jax.random.key(22), (2, 4, 4, 5)) * 3 + 1
    active = _active(23, 2, 2, 2)
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    bv = bn.init(jax.random.key(0), y)
    with sparse_masking(active):
        got, upd = bn.apply(bv, y, mutable=["batch_stats"])
    ii = torch.tensor(np.asarray(active_at(active, 4, 4)))
    tbn = torch.nn.BatchNorm1d(5).train()
    yt = torch.tensor(np.asarray(y))
    want = torch.zeros_like(yt)
    want[ii] = tbn(yt[ii])
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5)
