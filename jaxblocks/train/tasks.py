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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

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
