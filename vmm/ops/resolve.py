"""KernelTarget resolution over a live kernel view (vmm.kernel.live), in two stages.

A cold batch keeps every vCPU parked for as long as it takes, so what cannot change
while the guest runs is resolved before the freeze, and only the rest inside it:

- before the freeze (:class:`StagedResolver`): symbol addresses (link address + the KASLR
  slide), BTF field offsets, sizes and types, per-CPU offsets, and the kernel image map
  (va - __START_KERNEL_map + phys_base) and direct map (va - page_offset_base)
  translations. These rest on values the kernel fixes at boot: the slide, phys_base,
  page_offset_base, nr_cpu_ids and ``__per_cpu_offset[]``, which Linux writes once in
  setup_per_cpu_areas() before it brings up the other CPUs and never again (CPU hotplug
  does not touch it). That assumption is checked inside every freeze (see
  :meth:`StagedResolver.still_valid`): the live view built from the freeze's registers
  must agree on slide, phys_base, page_offset_base and paging mode, and every byte of
  guest memory staging read (nr_cpu_ids, the ``__per_cpu_offset[]`` entries used) must
  read the same again; if anything differs the whole batch is resolved again inside
  the freeze, as if nothing had been staged.
- inside the freeze (:class:`LiveResolver`, built from the freeze snapshot): addresses
  that need a page walk (vmalloc, per-CPU chunks outside the direct map, modules),
  whose mapping can change while the guest runs, and paths that follow a pointer in
  guest memory (``"curr->pid"``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from ..arch.x86.regs import MASK64
from ..errors import TargetError, TranslationError, VmmError
from .targets import Location


class Deferred(Exception):
    """Raised by StagedResolver for a target it leaves to the freeze (not an error)."""


class LiveResolver:
    """KernelTarget resolution over the introspection live view (vmm.kernel.live).

    One resolver serves one batch (one rendezvous for a cold batch), so a target named
    twice resolves once: nothing it depends on (per-CPU offsets, page tables) moves
    while every vCPU is parked, and a hot batch resolves all its entries before writing.
    """

    def __init__(self, live: Any):
        self.live = live
        self.btf = live.kernel.btf if live.kernel.has_btf else None
        self._memo: dict = {}

    def translate(self, kva: int, size: Optional[int], what: str) -> int:
        """gpa of kva, checking that [kva, kva + size) is physically contiguous."""
        gpa = self.live.kva_to_gpa(kva)
        if size and size > 1:
            # Physically contiguous? (Always in the image and direct maps; a page-walked
            # object may straddle two unrelated pages.)
            last = self.live.kva_to_gpa(kva + size - 1)
            if last != gpa + size - 1:
                raise TargetError(f"{what} at kva {kva:#x} spans physically discontiguous "
                                  f"pages ({gpa:#x} .. {last:#x})")
        return gpa

    def _guess_type(self, name: str) -> Optional[str]:
        """BTF names the types of per-CPU variables only; for another global whose
        ``struct <name>`` exists with exactly the symbol's ELF size, that is its type."""
        if self.btf is None or self.live.kernel.var_type(name) is not None:
            return None
        sym = self.live.symbols.get(name)
        for candidate in (f"struct {name}", f"union {name}"):
            try:
                t = self.btf.type(candidate)
            except VmmError:
                continue
            if sym is not None and sym.size and self.btf.sizeof(t) == sym.size:
                return candidate
        return None

    def locate_symbol(self, name: str, path: Optional[str], cpu: Optional[int],
                      type: Optional[str] = None) -> Location:
        key = (name, path, cpu, type)
        if key not in self._memo:
            self._memo[key] = self._locate_symbol(name, path, cpu, type)
        return self._memo[key]

    def _locate_symbol(self, name: str, path: Optional[str], cpu: Optional[int],
                       type: Optional[str]) -> Location:
        type = type or self._guess_type(name)
        kva, f = self.live.resolve(name, path, cpu, type)
        what = name + (f"[cpu {cpu}]" if cpu is not None else "") + (f".{path}" if path else "")
        type_name = None
        if f is not None:
            size = f.size
            if self.btf is not None:
                type_name = self.btf.type_name(f.type)
        else:
            sym = self.live.symbols.lookup(name)
            size = sym.size or None
        gpa = self.translate(kva, size, what)
        return Location(gpa, size, f"{what} ({type_name or '?'}, {size} bytes at kva {kva:#x})",
                        kva=kva, type_name=type_name,
                        bit_size=(f.bit_size or None) if f is not None else None)

    def locate_kva(self, kva: int, size: Optional[int]) -> Location:
        gpa = self.translate(kva, size, f"kva {kva:#x}")
        return Location(gpa, size, f"kva {kva:#x}", kva=kva)

    def locate_gpa(self, gpa: int, size: Optional[int]) -> Location:
        return Location(gpa, size, f"gpa {gpa:#x}")

    def complete(self, loc: Location) -> Location:
        """A staged location whose page walk was left to the freeze, translated now."""
        if loc.gpa is not None:
            return loc
        return replace(loc, gpa=self.translate(loc.kva, loc.size, loc.description))

    def staged(self) -> "StagedResolver":
        """The pre-freeze half of this resolver (see the module docstring)."""
        return StagedResolver(self.live)


class RecordingReader:
    """A guest-memory reader that remembers every range it read and what it found."""

    def __init__(self, reader: Any):
        self.reader = reader
        self.reads: dict[tuple[int, int], bytes] = {}

    def read(self, gpa: int, n: int) -> bytes:
        """Guest bytes at gpa, read once per (gpa, n) and recorded for the freeze's check."""
        # Staging reads only boot-time constants, so a range read twice (nr_cpu_ids,
        # once per CPU) is read once; the freeze checks it again anyway.
        data = self.reads.get((gpa, n))
        if data is None:
            data = self.reads[(gpa, n)] = self.reader.read(gpa, n)
        return data

    def ranges(self) -> list[tuple[int, bytes]]:
        """The reads merged into disjoint (gpa, bytes) ranges: the 1024 entries of
        ``__per_cpu_offset[]`` a 1024-CPU batch reads become one 8 KiB range."""
        merged: list[tuple[int, bytearray]] = []
        for (gpa, _), data in sorted(self.reads.items()):
            if merged:
                start, buf = merged[-1]
                end = start + len(buf)
                if gpa <= end:
                    overlap = end - gpa
                    buf += data[overlap:] if overlap < len(data) else b""
                    continue
            merged.append((gpa, bytearray(data)))
        return [(gpa, bytes(buf)) for gpa, buf in merged]


class StagedResolver(LiveResolver):
    """Resolves before the freeze what cannot change while the guest runs.

    Built from a live view with the registers of an earlier freeze (for the KASLR
    slide). It never walks page tables: a target outside the image and direct maps
    comes back as a Location with ``gpa=None`` and its kva, to be translated inside the
    freeze (:meth:`LiveResolver.complete`); a path through a pointer raises
    :class:`Deferred` and resolves entirely inside the freeze.
    """

    def __init__(self, live: Any):
        self.recorder = RecordingReader(live.reader)
        super().__init__(live.view(self.recorder, cr3=None))
        self.memory = live.reader
        self.guards: list[tuple[int, bytes]] = []
        # (name, path, type) of a per-CPU target -> (a resolved Location, kva minus
        # that CPU's offset): every other CPU is one offset read and an addition away.
        self._per_cpu: dict = {}
        self._offsets: Optional[list[int]] = None  # __per_cpu_offset[], read once

    def _offset(self, cpu: int) -> int:
        if self._offsets is None:
            self._offsets = self.live.per_cpu_offsets()
        if 0 <= cpu < len(self._offsets):
            return self._offsets[cpu]
        return self.live.per_cpu_offset(cpu)  # raises, naming nr_cpu_ids

    def seal(self) -> None:
        """Staging is over: freeze what it read into the guard ranges still_valid checks."""
        self.guards = self.recorder.ranges()

    def translate(self, kva: int, size: Optional[int], what: str) -> Optional[int]:
        """The gpa of [kva, kva+size) through the kernel's linear maps, or None to leave it to
        the freeze's page walk."""
        gpa = self.live.linear_kva_to_gpa(kva)
        if gpa is None:
            return None
        if size and size > 1 and self.live.linear_kva_to_gpa(kva + size - 1) != gpa + size - 1:
            return None  # straddles the end of a map: let the freeze's page walk decide
        return gpa

    def _locate_symbol(self, name: str, path: Optional[str], cpu: Optional[int],
                       type: Optional[str]) -> Location:
        if path and "->" in path:
            raise Deferred(f"{name}.{path} follows a pointer in guest memory")
        try:
            if cpu is None:
                return super()._locate_symbol(name, path, cpu, type)
            known = self._per_cpu.get((name, path, type))
            if known is None:
                loc = super()._locate_symbol(name, path, cpu, type)
                rel = (loc.kva - self._offset(cpu)) & MASK64
                self._per_cpu[(name, path, type)] = (loc, rel)
                return loc
            first, rel = known
            kva = (rel + self._offset(cpu)) & MASK64
            what = f"{name}[cpu {cpu}]" + (f".{path}" if path else "")
            return Location(self.translate(kva, first.size, what), first.size,
                            f"{what} ({first.type_name or '?'}, {first.size} bytes at kva "
                            f"{kva:#x})", kva, first.type_name, first.bit_size)
        except TranslationError as exc:
            # A read of guest state failed (an address that needs a page walk): the
            # freeze, with its page tables, gives the authoritative answer or error.
            raise Deferred(str(exc)) from exc

    def locate_symbol(self, name: str, path: Optional[str], cpu: Optional[int],
                      type: Optional[str] = None) -> Location:
        key = (name, path, cpu, type)
        if key not in self._memo:
            try:
                self._memo[key] = self._locate_symbol(name, path, cpu, type)
            except Deferred as exc:
                self._memo[key] = exc
        value = self._memo[key]
        if isinstance(value, Deferred):
            raise value
        return value

    def locate_kva(self, kva: int, size: Optional[int]) -> Location:
        return Location(self.translate(kva, size, f"kva {kva:#x}"), size, f"kva {kva:#x}",
                        kva=kva)

    def still_valid(self, inner: LiveResolver) -> bool:
        """Inside the freeze: does what staging assumed still hold? ``inner`` is the
        resolver built from the freeze's own registers. Cheap: four compares and one
        read per merged range (nr_cpu_ids, ``__per_cpu_offset[]``: 8 KiB for 1024
        CPUs, a few microseconds)."""
        a, b = self.live, inner.live
        if (a.slide, a.phys_base, a.page_offset_base, a.la57) != \
                (b.slide, b.phys_base, b.page_offset_base, b.la57):
            return False
        if getattr(a, "_image", None) != getattr(b, "_image", None):
            return False
        try:
            return all(self.memory.read(gpa, len(data)) == data for gpa, data in self.guards)
        except VmmError:
            return False
