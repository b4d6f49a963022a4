"""Analysis tools that run any JAX function or Linen model built from the project's layers.

* `linear_scope`, `interpreter`, `linear_map`, `transpose`, `interpreter_matrix`: LinearScope
  (Navarrete Michelini et al., "A Tour of Convolutional Networks Guided by Linear Interpreters",
  https://arxiv.org/abs/1908.05168): the x0-decided affine interpreter A(x0)·x1 + c(x0).
* `patch_apply`, `patch_stage`, `stage_apply`, `trace_geometry`, `conv_geometry`,
  `halo_overhead`: MCUNetV2's patch-based inference (Lin et al.,
  https://arxiv.org/abs/2110.15352): a CNN's first stage tile by tile, exactly.
* `SparKPretrainer`, `sparse_masking`, `LightDecoder`, `spark_loss`, `random_patch_mask`: SparK
  (Tian et al., https://arxiv.org/abs/2301.03580): sparse masked pretraining of any CNN built
  from Flax convolutions and `ConvBN` (registered as the ``spark`` model).
"""

from jaxblocks.analysis.linear_scope import UnsupportedPrimitiveError as UnsupportedPrimitiveError
from jaxblocks.analysis.linear_scope import chord_slope as chord_slope
from jaxblocks.analysis.linear_scope import interpreter as interpreter
from jaxblocks.analysis.linear_scope import interpreter_matrix as interpreter_matrix
from jaxblocks.analysis.linear_scope import linear_map as linear_map
from jaxblocks.analysis.linear_scope import linear_scope as linear_scope
from jaxblocks.analysis.linear_scope import transpose as transpose
from jaxblocks.analysis.patch_inference import StageGeometry as StageGeometry
from jaxblocks.analysis.patch_inference import conv_geometry as conv_geometry
from jaxblocks.analysis.patch_inference import halo_overhead as halo_overhead
from jaxblocks.analysis.patch_inference import patch_apply as patch_apply
from jaxblocks.analysis.patch_inference import patch_stage as patch_stage
from jaxblocks.analysis.patch_inference import stage_apply as stage_apply
from jaxblocks.analysis.patch_inference import trace_geometry as trace_geometry
from jaxblocks.analysis.spark import LightDecoder as LightDecoder
from jaxblocks.analysis.spark import SparKPretrainer as SparKPretrainer
from jaxblocks.analysis.spark import random_patch_mask as random_patch_mask
from jaxblocks.analysis.spark import spark_loss as spark_loss
from jaxblocks.analysis.spark import sparse_masking as sparse_masking
