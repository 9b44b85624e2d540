"""x86-64 page tables built in tests/data/kfixture's FakeMemory, for the walk tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "data"))
from kfixture import FakeMemory  # noqa: E402

from vmm.arch.x86.paging import PTE_PRESENT, PTE_PS  # noqa: E402

P, PS = PTE_PRESENT | 2, PTE_PRESENT | 2 | PTE_PS
NX = 1 << 63


class Tables:
    """Builds page tables in FakeMemory, allocating table pages from 0x100000 up."""

    def __init__(self, la57=False):
        self.mem = FakeMemory()
        self.la57 = la57
        self.next = 0x100000
        self.root = self.alloc()

    def alloc(self):
        page = self.next
        self.next += 0x1000
        self.mem.write(page, bytes(0x1000))
        return page

    def map(self, va, pa, level_size):
        shifts = ([48] if self.la57 else []) + [39, 30, 21, 12]
        stop = {1 << 30: 30, 1 << 21: 21, 1 << 12: 12}[level_size]
        table = self.root
        for shift in shifts:
            slot = table + ((va >> shift) & 0x1FF) * 8
            if shift == stop:
                self.mem.write_u64(slot, pa | (PS if shift > 12 else P) | NX)
                return
            entry = int.from_bytes(self.mem.read(slot, 8), "little")
            if not entry & 1:
                entry = self.alloc() | P
                self.mem.write_u64(slot, entry)
            table = entry & 0x000FFFFFFFFFF000
