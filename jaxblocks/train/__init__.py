"""jaxblocks.train: an optax large-batch trainer on a sharded mesh.

Modules (import them directly; importing this package pulls in nothing heavy):

* `config` — `ml_collections` configs (`base_config`, `load_config`, `apply_overrides`, stages).
* `sharding` — `data × fsdp × tensor × sequence` Auto mesh, logical axis rules, `NamedSharding`s,
  the SBP helper `sbp_to_pspec`.
* `state` — `TrainState`, shapes by `jax.eval_shape`, init under `jax.jit(out_shardings=...)`.
* `optim` — SGD/AdamW/LARS/LAMB with masks, LR scaling rules, schedules, regime adaptation,
  BN-only freezing; `agvm` — the AGVM optax transform.
* `step` — the jitted step (default / AGVM / ConAdv variants, in-step gradient accumulation).
* `ring_attention` — ring self-attention with `jax.shard_map` + `ppermute`.
* `checkpoint` — orbax `CheckpointManager` wrapper and SIGTERM guard.
* `metrics` — JSONL, TensorBoard (tensorboardX), progress bar, PNG curves.
* `data`, `loop`, `main_job`, `cli` — datasets, the loop, the `make train` job, the CLI
  (``python -m jaxblocks.train --config ... --workdir ... [key=value ...]``).
"""
