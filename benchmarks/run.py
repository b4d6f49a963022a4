"""Benchmark entry point: ``python -m benchmarks.run <name> [--quick] [--no-append]``.

Each benchmark is a module ``benchmarks/<name>.py`` with ``run(quick: bool) -> str`` returning
markdown (tables made with `benchmarks.common.table`). The result is printed and appended to
BENCHMARKS.md under a heading naming the benchmark and the machine.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import pkgutil
import sys

from benchmarks.common import machine

ROOT = pathlib.Path(__file__).resolve().parent.parent


def available() -> list[str]:
    here = pathlib.Path(__file__).parent
    skip = {"run", "common", "__init__"}
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in skip)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("name", choices=available(), help="which benchmark")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="file to append to")
    args = p.parse_args(argv)
    mod = importlib.import_module(f"benchmarks.{args.name}")
    body = mod.run(quick=args.quick)
    text = f"\n## {args.name}{' (quick)' if args.quick else ''}\n\n_{machine()}_\n\n{body}\n"
    print(text)
    if not args.no_append:
        with open(args.output, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
