"""Long convolutions: `fft_conv` (FFT / Monarch-DFT convolution) and `causal_conv1d`."""

from jaxblocks.kernels.long_conv.api import causal_conv1d as causal_conv1d
from jaxblocks.kernels.long_conv.api import fft_conv as fft_conv
