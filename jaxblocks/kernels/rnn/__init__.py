"""FlashRNN-style head-wise recurrences: `flashrnn` (sequence) and `flashrnn_step` (decoding)."""

from jaxblocks.kernels.rnn.api import flashrnn as flashrnn
from jaxblocks.kernels.rnn.api import flashrnn_step as flashrnn_step
from jaxblocks.kernels.rnn.cells import CELLS as CELLS
