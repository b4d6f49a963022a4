"""Configs, overrides, clear errors for bad configs (every shipped config runs in
test_configs_smoke.py)."""

import os

import pytest

from jaxblocks.train import config as config_lib
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


def test_configs_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = config_lib.available_configs()
    assert set(found) == {
        f[:-3]
        for f in os.listdir(CONFIGS)
        if f.endswith(".py") and f not in ("base.py", "__init__.py")
    }
    path, arg = config_lib.resolve_config("convbn_digits:smoke")
    assert os.path.samefile(path, os.path.join(CONFIGS, "convbn_digits.py")) and arg == "smoke"
    assert config_lib.resolve_config("large_batch") == (found["large_batch"], None)
    by_name = config_lib.load_config("convbn_digits:smoke")
    by_path = config_lib.load_config(os.path.join(CONFIGS, "convbn_digits.py"), "smoke")
    assert by_name.to_dict() == by_path.to_dict() and by_name.smoke
    # A file in the working directory wins over a shipped name; it needs no SWITCHES.
    (tmp_path / "large_batch.py").write_text(
        "from jaxblocks.configs.base import base_config\n\n"
        "def get_config(arg=None):\n    c = base_config()\n    c.seed = 7\n    return c\n"
    )
    assert config_lib.load_config("large_batch.py:anything").seed == 7
    assert config_lib.load_config("large_batch:smoke").seed == 0
    with pytest.raises(FileNotFoundError, match=r"'nope'.*known configs: .*char_lm, convbn_digits"):
        config_lib.load_config("nope:smoke")
    with pytest.raises(FileNotFoundError, match="no such file 'sub/large_batch'"):
        config_lib.load_config("sub/large_batch")


def test_describe_config_reads_summary_and_switches_without_importing(tmp_path):
    summary, switches = config_lib.describe_config(os.path.join(CONFIGS, "large_batch.py"))
    assert summary.startswith("Large-batch recipe") and "\n" not in summary
    assert switches == ("smoke", "lamb", "agvm", "conadv", "bn_only")
    f = tmp_path / "mine.py"
    f.write_text('"""Mine.\n\nMore."""\nraise RuntimeError("imported")\n')
    assert config_lib.describe_config(str(f)) == ("Mine.", None)


def test_unknown_switch_is_an_error_naming_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"config char_lm: unknown switch 'rign' in 'smoke,rign'.*"
        r"smoke, ring, transformer, long_conv",
    ):
        config_lib.load_config("char_lm", "smoke,rign")
    with pytest.raises(ValueError, match="unknown switch 'lmab'"):
        config_lib.load_config("large_batch:lmab")


def test_validate_checks_before_anything_runs():
    def bad(match, num_devices=None, **over):
        with pytest.raises(ValueError, match=match):
            config_lib.validate(tiny_config(**over), num_devices=num_devices)

    bad(r"exactly one of train_steps, train_epochs, train_examples", train_epochs=2.0)
    bad(r"exactly one of train_steps", train_steps=-1)
    bad(r"config.data.name: unknown dataset 'imagenet'", data__name="imagenet")
    bad(r"config.log_every must be >= 1, got 0", log_every=0)
    bad(r"config.eval_batch_size must be >= 1", eval_batch_size=0)
    bad(r"config.eval_every must be >= 0", eval_every=-2)
    bad(r"config.optimizer.schedule must be one of .*got 'linear'", optimizer__schedule="linear")
    bad(r"agvm and conadv are separate", agvm__enabled=True, conadv__enabled=True)
    # With the device count: the mesh and the batch split over it.
    bad(
        r"mesh: .*3 devices", num_devices=3, mesh={"data": 2, "fsdp": 1, "tensor": 1, "sequence": 1}
    )
    bad(
        r"batch_size=32 .* not divisible by the data-parallel mesh size data\*fsdp=3", num_devices=3
    )
    config_lib.validate(tiny_config(), num_devices=8)


def test_validate_checks_every_stage():
    cfg = config_lib.load_config("convbn_digits", "smoke")
    config_lib.validate(cfg, num_devices=1)
    cfg.stages = (dict(cfg.stages[0]), dict(cfg.stages[1], optimizer={"name": "adamx"}))
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        config_lib.validate(cfg)
    cfg.stages = (dict(cfg.stages[0], train_epochs=2.0),)
    with pytest.raises(ValueError, match="exactly one of train_steps"):
        config_lib.validate(cfg)


def test_model_kwargs_are_checked_against_the_model():
    with pytest.raises(
        ValueError,
        match=r"config.model.kwargs \{'widht': 3\} do not fit model "
        r"'mlp_tiny'.*'widht'",
    ):
        config_lib.check_model_kwargs(tiny_config(model__kwargs={"widht": 3}))
    staged = config_lib.load_config("convbn_digits", "smoke")
    config_lib.check_model_kwargs(staged)
    staged.stages = (dict(staged.stages[0], model={"kwargs": {"depth": 3}}),)
    with pytest.raises(ValueError, match="'resnet18'.*'depth'"):
        config_lib.check_model_kwargs(staged)
