"""Fast Sparse ConvNets on the digits: MobileNetV2's 1×1 convolutions pruned to 70–95 %.

Elsen, Dukhan, Gale, Simonyan, "Fast Sparse ConvNets", https://arxiv.org/abs/1911.09723: gradual
magnitude pruning (Zhu & Gupta's cubic schedule, `jaxblocks.compress.prune`) of every 1×1
convolution (expand, project and the last 1×1) of a MobileNetV2, the first convolution, the
depthwise convolutions and the classifier left dense as in the paper. scikit-learn's 8×8 digits
resized to 16×16, MobileNetV2 at width 0.5. The ``pruning_sweep`` report retrains at 0, 70, 80,
90 and 95 % and tabulates test accuracy against the measured sparsity of the pruned kernels.
``blocks4`` prunes whole 1×4 blocks of output channels (the paper's blocked variant, the layout
`jaxblocks.compress.to_block_sparse` stores for inference).

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke", "blocks4")

# Every 1×1 convolution of MobileNetV2: expand/project of the inverted residuals and the last
# 1×1 (features_18); not features_0 (the 3×3 stem), the depthwise convs or the classifier.
POINTWISE = r"features_\d+/(expand|project)/kernel$|features_18/kernel$"


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "classification"
    c.model.name = "mobilenet_v2"
    c.model.kwargs = {"width_multiplier": 0.5, "num_classes": 10}
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    c.batch_size = 64
    c.eval_batch_size = 256
    c.train_steps = 1500
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.optimizer.pruning.final = 0.9
    c.optimizer.pruning.begin = 0.1
    c.optimizer.pruning.end = 0.6
    c.optimizer.pruning.frequency = 25
    c.optimizer.pruning.include = POINTWISE
    c.optimizer.pruning.block = 4 if "blocks4" in sw else 1
    c.optimizer.pruning.sweep = (0.0, 0.7, 0.8, 0.9, 0.95)
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    c.reports = ("pruning_sweep",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=4, eval_batch_size=32)
        c.model.kwargs = {"width_multiplier": 0.25, "num_classes": 10}
        c.data.image_size = 8
        c.optimizer.pruning.frequency = 1
        c.optimizer.pruning.sweep = (0.9,)
        # the sweep report's path is smoke-tested by sparse_rnn_reber; MobileNetV2 compiles slowly
        c.reports = ()
    return c
