"""3-D segmentation of synthetic ellipsoid volumes: a small STU-Net against the reversible MBConv
U-Net at similar width.

STU-Net (Huang et al., https://arxiv.org/abs/2304.06716, `stunet_s`'s blocks at widths 8–64
with three pooling stages) learns to label two ellipsoid classes and the background in noisy
24³ volumes (`jaxblocks.data.ellipsoids`) under voxel cross-entropy (the ``segmentation`` task:
mean foreground Dice and voxel accuracy reported). The ``variants`` report retrains the
reversible MBConv U-Net of Pendse et al. (`rev_mbconv_unet3d`, arXiv 2009.06835) on the same
data and tabulates parameters and test metrics.

200 steps of batch 8 per model, to keep the demo in minutes on a 2-core CPU (a 600-step run
took about 5 s per step there; its training loss went 0.029 / 0.014 / 0.008 at steps
100 / 200 / 400, so longer runs still improve slowly). ``get_config("smoke")`` shrinks it to a
few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "segmentation"
    c.model.name = "stunet_s"
    c.model.kwargs = {"depth": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "num_classes": 3}
    c.data.name = "ellipsoids3d"
    c.data.image_size = 24
    c.data.classes = (0, 1, 2)
    c.data.num_examples = 256
    c.batch_size = 8
    c.eval_batch_size = 16
    c.train_steps = 200
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20
    c.variants = (
        {
            "name": "rev_mbconv_unet3d",
            "overrides": (
                "model.name='rev_mbconv_unet3d'",
                "model.kwargs={'widths': (8, 16, 32, 64), 'blocks': 2, 'num_classes': 3}",
            ),
        },
    )
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint.every_steps = 200
    c.reports = ("variants",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=3, eval_batch_size=8)
        c.batch_size = 8
        c.model.kwargs = {"depth": (1, 1), "dims": (4, 8), "num_classes": 3}
        c.variants = (
            {
                "name": "rev_mbconv_unet3d",
                "overrides": (
                    "model.name='rev_mbconv_unet3d'",
                    "model.kwargs={'widths': (4, 8), 'blocks': 1, 'num_classes': 3}",
                ),
            },
        )
        c.data.image_size = 8
        c.data.num_examples = 16
    return c
