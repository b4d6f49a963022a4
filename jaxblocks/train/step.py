"""The jitted training and evaluation steps.

`make_train_step` returns one pure function ``(state, batch) -> (state, metrics)`` in one of three
variants, all with in-step gradient accumulation:

* ``"default"``: the (mean) loss gradient over the global batch.
* ``"agvm"``: the same update, but gradients are taken separately on two halves of the batch so
  the AGVM transform can measure each module group's gradient variance (`jaxblocks.train.agvm`).
  The trainer calls it every ``agvm.interval`` steps and the default step otherwise.
* ``"conadv"``: ConAdv (Liu et al. 2022, arXiv:2106.00221). The batch carries the next batch too;
  the step adds the loss on ``state.x_adv`` (adversarial inputs for this batch, built one step
  earlier with the then-current parameters) through the model's *auxiliary* BatchNorm, and,
  independently, builds the FGSM adversarial inputs of the next batch at the current parameters.
  The two backward passes share no data, so XLA is free to run them concurrently; this is the
  paper's point (no sequential input-gradient → weight-gradient dependency).

Gradient accumulation runs inside the step as a `lax.scan` over ``accum_steps`` microbatches
taken *strided* from the global batch (microbatch ``j`` = rows ``j, j+k, j+2k, …``), so every
microbatch keeps an equal share of every device's shard and no resharding happens. The mean of
the microbatch mean-losses equals the big-batch mean loss; with BatchNorm the statistics are per
microbatch (and running statistics are updated sequentially), as with any accumulation.

The model's non-parameter collections (`TrainState.collections`: ``batch_stats`` and whatever
else ``init`` returned) are all passed to ``apply``; in training they are ``mutable`` and come back
updated, except the backward-state collections (`BACKWARD_STATE_COLLECTIONS`, PowerNorm's ν),
whose update arrives as their cotangent (`grad_and_update`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxblocks.layers import POWER_NORM_BACKWARD_COLLECTION
from jaxblocks.train.state import TrainState
from jaxblocks.train.tasks import Task, get_task

Batch = Mapping[str, jax.Array]

# Collections whose training update arrives as their cotangent (see `grad_and_update`).
BACKWARD_STATE_COLLECTIONS: tuple[str, ...] = (POWER_NORM_BACKWARD_COLLECTION,)


def _task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def make_loss_fn(
    model: nn.Module,
    call_kwargs: Mapping[str, Any],
    backward_collections: Sequence[str] = BACKWARD_STATE_COLLECTIONS,
    task: Task | str = "classification",
    regularizer: Callable | None = None,
) -> Callable:
    """``loss_fn(params, collections, x, y, key) -> (loss, (new_collections, metrics))``.

    The loss and metrics are the means of the `Task`'s per-example metrics
    (`jaxblocks.train.tasks`); ``regularizer(params) -> (penalty, metrics)``
    (`jaxblocks.train.regularizers`) adds its penalty to the loss and its metrics to the log.

    ``collections`` are the model's non-parameter variables by name (`TrainState.collections`).
    The model is applied with all of them; those named in ``backward_collections`` are
    differentiated (their cotangent is their update, see `grad_and_update`), every other one is
    ``mutable`` and comes back updated if the model wrote it (BatchNorm statistics, counters).
    """
    call_kwargs = dict(call_kwargs)
    backward = tuple(backward_collections)
    task = _task(task)

    def loss_fn(params, collections, x, y, key, extra_kwargs=None):
        kw = dict(call_kwargs, **(extra_kwargs or {}))
        mutable = [k for k in collections if k not in backward]
        variables = {"params": params, **collections}
        if mutable:
            logits, updates = model.apply(
                variables, x, rngs={"dropout": key}, mutable=mutable, **kw
            )
            new = {k: updates.get(k, v) for k, v in collections.items()}
        else:
            logits = model.apply(variables, x, rngs={"dropout": key}, **kw)
            new = dict(collections)
        metrics = {k: v.mean() for k, v in task.metrics(logits, y).items()}
        loss = metrics["loss"]
        if regularizer is not None:
            penalty, reg_metrics = regularizer(params)
            loss = loss + penalty
            metrics = {**metrics, **reg_metrics}
        return loss, (new, metrics)

    return loss_fn


def grad_and_update(
    loss_fn: Callable,
    params,
    collections: Mapping[str, Any],
    x,
    y,
    key,
    extra_kwargs=None,
    backward_collections: Sequence[str] = BACKWARD_STATE_COLLECTIONS,
):
    """One gradient: ``(grads, new_collections, metrics)``.

    The collections in ``backward_collections`` are differentiated along with the parameters and
    their cotangent *replaces* them: a layer that keeps state its backward pass updates (a
    `jax.custom_vjp` cannot write a Flax collection) returns the new state as that cotangent
    (PowerNorm's ν, `jaxblocks.layers.PowerNorm`). It is never given to the optimizer.
    """
    backward = {k: v for k, v in collections.items() if k in tuple(backward_collections)}
    rest = {k: v for k, v in collections.items() if k not in backward}

    def f(p, bwd):
        return loss_fn(p, {**rest, **bwd}, x, y, key, extra_kwargs)

    (_, (new, m)), (g, bwd_new) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        params, backward
    )
    new = {k: bwd_new.get(k, v) for k, v in new.items()}
    return g, new, m


def _split_strided(tree: Any, k: int) -> Any:
    # [B, ...] -> [k, B/k, ...] with microbatch j = rows j, j+k, ... (sharding-preserving).
    def one(a):
        return a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(one, tree)


def accumulate(
    loss_fn: Callable, params, collections, x, y, key, accum_steps: int, extra_kwargs=None
):
    """Mean gradient over ``accum_steps`` strided microbatches (``lax.scan``).

    Returns ``(grads, new_collections, metrics)``; metrics are microbatch means, and the
    collections are threaded through the microbatches in order.
    """
    if accum_steps == 1:
        return grad_and_update(loss_fn, params, collections, x, y, key, extra_kwargs)
    xs, ys = _split_strided(x, accum_steps), _split_strided(y, accum_steps)

    def body(carry, inp):
        g_acc, coll = carry
        i, xm, ym = inp
        g, coll, m = grad_and_update(
            loss_fn, params, coll, xm, ym, jax.random.fold_in(key, i), extra_kwargs
        )
        return (jax.tree.map(jnp.add, g_acc, g), coll), m

    zeros = jax.tree.map(jnp.zeros_like, params)
    (g, coll), ms = jax.lax.scan(body, (zeros, collections), (jnp.arange(accum_steps), xs, ys))
    g = jax.tree.map(lambda a: a / accum_steps, g)
    return g, coll, jax.tree.map(jnp.mean, ms)


def _mean_of_halves(a: jax.Array) -> jax.Array:
    # Float state of the two AGVM halves is averaged; integer state (step counters) advanced
    # alike in both halves, so either half's value is the answer and the dtype is kept.
    return a.mean(0).astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a[0]


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    train_kwargs: Mapping[str, Any],
    accum_steps: int = 1,
    variant: str = "default",
    rules: Any = None,
    conadv_epsilon: float = 0.03,
    conadv_weight: float = 1.0,
    task: Task | str = "classification",
    regularizer: Callable | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the pure train step (jit it with shardings and ``donate_argnums=(0,)``).

    Batches are ``{"x": inputs, "y": targets}`` (what the `Task` scores); the ConAdv variant
    also needs ``{"x_next", "y_next"}`` (the following batch).
    """
    if variant not in ("default", "agvm", "conadv"):
        raise ValueError(f"make_train_step: variant must be default/agvm/conadv, got {variant!r}")
    loss_fn = make_loss_fn(model, train_kwargs, task=task, regularizer=regularizer)

    def step(state: TrainState, batch: Batch):
        with nn.logical_axis_rules(rules or ()):
            return _step(state, batch)

    def _step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        x, y = batch["x"], batch["y"]
        extra: dict[str, Any] = {}
        new_x_adv = state.x_adv
        if variant == "default":
            grads, coll, m = accumulate(
                loss_fn, state.params, state.collections, x, y, key, accum_steps
            )
        elif variant == "agvm":
            # Two halves, each accumulated alike; their mean is the full-batch gradient.
            halves_x, halves_y = _split_strided(x, 2), _split_strided(y, 2)
            g2, coll2, m2 = jax.vmap(
                lambda xh, yh: accumulate(
                    loss_fn, state.params, state.collections, xh, yh, key, accum_steps
                )
            )(halves_x, halves_y)
            grads = jax.tree.map(lambda a: a.mean(0), g2)
            coll = jax.tree.map(_mean_of_halves, coll2)
            m = jax.tree.map(lambda a: a.mean(0), m2)
            extra["half_grads"] = (
                jax.tree.map(lambda a: a[0], g2),
                jax.tree.map(lambda a: a[1], g2),
            )
        else:  # conadv
            g_clean, coll, m = accumulate(
                loss_fn, state.params, state.collections, x, y, key, accum_steps
            )
            g_adv, coll, m_adv = accumulate(
                loss_fn,
                state.params,
                coll,
                state.x_adv,
                y,
                jax.random.fold_in(key, 1),
                accum_steps,
                {"use_aux": True},
            )
            grads = jax.tree.map(lambda a, b: a + conadv_weight * b, g_clean, g_adv)
            m = dict(m, **{f"adv_{k}": v for k, v in m_adv.items()})
            new_x_adv = fgsm(
                loss_fn,
                state.params,
                state.collections,
                batch["x_next"],
                batch["y_next"],
                jax.random.fold_in(key, 2),
                conadv_epsilon,
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        m = dict(m)
        m["grad_norm"] = optax.tree.norm(grads)
        m["param_norm"] = optax.tree.norm(params)
        m["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            collections=coll,
            opt_state=opt_state,
            x_adv=new_x_adv,
        )
        return new_state, m

    return step


def fgsm(loss_fn: Callable, params, collections, x, y, key, epsilon: float) -> jax.Array:
    """One-step sign-gradient adversarial inputs ``x + ε·sign(∇ₓ L)`` through the auxiliary BN
    (its statistic updates are discarded: the attack must not move the running statistics)."""

    def loss_x(xx):
        return loss_fn(params, collections, xx, y, key, {"use_aux": True})[0]

    g = jax.grad(loss_x)(x)
    return jax.lax.stop_gradient(x + epsilon * jnp.sign(g)).astype(x.dtype)


def make_adv_init(
    model: nn.Module,
    train_kwargs,
    epsilon: float,
    rules: Any = None,
    task: Task | str = "classification",
) -> Callable:
    """``(state, batch) -> state`` filling ``state.x_adv`` for the very first ConAdv batch."""
    loss_fn = make_loss_fn(model, train_kwargs, task=task)

    def f(state: TrainState, batch: Batch) -> TrainState:
        with nn.logical_axis_rules(rules or ()):
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0x7FFFFFFF)
            x_adv = fgsm(
                loss_fn, state.params, state.collections, batch["x"], batch["y"], key, epsilon
            )
        return state.replace(x_adv=x_adv)

    return f


def make_eval_step(
    model: nn.Module,
    eval_kwargs: Mapping[str, Any],
    rules: Any = None,
    task: Task | str = "classification",
):
    """``(params, collections, batch) -> {metric: weighted sum, "count": weight sum}``.

    ``batch["w"]`` (0/1 per example) masks padding so the last partial batch counts exactly;
    each of the `Task`'s per-example metrics is summed with it (per token for LMs).
    """
    eval_kwargs = dict(eval_kwargs)
    task = _task(task)

    def f(params, collections, batch):
        with nn.logical_axis_rules(rules or ()):
            out = model.apply({"params": params, **collections}, batch["x"], **eval_kwargs)
        metrics = task.metrics(out, batch["y"])
        sums, count = {}, None
        for k, v in metrics.items():
            w = batch["w"].astype(jnp.float32)
            w = jnp.broadcast_to(w.reshape(w.shape + (1,) * (v.ndim - w.ndim)), v.shape)
            sums[k] = (v * w).sum()
            count = w.sum()
        return {**sums, "count": count}

    return f
