"""Mamba's selective scan (`selective_scan`) in the official layout, with SS2D's grouped B/C.

The op's math, chunked form, backward and block-size notes (its README.md):

.. include:: ./README.md
"""

from jaxblocks.kernels.selective_scan.api import BlockSizes as BlockSizes
from jaxblocks.kernels.selective_scan.api import selective_scan as selective_scan
