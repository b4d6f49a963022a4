"""HNeRV video fitting beside NeRV++ at equal size (Chen et al., CVPR 2023, arXiv 2304.02633;
Ghorbel et al., arXiv 2402.18305).

The data: one synthetic video (`jaxblocks.data.moving_shapes`, 32 frames of 32×32 RGB: moving,
bouncing shapes over a drifting texture); every example is (frame, frame) and the test set is
the same frames, as HNeRV fits (and scores) the video it stores. The model: `hnerv_video_demo`
(`jaxblocks.models.hnerv`): ConvNeXt encoder with strides 2,2,2,2 to a 2×2×16 embedding per
frame, 1×1 stem to 32 channels, four NeRV blocks (kernels 1,3,5,5, width /1.2 per stage, floor
12), (tanh + 1)/2 head; about 108K parameters, 92.7K of them stored (the decoder). Loss MSE (the
README's ``--loss L2``), Adam at the official 1e-3 with cosine decay, batch 8, 1000 steps.

Reports: ``video_fitting`` prints the PSNR per frame (mean, min) in float, with 6-bit embeddings
and with 8-bit decoder weights too, and the bits per pixel; ``variants`` retrains NeRV++
(`nervpp_video_demo`: SCRB → NeRV block → SCRB with a bilinear skip per stage, fc_dim 29,
about 107K parameters, within 1% of HNeRV's) on the same data, seed and steps.

Measured (about 14 min wall on a heavily shared 2-core CPU): HNeRV 31.27 dB mean PSNR (min
29.91), 31.24 dB with 6-bit embeddings and 8-bit weights at 23.0 bpp; NeRV++ 30.83 dB.

``get_config("smoke")`` shrinks it to a few steps for CPU tests (without the NeRV++ retraining).
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "video_fitting"
    c.model.name = "hnerv_video_demo"
    c.model.kwargs = {}
    c.data.name = "moving_shapes_video"
    c.data.image_size = 32
    c.data.seq_len = 32  # frames
    c.batch_size = 8  # divisible by the test suite's 8 CPU devices
    c.eval_batch_size = 32
    c.train_steps = 1000
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.b2 = 0.999
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 100  # the official cosine_0.1_1_0.1: linear warm-up over 10%
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    c.variants = (
        {"name": "nerv++ (equal size)", "overrides": ("model.name='nervpp_video_demo'",)},
    )
    c.reports = ("video_fitting", "variants")
    if "smoke" in sw:
        apply_smoke(c, batch_size=8, eval_batch_size=8)
        c.data.seq_len = 8
        c.data.image_size = 16
        c.model.kwargs = {"frame_size": (16, 16), "enc_dims": (8, 8, 8, 8), "fc_dim": 16,
                          "lower_width": 4}  # fmt: skip
        # The NeRV++ retraining (~40 s of compiles) is left to the full run: its override is
        # checked by test_configs_smoke.py's variants test, the model by the registry's tests.
        c.variants = ()
        c.reports = ("video_fitting",)
    return c
