"""jaxblocks.train: an optax large-batch trainer on a sharded mesh.

Modules (import them directly; importing this package pulls in nothing heavy):

* `config` — `ml_collections` configs (`base_config`, `load_config`, `apply_overrides`, stages).
* `sharding` — `data × fsdp × tensor × sequence` Auto mesh, logical axis rules, `NamedSharding`s,
  the SBP helper `sbp_to_pspec`.
* `state` — `TrainState`, shapes by `jax.eval_shape`, init under `jax.jit(out_shardings=...)`.
* `optim` — SGD/AdamW/LARS/LAMB with masks, LR scaling rules, schedules, regime adaptation,
  per-parameter-group learning rates and weight decay, BN-only freezing (`bn_only`: the mask,
  optimizer wrapper and re-initialisation); `agvm` — the AGVM optax transform.
* `step` — the jitted step (default / AGVM / ConAdv variants, in-step gradient accumulation),
  carrying every non-parameter collection of the model.
* `checkpoint` — orbax `CheckpointManager` wrapper and SIGTERM guard.
* `metrics` — JSONL, TensorBoard (tensorboardX), progress bar, PNG curves.
* `data`, `loop`, `reports`, `cli` — datasets, the one training loop, its report hooks (the
  `make train` job's ConvBN tune-vs-eval table), the CLI
  (``python -m jaxblocks.train --config ... --workdir ... [key=value ...]``).

The config schema is `jaxblocks.configs.base` (re-exported by `config`).
"""
