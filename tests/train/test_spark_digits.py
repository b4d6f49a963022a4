"""The SparK demo (`spark_digits`) end to end in smoke mode: masked pretraining of a ResNet,
fine-tuning from it, the from-scratch variant, and the table comparing them."""

import os

import numpy as np

from jaxblocks.train import cli
from jaxblocks.train import config as config_lib
from jaxblocks.train.metrics import read_metrics


def test_spark_digits_stages_share_the_encoder_kwargs():
    cfg = config_lib.load_config("spark_digits", "smoke")
    (p, pre), (f, fine) = config_lib.stage_configs(cfg)
    assert (p, f) == ("pretrain", "finetune")
    assert pre.task == "masked_pretraining" and pre.model.name == "spark"
    assert fine.task == "classification" and fine.model.name == "resnet18"
    enc = {k: v for k, v in pre.model.kwargs.items() if k not in ("encoder", "decoder_width",
                                                                  "mask_ratio")}  # fmt: skip
    assert enc == dict(fine.model.kwargs)
    assert pre.model.kwargs.mask_ratio == 0.6 and pre.model.kwargs.encoder == fine.model.name
    assert fine.train_steps == cfg.stages[1]["train_steps"]  # the variant retrains these steps


def test_spark_digits_smoke_cli(tmp_path, capsys):
    rc = cli.main(["--config", "spark_digits:smoke", "--workdir", str(tmp_path),
                   "progress=False", "plot=False", "tensorboard=False"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "[pretrain] step 2/2  eval  loss=" in out and "masked_mse=" in out
    recs = read_metrics(str(tmp_path / "pretrain" / "metrics.jsonl"))
    evals = [r for r in recs if r["split"] == "eval"]
    assert evals and 0 < evals[-1]["loss"] < 10 and np.isfinite(evals[-1]["masked_mse"])
    for stage in ("pretrain", "finetune", "variant_0"):
        assert os.path.isdir(tmp_path / stage / "checkpoints" / "2")
    table = (tmp_path / "variants.md").read_text()
    rows = {ln.split("|")[1].strip(): ln.split("|")[3].strip() for ln in table.splitlines()[2:]}
    assert set(rows) == {"as configured", "from scratch (same fine-tune steps)"}
    assert all(0.0 <= float(acc) <= 1.0 for acc in rows.values())
