"""Analysis tools that run any JAX function or Linen model built from the project's layers.

* `linear_scope`, `interpreter`, `linear_map`, `transpose`, `interpreter_matrix`: LinearScope
  (Navarrete Michelini et al., "A Tour of Convolutional Networks Guided by Linear Interpreters",
  https://arxiv.org/abs/1908.05168): the x0-decided affine interpreter A(x0)·x1 + c(x0).
* `patch_apply`, `patch_stage`, `stage_apply`, `trace_geometry`, `conv_geometry`,
  `halo_overhead`: MCUNetV2's patch-based inference (Lin et al.,
  https://arxiv.org/abs/2110.15352): a CNN's first stage tile by tile, exactly.
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
