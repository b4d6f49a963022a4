"""Checkpoints with orbax `CheckpointManager`, SIGTERM-triggered saving, and the resume checks.

Two items per step directory: ``state`` (the sharded `TrainState`, `StandardSave`) and ``data``
(the data position as JSON). Saves are asynchronous (training continues while tensorstore writes)
and keep the last ``keep`` steps; a step is written at most once (a preemption save on a step the
interval already saved is a no-op). Restores go into an abstract state whose leaves carry the
*current* run's shardings (`jax.ShapeDtypeStruct(..., sharding=...)`), so a checkpoint written on
8 devices restores onto 4 (or 1) and is resharded on read.

Resuming is defensive:

* Before reading arrays, the checkpoint's tree (paths and shapes, from its metadata) is compared
  with the model's; a difference raises `CheckpointMismatchError` naming each parameter path and
  both shapes.
* A checkpoint that cannot be read (an empty step directory, truncated metadata, truncated array
  files) is skipped for the newest older one that restores; the skipped one is renamed aside to
  ``<step>.corrupt-<n>`` (the manager ignores it; it is kept for inspection) and one line says
  which and why. If no checkpoint restores, `CorruptCheckpointError` lists them all and nothing is
  renamed.
* `save_config` writes the resolved config to ``workdir/config.json`` when a run starts fresh;
  `check_config` compares it with the config of a resumed run: a difference in a field that
  changes the run raises `ConfigChangedError` listing each key with its old and new value, unless
  the config sets ``allow_config_change=True``. Fields that do not change the run
  (`RESUME_FREE_FIELDS`) may differ.

`PreemptionGuard` turns SIGTERM (what schedulers and `kill` send) into a flag the loop polls
after each step; the loop then saves (once) and returns normally with ``preempted=True``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"

# Config fields (dotted prefixes) that may differ between a checkpoint's run and its resumption:
# they change what is logged, evaluated or kept, or where the run is placed, never the trajectory
# of the train state (resume is exact across them, the mesh up to reduction order).
RESUME_FREE_FIELDS = (
    "allow_config_change",
    "log_every",  # logging cadence
    "progress",  # progress bar or log lines
    "tensorboard",
    "plot",
    "eval_every",  # evaluation reads the state, never writes it
    "eval_batch_size",
    "reports",  # run after the last stage
    "step_delay_s",  # a test aid: sleeps between steps
    "checkpoint",  # every_steps, keep, async_save: resume is exact whenever it was saved
    "mesh",  # elastic resume onto other devices (state resharded on read)
)


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree (paths or shapes) is not the model's."""


class CorruptCheckpointError(RuntimeError):
    """No checkpoint in the directory can be restored."""


class ConfigChangedError(ValueError):
    """A resumed run's config differs from the saved one in fields that change the run."""


def _path_str(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"params/dense0/kernel": shape}`` for every array leaf of ``tree``."""
    return {
        _path_str(p): tuple(leaf.shape)
        for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(leaf, "shape")
    }


def _reason(e: BaseException, limit: int = 200) -> str:
    """One line for why reading failed: the exception type and the innermost cause (tensorstore
    chains its errors as ``CODE: outer: ...: inner [tensorstore_spec=...]``)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" [tensorstore_spec", 1)[0]
    parts = text.split(": ")
    if len(parts) > 2 and parts[0].isupper():
        text = f"{parts[0]}: {parts[-1]}"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _quiet_closed_loop_errors() -> None:
    """Drop the unraisable ``RuntimeError: Event loop is closed`` reports a failed read leaves.

    Orbax gathers its tensorstore reads on a private event loop; when one fails (a corrupt
    checkpoint) it closes the loop while the other reads are still in flight, and each of them
    later reports its callback onto the closed loop as an unraisable exception: dozens of
    tracebacks after the one-line "skipped" message. Only that exact error is dropped; every
    other unraisable exception goes to the previous hook.
    """
    prev = sys.unraisablehook
    if getattr(prev, "_jaxblocks_quiet", False):
        return

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        prev(u)

    hook._jaxblocks_quiet = True
    sys.unraisablehook = hook


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the trainer's two items.

    Args:
      directory: where step directories go (created).
      every_steps: save interval (steps divisible by it are saved, and the first step of a run
        that has no checkpoint: orbax's default `InitialSavePolicy`).
      keep: how many recent checkpoints to keep.
      async_save: write in a background thread.
    """

    def __init__(self, directory: str, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every_steps), 1),
            max_to_keep=max(int(keep), 1),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data"),
            # Registered up front so `item_metadata` can read a step before any save or restore.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_position: dict, *, force: bool = False) -> bool:
        """Save if the interval says so (or ``force``) and ``step`` is not saved yet; returns
        whether a save started."""
        if int(step) in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
            ),
            force=force,
        )

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        *,
        log: Callable[[str], None] = print,
    ) -> tuple[Any, dict] | None:
        """Restore ``step`` (default: the newest that restores) into ``abstract_state``'s shapes
        and shardings.

        Without ``step``, checkpoints that cannot be read are skipped for the newest older one
        that restores, and are then renamed aside (``<step>.corrupt-<n>``) with one ``log`` line
        each. Returns ``(state, data_position)`` or None when there is no checkpoint.

        Raises:
          CheckpointMismatchError: the checkpoint's paths or shapes are not ``abstract_state``'s.
          CorruptCheckpointError: no checkpoint restores (nothing is renamed then).
        """
        steps = [step] if step is not None else self.all_steps()[::-1]
        if not steps:
            return None
        # Before the first read, not after a failed one: the stray callbacks can reach the closed
        # loop while the failure is still unwinding to our `except`.
        _quiet_closed_loop_errors()
        skipped: list[tuple[int, str]] = []
        for s in steps:
            tree, why = self._state_metadata(s)
            if tree is not None:
                self._check_tree(s, tree, abstract_state)
                try:
                    out = self.manager.restore(
                        s,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state),
                            data=ocp.args.JsonRestore(),
                        ),
                    )
                except Exception as e:  # noqa: BLE001 - any read failure means "skip this one"
                    why = f"unreadable: {_reason(e)}"
                else:
                    self._set_aside(skipped, log)
                    return out["state"], dict(out["data"])
            skipped.append((s, why))
        lines = "\n".join(f"  step {s}: {why}" for s, why in skipped)
        raise CorruptCheckpointError(
            f"checkpoint: no checkpoint in {self.directory} restores:\n{lines}\n"
            "Nothing was renamed. If they are corrupt, move them (or the directory) aside to "
            "start over."
        )

    def _state_metadata(self, step: int) -> tuple[Any, str]:
        """``(tree of array metadata, "")`` for the ``state`` item of ``step``, or ``(None,
        why)`` when its directory is empty or its metadata (tree, array headers) is unreadable."""
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path) and not os.listdir(path):
            return None, "empty step directory"
        try:
            meta = self.manager.item_metadata(step).get("state")
        except Exception as e:  # noqa: BLE001
            _quiet_closed_loop_errors()
            return None, f"unreadable: {_reason(e)}"
        if meta is None:
            return None, "no 'state' item"
        return getattr(meta, "tree", meta), ""

    def _check_tree(self, step: int, saved_tree: Any, abstract_state: Any) -> None:
        saved = _shapes(saved_tree)
        want = _shapes(abstract_state)
        if saved == want:
            return
        problems = []
        for k in sorted(set(saved) | set(want), key=lambda k: (not k.startswith("params"), k)):
            a, b = saved.get(k), want.get(k)
            if a == b:
                continue
            if a is None:
                problems.append(f"  {k}: not in the checkpoint (model {b})")
            elif b is None:
                problems.append(f"  {k}: checkpoint {a}, not in the model")
            else:
                problems.append(f"  {k}: checkpoint {a}, model {b}")
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointMismatchError(
            f"checkpoint: step {step} in {self.directory} does not fit the model "
            f"({len(problems)} differing entries; parameter path: shapes):\n"
            + "\n".join(problems[:12])
            + more
            + "\nThe model or optimizer changed since it was saved; use a new workdir."
        )

    def _set_aside(self, skipped: list[tuple[int, str]], log: Callable[[str], None]) -> None:
        """Rename each skipped step directory to ``<step>.corrupt-<n>`` and reload the manager."""
        if not skipped:
            return
        for s, why in skipped:
            src = os.path.join(self.directory, str(s))
            n = 1
            while os.path.exists(f"{src}.corrupt-{n}"):
                n += 1
            dst = f"{src}.corrupt-{n}"
            if jax.process_index() == 0:
                os.rename(src, dst)
            log(f"checkpoint: skipped step {s} ({why}); kept as {dst}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxblocks_checkpoint_set_aside")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """The multi-host preemption sync point (jax's preemption service), if available."""
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # the service exists only under jax.distributed
            return False

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def config_to_json(cfg: ml_collections.ConfigDict | Mapping) -> dict:
    """The config as plain JSON data (tuples become lists; anything else not JSON, its repr)."""
    d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    return json.loads(json.dumps(d, default=repr, sort_keys=True))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer.learning_rate": 0.1, ...}`` (an empty dict contributes no key)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in RESUME_FREE_FIELDS)


def config_changes(saved: Mapping, cfg: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, saved value, new value)]`` for fields that change the run."""
    old, new = _flat(dict(saved)), _flat(config_to_json(cfg))
    missing = "<absent>"
    return [
        (k, old.get(k, missing), new.get(k, missing))
        for k in sorted(set(old) | set(new))
        if not _free(k) and old.get(k, missing) != new.get(k, missing)
    ]


def save_config(workdir: str, cfg: ml_collections.ConfigDict) -> str:
    """Write ``cfg`` to ``workdir/config.json`` (process 0; atomic). Returns the path."""
    path = os.path.join(workdir, CONFIG_FILE)
    if jax.process_index() == 0:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(config_to_json(cfg), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    return path


def check_config(
    workdir: str, cfg: ml_collections.ConfigDict, *, log: Callable[[str], None] = print
) -> bool:
    """Compare ``cfg`` with the config saved in ``workdir`` (resuming).

    Returns True when the saved config should be replaced (none was saved, or the run-changing
    differences are allowed by ``cfg.allow_config_change``).

    Raises:
      ConfigChangedError: fields that change the run differ and changes are not allowed.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        log(f"config: {path} not found (a workdir from an older version); saving this config")
        return True
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        log(f"config: {path} unreadable ({_reason(e)}); saving this config")
        return True
    changes = config_changes(saved, cfg)
    if not changes:
        return False
    lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in changes)
    if cfg.get("allow_config_change", False):
        log(f"config: resuming with changed fields (allow_config_change=True):\n{lines}")
        return True
    raise ConfigChangedError(
        f"config: resuming {workdir} with a config that differs from the saved one ({path}) in "
        f"fields that change the run:\n{lines}\n"
        "Set allow_config_change=True (CLI: --allow-config-change) to resume anyway, or use a "
        "new workdir."
    )


class PreemptionGuard:
    """Context manager: while active, SIGTERM sets ``.requested`` instead of killing the process.

    With ``raise_as`` (an exception class) the handler also raises it, so code that does not
    poll the flag (the report hooks) stops at once; a guard entered inside (a training stage)
    takes over until it exits. Only the main thread can install signal handlers; elsewhere the
    guard is inert.
    """

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGTERM,),
        raise_as: type[BaseException] | None = None,
    ):
        self.signals = signals
        self.raise_as = raise_as
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        self.requested = True
        if self.raise_as is not None:
            raise self.raise_as(f"signal {signum}")

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
