"""The README's Python examples run as written (against our test guest)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.kvm
@pytest.mark.skipif(not (ROOT / "kernels/guests/out/guest.elf").exists(),
                    reason="test guest not built: make guests")
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "->" in out or out


def test_readme_has_examples():
    assert BLOCKS, "README lost its Python examples"
