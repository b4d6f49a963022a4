"""A character (byte) language model on the Python standard library's own source text.

Uses the GLA language model (``gla_lm_tiny``) when it is registered, else the tiny Transformer
``char_lm_tiny``; ``get_config("ring")`` selects ring attention over the ``sequence`` mesh axis for
the Transformer (with ``mesh.sequence`` > 1). ``get_config("long_conv")`` trains the long-conv LM
(``long_conv_lm_tiny``, Fu et al. 2023, arXiv:2302.06646) with safari's optimizer split: the
long-convolution kernels get their own learning rate and no weight decay (safari's
``LongConvKernel`` registers its kernel with ``lr=learning_rate`` — 1e-3 in its configs, against
a model lr of 1e-2 — and ``wd=0``), through ``optimizer.param_groups``.
Switches: ``smoke``, ``ring``, ``transformer``, ``long_conv``.
"""

from jaxblocks.configs.base import apply_smoke, base_config, parse_switches
from jaxblocks.registry import list_models

# The switches documented above (the trainer rejects any other).
SWITCHES = ("smoke", "ring", "transformer", "long_conv")


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = base_config()
    c.task = "lm"
    long_conv = "long_conv" in sw
    if long_conv and "ring" in sw:
        raise ValueError("char_lm: the 'ring' switch is ring attention; 'long_conv' has none")
    use_gla = (
        "gla_lm_tiny" in list_models()
        and not long_conv
        and "transformer" not in sw
        and "ring" not in sw
    )
    c.model.name = "gla_lm_tiny" if use_gla else "char_lm_tiny"
    c.model.kwargs = {} if use_gla else {"width": 64, "heads": 4, "layers": 2}
    if long_conv:
        c.model.name = "long_conv_lm_tiny"
        c.model.kwargs = {}
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
    if long_conv:
        # The mixers' long kernels (params mixerN/kernel, [channels, width, l_max]).
        c.optimizer.param_groups = (
            {"pattern": r"^mixer\d+/kernel$", "lr": 1e-3, "weight_decay": 0.0},
        )
    c.log_every = 10
    c.eval_every = 100
    if "smoke" in sw:
        apply_smoke(c, eval_batch_size=64)
        if not use_gla and not long_conv:
            c.model.kwargs = dict(c.model.kwargs, width=16, heads=2, layers=1)
        c.data.seq_len = 16
        c.data.max_bytes = 20_000
    return c
