"""Experiment configs: `ml_collections.ConfigDict`s built by ``jaxblocks/configs/<name>.py``.

Every experiment file defines ``get_config(arg: str | None = None)``; ``arg`` is a comma list of
switches (``"smoke"`` shrinks everything for CPU tests). The file starts from `base_config()`
(`jaxblocks.configs.base`, re-exported here), which documents every field the trainer reads, and
changes what it needs. Command-line overrides are ``dotted.key=value`` strings parsed as Python
literals and checked against the existing field's type (an unknown key is an error, so typos do
not silently do nothing).

A config is named by its path or, for the ones shipped in ``jaxblocks/configs/``, by its name
(``convbn_digits:smoke``) from any directory (`resolve_config`). A config module may declare
``SWITCHES``, the switches its docstring documents; `load_config` rejects any other switch.

A config may have ``stages``: a list of override dicts, each a training run of its own that
starts from the previous stage's final parameters (pretrain then transfer).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

import jaxblocks.configs as configs_pkg
from jaxblocks.configs.base import (
    FREEZE,
    LR_SCALING,
    OPTIMIZERS,
    SCHEDULES,
    base_config,
    parse_switches,
)
from jaxblocks.train.data import DATASETS
from jaxblocks.train.tasks import TASKS

# The schema lives in `jaxblocks.configs.base`; the trainer and its tests read it from here too.
__all__ = [
    "DATASETS",
    "FREEZE",
    "LR_SCALING",
    "OPTIMIZERS",
    "SCHEDULES",
    "TASKS",
    "apply_overrides",
    "available_configs",
    "base_config",
    "check_batch_divisible",
    "check_known_fields",
    "check_model_kwargs",
    "check_param_groups",
    "check_workdir",
    "describe_config",
    "load_config",
    "parse_switches",
    "resolve_config",
    "stage_configs",
    "validate",
]


# The shipped experiment configs (`available_configs`); modules here that are not experiments.
CONFIGS_DIR = os.path.dirname(os.path.abspath(configs_pkg.__file__))
_NOT_EXPERIMENTS = ("__init__", "base")


def available_configs() -> dict[str, str]:
    """``{name: path}`` of every experiment config in ``jaxblocks/configs/``, sorted by name."""
    names = (
        f[:-3]
        for f in os.listdir(CONFIGS_DIR)
        if f.endswith(".py") and not f.startswith("_") and f[:-3] not in _NOT_EXPERIMENTS
    )
    return {n: os.path.join(CONFIGS_DIR, n + ".py") for n in sorted(names)}


def describe_config(path: str) -> tuple[str, tuple[str, ...] | None]:
    """``(summary, switches)`` of a config file, read without importing it: the first line of
    its module docstring and its ``SWITCHES`` tuple (None if it declares none)."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    doc = (ast.get_docstring(tree) or "").strip()
    summary = doc.splitlines()[0].strip() if doc else ""
    switches = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "SWITCHES" for t in node.targets
        ):
            switches = tuple(ast.literal_eval(node.value))
    return summary, switches


def resolve_config(spec: str) -> tuple[str, str | None]:
    """``"path[:arg]"`` or ``"name[:arg]"`` (a config in ``jaxblocks/configs/``) ->
    ``(path, arg)``; a file that exists wins over a name. `FileNotFoundError` naming the known
    configs if it is neither."""
    path, arg = spec, None
    if ":" in os.path.basename(spec):
        path, arg = spec.rsplit(":", 1)
    if os.path.isfile(path):
        return path, arg
    known = available_configs()
    name = path[:-3] if path.endswith(".py") else path
    if os.sep not in path and "/" not in path and name in known:
        return known[name], arg
    raise FileNotFoundError(
        f"config: no such file {path!r} and no config of that name; "
        f"known configs: {', '.join(known)} (or give a path to a config file)"
    )


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Import the config ``path`` (a file, or a name in ``jaxblocks/configs/``; either
    optionally ``:arg``, see `resolve_config`) and call its ``get_config(arg)``.

    A module that declares ``SWITCHES`` accepts only those switches in ``arg``.
    """
    if arg is None:
        path, arg = resolve_config(path)
    else:
        path, _ = resolve_config(path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_jaxblocks_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config: {path!r} defines no get_config(arg)")
    switches = getattr(module, "SWITCHES", None)
    if switches is not None:
        unknown = sorted(parse_switches(arg) - set(switches))
        if unknown:
            raise ValueError(
                f"config {name}: unknown switch {unknown[0]!r} in {arg!r}; "
                f"its switches are {', '.join(switches)} (comma separated)"
            )
    return module.get_config(arg) if arg is not None else module.get_config()


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


# Subtrees whose keys are free (passed through to the model factory).
PASSTHROUGH = ("model.kwargs.",)
# Fields that existed once, and what replaced them.
REMOVED_FIELDS = {
    "model.train_kwargs": "the model's mode is the one key model.convbn_mode (see base_config)",
    "model.eval_kwargs": "the model's mode is the one key model.convbn_mode (see base_config)",
    "compare_convbn_modes": "use reports=('convbn_modes',)",
}


def _removed_hint(key: str) -> str:
    for old, new in REMOVED_FIELDS.items():
        if key == old or key.startswith(old + "."):
            return f" ({old} was removed: {new})"
    return ""


def check_known_fields(cfg: ml_collections.ConfigDict) -> None:
    """`KeyError` naming the first field of ``cfg`` that `base_config` does not define (a config
    file that sets a removed or misspelled key fails here instead of being ignored)."""

    def walk(node, schema, prefix):
        for k in node:
            key = f"{prefix}{k}"
            if k not in schema:
                raise KeyError(
                    f"config: unknown config field {key!r}; known: {sorted(schema)}"
                    + _removed_hint(key)
                )
            if (key + ".").startswith(PASSTHROUGH):
                continue
            if isinstance(schema[k], ml_collections.ConfigDict):
                if not isinstance(node[k], ml_collections.ConfigDict | dict):
                    raise TypeError(f"config.{key} must be a dict of fields, got {node[k]!r}")
                walk(node[k], schema[k], key + ".")

    walk(cfg, base_config(), "")


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Apply ``["optimizer.name=lamb", "batch_size=512", ...]`` to a copy of ``cfg``.

    Keys under ``model.kwargs`` may be new (they are passed through to the model factory);
    anywhere else an unknown key raises `KeyError` (with a pointer for removed keys).
    """
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-")
        parts = key.split(".")
        node = cfg
        for i, p in enumerate(parts[:-1]):
            if p not in node:
                raise KeyError(
                    f"override {key!r}: unknown config field {p!r}"
                    + _removed_hint(".".join(parts[: i + 1]))
                )
            node = node[p]
        leaf = parts[-1]
        value = _parse_value(text)
        passthrough = key.startswith(PASSTHROUGH)
        if leaf not in node:
            if not passthrough:
                raise KeyError(
                    f"override {key!r}: unknown config field; known: {sorted(node)}"
                    + _removed_hint(key)
                )
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


def validate(
    cfg: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    num_devices: int | None = None,
) -> None:
    """Clear errors for bad configs before anything compiles (or any directory is created).

    Checks every field's choices and ranges, and with ``num_devices`` that ``mesh`` fits that
    many devices and the batch divides over it. A staged config is checked per stage
    (`stage_configs`); its durations are the stages'. `check_model_kwargs` is separate (the
    trainer's tests validate configs with free ``model.kwargs``).
    """
    from jaxblocks.registry import list_models

    check_known_fields(cfg)
    if tuple(cfg.get("stages", ()) or ()):
        for _, stage in stage_configs(cfg):
            validate(stage, num_devices=num_devices)
        if workdir is not None:
            check_workdir(workdir)
        return
    if cfg.task not in TASKS:
        raise ValueError(f"config.task must be one of {tuple(TASKS)}, got {cfg.task!r}")
    if cfg.optimizer.name not in OPTIMIZERS:
        raise ValueError(
            f"config.optimizer.name: unknown optimizer {cfg.optimizer.name!r}; "
            f"choose one of {OPTIMIZERS}"
        )
    if cfg.optimizer.schedule not in SCHEDULES:
        raise ValueError(
            f"config.optimizer.schedule must be one of {SCHEDULES}, got {cfg.optimizer.schedule!r}"
        )
    if cfg.optimizer.lr_scaling not in LR_SCALING:
        raise ValueError(
            f"config.optimizer.lr_scaling must be one of {LR_SCALING}, "
            f"got {cfg.optimizer.lr_scaling!r}"
        )
    if cfg.optimizer.freeze not in FREEZE:
        raise ValueError(
            f"config.optimizer.freeze must be one of {FREEZE}, got {cfg.optimizer.freeze!r}"
        )
    if cfg.data.name not in DATASETS:
        raise ValueError(
            f"config.data.name: unknown dataset {cfg.data.name!r}; choose one of {tuple(DATASETS)}"
        )
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
    for key in ("eval_batch_size", "log_every"):
        if cfg[key] < 1:
            raise ValueError(f"config.{key} must be >= 1, got {cfg[key]}")
    if cfg.eval_every < 0:
        raise ValueError(
            f"config.eval_every must be >= 0 (0: at the end only), got {cfg.eval_every}"
        )
    durations = {k: cfg[k] for k in ("train_steps", "train_epochs", "train_examples")}
    if sum(v >= 0 for v in durations.values()) != 1:
        raise ValueError(
            "config: set exactly one of train_steps, train_epochs, train_examples (>= 0; the "
            f"others -1), got {durations}"
        )
    if cfg.model.convbn_mode not in CONVBN_MODE_CHOICES:
        raise ValueError(
            f"config.model.convbn_mode must be one of {CONVBN_MODE_CHOICES}, "
            f"got {cfg.model.convbn_mode!r}"
        )
    if cfg.agvm.enabled and cfg.conadv.enabled:
        raise ValueError("config: agvm and conadv are separate step variants; enable one")
    check_param_groups(cfg.optimizer.param_groups)
    for name in tuple(cfg.reports):
        from jaxblocks.train.reports import REPORTS

        if name not in REPORTS:
            raise ValueError(f"config.reports: unknown report {name!r}; known: {sorted(REPORTS)}")
    if num_devices is not None:
        from jaxblocks.train import sharding

        sizes = sharding.mesh_shape(dict(cfg.mesh), num_devices)
        shape = dict(zip(sharding.MESH_AXES, sizes, strict=True))
        check_batch_divisible(cfg, math.prod(shape[a] for a in sharding.BATCH_AXES))
    if workdir is not None:
        check_workdir(workdir)


def check_model_kwargs(cfg: ml_collections.ConfigDict) -> None:
    """`ValueError` if ``model.name`` does not accept ``model.kwargs`` (of any stage): the model
    is constructed, which for a Linen module runs nothing."""
    from jaxblocks.registry import create_model

    for _, scfg in stage_configs(cfg):
        kwargs = dict(scfg.model.kwargs)
        try:
            create_model(scfg.model.name, **kwargs)
        except TypeError as e:
            raise ValueError(
                f"config.model.kwargs {kwargs} do not fit model {scfg.model.name!r}: {e}"
            ) from e


# "" and "train" are ordinary training; the others are ConvBN's running-statistics modes.
CONVBN_MODE_CHOICES = ("", "train", "eval", "tune", "deploy")
PARAM_GROUP_KEYS = ("pattern", "lr", "weight_decay")


def check_param_groups(groups: Any) -> None:
    """Clear errors for a malformed ``optimizer.param_groups`` (see `base_config`)."""
    if not isinstance(groups, tuple | list):
        raise TypeError(
            f"config.optimizer.param_groups must be a tuple of dicts, got {type(groups).__name__}"
        )
    for i, g in enumerate(groups):
        where = f"config.optimizer.param_groups[{i}]"
        if not isinstance(g, dict | ml_collections.ConfigDict):
            raise TypeError(f"{where} must be a dict with keys {PARAM_GROUP_KEYS}, got {g!r}")
        unknown = sorted(set(g) - set(PARAM_GROUP_KEYS))
        if unknown:
            raise KeyError(f"{where}: unknown keys {unknown}; allowed: {PARAM_GROUP_KEYS}")
        pattern = g.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{where}['pattern'] must be a non-empty regex string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{where}['pattern'] {pattern!r} is not a valid regex: {e}") from e
        for k in ("lr", "weight_decay"):
            v = g.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(f"{where}[{k!r}] must be a number >= 0, got {v!r}")


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
