"""Short depthwise causal convolution (Mamba / GLA's conv), channels last, W ≤ 8 taps.

Public entry: `jaxblocks.kernels.causal_conv1d.api.causal_conv1d` (and its `BlockSizes`).

The op's math, chunked form, backward and block-size notes (its README.md):

.. include:: ./README.md
"""

from jaxblocks.kernels.causal_conv1d.api import BlockSizes as BlockSizes
from jaxblocks.kernels.causal_conv1d.api import causal_conv1d as causal_conv1d
