"""The x86 platform's 32-bit MMIO gap: RAM that would overlap it moves above 4 GiB.

The LAPIC (0xfee00000) and IOAPIC (0xfec00000) live in it. vmm.kvm.memory splits guest
RAM around it; vmm.machine.layout (the guest-physical memory map) re-exports it.
"""

from __future__ import annotations

MMIO_GAP_START = 0xC0000000  # 3 GiB
MMIO_GAP_END = 0x100000000  # 4 GiB
