"""Benchmark entry point: ``python -m benchmarks.run NAME [NAME ...] [--quick] [--append [PATH]]``.

Each benchmark is a module ``benchmarks/<name>.py`` with ``run(quick: bool) -> str`` returning
markdown (tables made with `benchmarks.common.table`). The result, under a heading naming the
benchmark and the machine, is printed; ``--append`` also appends it to the repository's
BENCHMARKS.md, ``--append PATH`` to PATH (checked writable before anything runs).

From any directory: ``python /path/to/jaxblocks/benchmarks/run.py NAME`` or
``PYTHONPATH=/path/to/jaxblocks python -m benchmarks.run NAME``; ``--list`` names the benchmarks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import pkgutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `benchmarks` importable from the repository
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402

DEFAULT_APPEND = ROOT / "BENCHMARKS.md"
_NOT_BENCHMARKS = {"run", "common", "__init__"}


def available() -> list[str]:
    """Names of the benchmarks: the modules of ``benchmarks/`` but the runner and its helpers."""
    here = pathlib.Path(__file__).resolve().parent
    return sorted(
        m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in _NOT_BENCHMARKS
    )


def load(name: str):
    """The benchmark module ``benchmarks.<name>``."""
    return importlib.import_module(f"benchmarks.{name}")


def _writable_target(parser: argparse.ArgumentParser, path: str) -> str:
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        parser.error(f"--append {path}: is a directory; give the markdown file to append to")
    if not os.path.isdir(parent):
        parser.error(f"--append {path}: directory {parent} does not exist")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        parser.error(f"--append {path}: not writable")
    return path


def main(argv: list[str] | None = None) -> int:
    names = available()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks: " + ", ".join(names),
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="which benchmark(s)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument(
        "--append",
        nargs="?",
        const=str(DEFAULT_APPEND),
        default=None,
        metavar="PATH",
        help=f"also append the result to PATH (default with no PATH: {DEFAULT_APPEND})",
    )
    # Printing only is the default now; the old flag stays accepted.
    p.add_argument("--no-append", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(names))
        return 0
    if not args.names:
        p.error(f"name a benchmark (one of {', '.join(names)}) or pass --list")
    unknown = [n for n in args.names if n not in names]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(names)}")
    if args.append and args.no_append:
        p.error("--append and --no-append contradict each other")
    target = _writable_target(p, args.append) if args.append else None
    for name in args.names:
        body = load(name).run(quick=args.quick)
        text = f"\n## {name}{' (quick)' if args.quick else ''}\n\n_{machine()}_\n\n{body}\n"
        print(text)
        if target is not None:
            with open(target, "a") as f:
                f.write(text)
            print(f"(appended to {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
