"""The README's quickstart runs as written and the two set-up commands are the ones documented."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_quickstart_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1, "README should hold exactly one python quickstart block"
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 25
    exec(compile(code, "README.md quickstart", "exec"), {"__name__": "__quickstart__"})
    out = capsys.readouterr().out
    assert "(8, 10) (8, 10) (2, 1000, 4, 64) (2, 4, 64, 64)" in out


def test_readme_names_exactly_the_two_setup_commands():
    setup = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\s+make (\w+)", setup, re.M) == ["test", "train"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, re.M) and re.search(r"^train:", makefile, re.M)
