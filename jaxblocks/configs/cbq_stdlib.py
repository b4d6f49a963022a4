"""CBQ on a byte-level Transformer LM: cross-block post-training quantisation at W4A8, W4A4 and
W2A16, held-out perplexity against float and round-to-nearest.

Ding et al., "CBQ: Cross-Block Quantization for Large Language Models", ICLR 2025,
https://arxiv.org/abs/2312.07950. `transformer_lm_tiny` (4 pre-LN blocks of width 128, RoPE)
learns next-byte prediction on the Python standard library's own source; the ``cbq`` report
then quantises the trained model (`jaxblocks.compress.cbq.cbq_quantize`: coarse-to-fine outlier
preprocessing, LoRA-Rounding, windows of 2 blocks overlapping by 1, calibrated on 64 training
sequences) and tabulates held-out perplexity beside the float model and round-to-nearest at the
same widths.

``get_config("smoke")`` shrinks it to a few steps for CPU tests (the report then calibrates on 4
sequences for 2 steps).
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
    c.reports = ("cbq",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=3, eval_batch_size=8)
        c.model.kwargs = {"vocab_size": 256, "dim": 64, "depth": 1, "num_heads": 2}
        c.data.seq_len = 32
        c.data.max_bytes = 20_000
    return c
