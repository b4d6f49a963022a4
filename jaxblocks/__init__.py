"""jaxblocks: efficient building blocks of recent papers for JAX/Flax.

Public API re-exports only; see README.md for the map of what exists.
"""

from jaxblocks import blocks as blocks
from jaxblocks import kernels as kernels
from jaxblocks import layers as layers
from jaxblocks.kernels.causal_conv1d.api import causal_conv1d as causal_conv1d
from jaxblocks.kernels.conv_bn.api import pointwise_conv_bn as pointwise_conv_bn
from jaxblocks.kernels.gla.api import chunk_gla as chunk_gla
from jaxblocks.kernels.gla.api import fused_recurrent_gla as fused_recurrent_gla
from jaxblocks.kernels.long_conv.api import fft_conv as fft_conv
from jaxblocks.kernels.rnn.api import flashrnn as flashrnn
from jaxblocks.kernels.selective_scan.api import selective_scan as selective_scan
from jaxblocks.layers import ConvBN as ConvBN
from jaxblocks.layers import LinearBN as LinearBN
from jaxblocks.layers import convbn_mode as convbn_mode
from jaxblocks.layers import fold_for_deploy as fold_for_deploy
from jaxblocks.registry import ModelInfo as ModelInfo
from jaxblocks.registry import Paper as Paper
from jaxblocks.registry import create_model as create_model
from jaxblocks.registry import example_input as example_input
from jaxblocks.registry import list_models as list_models
from jaxblocks.registry import model_info as model_info
from jaxblocks.registry import register_model as register_model
from jaxblocks.registry import register_presets as register_presets

__version__ = "0.1.0"
