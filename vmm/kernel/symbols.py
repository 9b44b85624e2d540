"""SymbolTable: kernel symbol name -> address, and address -> nearest symbol.

Per-CPU variables come in two styles:
- section-relative (x86-64 up to Linux 6.x): `.data..percpu` is linked at address 0,
  so a per-CPU symbol's value is an offset (`runqueues` = 0x20700);
- absolute (Linux 7.x): the section has a real address and `runqueues` is an
  ordinary kernel VA (0xffffffff83cf65c0) inside [__per_cpu_start, __per_cpu_end).
Either way per_cpu_ptr(&var, cpu) = &var + __per_cpu_offset[cpu]; the difference is
only whether &var moves with the KASLR slide (absolute) or not (relative).
"""

from __future__ import annotations

import bisect
from operator import itemgetter
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from vmm.errors import SymbolNotFound
from vmm.kernel.suggest import hint

KERNEL_SPACE = 0xFFFF800000000000


class Symbol(NamedTuple):
    """A kernel symbol as nm or System.map lists it."""

    name: str
    address: int
    size: int  # 0 when unknown (System.map has no sizes)
    type: str  # nm letter: T t D d B b R r A a W ...
    section: str  # "" when unknown
    percpu: bool = False

    @property
    def is_global(self) -> bool:
        """True for nm's upper-case (global) letters."""
        return self.type.isupper()


class SymbolTable:
    """Symbols by name (duplicates kept) and by address: lookup(), address(), nearest()."""

    def __init__(self, symbols: Iterable[Symbol]):
        self._by_name: dict[str, Symbol] = {}
        self._dups: dict[str, list[Symbol]] = {}
        symbols = list(symbols)
        for s in symbols:
            prev = self._by_name.get(s.name)
            if prev is None:
                self._by_name[s.name] = s
                continue
            self._dups.setdefault(s.name, [prev]).append(s)
            # A global definition beats file-local statics of the same name.
            if s.is_global and not prev.is_global:
                self._by_name[s.name] = s
        self._mark_percpu_range()
        # Sorted kernel-space addresses for nearest(); per-CPU offsets (small values)
        # are not addresses and stay out.
        # (Ties at one address are settled in nearest(), so sort by address alone.)
        ordered = [s for s in symbols if s[1] >= KERNEL_SPACE and s[3] not in "aA"]
        ordered.sort(key=itemgetter(1))
        self._sorted = ordered
        self._addrs = [s.address for s in ordered]

    def _mark_percpu_range(self) -> None:
        # With only a System.map there are no sections: per-CPU symbols are those in
        # [__per_cpu_start, __per_cpu_end).
        start = self._by_name.get("__per_cpu_start")
        end = self._by_name.get("__per_cpu_end")
        if start is None or end is None or any(s.percpu for s in self._by_name.values()):
            return
        lo, hi = start.address, end.address
        for name, s in list(self._by_name.items()):
            if lo <= s.address < hi and name != "__per_cpu_load":
                self._by_name[name] = s._replace(percpu=True)

    # ---------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Symbol]:
        return iter(self._by_name.values())

    def get(self, name: str) -> Symbol | None:
        """The symbol named `name`, or None."""
        return self._by_name.get(name)

    def lookup(self, name: str) -> Symbol:
        """The symbol named `name`; SymbolNotFound with close names when there is none."""
        s = self._by_name.get(name)
        if s is None:
            raise SymbolNotFound(f"no kernel symbol named {name!r}" + hint(name, self._by_name))
        return s

    __getitem__ = lookup

    def address(self, name: str) -> int:
        """The address of `name` (SymbolNotFound when unknown)."""
        return self.lookup(name).address

    def duplicates(self, name: str) -> list[Symbol]:
        """Every definition of `name` (file-local statics can share a name)."""
        return list(self._dups.get(name, [self.lookup(name)]))

    def is_percpu(self, name: str) -> bool:
        """True when `name` lives in the per-CPU section."""
        return self.lookup(name).percpu

    @property
    def percpu_style(self) -> str | None:
        """'relative' (values are offsets), 'absolute' (values are VAs) or None."""
        for s in self._by_name.values():
            if s.percpu and s.name not in ("__per_cpu_start", "__per_cpu_end"):
                return "absolute" if s.address >= KERNEL_SPACE else "relative"
        return None

    def nearest(self, addr: int) -> tuple[str, int]:
        """(name, offset) of the symbol at or below addr, like '%pS': ('int3_selftest', 0x1e)."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            raise SymbolNotFound(f"no symbol at or below {addr:#x}")
        best = self._sorted[i]
        # Several symbols may share the address: prefer a global, then a sized one.
        j = i
        while j > 0 and self._addrs[j - 1] == best.address:
            j -= 1
        same = self._sorted[j:i + 1]
        best = min(same, key=lambda s: (not s.is_global, s.size == 0, s.name))
        return best.name, addr - best.address

    def format_address(self, addr: int) -> str:
        """`name+0xoff` of the symbol at or below addr (`name` alone at its start);
        SymbolNotFound below the first symbol."""
        name, off = self.nearest(addr)
        return f"{name}+{off:#x}" if off else name
