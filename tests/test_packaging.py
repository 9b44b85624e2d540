"""What a non-editable install needs is shipped as package data (scripts/check-wheel.sh
checks a real wheel in a fresh virtualenv; this checks the lists agree)."""

import ast
from pathlib import Path

from vmm import kernelstore, resources
from vmm.machine import initramfs

ROOT = Path(__file__).resolve().parents[1]


def test_setup_py_ships_what_resources_names():
    tree = ast.parse((ROOT / "setup.py").read_text())
    shipped = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SHIPPED")
    assert tuple(shipped) == resources.SHIPPED
    for rel in shipped:
        assert (ROOT / rel).is_file(), rel
    manifest = (ROOT / "MANIFEST.in").read_text()
    for rel in shipped:
        assert rel in manifest, f"{rel} missing from MANIFEST.in (the sdist)"


def test_package_data_wins_over_the_repository(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "PACKAGE_DATA", tmp_path)
    assert resources.shipped("kernels/init") == ROOT / "kernels/init"
    (tmp_path / "kernels/init").mkdir(parents=True)
    assert resources.shipped("kernels/init") == tmp_path / "kernels/init"


def test_nothing_else_reaches_for_the_repository_root():
    for mod in (kernelstore, initramfs):
        assert "REPO_ROOT" not in vars(mod), mod.__name__
    assert kernelstore.DEFAULT_FRAGMENT.is_file() and initramfs.INIT_SOURCES.is_dir()
