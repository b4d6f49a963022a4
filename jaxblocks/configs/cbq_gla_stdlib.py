"""CBQ on a byte-level GLA LM: cross-block post-training quantisation at W4A8, W4A4 and W2A16,
held-out perplexity against float and round-to-nearest.

Ding et al., "CBQ: Cross-Block Quantization for Large Language Models", ICLR 2025,
https://arxiv.org/abs/2312.07950; the model is the Gated Linear Attention LM (Yang et al. 2024,
https://arxiv.org/abs/2312.06635), `gla_lm_tiny` widened to 4 layers of width 128 (2 heads,
short convolutions, tied embeddings). It is trained like ``cbq_stdlib``'s Transformer (same data,
sequence length, batch, optimizer and steps) and the same ``cbq`` report quantises its linear
layers (q/k/v/g/gate projections, output projection and the SwiGLU MLP of each ``layer_i``;
embeddings, norms and the head stay in float) with windows of 2 layers overlapping by 1.

``get_config("smoke")`` shrinks it to a few steps for CPU tests.
"""

from jaxblocks.configs import cbq_stdlib
from jaxblocks.configs.base import parse_switches

SWITCHES = ("smoke",)


def get_config(arg: str | None = None):
    sw = parse_switches(arg)
    c = cbq_stdlib.get_config(arg)
    c.model.name = "gla_lm_tiny"
    c.model.kwargs = {"hidden_size": 128, "num_layers": 4, "num_heads": 2, "mlp_hidden_size": 384}
    if "smoke" in sw:
        c.model.kwargs = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_hidden_size": 64}
    return c
