"""Layering: a lower layer never imports a higher one, not even inside a function.

Every import in vmm/ (module level, in functions, relative or absolute) is read with
ast and placed on the floor of what it names; the order is docs/CONTRACTS.md's:

    vmm._native -> errors -> arch, image -> kvm -> machine -> runtime -> kernel -> ops
    -> top floor, a tree of four sub-floors:
       tools (kernelstore, scxbuild, debug, report) -> session (session, session_verdicts,
       session_requests, session_report) -> the vmm package -> entry points (cli, cli_debug,
       cli_kernelstore, cli_report, kernelstore/__main__, pytest_plugin)

A module may import its own floor (sub-floor) or any lower one. Within a floor the
modules may import each other, but the whole import graph of vmm/ (module level and
function level imports alike) has no cycle; a cycle is reported with its path. The
known exceptions below are named with their reason; the test fails on a new violation
and on an exception that no longer happens (remove it from the list then).
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
    # The top floor, in four sub-floors, bottom up:
    ("vmm.kernelstore", "vmm.scxbuild", "vmm.scxselftests", "vmm.debug", "vmm.report"),  # tools: the store, scheduler builds, debuggers, reports
    ("vmm.session", "vmm.session_requests", "vmm.session_verdicts", "vmm.session_report", "vmm.session_workload"),  # the session (vmm.Machine)
    ("vmm", "vmm.topology"),  # the package's public names (vmm/__init__.py: lazy exports of the session's; vmm/topology.py: the machine's topology)
    ("vmm.cli", "vmm.cli_debug", "vmm.cli_kernelstore", "vmm.cli_report", "vmm.cli_scx", "vmm.kernelstore.__main__",
     "vmm.__main__", "vmm.pytest_plugin"),  # entry points: nothing in vmm/ imports them but each other
]
FLOOR_NAMES = ["_native", "errors", "arch/image", "kvm", "machine", "runtime", "kernel", "ops",
               "top: tools", "top: session", "top: vmm package", "top: entry points"]
TOP = FLOOR_NAMES.index("top: tools")  # the first sub-floor of the top floor

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


def import_graph() -> dict[str, dict[str, str]]:
    """{importer: {imported: "file:line" of its first import}} over every module of vmm/,
    module level and function level imports alike."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(VMM.rglob("*.py")):
        edges = graph.setdefault(module_name(path), {})
        for target, line in imported_modules(path):
            edges.setdefault(target, f"{path.relative_to(VMM.parent)}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] for each strongly connected component that holds one (a
    module importing itself included), shortest from the component's first name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is ~200 modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for component in sorted(components):
        start, members = component[0], set(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        paths = {start: [start]}  # breadth first: the shortest way back to start
        queue = [start]
        while queue:
            v = queue.pop(0)
            nxt = sorted(w for w in graph.get(v, ()) if w in members)
            if start in nxt:
                found.append(paths[v] + [start])
                break
            for w in nxt:
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return found


def describe_cycle(graph: dict[str, dict[str, str]], cycle: list[str]) -> str:
    return cycle[0] + "".join(f"\n    -> {b}  ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


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


def test_no_import_cycle():
    """Within a floor modules may import each other, but never in a circle: the import
    graph of vmm/ is acyclic, so the floors (and the top floor's sub-floors) form a tree."""
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles in vmm/:\n" + "\n".join(describe_cycle(graph, c) for c in found)


def test_the_cycle_finder_reports_each_cycle_with_its_path():
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2", "e": "b.py:3"}, "c": {"a": "c.py:4"},
             "d": {"d": "d.py:5"}, "e": {}, "f": {"a": "f.py:6"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["d", "d"]]
    assert describe_cycle(graph, ["d", "d"]) == "d\n    -> d  (d.py:5)"
    assert cycles({"a": {"b": ""}, "b": {}}) == []


def test_the_top_floor_is_ordered():
    """The top floor's sub-floors: tools -> session -> the vmm package -> entry points.
    The store's `python -m` entry sits with the entry points, above the store it serves."""
    tools, session, package, entry = (FLOOR_NAMES.index(n) for n in
                                      ("top: tools", "top: session", "top: vmm package", "top: entry points"))
    assert TOP == tools < session < package < entry == len(FLOORS) - 1
    assert {floor(m) for m in ("vmm.kernelstore.cache", "vmm.kernelstore", "vmm.scxbuild",
                               "vmm.debug.gdbstub", "vmm.debug", "vmm.report.plot")} == {tools}
    assert {floor(m) for m in ("vmm.session", "vmm.session_report", "vmm.session_requests",
                               "vmm.session_verdicts")} == {session}
    assert floor("vmm") == package
    assert {floor(m) for m in ("vmm.cli", "vmm.cli_debug", "vmm.cli_kernelstore",
                               "vmm.kernelstore.__main__", "vmm.pytest_plugin")} == {entry}
    assert floor("vmm.ops.scx") < TOP
