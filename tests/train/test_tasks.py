"""Task and data set plug-ins of the trainer: super-resolution metrics, weighted evaluation,
the sample-image pairs, registry errors."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.data.sr_images import SPLIT_COLUMNS, bicubic_upscale, sr_pairs
from jaxblocks.train import step as step_lib
from jaxblocks.train.data import DATASETS, register_dataset
from jaxblocks.train.tasks import TASKS, Task, get_task, psnr, register_task


def test_super_resolution_metrics():
    pred = jnp.full((2, 4, 4, 1), 0.5)
    target = jnp.stack([jnp.full((4, 4, 1), 0.5), jnp.full((4, 4, 1), 0.6)])
    m = get_task("super_resolution").metrics(pred, target)
    np.testing.assert_allclose(m["loss"], [0.0, 0.01], atol=1e-7)
    np.testing.assert_allclose(m["psnr"][1], 20.0, rtol=1e-5)  # 10 log10(1 / 0.01)
    assert float(m["psnr"][0]) == pytest.approx(120.0)  # mse floored at 1e-12
    np.testing.assert_allclose(psnr(jnp.array(0.25), peak=2.0), 10 * np.log10(16.0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"output \(2, 4, 4, 1\) does not match the target"):
        get_task("super_resolution").metrics(pred, target[:, :2])


class _Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x


def test_eval_step_sums_each_metric_with_the_padding_mask():
    f = step_lib.make_eval_step(_Identity(), {}, task="super_resolution")
    x = jnp.stack([jnp.full((2, 2, 1), v) for v in (0.1, 0.2, 0.9)])
    y = jnp.zeros((3, 2, 2, 1))
    out = f({}, {}, {"x": x, "y": y, "w": jnp.array([1.0, 1.0, 0.0])})
    assert float(out["count"]) == 2.0
    np.testing.assert_allclose(out["loss"], 0.01 + 0.04, rtol=1e-5)
    np.testing.assert_allclose(out["psnr"], 20.0 + 10 * np.log10(25.0), rtol=1e-5)


def test_sr_pairs_are_held_out_textured_and_bicubic_is_a_real_baseline():
    lr, hr = sr_pairs("test", 8, 12, 3, seed=0)
    assert lr.shape == (8, 4, 4, 1) and hr.shape == (8, 12, 12, 1)
    assert np.all(hr.std(axis=(1, 2, 3)) >= 0.05) and 0.0 <= hr.min() and hr.max() <= 1.0
    assert SPLIT_COLUMNS["train"][1] <= SPLIT_COLUMNS["test"][0]  # disjoint columns
    up = bicubic_upscale(jnp.asarray(lr), 3)
    base = get_task("super_resolution").metrics(up, jnp.asarray(hr))["psnr"]
    assert 15.0 < float(base.mean()) < 40.0
    with pytest.raises(ValueError, match="split must be one of"):
        sr_pairs("val", 1, 12, 3, seed=0)
    with pytest.raises(ValueError, match="patch_size=10 not divisible by scale=3"):
        sr_pairs("train", 1, 10, 3, seed=0)


def test_registries_reject_duplicates_and_unknown_names():
    assert {"classification", "lm", "super_resolution"} <= set(TASKS)
    assert {"synthetic", "digits", "stdlib_text", "sr_sample_images"} <= set(DATASETS)
    with pytest.raises(ValueError, match="already registered"):
        register_task(Task("lm", lambda o, t: {}, "accuracy"))
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(lambda cfg: None)
    with pytest.raises(ValueError, match=r"config.task must be one of .*'segment'"):
        get_task("segment")


def _official_mdbm_loss(pixel_logits, logits, image, mask, labels, w=0.5, beta=0.9999, gamma=2):
    """NumPy transcription of the official tune_mrf loss (FocalLoss with class-balanced NLLLoss
    weights on the unobserved pixels, plus the class CE, mixed by clf_weight)."""
    n_levels = pixel_logits.shape[-1]
    target = np.round(image * (n_levels - 1)).astype(int).reshape(-1)
    keep = mask.reshape(-1) == 0
    lp = pixel_logits.reshape(-1, n_levels)[keep].astype(np.float64)
    t = target[keep]
    alpha = (1 - beta) / (1 - beta ** np.bincount(t, minlength=n_levels).astype(np.float64))
    log_sm = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    weighted = (1 - np.exp(log_sm)) ** gamma * log_sm
    picked = -weighted[np.arange(len(t)), t]
    focal = (alpha[t] * picked).sum() / alpha[t].sum()  # torch NLLLoss(weight=alpha), mean
    ls = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -ls[np.arange(len(labels)), labels].mean()
    return (1 - w) * focal + w * ce


def test_completion_classification_is_the_official_mdbm_loss():
    rng = np.random.default_rng(0)
    B, H, L, K = 4, 8, 5, 10
    image = rng.integers(0, L, (B, H, H)) / (L - 1)
    image[0, :4] = 0.0  # a skewed level histogram: the class balance matters
    mask = (rng.random((B, H, H)) < 0.4).astype(np.float64)
    labels = rng.integers(0, K, B)
    pixel_logits = 3 * rng.normal(size=(B, H, H, L))
    logits = rng.normal(size=(B, K))
    targets = np.stack([image, mask, np.broadcast_to(labels[:, None, None], (B, H, H))], -1)
    completed = np.where(mask > 0, image, 0.5)[..., None]
    m = get_task("completion_classification").metrics(
        (jnp.asarray(completed), jnp.asarray(logits), jnp.asarray(pixel_logits)),
        jnp.asarray(targets),
    )
    want = _official_mdbm_loss(pixel_logits, logits, image, mask, labels)
    np.testing.assert_allclose(float(jnp.mean(m["loss"])), want, rtol=1e-5)
    # the masked MSE sees only the unobserved pixels
    mse = ((0.5 - image) ** 2 * (1 - mask)).sum((1, 2)) / (1 - mask).sum((1, 2))
    np.testing.assert_allclose(m["masked_mse"], mse, rtol=1e-5)
    with pytest.raises(ValueError, match=r"targets must be \[B, H, W, 3\]"):
        get_task("completion_classification").metrics(
            (jnp.asarray(completed), jnp.asarray(logits), jnp.asarray(pixel_logits)),
            jnp.asarray(targets[..., :2]),
        )
