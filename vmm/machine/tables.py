"""Firmware tables that tell the guest its CPUs and interrupt wiring: Intel MP and ACPI.

Linux reads ACPI first (RSDP passed in boot_params.acpi_rsdp_addr, also found by its
scan of 0xe0000..0xfffff) and falls back to the MP table (found by scanning the last KiB
of base memory at 0x9fc00). A kernel built without ACPI uses the MP table. Both list one
LAPIC per vCPU and the IOAPIC, so Linux starts every AP with INIT/SIPI either way.

With more than one NUMA node (vmm.machine.topology) the XSDT also lists an SRAT (which
node each APIC id and each RAM range belongs to) and a SLIT (the nodes' distances).

Formats: Intel MultiProcessor Specification 1.4 (chapter 4) and ACPI 6.x (RSDP, XSDT,
FADT, MADT, DSDT, FACS, SRAT 5.2.16, SLIT 5.2.17). All checksums make the covered bytes sum to 0 mod 256.
"""

from __future__ import annotations

import struct

from vmm.errors import ConfigError
from vmm.machine import layout as L
from vmm.machine.topology import Topology as _Topology

OEM_ID = b"VMMPY "  # 6 bytes
OEM_TABLE_ID = b"VMMPYTBL"  # 8 bytes
CREATOR_ID = b"VMPY"
APIC_VERSION = 0x14  # integrated LAPIC (as KVM's in-kernel LAPIC reports)
IOAPIC_VERSION = 0x11
ISA_IRQS = 16
SCI_IRQ = 9


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with it in place of a zero) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _with_checksum(data: bytes, offset: int, end: int | None = None) -> bytes:
    buf = bytearray(data)
    buf[offset] = 0
    buf[offset] = checksum(bytes(buf[:end]))
    return bytes(buf)


# --- CPU topology: vmm/machine/topology.py (re-exported: the tables take its APIC ids) ---------
Topology = _Topology


# --- Intel MP table ---------------------------------------------------------------------------
MP_FLOATING_SIZE = 16
MP_CONFIG_HEADER_SIZE = 44
MP_PROCESSOR_SIZE = 20
MP_ENTRY_SIZE = 8  # bus, IOAPIC, I/O interrupt, local interrupt
MP_CPU_ENABLED = 0x01
MP_CPU_BOOTPROCESSOR = 0x02
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3


def mp_table_size(cpus: int) -> int:
    """Bytes the MP floating pointer and configuration table take for `cpus` CPUs."""
    return (MP_FLOATING_SIZE + MP_CONFIG_HEADER_SIZE + cpus * MP_PROCESSOR_SIZE
            + MP_ENTRY_SIZE * (2 + ISA_IRQS + 2))


MP_MAX_CPUS = next(n for n in range(L.MAX_CPUS, 0, -1)
                   if mp_table_size(n) <= L.MPTABLE_END - L.MPTABLE_START)


def mp_table(apic_ids: list[int], base: int = L.MPTABLE_START) -> bytes:
    """MP floating pointer at `base` followed by the configuration table."""
    cpus = len(apic_ids)
    if not 1 <= cpus <= MP_MAX_CPUS:
        raise ConfigError(f"the MP table holds 1..{MP_MAX_CPUS} CPUs, not {cpus}")
    ioapic_id = max(apic_ids) + 1
    entries = []
    # CPU signature family 6 and the FPU+APIC feature bits, as firmware reports them.
    for i, apic_id in enumerate(apic_ids):
        flags = MP_CPU_ENABLED | (MP_CPU_BOOTPROCESSOR if i == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", 0, apic_id, APIC_VERSION, flags, 0x600, 0x201))
    entries.append(struct.pack("<BB6s", 1, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, L.IOAPIC_START))
    # ISA IRQ n -> IOAPIC pin n, for every n including the PIT's IRQ 0: that is KVM's
    # default GSI routing (GSI n -> IOAPIC pin n and PIC pin n). QEMU's "IRQ0 -> GSI2"
    # needs a KVM_SET_GSI_ROUTING of its own; without one the in-kernel PIT hits pin 0.
    for irq in range(ISA_IRQS):
        entries.append(struct.pack("<BBHBBBB", 3, MP_INT, 0, 0, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", 4, MP_EXTINT, 0, 0, 0, 0xFF, 0))  # LINT0
    entries.append(struct.pack("<BBHBBBB", 4, MP_NMI, 0, 0, 0, 0xFF, 1))  # LINT1
    body = b"".join(entries)
    config_addr = base + MP_FLOATING_SIZE
    header = struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", MP_CONFIG_HEADER_SIZE + len(body), 4, 0,
                         b"VMMPY   ", b"VMMPY-MPTBL ", 0, 0, len(entries), L.LAPIC_START, 0, 0, 0)
    config = _with_checksum(header + body, 7)
    floating = _with_checksum(struct.pack("<4sIBBB5x", b"_MP_", config_addr, 1, 4, 0), 10)
    return floating + config


# --- ACPI ---------------------------------------------------------------------------------------
ACPI_HEADER_SIZE = 36
RSDP_SIZE = 36
FADT_SIZE = 276  # ACPI 6.x FADT, revision 6
FACS_SIZE = 64
MADT_PCAT_COMPAT = 0x1  # the 8259 pair is present too
MADT_LAPIC_ENABLED = 0x1
MADT_POLARITY_HIGH_TRIGGER_LEVEL = 0x000D
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED = 1 << 3
IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5  # ACPI 5+ (this FADT is revision 6)
GAS_SYSTEM_IO = 1


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """An ACPI system description table: the 36-byte header, then `body`, checksummed."""
    header = struct.pack("<4sIBB6s8sI4sI", signature, ACPI_HEADER_SIZE + len(body), revision, 0,
                         OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    return _with_checksum(header + body, 9)


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2: checksum over the first 20 bytes, extended checksum over all 36."""
    data = struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_SIZE, xsdt_addr, 0)
    data = _with_checksum(data, 8, 20)
    return _with_checksum(data, 32)


def madt(apic_ids: list[int]) -> bytes:
    """The ACPI MADT: a local APIC per id, the IOAPIC, the SCI's interrupt override, LINT1 as NMI."""
    ioapic_id = max(apic_ids) + 1
    body = struct.pack("<II", L.LAPIC_START, MADT_PCAT_COMPAT)
    for uid, apic_id in enumerate(apic_ids):
        body += struct.pack("<BBBBI", 0, 8, uid, apic_id, MADT_LAPIC_ENABLED)
    body += struct.pack("<BBBBII", 1, 12, ioapic_id, 0, L.IOAPIC_START, 0)
    # No IRQ0 -> GSI2 override: KVM's default routing sends the PIT's GSI 0 to pin 0
    # (see mp_table). The SCI is level-triggered, active high, as on PCs.
    body += struct.pack("<BBBBIH", 2, 10, 0, SCI_IRQ, SCI_IRQ, MADT_POLARITY_HIGH_TRIGGER_LEVEL)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # LINT1 of every CPU is NMI
    return sdt(b"APIC", 4, body)


def fadt(dsdt_addr: int, facs_addr: int, hw_reduced: bool = False) -> bytes:
    """A minimal FADT: only the PM1a event and control blocks ACPICA requires (see
    devices/acpi_pm.py; no SMI command port: PM1_CNT.SCI_EN says ACPI mode is on), no
    keyboard controller, reset through port 0x64 value 0xFE."""
    body = bytearray(FADT_SIZE - ACPI_HEADER_SIZE)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into("<" + fmt, body, offset - ACPI_HEADER_SIZE, *values)

    put(36, "I", 0 if hw_reduced else facs_addr)  # FIRMWARE_CTRL
    put(40, "I", dsdt_addr)  # DSDT
    put(46, "H", 0 if hw_reduced else SCI_IRQ)  # SCI_INT
    if not hw_reduced:
        put(56, "I", L.ACPI_PM1_EVT_PORT)  # PM1a_EVT_BLK
        put(64, "I", L.ACPI_PM1_CNT_PORT)  # PM1a_CNT_BLK
        put(88, "BB", 4, 2)  # PM1_EVT_LEN, PM1_CNT_LEN
        put(148, "BBBBQ", GAS_SYSTEM_IO, 32, 0, 0, L.ACPI_PM1_EVT_PORT)  # X_PM1a_EVT_BLK
        put(172, "BBBBQ", GAS_SYSTEM_IO, 16, 0, 0, L.ACPI_PM1_CNT_PORT)  # X_PM1a_CNT_BLK
    # No 8042 flag: our i8042 only implements the reset line, so an ACPI kernel should not
    # probe for a keyboard controller ("reboot=k" still writes 0xFE to port 0x64).
    # No CMOS RTC at ports 0x70/0x71 either (the guest's wall clock is kvm-clock's): said
    # so, an ACPI kernel registers no rtc_cmos device, whose probe otherwise polls the
    # absent update-in-progress bit (20,002 exits on each port in a Debian-kernel boot).
    put(109, "H", IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
    flags = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RESET_REG_SUP
    put(112, "I", flags | (FADT_HW_REDUCED_ACPI if hw_reduced else 0))
    put(116, "BBBBQ", GAS_SYSTEM_IO, 8, 0, 1, L.I8042_COMMAND_PORT)  # RESET_REG
    put(128, "B", 0xFE)  # RESET_VALUE
    put(131, "B", 0)  # FADT minor version
    put(140, "Q", dsdt_addr)  # X_DSDT
    return sdt(b"FACP", 6, bytes(body))


def facs() -> bytes:
    """The ACPI FACS (version 2, no waking vector)."""
    # Signature, length, hardware signature, waking vectors, global lock, flags, version 2.
    return struct.pack("<4sIIIIIQB31x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, 2)


# AML: Name (_S5, Package () { 5, 5, 0, 0 }): soft-off is PM1_CNT.SLP_TYP 5.
#   NameOp 08, "_S5_", PackageOp 12, PkgLength 08, NumElements 04,
#   BytePrefix 0a 05, BytePrefix 0a 05, ZeroOp 00, ZeroOp 00
AML_S5 = bytes.fromhex("085f53355f1208040a050a050000")


def dsdt() -> bytes:
    """The DSDT: no devices, only \\_S5 so that the guest's poweroff reaches us."""
    return sdt(b"DSDT", 2, AML_S5)


SRAT_CPU_ENABLED = 0x1
SRAT_MEM_ENABLED = 0x1


def srat(topology: _Topology, memory_size: int) -> bytes:
    """The ACPI SRAT (revision 3): a Processor Local APIC Affinity structure (type 0) per
    CPU, in CPU order, naming its node (the proximity domain), and a Memory Affinity
    structure (type 1) per node RAM range (topology.memory_ranges)."""
    body = struct.pack("<IQ", 1, 0)  # reserved: 1 for backward compatibility, then 8 bytes
    for cpu, apic_id in enumerate(topology.apic_ids()):
        node = topology.node_of(cpu)
        # type, length, proximity domain [7:0], APIC id, flags, SAPIC EID,
        # proximity domain [31:8], clock domain
        body += struct.pack("<BBBBIB3sI", 0, 16, node & 0xFF, apic_id, SRAT_CPU_ENABLED, 0,
                            (node >> 8).to_bytes(3, "little"), 0)
    for node, gpa, size in topology.memory_ranges(memory_size):
        # type, length, proximity domain, reserved, base, length, reserved, flags, reserved
        body += struct.pack("<BBIHQQIIQ", 1, 40, node, 0, gpa, size, 0, SRAT_MEM_ENABLED, 0)
    return sdt(b"SRAT", 3, body)


def slit(topology: _Topology) -> bytes:
    """The ACPI SLIT: the number of nodes (u64), then their distance matrix, row by row."""
    matrix = topology.distance_matrix()
    return sdt(b"SLIT", 1, struct.pack("<Q", len(matrix)) + bytes(d for row in matrix for d in row))


def acpi_tables(apic_ids: list[int], base: int = L.ACPI_START, hw_reduced: bool = False,
                topology: _Topology | None = None, memory_size: int = 0) -> tuple[bytes, int]:
    """All ACPI tables as one blob to write at `base`, and the RSDP's address (== base).
    With a `topology` of more than one node (and the guest's `memory_size`), the SRAT and
    SLIT too; `apic_ids` must be the topology's."""
    if not 1 <= len(apic_ids) <= L.MAX_CPUS:
        raise ConfigError(f"ACPI tables hold 1..{L.MAX_CPUS} CPUs, not {len(apic_ids)}")
    blob = bytearray(b"\0" * 64)  # RSDP goes first, filled in last

    def place(table: bytes, align: int = 16) -> int:
        blob.extend(b"\0" * (-len(blob) % align))
        addr = base + len(blob)
        blob.extend(table)
        return addr

    facs_addr = place(facs(), 64)
    dsdt_addr = place(dsdt())
    fadt_addr = place(fadt(dsdt_addr, facs_addr, hw_reduced))
    pointers = [fadt_addr, place(madt(apic_ids))]
    if topology is not None and topology.all_nodes > 1:
        if topology.apic_ids() != list(apic_ids):
            raise ConfigError("the SRAT's APIC ids must be the MADT's (the topology's)")
        pointers += [place(srat(topology, memory_size)), place(slit(topology))]
    xsdt_addr = place(sdt(b"XSDT", 1, struct.pack(f"<{len(pointers)}Q", *pointers)))
    blob[0:RSDP_SIZE] = rsdp(xsdt_addr)
    if base + len(blob) > L.BIOS_AREA_END:
        raise ConfigError("ACPI tables do not fit below 1 MiB")
    return bytes(blob), base
