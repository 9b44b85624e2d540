"""Linux's x86-64 kernel address space: where the kernel maps itself and its memory.

Kernel virtual -> guest-physical, three ways, cheapest first (the live view picks):
- the kernel image map: va - __START_KERNEL_map + phys_base;
- the direct map: va - page_offset_base;
- a page walk from CR3 (vmm.arch.x86.paging.walk; ``walk_kernel`` adds Linux's
  page-table-isolation fallback).
"""

from __future__ import annotations

from vmm.arch.x86.paging import walk
from vmm.errors import TranslationError

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
