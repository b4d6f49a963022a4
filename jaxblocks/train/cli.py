"""`make train` entry point.

Until the full trainer lands this runs the foundation job: a ConvBN ResNet on scikit-learn's
digits, trained in train mode then fine-tuned in tune mode (`jaxblocks.train.convbn_digits`).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from jaxblocks.train import convbn_digits

    return convbn_digits.main(argv)


if __name__ == "__main__":
    sys.exit(main())
