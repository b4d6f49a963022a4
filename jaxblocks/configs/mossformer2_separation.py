"""MossFormer2 two-speaker separation of synthetic speech-like mixtures (arXiv 2312.11825).

`mossformer2_tiny` (N = 64, two MossFormer2 blocks: gated single-head attention + gated
dilated FSMN, ~157k parameters) separates mixtures of two harmonic "speakers" with random pitch
contours and formant envelopes (`jaxblocks.data.speech_mix`, 8 kHz, 1024 samples, speaker
ratio within ±5 dB), trained with the utterance-level permutation-invariant negative SI-SDR
(task ``separation``); the test metric is the SI-SDR improvement over the mixture.

Two choices differ from the model's official defaults on purpose, for a 2-core CPU budget:

* gradients are clipped to global norm 5 (as the official SpeechBrain/ClearerVoice recipes
  do). Without it the early gradient norms (50–300) and loss spikes kept the demo on the
  pass-the-mixture-through plateau (held-out SI-SDRi −0.4 dB after 600 steps at lr 1e-3; with
  clipping, +1.3 dB after 300 steps at lr 3e-3, kernel 32);
* the encoder/decoder filters are 32 samples (4 ms, stride 2 ms) instead of the official 16:
  half the frames, so each step costs half, and the filters resolve 250 Hz instead of 500 Hz
  (an oracle magnitude mask on a 16- vs 32-sample STFT of this data gains 4.9 vs 6.2 dB).

The full run (1200 steps, ~12 min on 2 busy CPU cores) reaches a held-out SI-SDRi of +2.05 dB
at step 600 and +2.28 dB at step 1200 (baseline: the mixture, 0 dB).

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "separation"
    c.model.name = "mossformer2_tiny"
    c.model.kwargs = {"dropout_rate": 0.0, "kernel_size": 32}
    c.data.name = "speech_mix"
    c.data.seq_len = 1024  # samples at 8 kHz
    c.data.num_examples = 2048
    c.batch_size = 16
    c.eval_batch_size = 64
    c.train_steps = 1200
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.grad_clip_norm = 5.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.log_every = 100
    c.eval_every = 600
    c.checkpoint.every_steps = 600
    if "smoke" in sw:
        apply_smoke(c, train_steps=2, batch_size=4, eval_batch_size=4)
        c.model.kwargs = {"channels": 16, "num_layers": 1, "group_size": 16, "query_key_dim": 8,
                          "rotary_dim": 8, "inner_channels": 16, "lorder": 4}  # fmt: skip
        c.data.seq_len = 256
        c.data.num_examples = 16
    return c
