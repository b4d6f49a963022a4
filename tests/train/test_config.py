"""Configs, overrides, clear errors for bad configs, and every shipped config in smoke mode."""

import os

import jax
import pytest

from jaxblocks.train import cli, loop
from jaxblocks.train import config as config_lib
from jaxblocks.train.metrics import read_metrics
from tests.train.helpers import tiny_config

CONFIGS = os.path.join(os.path.dirname(config_lib.__file__), "..", "configs")


def test_overrides_parse_and_type_check():
    cfg = config_lib.base_config()
    out = config_lib.apply_overrides(
        cfg,
        [
            "optimizer.name=lamb",
            "batch_size=512",
            "optimizer.learning_rate=1",
            "smoke=true",
            "mesh.fsdp=2",
            "data.classes=(1,2)",
            "model.kwargs.width=8",
        ],
    )
    assert out.optimizer.name == "lamb" and out.batch_size == 512
    assert out.optimizer.learning_rate == 1.0 and isinstance(out.optimizer.learning_rate, float)
    assert out.smoke is True and out.mesh.fsdp == 2 and out.data.classes == (1, 2)
    assert out.model.kwargs.width == 8
    assert cfg.batch_size == 64  # the original is untouched
    with pytest.raises(KeyError, match="unknown config field"):
        config_lib.apply_overrides(cfg, ["optimizer.nmae=sgd"])
    with pytest.raises(ValueError, match="expected int"):
        config_lib.apply_overrides(cfg, ["batch_size='big'"])
    with pytest.raises(ValueError, match="key=value"):
        config_lib.apply_overrides(cfg, ["batch_size"])


def test_bad_configs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        config_lib.validate(tiny_config(optimizer__name="adamx"))
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        config_lib.validate(tiny_config("resnet9000"))
    with pytest.raises(ValueError, match="not divisible by config.accum_steps"):
        config_lib.validate(tiny_config(batch_size=30, accum_steps=4))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="cannot be created"):
        config_lib.check_workdir(str(blocker / "run"))
    with pytest.raises(FileNotFoundError):
        config_lib.load_config(str(tmp_path / "nope.py"))


def test_stages_split_into_configs():
    cfg = config_lib.load_config(os.path.join(CONFIGS, "convbn_digits.py"), "smoke")
    stages = config_lib.stage_configs(cfg)
    assert [n for n, _ in stages] == ["pretrain", "transfer"]
    assert stages[0][1].model.convbn_mode == ""
    assert stages[1][1].model.convbn_mode == "tune"
    assert stages[1][1].data.classes == (5, 6, 7, 8, 9)


@pytest.mark.parametrize(
    "arg",
    # LAMB and BN-only are checked in closed form in test_optim; their end-to-end runs are slow.
    [
        "smoke",
        pytest.param("smoke,lamb", marks=pytest.mark.slow),
        "smoke,agvm",
        pytest.param("smoke,bn_only", marks=pytest.mark.slow),
    ],
)
def test_large_batch_config_smoke(tmp_path, arg):
    cfg = config_lib.load_config(os.path.join(CONFIGS, "large_batch.py"), arg)
    cfg = config_lib.apply_overrides(cfg, ["progress=False"])
    # One device: sharding is covered in test_sharding, compiling for 8 costs more here.
    res = loop.train(cfg, str(tmp_path), devices=jax.devices()[:1])
    # 3 steps, times ceil(64 / 32) = 2 by regime adaptation.
    assert res.final_step == res.num_steps == 6 and 0.0 <= res.eval_metrics["accuracy"] <= 1.0
    assert os.path.exists(tmp_path / "curves.png")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert {r["split"] for r in recs} == {"train", "eval"}
    assert "examples_per_s" in [r for r in recs if r["split"] == "train"][-1]


def test_cli_char_lm_smoke_with_ring_attention(tmp_path, capsys):
    rc = cli.main(
        [
            "--config",
            os.path.join(CONFIGS, "char_lm.py") + ":smoke,ring",
            "--workdir",
            str(tmp_path),
            "progress=False",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    assert os.path.isdir(tmp_path / "checkpoints" / "3")


def test_one_convbn_mode_key_and_removed_fields_are_clear_errors():
    cfg = config_lib.base_config()
    assert "train_kwargs" not in cfg.model and "eval_kwargs" not in cfg.model
    with pytest.raises(KeyError, match=r"model.train_kwargs was removed: .*model.convbn_mode"):
        config_lib.apply_overrides(cfg, ["model.train_kwargs.mode='tune'"])
    with pytest.raises(KeyError, match=r"compare_convbn_modes was removed: use reports="):
        config_lib.apply_overrides(cfg, ["compare_convbn_modes=True"])
    # A config file that assigns a removed field fails validation the same way.
    old = tiny_config()
    old.model.eval_kwargs = {"mode": "eval"}
    with pytest.raises(KeyError, match=r"unknown config field 'model.eval_kwargs'.*convbn_mode"):
        config_lib.validate(old)
    typo = tiny_config()
    typo.optimizer.lerning_rate = 0.1
    with pytest.raises(KeyError, match="unknown config field 'optimizer.lerning_rate'"):
        config_lib.validate(typo)
    with pytest.raises(ValueError, match=r"model.convbn_mode must be one of .*got 'inference'"):
        config_lib.validate(tiny_config(model__convbn_mode="inference"))
    with pytest.raises(ValueError, match=r"config.reports: unknown report 'tables'"):
        config_lib.validate(tiny_config(reports=("tables",)))
    # Free keys stay free under model.kwargs only.
    ok = config_lib.apply_overrides(cfg, ["model.kwargs.width=8", "model.convbn_mode='tune'"])
    config_lib.validate(ok)
    assert ok.model.convbn_mode == "tune"
