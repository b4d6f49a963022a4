"""The foundation `make train` job: a ConvBN ResNet on scikit-learn's digits, train then tune mode.

The transfer-learning use case of You et al., "Efficient ConvBN Blocks for Transfer Learning and
Beyond", https://arxiv.org/abs/2305.11624: a small ResNet built from `ConvBN` is trained from
scratch in **train** mode (batch statistics) on digits 0-4, then transferred to digits 5-9 with a
new classifier head in **tune** mode: BN statistics frozen, folded into the conv weights on the
fly, conv weights and BN affine parameters trainable (the same outputs and gradients as eval
mode, with less memory). Per-epoch loss and test accuracy are printed, and a final line with both
accuracies. The data ship with scikit-learn; nothing is downloaded.

Run: ``make train`` or ``python -m jaxblocks.train.convbn_digits --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxblocks.data.digits import iterate_batches, load_digits
from jaxblocks.layers.conv_bn import convbn_mode
from jaxblocks.registry import create_model

MODELS = ("resnet18", "resnet34", "resnet50")
HEAD = "fc"  # the ResNet classifier, re-initialised for the target task


@dataclasses.dataclass(frozen=True)
class DigitsJobConfig:
    """Settings of the job; every field is a command-line flag (``--pretrain-epochs`` ...)."""

    model: str = "resnet18"
    width: int = 16
    stage_sizes: tuple[int, ...] | None = None  # override the preset's blocks per stage
    image_size: int = 16
    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    target_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    pretrain_epochs: int = 6
    tune_epochs: int = 5
    batch_size: int = 32
    pretrain_lr: float = 3e-3
    tune_lr: float = 3e-3
    weight_decay: float = 1e-4
    max_steps: int | None = None  # cap on optimizer steps per phase (smoke runs)
    seed: int = 0


def _decay_mask(params: Any) -> Any:
    # No weight decay on BN affine parameters and biases (vectors).
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _make_step(model: Any, tx: optax.GradientTransformation, mode: str):
    """One jitted optimizer step in ConvBN `mode`; train mode also updates running statistics."""

    def loss_fn(params, batch_stats, x, y):
        variables = {"params": params, "batch_stats": batch_stats}
        with convbn_mode(mode):
            if mode == "train":
                logits, updates = model.apply(variables, x, mutable=["batch_stats"])
                batch_stats = updates["batch_stats"]
            else:
                logits = model.apply(variables, x)
        return _cross_entropy(logits, y), batch_stats

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def _make_accuracy(model: Any):
    @jax.jit
    def predict(variables, x):
        with convbn_mode("eval"):
            return jnp.argmax(model.apply(variables, x), axis=-1)

    def accuracy(variables, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(np.asarray(predict(variables, x)) == y))

    return accuracy


def _phase(
    name: str,
    model: Any,
    variables: dict[str, Any],
    mode: str,
    classes: Sequence[int],
    epochs: int,
    lr: float,
    cfg: DigitsJobConfig,
) -> tuple[dict[str, Any], float]:
    """Train `variables` in ConvBN `mode` on `classes`; print per-epoch loss and test accuracy."""
    load = functools.partial(load_digits, classes=classes, size=cfg.image_size, channels=1)
    x_train, y_train = load("train")
    x_test, y_test = load("test")
    steps_per_epoch = len(x_train) // cfg.batch_size
    total = epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=max(1, total // 10), decay_steps=max(total, 2)
    )
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_decay_mask)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    step = _make_step(model, tx, mode)
    accuracy = _make_accuracy(model)
    done, acc = 0, 0.0
    for epoch in range(epochs):
        t0, losses = time.perf_counter(), []
        for xb, yb in iterate_batches(x_train, y_train, cfg.batch_size, seed=cfg.seed + epoch):
            if done == total:
                break
            params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, xb, yb)
            losses.append(loss)
            done += 1
        variables = {"params": params, "batch_stats": batch_stats}
        acc = accuracy(variables, x_test, y_test)
        mean_loss = float(np.mean(jax.device_get(losses))) if losses else float("nan")
        print(
            f"{name} [{mode} mode] epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f}  "
            f"test accuracy {acc:.4f}  ({len(losses)} steps, {time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
        if done == total:
            break
    return variables, acc


def run(cfg: DigitsJobConfig) -> dict[str, float]:
    """Pretrain in train mode on the source digits, transfer in tune mode to the target digits.

    Returns:
      ``{"source_accuracy", "transfer_accuracy", "seconds"}`` (test accuracies in eval mode).
    """
    t0 = time.perf_counter()
    overrides = {} if cfg.stage_sizes is None else {"stage_sizes": tuple(cfg.stage_sizes)}
    make = functools.partial(
        create_model, cfg.model, width=cfg.width, stem="small", zero_init_residual=True, **overrides
    )
    source_model = make(num_classes=len(cfg.source_classes))
    target_model = make(num_classes=len(cfg.target_classes))
    key_source, key_target = jax.random.split(jax.random.key(cfg.seed))
    example = jnp.zeros((1, cfg.image_size, cfg.image_size, 1), jnp.float32)
    variables = source_model.init(key_source, example)
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    print(
        f"{cfg.model} (width {cfg.width}, blocks {source_model.stage_sizes}, "
        f"{n_params:,} parameters) on digits "
        f"{cfg.image_size}x{cfg.image_size}; backend {jax.default_backend()}",
        flush=True,
    )

    variables, source_acc = _phase(
        "pretrain digits " + "".join(map(str, cfg.source_classes)),
        source_model,
        variables,
        "train",
        cfg.source_classes,
        cfg.pretrain_epochs,
        cfg.pretrain_lr,
        cfg,
    )

    # Transfer: keep the pretrained backbone and its frozen BN statistics, new random head.
    fresh = target_model.init(key_target, example)
    params = {k: (fresh["params"][k] if k == HEAD else v) for k, v in variables["params"].items()}
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    _, transfer_acc = _phase(
        "transfer to digits " + "".join(map(str, cfg.target_classes)),
        target_model,
        variables,
        "tune",
        cfg.target_classes,
        cfg.tune_epochs,
        cfg.tune_lr,
        cfg,
    )
    seconds = time.perf_counter() - t0
    print(
        f"final: source_accuracy={source_acc:.4f} transfer_accuracy={transfer_acc:.4f} "
        f"seconds={seconds:.0f}",
        flush=True,
    )
    return {"source_accuracy": source_acc, "transfer_accuracy": transfer_acc, "seconds": seconds}


def _parse(argv: Sequence[str] | None) -> DigitsJobConfig:
    d = DigitsJobConfig()
    p = argparse.ArgumentParser(
        prog="jaxblocks.train.convbn_digits",
        description="ConvBN ResNet on scikit-learn digits: train mode, then tune-mode transfer.",
    )
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--width", type=int, default=d.width, help="ResNet base channels")
    p.add_argument(
        "--stage-sizes",
        type=lambda v: tuple(int(n) for n in v.split(",")),
        default=None,
        help="blocks per stage, e.g. 1,1 (default: the preset's)",
    )
    p.add_argument("--image-size", type=int, default=d.image_size, help="upsampled image side")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    p.add_argument("--tune-epochs", type=int, default=d.tune_epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr)
    p.add_argument("--tune-lr", type=float, default=d.tune_lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per phase (smoke)")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    for flag in ("width", "image_size", "pretrain_epochs", "tune_epochs", "batch_size"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.stage_sizes is not None and (not a.stage_sizes or min(a.stage_sizes) < 1):
        p.error(f"--stage-sizes must be positive block counts, got {a.stage_sizes}")
    if a.max_steps is not None and a.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {a.max_steps}")
    return dataclasses.replace(d, **{k: v for k, v in vars(a).items()})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``make train``); returns the process exit status."""
    run(_parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
