"""The notebooks: each runs top to bottom on CPU, imports only the public API, stores no outputs.

Every ``notebooks/*.ipynb`` is one parametrized case, executed with nbclient in a fresh python3
kernel (the venv's ipykernel), so the notebooks' own asserts are tests and their first cell (the
Colab install cell) runs as users run it. A failure names the notebook and the cell.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import types
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# What users import: the package and its public subpackages. The kernel op packages
# (jaxblocks/kernels/<op>/__init__.py re-export each op's public function) and the kernel
# toolkit's `lowering` module count as public too; every other module path (an op's api.py,
# a model's file, a layer family's file) is internal.
KERNEL_OPS = sorted(p.parent.name for p in (ROOT / "jaxblocks" / "kernels").glob("*/__init__.py"))
PUBLIC_MODULES = frozenset(
    {
        "jaxblocks",
        "jaxblocks.layers",
        "jaxblocks.blocks",
        "jaxblocks.kernels",
        "jaxblocks.kernels.lowering",
        "jaxblocks.models",
        "jaxblocks.data",
        "jaxblocks.train",
    }
    | {f"jaxblocks.kernels.{op}" for op in KERNEL_OPS}
)


def _load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        nb = json.load(f)
    if nb.get("nbformat") != 4 or not isinstance(nb.get("cells"), list):
        raise AssertionError(f"{path.name}: not an nbformat-4 notebook")
    return nb


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _code_cells(nb: dict) -> list[tuple[int, str]]:
    """(index among all cells, source) of each code cell, in order."""
    return [(i, _source(c)) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _check_reference(dotted: str) -> str | None:
    """Why ``dotted`` (a module, or a module followed by attributes) is not public, or None."""
    parts = dotted.split(".")
    if parts[0] != "jaxblocks":
        return None
    module = "jaxblocks"
    for part in parts[1:]:  # walk down the modules; stop at the first non-module name
        if part.startswith("_"):
            return f"{dotted}: {part} is private"
        attr = getattr(importlib.import_module(module), part, None)
        if isinstance(attr, types.ModuleType) or (attr is None and _is_module(f"{module}.{part}")):
            module = f"{module}.{part}"
        else:  # a name defined or re-exported by `module` (e.g. kernels.interpret, the function)
            break
    if module not in PUBLIC_MODULES:
        return f"{dotted}: module {module} is not public API"
    return None


def non_public_references(source: str) -> list[str]:
    """The places where ``source`` reaches jaxblocks other than through the public API.

    Checks ``import jaxblocks.x`` / ``from jaxblocks.x import y`` (and ``y`` being a non-public
    module or a private name), and attribute chains on jaxblocks modules, following aliases
    (``import jaxblocks.kernels.gla as gla; gla.api.f`` is caught).
    """
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> dotted jaxblocks path
    problems: list[str] = []

    def check(dotted: str, line: int) -> None:
        why = _check_reference(dotted)
        if why is not None:
            problems.append(f"line {line}: {why}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "jaxblocks":
                    check(a.name, node.lineno)
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases["jaxblocks"] = "jaxblocks"
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level == 0 and node.module.split(".")[0] == "jaxblocks":
                for a in node.names:  # each name is checked with its module
                    if a.name == "*":
                        problems.append(f"line {node.lineno}: star import from {node.module}")
                        continue
                    check(f"{node.module}.{a.name}", node.lineno)
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:  # whole chains only
            chain = []
            cur: ast.expr = node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                check(".".join([aliases[cur.id], *reversed(chain)]), node.lineno)
    return problems


def _ids(paths):
    return [p.stem for p in paths]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, f"expected the notebooks in {NOTEBOOK_DIR}, found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_clean(path):
    """Valid JSON, explained in markdown, no stored outputs or errors, no shell or magics."""
    nb = _load(path)
    cells = nb["cells"]
    assert cells and cells[0]["cell_type"] == "markdown", f"{path.name}: start with a title cell"
    assert _source(cells[0]).startswith("# "), f"{path.name}: the first cell must be a # title"
    kinds = [c["cell_type"] for c in cells]
    assert kinds.count("markdown") >= kinds.count("code") // 2, f"{path.name}: explain the code"
    for i, cell in enumerate(cells):
        where = f"{path.name}, cell {i}"
        assert cell["cell_type"] in ("markdown", "code"), f"{where}: {cell['cell_type']} cell"
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{where}: stored outputs (clear them)"
        assert cell.get("execution_count") is None, f"{where}: stored execution count"
        for n, line in enumerate(_source(cell).splitlines()):
            assert not line.lstrip().startswith(("%", "!")), f"{where}, line {n}: IPython magic"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_uses_public_api(path):
    problems = []
    for i, src in _code_cells(_load(path)):
        problems += [f"cell {i}, {p}" for p in non_public_references(src)]
    assert not problems, f"{path.name} reaches past the public API:\n" + "\n".join(problems)


def test_public_api_check_catches_internal_paths():
    ok = """
import jaxblocks
import jaxblocks.kernels.gla as gla
from jaxblocks.layers import ConvBN, convbn_mode
from jaxblocks.kernels import interpret
import jaxblocks.kernels.lowering as lowering
jaxblocks.create_model("resnet18"); gla.chunk_gla; lowering.check_lowering
"""
    assert non_public_references(ok) == []
    bad = {
        "from jaxblocks.kernels.conv_bn.api import pointwise_conv_bn": "conv_bn.api",
        "import jaxblocks.layers.conv_bn": "jaxblocks.layers.conv_bn",
        "from jaxblocks.kernels.gla import api": "jaxblocks.kernels.gla.api",
        "from jaxblocks.models import gla_lm": "jaxblocks.models.gla_lm",
        "import jaxblocks\njaxblocks.models.gla_lm.generate": "jaxblocks.models.gla_lm",
        "import jaxblocks.kernels.gla as g\ng.reference.gla_reference": "gla.reference",
        "from jaxblocks.registry import create_model": "jaxblocks.registry",
        "from jaxblocks.layers import *": "star import",
        "import jaxblocks.layers as L\nL._private": "_private is private",
    }
    for source, expected in bad.items():
        problems = non_public_references(source)
        assert len(problems) == 1 and expected in problems[0], (source, problems)


def test_notebooks_match_their_generator():
    """tools/make_notebooks.py is the notebooks' source: the files must be what it writes."""
    spec = importlib.util.spec_from_file_location(
        "make_notebooks", ROOT / "tools/make_notebooks.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name in gen.NOTEBOOKS:
        path = NOTEBOOK_DIR / name
        assert path.exists(), f"{name} missing: run python tools/make_notebooks.py"
        assert path.read_text(encoding="utf-8") == gen.render(name), (
            f"{name} differs from tools/make_notebooks.py: edit the script and rerun it"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path):
    """Execute the notebook top to bottom with nbclient in a fresh python3 kernel (the venv's
    ipykernel), from notebooks/, as Jupyter or Colab would; a failure names the cell."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellExecutionError as e:
        failed = [
            i
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.outputs)
        ]
        where = f"cell {failed[0]}" if failed else "a cell"
        raise AssertionError(f"{path.name}: {where} failed:\n{e}") from None
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert ran and all(c.execution_count is not None for c in ran), f"{path.name}: cells skipped"


def test_every_notebook_starts_with_the_colab_install_cell():
    """The first code cell installs jaxblocks only where it is missing, picking the extra from
    the runtime (TPU, GPU or none), and reports the backend."""
    for path in NOTEBOOKS:
        first = _code_cells(_load(path))[0][1]
        assert 'find_spec("jaxblocks") is None' in first, path.name
        assert "[tpu]" in first and "[gpu]" in first and "nvidia-smi" in first, path.name
        assert "pip" in first and "git+https://" in first, path.name
        assert "jax.default_backend()" in first, path.name
