"""Command line of the trainer.

``python -m jaxblocks.train --config NAME_OR_PATH[:switches] [--workdir DIR] [key=value ...]``;
``make train`` runs the default config (the ConvBN digits transfer job). ``--config`` takes a
config's name (``convbn_digits:smoke``, from any directory) or a path to a config file;
``--list-configs`` lists the shipped ones. Overrides are ``key=value``, ``--key=value`` or
``--key value`` (dotted keys, Python literals, type-checked against the default).

A config or command-line error (unknown key, bad value or choice, unknown switch, a workdir that
cannot be created) prints one line to stderr and exits with 2, before the workdir is created.
A preempted run (SIGTERM) saves a checkpoint and exits with 143 (``--preempted-exit-code``) so a
scheduler requeues it; rerunning the same command resumes.

Multi-host: pass ``--coordinator HOST:PORT --num-processes N --process-id I`` (or set
``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``); every process runs the same
command and feeds its own slice of each global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jaxblocks.train import config as config_lib
from jaxblocks.train.tasks import get_task

DEFAULT_CONFIG = os.path.join(config_lib.CONFIGS_DIR, "convbn_digits.py")
# 128 + SIGTERM, what a shell reports for a process ended by the signal schedulers send.
PREEMPTED_EXIT_CODE = 143
USAGE_ERROR_EXIT_CODE = 2
PROG = "python -m jaxblocks.train"


class UsageError(Exception):
    """A config or command-line error: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like config errors
        raise UsageError(message)


def _configs_listing() -> str:
    lines = []
    for name, path in config_lib.available_configs().items():
        summary, switches = config_lib.describe_config(path)
        sw = f" [{', '.join(switches)}]" if switches else ""
        lines.append(f"  {name}{sw}: {summary}")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train a jaxblocks model from a config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an unknown --key is a config override, never a prefix of an option
        epilog=(
            "configs (NAME [switches]: summary; use --config NAME[:switch,switch]):\n"
            + _configs_listing()
            + "\n\noverrides: key=value, --key=value or --key value, e.g. train_steps=5 "
            "--optimizer.name=lamb (see jaxblocks.configs.base.base_config for every key).\n"
            f"exit codes: 0 done; {USAGE_ERROR_EXIT_CODE} config or command-line error; "
            f"{PREEMPTED_EXIT_CODE} (or --preempted-exit-code) preempted by SIGTERM, checkpoint "
            "saved: rerun the same command to resume."
        ),
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="a config name or a config file, optionally with ':switches' "
        "(e.g. convbn_digits:smoke, large_batch:smoke,lamb, path/to/my_config.py:smoke); "
        "default: convbn_digits",
    )
    p.add_argument("--list-configs", action="store_true", help="list the configs and exit")
    p.add_argument("--workdir", default=None, help="output directory (default runs/<config>)")
    p.add_argument(
        "--preempted-exit-code",
        type=int,
        default=PREEMPTED_EXIT_CODE,
        metavar="N",
        help=f"exit code of a run stopped by SIGTERM after saving a checkpoint (default "
        f"{PREEMPTED_EXIT_CODE}, so schedulers requeue it; rerunning resumes)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if the config differs from the one saved in the workdir "
        "(the override allow_config_change=True)",
    )
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    p.add_argument("--num-processes", type=int, default=int(os.environ.get("JAX_NUM_PROCESSES", 1)))
    p.add_argument("--process-id", type=int, default=int(os.environ.get("JAX_PROCESS_ID", 0)))
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p


def split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list, list]:
    """``(argv for argparse, overrides)``: every ``--key=value`` / ``--key value`` whose key is
    not an option of ``parser`` becomes the override ``key=value``."""
    known = set(parser._option_string_actions)
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            rest += argv[i:]
            break
        name = tok.split("=", 1)[0]
        if tok.startswith("--") and name not in known:
            if "=" in tok:
                overrides.append(tok[2:])
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{tok[2:]}={argv[i + 1]}")
                i += 1
            else:
                raise UsageError(
                    f"{tok}: not an option, and a config override needs a value "
                    f"({tok}=VALUE or {tok} VALUE)"
                )
        else:
            rest.append(tok)
        i += 1
    return rest, overrides


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser()
    rest, overrides = split_overrides(parser, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    args.overrides = list(args.overrides) + overrides
    if args.allow_config_change:
        args.overrides.append("allow_config_change=True")
    return args


def load(args: argparse.Namespace, num_devices: int | None = None):
    """``(name, config)`` from the parsed arguments, validated (every stage; against
    ``num_devices`` if given). Config errors raise `UsageError`."""
    try:
        path, _ = config_lib.resolve_config(args.config)
        name = os.path.splitext(os.path.basename(path))[0]
        cfg = config_lib.load_config(args.config)
        cfg = config_lib.apply_overrides(cfg, args.overrides)
        config_lib.validate(cfg, num_devices=num_devices)
        config_lib.check_model_kwargs(cfg)
    except (KeyError, ValueError, TypeError, AttributeError, FileNotFoundError) as e:
        raise UsageError(_message(e)) from e
    return name, cfg


def _message(e: BaseException) -> str:
    # KeyError's str() is the repr of its argument; show the sentence.
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(msg).split())


def regime_notes(cfg) -> list[str]:
    """One line per stage whose step count regime adaptation changes (from -> to, and why)."""
    from jaxblocks.train import data as data_lib
    from jaxblocks.train import optim

    notes = []
    for stage, scfg in config_lib.stage_configs(cfg):
        factor = optim.regime_factor(scfg)
        if factor == 1:
            continue
        num_examples = data_lib.make_datasets(scfg)[0].num_examples
        steps = optim.total_steps(scfg, num_examples)
        o = scfg.optimizer
        notes.append(
            f"[{stage or 'train'}] regime adaptation: {steps // factor} -> {steps} steps "
            f"(x{factor} = ceil(batch_size {scfg.batch_size} / optimizer.regime_base_batch_size "
            f"{o.regime_base_batch_size}), Hoffer et al. 2017; warm-up scaled alike; "
            "optimizer.regime_adaptation=False keeps the step count)"
        )
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.list_configs:
            print(_configs_listing())
            return 0
        import jax

        if args.coordinator and args.num_processes > 1:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        name, cfg = load(args, num_devices=jax.device_count())
        workdir = args.workdir or os.path.join("runs", name)
        try:
            config_lib.check_workdir(workdir)
        except OSError as e:
            raise UsageError(f"--workdir: {_message(e)}") from e
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return USAGE_ERROR_EXIT_CODE

    from jaxblocks.train import loop

    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"config {args.config}  workdir {workdir}  devices {jax.device_count()}")
    for note in regime_notes(cfg):
        say(note)
    tables: list[str] = []
    results = loop.run(cfg, workdir, on_report=lambda name, table: tables.append(table))
    # Each stage reports its own task's metric (a pretraining stage's differs from fine-tuning's).
    stage_tasks = {name: c.task for name, c in config_lib.stage_configs(cfg)}
    for stage, res in results:
        label = stage or "train"
        if getattr(res, "preempted", False):
            say(
                f"[{label}] preempted at step {res.final_step}: checkpoint saved; rerun the same "
                f"command to resume (exit code {args.preempted_exit_code})"
            )
            return args.preempted_exit_code
        metric = get_task(stage_tasks.get(stage, cfg.task)).main_metric
        value = res.eval_metrics.get(metric, float("nan"))
        say(f"[{label}] {res.final_step} steps  test {metric} {value:.4f}  -> {res.workdir}")
    for table in tables:
        say(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
