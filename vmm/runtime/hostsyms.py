"""Naming an address of the host's own kernel, for failure reports.

A guest register that holds an address of the host's KVM (its VMRUN/VMLAUNCH loop in
kvm_amd or kvm_intel) is host state that the host's virtualization left in the guest:
a bug of the host (KVM, or a CPU that emulates SVM/VMX, as a nested hypervisor or a TCG
emulator does), not of the guest or of vmm, which never sets guest registers while a
kernel boots. The guest then runs from an address that means nothing to it and hangs.

Reads /proc/kallsyms, which shows addresses only to root (kptr_restrict); elsewhere
every lookup answers None. Loaded at most once, and only when a report asks.
"""

from __future__ import annotations

import bisect
import threading
from typing import Optional

KALLSYMS = "/proc/kallsyms"
KERNEL_HALF = 0xFFFF800000000000  # lowest kernel address under 4- and 5-level paging
MAX_DISTANCE = 0x10000  # farther from the nearest symbol than this: not named
KVM_MODULES = ("kvm", "kvm_amd", "kvm_intel")

_lock = threading.Lock()
_tables: dict[str, tuple[list[int], list[tuple[str, str]]]] = {}


def _load(path: str) -> tuple[list[int], list[tuple[str, str]]]:
    with _lock:
        if path not in _tables:
            entries = []
            try:
                with open(path) as f:
                    for line in f:
                        parts = line.split()
                        if len(parts) < 3:
                            continue
                        addr = int(parts[0], 16)
                        if addr:  # all zero: addresses hidden from this user
                            module = parts[3].strip("[]") if len(parts) > 3 else ""
                            entries.append((addr, parts[2], module))
            except (OSError, ValueError):
                entries = []
            entries.sort()
            _tables[path] = ([e[0] for e in entries], [(e[1], e[2]) for e in entries])
        return _tables[path]


def host_symbol(addr: int, path: str = KALLSYMS) -> Optional[tuple[str, str, int]]:
    """(symbol, module or "", offset) of the host kernel's symbol at ``addr``, or None."""
    if addr < KERNEL_HALF:
        return None
    addrs, names = _load(path)
    i = bisect.bisect_right(addrs, addr) - 1
    if i < 0 or addr - addrs[i] > MAX_DISTANCE:
        return None
    return names[i][0], names[i][1], addr - addrs[i]


def leaked_host_state(addr: int, path: str = KALLSYMS) -> Optional[str]:
    """A sentence when ``addr`` (a guest RIP outside the guest kernel's image) is in the
    host's KVM; None otherwise."""
    found = host_symbol(addr, path)
    if found is None or found[1] not in KVM_MODULES:
        return None
    name, module, offset = found
    return (f"{addr:#x} is the host's own {name}+{offset:#x} [{module}]: the host's "
            "virtualization left its own state in this vCPU (a bug of the host's KVM or of "
            "the CPU emulating SVM/VMX under it, not of the guest or vmm)")
