"""Checkpoints: exact resume (in process, after SIGKILL, after SIGTERM); restore 8 -> 4 devices."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxblocks.train import loop
from jaxblocks.train.metrics import read_metrics
from tests.train.helpers import tiny_config, to_numpy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8


def _cfg(**over):
    # Single-device mesh so subprocesses (1 device) and this process compute identically.
    return tiny_config("cnn_tiny", train_steps=STEPS, mesh={"data": -1}, **over)


def _losses(workdir):
    return {
        r["step"]: r["loss"]
        for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
        if r["split"] == "train"
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ref"))
    res = loop.train(_cfg(), wd, devices=jax.devices()[:1])
    return _losses(wd), to_numpy(res.state.params)


def test_resume_in_process_is_exact(tmp_path, reference):
    ref_losses, ref_params = reference
    wd = str(tmp_path)
    first = loop.train(_cfg(), wd, devices=jax.devices()[:1], stop_after=3)
    assert first.final_step == 3 and not first.preempted
    assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))
    second = loop.train(_cfg(), wd, devices=jax.devices()[:1])
    assert second.final_step == STEPS
    assert _losses(wd) == ref_losses  # bit-for-bit, including steps after the resume
    for a, b in zip(
        jax.tree.leaves(to_numpy(second.state.params)), jax.tree.leaves(ref_params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # keep-last-K
    assert len(os.listdir(os.path.join(wd, "checkpoints"))) <= 3


def _write_config(tmp_path, **over) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(
        textwrap.dedent(f"""
        from tests.train.helpers import tiny_config

        def get_config(arg=None):
            return tiny_config("cnn_tiny", train_steps={STEPS}, mesh={{"data": -1}}, **{over!r})
    """)
    )
    return str(path)


def _cli(cfg_path, workdir):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_NUM_CPU_DEVICES="1")
    cmd = [sys.executable, "-m", "jaxblocks.train", "--config", cfg_path, "--workdir", workdir]
    return cmd, env


def _wait_for_step(workdir, step, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if _losses(workdir) and max(_losses(workdir)) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training progress")


@pytest.mark.parametrize(
    "sig",
    # SIGKILL costs the same as SIGTERM (two CLI subprocesses); CI keeps the SIGTERM variant.
    [pytest.param(signal.SIGKILL, marks=pytest.mark.slow), signal.SIGTERM],
    ids=["sigkill", "sigterm"],
)
def test_killed_run_resumes_to_the_uninterrupted_losses(tmp_path, reference, sig):
    cfg_path = _write_config(tmp_path, step_delay_s=0.4)
    wd = str(tmp_path / "wd")
    cmd, env = _cli(cfg_path, wd)
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for_step(wd, 3, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    ckpts = os.listdir(os.path.join(wd, "checkpoints"))
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, out  # the CLI's documented preemption exit code
        assert "preempted at step" in out
        stopped = max(_losses(wd))
        assert str(stopped) in ckpts  # saved exactly where it stopped
        assert stopped < STEPS
    else:
        assert proc.returncode == -signal.SIGKILL
    # Resume (no delay needed) and compare with the uninterrupted run.
    cfg2 = _write_config(tmp_path)
    cmd, env = _cli(cfg2, wd)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    got, want = _losses(wd), reference[0]
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose(
        [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6, atol=1e-7
    )


RESTORE_SCRIPT = """
import json, sys
import jax
from jaxblocks.train import loop
from tests.train.helpers import tiny_config
assert jax.device_count() == 4, jax.device_count()
cfg = tiny_config("mlp_tiny", train_steps=6, mesh={"data": 2, "fsdp": 2})
res = loop.train(cfg, sys.argv[1])
k = res.state.params["dense0"]["kernel"]
print(json.dumps({"step": res.final_step, "spec": str(k.sharding.spec),
                  "ndev": len(k.sharding.device_set)}))
"""


def test_restore_onto_fewer_devices(tmp_path):
    wd = str(tmp_path)
    cfg = tiny_config("mlp_tiny", train_steps=6, mesh={"data": 2, "fsdp": 4})
    loop.train(cfg, str(tmp_path / "ref"))
    part = loop.train(cfg, wd, stop_after=3)
    assert part.final_step == 3
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_NUM_CPU_DEVICES="4")
    out = subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, wd],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["step"] == 6 and info["ndev"] == 4
    got = _losses(wd)
    want = {
        r["step"]: r["loss"]
        for r in read_metrics(str(tmp_path / "ref" / "metrics.jsonl"))
        if r["split"] == "train"
    }
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], rtol=1e-5)
