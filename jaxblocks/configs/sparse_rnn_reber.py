"""Sparse recurrent networks on the embedded Reber grammar (Darji, arXiv 2407.20601).

A one-layer LSTM LM (`lstm_lm_tiny` with one head of 64, i.e. a full recurrent matrix) learns
next-symbol prediction on generated embedded-Reber strings, while gradual magnitude pruning
(Zhu & Gupta's cubic schedule, `jaxblocks.compress.prune`) removes input and recurrent weights
between 20% and 70% of training. The ``pruning_sweep`` report retrains at 0, 50, 90 and 95%
sparsity and tabulates test accuracy against the measured sparsity.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "lm"
    c.model.name = "lstm_lm_tiny"
    c.model.kwargs = {"vocab_size": 8, "hidden_size": 64, "num_heads": 1}
    c.data.name = "reber"
    c.data.seq_len = 24
    c.data.num_examples = 4096
    c.batch_size = 64
    c.eval_batch_size = 256
    c.train_steps = 800
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-2
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20
    c.optimizer.pruning.final = 0.8
    c.optimizer.pruning.begin = 0.2
    c.optimizer.pruning.end = 0.7
    c.optimizer.pruning.frequency = 10
    c.optimizer.pruning.include = r"rnn_\d+/.*kernel$"
    c.optimizer.pruning.sweep = (0.0, 0.5, 0.9, 0.95)
    c.log_every = 100
    c.eval_every = 400
    c.checkpoint.every_steps = 400
    c.reports = ("pruning_sweep",)
    if "smoke" in sw:
        apply_smoke(c, train_steps=4, eval_batch_size=32)
        c.data.num_examples = 128
        c.optimizer.pruning.frequency = 1
        c.optimizer.pruning.sweep = (0.5,)
    return c
