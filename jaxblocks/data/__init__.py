"""Data the project ships or generates (nothing is downloaded).

`load_digits` (scikit-learn's handwritten digits as small NHWC images), `sr_pairs` (super-
resolution crops of scikit-learn's sample photographs), `reber_lm_data` (generated embedded
Reber-grammar strings).
"""

from jaxblocks.data.digits import load_digits as load_digits
from jaxblocks.data.reber import reber_lm_data as reber_lm_data
from jaxblocks.data.sr_images import sr_pairs as sr_pairs
