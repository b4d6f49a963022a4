"""BCT on a byte-level Transformer LM: blockwise compression of every weight and activation
without retraining, perplexity against float.

Dong & Chen, "BCT: Blockwise Compression of Transformers without Retraining",
https://arxiv.org/abs/2304.01483. `transformer_lm_tiny` (4 pre-LN blocks of width 128, RoPE)
learns next-byte prediction on the Python standard library's own source; the ``bct`` report then
compresses the trained model (`jaxblocks.compress.bct_compress`: weights in 64×64 tiles,
activations in groups of 64, W8A8 … W4A4) and tabulates held-out perplexity and compression
beside the float model and beside one scale per whole axis.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "lm"
    c.model.name = "transformer_lm_tiny"
    c.model.kwargs = {"vocab_size": 256, "dim": 128, "depth": 4, "num_heads": 4}
    c.data.name = "stdlib_text"
    c.data.seq_len = 128
    c.data.max_bytes = 1_000_000
    c.batch_size = 32
    c.eval_batch_size = 64
    c.train_steps = 1500
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 100
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    c.reports = ("bct",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=3, eval_batch_size=8)
        c.model.kwargs = {"vocab_size": 256, "dim": 64, "depth": 1, "num_heads": 2}
        c.data.seq_len = 32
        c.data.max_bytes = 20_000
    return c
