"""The trainer's command line: config names, overrides, one-line errors, exit codes, listings."""

import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest

from jaxblocks.train import cli, loop
from jaxblocks.train import config as config_lib
from jaxblocks.train.metrics import read_metrics

CONFIGS = config_lib.CONFIGS_DIR
PROG = "python -m jaxblocks.train"


def _env():
    # One CPU device: the subprocess compiles less; sharding is tested elsewhere.
    return dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")


def test_cli_char_lm_smoke_with_ring_attention(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config by name, from a directory outside the repository
    rc = cli.main(["--config", "char_lm:smoke,ring", "--workdir", "run", "progress=False"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["optimizer.nmae=sgd"], r"override 'optimizer.nmae': unknown config field; known: \["),
        (["--optimizer.nmae=sgd"], r"override 'optimizer.nmae': unknown config field"),
        (["batch_size=big"], r"override batch_size: expected int like the default 64, got 'big'"),
        (["optimizer.name=adamx"], r"unknown optimizer 'adamx'; choose one of \('sgd'"),
        (["model.convbn_mode=inference"], r"model.convbn_mode must be one of"),
        (["--config", "large_batch:smoke,lmab"], r"config large_batch: unknown switch 'lmab'"),
        (["--config", "nope"], r"no such file 'nope' and no config of that name; known configs"),
        (["--config", "char_lm:smoke,ring,long_conv"], r"'long_conv' has none"),
        (["model.kwargs.widht=3"], r"do not fit model 'cnn_tiny'.*'widht'"),
        (["accum_steps=4", "batch_size=62"], r"batch_size=62 is not divisible by config.accum"),
        (["batch_size=60"], r"batch_size=60 .* not divisible by the data-parallel mesh size"),
        (["mesh.tensor=3"], r"mesh: .*not divisible by the fixed axis sizes"),
        (["train_epochs=2"], r"exactly one of train_steps, train_epochs, train_examples"),
        (["--smoke"], r"--smoke: not an option, and a config override needs a value"),
        (["--preempted-exit-code", "x"], r"argument --preempted-exit-code: invalid int value"),
        (["steps"], r"override 'steps': expected key=value"),
    ],
)
def test_config_errors_print_one_line_and_exit_2_before_the_workdir(
    tmp_path, capsys, argv, expected
):
    workdir = tmp_path / "run"
    base = ["--config", "large_batch:smoke", "--workdir", str(workdir)]
    if argv[:1] == ["--config"]:
        base = base[2:]
    rc = cli.main(base + argv)
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), captured.err
    assert re.search(expected, lines[0]), lines[0]
    assert captured.out == ""
    assert not workdir.exists()


def test_an_uncreatable_workdir_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli.main(["--config", "large_batch:smoke", "--workdir", str(blocker / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--workdir: workdir" in err
    assert "cannot be created" in err


def test_bad_config_from_the_command_line_has_no_traceback(tmp_path):
    # The real entry point, from another directory: one line on stderr, exit 2, no workdir.
    proc = subprocess.run(
        [sys.executable, "-m", "jaxblocks.train", "--config", "large_batch:smoke"]
        + ["--workdir", "run", "--optimizer.name", "adamx"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"{PROG}: error: config.optimizer.name: unknown optimizer 'adamx'; "
        "choose one of ('sgd', 'adamw', 'lars', 'lamb')"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["train_steps=5", "optimizer.name=lamb"],
        ["--train_steps=5", "--optimizer.name=lamb"],
        ["--train_steps", "5", "--optimizer.name", "lamb"],
        ["--optimizer.name", "lamb", "train_steps=5"],
        ["--train_steps", "5", "--workdir", "w", "optimizer.name='lamb'"],
    ],
)
def test_override_forms(argv):
    args = cli.parse_args(["--config", "large_batch:smoke", *argv])
    name, cfg = cli.load(args)
    assert name == "large_batch"
    assert cfg.train_steps == 5 and cfg.optimizer.name == "lamb"
    assert cfg.batch_size == 64  # the rest is the config's


def test_override_with_a_negative_value_and_dotted_key():
    args = cli.parse_args(["--config", "large_batch:smoke", "--optimizer.step_decay", "-0.5"])
    assert cli.load(args)[1].optimizer.step_decay == -0.5


def test_config_by_name_or_path_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name, cfg = cli.load(cli.parse_args(["--config", "convbn_digits:smoke"]))
    assert name == "convbn_digits" and cfg.smoke and len(cfg.stages) == 2
    path = os.path.join(CONFIGS, "convbn_digits.py")
    assert cli.load(cli.parse_args(["--config", path + ":smoke"]))[1].to_dict() == cfg.to_dict()
    name, default = cli.load(cli.parse_args([]))
    assert name == "convbn_digits" and not default.smoke


def test_help_and_list_configs_name_every_config(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "--preempted-exit-code N" in help_text and "143" in help_text
    assert "--allow-config-change" in help_text and "--list-configs" in help_text
    assert cli.main(["--list-configs"]) == 0
    listing = capsys.readouterr().out.splitlines()
    configs = config_lib.available_configs()
    assert len(listing) == len(configs) >= 3
    for line, (name, path) in zip(listing, configs.items(), strict=True):
        summary, switches = config_lib.describe_config(path)
        assert line == f"  {name} [{', '.join(switches)}]: {summary}"
        assert line in help_text.splitlines()
    assert any(ln.startswith("  large_batch [smoke, lamb, agvm") for ln in listing)


def test_allow_config_change_maps_to_the_config_key():
    args = cli.parse_args(["--config", "large_batch:smoke", "--allow-config-change"])
    assert args.overrides == ["allow_config_change=True"]
    assert cli.parse_args(["--config", "large_batch:smoke"]).overrides == []
    assert config_lib.base_config().allow_config_change is False
    assert cli.load(args)[1].allow_config_change is True
    assert (
        cli.load(cli.parse_args(["--config", "large_batch:smoke"]))[1].allow_config_change is False
    )


def test_regime_adaptation_says_how_the_step_count_changed():
    cfg = config_lib.load_config("large_batch", "smoke")
    (note,) = cli.regime_notes(cfg)
    assert note.startswith("[train] regime adaptation: 3 -> 6 steps (x2 = ceil(batch_size 64 /")
    assert "regime_base_batch_size 32" in note
    off = config_lib.apply_overrides(cfg, ["optimizer.regime_adaptation=False"])
    assert cli.regime_notes(off) == []
    assert cli.regime_notes(config_lib.load_config("convbn_digits", "smoke")) == []
    # By epochs: the full-size recipe (30 epochs of the digits at batch 512, ×2).
    (full,) = cli.regime_notes(config_lib.load_config("large_batch"))
    before, after = full.split("regime adaptation: ")[1].split(" steps")[0].split(" -> ")
    assert int(after) == 2 * int(before) > 0


def _fake_run(preempted_stage):
    def run(cfg, workdir, on_report=None, **kwargs):
        out = []
        for name in ("pretrain", "transfer"):
            res = types.SimpleNamespace(
                preempted=name == preempted_stage,
                final_step=2,
                eval_metrics={"accuracy": 0.5},
                workdir=os.path.join(workdir, name),
            )
            out.append((name, res))
            if res.preempted:
                break
        return out

    return run


@pytest.mark.parametrize(
    ("extra", "preempted_stage", "code"),
    [([], "transfer", 143), (["--preempted-exit-code", "75"], "pretrain", 75), ([], None, 0)],
)
def test_preempted_exit_code(tmp_path, monkeypatch, capsys, extra, preempted_stage, code):
    monkeypatch.setattr(loop, "run", _fake_run(preempted_stage))
    rc = cli.main(["--config", "convbn_digits:smoke", "--workdir", str(tmp_path), *extra])
    out = capsys.readouterr().out
    assert rc == code
    if preempted_stage:
        assert f"[{preempted_stage}] preempted at step 2: checkpoint saved" in out
        assert f"(exit code {code})" in out
    else:
        assert "[transfer] 2 steps  test accuracy 0.5000" in out


def test_sigterm_exits_143_with_a_checkpoint(tmp_path):
    # The real process: SIGTERM between checkpoint steps saves one and exits 143.
    wd = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxblocks.train", "--config", "large_batch:smoke"]
        + ["--workdir", str(wd), "--train_steps=500", "step_delay_s=0.05"]
        + ["checkpoint.every_steps=1000", "progress=False", "plot=False", "tensorboard=False"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        metrics = wd / "metrics.jsonl"
        # Past step 1 (orbax saves a fresh manager's first step whatever the interval).
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and any(r["step"] >= 3 for r in read_metrics(str(metrics))):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "preempted at step" in out and "(exit code 143)" in out
    steps = [int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()]
    assert max(steps) >= 3


def test_each_stage_reports_its_own_tasks_metric(tmp_path, monkeypatch, capsys):
    # spark_digits pretrains with masked_pretraining (main metric: loss), then fine-tunes.
    def run(cfg, workdir, on_report=None, **kwargs):
        metrics = {"pretrain": {"loss": 0.25}, "finetune": {"accuracy": 0.75}}
        return [
            (
                name,
                types.SimpleNamespace(
                    preempted=False,
                    final_step=2,
                    eval_metrics=m,
                    workdir=os.path.join(workdir, name),
                ),
            )  # fmt: skip
            for name, m in metrics.items()
        ]

    monkeypatch.setattr(loop, "run", run)
    assert cli.main(["--config", "spark_digits:smoke", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[pretrain] 2 steps  test loss 0.2500" in out
    assert "[finetune] 2 steps  test accuracy 0.7500" in out
