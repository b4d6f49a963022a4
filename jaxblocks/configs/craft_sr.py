"""CRAFT ×3 super-resolution on scikit-learn's sample photographs, beside ESPCN and bicubic
(Li et al., ICCV 2023, arXiv 2308.05022).

The data and task of ``espcn_sr``: 33×33 luminance crops, inputs downscaled ×3 (11×11), MSE
loss, PSNR on held-out crops from other columns of the same photographs
(`jaxblocks.data.sr_images`). The model is a CPU-sized CRAFT (`jaxblocks.models.craft`): one
channel (no mean subtracted), width 32, two residual groups of one CRAFT unit (SRWAB pair, HFERB,
HFB), 2 heads, the official 4×16 / 16×4 windows; the 11×11 inputs are mirror-padded to 16×16
inside the model and the output cropped (the official inference script pads likewise).
About 56K parameters where the released ×3 model has 744K.

Reports: ``sr_baseline`` prints CRAFT's test PSNR beside bicubic upscaling of the same inputs,
``variants`` retrains ESPCN (the paper's 3-layer tanh net, 22,729 parameters, its own learning
rate) on the same data, seed and steps, so the three PSNRs read side by side.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "super_resolution"
    c.model.name = "craft_x3"
    c.model.kwargs = {
        "in_chans": 1,
        "embed_dim": 32,
        "depths": (1, 1),
        "num_heads": (2, 2),
    }
    c.data.name = "sr_sample_images"
    c.data.image_size = 33
    c.data.scale = 3
    c.data.num_examples = 4096
    c.batch_size = 32
    c.eval_batch_size = 256
    c.train_steps = 2000
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint.every_steps = 1000
    c.variants = (
        {
            "name": "espcn",
            "overrides": ("model.name='espcn'", "model.kwargs={}", "optimizer.learning_rate=3e-3"),
        },
    )
    c.reports = ("sr_baseline", "variants")
    if "smoke" in sw:
        apply_smoke(c)
        c.data.num_examples = 64
        c.model.kwargs = {"in_chans": 1, "embed_dim": 32, "depths": (1,), "num_heads": (2,)}
    return c
