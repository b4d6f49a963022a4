"""Build the API reference with pdoc: ``python tools/build_docs.py [OUTPUT_DIR]`` (``make docs``).

One page per module from the docstrings; each kernel op's package page includes its README.md
(the math). Every pdoc warning is an error except those listed in `TOLERATED`, which pdoc raises
on code that is not ours to change (each with its reason). Exit status 1 on any other warning.
"""

from __future__ import annotations

import pathlib
import re
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (regex over the warning message, reason). Only pdoc's annotation-evaluation warnings qualify.
TOLERATED: tuple[tuple[str, str], ...] = (
    (
        r"Error parsing type annotation .* for jaxblocks\.[\w.]+\.(scale|bias|v)_init\.",
        "a Linen attribute whose default is a jax initializer (nn.initializers.ones/zeros): "
        "pdoc evaluates jax's own annotations (core.Shape, DTypeLikeInexact, ...) in our module",
    ),
    (
        r"Error parsing type annotation .* for jaxblocks\.[\w.]+\.__init__\.",
        "the __init__ that typing.NamedTuple synthesises: pdoc looks up postponed annotations in "
        "the collections module instead of ours",
    ),
)


def build(output: pathlib.Path) -> list[str]:
    """Render the docs into ``output``; return the warnings that are not tolerated."""
    sys.path.insert(0, str(ROOT))
    import pdoc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc("jaxblocks", output_directory=output)
    bad = []
    for w in caught:
        msg = str(w.message)
        if not any(re.search(pattern, msg) for pattern, _ in TOLERATED):
            bad.append(f"{w.category.__name__}: {msg}")
    return bad


def main(argv: list[str]) -> int:
    out = pathlib.Path(argv[0] if argv else ROOT / "docs" / "api")
    bad = build(out)
    for b in bad:
        print(b, file=sys.stderr)
    print(f"API reference in {out} ({len(bad)} warnings)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
