"""Long convolution by FFT: `fft_conv` (FFT / Monarch-DFT convolution, FlashFFTConv).

Public entry: `jaxblocks.kernels.long_conv.api.fft_conv` (and its `BlockSizes`). The short
causal convolution is its own op, `jaxblocks.kernels.causal_conv1d`.

The op's math, chunked form, backward and block-size notes (its README.md):

.. include:: ./README.md
"""

from jaxblocks.kernels.long_conv.api import BlockSizes as BlockSizes
from jaxblocks.kernels.long_conv.api import fft_conv as fft_conv
