"""The LMUFormer keyword-spotting demo config: wiring, its smoke run through the CLI, and the
streaming claim on its data (recurrent evaluation = parallel evaluation)."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.registry import create_model
from jaxblocks.train import cli
from jaxblocks.train import config as config_lib
from jaxblocks.train.data import make_datasets


def test_config_wires_model_data_and_variants():
    cfg = config_lib.load_config("lmuformer_keywords", "smoke")
    config_lib.validate(cfg, num_devices=1)
    assert cfg.task == "classification" and cfg.data.name == "keywords"
    train, (xt, yt), nc = make_datasets(cfg)
    batch = train.batch(0)
    assert nc == 10
    assert batch["x"].shape == (cfg.batch_size, cfg.data.seq_len, cfg.data.channels)
    assert batch["y"].shape == (cfg.batch_size,) and set(np.unique(yt)) <= set(range(10))
    assert xt.shape == (cfg.data.num_examples // 4, cfg.data.seq_len, cfg.data.channels)
    names = [dict(v)["name"] for v in cfg.variants]
    assert names == ["spiking_lmuformer_ms_gsc", "mlp (flattened frames)"]
    # the full config: CPU-sized (far below the official 1.62M), θ = the sequence length
    full = config_lib.load_config("lmuformer_keywords")
    assert full.model.kwargs["theta"] == full.data.seq_len
    model = create_model(full.model.name, **full.model.kwargs)
    x = jax.ShapeDtypeStruct((2, full.data.seq_len, full.data.channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
    assert 30_000 < n < 200_000


def test_recurrent_evaluation_equals_parallel_on_keywords():
    # the paper's streaming claim on this data: token-by-token LMU evaluation gives the
    # parallel (FFT) evaluation's logits
    cfg = config_lib.load_config("lmuformer_keywords", "smoke")
    train, _, _ = make_datasets(cfg)
    x = jnp.asarray(train.batch(0)["x"][:4])
    model = create_model("lmuformer_gsc", **cfg.model.kwargs)
    v = model.init(jax.random.key(1), x, train=False)
    par = model.apply(v, x, train=False)
    rec = model.apply(v, x, train=False, mode="recurrent")
    assert par.shape == (4, 10)
    np.testing.assert_allclose(rec, par, rtol=1e-4, atol=1e-5)
    # a prefix is a valid input (streaming: the decision so far)
    assert np.isfinite(model.apply(v, x[:, :5], train=False)).all()


def test_cli_smoke_run_reports_the_variants(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--config", "lmuformer_keywords:smoke", "--workdir", "run", "progress=False",
            "plot=False", "tensorboard=False"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    table = (tmp_path / "run" / "variants.md").read_text()
    for name in ("as configured", "spiking_lmuformer_ms_gsc", "mlp (flattened frames)"):
        assert f"| {name} |" in table
    stream = (tmp_path / "run" / "lmuformer_streaming.md").read_text()
    assert "| recurrent (token by token) |" in stream and "| first 50% seen (8 steps) |" in stream
    gap = float(re.search(r"logit gap: ([0-9.]+e[+-][0-9]+)", stream).group(1))
    assert gap < 1e-3
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")
