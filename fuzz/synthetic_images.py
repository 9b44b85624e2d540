"""Synthetic kernel images, for the fuzz seeds (fuzz/targets.py) and the tests: a minimal
ELF, a bzImage skeleton around a payload, and the payload compressed the ways the
kernel's build does."""

import bz2
import gzip
import lzma
import struct


def make_elf(code=b"\xf4" * 64, paddr=0x1000000, vaddr=0xFFFFFFFF81000000, entry=None, pvh=None, bss=0):
    """A minimal x86-64 ET_EXEC with one PT_LOAD (and a Xen PVH note when asked)."""
    phdrs = [(1, 5, None, vaddr, paddr, len(code), len(code) + bss, 0x200000)]
    note = b""
    if pvh is not None:
        note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", pvh)
        phdrs.append((4, 4, None, 0, 0, len(note), len(note), 4))
    phoff = 64
    data_off = phoff + 56 * len(phdrs)
    body = code + note
    offsets = [data_off, data_off + len(code)]
    ph = b"".join(struct.pack("<IIQQQQQQ", t, f, offsets[i], v, p, fs, ms, al)
                  for i, (t, f, _, v, p, fs, ms, al) in enumerate(phdrs))
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + b"\0" * 9, 2, 62, 1,
                       paddr if entry is None else entry, phoff, 0, 0, 64, 56, len(phdrs), 64, 0, 0)
    return ehdr + ph + body


def lz4_legacy(data):
    import lz4.block

    out = struct.pack("<I", 0x184C2102)
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i:i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


def compress(kind, data):
    import zstandard

    body = {
        "gzip": lambda d: gzip.compress(d, 9),
        "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
        "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
        "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
        "bzip2": bz2.compress,
        "lz4": lz4_legacy,
    }[kind](data)
    return body + struct.pack("<I", len(data))  # the kernel's build appends the size


def make_bzimage(payload, setup_sects=1, version=0x020F):
    """A bzImage skeleton: boot sector + setup sectors holding the header, then the
    protected-mode code: 0x100 bytes of stub then the payload."""
    setup = bytearray((setup_sects + 1) * 512)
    pm = b"\x90" * 0x100 + payload
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, (len(pm) + 15) // 16)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x201] = 0x6A
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = 1
    struct.pack_into("<H", setup, 0x236, 0x3)
    struct.pack_into("<I", setup, 0x238, 2048)
    struct.pack_into("<I", setup, 0x248, 0x100)
    struct.pack_into("<I", setup, 0x24C, len(payload))
    struct.pack_into("<Q", setup, 0x258, 0x1000000)
    struct.pack_into("<I", setup, 0x260, 0x800000)
    return bytes(setup) + pm + b"\0" * (-len(pm) % 16)
