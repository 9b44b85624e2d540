import pytest

from vmm.errors import ConfigError, ImageError
from vmm.image import bootparams as bp

# Offsets from Documentation/arch/x86/boot.rst ("The real-mode kernel header") and
# Documentation/arch/x86/zero-page.rst.
DOCUMENTED = {
    "acpi_rsdp_addr": (0x070, 8), "ext_ramdisk_image": (0x0C0, 4), "ext_ramdisk_size": (0x0C4, 4),
    "ext_cmd_line_ptr": (0x0C8, 4), "e820_entries": (0x1E8, 1),
    "setup_sects": (0x1F1, 1), "root_flags": (0x1F2, 2), "syssize": (0x1F4, 4), "ram_size": (0x1F8, 2),
    "vid_mode": (0x1FA, 2), "root_dev": (0x1FC, 2), "boot_flag": (0x1FE, 2), "jump": (0x200, 2),
    "header": (0x202, 4), "version": (0x206, 2), "realmode_swtch": (0x208, 4),
    "start_sys_seg": (0x20C, 2), "kernel_version": (0x20E, 2), "type_of_loader": (0x210, 1),
    "loadflags": (0x211, 1), "setup_move_size": (0x212, 2), "code32_start": (0x214, 4),
    "ramdisk_image": (0x218, 4), "ramdisk_size": (0x21C, 4), "bootsect_kludge": (0x220, 4),
    "heap_end_ptr": (0x224, 2), "ext_loader_ver": (0x226, 1), "ext_loader_type": (0x227, 1),
    "cmd_line_ptr": (0x228, 4), "initrd_addr_max": (0x22C, 4), "kernel_alignment": (0x230, 4),
    "relocatable_kernel": (0x234, 1), "min_alignment": (0x235, 1), "xloadflags": (0x236, 2),
    "cmdline_size": (0x238, 4), "hardware_subarch": (0x23C, 4), "hardware_subarch_data": (0x240, 8),
    "payload_offset": (0x248, 4), "payload_length": (0x24C, 4), "setup_data": (0x250, 8),
    "pref_address": (0x258, 8), "init_size": (0x260, 4), "handover_offset": (0x264, 4),
    "kernel_info_offset": (0x268, 4),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_field_offsets_match_the_boot_protocol(name):
    import struct

    offset, fmt = bp.FIELDS[name]
    assert (offset, struct.calcsize("<" + fmt)) == DOCUMENTED[name]


def test_setup_header_fields_are_contiguous():
    import struct

    fields = bp.SETUP_HEADER_FIELDS
    assert fields[0][1] == bp.SETUP_HEADER_OFFSET
    for (_, off, fmt), (_, nxt, _) in zip(fields, fields[1:]):
        assert off + struct.calcsize("<" + fmt) == nxt
    assert fields[-1][1] + 4 == bp.SETUP_HEADER_END


def test_fields_round_trip_little_endian():
    z = bp.BootParams()
    z["cmd_line_ptr"] = 0x20000
    z["boot_flag"] = 0xAA55
    z["acpi_rsdp_addr"] = 0xE0000
    assert z.data[0x228:0x22C] == b"\x00\x00\x02\x00"
    assert z.data[0x1FE:0x200] == b"\x55\xaa"
    assert z["acpi_rsdp_addr"] == 0xE0000 and len(z.to_bytes()) == 4096


def test_e820_table_at_0x2d0_with_20_byte_entries():
    z = bp.BootParams()
    entries = [(0, 0x9FC00, 1), (0x100000, 0x1000000, 1)]
    z.set_e820(entries)
    assert z.data[0x1E8] == 2
    assert z.data[0x2D0 + 20:0x2D0 + 28] == (0x100000).to_bytes(8, "little")
    assert z.e820() == entries
    with pytest.raises(ConfigError):
        z.set_e820([(0, 1, 1)] * 129)


def test_errors():
    z = bp.BootParams()
    with pytest.raises(ConfigError):
        z["no_such_field"] = 1
    with pytest.raises(ConfigError):
        z["setup_sects"] = 256
    with pytest.raises(ImageError):
        bp.BootParams(b"short")
    with pytest.raises(ImageError):
        bp.read_setup_field(b"\0" * 0x210, "cmd_line_ptr")


def test_copy_setup_header_uses_the_length_byte_at_0x201():
    image = bytearray(0x400)
    image[0x1F1] = 7
    image[0x201] = 0x10  # header ends at 0x212
    image[0x202:0x206] = b"HdrS"
    image[0x211] = 0x81
    image[0x212] = 0x99  # past the header: must not be copied
    z = bp.BootParams()
    z.copy_setup_header(bytes(image))
    assert z["setup_sects"] == 7 and z["header"] == bp.HDRS_MAGIC and z["loadflags"] == 0x81
    assert z.data[0x212] == 0
