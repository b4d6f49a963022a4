"""Filter design on the digits: one small CNN trained from six first-layer initialisers.

Hirani & Abdulla, "On filter design in deep convolutional neural networks",
https://arxiv.org/abs/2410.21644, review how first-layer filters are set: random (He normal),
orthogonal, fixed designs (Gabor, DCT) and filters learned from data without labels (PCA and
k-means of image patches). `cnn_tiny` (3×3 convs of 8 and 32 channels, BN, ReLU) learns
scikit-learn's digits at 16×16 for a short run from each initialiser (`model.filter_bank`,
`jaxblocks.layers.filter_init.named_init`; PCA and k-means use the training images' patches);
the ``variants`` report tabulates the test accuracy of each.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)
BANKS = ("orthogonal", "gabor", "dct", "pca", "kmeans")  # beside the default He normal


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "classification"
    c.model.name = "cnn_tiny"
    c.model.kwargs = {"channels": (8, 32), "num_classes": 10}
    c.model.filter_bank = "he_normal"
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    c.batch_size = 64
    c.eval_batch_size = 256
    c.train_steps = 300
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20
    c.variants = tuple({"name": b, "overrides": (f"model.filter_bank='{b}'",)} for b in BANKS)
    c.log_every = 100
    c.eval_every = 0
    c.checkpoint.every_steps = 300
    c.reports = ("variants",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=3, eval_batch_size=32)
        c.data.image_size = 8
        c.variants = ({"name": "pca", "overrides": ("model.filter_bank='pca'",)},)
    return c
