"""x86-64 page walk and guest-virtual memory access.

``walk``: a 4- or 5-level (CR4.LA57) walk from CR3 with 1 GiB / 2 MiB / 4 KiB pages.
``read_virtual`` / ``write_virtual`` / ``read_code``: bytes at a guest-virtual address
as a vCPU sees it (its CR0.PG, CR3, CR4), split at page boundaries.

``memory`` / ``reader``: anything with ``read(gpa, n) -> bytes`` (and ``write(gpa,
data)`` for writes), raising a VmmError outside guest RAM (vmm.kvm.GuestMemory).
``sregs``: anything with ``cr0``, ``cr3``, ``cr4`` (a cffi ``struct kvm_sregs``).
"""

from __future__ import annotations

import struct

from vmm.arch.x86.regs import CR0_PG, CR4_LA57, MASK64
from vmm.errors import TranslationError, VmmError

PAGE_SIZE = 0x1000
PTE_PRESENT = 1 << 0
PTE_PS = 1 << 7  # large page at PDPT (1 GiB) and PD (2 MiB)
PHYS_MASK = 0x000FFFFFFFFFF000

# (name, shift) from the top level down.
LEVELS_5 = (("PML5", 48), ("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12))
LEVELS_4 = LEVELS_5[1:]

MAX_INSTRUCTION = 15  # the longest x86 instruction, in bytes


def is_canonical(va: int, la57: bool = False) -> bool:
    """True when va is canonical for 48-bit (or, with la57, 57-bit) virtual addresses."""
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


def translate(memory, sregs, va: int) -> int:
    """Guest-physical address of ``va`` for a vCPU: itself without paging, else a walk."""
    if not sregs.cr0 & CR0_PG:
        return va
    return walk(memory, sregs.cr3, va, la57=bool(sregs.cr4 & CR4_LA57))


def _pieces(memory, sregs, va: int, n: int) -> list[tuple[int, int]]:
    """[(gpa, length)] covering n bytes at va, split at page boundaries."""
    out = []
    while n:
        chunk = min(n, PAGE_SIZE - (va & 0xFFF))
        out.append((translate(memory, sregs, va), chunk))
        va = (va + chunk) & MASK64
        n -= chunk
    return out


def read_virtual(memory, sregs, va: int, n: int) -> bytes:
    """n bytes at guest-virtual va; TranslationError / GuestMemoryError if any is missing."""
    return b"".join(memory.read(gpa, k) for gpa, k in _pieces(memory, sregs, va, n))


def write_virtual(memory, sregs, va: int, data: bytes) -> None:
    """Write data at guest-virtual va; every page is translated before the first byte moves."""
    pieces = _pieces(memory, sregs, va, len(data))
    off = 0
    for gpa, k in pieces:
        memory.write(gpa, data[off : off + k])
        off += k


def read_code(memory, sregs, rip: int, n: int = MAX_INSTRUCTION) -> bytes:
    """Up to n bytes at rip, stopping at an unmapped page or the end of RAM."""
    out = b""
    while len(out) < n:
        va = (rip + len(out)) & MASK64
        chunk = min(n - len(out), PAGE_SIZE - (va & 0xFFF))
        try:
            out += read_virtual(memory, sregs, va, chunk)
        except VmmError:
            break
    return out
