import struct

import pytest

from vmm.errors import ConfigError
from vmm.machine import layout as L
from vmm.machine import tables as T


def sums_to_zero(data):
    return sum(data) % 256 == 0


# --- MP table ---------------------------------------------------------------------
def parse_mp(blob, base=L.MPTABLE_START):
    assert blob[:4] == b"_MP_" and sums_to_zero(blob[:16])
    physptr, length, rev = struct.unpack_from("<IBB", blob, 4)
    assert (length, rev) == (1, 4)
    cfg = blob[physptr - base:]
    assert cfg[:4] == b"PCMP"
    table_len, _, _, _, _, _, _, count, lapic = struct.unpack_from("<HBB8s12sIHHI", cfg, 4)
    assert sums_to_zero(cfg[:table_len]) and lapic == L.LAPIC_START
    entries, pos = [], 44
    for _ in range(count):
        kind = cfg[pos]
        size = 20 if kind == 0 else 8
        entries.append(cfg[pos:pos + size])
        pos += size
    assert pos == table_len
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 4, T.MP_MAX_CPUS])
def test_mp_table(cpus):
    ids = list(range(cpus))
    blob = T.mp_table(ids)
    assert len(blob) <= L.MPTABLE_END - L.MPTABLE_START
    entries = parse_mp(blob)
    procs = [e for e in entries if e[0] == 0]
    assert [p[1] for p in procs] == ids
    assert procs[0][3] == 3 and all(p[3] == 1 for p in procs[1:])  # BSP flag on CPU 0 only
    (ioapic,) = [e for e in entries if e[0] == 2]
    assert ioapic[1] == cpus and struct.unpack_from("<I", ioapic, 4)[0] == L.IOAPIC_START
    assert [e for e in entries if e[0] == 1][0][2:8] == b"ISA   "
    irqs = [(e[5], e[7]) for e in entries if e[0] == 3]
    assert irqs == [(i, i) for i in range(16)]
    lints = [(e[1], e[7]) for e in entries if e[0] == 4]
    assert lints == [(3, 0), (1, 1)]  # LINT0 ExtINT, LINT1 NMI


def test_mp_table_limits():
    with pytest.raises(ConfigError):
        T.mp_table(list(range(T.MP_MAX_CPUS + 1)))
    with pytest.raises(ConfigError):
        T.mp_table([])


# --- ACPI ------------------------------------------------------------------------------
def read_table(blob, addr, base=L.ACPI_START):
    off = addr - base
    sig, length = struct.unpack_from("<4sI", blob, off)
    table = blob[off:off + length]
    assert sums_to_zero(table), sig
    return sig, table


@pytest.mark.parametrize("cpus", [1, 3, 64, 254])
def test_acpi_tables(cpus):
    ids = list(range(cpus))
    blob, rsdp_addr = T.acpi_tables(ids)
    assert rsdp_addr == L.RSDP_START and L.ACPI_START + len(blob) <= L.BIOS_AREA_END
    assert blob[:8] == b"RSD PTR " and sums_to_zero(blob[:20]) and sums_to_zero(blob[:36])
    assert blob[15] == 2
    (xsdt_addr,) = struct.unpack_from("<Q", blob, 24)
    sig, xsdt = read_table(blob, xsdt_addr)
    assert sig == b"XSDT"
    tables = dict(read_table(blob, a) for a in struct.unpack_from("<QQ", xsdt, 36))
    assert set(tables) == {b"FACP", b"APIC"}

    fadt = tables[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6
    (flags,) = struct.unpack_from("<I", fadt, 112)
    assert not flags & T.FADT_HW_REDUCED_ACPI
    dsdt32, x_dsdt = struct.unpack_from("<I", fadt, 40)[0], struct.unpack_from("<Q", fadt, 140)[0]
    assert dsdt32 == x_dsdt
    sig, dsdt = read_table(blob, x_dsdt)
    assert sig == b"DSDT" and dsdt[36:] == T.AML_S5
    assert struct.unpack_from("<II", fadt, 56)[0] == L.ACPI_PM1_EVT_PORT
    assert struct.unpack_from("<I", fadt, 64)[0] == L.ACPI_PM1_CNT_PORT and fadt[88:90] == b"\x04\x02"
    assert struct.unpack_from("<BBBBQ", fadt, 148) == (1, 32, 0, 0, L.ACPI_PM1_EVT_PORT)
    assert struct.unpack_from("<BBBBQ", fadt, 172) == (1, 16, 0, 0, L.ACPI_PM1_CNT_PORT)
    facs_addr = struct.unpack_from("<I", fadt, 36)[0]
    assert facs_addr % 64 == 0 and blob[facs_addr - L.ACPI_START:][:4] == b"FACS"
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0x64) and fadt[128] == 0xFE
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert not boot_arch & T.IAPC_BOOT_ARCH_8042  # no keyboard probing
    assert boot_arch & T.IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT  # no rtc_cmos probe of 0x70/0x71

    madt = tables[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (L.LAPIC_START, 1)
    pos, seen = 44, {}
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        seen.setdefault(kind, []).append(madt[pos:pos + length])
        pos += length
    assert pos == len(madt)
    assert [e[3] for e in seen[0]] == ids and all(e[4] == 1 for e in seen[0])
    (ioapic,) = seen[1]
    assert ioapic[2] == cpus and struct.unpack_from("<II", ioapic, 4) == (L.IOAPIC_START, 0)
    assert [(e[3], struct.unpack_from("<I", e, 4)[0]) for e in seen[2]] == [(9, 9)]
    assert seen[4][0][5] == 1


def test_hw_reduced_variant():
    blob, _ = T.acpi_tables([0], hw_reduced=True)
    assert b"FACP" in blob


# --- topology ----------------------------------------------------------------------------
def test_topology_apic_ids():
    topo = T.Topology.parse("2s3c2t", 12)
    assert (topo.thread_bits, topo.core_bits) == (1, 2)
    assert topo.apic_ids() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    assert T.Topology.parse(None, 4).apic_ids() == [0, 1, 2, 3]
    assert T.Topology.parse((1, 2, 2), 4).apic_ids() == [0, 1, 2, 3]


@pytest.mark.parametrize("spec,cpus", [("2s2c", 4), ("2s2c2t", 4), ((0, 1, 1), 0), (5, 5), ("9s16c2t", 288)])
def test_bad_topologies(spec, cpus):
    with pytest.raises(ConfigError):
        T.Topology.parse(spec, cpus)
