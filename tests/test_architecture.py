"""The package's layout rules, checked by reading the source (no imports executed).

Dependencies point one way: models -> blocks -> layers -> each kernel op's `api.py`; nothing
outside `train/` imports `train/`; from outside its folder a kernel op is reached only through
its `api.py`; each op's two Pallas backends share code through `_common.py` only and repeat no
function body. See STYLE.md section 1 and the README's layout section.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxblocks"
KERNELS = PKG / "kernels"
OP_DIRS = sorted(p for p in KERNELS.iterdir() if p.is_dir() and (p / "api.py").exists())
# Kernel toolkit modules every layer may use (dispatch, interpret switch, validation, lowering).
KERNEL_TOOLKIT = {"jaxblocks.kernels"} | {
    f"jaxblocks.kernels.{p.stem}"
    for p in KERNELS.glob("*.py")
    if p.stem not in ("__init__", "check_hardware")
}
OP_NAMES = {p.name for p in OP_DIRS}
# `python -m jaxblocks.kernels.check_hardware` runs every op: it may import the ops' api.py and
# specs.py (the toolkit may not), and no module imports it.
HARDWARE_CHECK = "jaxblocks.kernels.check_hardware"
STANDARD_OP_FILES = (
    "__init__.py",
    "api.py",
    "reference.py",
    "xla.py",
    "_common.py",
    "pallas_gpu.py",
    "pallas_tpu.py",
    "specs.py",
    "README.md",
)

# The rooms and what each may import from jaxblocks (besides itself and `jaxblocks.typing`).
# "kernel_api" means: the kernel toolkit and `jaxblocks.kernels.<op>.api` of any op.
ALLOWED: dict[str, set[str]] = {
    "layers": {"layers", "kernel_api"},
    "blocks": {"blocks", "layers", "kernel_api"},
    # Models may be built from compression layers (binary convolutions, quantised layers).
    "models": {"models", "blocks", "layers", "compress", "kernel_api", "registry"},
    "data": {"data"},
    "configs": {"configs", "registry"},
    # Post-processing (Soft-NMS) and model compression work on arrays and parameter trees.
    "detection": {"detection", "kernel_api"},
    "compress": {"compress", "layers", "kernel_api"},
    # Weight import builds the registered models it converts for.
    "interop": {"interop", "registry", "models", "layers"},
    # Analysis tools (LinearScope) run any function or model built from the project's layers.
    "analysis": {"analysis", "layers", "blocks", "models", "kernel_api", "registry"},
    "registry": set(),
    "typing": set(),
}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path, mod: str | None = None) -> list[tuple[int, str]]:
    """Every `jaxblocks...` module imported anywhere in the file (function bodies included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    mod = mod or _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from jaxblocks.kernels.gla import api` names a module, not an attribute.
            for a in node.names:
                sub = f"{name}.{a.name}"
                is_module = (ROOT / (sub.replace(".", "/") + ".py")).exists()
                found.append((node.lineno, sub if is_module else name))
    found = list(dict.fromkeys(found))
    return [(line, name) for line, name in found if name.split(".")[0] == "jaxblocks"]


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _kernel_target_ok(target: str) -> bool:
    """An import of the kernels from outside them: the toolkit, or an op's `api.py`."""
    if target in KERNEL_TOOLKIT:
        return True
    parts = target.split(".")
    return len(parts) == 4 and parts[2] in OP_NAMES and parts[3] == "api"


def _violations() -> list[str]:
    return [v for path in sorted(PKG.rglob("*.py")) for v in _check_file(path, _module_name(path))]


def _check_file(path: pathlib.Path, module: str) -> list[str]:
    bad = []
    room = _room(module)
    parts = module.split(".")
    if True:
        for line, target in _imports(path, module):
            where = f"{module}:{line} imports {target}"
            t_room = _room(target)
            t_parts = target.split(".")
            if t_room == "train" and room != "train":
                bad.append(f"{where} (nothing outside train/ imports train/)")
                continue
            # Inside a kernel op folder: its own modules, the toolkit and typing only.
            if room == "kernels" and len(parts) > 2 and parts[2] in OP_NAMES:
                own = len(t_parts) > 2 and t_parts[2] == parts[2] and t_room == "kernels"
                if not (own or target in KERNEL_TOOLKIT or t_room == "typing"):
                    bad.append(f"{where} (a kernel op imports only itself and the toolkit)")
                continue
            if module == HARDWARE_CHECK:  # a tool over every op, imported by no module
                op_face = len(t_parts) == 4 and t_parts[2] in OP_NAMES
                op_face = op_face and t_parts[3] in ("api", "specs", "cells")
                if not (op_face or target in KERNEL_TOOLKIT or t_room == "typing"):
                    bad.append(f"{where} (the hardware check uses ops' api/specs and the toolkit)")
                continue
            if target == HARDWARE_CHECK:
                bad.append(f"{where} (the hardware check is an entry point, imported by nothing)")
                continue
            if room == "kernels":  # the toolkit: nothing from the ops or above
                if t_room != "kernels" or target not in KERNEL_TOOLKIT:
                    if t_room != "typing":
                        bad.append(f"{where} (the kernel toolkit imports no op or layer)")
                continue
            if room in ("", "train"):  # the public face and the trainer may use anything public
                if t_room == "kernels" and not _kernel_target_ok(target):
                    bad.append(f"{where} (a kernel op is reached only through its api.py)")
                continue
            allowed = ALLOWED[room]
            if t_room == room or t_room == "typing":
                continue
            if t_room == "kernels":
                if "kernel_api" not in allowed or not _kernel_target_ok(target):
                    bad.append(f"{where} ({room}/ reaches kernels only through an op's api.py)")
                continue
            if t_room not in allowed:
                bad.append(f"{where} ({room}/ may import {sorted(allowed)} only)")
    return bad


def test_imports_point_one_way():
    bad = _violations()
    assert not bad, "upward or side imports:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "source", "n_bad"),
    [
        (
            "jaxblocks.layers.probe",
            "from jaxblocks.models import resnet\nimport jaxblocks.train",
            2,
        ),
        ("jaxblocks.layers.probe", "from jaxblocks.kernels.gla.xla import gla_xla", 1),
        ("jaxblocks.layers.probe", "from jaxblocks.kernels.gla import api", 0),
        ("jaxblocks.models.probe", "def f():\n    from jaxblocks.train import loop", 1),
        ("jaxblocks.kernels.gla.probe", "from jaxblocks.kernels.rnn import api", 1),
        ("jaxblocks.kernels.gla.probe", "from . import xla", 0),
        ("jaxblocks.configs.probe", "from jaxblocks.train.config import base_config", 1),
    ],
)
def test_import_walk_catches_upward_imports(tmp_path, module, source, n_bad):
    # The checker itself can fail: imports planted in a probe file are judged by its room.
    probe = tmp_path / "probe.py"
    probe.write_text(source + "\n")
    assert len(_check_file(probe, module)) == n_bad, _check_file(probe, module)


@pytest.mark.parametrize("op", [p.name for p in OP_DIRS])
def test_kernel_op_has_the_standard_files(op):
    missing = [f for f in STANDARD_OP_FILES if not (KERNELS / op / f).exists()]
    assert not missing, f"kernels/{op} lacks {missing}"


def _function_bodies(path: pathlib.Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and len(node.body) >= 3:
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # a docstring does not make a body different
            out[ast.dump(ast.Module(body=body, type_ignores=[]))] = node.name
    return out


@pytest.mark.parametrize("op", [p.name for p in OP_DIRS])
def test_pallas_backends_share_through_common_only(op):
    gpu, tpu = KERNELS / op / "pallas_gpu.py", KERNELS / op / "pallas_tpu.py"
    for path in (gpu, tpu):
        for line, target in _imports(path):
            t = target.split(".")
            if t[:3] == ["jaxblocks", "kernels", op] and target != f"jaxblocks.kernels.{op}":
                assert t[3:] == ["_common"], (
                    f"{path.relative_to(ROOT)}:{line} imports {target}; "
                    "backends import only their op's _common.py"
                )
    g, t = _function_bodies(gpu), _function_bodies(tpu)
    repeated = sorted(f"{g[k]} / {t[k]}" for k in g.keys() & t.keys())
    assert not repeated, f"kernels/{op}: function bodies repeated in both backends: {repeated}"


@pytest.mark.parametrize("op", [p.name for p in OP_DIRS])
def test_kernel_op_api_names(op):
    """The same names in every op: the implementation table, BlockSizes, the case lists."""
    api = ast.parse((KERNELS / op / "api.py").read_text())
    assigned = {
        t.id
        for node in ast.walk(api)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    }
    assert "IMPLEMENTATIONS" in assigned, f"kernels/{op}/api.py has no IMPLEMENTATIONS table"
    bad_tables = [n for n in assigned if n.endswith("IMPLS") or n.startswith("_") and "IMPL" in n]
    assert not bad_tables, f"kernels/{op}/api.py: tables named {bad_tables}"
    specs = ast.parse((KERNELS / op / "specs.py").read_text())
    names = {
        t.id
        for node in ast.walk(specs)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    }
    assert any(n.endswith("LOWERING_CASES") for n in names), f"kernels/{op}/specs.py"
    case_lists = [n for n in names if n.endswith("_CASES")]
    odd = [
        n for n in case_lists if not n.endswith(("TEST_CASES", "LOWERING_CASES", "BENCHMARK_CASES"))
    ]
    assert not odd, f"kernels/{op}/specs.py: case lists named {odd}"
    init = (KERNELS / op / "__init__.py").read_text()
    assert "BlockSizes" in init, f"kernels/{op}/__init__.py does not export BlockSizes"
