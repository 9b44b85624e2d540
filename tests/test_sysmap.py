"""System.map parsing, and per-CPU detection from [__per_cpu_start, __per_cpu_end)."""

import pytest

from vmm.errors import ImageError
from vmm.kernel.symbols import SymbolTable
from vmm.kernel.sysmap import parse_system_map

MAP_7X = b"""\
ffffffff81000000 T _text
ffffffff81000080 T entry_SYSCALL_64
ffffffff829340e0 D __per_cpu_offset
ffffffff83cc4000 D __per_cpu_start
ffffffff83cf65c0 D runqueues
ffffffff83cfa000 D __per_cpu_end
ffffffff83cfb000 B jiffies
"""
MAP_6X = b"""\
0000000000000000 D __per_cpu_start
0000000000020700 D runqueues
0000000000034000 D __per_cpu_end
ffffffff81000000 T _text
ffffffff82000000 D jiffies
ffffffffc0000000 t some_module_fn\t[mod]
"""


def test_parse_and_absolute_percpu():
    syms = parse_system_map(MAP_7X)
    assert syms[1].name == "entry_SYSCALL_64" and syms[1].address == 0xFFFFFFFF81000080
    t = SymbolTable(syms)
    assert t.is_percpu("runqueues") and not t.is_percpu("jiffies")
    assert not t.is_percpu("__per_cpu_offset")
    assert t.percpu_style == "absolute"


def test_relative_percpu_and_module_column():
    t = SymbolTable(parse_system_map(MAP_6X))
    assert t.is_percpu("runqueues") and t.address("runqueues") == 0x20700
    assert t.percpu_style == "relative"
    assert t.address("some_module_fn") == 0xFFFFFFFFC0000000


def test_from_file(tmp_path):
    p = tmp_path / "System.map"
    p.write_bytes(MAP_7X)
    assert len(parse_system_map(p)) == 7


@pytest.mark.parametrize("bad, match", [
    (b"", "no symbols"),
    (b"ffffffff81000000 T\n", "line 1"),
    (b"zzzz T name\n", "bad address"),
    (b"1 T a\n\x00\x01", "NUL"),
    (b"ffffffffffffffff B The real System.map is in the linux-image-7.3-dbg package\n", "placeholder"),
    (b"1" * 20 + b" T big\n", "64 bits"),
])
def test_bad_input(bad, match):
    with pytest.raises(ImageError, match=match):
        parse_system_map(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        parse_system_map(tmp_path / "nope")
