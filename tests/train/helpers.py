"""Shared helpers for the trainer tests: tiny configs and an in-process step runner."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np

from jaxblocks.train import config as config_lib
from jaxblocks.train import loop


def tiny_config(model: str = "mlp_tiny", **over) -> config_lib.ml_collections.ConfigDict:
    cfg = config_lib.base_config()
    cfg.model.name = model
    cfg.data.num_examples = 256
    cfg.batch_size = 32
    cfg.eval_batch_size = 32
    cfg.train_steps = 6
    cfg.progress = False
    cfg.tensorboard = False
    cfg.plot = False
    cfg.log_every = 1
    cfg.eval_every = 0
    cfg.optimizer.schedule = "constant"
    cfg.checkpoint.every_steps = 2
    for k, v in over.items():
        node = cfg
        parts = k.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return cfg


def run_steps(cfg, num_steps: int, devices=None) -> tuple[list[float], object]:
    """Build, init and run ``num_steps`` train steps in process; returns losses and the state."""
    tr = loop.build(cfg, devices)
    with tr.mesh_context():
        state, sh, _ = tr.create_state()
        steps = loop.compile_steps(tr, sh)
        losses = []
        for s in range(num_steps):
            state, m = steps["default"](state, loop._global_batch(tr, s))
            losses.append(float(jax.device_get(m["loss"])))
    return losses, state


def to_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


@contextlib.contextmanager
def conadv_started(cfg) -> Iterator[tuple[object, dict, object, dict]]:
    """Build a ConAdv trainer, init its state and fill ``x_adv`` for batch 0; yields
    ``(trainer, steps, state, batch0)`` inside the trainer's mesh context."""
    tr = loop.build(cfg)
    with tr.mesh_context():
        state, sh, _ = tr.create_state()
        steps = loop.compile_steps(tr, sh)
        b0 = loop._global_batch(tr, 0)
        state = steps["adv_init"](state, {"x": b0["x"], "y": b0["y"]})
        yield tr, steps, state, b0
