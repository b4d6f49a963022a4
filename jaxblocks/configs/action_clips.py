"""TS-LSTM and Temporal-Inception on synthetic action clips, against mean pooling over frames.

Ma, Chen, Kira, AlRegib, "TS-LSTM and Temporal-Inception: Exploiting Spatiotemporal Dynamics for
Activity Recognition", https://arxiv.org/abs/1703.10667. A `cnn_tiny` frame network feeds
`FrameFeatureClassifier` heads on 8-frame 16×16 clips of a blob moving right/left/down/up or
growing/shrinking (`jaxblocks.data.action_clips`). The classes come in time-reversed pairs, so
mean pooling of frame features cannot tell a pair apart; the ``variants`` report retrains the
same network with the Temporal-Inception head and with mean pooling and tabulates the test
accuracy of all three (same data, seed and steps).

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "classification"
    c.model.name = "ts_lstm_clips"
    c.model.kwargs = {"num_classes": 6, "features": 32, "backbone_kwargs": {"channels": (8, 16)}}
    c.data.name = "action_clips"
    c.data.num_examples = 2048
    c.data.image_size = 16
    c.data.seq_len = 8
    c.batch_size = 32
    c.eval_batch_size = 128
    c.train_steps = 2000
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 30
    c.variants = (
        {"name": "temporal-inception", "overrides": ("model.name='temporal_inception_clips'",)},
        {"name": "mean pooling", "overrides": ("model.name='avg_pool_clips'",)},
    )
    c.log_every = 100
    c.eval_every = 0
    c.checkpoint.every_steps = 2000
    c.reports = ("variants",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=3, eval_batch_size=16)
        c.data.num_examples = 64
        c.variants = c.variants[:1]
    return c
