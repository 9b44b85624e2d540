import bz2
import gzip
import lzma
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.errors import ImageError
from vmm.machine import images

REPO = Path(__file__).resolve().parents[1]


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


def test_parse_minimal_elf():
    k = images.parse_elf_kernel(make_elf(bss=0x1000))
    assert k.entry == 0x1000000 and k.pvh_entry is None
    assert k.segments[0].paddr == 0x1000000 and k.segments[0].memsz == 64 + 0x1000
    assert k.end == 0x1000000 + 64 + 0x1000


def test_pvh_note_and_virtual_entry():
    k = images.parse_elf_kernel(make_elf(entry=0xFFFFFFFF81000010, pvh=0x1000020))
    assert k.entry == 0x1000010 and k.pvh_entry == 0x1000020


@pytest.mark.parametrize("mutate,message", [
    (lambda e: e[:40], "truncated"),
    (lambda e: b"\x7fELF\x01" + e[5:], "64-bit"),
    (lambda e: e[:18] + b"\x03\x00" + e[20:], "x86-64"),
    (lambda e: e[:16] + b"\x03\x00" + e[18:], "executable"),
    (lambda e: e[:100], "truncated"),
    (lambda e: e[:24] + struct.pack("<Q", 0x5000) + e[32:], "no loadable segment"),
])
def test_bad_elves(mutate, message):
    with pytest.raises(ImageError, match=message):
        images.parse_elf_kernel(mutate(make_elf()))


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz", "lzma", "bzip2", "lz4"])
def test_extract_vmlinux_from_synthetic_bzimages(kind):
    elf = make_elf(code=bytes(range(256)) * 64)
    bz = make_bzimage(compress(kind, elf))
    info = images.parse_bzimage(bz)
    assert info.compression == kind and info.protected_mode_offset == 0x400
    assert info.pref_address == 0x1000000 and info.relocatable
    assert images.detect_kernel_format(bz) == "bzimage"
    assert images.extract_vmlinux(bz) == elf


def test_setup_sects_zero_means_four():
    bz = make_bzimage(compress("gzip", make_elf()), setup_sects=4)
    bz = bz[:0x1F1] + b"\0" + bz[0x1F2:]
    assert images.parse_bzimage(bz).protected_mode_offset == 5 * 512


def test_bzimage_errors():
    good = make_bzimage(compress("gzip", make_elf()))
    with pytest.raises(ImageError, match="too old"):
        images.parse_bzimage(make_bzimage(b"\x1f\x8b", version=0x0207))
    with pytest.raises(ImageError, match="truncated"):
        images.parse_bzimage(good[:0x300])
    with pytest.raises(ImageError, match="truncated|outside"):
        images.parse_bzimage(good[:-40])
    with pytest.raises(ImageError, match="unknown compression"):
        images.extract_vmlinux(make_bzimage(b"\x00\x01\x02\x03" * 8))
    with pytest.raises(ImageError, match="did not decompress to an ELF"):
        images.extract_vmlinux(make_bzimage(compress("gzip", b"not an elf" * 10)))
    with pytest.raises(ImageError, match="corrupt|truncated"):
        payload = bytearray(compress("gzip", make_elf()))
        payload[20:40] = b"\xff" * 20
        images.extract_vmlinux(make_bzimage(bytes(payload)))
    with pytest.raises(ImageError, match="not a kernel image"):
        images.detect_kernel_format(b"hello world" * 100)
    with pytest.raises(ImageError, match="cannot read"):
        images.read_image("/nonexistent/vmlinuz")


@pytest.mark.parametrize("kind", ["gzip", "zstd", "xz", "lz4", "bzip2"])
def test_truncated_payloads(kind):
    payload = compress(kind, make_elf(code=bytes(range(256)) * 256))
    with pytest.raises(ImageError):
        images.extract_vmlinux(make_bzimage(payload[: len(payload) // 2]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_images_raise_only_image_error(data):
    base = data.draw(st.sampled_from(["elf", "gzip", "zstd", "xz", "lz4"]))
    blob = bytearray(make_elf() if base == "elf" else make_bzimage(compress(base, make_elf())))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    blob = bytes(blob[: data.draw(st.integers(0, len(blob)))])
    try:
        if images.detect_kernel_format(blob) == "elf":
            images.parse_elf_kernel(blob)
        else:
            images.extract_vmlinux(blob)
    except ImageError:
        pass


def guest_elves():
    out = REPO / "kernels" / "guests" / "out"
    return sorted(out.glob("*.elf")) if out.is_dir() else []


def test_our_guest_elves_parse():
    elves = guest_elves()
    if not elves:
        pytest.skip("no test guests built (make -C kernels/guests)")
    for path in elves:
        k = images.parse_elf_kernel(path.read_bytes())
        assert k.start >= 0x1000000 and k.start <= k.entry < k.end


def cached_bzimages():
    cache = Path.home() / ".cache" / "vmm" / "kernels"
    if not cache.is_dir():
        return []
    return [p for p in cache.rglob("*") if p.is_file() and (p.name.startswith(("vmlinuz", "bzImage")))][:2]


def test_real_bzimage_extracts():
    found = cached_bzimages()
    if not found:
        pytest.skip("no real bzImage cached under ~/.cache/vmm/kernels")
    for path in found:
        vmlinux = images.extract_vmlinux(path.read_bytes())
        k = images.parse_elf_kernel(vmlinux)
        assert k.entry >= 0x100000
