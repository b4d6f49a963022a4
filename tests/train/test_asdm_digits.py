"""The A-SDM demo config (`jaxblocks.configs.asdm_digits`, paper 49): its incubation stages
build valid students at both sizes (no training), and the smoke run through the CLI (slow)."""

import jax
import jax.numpy as jnp
import pytest

from jaxblocks.registry import create_model
from jaxblocks.train import cli
from jaxblocks.train import config as config_lib


@pytest.mark.parametrize("switch", [None, "smoke"])
def test_asdm_stages_build_progressively_pruned_students(switch):
    cfg = config_lib.load_config("asdm_digits", switch)
    config_lib.validate(cfg)
    assert cfg.reports == ("asdm",) and cfg.task == "diffusion"
    removed_before: tuple = ()
    for st in cfg.variants:
        c = config_lib.apply_overrides(cfg, list(st["overrides"]))
        config_lib.validate(c)
        config_lib.check_model_kwargs(c)
        assert c.task == "diffusion_distill"
        model = create_model(c.model.name, **dict(c.model.kwargs))
        # Incubation: each stage removes a superset of the previous stage's blocks.
        assert set(removed_before) < set(model.removed)
        removed_before = model.removed
        x = jax.ShapeDtypeStruct((2, 8, 8, 2), jnp.float32)  # packed images + label
        out = jax.eval_shape(lambda x, m=model: m.init_with_output(jax.random.key(0), x)[0], x)
        assert out.shape == (2, 4)
    assert model.condconv and model.gri_window == 2  # the final student


# ~2 min of CPU: three trainer runs (teacher, two incubation stages) and sampling both models.
@pytest.mark.slow
def test_asdm_digits_smoke_cli(tmp_path, capsys):
    rc = cli.main(["--config", "asdm_digits:smoke", "--workdir", str(tmp_path),
                   "progress=False", "plot=False", "tensorboard=False"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "| teacher |" in out and "| A-SDM student |" in out
    assert (tmp_path / "asdm_samples.png").stat().st_size > 0
    assert (tmp_path / "asdm_stage_1" / "checkpoints").is_dir()
