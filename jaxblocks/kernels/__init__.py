"""Kernel toolkit and the hot ops.

The ops: `conv_bn.pointwise_conv_bn`, `gla.chunk_gla`, `gla.fused_recurrent_gla`, `rnn.flashrnn`,
`selective_scan.selective_scan`, `long_conv.fft_conv`, `causal_conv1d.causal_conv1d`.

Every op lives in `jaxblocks/kernels/<op>/` with the same files (api.py, reference.py, xla.py,
pallas_gpu.py, pallas_tpu.py, specs.py, README.md). This package holds what they share:

* `dispatch`: the ``implementation=None | "reference" | "xla" | "pallas_gpu" | "pallas_tpu"``
  selection with platform/shape support checks and fallback.
* `interpret()`: a context manager under which Pallas kernels run in interpret mode on CPU.
* `lowering`: export ``value_and_grad`` of an op for ``cuda`` and ``tpu`` and check that the
  Pallas custom call is in the module.
* `validation`: argument checks that raise errors naming the argument, shape and dtype.
"""

from jaxblocks.kernels.dispatch import IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxblocks.kernels.dispatch import Implementation as Implementation
from jaxblocks.kernels.dispatch import (
    UnsupportedImplementationError as UnsupportedImplementationError,
)
from jaxblocks.kernels.dispatch import select_implementation as select_implementation
from jaxblocks.kernels.interpret import gpu_interpret as gpu_interpret
from jaxblocks.kernels.interpret import interpret as interpret
from jaxblocks.kernels.interpret import interpret_enabled as interpret_enabled
from jaxblocks.kernels.interpret import tpu_interpret as tpu_interpret
from jaxblocks.kernels.lowering import check_lowering as check_lowering
