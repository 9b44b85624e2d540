"""Layering: a lower layer never imports a higher one, not even inside a function.

Every import in vmm/ (module level, in functions, relative or absolute) is read with
ast and placed on the floor of what it names; the order is docs/CONTRACTS.md's:

    vmm._native -> errors -> arch, image -> kvm -> machine -> runtime -> kernel -> ops
    -> session / cli / pytest_plugin / kernelstore (and the vmm package itself)

A module may import its own floor or any lower one. The known exceptions below are
named with their reason; the test fails on a new violation and on an exception that
no longer happens (remove it from the list then).
"""

from __future__ import annotations

import ast
from pathlib import Path

VMM = Path(__file__).resolve().parent.parent / "vmm"

# Floors, bottom up. The longest matching prefix decides.
FLOORS = [
    ("vmm._native",),
    ("vmm.errors", "vmm.resources", "vmm.lazy", "vmm.hostio"),  # leaves: they import nothing of vmm
    ("vmm.arch", "vmm.image"),  # architecture facts; kernel image formats
    ("vmm.kvm",),
    ("vmm.machine",),
    ("vmm.runtime",),
    ("vmm.kernel",),
    ("vmm.ops",),
    ("vmm", "vmm.session", "vmm.session_report", "vmm.session_requests", "vmm.cli", "vmm.pytest_plugin", "vmm.kernelstore", "vmm.__main__",
     "vmm.debug", "vmm.scxbuild"),
]
FLOOR_NAMES = ["_native", "errors", "arch/image", "kvm", "machine", "runtime", "kernel", "ops", "top"]

# (importer, imported): why it is allowed for now. None left: keep it so.
EXPECTED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(VMM.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def exists(module: str) -> bool:
    base = VMM.parent.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists() or module == "vmm._native"


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """[(module, line)] of every vmm module that `path` imports, wherever the import is."""
    return imports_in(path.read_text(), module_name(path), is_package(path), str(path))


def imports_in(source: str, me: str, package_init: bool, filename: str = "<probe>") -> list[tuple[str, int]]:
    package = me if package_init else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "vmm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "vmm":
                continue
            for alias in node.names:  # `from vmm.x import y`: y may be a module itself
                sub = f"{source}.{alias.name}"
                out.append((sub if exists(sub) else source, node.lineno))
    return out


def floor(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            matches = module == p or (p != "vmm" and module.startswith(p + "."))
            if matches and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} has no floor: add it to FLOORS here and to docs/CONTRACTS.md"
    return best


def violations() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(VMM.rglob("*.py")):
        me = module_name(path)
        mine = floor(me)
        for target, line in imported_modules(path):
            theirs = floor(target)
            if theirs > mine:
                where = f"{path.relative_to(VMM.parent)}:{line}: {me} ({FLOOR_NAMES[mine]}) imports " \
                        f"{target} ({FLOOR_NAMES[theirs]})"
                found.setdefault((me, target), []).append(where)
    return found


def test_every_module_has_a_floor():
    for path in VMM.rglob("*.py"):
        floor(module_name(path))


def test_no_new_upward_import():
    new = {k: v for k, v in violations().items() if k not in EXPECTED}
    assert not new, "imports of a higher layer (docs/CONTRACTS.md):\n" + "\n".join(
        w for ws in new.values() for w in ws)


def test_expected_exceptions_still_happen():
    stale = sorted(set(EXPECTED) - set(violations()))
    assert not stale, f"no longer violated, remove from EXPECTED in tests/test_layers.py: {stale}"


def test_arch_and_image_import_only_errors():
    """The two packages on the floor above errors are leaves of it: plain facts and
    parsers that import nothing of vmm but vmm.errors (and their own modules)."""
    for package in ("arch", "image"):
        for path in sorted((VMM / package).rglob("*.py")):
            for target, line in imported_modules(path):
                own = target.startswith(f"vmm.{package}")
                assert own or target == "vmm.errors", f"{path.relative_to(VMM.parent)}:{line} imports {target}"


def test_the_walker_sees_imports_inside_functions():
    """The walker itself: function-level, relative and `from package import module` forms."""
    src = ("from . import layout\nfrom ..errors import VmmError\n"
           "def f():\n    from ..kernel import translate\n    import vmm.ops.batch\n"
           "    class C:\n        def g(self):\n            from vmm.runtime import freeze\n")
    found = dict(imports_in(src, "vmm.machine.probe", False))
    assert set(found) == {"vmm.machine.layout", "vmm.errors", "vmm.kernel.translate", "vmm.ops.batch",
                          "vmm.runtime.freeze"}
    assert found["vmm.runtime.freeze"] == 8
    assert [floor(m) > floor("vmm.machine.probe") for m in sorted(found)] == [False, True, False, True, True]
    assert dict(imports_in("from .batch import Op\n", "vmm.ops", True)) == {"vmm.ops.batch": 1}
