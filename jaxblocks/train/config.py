"""Experiment configs: `ml_collections.ConfigDict`s built by ``jaxblocks/configs/<name>.py``.

Every experiment file defines ``get_config(arg: str | None = None)``; ``arg`` is a comma list of
switches (``"smoke"`` shrinks everything for CPU tests). The file starts from `base_config()`,
which documents every field the trainer reads, and changes what it needs. Command-line overrides
are ``dotted.key=value`` strings parsed as Python literals and checked against the existing
field's type (an unknown key is an error, so typos do not silently do nothing).

A config may have ``stages``: a list of override dicts, each a training run of its own that
starts from the previous stage's final parameters (pretrain then transfer).
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
SCHEDULES = ("constant", "cosine", "step")
LR_SCALING = ("none", "linear", "sqrt")
FREEZE = ("none", "bn_only")
TASKS = ("classification", "lm")


def base_config() -> ml_collections.ConfigDict:
    """All trainer fields with defaults. Durations: set exactly one of ``*_steps``,
    ``*_epochs``, ``*_examples`` (the others ``-1``)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"  # one of TASKS
    c.smoke = False

    # Model: built with `jaxblocks.registry.create_model(name, **kwargs)`.
    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp_tiny"
    c.model.kwargs = ml_collections.ConfigDict()
    # Keyword arguments of the model call in training and evaluation (how a model is told its
    # mode differs: Flax-style `train=True`, ConvBN's `mode="tune"`).
    c.model.train_kwargs = ml_collections.ConfigDict({"train": True})
    c.model.eval_kwargs = ml_collections.ConfigDict({"train": False})
    # ConvBN mode context (`jaxblocks.layers.conv_bn.convbn_mode`) around training; "" = none.
    c.model.convbn_mode = ""

    # Data (see `jaxblocks.train.data.make_dataset`).
    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"  # synthetic | digits | stdlib_text
    c.data.classes = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    c.data.image_size = 8
    c.data.channels = 1
    c.data.num_examples = 512  # synthetic only
    c.data.seq_len = 32  # stdlib_text only
    c.data.max_bytes = 200_000  # stdlib_text only

    c.batch_size = 64  # global batch, split over the mesh's data × fsdp axes
    c.eval_batch_size = 128
    c.accum_steps = 1  # microbatches per step (lax.scan inside the jitted step)
    c.train_steps = 100
    c.train_epochs = -1.0
    c.train_examples = -1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # one of OPTIMIZERS
    c.optimizer.learning_rate = 0.1  # at `base_batch_size`, before the scaling rule
    c.optimizer.lr_scaling = "none"  # none | linear (B/base) | sqrt (sqrt(B/base))
    c.optimizer.base_batch_size = 256
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.0
    c.optimizer.trust_coefficient = 0.001  # LARS
    c.optimizer.grad_clip_norm = 0.0  # 0 = off
    c.optimizer.schedule = "cosine"  # one of SCHEDULES
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_epochs = -1.0
    c.optimizer.warmup_examples = -1
    c.optimizer.step_boundaries = (0.5, 0.75)  # fractions of training, "step" schedule
    c.optimizer.step_decay = 0.1
    c.optimizer.end_lr_fraction = 0.0
    # Hoffer et al. 2017 regime adaptation: scale every step count by ceil(B / regime_base_batch).
    c.optimizer.regime_adaptation = False
    c.optimizer.regime_base_batch_size = 128
    c.optimizer.freeze = "none"  # none | bn_only (Frankle et al.: train only BN scale and bias)
    # BN-only init: uniform (gamma ~ U[0, 1], the paper's), fixed, oneone, positivenegative, keep
    c.optimizer.bn_only_init = "uniform"

    # AGVM (Xue et al. 2022): per-group LR multipliers from the gradient variance.
    c.agvm = ml_collections.ConfigDict()
    c.agvm.enabled = False
    c.agvm.groups = ()  # top-level param names forming groups, in order; group 0 = the reference
    c.agvm.interval = 5
    c.agvm.start_step = 0
    c.agvm.momentum = 0.97
    # Gradients in the cosine: auto (adam for adamw/lamb, none for sgd/lars) | none | adam
    c.agvm.precondition = "auto"

    # ConAdv (Liu et al. 2022): adversarial inputs for the next batch from the stale params.
    c.conadv = ml_collections.ConfigDict()
    c.conadv.enabled = False
    c.conadv.epsilon = 0.03
    c.conadv.adv_weight = 1.0

    c.mixed_precision = False  # bf16 compute (model kwarg dtype), fp32 params and opt state

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True

    c.step_delay_s = 0.0  # sleep after each step: makes preemption tests deterministic
    c.log_every = 10
    c.eval_every = 50
    c.progress = True
    c.tensorboard = True
    c.plot = True

    c.stages = ()  # tuple of override dicts (see module docstring)
    c.transfer_reinit = ()  # top-level param names re-initialised when starting from a stage
    c.compare_convbn_modes = False  # main job: repeat the last stage in ConvBN eval mode
    return c


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Import ``path`` (a ``jaxblocks/configs/<name>.py`` file, optionally ``path:arg``) and call
    its ``get_config(arg)``."""
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(f"_jaxblocks_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config: {path!r} defines no get_config(arg)")
    return module.get_config(arg) if arg is not None else module.get_config()


def parse_switches(arg: str | None) -> set[str]:
    return {s.strip() for s in (arg or "").split(",") if s.strip()}


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    if old is None or isinstance(old, ml_collections.ConfigDict | dict):
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
        if isinstance(new, str) and new.lower() in ("true", "false", "1", "0"):
            return new.lower() in ("true", "1")
        raise ValueError(f"override {key}: expected a bool, got {new!r}")
    if isinstance(old, int) and isinstance(new, int) and not isinstance(new, bool):
        return new
    if isinstance(old, float) and isinstance(new, int | float) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, tuple | list) and isinstance(new, tuple | list):
        return tuple(new)
    if isinstance(old, str):
        return str(new)
    if type(old) is not type(new):
        raise ValueError(
            f"override {key}: expected {type(old).__name__} like the default {old!r}, got {new!r}"
        )
    return new


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Apply ``["optimizer.name=lamb", "batch_size=512", ...]`` to a copy of ``cfg``.

    Keys under ``model.kwargs``, ``model.train_kwargs`` and ``model.eval_kwargs`` may be new
    (they are passed through to the model); anywhere else an unknown key raises `KeyError`.
    """
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-")
        parts = key.split(".")
        node = cfg
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"override {key!r}: unknown config field {p!r}")
            node = node[p]
        leaf = parts[-1]
        value = _parse_value(text)
        passthrough = key.startswith(("model.kwargs.", "model.train_kwargs.", "model.eval_kwargs."))
        if leaf not in node:
            if not passthrough:
                raise KeyError(f"override {key!r}: unknown config field; known: {sorted(node)}")
            node[leaf] = value
        else:
            node[leaf] = _coerce(key, node[leaf], value)
    return cfg


def stage_configs(cfg: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """Split a staged config into ``[(stage_name, config)]`` (one unnamed stage if none)."""
    stages = list(cfg.get("stages", ()) or ())
    if not stages:
        return [("", cfg)]
    out = []
    base = ml_collections.ConfigDict(cfg.to_dict())
    base.stages = ()
    for i, st in enumerate(stages):
        st = dict(st)
        name = str(st.pop("name", f"stage{i}"))
        flat = _flatten(st)
        out.append((name, apply_overrides(base, [f"{k}={v!r}" for k, v in flat.items()])))
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict | ml_collections.ConfigDict):
            out.update(_flatten(dict(v), f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate(cfg: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Clear errors for bad configs before anything compiles."""
    from jaxblocks.registry import list_models

    if cfg.task not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS}, got {cfg.task!r}")
    if cfg.optimizer.name not in OPTIMIZERS:
        raise ValueError(
            f"config.optimizer.name: unknown optimizer {cfg.optimizer.name!r}; "
            f"choose one of {OPTIMIZERS}"
        )
    if cfg.optimizer.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule must be one of {SCHEDULES}")
    if cfg.optimizer.lr_scaling not in LR_SCALING:
        raise ValueError(f"config.optimizer.lr_scaling must be one of {LR_SCALING}")
    if cfg.optimizer.freeze not in FREEZE:
        raise ValueError(f"config.optimizer.freeze must be one of {FREEZE}")
    models = list_models()
    if cfg.model.name not in models:
        raise ValueError(f"config.model.name: unknown model {cfg.model.name!r}; known: {models}")
    if cfg.batch_size < 1 or cfg.accum_steps < 1:
        raise ValueError("config.batch_size and config.accum_steps must be >= 1")
    if cfg.batch_size % cfg.accum_steps:
        raise ValueError(
            f"config.batch_size={cfg.batch_size} is not divisible by "
            f"config.accum_steps={cfg.accum_steps}"
        )
    if workdir is not None:
        check_workdir(workdir)


def check_batch_divisible(cfg: ml_collections.ConfigDict, data_parallel: int) -> None:
    micro = cfg.batch_size // cfg.accum_steps
    if micro % data_parallel:
        raise ValueError(
            f"config.batch_size={cfg.batch_size} (microbatch {micro} with "
            f"accum_steps={cfg.accum_steps}) is not divisible by the data-parallel mesh size "
            f"data*fsdp={data_parallel}"
        )
    if cfg.eval_batch_size % data_parallel:
        raise ValueError(
            f"config.eval_batch_size={cfg.eval_batch_size} is not divisible by the data-parallel "
            f"mesh size data*fsdp={data_parallel}"
        )


def check_workdir(workdir: str) -> None:
    """Create ``workdir`` if needed and fail early (not at the first checkpoint) if it is not
    writable."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"workdir {workdir!r} cannot be created: {e}") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise PermissionError(f"workdir {workdir!r} is not writable by this user")
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"workdir {workdir!r} is not writable: {e}") from e
