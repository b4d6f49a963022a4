"""ESPCN ×3 super-resolution on scikit-learn's sample photographs (Shi et al., arXiv 1609.05158).

The paper's 3-layer tanh ESPCN (`jaxblocks.models.espcn`, 22,729 parameters) trained on 33×33
luminance crops (inputs: the crops downscaled ×3, 11×11) with an MSE loss, and evaluated by PSNR
on held-out crops from other columns of the same photographs (`jaxblocks.data.sr_images`).
The ``sr_baseline`` report prints the model's PSNR beside bicubic upscaling of the same inputs.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "super_resolution"
    c.model.name = "espcn"
    c.model.kwargs = {}
    c.data.name = "sr_sample_images"
    c.data.image_size = 33
    c.data.scale = 3
    c.data.num_examples = 16384
    c.batch_size = 64
    c.eval_batch_size = 256
    c.train_steps = 8000
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint.every_steps = 2000
    c.reports = ("sr_baseline",)
    if "smoke" in sw:
        apply_smoke(c)
        c.data.num_examples = 64
    return c
