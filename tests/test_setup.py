"""The set-up path a newcomer relies on: finding Python 3.12, the CI entry point."""

import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIND = ROOT / "tools" / "find_python312.sh"


def test_find_python312_finds_a_working_312():
    out = subprocess.run(["bash", str(FIND)], capture_output=True, text=True, check=True)
    py = out.stdout.strip()
    ver = subprocess.run(
        [py, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ver.stdout.strip() == "(3, 12)"


def test_find_python312_explains_when_there_is_none(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "none")}
    # /usr/bin may hold a python3.12 on some machines; then there is nothing to explain.
    if any(os.access(f"{d}/python3.12", os.X_OK) for d in ("/usr/bin", "/bin")):
        env["PATH"] = str(tmp_path)
    out = subprocess.run(["/bin/bash", str(FIND)], capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "needs Python 3.12" in out.stderr and "pyenv install" in out.stderr


def test_ci_runs_make_test():
    text = (ROOT / ".ci" / "run").read_text()
    assert "make test" in text
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
