import pytest

from vmm.errors import ConfigError
from vmm.machine import layout as L


def test_addresses_follow_the_firecracker_layout():
    assert (L.GDT_START, L.IDT_START, L.ZERO_PAGE_START, L.BOOT_STACK_TOP) == (0x500, 0x520, 0x7000, 0x8FF0)
    assert (L.PML4_START, L.PDPT_START, L.PD_START) == (0x9000, 0xA000, 0xB000)
    assert L.CMDLINE_START == 0x20000 and L.MPTABLE_START == 0x9FC00 and L.RSDP_START == 0xE0000
    assert L.KERNEL_START == 0x1000000
    assert (L.MMIO_GAP_START, L.MMIO_GAP_END) == (0xC0000000, 0x100000000)
    assert (L.LAPIC_START, L.IOAPIC_START) == (0xFEE00000, 0xFEC00000)
    assert (L.KVM_TSS_ADDR, L.KVM_IDENTITY_MAP_ADDR) == (0xFFFBD000, 0xFFFBC000)
    assert (L.COM1_PORT, L.COM1_IRQ, L.EXIT_PORT, L.REPORT_PORT) == (0x3F8, 4, 0xF4, 0x600)
    assert (L.I8042_DATA_PORT, L.I8042_COMMAND_PORT) == (0x60, 0x64)


def test_boot_structures_do_not_overlap():
    page_tables_end = L.PD_START + L.PD_COUNT * L.PAGE_SIZE
    ordered = [(L.GDT_START, L.IDT_START), (L.IDT_START, L.IDT_START + 8),
               (L.ZERO_PAGE_START, L.ZERO_PAGE_START + 4096), (L.BOOT_STACK_TOP, L.PML4_START),
               (L.PML4_START, page_tables_end), (L.CMDLINE_START, L.CMDLINE_START + L.CMDLINE_MAX_SIZE),
               (L.MPTABLE_START, L.MPTABLE_END), (L.ACPI_START, L.BIOS_AREA_END),
               (L.KERNEL_START, L.KERNEL_START + 1)]
    for (a0, a1), (b0, _b1) in zip(ordered, ordered[1:]):
        assert a0 < a1 <= b0


@pytest.mark.parametrize("text,value", [("512M", 512 << 20), ("2G", 2 << 30), ("1GiB", 1 << 30),
                                        ("65536K", 64 << 20), (256 << 20, 256 << 20)])
def test_parse_memory_size(text, value):
    assert L.parse_memory_size(text) == value


@pytest.mark.parametrize("bad", ["", "12X", "1M", "-5G", None, 3.5, True, (1 << 50), 64 * (1 << 20) + 1])
def test_bad_memory_sizes_are_config_errors(bad):
    with pytest.raises(ConfigError):
        L.parse_memory_size(bad)


def test_parse_size_is_the_one_size_parser():
    assert L.parse_size("1.5G") == 3 << 29 and L.parse_size("4k") == 4096 and L.parse_size("7") == 7
    for bad in ("", "1.5", "M", "-1M"):
        with pytest.raises(ConfigError):
            L.parse_size(bad)


def test_ram_regions_and_e820_below_the_gap():
    assert L.ram_regions(512 << 20) == [(0, 512 << 20)]
    e820 = L.e820_map(512 << 20)
    assert e820[0] == (0, 0x9FC00, L.E820_RAM)
    assert (0x9FC00, 0x400, L.E820_RESERVED) in e820
    assert (0x100000, (512 << 20) - 0x100000, L.E820_RAM) in e820


def test_ram_above_3g_moves_past_the_gap():
    size = 5 << 30
    assert L.ram_regions(size) == [(0, 3 << 30), (4 << 30, 2 << 30)]
    e820 = L.e820_map(size)
    assert (0x100000, (3 << 30) - 0x100000, L.E820_RAM) in e820
    assert e820[-1] == (4 << 30, 2 << 30, L.E820_RAM)


def test_initrd_goes_high_and_page_aligned():
    addr = L.initrd_address(512 << 20, 10_000, kernel_end=0x2000000)
    assert addr % 4096 == 0 and addr + 10_000 <= 512 << 20 and addr > (512 << 20) - 16384
    capped = L.initrd_address(4 << 30, 4096, 0x2000000, initrd_addr_max=0x37FFFFFF)
    assert capped + 4096 <= 0x38000000
    with pytest.raises(ConfigError, match="does not fit"):
        L.initrd_address(64 << 20, 60 << 20, kernel_end=0x2000000)


def test_identity_page_tables_map_4g_with_2m_pages():
    pages = dict(L.identity_page_tables())
    pml4 = pages[L.PML4_START]
    assert int.from_bytes(pml4[:8], "little") == L.PDPT_START | 3
    pdpt = pages[L.PDPT_START]
    for i in range(4):
        assert int.from_bytes(pdpt[i * 8:i * 8 + 8], "little") == (L.PD_START + i * 4096) | 3
    last_pd = pages[L.PD_START + 3 * 4096]
    # 0xfee00000 (LAPIC) maps to itself
    index = (0xFEE00000 - (3 << 30)) >> 21
    assert int.from_bytes(last_pd[index * 8:index * 8 + 8], "little") == 0xFEE00000 | 0x83
    assert all(len(p) == 4096 for p in pages.values())
