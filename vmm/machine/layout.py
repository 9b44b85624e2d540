"""The guest's memory map and port map: the only file that names guest-physical addresses.

The low-memory layout follows Firecracker's x86_64 layout (GDT at 0x500, zero page at
0x7000, page tables from 0x9000, command line at 0x20000, MP table just below 640 KiB,
ACPI in the BIOS area at 0xe0000, kernel at 16 MiB). RAM above 3 GiB is moved past the
32-bit MMIO gap, where the LAPIC and IOAPIC live.
"""

from __future__ import annotations

import re
import struct

from vmm.arch.x86.layout import MMIO_GAP_END, MMIO_GAP_START  # noqa: F401 (part of the map)
from vmm.arch.x86.paging import PAGE_SIZE  # noqa: F401 (part of the map)
from vmm.errors import ConfigError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- low memory: boot structures -----------------------------------------------
GDT_START = 0x500
IDT_START = 0x520
ZERO_PAGE_START = 0x7000  # struct boot_params, 4 KiB
BOOT_STACK_TOP = 0x8FF0  # initial RSP/RBP of the boot vCPU
PML4_START = 0x9000
PDPT_START = 0xA000
PD_START = 0xB000  # one page directory per GiB identity-mapped: 0xb000..0xefff
IDENTITY_MAP_SIZE = 4 * GiB  # 2 MiB pages; covers RAM below the gap, the gap and its APICs
PD_COUNT = IDENTITY_MAP_SIZE // GiB
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000  # including the terminating NUL; Linux reads up to cmdline_size

# Top of conventional memory: [0, EBDA_START) is usable RAM in the e820 map.
EBDA_START = 0x9FC00
MPTABLE_START = 0x9FC00  # Intel MP floating pointer + config table, 1 KiB
MPTABLE_END = 0xA0000
# The BIOS area [0xe0000, 1 MiB): ACPI tables (RSDP first, as Linux scans here too).
ACPI_START = 0xE0000
RSDP_START = ACPI_START
BIOS_AREA_END = 0x100000
HIMEM_START = 0x100000  # 1 MiB: start of the second e820 RAM range

# --- kernel and initrd ----------------------------------------------------------
KERNEL_START = 0x1000000  # 16 MiB: vmlinux is linked to load here (CONFIG_PHYSICAL_START)
BZIMAGE_LOAD_START = 0x100000  # protected-mode code of a bzImage booted via its decompressor
DEFAULT_INITRD_ADDR_MAX = 0x7FFFFFFF  # boot protocol default for kernels that don't say

# --- 32-bit MMIO gap and the devices in it ----------------------------------------
# [3 GiB, 4 GiB): the platform's, defined below the kvm layer (vmm.kvm.memory needs it)
MMIO_GAP_SIZE = MMIO_GAP_END - MMIO_GAP_START
IOAPIC_START = 0xFEC00000
LAPIC_START = 0xFEE00000
# KVM_SET_TSS_ADDR needs three pages and KVM_SET_IDENTITY_MAP_ADDR one, inside the
# gap and outside RAM (used by VMX for real mode emulation; harmless elsewhere).
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000
KVM_TSS_ADDR = 0xFFFBD000

# --- I/O ports ----------------------------------------------------------------------
COM1_PORT = 0x3F8  # the C core's console fast path (ffi/vcpu.c COM1_THR) names it too
COM1_PORT_COUNT = 8
COM1_IRQ = 4
# COM2: the requests channel (vmm/runtime/requests.py); the guest's 8250 driver finds it
# in its legacy ISA port table as /dev/ttyS1, no kernel option needed.
COM2_PORT = 0x2F8
COM2_PORT_COUNT = 8
COM2_IRQ = 3
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
EXIT_PORT = 0xF4  # QEMU isa-debug-exit's port
REPORT_PORT = 0x600
ACPI_PM1_EVT_PORT = 0x400  # PM1a_EVT_BLK (4 bytes); QEMU's 0x600 is our report port
ACPI_PM1_CNT_PORT = 0x404  # PM1a_CNT_BLK (2 bytes)

# --- limits ----------------------------------------------------------------------------
MIN_MEMORY = 32 * MiB  # kernel at 16 MiB plus room for it to run
MAX_MEMORY = 1 << 46  # 64 TiB: well inside the 4-level identity map's reach of the guest
MAX_CPUS = 254  # xAPIC ids 0..253; the IOAPIC takes id == cpus (<= 254, 255 is broadcast)

E820_RAM = 1
E820_RESERVED = 2


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from a string like "512M", "2G", "1GiB", "1.5G" or "65536" (binary units);
    the one size parser (the CLI's --memory too). ConfigError when not understood."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"size {text!r} is not understood; use e.g. '512M' or '2G'")
    number, unit = match.group(1), _UNITS[match.group(2).upper()]
    if "." in number:
        if not unit > 1:
            raise ConfigError(f"size {text!r} is not a whole number of bytes; use e.g. '512M' or '2G'")
        return int(float(number) * unit)
    return int(number) * unit


def parse_memory_size(size: int | str) -> int:
    """Memory size from an int (bytes) or a string like "512M", "2G", "1GiB"."""
    if isinstance(size, bool):
        raise ConfigError(f"memory size must be a byte count or a string like '512M', not {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        try:
            value = parse_size(size)
        except ConfigError:
            raise ConfigError(f"memory size {size!r} is not understood; use e.g. '512M' or '2G'") from None
    else:
        raise ConfigError(f"memory size must be an int or a string like '512M', not {type(size).__name__}")
    if value < MIN_MEMORY:
        raise ConfigError(f"memory size {value} bytes is below the minimum {MIN_MEMORY // MiB} MiB")
    if value > MAX_MEMORY:
        raise ConfigError(f"memory size {value} bytes is above the maximum {MAX_MEMORY >> 40} TiB")
    if value % PAGE_SIZE:
        raise ConfigError(f"memory size {value} bytes is not a multiple of 4 KiB")
    return value


def ram_regions(memory_size: int) -> list[tuple[int, int]]:
    """Guest-physical RAM ranges [(gpa, size)]: RAM that would overlap the gap moves above 4 GiB."""
    if memory_size <= MMIO_GAP_START:
        return [(0, memory_size)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, memory_size - MMIO_GAP_START)]


def ram_top_below_gap(memory_size: int) -> int:
    """End of the RAM range that starts at 0 (what 32-bit-limited loads must stay under)."""
    return min(memory_size, MMIO_GAP_START)


def e820_map(memory_size: int, split_at: tuple[int, ...] | list[int] = ()) -> list[tuple[int, int, int]]:
    """The e820 table [(addr, size, type)] the guest gets in boot_params. RAM entries are
    also cut at the guest-physical addresses `split_at` (where one NUMA node's RAM ends
    and the next one's begins), so that each entry is one node's, as the SRAT says and
    the memory slots are cut."""
    low_end = ram_top_below_gap(memory_size)
    entries = [
        (0, EBDA_START, E820_RAM),
        (MPTABLE_START, MPTABLE_END - MPTABLE_START, E820_RESERVED),
        (ACPI_START, BIOS_AREA_END - ACPI_START, E820_RESERVED),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ]
    if memory_size > MMIO_GAP_START:
        entries.append((MMIO_GAP_END, memory_size - MMIO_GAP_START, E820_RAM))
    out = []
    for addr, size, kind in entries:
        cuts = sorted(c for c in split_at if addr < c < addr + size) if kind == E820_RAM else []
        for start, end in zip([addr] + cuts, cuts + [addr + size]):
            out.append((start, end - start, kind))
    return out


def initrd_address(memory_size: int, initrd_size: int, kernel_end: int,
                   initrd_addr_max: int = DEFAULT_INITRD_ADDR_MAX) -> int:
    """Where the initrd goes: as high as possible, page-aligned, below RAM top, the gap
    and the kernel's initrd_addr_max (the last byte it can address), above the kernel."""
    limit = min(ram_top_below_gap(memory_size), initrd_addr_max + 1)
    addr = (limit - initrd_size) & ~(PAGE_SIZE - 1)
    if initrd_size <= 0 or addr < kernel_end:
        raise ConfigError(
            f"initrd of {initrd_size} bytes does not fit between the kernel end {kernel_end:#x} "
            f"and {limit:#x}; give the guest more memory"
        )
    return addr


def identity_page_tables() -> list[tuple[int, bytes]]:
    """(gpa, page bytes) for a PML4 -> PDPT -> PDs mapping [0, IDENTITY_MAP_SIZE) with 2 MiB pages.

    Only the boot vCPU uses these until the kernel installs its own tables.
    """
    present_rw = 0x3
    page_size_bit = 0x80
    pml4 = struct.pack("<Q", PDPT_START | present_rw).ljust(PAGE_SIZE, b"\0")
    pdpt = struct.pack(f"<{PD_COUNT}Q", *range(PD_START | present_rw, PD_START + PD_COUNT * PAGE_SIZE,
                                               PAGE_SIZE)).ljust(PAGE_SIZE, b"\0")
    pages = [(PML4_START, pml4), (PDPT_START, pdpt)]
    for i in range(PD_COUNT):
        first = i * GiB | present_rw | page_size_bit
        pd = struct.pack("<512Q", *range(first, first + 512 * 2 * MiB, 2 * MiB))
        pages.append((PD_START + i * PAGE_SIZE, pd))
    return pages
