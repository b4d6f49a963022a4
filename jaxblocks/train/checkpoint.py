"""Checkpoints with orbax `CheckpointManager`, and SIGTERM-triggered saving.

Two items per step directory: ``state`` (the sharded `TrainState`, `StandardSave`) and ``data``
(the data position as JSON). Saves are asynchronous (training continues while tensorstore writes)
and keep the last ``keep`` steps. Restores go into an abstract state whose leaves carry the
*current* run's shardings (`jax.ShapeDtypeStruct(..., sharding=...)`), so a checkpoint written on
8 devices restores onto 4 (or 1) and is resharded on read.

`PreemptionGuard` turns SIGTERM (what schedulers and `kill` send) into a flag the loop polls
after each step; the loop then saves synchronously and returns normally.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the trainer's two items.

    Args:
      directory: where step directories go (created).
      every_steps: save interval (steps divisible by it are saved).
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
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_position: dict, *, force: bool = False) -> bool:
        """Save if the interval says so (or ``force``); returns whether a save started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
            ),
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """Restore ``step`` (default: latest) into ``abstract_state``'s shapes and shardings.

        Returns ``(state, data_position)`` or None when there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["data"])

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


class PreemptionGuard:
    """Context manager: while active, SIGTERM sets ``.requested`` instead of killing the process.

    Only the main thread can install signal handlers; elsewhere the guard is inert.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
