"""Large-batch recipe on all ten digits: LARS or LAMB, Ghost BN, sqrt LR scaling, regime adaptation.

LARS (or LAMB with ``get_config("lamb")``) with Ghost BatchNorm, the square-root learning-rate
scaling rule, warm-up + cosine and Hoffer et al.'s regime adaptation (every step count times
``ceil(batch_size / regime_base_batch_size)``), on all ten digits with a small BN CNN.

Switches (comma separated): ``lamb``, ``agvm`` (AGVM per-module LR multipliers), ``conadv``
(ConAdv adversarial step with auxiliary BN), ``bn_only`` (Frankle et al.: train only BN),
``smoke``.
"""

from jaxblocks.configs.base import base_config, parse_switches

# The switches documented above (the trainer rejects any other).
SWITCHES = ("smoke", "lamb", "agvm", "conadv", "bn_only")


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.model.name = "cnn_tiny"
    c.model.kwargs = {"channels": (16, 32), "num_classes": 10, "ghost_batch_size": 32}
    c.data.name = "digits"
    c.data.classes = tuple(range(10))
    c.data.image_size = 8
    c.data.channels = 1
    c.batch_size = 512
    c.eval_batch_size = 256
    c.train_steps = -1
    c.train_epochs = 30.0
    c.optimizer.name = "lamb" if "lamb" in sw else "lars"
    c.optimizer.learning_rate = 2e-3 if "lamb" in sw else 1.0
    c.optimizer.base_batch_size = 128
    c.optimizer.lr_scaling = "sqrt"
    c.optimizer.weight_decay = 1e-4
    c.optimizer.trust_coefficient = 0.02
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_epochs = 2.0
    c.optimizer.regime_adaptation = True
    c.optimizer.regime_base_batch_size = 256
    c.log_every = 5
    c.eval_every = 20
    if "agvm" in sw:
        c.agvm.enabled = True
        c.agvm.groups = ("conv0", "conv1", "head")
        c.agvm.interval = 5  # start_step: the default, after the warm-up (as official AGVM)
    if "conadv" in sw:
        c.conadv.enabled = True
        c.model.kwargs = dict(c.model.kwargs, aux_bn=True)
    if "bn_only" in sw:
        c.optimizer.freeze = "bn_only"
    if "smoke" in sw:
        c.smoke = True
        c.model.kwargs = dict(c.model.kwargs, channels=(4, 8), ghost_batch_size=8)
        c.batch_size = 64
        c.eval_batch_size = 64
        c.train_epochs = -1.0
        c.train_steps = 3
        c.optimizer.warmup_epochs = -1.0
        c.optimizer.warmup_steps = 1
        c.optimizer.regime_base_batch_size = 32
        c.log_every = 1
        c.eval_every = 3
        c.checkpoint.every_steps = 2
    return c
