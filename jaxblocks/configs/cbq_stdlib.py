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

from jaxblocks.configs import bct_stdlib
from jaxblocks.configs.base import parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    # The same model, data and training as bct_stdlib (its checkpoints can be reused); only the
    # report differs.
    parse_switches(arg)
    c = bct_stdlib.get_config(arg)
    c.reports = ("cbq",)
    return c
