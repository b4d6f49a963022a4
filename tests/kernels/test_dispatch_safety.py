"""Safe defaults: a Pallas kernel is picked automatically only where the hardware record says it
passed on this device kind and jax version; an explicit Pallas choice that cannot run here is
refused with our error, except in the interpreter or while exporting for its platform."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import pytest

from jaxblocks.kernels import dispatch, interpret
from jaxblocks.kernels.dispatch import (
    Implementation,
    UnsupportedImplementationError,
    cross_platform_export,
    select_implementation,
)

IMPLS = {
    "reference": Implementation(lambda x: x * 2),
    "xla": Implementation(lambda x: x + x),
    "pallas_gpu": Implementation(lambda x: 2 * x),
    "pallas_tpu": Implementation(lambda x: 2.0 * x),
}
X = jnp.ones((4, 8))


@pytest.fixture
def on_gpu(monkeypatch, tmp_path):
    """Pretend to run on an H200 with a hardware record in tmp_path."""
    record = tmp_path / "hardware_validation.json"
    record.write_text("[]")
    monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
    monkeypatch.setattr(dispatch, "current_device_kind", lambda: "NVIDIA H200")
    monkeypatch.setattr(dispatch, "HARDWARE_RECORD", record)
    monkeypatch.setattr(dispatch, "_fallbacks_logged", set())
    dispatch._load_record.cache_clear()
    yield record
    dispatch._load_record.cache_clear()


def _entry(**kw):
    e = {
        "op": "double",
        "implementation": "pallas_gpu",
        "device_kind": "NVIDIA H200",
        "jax": jax.__version__,
        "date": "2026-12-03",
        "result": "pass",
        "faster_than_xla": True,
    }
    return {**e, **kw}


def _without(key):
    e = _entry()
    del e[key]
    return e


def test_unvalidated_pallas_is_not_the_default_and_is_logged_once(on_gpu, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxblocks.kernels"):
        for _ in range(3):
            assert select_implementation("double", None, IMPLS, X)[0] == "xla"
    msgs = [r.getMessage() for r in caplog.records if "double" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert "pallas_gpu" in msgs[0] and "NVIDIA H200" in msgs[0]


@pytest.mark.parametrize(
    ("entry", "picked"),
    [
        (_entry(), "pallas_gpu"),
        (_entry(result="fail"), "xla"),
        (_entry(faster_than_xla=False), "xla"),  # correct there, but slower than xla
        (_without("faster_than_xla"), "xla"),  # an entry that never timed it
        (_entry(device_kind="NVIDIA H100 80GB HBM3"), "xla"),
        (_entry(jax="0.0.1"), "xla"),
        (_entry(op="other_op"), "xla"),
    ],
)
def test_validated_pallas_is_picked_only_for_a_matching_passing_entry(on_gpu, entry, picked):
    on_gpu.write_text(json.dumps([entry]))
    dispatch._load_record.cache_clear()
    assert select_implementation("double", None, IMPLS, X)[0] == picked


def test_a_correct_but_slower_kernel_is_logged_with_its_speedups(on_gpu, caplog):
    on_gpu.write_text(
        json.dumps([_entry(faster_than_xla=False, speedup_fwd_bwd={"B4_T2048": 0.36})])
    )
    dispatch._load_record.cache_clear()
    with caplog.at_level(logging.WARNING, logger="jaxblocks.kernels"):
        assert select_implementation("double", None, IMPLS, X)[0] == "xla"
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "slower than xla" in msg and "0.36" in msg


def test_the_shipped_record_is_a_list_of_complete_entries():
    dispatch._load_record.cache_clear()
    keys = {"op", "implementation", "device_kind", "jax", "date", "result", "faster_than_xla"}
    for e in dispatch.hardware_record():
        assert keys <= set(e), e


def test_malformed_record_is_a_clear_error(on_gpu):
    on_gpu.write_text('{"op": "double"}')
    dispatch._load_record.cache_clear()
    with pytest.raises(ValueError, match="JSON list of objects"):
        select_implementation("double", None, IMPLS, X)


@pytest.mark.parametrize("name", ["pallas_gpu", "pallas_tpu"])
def test_explicit_pallas_on_cpu_raises_naming_op_and_interpret(name):
    assert jax.default_backend() == "cpu"
    with pytest.raises(UnsupportedImplementationError, match=r"double.*interpret\(\)"):
        select_implementation("double", name, IMPLS, X)
    with interpret():
        assert select_implementation("double", name, IMPLS, X)[0] == name
    with cross_platform_export("cuda" if name == "pallas_gpu" else "tpu"):
        assert select_implementation("double", name, IMPLS, X)[0] == name


def test_explicit_pallas_on_its_platform_needs_no_record(on_gpu):
    assert select_implementation("double", "pallas_gpu", IMPLS, X)[0] == "pallas_gpu"


def test_cross_platform_export_rejects_unknown_platform():
    with pytest.raises(ValueError, match="platform"):
        with cross_platform_export("cpu"):
            pass


def test_the_shipped_h200_record_turns_on_only_the_faster_kernels():
    """The first hardware check (BENCHMARKS.md): correct and faster -> default; else xla."""
    dispatch._load_record.cache_clear()
    kinds = {(e["device_kind"], e["jax"]) for e in dispatch.hardware_record()}
    assert ("NVIDIA H200", "0.11.2") in kinds
    if jax.__version__ != "0.11.2":
        pytest.skip(f"the record is for jax 0.11.2; this is {jax.__version__}")
    why = lambda op: dispatch.why_not_default(op, "pallas_gpu", "NVIDIA H200")
    assert why("selective_scan") is None and why("causal_conv1d") is None
    for op in ("chunk_gla", "fft_conv", "pointwise_conv_bn"):
        assert "slower than xla" in why(op), op
    assert "not validated" in why("flashrnn")
    assert "not validated" in dispatch.why_not_default("chunk_gla", "pallas_gpu", "NVIDIA A100")
