"""Pointwise (1x1) convolution with the BatchNorm fold and an activation fused (ConvBN Tune mode).

Public entry: `jaxblocks.kernels.conv_bn.api.pointwise_conv_bn`.
"""

from jaxblocks.kernels.conv_bn.api import pointwise_conv_bn as pointwise_conv_bn
