"""SparK masked pretraining of a small ResNet on the digits, then fine-tuning vs from scratch.

Tian et al., "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling", https://arxiv.org/abs/2301.03580 (`jaxblocks.analysis.spark`). Stage ``pretrain``:
the registered ``spark`` model around a ``resnet18``-family encoder (three stages of one basic
block, width 16, 3×3 stem: total stride 4) learns to reconstruct scikit-learn's digits resized
to 16×16 from 40 % of their 4×4 patches (mask ratio 0.6), labels unused (task
``masked_pretraining``: MSE to per-patch normalised pixels on the masked patches). Stage
``finetune``: the same ResNet with a fresh 10-way head starts from the pretrained encoder
(parameters and BatchNorm statistics at the same paths) and trains briefly with labels. The
``variants`` report retrains that stage from scratch with the same steps and data and
tabulates both test accuracies side by side.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import base_config, parse_switches

SWITCHES = ("smoke",)

# The encoder's keyword arguments, shared by both stages (the pretrainer passes them on).
ENCODER = {"width": 16, "stem": "small", "stage_sizes": (1, 1, 1), "num_classes": 10}


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "classification"
    c.model.name = "resnet18"
    c.model.kwargs = dict(ENCODER)
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    c.batch_size = 64
    c.eval_batch_size = 256
    c.optimizer.name = "adamw"
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20
    c.log_every = 50
    c.checkpoint.every_steps = 500
    c.transfer_reinit = ("fc",)
    c.variants = ({"name": "from scratch (same fine-tune steps)", "overrides": ()},)
    c.reports = ("variants",)
    pretrain = {
        "name": "pretrain",
        "task": "masked_pretraining",
        "model": {
            "name": "spark",
            "kwargs": {"encoder": "resnet18", "decoder_width": 64, "mask_ratio": 0.6},
        },  # fmt: skip
        "batch_size": 128,
        "train_steps": 600,
        # Official: LAMB, wd 0.04, clip 5; AdamW at this scale.
        "optimizer": {
            "learning_rate": 2e-3,
            "weight_decay": 0.04,
            "grad_clip_norm": 5.0,
            "warmup_steps": 100,
        },  # fmt: skip
        "eval_every": 300,
    }
    finetune = {
        "name": "finetune",
        "train_steps": 150,
        "optimizer": {"learning_rate": 3e-3, "weight_decay": 1e-4},
        "eval_every": 150,
    }
    if "smoke" in sw:
        c.smoke = True
        # two stages (stride 2) on 8x8 digits: 4x4 patches of 2x2 pixels, fewer layers to compile
        c.model.kwargs = dict(ENCODER, width=4, stage_sizes=(1, 1))
        c.data.image_size = 8
        c.batch_size = 16
        c.eval_batch_size = 64
        c.log_every = 1
        c.checkpoint.every_steps = 2
        c.optimizer.warmup_steps = 1
        pretrain["model"]["kwargs"]["decoder_width"] = 8
        pretrain.update(batch_size=16, train_steps=2, eval_every=2)
        pretrain["optimizer"]["warmup_steps"] = 1
        finetune.update(train_steps=2, eval_every=2)
    c.stages = (pretrain, finetune)
    return c
