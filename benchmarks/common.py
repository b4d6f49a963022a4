"""Shared measuring and reporting for the benchmarks: one timing rule, one table format.

Every benchmark compares implementations side by side in one run and reports ratios to a named
baseline; absolute times are only quoted from a GPU (see BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
import os
import pathlib
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


@dataclasses.dataclass
class Measurement:
    """One implementation on one case."""

    case: str
    impl: str
    median_s: float
    temp_bytes: int | None = None
    flops: float | None = None
    extra: dict[str, str] = dataclasses.field(default_factory=dict)


def compile_stats(
    fn: Callable[..., Any], args: Sequence[Any]
) -> tuple[Any, int | None, float | None]:
    """Compile ``jax.jit(fn)`` for ``args``; return (compiled, XLA temp bytes, XLA FLOPs)."""
    compiled = jax.jit(fn).lower(*args).compile()
    temp = None
    mem = compiled.memory_analysis()
    if mem is not None:
        temp = int(mem.temp_size_in_bytes)
    flops = None
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence) and cost:  # older jax returned a list of dicts
        cost = cost[0]
    if isinstance(cost, dict) and "flops" in cost:
        flops = float(cost["flops"])
    return compiled, temp, flops


def measure(
    case: str,
    impl: str,
    fn: Callable[..., Any],
    args: Sequence[Any],
    *,
    warmup: int = 2,
    iters: int = 10,
    flops: float | None = None,
) -> Measurement:
    """Median wall time of the compiled ``fn(*args)`` (blocking on the result), plus XLA stats.

    ``flops`` overrides XLA's count (use the op's `pl.CostEstimate` formula for Pallas kernels,
    whose FLOPs XLA cannot see).
    """
    compiled, temp, xla_flops = compile_stats(fn, args)
    median_s, _ = time_compiled(compiled, args, warmup=warmup, iters=iters)
    return Measurement(case, impl, median_s, temp, flops if flops else xla_flops)


def time_compiled(compiled, args: Sequence[Any], *, warmup: int, iters: int) -> tuple[float, Any]:
    """(median wall time of ``compiled(*args)`` over ``iters`` blocking calls after ``warmup``,
    the last call's output): the timing rule of `measure`."""
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times, out = [], None
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], iters: int, *, warmup: int = 0
) -> dict[str, float]:
    """Median seconds of each blocking call ``fns[name]()``, timed in ``iters`` rounds that call
    every one once (after ``warmup`` untimed calls of each): drifting machine load, on a shared
    CPU, then hits every implementation alike. The calls may be jitted JAX (blocked on) or not
    (e.g. torch)."""
    for f in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(f())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def thunk_profile(
    compiled, args: Sequence[Any], *, runs: int = 3, warmup: int = 2
) -> list[tuple[str, float, float]]:
    """Where the time of a compiled XLA:CPU program goes: ``(HLO instruction, calls per run,
    milliseconds per run)`` for each instruction XLA:CPU executed, longest first.

    Runs ``compiled(*args)`` ``runs`` times under `jax.profiler` (after ``warmup`` untimed
    calls) and sums the trace's events by name. The names are those of
    ``compiled.as_text()`` (``ynn_fusion.8``, ``copy_bitcast_fusion.1``, ``while.3``, ...), so a
    row can be looked up in the optimized HLO. A ``while`` row includes its body's rows, and a
    thunk that runs asynchronously (an Eigen ``dot``) counts only its dispatch: read the rows as
    a breakdown, not as a sum. Profiling slows the run by a few percent; time with
    `interleaved_medians`, not with this.
    """
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        try:
            for _ in range(runs):
                jax.block_until_ready(compiled(*args))
        finally:
            jax.profiler.stop_trace()
        (trace,) = pathlib.Path(tmp).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    instructions = set(re.findall(r"%([\w.-]+) = ", compiled.as_text()))
    totals: dict[str, list[float]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in instructions:  # not Python or the runtime's own
            continue
        row = totals.setdefault(name, [0, 0.0])
        row[0] += 1
        row[1] += float(e.get("dur", 0.0))  # microseconds
    rows = [(n, c / runs, us / runs / 1e3) for n, (c, us) in totals.items()]
    return sorted(rows, key=lambda r: -r[2])


def _fmt_bytes(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def table(rows: Sequence[Measurement], baseline: str, *, show_time: bool = True) -> str:
    """Markdown table: cases × implementations, with ratios to the ``baseline`` implementation.

    Time ratio > 1 means slower than the baseline; memory ratio < 1 means less memory.
    """
    extra_cols = sorted({k for r in rows for k in r.extra})
    head = ["case", "impl"]
    if show_time:
        head += ["median time", "time / " + baseline]
    head += ["XLA temp memory", "memory / " + baseline, "GFLOP"] + extra_cols
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r.case: r for r in rows if r.impl == baseline}
    for r in rows:
        b = base.get(r.case)
        cells = [r.case, r.impl]
        if show_time:
            ratio = f"{r.median_s / b.median_s:.2f}×" if b else "–"
            cells += [_fmt_time(r.median_s), ratio]
        mratio = "–"
        if b and b.temp_bytes and r.temp_bytes is not None:
            mratio = f"{r.temp_bytes / b.temp_bytes:.2f}×"
        gflop = "–" if r.flops is None else f"{r.flops / 1e9:.2f}"
        cells += [_fmt_bytes(r.temp_bytes), mratio, gflop]
        cells += [r.extra.get(k, "") for k in extra_cols]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def machine() -> str:
    """One line naming the machine, backend and versions, for the BENCHMARKS.md entry."""
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{dev.platform.upper()} `{dev.device_kind}` ({len(jax.devices())} device(s)); "
        f"host CPU {cpu}, {os.cpu_count()} cores; jax {jax.__version__}; "
        f"{datetime.date.today().isoformat()}"
    )
