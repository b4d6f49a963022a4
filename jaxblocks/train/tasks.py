"""Task plug-ins of the one trainer: what a model's outputs are scored with.

A `Task` turns ``(outputs, targets)`` into per-example metrics (any leading dims, e.g. per token
for LMs); the train step minimises the mean of ``"loss"`` and logs the mean of each metric, the
evaluation sums them weighted by the padding mask and divides by the count. New task types
(super-resolution, segmentation, masked pretraining, ...) register here with `register_task`, and
their data sets with `jaxblocks.train.data.register_dataset`: they never need a second loop.

``config.task`` names the task; ``TASKS`` lists them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Registers the `spark` pretrainer model (SparK, paper 18) the masked_pretraining task trains.
from jaxblocks.analysis.spark import spark_loss

__all__ = ["TASKS", "Task", "get_task", "register_task", "cross_entropy", "psnr"]


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of training objective.

    Attributes:
      name: ``config.task``.
      metrics: ``metrics(outputs, targets) -> {"loss": ..., <name>: ...}`` per example (any
        leading dims, fp32); every metric is averaged the same way.
      main_metric: the metric the CLI's summary line and the curves' second panel show.
      seq_axis: the batch axis sharded over the mesh's sequence axis (1 for [B, T] tokens).
      higher_is_better: for ``main_metric``.
    """

    name: str
    metrics: Callable[[jax.Array, jax.Array], dict[str, jax.Array]]
    main_metric: str
    seq_axis: int | None = None
    higher_is_better: bool = True


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` under ``task.name`` (a name can be registered once)."""
    if task.name in TASKS and TASKS[task.name] is not task:
        raise ValueError(f"register_task: task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name``, or an error listing the tasks."""
    if name not in TASKS:
        raise ValueError(f"config.task must be one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example softmax cross-entropy and correctness (any leading dims), fp32."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return loss, correct


def _classification(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    loss, correct = cross_entropy(logits, labels)
    return {"loss": loss, "accuracy": correct}


def psnr(mse: jax.Array, peak: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB of a mean squared error (images in [0, peak])."""
    return 10.0 * jnp.log10(peak**2 / jnp.maximum(mse, 1e-12))


def _image_regression(pred: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Per-image MSE (the loss) and PSNR, images in [0, 1] ([B, H, W, C])."""
    if pred.shape != target.shape:
        raise ValueError(
            f"super_resolution: model output {pred.shape} does not match the target {target.shape}"
        )
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    mse = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    return {"loss": mse, "psnr": psnr(mse)}


def _field_regression(pred: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Per-example MSE (the loss) and relative L2 error ‖pred − target‖ / ‖target‖."""
    if pred.shape != target.shape:
        raise ValueError(
            f"field_regression: model output {pred.shape} does not match the target {target.shape}"
        )
    err = (pred.astype(jnp.float32) - target.astype(jnp.float32)).reshape(pred.shape[0], -1)
    ref = target.astype(jnp.float32).reshape(target.shape[0], -1)
    rel = jnp.linalg.norm(err, axis=1) / jnp.maximum(jnp.linalg.norm(ref, axis=1), 1e-12)
    return {"loss": jnp.mean(jnp.square(err), axis=1), "rel_l2": rel}


register_task(Task("classification", _classification, "accuracy"))
register_task(Task("lm", _classification, "accuracy", seq_axis=1))
# Image-to-image regression scored by PSNR (super-resolution: low-res in, high-res target out).
register_task(Task("super_resolution", _image_regression, "psnr"))
# Physical-field forecasting (surrogate simulators): MSE loss, relative L2 error reported.
register_task(Task("field_regression", _field_regression, "rel_l2", higher_is_better=False))


def _volatility(log_forecast: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Per-example squared percentage error of ``exp(log_forecast)`` against a positive target
    (the loss; its mean is the MSPE, whose root is the RMSPE of Lensky & Hao) and the absolute
    percentage error."""
    if log_forecast.shape != target.shape:
        raise ValueError(f"volatility: model output {log_forecast.shape} does not match the "
                         f"target {target.shape}")  # fmt: skip
    y = target.astype(jnp.float32)
    pe = (jnp.exp(log_forecast.astype(jnp.float32)) - y) / jnp.maximum(y, 1e-12)
    return {"loss": jnp.square(pe), "mspe": jnp.square(pe), "ape": jnp.abs(pe)}


# Realized-volatility forecasting (order-flow images): squared percentage error, MSPE reported.
register_task(Task("volatility", _volatility, "mspe", higher_is_better=False))


def _segmentation(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per-example voxel cross-entropy (the loss), mean foreground Dice of the argmax labels
    (a class absent from both prediction and target counts as 1) and voxel accuracy; logits
    ``[B, *spatial, K]``, labels ``[B, *spatial]``."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"segmentation: logits {logits.shape} do not match labels {labels.shape} "
            "(expected [B, *spatial, K] and [B, *spatial])"
        )
    b, k = logits.shape[0], logits.shape[-1]
    ce, correct = cross_entropy(logits, labels)
    pred = jax.nn.one_hot(jnp.argmax(logits, -1).reshape(b, -1), k)[..., 1:]  # [B, N, K-1]
    true = jax.nn.one_hot(labels.reshape(b, -1), k)[..., 1:]
    inter, total = jnp.sum(pred * true, axis=1), jnp.sum(pred + true, axis=1)  # [B, K-1]
    dice = jnp.where(total > 0, 2 * inter / jnp.maximum(total, 1.0), 1.0)
    return {"loss": ce.reshape(b, -1).mean(1), "dice": dice.mean(1),
            "voxel_accuracy": correct.reshape(b, -1).mean(1)}  # fmt: skip


# Volumetric (or 2-D) semantic segmentation: voxel cross-entropy, mean foreground Dice reported.
register_task(Task("segmentation", _segmentation, "dice"))


def _diffusion(outputs: jax.Array, _targets: jax.Array) -> dict[str, jax.Array]:
    """Per-example mean squared error between a diffusion network's prediction and its target
    (v, ε or x₀), which the model returns stacked on a last axis of 2 (its objective form,
    `jaxblocks.models.diffusion_unet.DiffusionUNet` on packed images); the targets (labels) are
    already inside the model's input."""
    if outputs.ndim < 2 or outputs.shape[-1] != 2:
        raise ValueError(f"diffusion: model output must stack (prediction, target) on a last axis "
                         f"of 2, got shape {outputs.shape}")  # fmt: skip
    err = jnp.square(outputs[..., 0].astype(jnp.float32) - outputs[..., 1].astype(jnp.float32))
    mse = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return {"loss": mse, "mse": mse}


# Denoising diffusion (label-conditioned, classifier-free guidance): the model draws t, the
# noise and the label dropout itself, so the step needs no second loop; the data are images in
# [-1, 1] with the label packed as one more channel (`jaxblocks.train.data`'s diffusion_digits).
register_task(Task("diffusion", _diffusion, "mse", higher_is_better=False))


def _diffusion_distill(outputs: jax.Array, _targets: jax.Array) -> dict[str, jax.Array]:
    """A-SDM distillation (`jaxblocks.models.asdm_unet.ASDMUNet` on packed images, paper 49):
    the model returns per example [total, task MSE, output KD, feature KD]."""
    if outputs.ndim != 2 or outputs.shape[-1] != 4:
        raise ValueError(f"diffusion_distill: model output must be [B, 4] (total, mse, kd_out, "
                         f"kd_feat), got shape {outputs.shape}")  # fmt: skip
    o = outputs.astype(jnp.float32)
    return {"loss": o[:, 0], "mse": o[:, 1], "kd_out": o[:, 2], "kd_feat": o[:, 3]}


# Student ← frozen teacher distillation of a diffusion UNet (the teacher in the model's
# "teacher" collection); the main metric is the student's own objective, comparable to diffusion.
register_task(Task("diffusion_distill", _diffusion_distill, "mse", higher_is_better=False))


# Joint image completion + classification (monotone DBM, `jaxblocks.models.monotone_dbm`): the
# model returns (completed image [B, H, W, 1], class logits [B, K], pixel logits [B, H, W, L]);
# the targets pack the full image, the 0/1 observed mask and the label as three channels
# [B, H, W, 3] (`masked_digits`). The loss is the official tune_mrf's (main.py: clf_weight 0.5,
# beta 0.9999, focal gamma 2): (1 - w)·focal + w·CE, the focal term a class-balanced focal
# cross-entropy of the unobserved pixels' quantised levels, weighted per level by
# (1 - β)/(1 - β^count) over the batch and averaged with those weights (torch NLLLoss(weight)).
COMPLETION_CLF_WEIGHT = 0.5
COMPLETION_FOCAL_GAMMA = 2.0
COMPLETION_BALANCE_BETA = 0.9999


def _completion_classification(outputs, targets: jax.Array) -> dict[str, jax.Array]:
    """Per-example loss whose batch mean is the official (1 − w)·focal + w·CE; metrics:
    accuracy, the completed image's MSE on the unobserved pixels and their level accuracy."""
    image, logits, pixel_logits = outputs
    if targets.ndim != 4 or targets.shape[-1] != 3 or image.shape != targets.shape[:-1] + (1,):
        raise ValueError(
            f"completion_classification: targets must be [B, H, W, 3] (image, mask, label) "
            f"matching the image {image.shape}, got {targets.shape}"
        )
    t = targets.astype(jnp.float32)
    missing = 1.0 - t[..., 1]  # [B, H, W]
    err = jnp.square(image[..., 0].astype(jnp.float32) - t[..., 0]) * missing
    n_missing = jnp.maximum(missing.sum((1, 2)), 1.0)
    mse = err.sum((1, 2)) / n_missing
    # focal CE on the unobserved pixels' levels, class-balanced over the batch
    n_levels = pixel_logits.shape[-1]
    level = jnp.round(jnp.clip(t[..., 0], 0.0, 1.0) * (n_levels - 1)).astype(jnp.int32)
    log_p = jax.nn.log_softmax(pixel_logits.astype(jnp.float32), axis=-1)
    log_p_true = jnp.take_along_axis(log_p, level[..., None], axis=-1)[..., 0]
    focal = -((1.0 - jnp.exp(log_p_true)) ** COMPLETION_FOCAL_GAMMA) * log_p_true
    onehot = jax.nn.one_hot(level, n_levels) * missing[..., None]
    count = onehot.sum((0, 1, 2))
    beta = COMPLETION_BALANCE_BETA
    weight = jax.lax.stop_gradient(
        jnp.where(count > 0, (1.0 - beta) / (1.0 - beta ** jnp.maximum(count, 1.0)), 0.0)
    )
    w_pix = weight[level] * missing  # each unobserved pixel's level weight
    per_example = (w_pix * focal).sum((1, 2))
    focal_loss = per_example * image.shape[0] / jnp.maximum(w_pix.sum(), 1e-30)
    labels = jnp.round(t[:, 0, 0, 2]).astype(jnp.int32)
    ce, correct = cross_entropy(logits, labels)
    w = COMPLETION_CLF_WEIGHT
    level_acc = ((jnp.argmax(pixel_logits, -1) == level) * missing).sum((1, 2)) / n_missing
    return {
        "loss": (1.0 - w) * focal_loss + w * ce,
        "accuracy": correct,
        "masked_mse": mse,
        "pixel_level_accuracy": level_acc,
        "focal": focal_loss,
        "ce": ce,
    }


register_task(Task("completion_classification", _completion_classification, "accuracy"))


def si_sdr(estimate: jax.Array, reference: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Scale-invariant SDR in dB over the last axis (Le Roux et al., arXiv 1811.02508), both
    signals zero-meaned first as MossFormer2's (SpeechBrain's) ``cal_si_snr``: ``10·log10(‖αs‖²
    / ‖αs − ŝ‖²)`` with ``α = ⟨ŝ, s⟩ / ‖s‖²``; fp32."""
    est = estimate.astype(jnp.float32)
    ref = reference.astype(jnp.float32)
    est = est - est.mean(-1, keepdims=True)
    ref = ref - ref.mean(-1, keepdims=True)
    alpha = jnp.sum(est * ref, -1, keepdims=True) / (jnp.sum(ref * ref, -1, keepdims=True) + eps)
    target = alpha * ref
    noise = target - est
    return 10.0 * jnp.log10((jnp.sum(target**2, -1) + eps) / (jnp.sum(noise**2, -1) + eps))


def pit_si_sdr(estimates: jax.Array, sources: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Utterance-level permutation-invariant SI-SDR of ``estimates`` and ``sources`` ``[B, T,
    S]``: ``(mean SI-SDR over speakers of the best permutation [B], that permutation's index
    into itertools.permutations(range(S)) [B])``."""
    if estimates.shape != sources.shape or estimates.ndim != 3:
        raise ValueError(f"pit_si_sdr: estimates {estimates.shape} and sources {sources.shape} "
                         "must both be [B, T, S]")  # fmt: skip
    s = sources.shape[-1]
    pair = si_sdr(jnp.moveaxis(estimates, -1, 1)[:, :, None], jnp.moveaxis(sources, -1, 1)[:, None])
    perms = np.array(list(itertools.permutations(range(s))))  # [P, S]: estimate perm[j] -> src j
    scores = pair[:, perms, np.arange(s)].mean(-1)  # [B, P]
    best = jnp.argmax(scores, -1)
    return jnp.max(scores, -1), best


def _separation(estimates: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Per-example utterance-level PIT negative SI-SDR (the loss), the PIT SI-SDR and its
    improvement over the mixture; estimates ``[B, T, S]``, targets ``[B, T, S + 1]`` (the
    sources, then the mixture)."""
    if (
        targets.ndim != 3
        or targets.shape[:2] != estimates.shape[:2]
        or (targets.shape[-1] != estimates.shape[-1] + 1)
    ):
        raise ValueError(f"separation: targets must be [B, T, S + 1] (sources, then the mixture) "
                         f"for estimates {estimates.shape}, got {targets.shape}")  # fmt: skip
    sources, mix = targets[..., :-1], targets[..., -1:]
    sdr, _ = pit_si_sdr(estimates, sources)
    base = si_sdr(jnp.moveaxis(jnp.broadcast_to(mix, sources.shape), -1, 1),
                  jnp.moveaxis(sources, -1, 1)).mean(-1)  # fmt: skip
    return {"loss": -sdr, "si_sdr": sdr, "si_sdri": sdr - base}


# Speech separation (MossFormer2): utterance-level PIT negative SI-SDR; SI-SDR improvement over
# the mixture reported (the targets carry the mixture as a last channel, `speech_mix`).
register_task(Task("separation", _separation, "si_sdri"))


def _snr(estimate: jax.Array, reference: jax.Array, eps: float = 1e-8) -> jax.Array:
    """SNR in dB over the last axis: ``10·log10(‖s‖² / ‖s − ŝ‖²)`` (not scale-invariant); fp32."""
    est, ref = estimate.astype(jnp.float32), reference.astype(jnp.float32)
    return 10.0 * jnp.log10((jnp.sum(ref**2, -1) + eps) / (jnp.sum((ref - est) ** 2, -1) + eps))


def _enhancement(estimate: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Per-example negative SI-SDR to the clean speech (the loss), the SI-SDR, its improvement
    over the noisy input and the SNR improvement; estimate ``[B, T]``, targets ``[B, T, 2]``
    (clean, then the noisy input)."""
    if targets.ndim != 3 or targets.shape[-1] != 2 or targets.shape[:2] != estimate.shape:
        raise ValueError(f"enhancement: targets must be [B, T, 2] (clean, then noisy) for an "
                         f"estimate [B, T] = {estimate.shape}, got {targets.shape}")  # fmt: skip
    clean, noisy = targets[..., 0], targets[..., 1]
    sdr = si_sdr(estimate, clean)
    return {"loss": -sdr, "si_sdr": sdr, "si_sdri": sdr - si_sdr(noisy, clean),
            "snri": _snr(estimate, clean) - _snr(noisy, clean)}  # fmt: skip


# Speech enhancement / denoising (FRCRN, paper 59): negative SI-SDR to the clean speech; SI-SDR
# and SNR improvements over the noisy input reported (the targets carry it, `speech_noise`).
register_task(Task("enhancement", _enhancement, "si_sdri"))


def _video_fitting(pred: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """Per-frame MSE (the loss; HNeRV's README uses ``--loss L2``) and PSNR, frames in [0, 1]
    ``[B, H, W, C]``; the evaluation's mean PSNR is the per-frame PSNR averaged over frames."""
    if pred.shape != target.shape:
        raise ValueError(
            f"video_fitting: model output {pred.shape} does not match the frame {target.shape}"
        )
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    mse = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    return {"loss": mse, "psnr": psnr(mse)}


# Neural video representation (HNeRV, NeRV++): fit a network to the frames of one video
# (`moving_shapes_video`: input and target are the same frame; the test set is the same video).
register_task(Task("video_fitting", _video_fitting, "psnr"))


def average_precision(scores: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Average precision over the last axis (sklearn's step form, ties in sort order): the mean
    over weighted positives of the precision at their rank; fp32."""
    order = jnp.argsort(-scores.astype(jnp.float32), axis=-1)
    lab = jnp.take_along_axis(labels.astype(jnp.float32), order, -1)
    w = jnp.take_along_axis(weights.astype(jnp.float32), order, -1)
    tp = jnp.cumsum(lab * w, -1)
    seen = jnp.maximum(jnp.cumsum(w, -1), 1e-12)
    return jnp.sum(tp / seen * lab * w, -1) / jnp.maximum(jnp.sum(lab * w, -1), 1e-12)


def _link_prediction(outputs, weights: jax.Array) -> dict[str, jax.Array]:
    """Per-window link prediction (TGN/PRES, `jaxblocks.models.tgn`): outputs ``(logits [B, L,
    2], penalty [B])`` (positive and negative-destination logits of each event; PRES's
    memory-coherence penalty) or the logits alone, targets the events' 0/1 weights ``[B, L]``.
    Loss: the mean BCE of positives (label 1) and negatives (label 0) plus the penalty; metrics:
    accuracy of both at threshold 0 and the average precision of the window's 2L scores."""
    logits, penalty = outputs if isinstance(outputs, tuple | list) else (outputs, None)
    if logits.ndim != 3 or logits.shape[-1] != 2 or logits.shape[:2] != weights.shape:
        raise ValueError(f"link_prediction: logits must be [B, L, 2] matching the weights "
                         f"[B, L], got {logits.shape} and {weights.shape}")  # fmt: skip
    z = logits.astype(jnp.float32)
    w = weights.astype(jnp.float32)
    labels = jnp.broadcast_to(jnp.asarray([1.0, 0.0], jnp.float32), z.shape)
    bce = optax.sigmoid_binary_cross_entropy(z, labels).mean(-1)  # [B, L]
    correct = ((z > 0) == (labels > 0.5)).astype(jnp.float32).mean(-1)
    n = jnp.maximum(w.sum(1), 1e-12)
    loss = (bce * w).sum(1) / n
    if penalty is not None:
        loss = loss + penalty.astype(jnp.float32)
    b = z.shape[0]
    ap = average_precision(z.reshape(b, -1), labels.reshape(b, -1),
                           jnp.repeat(w, 2, axis=1))  # fmt: skip
    return {"loss": loss, "accuracy": (correct * w).sum(1) / n, "ap": ap}


# Temporal link prediction (TGN/PRES): each example is a window of consecutive events.
register_task(Task("link_prediction", _link_prediction, "accuracy"))


def _self_supervised(loss: jax.Array, _targets: jax.Array) -> dict[str, jax.Array]:
    """The model's own per-example loss (a self-supervised model such as
    `jaxblocks.models.byol.BYOL` draws its views and targets itself; labels are ignored) and
    the mean cosine ``1 − loss / 2`` of BYOL's ``2 − 2·cos`` loss."""
    if loss.ndim != 1:
        raise ValueError(f"self_supervised: the model must return a per-example loss [B], got "
                         f"shape {loss.shape}")  # fmt: skip
    loss = loss.astype(jnp.float32)
    return {"loss": loss, "cosine": 1.0 - loss / 2.0}


# Self-supervised pretraining (BYOL / DirectPred, paper 36): the model output is the loss.
register_task(Task("self_supervised", _self_supervised, "cosine"))


def _masked_pretraining(outputs, _targets: jax.Array) -> dict[str, jax.Array]:
    """SparK masked image modelling (`jaxblocks.analysis.spark.SparKPretrainer`, registered as
    ``spark``): the model returns ``{"pred", "target", "active"}`` (patchified reconstruction
    and input, visible patches); loss: MSE to the per-patch normalised pixels on the masked
    patches only (`spark_loss`), plus that error in pixel units. Labels are ignored."""
    if not isinstance(outputs, dict) or not {"pred", "target", "active"} <= set(outputs):
        raise ValueError("masked_pretraining: the model must return a dict with pred, target "
                         f"and active (the spark model), got {type(outputs).__name__}")  # fmt: skip
    return spark_loss(outputs["pred"], outputs["target"], outputs["active"])


# Masked image pretraining of a CNN (SparK, paper 18): labels unused; lower loss is better.
register_task(Task("masked_pretraining", _masked_pretraining, "loss", higher_is_better=False))
