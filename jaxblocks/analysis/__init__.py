"""Analysis tools that run any JAX function or Linen model built from the project's layers.

* `linear_scope`, `interpreter`, `linear_map`, `transpose`, `interpreter_matrix`: LinearScope
  (Navarrete Michelini et al., "A Tour of Convolutional Networks Guided by Linear Interpreters",
  https://arxiv.org/abs/1908.05168): the x0-decided affine interpreter A(x0)·x1 + c(x0).
"""

from jaxblocks.analysis.linear_scope import UnsupportedPrimitiveError as UnsupportedPrimitiveError
from jaxblocks.analysis.linear_scope import chord_slope as chord_slope
from jaxblocks.analysis.linear_scope import interpreter as interpreter
from jaxblocks.analysis.linear_scope import interpreter_matrix as interpreter_matrix
from jaxblocks.analysis.linear_scope import linear_map as linear_map
from jaxblocks.analysis.linear_scope import linear_scope as linear_scope
from jaxblocks.analysis.linear_scope import transpose as transpose
