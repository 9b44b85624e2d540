"""Page-table walks (4- and 5-level; 1 GiB, 2 MiB, 4 KiB pages) over in-process memory."""

import pytest

from page_tables import P, Tables
from vmm.arch.x86.paging import is_canonical, walk
from vmm.errors import TranslationError


@pytest.mark.parametrize("la57", [False, True])
def test_page_sizes(la57):
    t = Tables(la57)
    t.map(0xFFFFC90000000000, 0x40000000, 1 << 30)
    t.map(0xFFFFFFFFC0200000, 0x00600000, 1 << 21)
    t.map(0xFFFFFFFFC0401000, 0x00789000, 1 << 12)
    cr3 = t.root | 0x5  # PCID bits in CR3 are ignored
    assert walk(t.mem, cr3, 0xFFFFC90000000000 + 0x1234567, la57) == 0x40000000 + 0x1234567
    assert walk(t.mem, cr3, 0xFFFFFFFFC0200000 + 0x1ABCD, la57) == 0x600000 + 0x1ABCD
    assert walk(t.mem, cr3, 0xFFFFFFFFC0401FFF, la57) == 0x789FFF


def test_five_level_uses_bits_above_47():
    t = Tables(la57=True)
    va = 0xFF11000000000000  # 5-level direct map base: canonical only with LA57
    t.map(va, 0x200000, 1 << 21)
    assert walk(t.mem, t.root, va + 5, la57=True) == 0x200005
    with pytest.raises(TranslationError, match="canonical"):
        walk(t.mem, t.root, va, la57=False)


def test_not_present_names_level_and_address():
    t = Tables()
    t.map(0xFFFFFFFFC0200000, 0x600000, 1 << 21)
    with pytest.raises(TranslationError) as e:
        walk(t.mem, t.root, 0xFFFFFFFFC0400000)
    assert "PD entry" in str(e.value) and "0xffffffffc0400000" in str(e.value)
    with pytest.raises(TranslationError, match="PML4"):
        walk(t.mem, t.root, 0xFFFF888000000000)


def test_table_outside_memory():
    t = Tables()
    t.mem.write_u64(t.root + 511 * 8, 0x7FFF0000 | P)  # PDPT page never backed
    with pytest.raises(TranslationError, match="outside guest memory"):
        walk(t.mem, t.root, 0xFFFFFFFF81000000)


def test_canonical():
    assert is_canonical(0xFFFF800000000000) and is_canonical(0x7FFFFFFFFFFF)
    assert not is_canonical(0x800000000000)
    assert is_canonical(0xFF00000000000000, la57=True)
