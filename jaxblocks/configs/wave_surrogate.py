"""A priori compressed convolutions for a wave simulator (paper 61): a CNN surrogate of the 2-D
wave equation with full 5×5 convolutions against the same network with one-way (CP) ones.

Data: trajectories of the project's leapfrog solver (`jaxblocks.data.wave`) from random
Gaussian bumps; the model maps (u(t−1), u(t)) on a 32×32 grid to u(t+4). The task reports the
relative L2 error on held-out trajectories. The ``variants`` report retrains with one-way
convolutions of rank 1 and 2 at equal steps and tabulates parameters against error.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "field_regression"
    c.model.name = "wave_cnn"
    c.model.kwargs = {}
    c.data.name = "wave2d"
    c.data.image_size = 32
    c.data.num_examples = 2048
    c.batch_size = 32
    c.eval_batch_size = 128
    c.train_steps = 1500
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    c.reports = ("variants",)
    c.variants = (
        {
            "name": "one-way, rank 1",
            "overrides": ("model.kwargs.conv='one_way'", "model.kwargs.rank=1"),
        },
        {
            "name": "one-way, rank 2",
            "overrides": ("model.kwargs.conv='one_way'", "model.kwargs.rank=2"),
        },
    )
    if "smoke" in sw:
        apply_smoke(c)
        c.data.image_size = 16
        c.data.num_examples = 64
        c.variants = c.variants[:1]
    return c
