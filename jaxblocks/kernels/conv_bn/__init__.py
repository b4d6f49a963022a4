"""Pointwise (1x1) convolution with the BatchNorm fold and an activation fused (ConvBN Tune mode).

Public entry: `jaxblocks.kernels.conv_bn.api.pointwise_conv_bn` (and its `BlockSizes`).

The op's math, chunked form, backward and block-size notes (its README.md):

.. include:: ./README.md
"""

from jaxblocks.kernels.conv_bn.api import BlockSizes as BlockSizes
from jaxblocks.kernels.conv_bn.api import pointwise_conv_bn as pointwise_conv_bn
