"""The training loop: build everything from a config, train, evaluate, checkpoint, log.

`train(cfg, workdir)` runs one stage; `run(cfg, workdir)` runs every stage of a staged config
(each in ``workdir/<stage>``), the later ones starting from the previous stage's parameters.
Re-running on the same ``workdir`` resumes from the latest checkpoint, bit-for-bit: the step's
RNG is ``fold_in(seed_key, step)`` and the data order is a pure function of the step. Resuming
checks the config saved in the workdir, skips (and sets aside) unreadable checkpoints and drops
metric records past the restored step (see `train`). SIGTERM ends a stage early with a checkpoint
and ``TrainResult.preempted=True``, which callers use to tell it from a finished one.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxblocks.layers import convbn_mode
from jaxblocks.registry import create_model
from jaxblocks.train import agvm as agvm_lib
from jaxblocks.train import config as config_lib
from jaxblocks.train import data as data_lib
from jaxblocks.train import optim
from jaxblocks.train import sharding as shd
from jaxblocks.train import state as state_lib
from jaxblocks.train import step as step_lib
from jaxblocks.train.checkpoint import (
    Checkpointer,
    PreemptionGuard,
    check_config,
    save_config,
)
from jaxblocks.train.metrics import MetricWriter, Progress, plot_curves
from jaxblocks.train.regularizers import build_regularizer
from jaxblocks.train.tasks import get_task


@dataclasses.dataclass
class TrainResult:
    """What a finished (or preempted) stage hands back.

    Attributes:
      state: the final `TrainState`.
      final_step: the step the stage stopped at (``num_steps`` when finished).
      num_steps: the stage's total steps.
      eval_metrics: the last evaluation (``{}`` when preempted before any).
      train_losses: ``{step: loss}`` for the steps logged by this call.
      preempted: True when SIGTERM (or the multi-host preemption service) stopped the stage
        early after saving a checkpoint at ``final_step``; re-running resumes from it. The CLI
        maps it to its own exit code.
      workdir: the stage's output directory.
      timings: ``build_s`` (build, compile, restore) and ``step_s`` (median step time).
    """

    state: Any
    final_step: int
    num_steps: int
    eval_metrics: dict[str, float]
    train_losses: dict[int, float]
    preempted: bool
    workdir: str
    timings: dict[str, float]


@dataclasses.dataclass
class Trainer:
    """Everything built from a config, before any step runs (useful in tests and notebooks)."""

    cfg: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model: nn.Module
    train_data: data_lib.ArrayDataset
    test_data: tuple[np.ndarray, np.ndarray]
    num_steps: int
    schedule: Any
    tx: Any
    init_fn: Any
    boxed_variables: Any
    train_kwargs: dict
    eval_kwargs: dict
    agvm_start_step: int = 0  # resolved `agvm.start_step` (-1 -> after warm-up)

    def create_state(self):
        with self.mesh_context():
            return state_lib.create_state(
                self.init_fn, self.cfg.seed, self.boxed_variables, self.mesh
            )

    def mesh_context(self):
        """The mesh, the logical axis rules and, when ``model.convbn_mode`` names a
        running-statistics mode, that `convbn_mode` context (init, train and eval steps)."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES))
        mode = self.cfg.model.convbn_mode
        if mode not in ("", "train"):
            stack.enter_context(convbn_mode(mode))
        return stack


def _model_kwargs(cfg) -> dict:
    kw = dict(cfg.model.kwargs)
    if cfg.mixed_precision:
        kw["dtype"] = jnp.bfloat16
    return kw


def _takes_train(model: nn.Module) -> bool:
    params = inspect.signature(type(model).__call__).parameters
    return "train" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def call_kwargs(model: nn.Module, convbn: str, *, training: bool) -> dict[str, Any]:
    """Keyword arguments of the model call in a train (``training``) or eval step.

    A model whose ``__call__`` takes ``train`` gets Flax-style ``train=True`` in training (batch
    statistics; the non-parameter collections are mutable) and ``train=False`` in evaluation.
    With ``model.convbn_mode`` set to a running-statistics mode (eval/tune/deploy) training also
    passes ``train=False``: ConvBN layers then take their mode from the `convbn_mode` context the
    trainer enters (``train=False`` defers to it), and plain BatchNorm layers use their running
    statistics as well. Models without a ``train`` argument get nothing.
    """
    if not _takes_train(model):
        return {}
    return {"train": training and convbn in ("", "train")}


def build(cfg: ml_collections.ConfigDict, devices=None) -> Trainer:
    """Validate ``cfg`` and build mesh, data, model, schedule, optimizer and the init function."""
    config_lib.validate(cfg)
    mesh = shd.make_mesh(dict(cfg.mesh), devices)
    config_lib.check_batch_divisible(cfg, shd.data_parallel_size(mesh))
    if cfg.agvm.enabled and cfg.conadv.enabled:
        raise ValueError("config: agvm and conadv are separate step variants; enable one")
    train_data, test_data, _ = data_lib.make_datasets(cfg)
    model_kwargs = _model_kwargs(cfg)
    if cfg.model.get("filter_bank", ""):
        from jaxblocks.layers.filter_init import named_init

        # the bank is built when the model asks for its first kernel, from the training images
        model_kwargs["first_kernel_init"] = named_init(cfg.model.filter_bank, train_data.x,
                                                       seed=cfg.seed)  # fmt: skip
    model = create_model(cfg.model.name, **model_kwargs)
    train_kwargs = call_kwargs(model, cfg.model.convbn_mode, training=True)
    eval_kwargs = call_kwargs(model, cfg.model.convbn_mode, training=False)
    num_steps = optim.total_steps(cfg, train_data.num_examples)
    schedule, group_schedules = optim.make_schedules(cfg, num_steps, train_data.num_examples)

    example = jnp.asarray(train_data.x[:1])
    key = jax.random.key(cfg.seed)
    mode_ctx = (
        convbn_mode(cfg.model.convbn_mode)
        if cfg.model.convbn_mode not in ("", "train")
        else contextlib.nullcontext()
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES), mode_ctx:
        boxed = state_lib.abstract_variables(model, key, example, eval_kwargs)
    abstract_vars = shd.strip_boxes(boxed)
    params_abs = abstract_vars["params"]
    tx = optim.make_optimizer(cfg, schedule, params=params_abs, group_schedules=group_schedules)
    agvm_start = optim.agvm_start_step(cfg, num_steps, train_data.num_examples)
    if cfg.agvm.enabled:
        groups = tuple(cfg.agvm.groups)
        if not groups:
            groups = tuple(params_abs)  # every top-level module its own group
        labels = agvm_lib.group_labels(params_abs, groups)
        tx = agvm_lib.agvm(
            tx,
            labels,
            len(groups),
            momentum=cfg.agvm.momentum,
            interval=cfg.agvm.interval,
            start_step=agvm_start,
            precondition=agvm_lib.resolve_precondition(cfg),
            b2=cfg.optimizer.get("b2", 0.999),
            eps=cfg.optimizer.get("eps", 1e-8),
        )
    pruning = optim.pruning_transform(cfg, num_steps)
    if pruning is not None:  # last: the masks apply to the final update
        tx = optax.chain(tx, pruning)
    params_transform = None
    if cfg.optimizer.freeze == "bn_only":
        scheme = cfg.optimizer.bn_only_init
        params_transform = lambda p, coll, k: optim.bn_only_init(p, k, scheme)  # noqa: E731
    x_adv_shape = None
    if cfg.conadv.enabled:
        x_adv_shape = ((cfg.batch_size, *train_data.x.shape[1:]), train_data.x.dtype)
    init_fn = state_lib.make_init_fn(
        model, tx, example, eval_kwargs, x_adv_shape=x_adv_shape, params_transform=params_transform
    )
    return Trainer(
        cfg,
        mesh,
        model,
        train_data,
        test_data,
        num_steps,
        schedule,
        tx,
        init_fn,
        boxed,
        train_kwargs,
        eval_kwargs,
        agvm_start,
    )


def compile_steps(tr: Trainer, state_sh) -> dict[str, Any]:
    """Jitted steps with declared shardings; the state argument is donated."""
    cfg, mesh = tr.cfg, tr.mesh
    rep = shd.replicated(mesh)
    seq_axis = get_task(cfg.task).seq_axis
    x_sh = shd.batch_sharding(mesh, tr.train_data.x.ndim, seq_axis)
    y_sh = shd.batch_sharding(mesh, tr.train_data.y.ndim, seq_axis)
    batch_sh = {"x": x_sh, "y": y_sh}
    if cfg.conadv.enabled:
        batch_sh = dict(batch_sh, x_next=x_sh, y_next=y_sh)
    common = dict(
        train_kwargs=tr.train_kwargs,
        accum_steps=cfg.accum_steps,
        rules=shd.LOGICAL_AXIS_RULES,
        task=cfg.task,
    )
    variants = ["conadv"] if cfg.conadv.enabled else ["default"]
    if cfg.agvm.enabled:
        variants.append("agvm")
    steps = {}
    for v in variants:
        fn = step_lib.make_train_step(
            tr.model,
            tr.tx,
            tr.schedule,
            variant=v,
            conadv_epsilon=cfg.conadv.epsilon,
            conadv_weight=cfg.conadv.adv_weight,
            regularizer=build_regularizer(cfg),
            **common,
        )
        steps[v] = jax.jit(
            fn,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, rep),
            donate_argnums=(0,),
        )
    eval_sh = {"x": x_sh, "y": y_sh, "w": shd.batch_sharding(mesh, 1)}
    steps["eval"] = jax.jit(
        step_lib.make_eval_step(tr.model, tr.eval_kwargs, shd.LOGICAL_AXIS_RULES, cfg.task),
        in_shardings=(state_sh.params, state_sh.collections, eval_sh),
        out_shardings=rep,
    )
    if cfg.conadv.enabled:
        steps["adv_init"] = jax.jit(
            step_lib.make_adv_init(
                tr.model, tr.train_kwargs, cfg.conadv.epsilon, shd.LOGICAL_AXIS_RULES, cfg.task
            ),
            in_shardings=(state_sh, {"x": x_sh, "y": y_sh}),
            out_shardings=state_sh,
            donate_argnums=(0,),
        )
    steps["batch_shardings"] = batch_sh
    return steps


def evaluate(tr: Trainer, steps, state) -> dict[str, float]:
    """The task's metrics averaged over the whole test set (padding masked)."""
    x, y = tr.test_data
    tot: dict[str, float] = {}
    pi, pc = jax.process_index(), jax.process_count()
    seq_axis = get_task(tr.cfg.task).seq_axis
    for b in data_lib.eval_batches(x, y, tr.cfg.eval_batch_size):
        per = tr.cfg.eval_batch_size // pc
        local = {k: v[pi * per : (pi + 1) * per] for k, v in b.items()}
        gb = shd.shard_batch(local, tr.mesh, seq_axis)
        out = jax.device_get(steps["eval"](state.params, state.collections, gb))
        for k, v in out.items():
            tot[k] = tot.get(k, 0.0) + float(v)
    n = max(tot.pop("count", 0.0), 1.0)
    return {k: v / n for k, v in tot.items()}


def _global_batch(tr: Trainer, step: int) -> dict:
    pi, pc = jax.process_index(), jax.process_count()
    seq_axis = get_task(tr.cfg.task).seq_axis
    local = tr.train_data.batch(step, pi, pc)
    if tr.cfg.conadv.enabled:
        nxt = tr.train_data.batch(step + 1, pi, pc)
        local = dict(local, x_next=nxt["x"], y_next=nxt["y"])
    return shd.shard_batch(local, tr.mesh, seq_axis)


class Preempted(Exception):
    """SIGTERM while the report hooks ran (`run`): the run stops there.

    ``result`` is the preempted `TrainResult` when a report was retraining (its checkpoint is
    saved, a rerun resumes it), None when the signal came between trainings.
    """

    def __init__(self, result: TrainResult | str | None = None):
        super().__init__("preempted by SIGTERM during the reports")
        self.result = result if isinstance(result, TrainResult) else None


# True while `run` runs the report hooks: a stage they train that SIGTERM stops raises
# `Preempted` instead of returning, so the report does not go on to its next retraining.
_IN_REPORTS: contextvars.ContextVar[bool] = contextvars.ContextVar("_IN_REPORTS", default=False)


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    init_from: Any = None,
    devices=None,
    stop_after: int | None = None,
    description: str = "train",
) -> TrainResult:
    """Train one stage in ``workdir`` (resuming from its latest checkpoint if any).

    Resuming prints ``resumed from step N (workdir ...)``. It checks the config saved in
    ``workdir/config.json`` (written when the run started fresh): fields that change the run
    must be unchanged unless ``cfg.allow_config_change`` (see `checkpoint.check_config` and
    `checkpoint.RESUME_FREE_FIELDS`); a checkpoint whose parameter shapes differ from the model's
    raises `checkpoint.CheckpointMismatchError` naming them; an unreadable latest checkpoint is
    set aside for the newest one that restores (`checkpoint.Checkpointer.restore`). Records of
    ``metrics.jsonl`` (and TensorBoard events) after the restored step are dropped, so each
    step appears once.

    SIGTERM (preemption) at any point of the stage stops it after the current step: the state
    is saved once (unless that step was already saved) and the result has ``preempted=True``
    and ``final_step`` the step it stopped at. Callers tell a preempted stage from a finished
    one by ``result.preempted`` (the CLI exits with a distinct code so schedulers requeue it);
    re-running on the same workdir resumes.

    Without a terminal (or with ``cfg.progress=False``) a line with the loss and throughput is
    printed every ``cfg.log_every`` steps (`metrics.Progress`).

    Args:
      cfg: a (single-stage) config.
      workdir: output directory: ``checkpoints/``, ``config.json``, ``metrics.jsonl``, ``tb/``,
        ``curves.png``.
      init_from: a variables dict ``{"params": ..., **collections}`` to start from (transfer),
        ignored when resuming; leaves are copied where path and shape match.
      devices: restrict the mesh to these devices (tests).
      stop_after: stop (with a checkpoint) after this many steps of this call (tests).
      description: progress-bar label.

    Returns:
      A `TrainResult`; ``preempted`` says whether SIGTERM stopped the stage early.
    """
    config_lib.check_workdir(workdir)
    t_build = time.perf_counter()
    with PreemptionGuard() as guard:  # from here on, SIGTERM stops the stage cleanly
        tr = build(cfg, devices)
        ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            cfg.checkpoint.every_steps,
            cfg.checkpoint.keep,
            cfg.checkpoint.async_save,
        )
        try:
            result = _train(
                cfg, tr, workdir, ckpt, guard, init_from, stop_after, description, t_build
            )
        finally:
            ckpt.close()
    if result.preempted and _IN_REPORTS.get():
        raise Preempted(result)  # a report's retraining: stop the whole run, not just this one
    return result


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _train(cfg, tr, workdir, ckpt, guard, init_from, stop_after, description, t_build):
    with tr.mesh_context():
        state, state_sh, abstract = state_lib.create_state(
            tr.init_fn, cfg.seed, tr.boxed_variables, tr.mesh
        )
        steps = compile_steps(tr, state_sh)
        target = state_lib.abstract_with_shardings(abstract, state_sh)
        new_config = True
        if ckpt.all_steps():
            new_config = check_config(workdir, cfg, log=_say)
        restored = ckpt.restore(target, log=_say)
        start = 0
        if restored is not None:
            state, pos = restored
            start = int(jax.device_get(state.step))
            if pos.get("step", start) != start:
                raise RuntimeError(f"checkpoint: data position {pos} disagrees with step {start}")
            _say(f"resumed from step {start} (workdir {workdir})")
        elif init_from is not None:
            state = state_lib.start_from(
                state, init_from, tuple(cfg.get("transfer_reinit", ())), state_sh
            )
        if restored is None or new_config:
            save_config(workdir, cfg)
        writer = MetricWriter(workdir, tensorboard=cfg.tensorboard, start_step=start)
        try:
            result = _loop(
                cfg, tr, ckpt, guard, writer, steps, state, start, stop_after, description, t_build
            )
        finally:
            writer.close()
    if cfg.plot and not result.preempted:
        plot_curves(
            writer.path,
            os.path.join(workdir, "curves.png"),
            title=description,
            metric=get_task(cfg.task).main_metric,
        )
    return result


def _loop(cfg, tr, ckpt, guard, writer, steps, state, start, stop_after, description, t_build):
    workdir = os.path.dirname(writer.path)
    timings: dict[str, float] = {}
    if cfg.conadv.enabled and start == 0:
        b0 = _global_batch(tr, 0)
        state = steps["adv_init"](state, {"x": b0["x"], "y": b0["y"]})
    timings["build_s"] = time.perf_counter() - t_build

    n = tr.num_steps
    end = n if stop_after is None else min(n, start + stop_after)
    progress = Progress(n, start, cfg.batch_size, enabled=cfg.progress, description=description)
    losses: dict[int, float] = {}
    # A SIGTERM while building or restoring: nothing new to save (the state is the checkpoint's
    # or a fresh initialisation).
    preempted = guard.requested
    eval_metrics: dict[str, float] = {}
    step_times: list[float] = []
    step = start
    while step < end and not preempted:
        batch = _global_batch(tr, step)
        variant = "conadv" if cfg.conadv.enabled else "default"
        if cfg.agvm.enabled and step % cfg.agvm.interval == 0 and step >= tr.agvm_start_step:
            variant = "agvm"
        logged = (step + 1) % cfg.log_every == 0 or step + 1 == end or step == start
        timed = logged and step > start  # the first step compiles
        if timed:
            # Steps dispatch asynchronously: drain the queue, so the clock times this step alone
            # (else it would also count the unlogged steps still running before it).
            jax.block_until_ready(state)
        t0 = time.perf_counter()
        state, m = steps[variant](state, batch)
        step += 1
        if logged:
            m = jax.device_get(m)
            if timed:
                step_times.append(time.perf_counter() - t0)
        r = progress.update(step, {"loss": float(m["loss"])} if logged else None)
        if logged:
            vals = writer.write(step, "train", {**m, **r})
            losses[step] = vals["loss"]
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == n):
            eval_metrics = evaluate(tr, steps, state)
            writer.write(step, "eval", eval_metrics)
            progress.log(step, "eval", eval_metrics)
        # `save` skips a step already saved, so the preemption save below never writes a step
        # the interval just saved (orbax would raise StepAlreadyExistsError).
        ckpt.save(step, state, tr.train_data.position(step), force=(step == n))
        if cfg.step_delay_s > 0:
            time.sleep(cfg.step_delay_s)
        if guard.requested or ckpt.reached_preemption(step):
            preempted = True
            ckpt.save(step, state, tr.train_data.position(step), force=True)
    if stop_after is not None and not preempted and step < n:
        ckpt.save(step, state, tr.train_data.position(step), force=True)
    progress.close()
    ckpt.wait()  # inside the guard: a second SIGTERM does not cut the last save short
    if not preempted and step == n and not eval_metrics:
        eval_metrics = evaluate(tr, steps, state)
        if not writer.logged(step, "eval"):  # a finished run re-run logs nothing twice
            writer.write(step, "eval", eval_metrics)
            progress.log(step, "eval", eval_metrics)
    if step_times:
        timings["step_s"] = float(np.median(step_times))
    return TrainResult(state, step, n, eval_metrics, losses, preempted, workdir, timings)


def run(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_report: Callable[[str, str], None] | None = None,
    **kwargs,
) -> list[tuple[str, TrainResult]]:
    """Run every stage of ``cfg`` (see `jaxblocks.train.config.stage_configs`), then the report
    hooks named in ``cfg.reports`` (`jaxblocks.train.reports`) unless a stage was preempted.

    A preempted stage (SIGTERM, see `train`) ends the run: the returned list stops at it and
    its result has ``preempted=True`` (``results[-1][1].preempted``); re-running resumes it.
    SIGTERM during the reports stops them at once (a report's own retraining saves its
    checkpoint first) and appends ``("reports", result)`` with ``preempted=True``: the
    retraining's result, or the last stage's when no retraining was running.

    Args:
      cfg: the (possibly staged) config.
      workdir: output directory; stage ``s`` writes to ``workdir/s``, reports to
        ``workdir/<report>.md``.
      on_report: called as ``on_report(name, table)`` for each report (the CLI prints them).
      **kwargs: passed to `train` (``devices``, ``stop_after``).
    """
    results: list[tuple[str, TrainResult]] = []
    prev = None
    for name, scfg in config_lib.stage_configs(cfg):
        wd = os.path.join(workdir, name) if name else workdir
        res = train(scfg, wd, init_from=prev, description=name or "train", **kwargs)
        results.append((name, res))
        if res.preempted:
            return results
        prev = res.state.variables
    if tuple(cfg.get("reports", ())):
        from jaxblocks.train import reports  # reports train through this module

        token = _IN_REPORTS.set(True)
        try:
            with PreemptionGuard(raise_as=Preempted):
                tables = reports.run_reports(cfg, workdir, results)
        except Preempted as e:
            res = e.result or dataclasses.replace(results[-1][1], preempted=True)
            _say(f"reports: stopped by SIGTERM; rerun to resume ({res.workdir})")
            results.append(("reports", res))
            return results
        finally:
            _IN_REPORTS.reset(token)
        for name, table in tables.items():
            if on_report is not None:
                on_report(name, table)
    return results
