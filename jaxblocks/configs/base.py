"""The trainer's config schema: `base_config` documents every field the trainer reads.

Experiment files (``jaxblocks/configs/<name>.py``) start from `base_config()` and change what they
need; ``get_config(arg)`` takes a comma list of switches read with `parse_switches`. This module
imports nothing from `jaxblocks.train` (the trainer imports the configs, never the reverse); the
trainer's loading, overrides and validation live in `jaxblocks.train.config`.
"""

from __future__ import annotations

import ml_collections

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
SCHEDULES = ("constant", "cosine", "step")
LR_SCALING = ("none", "linear", "sqrt")
FREEZE = ("none", "bn_only")


def base_config() -> ml_collections.ConfigDict:
    """All trainer fields with defaults. Durations: set exactly one of ``*_steps``,
    ``*_epochs``, ``*_examples`` (the others ``-1``)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"  # a `jaxblocks.train.tasks.TASKS` name (classification, lm, ...)
    c.smoke = False

    # Model: built with `jaxblocks.registry.create_model(name, **kwargs)`.
    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp_tiny"
    c.model.kwargs = ml_collections.ConfigDict()
    # ConvBN mode around training (`jaxblocks.layers.convbn_mode`); the trainer's one mode knob.
    # "" (or "train"): ordinary training — the model is called with train=True in training steps
    # (batch statistics, running statistics updated) and train=False in evaluation.
    # "eval" / "tune" / "deploy": every call (init, train and eval steps) runs inside
    # `convbn_mode(<mode>)` and training steps pass train=False, so each ConvBN/LinearBN runs in
    # that running-statistics mode (tune: You et al. 2023's memory-lean fine-tuning) and plain
    # BatchNorm layers use their running statistics too. Models without a `train` argument get
    # neither (their ConvBNs, if any, follow the context).
    c.model.convbn_mode = ""
    # First-layer initialiser of models that take `first_kernel_init` (e.g. `cnn_tiny`): "" =
    # the model's own, else a name of `jaxblocks.layers.filter_init.BANKS` (he_normal,
    # orthogonal, gabor, dct; pca and kmeans learn their filters from training-image patches).
    c.model.filter_bank = ""

    # Data (see `jaxblocks.train.data.make_dataset`).
    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"  # a `jaxblocks.train.data.DATASETS` name (synthetic, digits, ...)
    c.data.classes = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    c.data.image_size = 8
    c.data.channels = 1
    c.data.num_examples = 512  # synthetic only
    c.data.seq_len = 32  # stdlib_text only
    c.data.max_bytes = 200_000  # stdlib_text only
    c.data.scale = 3  # sr_sample_images only: high-res crops of image_size, downscaled this much

    c.batch_size = 64  # global batch, split over the mesh's data × fsdp axes
    c.eval_batch_size = 128
    c.accum_steps = 1  # microbatches per step (lax.scan inside the jitted step)
    c.train_steps = 100
    c.train_epochs = -1.0
    c.train_examples = -1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # one of OPTIMIZERS
    c.optimizer.learning_rate = 0.1  # at `base_batch_size`, before the scaling rule
    c.optimizer.lr_scaling = "none"  # none | linear (B/base) | sqrt (sqrt(B/base))
    c.optimizer.base_batch_size = 256
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.0
    c.optimizer.trust_coefficient = 0.001  # LARS
    c.optimizer.grad_clip_norm = 0.0  # 0 = off
    c.optimizer.schedule = "cosine"  # one of SCHEDULES
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_epochs = -1.0
    c.optimizer.warmup_examples = -1
    c.optimizer.step_boundaries = (0.5, 0.75)  # fractions of training, "step" schedule
    c.optimizer.step_decay = 0.1
    c.optimizer.end_lr_fraction = 0.0
    # Hoffer et al. 2017 regime adaptation: scale every step count by ceil(B / regime_base_batch).
    c.optimizer.regime_adaptation = False
    c.optimizer.regime_base_batch_size = 128
    c.optimizer.freeze = "none"  # none | bn_only (Frankle et al.: train only BN scale and bias)
    # BN-only init: uniform (gamma ~ U[0, 1], the paper's), fixed, oneone, positivenegative, keep
    c.optimizer.bn_only_init = "uniform"
    # Per-parameter-group learning rate and weight decay: a tuple of dicts
    # {"pattern": regex, "lr": float, "weight_decay": float} ("lr"/"weight_decay" optional: the
    # defaults above). `pattern` is matched (re.search) against the "/"-joined parameter path
    # (e.g. "mixer0/kernel"); the first group that matches a parameter owns it. "lr" is that
    # group's peak rate in the units of `learning_rate` (the same warm-up/decay shape and batch
    # scaling rule apply). Safari's long convolutions: the kernel gets its own lr and no decay.
    c.optimizer.param_groups = ()
    # Gradual magnitude pruning (Zhu & Gupta; `jaxblocks.compress.prune`): sparsity rises from
    # `initial` to `final` between the fractions `begin` and `end` of the run, masks recomputed
    # every `frequency` steps over the params matching `include`, in 1 x `block` blocks of the
    # last axis; pruned weights stay exactly zero. final = 0: off.
    c.optimizer.pruning = ml_collections.ConfigDict()
    c.optimizer.pruning.final = 0.0
    c.optimizer.pruning.initial = 0.0
    c.optimizer.pruning.begin = 0.1
    c.optimizer.pruning.end = 0.6
    c.optimizer.pruning.frequency = 10
    c.optimizer.pruning.include = r"kernel$"
    c.optimizer.pruning.block = 1
    # The `pruning_sweep` report retrains the run at each of these final sparsities.
    c.optimizer.pruning.sweep = ()

    # AGVM (Xue et al. 2022): per-group LR multipliers from the gradient variance.
    c.agvm = ml_collections.ConfigDict()
    c.agvm.enabled = False
    c.agvm.groups = ()  # top-level param names forming groups, in order; group 0 = the reference
    c.agvm.interval = 5
    # First step the multipliers are refreshed and applied; -1 = after the learning-rate warm-up
    # (the official AgvmOptimizerHook warns when lr_update_start_iter < warmup_iters).
    c.agvm.start_step = -1
    c.agvm.momentum = 0.97
    # Gradients in the cosine: auto (adam for adamw/lamb, none for sgd/lars) | none | adam
    c.agvm.precondition = "auto"

    # ConAdv (Liu et al. 2022): adversarial inputs for the next batch from the stale params.
    c.conadv = ml_collections.ConfigDict()
    c.conadv.enabled = False
    c.conadv.epsilon = 0.03
    c.conadv.adv_weight = 1.0

    # Penalties added to the training loss (`jaxblocks.train.regularizers`), logged as metrics.
    c.regularizers = ml_collections.ConfigDict()
    # Orthogonal convolutions (Achour et al. 2022): lorth_weight * sum of `lorth_penalty` over
    # the 4-D conv kernels whose "/"-joined path matches lorth_include (re.search); 0 = off.
    c.regularizers.lorth_weight = 0.0
    c.regularizers.lorth_include = r"kernel$"
    # ((regex, stride), ...): the stride of each matching kernel (first match wins, else 1).
    c.regularizers.lorth_strides = ()
    # MST-compression (Vo et al. 2023): mst_weight * sum of `mst_distance_penalty` (relaxed
    # Hamming length of the channels' minimum spanning tree) over the binary kernels whose path
    # matches mst_include; 0 = off.
    c.regularizers.mst_weight = 0.0
    c.regularizers.mst_include = r"binary_\d+/kernel$"
    c.regularizers.mst_temperature = 1.0

    # The `variants` report retrains the last stage once per entry, a dict
    # {"name": str, "overrides": ("key=value", ...)}, and tabulates parameters and the metric.
    c.variants = ()

    c.mixed_precision = False  # bf16 compute (model kwarg dtype), fp32 params and opt state

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    # Resume even if a field that changes the run differs from the config saved in the workdir
    # (`jaxblocks.train.checkpoint.check_config`); the CLI's --allow-config-change sets it.
    c.allow_config_change = False
    # Resuming a workdir whose saved config (workdir/config.json) differs in a field that changes
    # the run is an error unless this is True (`jaxblocks.train.checkpoint.check_config`; CLI
    # --allow-config-change). Logging, evaluation, checkpoint cadence and the mesh may always
    # differ (`jaxblocks.train.checkpoint.RESUME_FREE_FIELDS`).
    c.allow_config_change = False

    c.step_delay_s = 0.0  # sleep after each step: makes preemption tests deterministic
    c.log_every = 10
    c.eval_every = 50
    c.progress = True
    c.tensorboard = True
    c.plot = True

    c.stages = ()  # tuple of override dicts (see module docstring)
    c.transfer_reinit = ()  # top-level param names re-initialised when starting from a stage
    # Report hooks run after the last stage (`jaxblocks.train.reports.REPORTS`), each written to
    # workdir/<name>.md and printed by the CLI: "convbn_modes" repeats the last stage in ConvBN
    # eval mode and tabulates it against the stage's own mode (accuracy, XLA temp memory, time).
    c.reports = ()
    return c


def apply_smoke(
    c: ml_collections.ConfigDict,
    *,
    train_steps: int = 3,
    batch_size: int = 16,
    eval_batch_size: int = 16,
) -> ml_collections.ConfigDict:
    """The ``smoke`` switch's common part for a single-stage config: a few steps of small
    batches, logged and evaluated at every step, a checkpoint every 2 steps (the config then
    shrinks its own model and data)."""
    c.smoke = True
    c.batch_size = batch_size
    c.eval_batch_size = eval_batch_size
    c.train_steps = train_steps
    c.optimizer.warmup_steps = 1
    c.log_every = 1
    c.eval_every = train_steps
    c.checkpoint.every_steps = 2
    return c


def parse_switches(arg: str | None) -> set[str]:
    """``"smoke, lamb"`` -> ``{"smoke", "lamb"}`` (empty for None or "")."""
    return {s.strip() for s in (arg or "").split(",") if s.strip()}
