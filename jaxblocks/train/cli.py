"""Command line of the trainer.

``python -m jaxblocks.train --config jaxblocks/configs/<name>.py[:arg] --workdir DIR [key=value]``;
``make train`` runs the default config (the ConvBN digits transfer job).

Multi-host: pass ``--coordinator HOST:PORT --num-processes N --process-id I`` (or set
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``); every process runs the same
command and feeds its own slice of each global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "convbn_digits.py")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jaxblocks.train",
        description="Train a jaxblocks model from a config file.",
    )
    p.add_argument(
        "--config",
        default=os.path.normpath(DEFAULT_CONFIG),
        help="config file, optionally with ':arg' (e.g. jaxblocks/configs/large_batch.py:smoke)",
    )
    p.add_argument("--workdir", default=None, help="output directory (default runs/<config>)")
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    p.add_argument("--num-processes", type=int, default=int(os.environ.get("JAX_NUM_PROCESSES", 1)))
    p.add_argument("--process-id", type=int, default=int(os.environ.get("JAX_PROCESS_ID", 0)))
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    if args.coordinator and args.num_processes > 1:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    from jaxblocks.train import config as config_lib
    from jaxblocks.train import loop

    cfg = config_lib.load_config(args.config)
    cfg = config_lib.apply_overrides(cfg, args.overrides)
    name = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
    workdir = args.workdir or os.path.join("runs", name)
    config_lib.check_workdir(workdir)
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"config {args.config}  workdir {workdir}  devices {jax.device_count()}")
    tables: list[str] = []
    results = loop.run(cfg, workdir, on_report=lambda name, table: tables.append(table))
    for stage, res in results:
        label = stage or "train"
        if res.preempted:
            say(f"[{label}] preempted at step {res.final_step}: checkpoint saved; rerun to resume")
            return 0
        acc = res.eval_metrics.get("accuracy", float("nan"))
        say(f"[{label}] {res.final_step} steps  test accuracy {acc:.4f}  -> {res.workdir}")
    for table in tables:
        say(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
