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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxblocks.train.state import TrainState

Batch = Mapping[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example softmax cross-entropy and correctness (any leading dims), fp32."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return loss, correct


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_loss_fn(model: nn.Module, call_kwargs: Mapping[str, Any]) -> Callable:
    """``loss_fn(params, batch_stats, x, y, key) -> (loss, (new_batch_stats, metrics))``."""
    call_kwargs = dict(call_kwargs)

    def loss_fn(params, batch_stats, x, y, key, extra_kwargs=None):
        kw = dict(call_kwargs, **(extra_kwargs or {}))
        if batch_stats:
            logits, updates = model.apply(
                _variables(params, batch_stats),
                x,
                rngs={"dropout": key},
                mutable=["batch_stats"],
                **kw,
            )
            new_bs = updates.get("batch_stats", batch_stats)
        else:
            logits = model.apply(_variables(params, batch_stats), x, rngs={"dropout": key}, **kw)
            new_bs = batch_stats
        loss, correct = cross_entropy(logits, y)
        return loss.mean(), (new_bs, {"loss": loss.mean(), "accuracy": correct.mean()})

    return loss_fn


def _split_strided(tree: Any, k: int) -> Any:
    # [B, ...] -> [k, B/k, ...] with microbatch j = rows j, j+k, ... (sharding-preserving).
    def one(a):
        return a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(one, tree)


def accumulate(
    loss_fn: Callable, params, batch_stats, x, y, key, accum_steps: int, extra_kwargs=None
):
    """Mean gradient over ``accum_steps`` strided microbatches (``lax.scan``).

    Returns ``(grads, new_batch_stats, metrics)``; metrics are microbatch means.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (_, (bs, m)), g = grad_fn(params, batch_stats, x, y, key, extra_kwargs)
        return g, bs, m
    xs, ys = _split_strided(x, accum_steps), _split_strided(y, accum_steps)

    def body(carry, inp):
        g_acc, bs = carry
        i, xm, ym = inp
        (_, (bs, m)), g = grad_fn(params, bs, xm, ym, jax.random.fold_in(key, i), extra_kwargs)
        return (jax.tree.map(jnp.add, g_acc, g), bs), m

    zeros = jax.tree.map(jnp.zeros_like, params)
    (g, bs), ms = jax.lax.scan(body, (zeros, batch_stats), (jnp.arange(accum_steps), xs, ys))
    g = jax.tree.map(lambda a: a / accum_steps, g)
    return g, bs, jax.tree.map(jnp.mean, ms)


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
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the pure train step (jit it with shardings and ``donate_argnums=(0,)``).

    Batches are ``{"x": inputs, "y": integer labels}``; the ConAdv variant also needs
    ``{"x_next", "y_next"}`` (the following batch).
    """
    if variant not in ("default", "agvm", "conadv"):
        raise ValueError(f"make_train_step: variant must be default/agvm/conadv, got {variant!r}")
    loss_fn = make_loss_fn(model, train_kwargs)

    def step(state: TrainState, batch: Batch):
        with nn.logical_axis_rules(rules or ()):
            return _step(state, batch)

    def _step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        x, y = batch["x"], batch["y"]
        extra: dict[str, Any] = {}
        new_x_adv = state.x_adv
        if variant == "default":
            grads, bs, m = accumulate(
                loss_fn, state.params, state.batch_stats, x, y, key, accum_steps
            )
        elif variant == "agvm":
            # Two halves, each accumulated alike; their mean is the full-batch gradient.
            halves_x, halves_y = _split_strided(x, 2), _split_strided(y, 2)
            g2, bs2, m2 = jax.vmap(
                lambda xh, yh: accumulate(
                    loss_fn, state.params, state.batch_stats, xh, yh, key, accum_steps
                )
            )(halves_x, halves_y)
            grads = jax.tree.map(lambda a: a.mean(0), g2)
            bs = jax.tree.map(lambda a: a.mean(0), bs2)
            m = jax.tree.map(lambda a: a.mean(0), m2)
            extra["half_grads"] = (
                jax.tree.map(lambda a: a[0], g2),
                jax.tree.map(lambda a: a[1], g2),
            )
        else:  # conadv
            g_clean, bs, m = accumulate(
                loss_fn, state.params, state.batch_stats, x, y, key, accum_steps
            )
            g_adv, bs, m_adv = accumulate(
                loss_fn,
                state.params,
                bs,
                state.x_adv,
                y,
                jax.random.fold_in(key, 1),
                accum_steps,
                {"use_aux": True},
            )
            grads = jax.tree.map(lambda a, b: a + conadv_weight * b, g_clean, g_adv)
            m = dict(m, adv_loss=m_adv["loss"], adv_accuracy=m_adv["accuracy"])
            new_x_adv = fgsm(
                loss_fn,
                state.params,
                state.batch_stats,
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
            batch_stats=bs,
            opt_state=opt_state,
            x_adv=new_x_adv,
        )
        return new_state, m

    return step


def fgsm(loss_fn: Callable, params, batch_stats, x, y, key, epsilon: float) -> jax.Array:
    """One-step sign-gradient adversarial inputs ``x + ε·sign(∇ₓ L)`` through the auxiliary BN
    (its statistic updates are discarded: the attack must not move the running statistics)."""

    def loss_x(xx):
        return loss_fn(params, batch_stats, xx, y, key, {"use_aux": True})[0]

    g = jax.grad(loss_x)(x)
    return jax.lax.stop_gradient(x + epsilon * jnp.sign(g)).astype(x.dtype)


def make_adv_init(model: nn.Module, train_kwargs, epsilon: float, rules: Any = None) -> Callable:
    """``(state, batch) -> state`` filling ``state.x_adv`` for the very first ConAdv batch."""
    loss_fn = make_loss_fn(model, train_kwargs)

    def f(state: TrainState, batch: Batch) -> TrainState:
        with nn.logical_axis_rules(rules or ()):
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0x7FFFFFFF)
            x_adv = fgsm(
                loss_fn, state.params, state.batch_stats, batch["x"], batch["y"], key, epsilon
            )
        return state.replace(x_adv=x_adv)

    return f


def make_eval_step(model: nn.Module, eval_kwargs: Mapping[str, Any], rules: Any = None):
    """``(params, batch_stats, batch) -> sums`` of loss, correct predictions and weights.

    ``batch["w"]`` (0/1 per example) masks padding so the last partial batch counts exactly.
    """
    eval_kwargs = dict(eval_kwargs)

    def f(params, batch_stats, batch):
        with nn.logical_axis_rules(rules or ()):
            logits = model.apply(_variables(params, batch_stats), batch["x"], **eval_kwargs)
        loss, correct = cross_entropy(logits, batch["y"])
        w = batch["w"].astype(jnp.float32)
        w = w.reshape(w.shape + (1,) * (loss.ndim - w.ndim))
        w = jnp.broadcast_to(w, loss.shape)
        return {"loss": (loss * w).sum(), "correct": (correct * w).sum(), "count": w.sum()}

    return f
