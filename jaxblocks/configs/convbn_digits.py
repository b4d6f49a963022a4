"""The `make train` main job: a ConvBN ResNet-18 on scikit-learn's digits, transfer learning.

Stage ``pretrain``: digits 0-4 in ConvBN **train** mode (batch statistics). Stage ``transfer``:
digits 5-9 with a fresh classifier head in ConvBN **tune** mode (You et al., arXiv:2305.11624:
running statistics folded into the conv on the fly — eval-mode numerics, less memory). The
``convbn_modes`` report (`jaxblocks.train.reports`) then repeats the transfer in **eval** mode and
writes a table comparing the two (test accuracy, XLA temporary memory of the train step, step
time), which the CLI prints.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import base_config, parse_switches

# The switches documented above (the trainer rejects any other).
SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.model.name = "resnet18"
    c.model.kwargs = {"width": 16, "stem": "small", "zero_init_residual": True, "num_classes": 5}
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    c.batch_size = 64
    c.eval_batch_size = 128
    c.train_steps = -1
    c.optimizer.name = "adamw"
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_epochs = 0.5
    c.checkpoint.every_steps = 25
    c.checkpoint.keep = 2
    c.log_every = 5
    c.eval_every = 0  # evaluated once per epoch below
    c.transfer_reinit = ("fc",)
    c.reports = ("convbn_modes",)
    pretrain = {
        "name": "pretrain",
        "data": {"classes": (0, 1, 2, 3, 4)},
        "train_epochs": 8.0,
        "optimizer": {"learning_rate": 3e-3},
        "model": {"convbn_mode": ""},  # train=True: batch statistics
        "eval_every": 21,
    }
    transfer = {
        "name": "transfer",
        "data": {"classes": (5, 6, 7, 8, 9)},
        "train_epochs": 8.0,
        "optimizer": {"learning_rate": 3e-3},
        "model": {"convbn_mode": "tune"},
        "eval_every": 21,
    }
    if "smoke" in sw:
        c.smoke = True
        c.model.kwargs = {"width": 4, "stem": "small", "num_classes": 5, "stage_sizes": (1, 1)}
        c.data.image_size = 8
        c.batch_size = 32
        c.eval_batch_size = 64
        c.log_every = 1
        c.checkpoint.every_steps = 2
        for st in (pretrain, transfer):
            st.pop("train_epochs")
            st["train_steps"] = 3
            st["eval_every"] = 3
        c.optimizer.warmup_epochs = -1.0
        c.optimizer.warmup_steps = 1
    c.stages = (pretrain, transfer)
    return c
