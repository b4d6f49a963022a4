"""The hardware check, dry-run on CPU: its procedure is tested before hardware spends minutes on it.

The end-to-end run covers two ops (the rest run in the same code path; the whole dry run takes
~2.5 minutes on 2 cores, too long for every CI run). The detectors are checked on purpose-built
faulty implementations: a wrong kernel must fail the comparison with xla, a nondeterministic one
the bitwise repeat, and a hung subprocess must become a timeout, not a hung check.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels import check_hardware as ch
from jaxblocks.kernels import dispatch
from jaxblocks.kernels.causal_conv1d import api as cc_api
from jaxblocks.kernels.dispatch import Implementation, cross_platform_export

CC_CASE = "B2_T37_C20_W4_f32"


def test_dry_run_end_to_end_writes_record_and_table(tmp_path, capsys):
    record, bench, js = tmp_path / "rec.json", tmp_path / "bench.md", tmp_path / "r.json"
    record.write_text(
        json.dumps(
            [
                {"op": "fft_conv", "implementation": "pallas_gpu", "device_kind": "x",
                 "jax": jax.__version__, "result": "pass"},
            ]
        )
    )  # fmt: skip
    rc = ch.main(
        ["--dry-run", "--ops", "causal_conv1d,pointwise_conv_bn", "--iters", "1",
         "--record", str(record), "--benchmarks", str(bench), "--json", str(js)]
    )  # fmt: skip
    assert rc == 0
    entries = json.loads(record.read_text())
    mine = {(e["op"], e["implementation"]): e for e in entries if e["device_kind"] != "x"}
    assert set(mine) == {
        (op, impl)
        for op in ("causal_conv1d", "pointwise_conv_bn")
        for impl in ("pallas_gpu", "pallas_tpu")
    }
    assert all(e["result"] == "pass" and e["jax"] == jax.__version__ for e in mine.values())
    # entries of other devices are kept
    assert any(e["device_kind"] == "x" for e in entries)
    results = json.loads(js.read_text())
    assert len(results) == 4
    for r in results:
        assert r["bitwise_repeatable"] is True
        assert r["max_rel_rms"] < 1e-5, r  # fp32 kernels agree with xla to ~1e-7
        assert r["compile_s"] > 0 and r["fwd_bwd_ms"] > 0 and r["xla_fwd_bwd_ms"] > 0
    table = bench.read_text()
    assert "## Hardware check: cpu (Pallas interpreters)" in table
    assert table.count("| pass |") == 4
    assert "causal_conv1d" in capsys.readouterr().out


def _patched(monkeypatch, fn):
    impls = dict(cc_api.IMPLEMENTATIONS)
    impls["pallas_gpu"] = Implementation(fn)
    monkeypatch.setattr(cc_api, "IMPLEMENTATIONS", impls)


def test_a_wrong_kernel_fails_the_comparison(monkeypatch):
    good = cc_api.IMPLEMENTATIONS["xla"].fn

    def wrong(x, w, bias, act, *, block_sizes=None, **kw):  # shifted by one step: a plausible bug
        y = good(x, w, bias, act, block_sizes=block_sizes, **kw)
        return jnp.concatenate([y[:, :1], y[:, :-1]], axis=1)

    _patched(monkeypatch, wrong)
    r = ch.check_case("causal_conv1d", CC_CASE, "pallas_gpu", dry_run=True, iters=1)
    assert r.result == "fail" and "rel_rms" in r.detail
    assert r.max_rel_rms > r.tolerance


def test_a_nondeterministic_kernel_fails_the_bitwise_repeat(monkeypatch):
    good = cc_api.IMPLEMENTATIONS["xla"].fn
    rng = np.random.default_rng(0)

    def racy(x, w, bias, act, *, block_sizes=None, **kw):  # last-bit noise, as a race leaves
        y = good(x, w, bias, act, block_sizes=block_sizes, **kw)
        noise = jax.pure_callback(
            lambda: np.float32(1 + 1e-5 * rng.standard_normal()),
            jax.ShapeDtypeStruct((), jnp.float32),
        )
        return y * noise

    _patched(monkeypatch, racy)
    r = ch.check_case("causal_conv1d", CC_CASE, "pallas_gpu", dry_run=True, iters=1)
    assert r.bitwise_repeatable is False
    assert r.result == "fail" and "different bits" in r.detail


def test_a_hung_case_becomes_a_timeout():
    r = ch._run_worker(
        "chunk_gla", "B1_T33_H2_K16_V24_f32", "pallas_tpu", dry_run=True, timeout=0.5, iters=1
    )
    assert r.result == "timeout"


def test_record_verdicts(tmp_path):
    path = tmp_path / "rec.json"
    R = ch.CaseResult
    results = [
        R("a", "c1", "pallas_gpu", "pass", fwd_bwd_ms=1.0, xla_fwd_bwd_ms=2.0),
        R("a", "c2", "pallas_gpu", "unsupported", "too big"),
        R("b", "c1", "pallas_gpu", "pass"),
        R("b", "c2", "pallas_gpu", "timeout"),
        R("c", "c1", "pallas_gpu", "unsupported"),
    ]
    entries = {e["op"]: e for e in ch.update_record(results, path, "NVIDIA H200", "2026-12-03")}
    assert entries["a"]["result"] == "pass"
    assert entries["a"]["faster_than_xla"] and entries["a"]["speedup_fwd_bwd"] == {"c1": 2.0}
    assert not entries["b"]["faster_than_xla"]
    assert entries["b"]["result"] == "fail" and entries["b"]["cases"]["c2"] == "timeout"
    assert entries["c"]["result"] == "fail"  # nothing ran: nothing proven
    # a second run replaces this device's entries instead of appending
    ch.update_record([R("b", "c1", "pallas_gpu", "pass")], path, "NVIDIA H200", "2026-12-04")
    again = [e for e in json.loads(path.read_text()) if e["op"] == "b"]
    assert len(again) == 1 and again[0]["result"] == "pass"
    assert not again[0]["faster_than_xla"]  # passed, but never timed against xla


def test_a_correct_kernel_slower_than_xla_is_recorded_as_such(tmp_path):
    R = ch.CaseResult
    results = [
        R("g", "c1", "pallas_gpu", "pass", fwd_bwd_ms=1.0, xla_fwd_bwd_ms=3.0),
        R("g", "c2", "pallas_gpu", "pass", fwd_bwd_ms=2.0, xla_fwd_bwd_ms=1.0),
    ]
    (e,) = ch.update_record(results, tmp_path / "rec.json", "NVIDIA H200", "2026-12-04")
    assert e["result"] == "pass" and e["faster_than_xla"] is False
    assert e["speedup_fwd_bwd"] == {"c1": 3.0, "c2": 0.5}


def test_a_passing_record_makes_dispatch_pick_the_kernel(tmp_path, monkeypatch):
    path = tmp_path / "rec.json"
    ch.update_record(
        [ch.CaseResult("causal_conv1d", "c", "pallas_gpu", "pass", fwd_bwd_ms=1, xla_fwd_bwd_ms=2)],
        path,
        "NVIDIA H200",
        "d",
    )
    monkeypatch.setattr(dispatch, "HARDWARE_RECORD", path)
    monkeypatch.setattr(dispatch, "current_device_kind", lambda: "NVIDIA H200")
    dispatch._load_record.cache_clear()
    try:
        assert dispatch.validated_on_hardware("causal_conv1d", "pallas_gpu", "NVIDIA H200")
        assert not dispatch.validated_on_hardware("causal_conv1d", "pallas_gpu", "NVIDIA A100")
        assert dispatch.why_not_default("causal_conv1d", "pallas_gpu", "NVIDIA H200") is None
    finally:
        dispatch._load_record.cache_clear()


def test_without_hardware_it_asks_for_dry_run():
    with pytest.raises(SystemExit, match="--dry-run"):
        ch.implementations_here(dry_run=False)


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        ch.cases("nope", dry_run=True)


@pytest.mark.parametrize("op", ch.OPS)
def test_hardware_cases_trace_for_their_kernels(op):
    """Every documented-shape case builds and traces value_and_grad through both Pallas kernels
    (abstractly: no execution), so a hardware session cannot fail on the check's own plumbing."""
    for name, build in ch.cases(op, dry_run=False).items():
        problem = build()
        n = len(problem.arrays)
        ct = ch._cotangent(jax.eval_shape(problem.call("xla"), *problem.arrays))
        for impl, platform in (("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")):
            loss = ch._loss(problem.call(impl), ct)
            with cross_platform_export(platform):
                value, grads = jax.eval_shape(
                    jax.value_and_grad(loss, argnums=tuple(range(n))), *problem.arrays
                )
            assert value.shape == () and len(grads) == n, (op, name, impl)
            assert [g.shape for g in grads] == [x.shape for x in problem.arrays]


def _sin_problem(worse: str):
    """sin on bf16 inputs: ``worse`` rounds its output to bf16 and adds a 3% error."""
    x = jax.random.normal(jax.random.key(0), (64, 32)).astype(jnp.bfloat16)

    def call(impl):
        def f(x):
            y = jnp.sin(x.astype(jnp.float32))
            if impl == worse and x.dtype == jnp.bfloat16:
                y = (y * 1.03).astype(jnp.bfloat16).astype(jnp.float32)
            return y

        return f

    return ch.Problem((x,), call, "bfloat16", None)


@pytest.mark.parametrize(("worse", "passes"), [("xla", True), ("kernel", False)])
def test_bf16_disagreement_is_blamed_on_whichever_is_further_from_fp32(worse, passes):
    problem = _sin_problem(worse)
    xs = problem.arrays
    ct = ch._cotangent(jax.eval_shape(problem.call("xla"), *xs))
    run = {
        n: (problem.call(n)(*xs), jax.value_and_grad(ch._loss(problem.call(n), ct))(*xs)[1])
        for n in ("kernel", "xla")
    }
    res = ch.CaseResult("sin", "c", "kernel", "error")
    ok = ch._against_fp32(problem, res, ct, (0,), run["kernel"], run["xla"])
    assert ok is passes
    near, far = sorted((res.max_rel_rms_f32, res.xla_max_rel_rms_f32))
    # the worse one is ~3% off; the other only by its bf16 gradient's rounding
    assert near < 5e-3 and far > 2e-2
