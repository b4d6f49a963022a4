"""MST-compression on the digits: a binary CNN trained with and without the MST regulariser.

Vo et al., "MST-compression: Compressing and Accelerating Binary Neural Networks with Minimum
Spanning Tree", https://arxiv.org/abs/2308.13735. `bnn_small` (a real stem and classifier,
four `BinaryConv` + BN layers) learns scikit-learn's digits resized to 16×16 with
``regularizers.mst_weight`` times the relaxed length of every binary layer's minimum spanning
tree over its output channels (`jaxblocks.compress.mst_distance_penalty`) added to the loss.
The ``mst_compression`` report retrains without the regulariser and tabulates test accuracy
beside each run's total MST length, tree depth and the XNOR/popcount operations per output
position of dense vs MST-ordered evaluation (`jaxblocks.compress.count_ops`; the MST order is
exact, `jaxblocks.compress.delta_conv`).

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "classification"
    c.model.name = "bnn_small"
    c.model.kwargs = {"num_classes": 10}
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    c.batch_size = 64
    c.eval_batch_size = 256
    c.train_steps = 2000
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.regularizers.mst_weight = 2e-4
    c.regularizers.mst_temperature = 1.0
    c.variants = ({"name": "no MST regulariser", "overrides": ("regularizers.mst_weight=0.0",)},)
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    c.reports = ("mst_compression",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=4, eval_batch_size=32)
        c.model.kwargs = {"num_classes": 10, "stem": 8, "widths": (16, 16), "strides": (1, 2)}
        c.data.image_size = 8
    return c
