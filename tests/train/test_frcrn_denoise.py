"""The FRCRN denoising demo config: its pieces (fast) and its smoke run (slow here; the fast
suite runs the same smoke run in tests/train/test_configs_smoke.py)."""

import jax
import numpy as np
import pytest

from jaxblocks.registry import create_model
from jaxblocks.train import config as config_lib
from jaxblocks.train import loop
from jaxblocks.train.data import make_datasets
from jaxblocks.train.tasks import get_task


def test_config_wires_model_data_and_task():
    cfg = config_lib.load_config("frcrn_denoise", "smoke")
    config_lib.validate(cfg, num_devices=1)
    assert cfg.task == "enhancement" and get_task(cfg.task).main_metric == "si_sdri"
    train, (xt, yt), _ = make_datasets(cfg)
    batch = train.batch(0)
    assert batch["x"].shape == (cfg.batch_size, cfg.data.seq_len)
    assert batch["y"].shape == (cfg.batch_size, cfg.data.seq_len, 2)
    np.testing.assert_array_equal(batch["x"], batch["y"][..., 1])
    assert xt.shape[0] == cfg.data.num_examples // 4 and not np.allclose(xt[0], batch["x"][0])
    full = config_lib.load_config("frcrn_denoise")
    assert full.model.name == "frcrn_tiny" and create_model(full.model.name).num_unets == 2


@pytest.mark.slow
def test_smoke_run_reports_the_improvement(tmp_path):
    cfg = config_lib.load_config("frcrn_denoise", "smoke")
    cfg = config_lib.apply_overrides(cfg, ["progress=False", "plot=False", "tensorboard=False"])
    res = loop.train(cfg, str(tmp_path), devices=jax.devices()[:1])
    assert res.final_step == cfg.train_steps
    for k in ("loss", "si_sdr", "si_sdri", "snri"):
        assert np.isfinite(res.eval_metrics[k])
    np.testing.assert_allclose(res.eval_metrics["loss"], -res.eval_metrics["si_sdr"], rtol=1e-5)
