"""Next Block Prediction on moving-digit token videos: a frame per decoding step.

Ren et al., "Next Block Prediction: Video Generation via Semi-Autoregressive Modeling",
https://arxiv.org/abs/2502.07737. `nbp_video_tiny` (a 3-layer softmax Transformer with the
block-causal mask, one 8×8 frame of 4 grey levels per block) learns the next-block objective on
generated videos of a digit moving across the frame (`jaxblocks.data.moving_digits`): every token
predicts the token at its place in the next frame. The test accuracy is per-token next-frame
accuracy under teacher forcing; `python -m benchmarks.run nbp` compares decoding steps and time
of block-by-block against token-by-token generation.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "lm"
    c.model.name = "nbp_video_tiny"
    c.model.kwargs = {}
    c.data.name = "moving_digits"
    c.data.image_size = 8  # frame size: 64 tokens per block
    c.data.seq_len = 5  # frames per video
    c.data.num_examples = 4096
    c.batch_size = 32
    c.eval_batch_size = 128
    c.train_steps = 1500
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 100
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    if "smoke" in sw:
        apply_smoke(c, train_steps=4, eval_batch_size=16)
        c.model.kwargs = {"dim": 32, "depth": 1, "num_heads": 2, "block_size": 25}
        c.data.image_size = 5
        c.data.seq_len = 3
        c.data.num_examples = 64
    return c
