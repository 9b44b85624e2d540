"""Port and MMIO dispatch by address range to pure devices.

Unknown ports read as all-ones and writes to them are dropped, like an empty ISA bus;
each such access is counted per port (`unhandled`), never fatal. MMIO likewise.
A device whose io_out takes a `vcpu` keyword gets the index of the vCPU doing the out.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import threading
from collections import Counter
from typing import Any

from vmm.errors import ConfigError


# Unclaimed accesses are counted per address for the first MAX_MISS_ADDRESSES distinct
# addresses (every port fits; MMIO addresses are guest-chosen, so a guest sweeping the
# gap would grow the Counter without end); accesses to further ones go to
# `unhandled_other`.
MAX_MISS_ADDRESSES = 4096


def all_ones(size: int) -> int:
    """The value an unclaimed read of `size` bytes returns (all bits set)."""
    return (1 << (8 * size)) - 1


class _RangeBus:
    kind = "bus"

    def __init__(self):
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, Any, bool]] = []  # (start, end, device, wants_vcpu)
        self.unhandled: Counter[int] = Counter()
        self.unhandled_other = 0  # misses at addresses past MAX_MISS_ADDRESSES distinct ones
        self._count_lock = threading.Lock()

    def register(self, start: int, length: int, device: Any) -> None:
        end = start + length
        if length <= 0:
            raise ConfigError(f"{self.kind} range at {start:#x} has length {length}")
        for s, e, dev, _ in self._ranges:
            if start < e and s < end:
                raise ConfigError(f"{self.kind} range [{start:#x}, {end:#x}) overlaps {type(dev).__name__} "
                                  f"at [{s:#x}, {e:#x})")
        wants_vcpu = _takes_vcpu(getattr(self._write_method(device), "__func__", None)
                                 or self._write_method(device))
        i = bisect.bisect(self._starts, start)
        self._starts.insert(i, start)
        self._ranges.insert(i, (start, end, device, wants_vcpu))

    def ranges(self) -> list[tuple[int, int]]:
        """(start, length) of every registered device range."""
        return [(start, end - start) for start, end, _, _ in self._ranges]

    def find(self, addr: int):
        i = bisect.bisect(self._starts, addr) - 1
        if i >= 0:
            start, end, device, wants_vcpu = self._ranges[i]
            if addr < end:
                return device, wants_vcpu
        return None, False

    def _miss(self, addr: int) -> None:
        with self._count_lock:
            if addr in self.unhandled or len(self.unhandled) < MAX_MISS_ADDRESSES:
                self.unhandled[addr] += 1
            else:
                self.unhandled_other += 1

    @staticmethod
    def _write_method(device: Any):
        raise NotImplementedError


class PortBus(_RangeBus):
    """I/O ports to devices (io_in/io_out); unclaimed ports are counted."""

    kind = "port"

    @staticmethod
    def _write_method(device):
        return device.io_out

    def io_in(self, port: int, size: int, vcpu: int = -1) -> int:
        device, _ = self.find(port)
        if device is None:
            self._miss(port)
            return all_ones(size)
        return device.io_in(port, size) & all_ones(size)

    def io_out(self, port: int, size: int, value: int, vcpu: int = -1) -> None:
        device, wants_vcpu = self.find(port)
        if device is None:
            self._miss(port)
            return
        if wants_vcpu:
            device.io_out(port, size, value, vcpu=vcpu)
        else:
            device.io_out(port, size, value)


class MmioBus(_RangeBus):
    """MMIO ranges to devices (mmio_read/mmio_write); unclaimed accesses are counted."""

    kind = "mmio"

    @staticmethod
    def _write_method(device):
        return device.mmio_write

    def read(self, addr: int, size: int, vcpu: int = -1) -> int:
        device, _ = self.find(addr)
        if device is None:
            self._miss(addr)
            return all_ones(size)
        return device.mmio_read(addr, size) & all_ones(size)

    def write(self, addr: int, size: int, value: int, vcpu: int = -1) -> None:
        device, wants_vcpu = self.find(addr)
        if device is None:
            self._miss(addr)
            return
        if wants_vcpu:
            device.mmio_write(addr, size, value, vcpu=vcpu)
        else:
            device.mmio_write(addr, size, value)


@functools.lru_cache(maxsize=256)
def _takes_vcpu(write) -> bool:
    """Does a device's write method take the vCPU index (asked once per method, not per
    registration: a clone registers every device anew)?"""
    return "vcpu" in inspect.signature(write).parameters
