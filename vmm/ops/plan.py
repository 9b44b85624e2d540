"""A cold batch as a packed plan (ffi/plan.h), applied in one C call while frozen.

Each entry is 32 bytes {host, value, before, width | kind << 32}. Entries resolved
before the freeze are packed before it; those only the freeze can resolve are packed
inside it, in place. ``GuestMemory.apply_plan`` runs the whole plan in order (GIL
released) and leaves each entry's previous value in ``before``; the EntryResults are
built after the thaw. Measured (benchmarks/bench_batch.py, 2x1024-entry mission batch on
a loaded 2-core PVM host): applying the staged plan entry by entry through GuestMemory's
Python methods kept the guest frozen 8.5-14.7 ms (`--python-apply`), the one C call
0.12 ms, so the C call stays.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

from ..errors import TargetError
from .targets import Location
from .values import Bytes, KernelValue, OrU32, U32, U64, value_from_bytes

# Kinds, as in ffi/plan.h.
STORE, OR, ATOMIC_OR, COPY, LOAD, LOAD_BYTES = range(6)
ENTRY = struct.Struct("<QQQII")

# False: apply plans entry by entry through GuestMemory's Python methods (the
# benchmark's comparison; also the path when the C core predates ffi/plan.c).
USE_NATIVE = True


def native_available(memory: Any) -> bool:
    """True when the memory can apply a packed plan in C (and it is not switched off)."""
    return USE_NATIVE and hasattr(memory, "apply_plan") and memory.plan_supported()


class Plan:
    """The packed entries of one batch plus what is needed to read the results back."""

    def __init__(self, memory: Any, n: int):
        from ..kvm.native import native

        self.ffi = native()[0]
        self.memory = memory
        self.n = n
        self.buf = bytearray(ENTRY.size * n)
        self.kinds = [0] * n
        self.bufs: dict[int, Any] = {}  # entry index -> cffi buffer of old bytes
        self._keep: list[Any] = []  # source buffers of COPY entries

    def _addr(self, cdata: Any) -> int:
        return int(self.ffi.cast("uintptr_t", cdata))

    def set_write(self, i: int, host: int, value: KernelValue) -> None:
        """Row i: the write of `value` at host address `host`."""
        if isinstance(value, U32):
            row = (host, value.value, 0, 4, STORE)
        elif isinstance(value, U64):
            row = (host, value.value, 0, 8, STORE)
        elif isinstance(value, OrU32):
            row = (host, value.mask, 0, 4, OR)  # cold: atomic by quiesce
        elif isinstance(value, Bytes):
            src = self.ffi.from_buffer(value.data)
            old = self.ffi.new("uint8_t[]", max(value.width, 1))
            self._keep.append(src)
            self.bufs[i] = old
            row = (host, self._addr(src), self._addr(old), value.width, COPY)
        else:
            raise TargetError(f"unsupported value variant {type(value).__name__}")
        self.kinds[i] = row[4]
        ENTRY.pack_into(self.buf, ENTRY.size * i, *row)

    def set_read(self, i: int, host: int, size: int) -> None:
        """Row i: a read of `size` bytes at host address `host`."""
        if size in (4, 8):
            row = (host, 0, 0, size, LOAD)
        else:
            old = self.ffi.new("uint8_t[]", size)
            self.bufs[i] = old
            row = (host, 0, self._addr(old), size, LOAD_BYTES)
        self.kinds[i] = row[4]
        ENTRY.pack_into(self.buf, ENTRY.size * i, *row)

    def run(self) -> None:
        """Apply every row in one C call."""
        if self.n:
            self.memory.apply_plan(self.ffi.from_buffer("struct vmm_plan_entry[]", self.buf),
                                   self.n)

    def befores(self) -> list[int]:
        """Each row's previous value (integer rows)."""
        return memoryview(self.buf).cast("Q")[2::4].tolist()

    def old_bytes(self, i: int, n: int) -> bytes:
        """The n bytes row i read or found before its write."""
        return bytes(self.ffi.buffer(self.bufs[i], n))

    def write_result(self, i: int, value: KernelValue, old: int) -> tuple[KernelValue, KernelValue]:
        """(before, after) values of write row i."""
        if isinstance(value, U32):
            return U32(old), value
        if isinstance(value, U64):
            return U64(old), value
        if isinstance(value, OrU32):
            return U32(old), U32(old | value.mask)
        return Bytes(self.old_bytes(i, value.width)), value

    def read_result(self, i: int, loc: Location, old: int) -> KernelValue:
        """The value read by row i, typed by the location's size."""
        if loc.size == 4:
            return U32(old)
        if loc.size == 8:
            return U64(old)
        return value_from_bytes(self.old_bytes(i, loc.size or 0))


def host_for(memory: Any, loc: Location, width: Optional[int] = None) -> int:
    """The host address of a location's bytes (checked against guest RAM by GuestMemory)."""
    return memory.host_address(loc.gpa, width if width is not None else loc.size)
