"""DirectPred (paper 36) on scikit-learn's digits: BYOL without labels, linear probe after.

`byol_directpred` (`jaxblocks.models.byol`) learns the ``self_supervised`` task on the 8×8
digits, their labels unused: two views per image (random shift by up to one pixel, Gaussian
noise), a `cnn_tiny` encoder (32, 64 channels, 64-d representation) with the official projector
layout (Dense → BN → ReLU → Dense; 128 → 32 here, 512 → 128 official), the target an EMA
copy (τ = 0.996, the official ``m``) and DirectPred's closed-form linear predictor (ρ = 0.3,
ε = 0.01, freq = 1: the README's settings).
The official optimiser is SGD (lr 0.03, momentum 0.9, weight decay 4e-4); on this small problem
the demo uses the same SGD at a larger rate with cosine decay.

The ``linear_probe`` report fits a logistic regression on the frozen encoder's features of the
labelled training split and scores the test split, for raw pixels, the untrained encoder, the
DirectPred run and the ``variants`` entry: the same BYOL with a learned linear predictor (the
paper's baseline).

Measured (1,500 steps of 128 images, ~9 min on two shared CPU cores including the variant
and the report), linear-probe test accuracy on 450 test images, seed 0 / seed 1: raw pixels
0.960 / 0.960, untrained encoder 0.902 / 0.929, DirectPred 0.964 / 0.973, learned linear
predictor 0.951 / 0.924.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "self_supervised"
    c.model.name = "byol_directpred"
    c.model.kwargs = {
        "encoder": "cnn_tiny",
        "encoder_kwargs": {"channels": (32, 64)},
        "feature_dim": 64,
        "projection_hidden": 128,
        "projection_dim": 32,
        "predictor": "directpred",
        "tau": 0.996,
        "max_shift": 1,
        "noise_std": 0.1,
    }
    c.data.name = "digits"
    c.data.image_size = 8
    c.data.channels = 1
    c.batch_size = 128
    c.eval_batch_size = 360
    c.train_steps = 1500
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 4e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    c.reports = ("linear_probe",)
    c.variants = (
        {"name": "learned linear predictor", "overrides": ("model.kwargs.predictor='linear'",)},
    )
    if "smoke" in sw:
        apply_smoke(c, train_steps=2, batch_size=32, eval_batch_size=64)
        c.model.kwargs = dict(c.model.kwargs, encoder_kwargs={"channels": (4, 8)},
                              feature_dim=8, projection_hidden=16, projection_dim=8)  # fmt: skip
    return c
