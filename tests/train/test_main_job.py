"""The `make train` main job (ConvBN ResNet digits transfer) end to end in smoke mode."""

import os

from jaxblocks.train import cli
from jaxblocks.train.metrics import read_metrics


def test_main_job_smoke(tmp_path, capsys):
    rc = cli.main(
        ["--config", cli.DEFAULT_CONFIG + ":smoke", "--workdir", str(tmp_path), "progress=False"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "[pretrain] 3 steps" in out and "[transfer] 3 steps" in out
    assert "| tune |" in out and "| eval |" in out
    rows = {
        ln.split("|")[1].strip(): ln.split("|")[2:5]
        for ln in out.splitlines()
        if ln.startswith("| tune") or ln.startswith("| eval")
    }
    # Tune mode is eval mode's numerics (same accuracy) with less temporary memory.
    assert rows["tune"][0] == rows["eval"][0]
    assert float(rows["tune"][1]) < float(rows["eval"][1])
    for stage in ("pretrain", "transfer", "transfer_eval_mode"):
        d = tmp_path / stage
        assert os.path.exists(d / "curves.png")
        assert os.path.isdir(d / "checkpoints" / "3")
        assert read_metrics(str(d / "metrics.jsonl"))
    assert (tmp_path / "convbn_modes.md").read_text().startswith("| ConvBN mode")
