import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.errors import ImageError
from vmm.image import formats as images

from fuzz.synthetic_images import compress, make_bzimage, make_elf

REPO = Path(__file__).resolve().parents[1]


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


def test_a_file_is_loaded_from_its_headers_and_segments_only(tmp_path):
    """An ELF given as a path is mapped: its loaded segments are copied into guest RAM,
    what lies past them (a vmlinux's DWARF) is never read; LoadedKernel.image is then
    the path, and the snapshot's kernel identity is the same as from its bytes."""
    from vmm.kvm.memory import GuestMemory
    from vmm.machine.loader import load_kernel
    from vmm.runtime.snapshot import kernel_identity

    elf = make_elf(bss=0x1000)
    path = tmp_path / "vmlinux"
    path.write_bytes(elf)
    with open(path, "r+b") as f:  # 1 GiB of "debug info": a hole nobody may need to read
        f.truncate(len(elf) + (1 << 30))
    mem = GuestMemory(64 << 20)
    try:
        loaded = load_kernel(mem, 64 << 20, str(path), decompress_in_guest=True)
        assert loaded.image == str(path) and loaded.bzimage is None
        seg = images.parse_elf_kernel(elf).segments[0]
        assert mem.read(seg.paddr, len(seg.data)) == seg.data
        from_bytes = load_kernel(mem, 64 << 20, path.read_bytes()[:len(elf)], True)
        assert from_bytes.entry == loaded.entry and from_bytes.kernel_end == loaded.kernel_end
    finally:
        mem.close()
    path.write_bytes(elf)
    assert kernel_identity(str(path)) == kernel_identity(elf)


def test_an_empty_or_missing_file_is_refused(tmp_path):
    from vmm.machine.loader import load_kernel

    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ImageError, match="is empty"):
        load_kernel(None, 0, str(tmp_path / "empty"), True)
    with pytest.raises(ImageError, match="cannot read kernel image"):
        load_kernel(None, 0, str(tmp_path / "none"), True)
