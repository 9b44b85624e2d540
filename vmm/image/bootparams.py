"""struct boot_params (the "zero page") and its setup_header, written once as data.

Offsets and sizes are those of the x86 boot protocol (Documentation/arch/x86/boot.rst)
and Documentation/arch/x86/zero-page.rst; the setup_header sits at 0x1f1 both in the
zero page and in a bzImage file.
"""

from __future__ import annotations

import struct

from vmm.errors import ConfigError, ImageError

ZERO_PAGE_SIZE = 4096
SETUP_HEADER_OFFSET = 0x1F1
E820_ENTRY_SIZE = 20  # struct boot_e820_entry { u64 addr; u64 size; u32 type; } packed
E820_MAX_ENTRIES = 128

# (field name, offset, struct format); every multi-byte field is little-endian.
BOOT_PARAMS_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("acpi_rsdp_addr", 0x070, "Q"),
    ("ext_ramdisk_image", 0x0C0, "I"),
    ("ext_ramdisk_size", 0x0C4, "I"),
    ("ext_cmd_line_ptr", 0x0C8, "I"),
    ("cc_blob_address", 0x13C, "I"),
    ("alt_mem_k", 0x1E0, "I"),
    ("e820_entries", 0x1E8, "B"),
    ("sentinel", 0x1EF, "B"),
)

SETUP_HEADER_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("setup_sects", 0x1F1, "B"),
    ("root_flags", 0x1F2, "H"),
    ("syssize", 0x1F4, "I"),
    ("ram_size", 0x1F8, "H"),
    ("vid_mode", 0x1FA, "H"),
    ("root_dev", 0x1FC, "H"),
    ("boot_flag", 0x1FE, "H"),
    ("jump", 0x200, "H"),
    ("header", 0x202, "I"),
    ("version", 0x206, "H"),
    ("realmode_swtch", 0x208, "I"),
    ("start_sys_seg", 0x20C, "H"),
    ("kernel_version", 0x20E, "H"),
    ("type_of_loader", 0x210, "B"),
    ("loadflags", 0x211, "B"),
    ("setup_move_size", 0x212, "H"),
    ("code32_start", 0x214, "I"),
    ("ramdisk_image", 0x218, "I"),
    ("ramdisk_size", 0x21C, "I"),
    ("bootsect_kludge", 0x220, "I"),
    ("heap_end_ptr", 0x224, "H"),
    ("ext_loader_ver", 0x226, "B"),
    ("ext_loader_type", 0x227, "B"),
    ("cmd_line_ptr", 0x228, "I"),
    ("initrd_addr_max", 0x22C, "I"),
    ("kernel_alignment", 0x230, "I"),
    ("relocatable_kernel", 0x234, "B"),
    ("min_alignment", 0x235, "B"),
    ("xloadflags", 0x236, "H"),
    ("cmdline_size", 0x238, "I"),
    ("hardware_subarch", 0x23C, "I"),
    ("hardware_subarch_data", 0x240, "Q"),
    ("payload_offset", 0x248, "I"),
    ("payload_length", 0x24C, "I"),
    ("setup_data", 0x250, "Q"),
    ("pref_address", 0x258, "Q"),
    ("init_size", 0x260, "I"),
    ("handover_offset", 0x264, "I"),
    ("kernel_info_offset", 0x268, "I"),
)
SETUP_HEADER_END = 0x26C  # end of the last field above (protocol 2.15)
E820_TABLE_OFFSET = 0x2D0

FIELDS = {name: (offset, fmt) for name, offset, fmt in BOOT_PARAMS_FIELDS + SETUP_HEADER_FIELDS}

BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS" little-endian
PROTOCOL_VERSION = 0x020F  # what we claim to fill in when booting an ELF (2.15)
TYPE_OF_LOADER_UNDEFINED = 0xFF  # "bootloader without an assigned id"

# loadflags
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80
# xloadflags
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02


class BootParams:
    """A 4 KiB zero page as bytes, with named field access."""

    def __init__(self, data: bytes | None = None):
        if data is None:
            self.data = bytearray(ZERO_PAGE_SIZE)
        else:
            if len(data) != ZERO_PAGE_SIZE:
                raise ImageError(f"boot_params must be {ZERO_PAGE_SIZE} bytes, got {len(data)}")
            self.data = bytearray(data)

    def __getitem__(self, name: str) -> int:
        offset, fmt = _field(name)
        return struct.unpack_from("<" + fmt, self.data, offset)[0]

    def __setitem__(self, name: str, value: int) -> None:
        offset, fmt = _field(name)
        try:
            struct.pack_into("<" + fmt, self.data, offset, value)
        except struct.error as e:
            raise ConfigError(f"boot_params.{name} cannot hold {value!r}: {e}") from None

    def copy_setup_header(self, image: bytes) -> None:
        """Copy a bzImage's setup_header into this zero page, as boot.rst says a 64-bit
        boot loader must: from 0x1f1 to 0x202 + the byte at 0x201 (the header's length)."""
        if len(image) < 0x202:
            raise ImageError("bzImage too short to hold a setup header")
        end = min(0x202 + image[0x201], len(image), ZERO_PAGE_SIZE)
        self.data[SETUP_HEADER_OFFSET:end] = image[SETUP_HEADER_OFFSET:end]

    def set_e820(self, entries: list[tuple[int, int, int]]) -> None:
        """Write the e820 table (addr, size, type) and its entry count; ConfigError when it
        does not fit."""
        if len(entries) > E820_MAX_ENTRIES:
            raise ConfigError(f"{len(entries)} e820 entries exceed the zero page's {E820_MAX_ENTRIES}")
        for i, (addr, size, kind) in enumerate(entries):
            struct.pack_into("<QQI", self.data, E820_TABLE_OFFSET + i * E820_ENTRY_SIZE, addr, size, kind)
        self["e820_entries"] = len(entries)

    def e820(self) -> list[tuple[int, int, int]]:
        """The e820 table as [(addr, size, type)]."""
        return [struct.unpack_from("<QQI", self.data, E820_TABLE_OFFSET + i * E820_ENTRY_SIZE)
                for i in range(self["e820_entries"])]

    def to_bytes(self) -> bytes:
        """The zero page as 4 KiB of bytes."""
        return bytes(self.data)


def _field(name: str) -> tuple[int, str]:
    try:
        return FIELDS[name]
    except KeyError:
        raise ConfigError(f"boot_params has no field {name!r}") from None


def read_setup_field(image: bytes, name: str) -> int:
    """A setup_header field read straight from a bzImage file (same offsets as the zero page)."""
    offset, fmt = _field(name)
    size = struct.calcsize("<" + fmt)
    if offset + size > len(image):
        raise ImageError(f"bzImage truncated: setup header field {name} at {offset:#x} is past the end")
    return struct.unpack_from("<" + fmt, image, offset)[0]
