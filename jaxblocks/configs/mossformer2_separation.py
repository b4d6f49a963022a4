"""MossFormer2 two-speaker separation of synthetic speech-like mixtures (arXiv 2312.11825).

`mossformer2_tiny` (N = 64, two MossFormer2 blocks: gated single-head attention + gated
dilated FSMN, ~157k parameters) separates mixtures of two harmonic "speakers" with random pitch
contours and formant envelopes (`jaxblocks.data.speech_mix`, 8 kHz, 1024 samples, speaker
ratio within ±5 dB), trained with the utterance-level permutation-invariant negative SI-SDR
(task ``separation``); the test metric is the SI-SDR improvement over the mixture.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "separation"
    c.model.name = "mossformer2_tiny"
    c.model.kwargs = {"dropout_rate": 0.0}
    c.data.name = "speech_mix"
    c.data.seq_len = 1024  # samples at 8 kHz
    c.data.num_examples = 2048
    c.batch_size = 16
    c.eval_batch_size = 64
    c.train_steps = 600
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.log_every = 50
    c.eval_every = 300
    c.checkpoint.every_steps = 300
    if "smoke" in sw:
        apply_smoke(c, train_steps=2, batch_size=4, eval_batch_size=4)
        c.model.kwargs = {"channels": 16, "num_layers": 1, "group_size": 16, "query_key_dim": 8,
                          "rotary_dim": 8, "inner_channels": 16, "lorder": 4}  # fmt: skip
        c.data.seq_len = 256
        c.data.num_examples = 16
    return c
