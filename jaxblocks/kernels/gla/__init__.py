"""Gated linear attention (Yang et al., arXiv 2312.06635): `chunk_gla`, `fused_recurrent_gla`.

The op's math, chunked form, backward and block-size notes (its README.md):

.. include:: ./README.md
"""

from jaxblocks.kernels.gla.api import BlockSizes as BlockSizes
from jaxblocks.kernels.gla.api import chunk_gla as chunk_gla
from jaxblocks.kernels.gla.api import fused_recurrent_gla as fused_recurrent_gla
