"""LMUFormer keyword spotting on synthetic spoken keywords, beside its spiking membrane-shortcut
variant and a flattening MLP (Liu et al., ICLR 2024, arXiv 2402.04882).

Data (`jaxblocks.data.keywords`, dataset ``keywords``): ten digit-like keywords spoken by
random synthetic speakers in background noise, as log-mel frames computed the way the official
loader does (Kaldi ``fbank``: 25 ms Hann frames every 10 ms, normalised by ``2·std``), scaled
down for CPU: 8 kHz audio, 64 frames of 32 mel bins (official: 128 × 128 at 16 kHz); test
utterances come from unseen speakers.

Model: a CPU-sized ``lmuformer_gsc`` (the official non-spiking ``lmu_rnn_conv1d``): width 64
instead of 256, one block, MLP ratio 4, θ = the sequence length (as the code: θ = 128 = its
sequence length), 10 classes; 102,795 parameters where the official model has 1.62M.
Optimiser as the official recipe where it carries over: Adam(W) at lr 2.5e-3, β = (0.95, 0.999),
weight decay 5e-7, batch 128; softmax cross-entropy with a cosine schedule instead of the
official BCE with mixup / SpecAugment / step decay over 200 epochs (deliberate: a short run
on clean synthetic data needs neither the augmentation nor the long schedule).

Reports: ``variants`` retrains, on the same data, seed and steps, the spiking membrane-shortcut
model (``spiking_lmuformer_ms_gsc``, the official default) at the same width, and a baseline
MLP on the flattened spectrogram (one hidden layer of 128), so the accuracies read side by side.
``lmuformer_streaming`` evaluates the trained model token by token (the LMU's recurrent form,
equal to the parallel one) and after only the first 25/50/75 % of each test utterance.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "classification"
    c.model.name = "lmuformer_gsc"
    c.model.kwargs = {"dim": 64, "depth": 1, "mlp_ratio": 4.0, "theta": 64.0, "num_classes": 10}
    c.data.name = "keywords"
    c.data.seq_len = 64  # frames (10 ms each)
    c.data.channels = 32  # mel bins
    c.data.num_examples = 4096
    c.batch_size = 128
    c.eval_batch_size = 256
    c.train_steps = 500
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2.5e-3
    c.optimizer.b1 = 0.95
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 5e-7
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 25
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint.every_steps = 250
    ms = dict(c.model.kwargs)
    c.variants = (
        {
            "name": "spiking_lmuformer_ms_gsc",
            "overrides": ("model.name='spiking_lmuformer_ms_gsc'", f"model.kwargs={ms!r}"),
        },
        {
            "name": "mlp (flattened frames)",
            "overrides": (
                "model.name='mlp_tiny'",
                "model.kwargs={'hidden': (128,), 'num_classes': 10}",
            ),
        },
    )
    c.reports = ("variants", "lmuformer_streaming")
    if "smoke" in sw:
        apply_smoke(c)
        c.data.seq_len = 16
        c.data.channels = 8
        c.data.num_examples = 64
        c.model.kwargs = {"dim": 16, "depth": 1, "mlp_ratio": 2.0, "theta": 16.0,
                          "num_classes": 10}  # fmt: skip
        c.variants = (
            {
                "name": "spiking_lmuformer_ms_gsc",
                "overrides": (
                    "model.name='spiking_lmuformer_ms_gsc'",
                    f"model.kwargs={dict(c.model.kwargs)!r}",
                ),
            },
            {
                "name": "mlp (flattened frames)",
                "overrides": (
                    "model.name='mlp_tiny'",
                    "model.kwargs={'hidden': (16,), 'num_classes': 10}",
                ),
            },
        )
    return c
