"""x86-64 kernel virtual -> guest-physical address translation.

Three ways, cheapest first (the live view picks):
- the kernel image map: va - __START_KERNEL_map + phys_base;
- the direct map: va - page_offset_base;
- a 4- or 5-level (CR4.LA57) page-table walk from CR3, with 1 GiB / 2 MiB / 4 KiB pages.
"""

from __future__ import annotations

import struct

from vmm.errors import TranslationError, VmmError

START_KERNEL_MAP = 0xFFFFFFFF80000000
DEFAULT_PAGE_OFFSET_4L = 0xFFFF888000000000
DEFAULT_PAGE_OFFSET_5L = 0xFF11000000000000
# Where vmalloc and vmemmap start without CONFIG_RANDOMIZE_MEMORY (or before the kernel
# randomized them): Documentation/arch/x86/x86_64/mm.rst.
DEFAULT_VMALLOC_BASE_4L = 0xFFFFC90000000000
DEFAULT_VMALLOC_BASE_5L = 0xFFA0000000000000
DEFAULT_VMEMMAP_BASE_4L = 0xFFFFEA0000000000
DEFAULT_VMEMMAP_BASE_5L = 0xFFD4000000000000
PTI_USER_PGTABLE_BIT = 1 << 12  # page-table isolation: a user CR3 is the kernel's | this
DIRECT_MAP_SIZE_4L = 1 << 46  # 64 TiB
DIRECT_MAP_SIZE_5L = 1 << 52  # 4 PiB
CR4_LA57 = 1 << 12
MASK64 = (1 << 64) - 1

PTE_PRESENT = 1 << 0
PTE_PS = 1 << 7  # large page at PDPT (1 GiB) and PD (2 MiB)
PHYS_MASK = 0x000FFFFFFFFFF000

# (name, shift) from the top level down.
LEVELS_5 = (("PML5", 48), ("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12))
LEVELS_4 = LEVELS_5[1:]


def is_canonical(va: int, la57: bool = False) -> bool:
    bits = 57 if la57 else 48
    top = va >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def walk(reader, cr3: int, va: int, la57: bool = False) -> int:
    """Translate va by walking the page tables rooted at cr3; TranslationError if unmapped."""
    va &= MASK64
    if not is_canonical(va, la57):
        raise TranslationError(f"address {va:#x} is not canonical ({'5' if la57 else '4'}-level paging)")
    table = cr3 & PHYS_MASK
    levels = LEVELS_5 if la57 else LEVELS_4
    for name, shift in levels:
        index = (va >> shift) & 0x1FF
        entry_gpa = table + index * 8
        try:
            (entry,) = struct.unpack("<Q", reader.read(entry_gpa, 8))
        except VmmError as e:
            raise TranslationError(f"{va:#x}: {name} entry {index} at {entry_gpa:#x} "
                                   f"is outside guest memory ({e})") from None
        if not entry & PTE_PRESENT:
            raise TranslationError(f"{va:#x} is not mapped: {name} entry {index} at "
                                   f"{entry_gpa:#x} is not present ({entry:#x})")
        if name in ("PDPT", "PD") and entry & PTE_PS:
            page_mask = (1 << shift) - 1
            return (entry & PHYS_MASK & ~page_mask) | (va & page_mask)
        table = entry & PHYS_MASK
    return table | (va & 0xFFF)


def walk_kernel(reader, cr3: int, va: int, la57: bool = False) -> int:
    """walk() for a kernel address from any vCPU's CR3. A vCPU frozen in user mode
    under page-table isolation holds the user half of a PGD pair (kernel PGD | 4 KiB),
    which maps almost nothing of the kernel: when the walk fails there, walk the kernel
    PGD beside it."""
    try:
        return walk(reader, cr3, va, la57)
    except TranslationError:
        if not cr3 & PTI_USER_PGTABLE_BIT:
            raise
    return walk(reader, cr3 & ~PTI_USER_PGTABLE_BIT, va, la57)
