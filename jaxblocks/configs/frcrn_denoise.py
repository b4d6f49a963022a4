"""FRCRN denoising of synthetic noisy speech (arXiv 2206.07293).

`frcrn_tiny` (two complex U-Nets of four levels, 16 channels, frequency-recurrent complex FSMNs
and complex SE; 128/64/128 STFT at 8 kHz) enhances speech-like "speakers" (harmonic tones with
random pitch contours and formant envelopes) in white, pink or babble-like noise at −5..10 dB
SNR (`jaxblocks.data.speech_noise`, 8 kHz, 2048 samples), trained with the negative SI-SDR
(task ``enhancement``); the test metrics are the SI-SDR and SNR improvements over the noisy
input.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "enhancement"
    c.model.name = "frcrn_tiny"
    c.data.name = "speech_noise"
    c.data.seq_len = 2048  # samples at 8 kHz
    c.data.num_examples = 2048
    c.batch_size = 16
    c.eval_batch_size = 64
    c.train_steps = 400
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 5.0
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20
    c.log_every = 25
    c.eval_every = 200
    c.checkpoint.every_steps = 200
    if "smoke" in sw:
        apply_smoke(c, train_steps=2, batch_size=4, eval_batch_size=4)
        c.model.kwargs = {"win_len": 64, "hop_len": 32, "fft_len": 64, "channels": 8,
                          "num_levels": 2, "fsmn_hidden": 8, "lorder": 3,
                          "se_reduction": 4}  # fmt: skip
        c.data.seq_len = 512
        c.data.num_examples = 16
    return c
