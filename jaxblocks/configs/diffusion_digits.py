"""Label-conditioned diffusion UNet on 8×8 digits: v-prediction, zero terminal SNR, CFG.

`diffusion_unet_digits` (`jaxblocks.models.diffusion_unet`, ~0.65M parameters) learns the
``diffusion`` task on scikit-learn's digits in [-1, 1] with their label packed as a channel:
MSE on v (Salimans & Ho) at uniformly drawn timesteps of Stable Diffusion's schedule rescaled to
zero terminal SNR (Lin et al., arXiv 2305.08891), the label dropped to the null label 10% of the
time for classifier-free guidance. The ``diffusion_samples`` report samples every digit with
50 "trailing" DDIM steps and guidance 2, saves the grid and compares the samples' mean
brightness with the data and a digit classifier's accuracy on them. This is the host model of
papers 23 (One More Step, `oms_digits`) and 49.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "diffusion"
    c.model.name = "diffusion_unet_digits"
    c.model.kwargs = {}
    c.data.name = "diffusion_digits"
    c.data.image_size = 8
    c.data.channels = 1
    c.batch_size = 128
    c.eval_batch_size = 256
    c.train_steps = 1500
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 100
    c.optimizer.grad_clip_norm = 1.0
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    c.reports = ("diffusion_samples",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=2, eval_batch_size=256)
        c.model.kwargs = {"widths": (8, 16), "num_groups": 4, "num_heads": 2}
    return c
