"""Kernel images: detect, parse and unpack vmlinux ELF files and bzImages.

Nothing here knows about KVM or guest memory: parsers take bytes and return plain data
(what to load where, the entry point), like rust-vmm's linux-loader. Untrusted bytes
only ever raise ImageError naming what is wrong.

`extract_vmlinux` is the one place in the project that decompresses a bzImage payload.
"""

from __future__ import annotations

import bz2
import contextlib
import lzma
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from vmm.errors import ImageError
from vmm.image import bootparams as bp

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

_ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")

# Payload compression formats, by the magic bytes the kernel's build leaves at the start.
COMPRESSION_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00", "lzma"),
    (ELF_MAGIC, "none"),
)

# The kernel's lz4 "legacy" format: magic, then blocks of (u32 compressed size, block),
# each block decompressing to at most 8 MiB.
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20
# A decompressed kernel larger than this is not a kernel: stops decompression bombs.
MAX_VMLINUX_SIZE = 2 << 30


@dataclass
class LoadSegment:
    """One PT_LOAD segment: where it goes, its file bytes and its size in memory."""

    paddr: int
    data: bytes  # p_filesz bytes; the rest up to memsz is zero (bss)
    memsz: int


@dataclass
class ElfKernel:
    """A vmlinux-style ELF: what to load where and where to enter it."""

    entry: int  # physical address of the 64-bit entry
    segments: list[LoadSegment]
    pvh_entry: int | None = None  # XEN_ELFNOTE_PHYS32_ENTRY, when the kernel has one
    is_linux: bool = False  # has the "Linux" ELF notes every vmlinux carries

    @property
    def start(self) -> int:
        """Lowest guest-physical address a segment loads at."""
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        """First guest-physical byte past the highest segment (bss included)."""
        return max(s.paddr + s.memsz for s in self.segments)


@dataclass
class BzImage:
    """A bzImage's setup header facts and where its parts lie in the file."""

    data: bytes = field(repr=False)
    version: int
    setup_sects: int
    protected_mode_offset: int  # file offset of the protected-mode code
    payload_offset: int  # file offset of the compressed vmlinux
    payload_length: int
    pref_address: int
    init_size: int
    relocatable: bool
    xloadflags: int
    initrd_addr_max: int
    cmdline_size: int
    kernel_alignment: int

    @property
    def protected_mode_code(self) -> bytes:
        """The file from the protected-mode code on (what a boot through the decompressor loads)."""
        return self.data[self.protected_mode_offset:]

    @property
    def payload(self) -> bytes:
        """The compressed vmlinux inside the protected-mode code."""
        return self.data[self.payload_offset:self.payload_offset + self.payload_length]

    @property
    def compression(self) -> str:
        """The payload's compression (gzip, zstd, xz, lzma, bzip2, lz4)."""
        return detect_compression(self.payload)


def detect_kernel_format(data: bytes) -> str:
    """"elf" or "bzimage"; ImageError for anything else."""
    if data[:4] == ELF_MAGIC:
        return "elf"
    if len(data) >= 0x206 and data[0x202:0x206] == b"HdrS":
        return "bzimage"
    raise ImageError(
        f"not a kernel image: no ELF magic and no 'HdrS' setup header at 0x202 "
        f"(first bytes {data[:8].hex()}, {len(data)} bytes)"
    )


def detect_image_kind(data: bytes) -> str | None:
    """"elf", "bzimage" or None (anything else, e.g. a System.map); needs the first 4 KiB."""
    try:
        return detect_kernel_format(data)
    except ImageError:
        return None


def parse_elf_kernel(data: bytes) -> ElfKernel:
    """Parse a 64-bit x86 vmlinux-style ELF: PT_LOAD segments by p_paddr, entry, PVH note."""
    if len(data) < _ELF64_EHDR.size:
        raise ImageError(f"ELF truncated: {len(data)} bytes, the header alone needs {_ELF64_EHDR.size}")
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = _ELF64_EHDR.unpack_from(data)
    if ident[:4] != ELF_MAGIC:
        raise ImageError("not an ELF file (bad magic)")
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise ImageError("kernel ELF must be 64-bit little-endian")
    if e_machine != EM_X86_64:
        raise ImageError(f"kernel ELF is for machine {e_machine}, not x86-64 (62)")
    if e_type != ET_EXEC:
        raise ImageError(f"kernel ELF has type {e_type}, not an executable (2)")
    if e_phnum == 0:
        raise ImageError("kernel ELF has no program headers")
    if e_phentsize < _ELF64_PHDR.size:
        raise ImageError(f"kernel ELF program header size {e_phentsize} is too small")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise ImageError("kernel ELF truncated: program headers run past the end of the file")

    segments: list[LoadSegment] = []
    vaddr_ranges: list[tuple[int, int, int]] = []  # (vaddr, memsz, paddr)
    pvh_entry = None
    note_names: set[bytes] = set()
    for i in range(e_phnum):
        p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align = \
            _ELF64_PHDR.unpack_from(data, e_phoff + i * e_phentsize)
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if p_offset + p_filesz > len(data):
            raise ImageError(f"kernel ELF truncated: segment {i} data runs past the end of the file")
        if p_type == PT_NOTE:
            for name, ntype, desc in _notes(data[p_offset:p_offset + p_filesz]):
                note_names.add(name)
                if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
                    pvh_entry = int.from_bytes(desc, "little")
            continue
        if p_filesz > p_memsz:
            raise ImageError(f"kernel ELF segment {i} has file size > memory size")
        if p_memsz == 0:
            continue
        segments.append(LoadSegment(p_paddr, data[p_offset:p_offset + p_filesz], p_memsz))
        vaddr_ranges.append((p_vaddr, p_memsz, p_paddr))
    if not segments:
        raise ImageError("kernel ELF has no loadable segments")

    entry = e_entry
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in segments):
        # A kernel whose e_entry is virtual: translate through the segment holding it.
        for vaddr, memsz, paddr in vaddr_ranges:
            if vaddr <= entry < vaddr + memsz:
                entry = entry - vaddr + paddr
                break
        else:
            raise ImageError(f"kernel ELF entry {e_entry:#x} is in no loadable segment")
    return ElfKernel(entry=entry, segments=segments, pvh_entry=pvh_entry,
                     is_linux=b"Linux" in note_names)


def _notes(notes: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each ELF note in a PT_NOTE segment."""
    out = []
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name_start = pos + 12
        desc_start = name_start + _align4(namesz)
        next_pos = desc_start + _align4(descsz)
        if next_pos > len(notes):
            raise ImageError("kernel ELF note segment truncated")
        name = notes[name_start:name_start + namesz].rstrip(b"\0")
        out.append((name, ntype, notes[desc_start:desc_start + descsz]))
        pos = next_pos
    return out


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_bzimage(data: bytes) -> BzImage:
    """Read a bzImage's setup header (boot protocol 2.08+ for the payload fields)."""
    if len(data) < 0x270:
        raise ImageError(f"bzImage truncated: {len(data)} bytes cannot hold a setup header")
    if data[0x202:0x206] != b"HdrS":
        raise ImageError("not a bzImage: no 'HdrS' magic at 0x202")
    field_ = lambda name: bp.read_setup_field(data, name)  # noqa: E731
    if field_("boot_flag") != bp.BOOT_FLAG_MAGIC:
        raise ImageError(f"bzImage boot_flag is {field_('boot_flag'):#x}, not 0xaa55")
    version = field_("version")
    if version < 0x0208:
        raise ImageError(
            f"bzImage boot protocol {version >> 8}.{version & 0xff:02d} is too old: "
            "2.08 or later is needed (payload_offset/payload_length)"
        )
    setup_sects = field_("setup_sects") or 4  # 0 means 4, for ancient compatibility
    protected_mode_offset = (setup_sects + 1) * 512
    if protected_mode_offset >= len(data):
        raise ImageError(
            f"bzImage truncated: {setup_sects} setup sectors put the protected-mode code at "
            f"{protected_mode_offset:#x}, past the end of the {len(data)}-byte file"
        )
    # syssize counts 16-byte paragraphs; the build tool rounds up (and older ones left 4
    # bytes for a CRC), so allow that much slack before calling the file truncated.
    syssize_bytes = field_("syssize") * 16
    if protected_mode_offset + syssize_bytes > len(data) + 15 + 4:
        raise ImageError(
            f"bzImage truncated: syssize says {syssize_bytes} bytes of protected-mode code, "
            f"the file has {len(data) - protected_mode_offset}"
        )
    payload_offset = protected_mode_offset + field_("payload_offset")
    payload_length = field_("payload_length")
    if payload_length == 0 or payload_offset + payload_length > len(data):
        raise ImageError(
            f"bzImage payload (offset {payload_offset:#x}, length {payload_length}) lies outside "
            f"the {len(data)}-byte file"
        )
    return BzImage(
        data=data,
        version=version,
        setup_sects=setup_sects,
        protected_mode_offset=protected_mode_offset,
        payload_offset=payload_offset,
        payload_length=payload_length,
        pref_address=field_("pref_address") if version >= 0x020A else 0,
        init_size=field_("init_size") if version >= 0x020A else 0,
        relocatable=bool(field_("relocatable_kernel")),
        xloadflags=field_("xloadflags") if version >= 0x020C else 0,
        initrd_addr_max=field_("initrd_addr_max") or 0x37FFFFFF,
        cmdline_size=field_("cmdline_size") if version >= 0x0206 else 255,
        kernel_alignment=field_("kernel_alignment"),
    )


def detect_compression(payload: bytes) -> str:
    """The compression of a bzImage payload from its magic bytes; ImageError when unknown."""
    for magic, name in COMPRESSION_MAGICS:
        if payload.startswith(magic):
            return name
    raise ImageError(f"bzImage payload has an unknown compression format (first bytes {payload[:6].hex()})")


_CHUNK = 4 << 20  # decompressors stream in pieces this size: memory stays near the limit


def output_limit(image: "BzImage") -> int:
    """The most a bzImage's payload may decompress to. The payload is the kernel's ELF
    plus its relocations, which fit in init_size (the memory the kernel needs while
    booting; Debian's 7.3: 62.1 MB out of 63.1 MB init_size) and compress 3-7x (Debian's
    zstd and our gzip build: 4.5x). Allow 25% + 16 MiB over init_size, 64x the
    payload, never more than MAX_VMLINUX_SIZE: a hostile header cannot buy more."""
    limit = min(MAX_VMLINUX_SIZE, max(64 * image.payload_length, 64 << 20))
    if image.init_size:
        limit = min(limit, image.init_size + image.init_size // 4 + (16 << 20))
    return limit


def _too_large(kind: str, limit: int) -> ImageError:
    return ImageError(f"{kind} payload decompresses to more than {limit} bytes, more than its "
                      "header allows (init_size): corrupt or hostile image")


def _stream(kind: str, d, payload: bytes, limit: int, tail_attr: str | None) -> bytes:
    """Runs a zlib/bz2/lzma decompressor object over payload in _CHUNK pieces, stopping
    as soon as the output passes limit."""
    out = bytearray()
    data = payload
    while not d.eof:
        chunk = d.decompress(data, min(_CHUNK, limit + 1 - len(out)))
        out += chunk
        if len(out) > limit:
            raise _too_large(kind, limit)
        if tail_attr:  # zlib hands back the input it did not consume
            data = getattr(d, tail_attr)
            if not chunk and not data:
                break
        else:  # bz2/lzma keep unconsumed input inside
            data = b""
            if not chunk and d.needs_input:
                break
    if not d.eof:
        raise ImageError(f"{kind} payload is truncated")
    return bytes(out)


def decompress_payload(payload: bytes, limit: int = MAX_VMLINUX_SIZE) -> bytes:
    """Decompress a bzImage payload, whichever of the kernel's formats it uses, to at
    most `limit` bytes (ImageError past it; memory stays near the limit)."""
    kind = detect_compression(payload)
    try:
        if kind == "none":
            out = payload
        elif kind == "gzip":
            out = _stream(kind, zlib.decompressobj(16 + zlib.MAX_WBITS), payload, limit,
                          "unconsumed_tail")
        elif kind == "zstd":
            out = _zstd(payload, limit)
        elif kind == "xz":
            out = _stream(kind, lzma.LZMADecompressor(format=lzma.FORMAT_XZ), payload, limit, None)
        elif kind == "lzma":
            out = _stream(kind, lzma.LZMADecompressor(format=lzma.FORMAT_ALONE), payload, limit,
                          None)
        elif kind == "bzip2":
            out = _stream(kind, bz2.BZ2Decompressor(), payload, limit, None)
        else:  # lz4
            out = _lz4_legacy(payload, limit)
    except ImageError:
        raise
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, MemoryError) as e:
        raise ImageError(f"{kind} payload is corrupt: {e}") from None
    except Exception as e:  # zstandard.ZstdError, lz4's LZ4BlockError derive from Exception
        raise ImageError(f"{kind} payload is corrupt: {type(e).__name__}: {e}") from None
    return out


def _zstd(payload: bytes, limit: int) -> bytes:
    """zstd has no output limit per call: feed the input in 1 KiB pieces (one piece
    expands to at most ~45 MB, zstd's RLE blocks) and stop once the output passes limit."""
    import zstandard

    d = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    for pos in range(0, len(payload), 1024):
        out += d.decompress(payload[pos:pos + 1024])
        if len(out) > limit:
            raise _too_large("zstd", limit)
        if d.eof:
            return bytes(out)
    raise ImageError("zstd payload is truncated")


def _lz4_legacy(payload: bytes, limit: int = MAX_VMLINUX_SIZE) -> bytes:
    import lz4.block

    pos = 4
    chunks: list[bytes] = []
    total = 0
    while pos + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, pos)
        pos += 4
        if size == _LZ4_LEGACY_MAGIC:  # concatenated streams
            continue
        if size > len(payload) - pos:
            # Past the last block the kernel's build appends the decompressed size (u32).
            if pos == len(payload):
                break
            raise ImageError(f"lz4 payload is truncated: a {size}-byte block at {pos - 4:#x} runs past the end")
        chunk = lz4.block.decompress(payload[pos:pos + size], uncompressed_size=_LZ4_LEGACY_BLOCK)
        pos += size
        total += len(chunk)
        if total > limit:
            raise _too_large("lz4", limit)
        chunks.append(chunk)
    if not chunks:
        raise ImageError("lz4 payload holds no blocks")
    return b"".join(chunks)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage (its payload, decompressed on the host)."""
    image = parse_bzimage(bzimage)
    vmlinux = decompress_payload(image.payload, output_limit(image))
    if vmlinux[:4] != ELF_MAGIC:
        raise ImageError(f"bzImage payload ({image.compression}) did not decompress to an ELF file")
    return vmlinux


def read_image(kernel: str | Path | bytes) -> bytes:
    """The bytes of a kernel given as a path or as bytes."""
    if isinstance(kernel, (bytes, bytearray, memoryview)):
        return bytes(kernel)
    try:
        return Path(kernel).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read kernel image {kernel}: {e.strerror}") from None


@contextlib.contextmanager
def map_image(kernel: str | Path):
    """A kernel file mapped read-only for the time of the `with`: what is sliced out of it
    is read, the rest never is (a vmlinux with DWARF is 80+ MB, its loaded segments ~10 MB)."""
    try:
        with open(kernel, "rb") as f:
            if not os.fstat(f.fileno()).st_size:
                raise ImageError(f"kernel image {kernel} is empty")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ImageError(f"cannot read kernel image {kernel}: {e.strerror}") from None
    try:
        yield mapped
    finally:
        mapped.close()
