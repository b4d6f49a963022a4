"""The `make train` main job's final comparison: ConvBN **tune** vs **eval** mode for transfer.

You et al. (arXiv:2305.11624) show that fine-tuning with frozen BN statistics can fold BN into the
conv on the fly ("tune" mode) with exactly the numerics of "eval" mode but without storing the
normalised activations. The job trains the transfer stage in tune mode (the config's stage) and
again in eval mode, and reports for each: test accuracy, the XLA temporary memory of the compiled
train step (`compiled.memory_analysis().temp_size_in_bytes`) and the median step time.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxblocks.train import config as config_lib
from jaxblocks.train import loop
from jaxblocks.train import state as state_lib


def measure_step(
    cfg: ml_collections.ConfigDict, init_from: Any, repeats: int = 8
) -> dict[str, float]:
    """XLA temp bytes and median wall time of the default train step of ``cfg``."""
    tr = loop.build(cfg)
    with tr.mesh_context():
        state, sh, _ = tr.create_state()
        if init_from is not None:
            params, _ = state_lib.merge_params(state.params, init_from["params"])
            bs, _ = state_lib.merge_params(state.batch_stats, init_from.get("batch_stats", {}))
            state = jax.device_put(state.replace(params=params, batch_stats=bs), sh)
        step = loop.compile_steps(tr, sh)["default"]
        batch = loop._global_batch(tr, 0)
        compiled = step.lower(state, batch).compile()
        mem = compiled.memory_analysis()
        temp = float(getattr(mem, "temp_size_in_bytes", float("nan"))) if mem else float("nan")
        state, m = compiled(state, batch)  # warm-up
        jax.block_until_ready(m)
        times = []
        for i in range(repeats):
            b = loop._global_batch(tr, i + 1)
            t0 = time.perf_counter()
            state, m = compiled(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    return {"temp_bytes": temp, "step_s": float(np.median(times))}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| ConvBN mode | test accuracy | XLA temp memory (MiB) | step time (ms) |"
    sep = "|---|---|---|---|"
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['accuracy']:.4f} | {r['temp_bytes'] / 2**20:.2f} | "
            f"{r['step_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def compare_convbn_modes(cfg: ml_collections.ConfigDict, workdir: str, results) -> str:
    """Re-run the last stage in ConvBN eval mode and tabulate tune vs eval."""
    stages = config_lib.stage_configs(cfg)
    if len(stages) < 2 or len(results) < len(stages):
        raise ValueError(
            "compare_convbn_modes: needs a finished multi-stage (pretrain, transfer) run"
        )
    (name, tune_cfg), init = stages[-1], results[-2][1].state
    init_from = {"params": init.params, "batch_stats": init.batch_stats}
    eval_cfg = config_lib.apply_overrides(tune_cfg, ["model.train_kwargs.mode='eval'"])
    eval_res = loop.train(
        eval_cfg, os.path.join(workdir, f"{name}_eval_mode"), init_from=init_from,
        description=f"{name} (eval mode)",
    )  # fmt: skip
    rows = []
    for mode, c, res in (("tune", tune_cfg, results[-1][1]), ("eval", eval_cfg, eval_res)):
        # Measure from the pretrained weights with a fresh head, as the stage itself started.
        m = measure_step(c, {"params": _drop(init_from["params"], c.transfer_reinit),
                             "batch_stats": init_from["batch_stats"]})  # fmt: skip
        rows.append({"mode": mode, "accuracy": res.eval_metrics.get("accuracy", float("nan")),
                     **m})  # fmt: skip
    table = format_table(rows)
    with open(os.path.join(workdir, "convbn_modes.md"), "w") as f:
        f.write(table + "\n")
    return table


def _drop(params: dict, names) -> dict:
    return {k: v for k, v in params.items() if k not in tuple(names)}
