"""Every shipped config and every switch it documents: built at full size, trained in smoke mode.

The configs are the files in ``jaxblocks/configs/`` (`config.available_configs`) and the switches
each declares in ``SWITCHES`` (checked against its docstring), so a new config or switch is tested
without editing this file.
"""

import math
import os

import jax
import numpy as np
import pytest

from jaxblocks.registry import create_model
from jaxblocks.train import config as config_lib
from jaxblocks.train import loop, optim
from jaxblocks.train.metrics import read_metrics
from jaxblocks.train.tasks import get_task

CONFIGS = config_lib.available_configs()
SWITCHES = {name: config_lib.describe_config(path)[1] or () for name, path in CONFIGS.items()}

# Smoke runs over ~20 s of CPU that a test in the fast suite already runs, and where.
SLOW_SMOKE = {
    # Two ResNet stages plus the convbn_modes report (~30 s): tests/train/test_main_job.py runs
    # the same config and switch through the CLI in the fast suite.
    ("convbn_digits", "smoke"),
    # Trains the base diffusion model and the OMS module and samples both (~2 min): the OMS
    # step and sampler are tested in tests/models/test_diffusion_unet.py.
    ("oms_digits", "smoke"),
    # Calibrates CBQ three times (~35 s of compiles); tests/compress/test_cbq.py covers the
    # algorithm and the report's pieces, and runs this smoke config under `slow` as well.
    ("cbq_stdlib", "smoke"),
    # The same report on the GLA LM (~40 s); tests/compress/test_cbq.py calibrates a GLA LM.
    ("cbq_gla_stdlib", "smoke"),
    # Pretrain + fine-tune + the from-scratch variant (~40 s): tests/train/test_spark_digits.py
    # runs the same smoke config through the CLI in the fast suite.
    ("spark_digits", "smoke"),
    # Three models and the streaming report (~50 s): tests/train/test_lmuformer_keywords.py runs
    # the same smoke config through the CLI in the fast suite.
    ("lmuformer_keywords", "smoke"),
    # Teacher + two distillation stages + sampling (~2 min): tests/models/test_asdm.py covers the
    # pieces, tests/train/test_asdm_digits.py runs it under `slow`.
    ("asdm_digits", "smoke"),
    # MobileNetV2 again with 1x4 block pruning (~29 s, as long as the plain smoke run):
    # tests/train/test_optim.py prunes with this switch's transform, and the full-size build of
    # "sparse_mobilenet_digits:blocks4" below builds its optimizer.
    ("sparse_mobilenet_digits", "smoke,blocks4"),
}
# Full-size first steps of 10-20 s of CPU (a full test-set evaluation included); the smoke run of
# the same config builds the same model and step (convbn_digits's in test_main_job).
# Full-size first steps that compile large models (20–35 s each on 2 cores): `make test-slow`.
SLOW_FULL_SIZE = {
    "char_lm",
    "convbn_digits",
    "craft_sr",  # ~40 s: CRAFT's windowed attention; its smoke run builds the same blocks
    "diffusion_digits",  # the UNet's full-size step; its smoke run builds the same model
    "frcrn_denoise",  # two 4-level complex U-Nets and a 512-example evaluation
    "lmuformer_keywords",  # generating its 5,120 utterances (~35 s); tests/data covers the data
    "mdbm_digits",  # ~25 s: the full-size fixed-point solve and its implicit backward
    "mossformer2_separation",  # ~20 s: the full-size separator's first step
    "oms_digits",
    "sparse_mobilenet_digits",
    "stunet_ellipsoids",
    # 14-35 s each (first-step compiles of several models, or data generation); their smoke runs
    # build the same models, data plug-ins and training steps at smaller sizes
    "action_clips",
    "asdm_digits",
    "bct_stdlib",
    "cbq_gla_stdlib",
    "cbq_stdlib",
    "hnerv_video",
    "nbp_moving_digits",
    "pres_temporal_graph",
    "spark_digits",
}


def _variants(with_smoke: bool) -> list:
    out = []
    for name, switches in SWITCHES.items():
        extra = [s for s in switches if s != "smoke"]
        args = [""] + extra
        if with_smoke:
            args = ["smoke"] + [f"smoke,{s}" for s in extra]
        for arg in args:
            slow = (name, arg) in SLOW_SMOKE
            out.append(
                pytest.param(
                    name, arg, id=f"{name}:{arg}", marks=[pytest.mark.slow] if slow else []
                )
            )
    return out


def _devices(cfg):
    # As few devices as the mesh allows: compiling for 8 costs more, sharding is tested elsewhere.
    fixed = math.prod(int(v) for v in dict(cfg.mesh).values() if int(v) != -1)
    return jax.devices()[:fixed]


def test_the_shipped_configs_are_found():
    assert {"char_lm", "convbn_digits", "large_batch"} <= set(CONFIGS)
    assert "base" not in CONFIGS


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_declares_and_documents_its_switches(name):
    summary, switches = config_lib.describe_config(CONFIGS[name])
    assert summary, f"{name}: the module docstring's first line is the --list-configs summary"
    assert switches and "smoke" in switches, f"{name}: SWITCHES must name 'smoke'"
    with open(CONFIGS[name]) as f:
        doc = f.read().split('"""')[1]
    for s in switches:
        assert f"``{s}``" in doc or f'"{s}"' in doc, f"{name}: switch {s!r} is not documented"
    with pytest.raises(ValueError, match=rf"config {name}: unknown switch 'nope'"):
        config_lib.load_config(name, "smoke,nope")


def _check_main_metric(cfg, res):
    """The task's main metric was evaluated: accuracy in [0, 1], PSNR finite."""
    metric = get_task(cfg.task).main_metric
    value = res.eval_metrics[metric]
    assert np.isfinite(value)
    if metric == "accuracy":
        assert 0.0 <= value <= 1.0


@pytest.mark.parametrize(("name", "arg"), _variants(with_smoke=True))
def test_config_smoke_run(tmp_path, name, arg):
    cfg = config_lib.load_config(name, arg)
    cfg = config_lib.apply_overrides(cfg, ["progress=False"])
    config_lib.validate(cfg, num_devices=len(_devices(cfg)))
    stages = config_lib.stage_configs(cfg)
    results = loop.run(cfg, str(tmp_path), devices=_devices(cfg))
    assert [n for n, _ in results] == [n for n, _ in stages]
    for (stage, scfg), (_, res) in zip(stages, results, strict=True):
        wd = tmp_path / stage if stage else tmp_path
        assert not res.preempted
        # Smoke runs are a few steps, times Hoffer et al.'s factor where regime adaptation is on.
        assert 0 < scfg.train_steps <= 10
        assert res.final_step == res.num_steps == scfg.train_steps * optim.regime_factor(scfg)
        assert res.train_losses and all(np.isfinite(v) for v in res.train_losses.values())
        _check_main_metric(scfg, res)
        assert np.isfinite(res.eval_metrics["loss"])
        assert os.path.isdir(wd / "checkpoints" / str(res.final_step))
        assert os.path.exists(wd / "curves.png")
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd / "tb"))
        recs = read_metrics(str(wd / "metrics.jsonl"))
        assert {r["split"] for r in recs} == {"train", "eval"}
        assert "examples_per_s" in [r for r in recs if r["split"] == "train"][-1]
    for report in tuple(cfg.reports):
        assert os.path.getsize(tmp_path / f"{report}.md") > 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_variants_apply_and_validate(name):
    # Each ``config.variants`` entry of the full config (retrained by its reports) overrides
    # keys that exist, validates, and names a model its kwargs build: smoke runs that skip the
    # retraining (hnerv_video's) still have their variants checked.
    cfg = config_lib.load_config(name)
    for v in tuple(cfg.variants):
        vc = config_lib.apply_overrides(cfg, list(v.get("overrides", ())))
        config_lib.validate(vc, num_devices=len(jax.devices()))
        assert create_model(vc.model.name, **dict(vc.model.kwargs)) is not None, v["name"]


def test_large_batch_smoke_step_count_is_regime_adapted():
    # 3 steps, times ceil(64 / 32) = 2 by regime adaptation.
    cfg = config_lib.load_config("large_batch", "smoke")
    assert cfg.train_steps == 3 and optim.regime_factor(cfg) == 2


@pytest.mark.parametrize(("name", "arg"), _variants(with_smoke=False))
def test_config_full_size_builds(name, arg):
    # The real sizes: validated, data loaded, model and optimizer state shapes built (no step).
    cfg = config_lib.load_config(name, arg)
    config_lib.validate(cfg, num_devices=len(jax.devices()))
    for _, scfg in config_lib.stage_configs(cfg):
        tr = loop.build(scfg, _devices(scfg))
        assert tr.num_steps > 0


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_FULL_SIZE else []) for n in CONFIGS],
)
def test_config_default_variant_takes_a_full_size_step(tmp_path, name):
    # char_lm's default (GLA) variant once failed at its first step; every default trains one
    # step (times the regime factor) of its first stage at full size, and evaluates.
    cfg = config_lib.load_config(name)
    _, first = config_lib.stage_configs(cfg)[0]
    first = config_lib.apply_overrides(
        first,
        [
            "train_steps=1",
            "train_epochs=-1",
            "train_examples=-1",
            "progress=False",
            "plot=False",
            "tensorboard=False",
        ],
    )
    res = loop.train(first, str(tmp_path), devices=_devices(first))
    assert res.final_step == res.num_steps == optim.regime_factor(first)
    assert all(np.isfinite(v) for v in res.train_losses.values())
    _check_main_metric(first, res)
