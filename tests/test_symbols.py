"""SymbolTable: lookup, suggestions, nearest symbol, duplicates."""

import pytest

from vmm.errors import SymbolNotFound
from vmm.kernel.symbols import Symbol, SymbolTable


def table():
    return SymbolTable([
        Symbol("_text", 0xFFFFFFFF81000000, 0, "T", ".text"),
        Symbol("int3_selftest", 0xFFFFFFFF81000100, 0x40, "t", ".text"),
        Symbol("__pfx_int3_selftest", 0xFFFFFFFF810000F0, 0x10, "t", ".text"),
        Symbol("runqueues", 0xFFFFFFFF83CF65C0, 0x1280, "D", ".data..percpu", True),
        Symbol("dup", 0xFFFFFFFF82000000, 4, "d", ".data"),
        Symbol("dup", 0xFFFFFFFF82000010, 4, "D", ".data"),
        Symbol("dup", 0xFFFFFFFF82000020, 4, "d", ".data"),
    ])


def test_lookup_and_suggestions():
    t = table()
    assert t.address("runqueues") == 0xFFFFFFFF83CF65C0
    assert "runqueues" in t and len(t) == 5
    with pytest.raises(SymbolNotFound) as e:
        t.lookup("runqueue")
    assert "did you mean: runqueues" in str(e.value)
    with pytest.raises(SymbolNotFound):
        t["int3_selftst"]


def test_nearest():
    t = table()
    assert t.nearest(0xFFFFFFFF8100011E) == ("int3_selftest", 0x1E)
    assert t.nearest(0xFFFFFFFF81000000) == ("_text", 0)
    assert t.format_address(0xFFFFFFFF810000F4) == "__pfx_int3_selftest+0x4"
    with pytest.raises(SymbolNotFound):
        t.nearest(0x1000)


def test_global_wins_over_local_duplicates():
    t = table()
    assert t.address("dup") == 0xFFFFFFFF82000010
    assert len(t.duplicates("dup")) == 3


def test_percpu():
    t = table()
    assert t.is_percpu("runqueues") and not t.is_percpu("_text")
    assert t.percpu_style == "absolute"
