"""Model compression and structure regularisers over parameter trees and Linen layers.

* `lorth_penalty`, `orthogonality_error`: orthogonal convolutions (Achour et al., JMLR 2022).
"""

from jaxblocks.compress.orthogonal import (
    check_orthogonal_conv_exists as check_orthogonal_conv_exists,
)
from jaxblocks.compress.orthogonal import conv_operator as conv_operator
from jaxblocks.compress.orthogonal import lorth_penalty as lorth_penalty
from jaxblocks.compress.orthogonal import orthogonality_error as orthogonality_error
