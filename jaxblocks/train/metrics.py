"""Metrics: JSON lines, TensorBoard event files (tensorboardX, no TensorFlow), a progress bar, and
a PNG of the curves at the end.

Only process 0 writes. `Progress` measures throughput from the *second* step on, so the first
step's compilation does not count towards steps/s, examples/s or the ETA (big_vision's Chrono
does the same).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Writes ``{"step", "split", **metrics}`` lines to ``workdir/metrics.jsonl`` and the same
    scalars to TensorBoard under ``workdir/tb`` (``split/name`` tags).

    ``start_step`` is the step the run starts from (the restored checkpoint's, 0 for a fresh
    run): records of later steps, written by an earlier run after its last checkpoint (killed
    before it could save again), are dropped from the JSONL file (and an unfinished last line
    with them), and TensorBoard is told to purge its events after ``start_step``, so every step
    appears once after the resumed run logs it again.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, start_step: int | None = None):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._logged: set[tuple[int, str]] = set()
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        if start_step is not None:
            self._truncate(start_step)
        self._f = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if start_step is None else int(start_step) + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)

    def _truncate(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    s, split = int(r["step"]), str(r["split"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
                if s <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                    self._logged.add((s, split))
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def logged(self, step: int, split: str) -> bool:
        """Whether a ``split`` record for ``step`` is in the file (kept or written)."""
        return (int(step), split) in self._logged

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, float]:
        vals = {k: _scalar(v) for k, v in metrics.items()}
        if not self.active:
            return vals
        self._f.write(json.dumps({"step": int(step), "split": split, **vals}) + "\n")
        self._f.flush()
        self._logged.add((int(step), split))
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(f"{split}/{k}", v, int(step))
        return vals

    def close(self) -> None:
        if not self.active:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """All JSONL records; for a step logged twice (after a resume) the last record wins."""
    if not os.path.exists(path):
        return []
    recs: dict[tuple[int, str], dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                recs[(r["step"], r["split"])] = r
    return sorted(recs.values(), key=lambda r: (r["split"], r["step"]))


class Progress:
    """A rich progress bar with steps/s, examples/s and ETA excluding the first (compiling) step.

    The bar is drawn only when ``enabled`` and both stdout and stderr are terminals. Otherwise
    (``progress=False``, output captured to a file or a pipe, as under a scheduler) each
    `update` given metrics, i.e. every ``log_every`` steps, prints one flushed line to
    ``stream`` (default stdout)::

        [train] step 20/100  loss=0.4721  51.3 steps/s  1642 ex/s  ETA 2s

    Only process 0 draws or prints.
    """

    def __init__(
        self,
        total: int,
        start: int,
        batch_size: int,
        enabled: bool = True,
        description: str = "train",
        stream: TextIO | None = None,
    ):
        self.total, self.start, self.batch_size = total, start, batch_size
        self.stream = sys.stdout if stream is None else stream
        main = jax.process_index() == 0
        self.enabled = enabled and main and _isatty(self.stream) and _isatty(sys.stderr)
        self.lines = main and not self.enabled
        self._t0: float | None = None
        self._n0 = start
        self._bar = None
        self._task = None
        self.description = description
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, completed=start, rate="")

    def rates(self, step: int) -> dict[str, float]:
        """steps/s, examples/s, ETA seconds since the first completed step."""
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._n0 = now, step
            return {}
        dt = max(now - self._t0, 1e-9)
        sps = (step - self._n0) / dt
        eta = (self.total - step) / sps if sps > 0 else math.inf
        return {"steps_per_s": sps, "examples_per_s": sps * self.batch_size, "eta_s": eta}

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> dict[str, float]:
        r = self.rates(step)
        text = ""
        if r:
            text = (
                f"{r['steps_per_s']:.1f} steps/s  {r['examples_per_s']:.0f} ex/s  "
                f"ETA {r['eta_s']:.0f}s"
            )
        shown = "  ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items())
        if self._bar is not None:
            self._bar.update(
                self._task, completed=step, rate="  ".join(filter(None, (text, shown)))
            )
        elif self.lines and metrics is not None:
            head = f"[{self.description}] step {step}/{self.total}"
            self._print("  ".join(filter(None, (head, shown, text))))
        return r

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        """One line for another split's metrics (evaluation) in line mode."""
        if self.lines:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            self._print(f"[{self.description}] step {step}/{self.total}  {split}  {shown}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def plot_curves(
    jsonl_path: str, png_path: str, title: str = "", metric: str = "accuracy"
) -> str | None:
    """Loss and ``metric`` (the task's main one) against step, train and eval, from a metrics
    JSONL file, as a PNG."""
    recs = read_metrics(jsonl_path)
    if not recs or jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("loss", metric), strict=True):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[key]) for r in recs if r["split"] == split and key in r]
            if pts:
                s, v = zip(*pts, strict=True)
                ax.plot(s, v, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
