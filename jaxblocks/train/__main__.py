"""``python -m jaxblocks.train``: see `jaxblocks.train.cli`."""

import sys

from jaxblocks.train.cli import main

sys.exit(main())
