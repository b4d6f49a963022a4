"""A character (byte) language model on the Python standard library's own source text.

Uses the GLA language model (``gla_lm_tiny``) when it is registered, else the tiny Transformer
``char_lm_tiny``; ``get_config("ring")`` selects ring attention over the ``sequence`` mesh axis for
the Transformer (with ``mesh.sequence`` > 1). Switches: ``smoke``, ``ring``, ``transformer``.
"""

from jaxblocks.configs.base import base_config, parse_switches
from jaxblocks.registry import list_models


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "lm"
    use_gla = "gla_lm_tiny" in list_models() and "transformer" not in sw and "ring" not in sw
    c.model.name = "gla_lm_tiny" if use_gla else "char_lm_tiny"
    c.model.kwargs = {} if use_gla else {"width": 64, "heads": 4, "layers": 2}
    c.model.train_kwargs = {"train": True}
    c.model.eval_kwargs = {"train": False}
    if "ring" in sw:
        c.model.kwargs = dict(c.model.kwargs, attention="ring")
        c.mesh = {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 2}
    c.data.name = "stdlib_text"
    c.data.seq_len = 64
    c.data.max_bytes = 400_000
    c.batch_size = 32
    c.eval_batch_size = 64
    c.train_steps = 300
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 20
    c.optimizer.grad_clip_norm = 1.0
    c.log_every = 10
    c.eval_every = 100
    if "smoke" in sw:
        c.smoke = True
        if not use_gla:
            c.model.kwargs = dict(c.model.kwargs, width=16, heads=2, layers=1)
        c.data.seq_len = 16
        c.data.max_bytes = 20_000
        c.batch_size = 16
        c.eval_batch_size = 64
        c.train_steps = 3
        c.optimizer.warmup_steps = 1
        c.log_every = 1
        c.eval_every = 3
        c.checkpoint.every_steps = 2
    return c
