"""The hardware check: prove each Pallas kernel on the GPU or TPU at hand, in minutes.

``python -m jaxblocks.kernels.check_hardware`` runs, for every op and every Pallas
implementation of the current platform (``pallas_gpu`` on a GPU, ``pallas_tpu`` on a TPU), at
the op's documented shapes, each case in its own subprocess with a timeout (a hung or crashing
kernel costs one case, not the session):

1. compile ``jax.value_and_grad`` of the op (a fixed random cotangent against every output) and
   time the compile;
2. run it twice and require bitwise-equal outputs and gradients (a race detector: a kernel that
   reads shared memory before another warp wrote it rarely gives the same bits twice);
3. compare the outputs and every gradient with ``xla`` (relative RMS, ``rms(a-b)/rms(b)``, at
   the tolerance of the case's dtype);
4. time the forward and the forward+backward of the kernel and of ``xla`` side by side (median
   of interleaved runs).

It then writes the validation record (``hardware_validation.json`` beside `dispatch`, one
entry per op, implementation, device kind and jax version: ``implementation=None`` picks a
Pallas kernel only where that entry says ``pass``), appends a section to BENCHMARKS.md, and
prints a summary. The default case list fits a 15-minute device window on an H100/H200.

``--dry-run`` runs the same procedure on CPU with tiny shapes and both Pallas interpreters
(``pallas_gpu`` with ``interpret=True``, ``pallas_tpu`` with the TPU interpreter) and writes
nothing unless ``--record``/``--benchmarks`` name files: CI runs it, so the check itself is
tested before the first session with hardware spends its minutes on it.

Peers (fla, mamba-ssm, FlashRNN, FlashFFTConv) are not imported here: they are in the op's
benchmark (``python -m benchmarks.run <op>``), which the hardware session runs next.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.kernels import dispatch
from jaxblocks.kernels.interpret import interpret

__all__ = [
    "CaseResult",
    "OPS",
    "cases",
    "check_case",
    "main",
    "run_checks",
    "summary_table",
    "update_record",
]

# Relative-RMS tolerance against ``xla`` by input dtype. The kernels and ``xla`` reassociate the
# same fp32 sums (chunked scans, FFT sizes), so fp32 agrees to ~1e-6 in practice; 1e-4 leaves
# room for TF32-free but differently ordered GPU reductions. bf16 inputs round intermediates
# (e.g. the GLA chunk outputs) at 8 mantissa bits.
TOLERANCE: dict[str, float] = {"float32": 1e-4, "bfloat16": 2e-2}

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One case of one op, ready to run: ``call(impl)(*arrays)`` returns the op's outputs."""

    arrays: tuple[jax.Array, ...]
    call: Callable[[str], Callable[..., Any]]
    dtype: str
    flops: float | None = None


@dataclasses.dataclass(frozen=True)
class OpCheck:
    """An op's hardware cases: ``hardware`` at documented shapes, ``dry`` tiny (interpreted)."""

    op: str
    hardware: dict[str, Callable[[], Problem]]
    dry: dict[str, Callable[[], Problem]]


def _present(args: Sequence[Any]) -> tuple[tuple[int, ...], tuple[jax.Array, ...]]:
    """Positions and values of the non-None arguments (the ones differentiated)."""
    idx = tuple(i for i, a in enumerate(args) if a is not None)
    return idx, tuple(args[i] for i in idx)


def _problem(args: Sequence[Any], fn: Callable[..., Any], dtype: Any, flops=None) -> Problem:
    """Wrap ``fn(impl, *full_args)`` so the problem's arrays are the non-None ``args``."""
    idx, arrays = _present(args)
    n = len(args)

    def call(impl: str) -> Callable[..., Any]:
        def run(*xs):
            full = [None] * n
            for i, x in zip(idx, xs, strict=True):
                full[i] = x
            return fn(impl, *full)

        return run

    return Problem(arrays, call, jnp.dtype(dtype).name, flops)


# ------------------------------------------------------------------------------------------ ops


def _gla(case) -> Callable[[], Problem]:
    from jaxblocks.kernels.gla.api import chunk_gla

    def build() -> Problem:
        q, k, v, g, h0 = case.make(0)

        def fn(impl, q, k, v, g, h0):
            return chunk_gla(
                q, k, v, g, initial_state=h0, output_final_state=True, implementation=impl
            )

        fl = case.flops() + case.flops(backward=True)
        return _problem((q, k, v, g, h0), fn, case.dtype, fl)

    return build


def _rnn(case) -> Callable[[], Problem]:
    from jaxblocks.kernels.rnn import specs
    from jaxblocks.kernels.rnn.api import flashrnn

    def build() -> Problem:
        args = specs.make_inputs(case)

        def fn(impl, wx, r, b, s):
            return flashrnn(wx, r, b, s, function=case.function, implementation=impl)

        fl = specs.flops(case) + specs.flops(case, backward=True)
        return _problem(args, fn, case.dtype, fl)

    return build


def _selective_scan(case) -> Callable[[], Problem]:
    from jaxblocks.kernels.selective_scan import specs
    from jaxblocks.kernels.selective_scan.api import selective_scan

    def build() -> Problem:
        args = specs.make_inputs(case)

        def fn(impl, *a):
            return selective_scan(*a, delta_softplus=case.softplus, implementation=impl)

        fl = specs.flops(case) + specs.flops(case, backward=True)
        return _problem(args, fn, case.dtype, fl)

    return build


def _fft_conv(case) -> Callable[[], Problem]:
    from jaxblocks.kernels.long_conv.api import fft_conv

    def build() -> Problem:
        args = case.make()

        def fn(impl, u, k, D, pre, post):
            return fft_conv(u, k, D=D, pregate=pre, postgate=post, implementation=impl)

        return _problem(args, fn, case.dtype, float(case.flops()))

    return build


def _causal_conv1d(case, activation: str | None = "silu") -> Callable[[], Problem]:
    from jaxblocks.kernels.causal_conv1d.api import causal_conv1d

    def build() -> Problem:
        args = case.make()

        def fn(impl, x, w, b):
            return causal_conv1d(x, w, b, activation, implementation=impl)

        return _problem(args, fn, case.dtype, float(case.flops()))

    return build


def _conv_bn(case) -> Callable[[], Problem]:
    from jaxblocks.kernels.conv_bn import specs
    from jaxblocks.kernels.conv_bn.api import pointwise_conv_bn

    def build() -> Problem:
        args = case.make()

        def fn(impl, x, w, scale, bias, mean, var, cb):
            return pointwise_conv_bn(
                x, w, scale, bias, mean, var, conv_bias=cb, activation=case.activation,
                implementation=impl,
            )  # fmt: skip

        m, c_in, c_out = case.m, case.c_in, case.c_out
        fl = specs.forward_flops(m, c_in, c_out) + specs.backward_flops(m, c_in, c_out)
        return _problem(args, fn, case.dtype, float(fl))

    return build


def _ops() -> dict[str, OpCheck]:
    from jaxblocks.kernels.causal_conv1d import specs as cc
    from jaxblocks.kernels.conv_bn import specs as cb
    from jaxblocks.kernels.gla import specs as gla
    from jaxblocks.kernels.long_conv import specs as lc
    from jaxblocks.kernels.rnn import specs as rnn
    from jaxblocks.kernels.rnn.cells import CELLS
    from jaxblocks.kernels.selective_scan import specs as ss

    bf16, f32 = jnp.bfloat16, jnp.float32
    return {
        "chunk_gla": OpCheck(
            "chunk_gla",
            hardware={
                "B4_T2048_H16_D128_bf16": _gla(gla.GPU_BENCHMARK_CASES[0]),
                "B2_T1000_H4_K100_V60_f32": _gla(gla.Case("hw", 2, 1000, 4, 100, 60)),
            },
            dry={"B1_T33_H2_K16_V24_f32": _gla(gla.Case("dry", 1, 33, 2, 16, 24))},
        ),
        "flashrnn": OpCheck(
            "flashrnn",
            hardware={
                f"{f}_B16_T512_N4_D64_bf16": _rnn(rnn.Case(f, 16, 512, 4, 64, bf16)) for f in CELLS
            },
            dry={f"{f}_B2_T5_N2_D16_f32": _rnn(rnn.Case(f, 2, 5, 2, 16, f32)) for f in CELLS},
        ),
        "selective_scan": OpCheck(
            "selective_scan",
            hardware={
                "b2_d768_N16_L1024_bf16": _selective_scan(ss.Case(2, 768, 16, 1024, dtype=bf16)),
                "b2_d768_N16_L1000_G4_f32": _selective_scan(ss.Case(2, 768, 16, 1000, G=4)),
            },
            dry={"b1_d8_N4_L33_f32": _selective_scan(ss.Case(1, 8, 4, 33))},
        ),
        "fft_conv": OpCheck(
            "fft_conv",
            hardware={
                # FFT size 4096, the largest the Monarch GPU kernels hold (`supports`)
                "B2_H16_L2048_bf16": _fft_conv(lc.FFTConvCase(2, 16, 2048, 2048, bf16)),
                "B1_H16_L2000_K1000_f32": _fft_conv(lc.FFTConvCase(1, 16, 2000, 1000)),
            },
            dry={"B1_H3_L7_f32": _fft_conv(lc.FFTConvCase(1, 3, 7, 7))},
        ),
        "causal_conv1d": OpCheck(
            "causal_conv1d",
            hardware={
                "B4_T4096_C512_W4_bf16": _causal_conv1d(cc.Case(4, 4096, 512, 4, bf16)),
                "B2_T1000_C333_W3_f32": _causal_conv1d(cc.Case(2, 1000, 333, 3)),
            },
            dry={"B2_T37_C20_W4_f32": _causal_conv1d(cc.Case(2, 37, 20, 4))},
        ),
        "pointwise_conv_bn": OpCheck(
            "pointwise_conv_bn",
            hardware={c.name: _conv_bn(c) for c in cb.LOWERING_CASES},
            dry={"m37_24to40_relu_cb": _conv_bn(cb.TEST_CASES[0])},
        ),
    }


OPS: tuple[str, ...] = (
    "chunk_gla",
    "flashrnn",
    "selective_scan",
    "fft_conv",
    "causal_conv1d",
    "pointwise_conv_bn",
)


def cases(op: str, *, dry_run: bool) -> dict[str, Callable[[], Problem]]:
    """The named cases of ``op`` (documented shapes, or the tiny interpreted ones)."""
    spec = _ops().get(op)
    if spec is None:
        raise ValueError(f"check_hardware: unknown op {op!r}; known: {list(OPS)}")
    return spec.dry if dry_run else spec.hardware


# ------------------------------------------------------------------------------------- checks


@dataclasses.dataclass
class CaseResult:
    """What one case of one implementation gave (JSON-serialisable)."""

    op: str
    case: str
    implementation: str
    result: str  # "pass" | "fail" | "error" | "timeout" | "unsupported"
    detail: str = ""
    compile_s: float | None = None
    bitwise_repeatable: bool | None = None
    max_rel_rms: float | None = None
    tolerance: float | None = None
    # low-precision cases: worst per-leaf rel RMS of the kernel and of xla against xla on the
    # same inputs cast to fp32 (which of the two is off, when they disagree)
    max_rel_rms_f32: float | None = None
    xla_max_rel_rms_f32: float | None = None
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    xla_fwd_ms: float | None = None
    xla_fwd_bwd_ms: float | None = None
    gflop: float | None = None


def _rel_rms(a: Any, b: Any) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    num = math.sqrt(float(np.mean((a - b) ** 2))) if a.size else 0.0
    den = math.sqrt(float(np.mean(b**2))) if b.size else 0.0
    return num / den if den > 0 else num


def _cotangent(out: Any) -> Any:
    """A fixed random (never zero) cotangent with ``out``'s structure, floats only."""
    leaves, tree = jax.tree.flatten(out)
    keys = jax.random.split(jax.random.key(7), max(len(leaves), 1))
    cts = [
        jax.random.normal(k, x.shape, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
        else None
        for k, x in zip(keys, leaves, strict=False)
    ]  # fmt: skip
    return jax.tree.unflatten(tree, cts)


def _loss(run: Callable[..., Any], ct: Any) -> Callable[..., jax.Array]:
    def loss(*xs):
        out = run(*xs)
        total = jnp.zeros((), jnp.float32)
        for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(ct), strict=False):
            if c is not None:
                total = total + jnp.vdot(o.astype(jnp.float32), c)
        return total

    return loss


def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


def _time_ms(fns: dict[str, Callable[[], Any]], iters: int) -> dict[str, float]:
    """Median wall time (ms) of each thunk, interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, f in fns.items():
            t0 = time.perf_counter()
            _block(f())
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def check_case(op: str, case: str, implementation: str, *, dry_run: bool, iters: int = 5):
    """Run the four checks of one case in this process; returns a `CaseResult`."""
    problem = cases(op, dry_run=dry_run)[case]()
    res = CaseResult(op, case, implementation, "error")
    tol = TOLERANCE[problem.dtype]
    res.tolerance = tol
    res.gflop = None if problem.flops is None else problem.flops / 1e9
    xs = problem.arrays
    argnums = tuple(range(len(xs)))
    with interpret() if dry_run else _nullcontext():
        ct = _cotangent(jax.eval_shape(problem.call("xla"), *xs))
        fwd = {n: jax.jit(problem.call(n)) for n in (implementation, "xla")}
        vg = {
            n: jax.jit(jax.value_and_grad(_loss(problem.call(n), ct), argnums=argnums))
            for n in (implementation, "xla")
        }
        # 1. compile (timed)
        t0 = time.perf_counter()
        try:
            compiled = vg[implementation].lower(*xs).compile()
        except dispatch.UnsupportedImplementationError as e:
            res.result, res.detail = "unsupported", str(e)
            return res
        res.compile_s = time.perf_counter() - t0
        # 2. twice, bitwise
        first = _block(compiled(*xs))
        second = _block(compiled(*xs))
        out_a, out_b = _block(fwd[implementation](*xs)), _block(fwd[implementation](*xs))
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(
                jax.tree.leaves((first, out_a)), jax.tree.leaves((second, out_b)), strict=True
            )
        )
        res.bitwise_repeatable = bool(same)
        # 3. against xla
        want_vg = _block(vg["xla"](*xs))
        want_out = _block(fwd["xla"](*xs))
        errs = [
            _rel_rms(a, b)
            for a, b in zip(
                jax.tree.leaves((out_a, first[1])), jax.tree.leaves((want_out, want_vg[1])),
                strict=True,
            )
        ]  # fmt: skip
        finite = all(
            bool(np.all(np.isfinite(np.asarray(jnp.asarray(a, jnp.float32)))))
            for a in jax.tree.leaves((out_a, first))
        )
        res.max_rel_rms = max(errs) if errs else 0.0
        within_xla = False  # fp32: the comparison with xla decides alone
        if problem.dtype != "float32":
            within_xla = _against_fp32(
                problem, res, ct, argnums, (out_a, first[1]), (want_out, want_vg[1])
            )
        # 4. time, side by side
        t = _time_ms(
            {
                "fwd": lambda: fwd[implementation](*xs),
                "xla_fwd": lambda: fwd["xla"](*xs),
                "fwd_bwd": lambda: compiled(*xs),
                "xla_fwd_bwd": lambda: vg["xla"](*xs),
            },
            iters,
        )
    res.fwd_ms, res.xla_fwd_ms = t["fwd"], t["xla_fwd"]
    res.fwd_bwd_ms, res.xla_fwd_bwd_ms = t["fwd_bwd"], t["xla_fwd_bwd"]
    problems = []
    if not finite:
        problems.append("non-finite outputs or gradients")
    if not same:
        problems.append("two runs gave different bits (a race?)")
    if res.max_rel_rms > tol and not within_xla:
        problems.append(
            f"max rel_rms {res.max_rel_rms:.2e} > {tol:.0e} against xla"
            + (
                ""
                if res.max_rel_rms_f32 is None
                else f"; against fp32 the kernel is off by {res.max_rel_rms_f32:.2e}, xla by "
                f"{res.xla_max_rel_rms_f32:.2e}"
            )
        )
    res.result = "fail" if problems else "pass"
    res.detail = "; ".join(problems)
    return res


# A low-precision kernel that disagrees with xla by more than the tolerance still passes when,
# leaf by leaf, it is no further from the fp32 answer than xla is (times this slack, plus an
# absolute floor): both then differ from exact by rounding, and xla is the one further off.
F32_SLACK, F32_FLOOR = 1.5, 1e-3


def _against_fp32(problem, res, ct, argnums, got, xla) -> bool:
    """Fill ``res``'s fp32 errors; True when the kernel is as close to fp32 as xla, per leaf.

    ``got`` and ``xla`` are (outputs, gradients) of the kernel and of ``xla`` on the
    low-precision inputs; the fp32 answer is ``xla`` on the inputs cast to fp32.
    """
    up = tuple(
        x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for x in problem.arrays
    )
    exact_out = _block(jax.jit(problem.call("xla"))(*up))
    exact_vg = _block(
        jax.jit(jax.value_and_grad(_loss(problem.call("xla"), ct), argnums=argnums))(*up)
    )
    exact = jax.tree.leaves((exact_out, exact_vg[1]))
    errs = lambda tree: [
        _rel_rms(a, b) for a, b in zip(jax.tree.leaves(tree), exact, strict=True)
    ]  # fmt: skip
    mine, theirs = errs(got), errs(xla)
    res.max_rel_rms_f32 = max(mine, default=0.0)
    res.xla_max_rel_rms_f32 = max(theirs, default=0.0)
    return all(m <= F32_SLACK * t + F32_FLOOR for m, t in zip(mine, theirs, strict=True))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def implementations_here(dry_run: bool) -> tuple[str, ...]:
    """The Pallas implementations to check on this platform."""
    if dry_run:
        return ("pallas_gpu", "pallas_tpu")
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return ("pallas_gpu",)
    if platform == "tpu":
        return ("pallas_tpu",)
    raise SystemExit(
        f"check_hardware: platform {platform!r} has no Pallas kernels to prove; run it on a GPU "
        "or TPU, or pass --dry-run (tiny shapes in the Pallas interpreters)"
    )


def _run_worker(op, case, impl, *, dry_run, timeout, iters) -> CaseResult:
    """One case in a fresh interpreter, so a hang or a crash costs only this case."""
    cmd = [sys.executable, "-m", "jaxblocks.kernels.check_hardware", "--worker", op, case, impl,
           "--iters", str(iters)]  # fmt: skip
    if dry_run:
        cmd.append("--dry-run")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return CaseResult(op, case, impl, "timeout", f"no result within {timeout:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return CaseResult(**json.loads(line[len("RESULT ") :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return CaseResult(op, case, impl, "error", f"exit {proc.returncode}: {' | '.join(tail)}")


def run_checks(
    ops: Sequence[str] = OPS,
    *,
    dry_run: bool = False,
    timeout: float = 240.0,
    iters: int = 5,
    log: Callable[[str], None] = print,
    on_result: Callable[[list[CaseResult]], None] | None = None,
) -> list[CaseResult]:
    """Every case of every op for each Pallas implementation here, one subprocess each.

    ``on_result(results_so_far)`` runs after each case (the CLI rewrites its ``--json`` file
    there, so a device window that closes mid-run still leaves every finished case on disk).
    """
    results = []
    for impl in implementations_here(dry_run):
        for op in ops:
            for name in cases(op, dry_run=dry_run):
                r = _run_worker(op, name, impl, dry_run=dry_run, timeout=timeout, iters=iters)
                detail = f": {r.detail}" if r.detail else ""
                log(f"{op:18s} {impl:10s} {name:30s} {r.result}{detail}")
                results.append(r)
                if on_result is not None:
                    on_result(results)
    return results


def update_record(
    results: Sequence[CaseResult], path: pathlib.Path | str, device_kind: str, date: str
) -> list[dict[str, Any]]:
    """Replace the record's entries for this device kind and jax version by ``results``' verdicts.

    An op/implementation passes only when every one of its cases passed ("unsupported" cases are
    listed but do not fail it: `supports` keeps the dispatcher away from those shapes). It is
    ``faster_than_xla`` when it passed and every timed case's forward+backward was at least as
    fast as ``xla``'s (``speedup_fwd_bwd`` = xla time / kernel time per case); only then does
    ``implementation=None`` pick it.
    """
    path = pathlib.Path(path)
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {(r.op, r.implementation) for r in results}
    kept = [
        e for e in old
        if not (
            (e.get("op"), e.get("implementation")) in keys
            and e.get("device_kind") == device_kind
            and e.get("jax") == jax.__version__
        )
    ]  # fmt: skip
    for op, impl in sorted(keys):
        mine = [r for r in results if (r.op, r.implementation) == (op, impl)]
        ok = all(r.result in ("pass", "unsupported") for r in mine) and any(
            r.result == "pass" for r in mine
        )
        speedups = {
            r.case: round(r.xla_fwd_bwd_ms / r.fwd_bwd_ms, 3)
            for r in mine
            if r.result == "pass" and r.fwd_bwd_ms and r.xla_fwd_bwd_ms is not None
        }
        kept.append(
            {
                "op": op,
                "implementation": impl,
                "device_kind": device_kind,
                "jax": jax.__version__,
                "date": date,
                "result": "pass" if ok else "fail",
                # implementation=None picks the kernel only if it is also not slower than xla
                "faster_than_xla": bool(ok and speedups and min(speedups.values()) >= 1.0),
                "speedup_fwd_bwd": speedups,
                "cases": {r.case: r.result + (f": {r.detail}" if r.detail else "") for r in mine},
            }
        )
    path.write_text(json.dumps(kept, indent=1) + "\n")
    dispatch._load_record.cache_clear()
    return kept


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def summary_table(results: Sequence[CaseResult]) -> str:
    """Markdown table of the results (times in ms; speed-ups against xla measured side by side)."""
    head = (
        "| op | implementation | case | result | compile s | bitwise | max rel RMS vs xla | "
        "vs fp32: kernel / xla | fwd ms | xla fwd ms | fwd+bwd ms | xla fwd+bwd ms | "
        "fwd+bwd speed-up |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        speed = (
            r.xla_fwd_bwd_ms / r.fwd_bwd_ms
            if r.fwd_bwd_ms and r.xla_fwd_bwd_ms is not None
            else None
        )
        bitwise = "–" if r.bitwise_repeatable is None else ("yes" if r.bitwise_repeatable else "NO")
        rows.append(
            f"| {r.op} | {r.implementation} | {r.case} | {r.result} | {_fmt(r.compile_s, '.1f')} "
            f"| {bitwise} | {_fmt(r.max_rel_rms, '.1e')} "
            f"| {_fmt(r.max_rel_rms_f32, '.1e')} / {_fmt(r.xla_max_rel_rms_f32, '.1e')} "
            f"| {_fmt(r.fwd_ms, '.3f')} "
            f"| {_fmt(r.xla_fwd_ms, '.3f')} | {_fmt(r.fwd_bwd_ms, '.3f')} "
            f"| {_fmt(r.xla_fwd_bwd_ms, '.3f')} | {_fmt(speed, '.2f')} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jaxblocks.kernels.check_hardware", description=__doc__.split("\n")[0]
    )
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, Pallas interpreters, CPU")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (default: all)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per case")
    p.add_argument("--iters", type=int, default=5, help="timed runs per implementation")
    p.add_argument("--record", default=None, help="validation record to update "
                   "(default on hardware: the package's hardware_validation.json)")  # fmt: skip
    p.add_argument("--benchmarks", default=None, help="markdown file to append the table to "
                   "(default on hardware: the repository's BENCHMARKS.md)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--worker", nargs=3, metavar=("OP", "CASE", "IMPL"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        op, case, impl = a.worker
        try:
            r = check_case(op, case, impl, dry_run=a.dry_run, iters=a.iters)
        except Exception as e:  # reported as this case's error; the parent keeps going
            r = CaseResult(op, case, impl, "error", f"{type(e).__name__}: {e}"[:2000])
        print("RESULT " + json.dumps(dataclasses.asdict(r)), flush=True)
        return 0
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            p.error(f"--ops: unknown op {o!r}; known: {', '.join(OPS)}")
    device_kind = "cpu (Pallas interpreters)" if a.dry_run else dispatch.current_device_kind()
    date = datetime.date.today().isoformat()
    t0 = time.perf_counter()
    print(f"{device_kind}, jax {jax.__version__}", flush=True)

    def save(results: Sequence[CaseResult]) -> None:
        if a.json:
            rows = [dict(dataclasses.asdict(r), device_kind=device_kind) for r in results]
            pathlib.Path(a.json).write_text(json.dumps(rows, indent=1))

    results = run_checks(
        ops, dry_run=a.dry_run, timeout=a.timeout, iters=a.iters, on_result=save,
        log=lambda line: print(line, flush=True),
    )  # fmt: skip
    table = summary_table(results)
    print(f"\n{device_kind}, jax {jax.__version__}, {time.perf_counter() - t0:.0f} s\n\n{table}")
    record = a.record or (None if a.dry_run else dispatch.HARDWARE_RECORD)
    if record is not None:
        update_record(results, record, device_kind, date)
        print(f"validation record updated: {record}")
    bench = a.benchmarks or (None if a.dry_run else BENCHMARKS_MD)
    if bench is not None:
        with open(bench, "a") as f:
            f.write(
                f"\n## Hardware check: {device_kind}, jax {jax.__version__}, {date}\n\n"
                "`python -m jaxblocks.kernels.check_hardware`: compile, two runs bitwise, "
                "outputs and every gradient against xla, times side by side (median).\n\n" + table
            )
        print(f"table appended to {bench}")
    return 0 if all(r.result in ("pass", "unsupported") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
