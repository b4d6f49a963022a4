"""FlashRNN-style head-wise recurrences: `flashrnn` (sequence) and `flashrnn_step` (decoding).

The op's math, chunked form, backward and block-size notes (its README.md):

.. include:: ./README.md
"""

from jaxblocks.kernels.rnn.api import CELLS as CELLS
from jaxblocks.kernels.rnn.api import BlockSizes as BlockSizes
from jaxblocks.kernels.rnn.api import flashrnn as flashrnn
from jaxblocks.kernels.rnn.api import flashrnn_step as flashrnn_step
