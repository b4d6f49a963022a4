"""Preemption: real SIGTERMs to a trainer subprocess (on a checkpoint step, between steps, before
the first step) save once and end cleanly with ``preempted=True``; log lines without a terminal."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from jaxblocks.train import loop
from jaxblocks.train.metrics import Progress, read_metrics
from tests.train.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8

# The trainer in a subprocess on a one-device smoke config (`overrides`, tiny_config's keywords,
# come as JSON); the result is the last stdout line.
RUNNER = """
import json, sys
from jaxblocks.train import loop
from tests.train.helpers import tiny_config
cfg = tiny_config("cnn_tiny", **json.loads(sys.argv[2]))
res = loop.train(cfg, sys.argv[1])
print("RESULT " + json.dumps({"preempted": res.preempted, "final_step": res.final_step}))
"""


def overrides(**over) -> dict:
    return {"train_steps": STEPS, "mesh": {"data": -1}, **over}


def cfg(**over):
    """The runner's config in this process (one device: pass ``devices=jax.devices()[:1]``)."""
    return tiny_config("cnn_tiny", **overrides(**over))


def start_trainer(workdir: str, **over) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_NUM_CPU_DEVICES="1")
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, workdir, json.dumps(overrides(**over))],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def train_steps_logged(workdir: str) -> list[int]:
    """Train steps in ``metrics.jsonl`` as written (duplicates kept)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # being written
            if r["split"] == "train":
                out.append(r["step"])
    return out


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer ended before {what}: {proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def result_of(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert lines, out
    return json.loads(lines[-1][len("RESULT ") :])


def checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.mark.parametrize(
    ("stop_at", "saved"),
    # Step 4 is a periodic checkpoint step (every 2): SIGTERM used to save it twice and crash
    # with StepAlreadyExistsError. Step 3 is between checkpoints: the preemption save writes it.
    [(4, [2, 4]), (3, [2, 3])],
    ids=["on_checkpoint_step", "between_checkpoints"],
)
def test_sigterm_saves_once_and_ends_cleanly(tmp_path, capsys, stop_at, saved):
    wd = str(tmp_path / "wd")
    # The delay follows the step's checkpoint save: a SIGTERM sent once step `stop_at` is logged
    # lands in it, so the run stops at exactly that step.
    proc = start_trainer(wd, step_delay_s=1.0, checkpoint__every_steps=2, progress=True)
    wait_for(lambda: stop_at in train_steps_logged(wd), proc, f"step {stop_at}")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Error" not in out and "Traceback" not in out, out
    assert result_of(out) == {"preempted": True, "final_step": stop_at}
    assert checkpoint_steps(wd) == saved
    assert train_steps_logged(wd) == list(range(1, stop_at + 1))
    # The checkpoint restores and training finishes from it.
    res = loop.train(cfg(), wd, devices=jax.devices()[:1])
    assert f"resumed from step {stop_at} (workdir {wd})" in capsys.readouterr().out
    assert res.final_step == STEPS and not res.preempted
    assert train_steps_logged(wd) == list(range(1, STEPS + 1))


def test_sigterm_before_the_first_step(tmp_path):
    wd = str(tmp_path / "wd")
    proc = start_trainer(wd, step_delay_s=1.0)
    # The workdir appears just before the guard is installed; building and compiling follow.
    wait_for(lambda: os.path.isdir(wd), proc, "the workdir")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    res = result_of(out)
    assert res["preempted"] and res["final_step"] < STEPS
    if res["final_step"] == 0:  # stopped before any step: nothing new to save
        assert not os.listdir(os.path.join(wd, "checkpoints"))
    else:  # the machine was slow and a step ran first: it was saved
        assert checkpoint_steps(wd)[-1] == res["final_step"]


def test_log_lines_without_a_terminal(tmp_path):
    """stdout is a pipe: with the progress bar on, a line every `log_every` steps, as they go."""
    wd = str(tmp_path / "wd")
    proc = start_trainer(wd, progress=True, log_every=3, step_delay_s=0.3, eval_every=4)
    seen_early = []

    def line_for_step_3():
        seen_early.append(proc.stdout.readline())
        return "step 3/" in seen_early[-1]

    # A line arrives while training runs, not at the end (readline blocks until one comes).
    wait_for(line_for_step_3, proc, "the step 3 log line")
    assert proc.poll() is None
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    lines = [ln for ln in "".join(seen_early).splitlines() + rest.splitlines() if "] step" in ln]
    train = [ln for ln in lines if "loss=" in ln and "eval" not in ln]
    assert [ln.split()[2] for ln in train] == ["1/8", "3/8", "6/8", "8/8"]
    assert all(ln.startswith("[train] step ") for ln in lines)
    assert "steps/s" in train[-1] and "ETA" in train[-1]
    evals = [ln for ln in lines if "  eval  " in ln]
    assert [ln.split()[2] for ln in evals] == ["4/8", "8/8"]
    assert "accuracy=" in evals[0]


def test_log_lines_with_progress_off_in_process(tmp_path, capsys):
    loop.train(cfg(progress=False, log_every=4), str(tmp_path), devices=jax.devices()[:1])
    out = capsys.readouterr().out
    steps = [ln.split()[2] for ln in out.splitlines() if ln.startswith("[train] step")]
    assert steps == ["1/8", "4/8", "8/8", "8/8"]  # the last is the final evaluation
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"))) == 4


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty())
    tty = _Tty()
    bar = Progress(10, 0, 4, enabled=True, stream=tty)
    assert bar.enabled and not bar.lines
    bar.update(1, {"loss": 1.0})
    bar.close()
    assert tty.getvalue() == ""  # the bar draws on stderr; no log lines
    pipe = io.StringIO()
    lines = Progress(10, 0, 4, enabled=True, stream=pipe)
    assert not lines.enabled and lines.lines
    lines.update(1, {"loss": 1.0})
    lines.update(2)  # not a logged step: no line
    lines.update(5, {"loss": 0.5})
    assert pipe.getvalue().splitlines()[0] == "[train] step 1/10  loss=1"
    assert pipe.getvalue().splitlines()[1].startswith("[train] step 5/10  loss=0.5  ")
    assert len(pipe.getvalue().splitlines()) == 2
    off = io.StringIO()
    Progress(10, 0, 4, enabled=False, stream=_Tty()).update(1, {"loss": 1.0})
    Progress(10, 0, 4, enabled=False, stream=off).update(1, {"loss": 1.0})
    assert off.getvalue() == "[train] step 1/10  loss=1\n"


def _report_run(tmp_path, monkeypatch, report):
    """`loop.run` of a 2-step config whose only report is ``report`` (one device)."""
    from jaxblocks.train import reports

    monkeypatch.setitem(reports.REPORTS, "under_test", report)
    run_cfg = cfg(train_steps=2, reports=("under_test",))
    return loop.run(run_cfg, str(tmp_path), devices=jax.devices()[:1])


def test_sigterm_during_a_report_stops_the_run(tmp_path, monkeypatch):
    reached = []

    def report(run_cfg, workdir, results):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises here; never reached with the fix
        reached.append(True)
        return "| never |"

    t0 = time.time()
    results = _report_run(tmp_path, monkeypatch, report)
    assert time.time() - t0 < 25 and not reached
    (stage, first), (label, res) = results
    assert not first.preempted and label == "reports" and res.preempted
    assert not os.path.exists(tmp_path / "under_test.md")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard was taken down


def test_sigterm_during_a_report_retraining_saves_it_and_stops_the_run(tmp_path, monkeypatch):
    reached = []

    def report(run_cfg, workdir, results):
        wd = os.path.join(workdir, "variant")

        def kill_when_training():
            t0 = time.time()
            while not train_steps_logged(wd) and time.time() - t0 < 600:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=kill_when_training, daemon=True).start()
        variant = cfg(train_steps=100_000, log_every=1)
        loop.train(variant, wd, devices=jax.devices()[:1])
        reached.append(True)  # a report used to go on to its next variant here
        return "| never |"

    results = _report_run(tmp_path, monkeypatch, report)
    label, res = results[-1]
    assert label == "reports" and res.preempted and not reached
    # The signal comes from a thread polling metrics.jsonl, so training may be a step or two
    # further when it lands (orbax also saves a run's first step): the stop is prompt and the
    # step it stopped at is the newest checkpoint.
    assert res.workdir == str(tmp_path / "variant") and 0 < res.final_step < 1_000
    assert checkpoint_steps(res.workdir)[-1] == res.final_step
