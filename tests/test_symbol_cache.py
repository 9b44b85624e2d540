"""The parsed-symbol cache follows the file's content: a vmlinux patched in place (same
build id, same symbol count) never gets the old addresses back."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmm.kernel import Kernel
from vmm.kernel.elf import ElfImage

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "kernels" / "guests" / "out" / "guest.elf"


def with_build_id(src: Path, dst: Path) -> None:
    desc = bytes(range(20))
    note = struct.pack("<III", 4, len(desc), 3) + b"GNU\0" + desc
    (dst.parent / "note.bin").write_bytes(note)
    subprocess.run(["objcopy", "--add-section", f".note.gnu.build-id={dst.parent / 'note.bin'}",
                    "--set-section-flags", ".note.gnu.build-id=alloc,readonly", str(src), str(dst)],
                   check=True, capture_output=True)


def patch_symbol(path: Path, name: str, new_value: int) -> None:
    """Rewrites st_value of `name` in .symtab, in place."""
    elf = ElfImage(path)
    symtab, strtab = elf.section(".symtab"), elf.sections[elf.section(".symtab").link]
    data = bytearray(path.read_bytes())
    strings = bytes(data[strtab.offset:strtab.offset + strtab.size])
    for off in range(symtab.offset, symtab.offset + symtab.size, 24):
        st_name = struct.unpack_from("<I", data, off)[0]
        if strings[st_name:strings.index(b"\0", st_name)] == name.encode():
            struct.pack_into("<Q", data, off + 8, new_value)
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"{name} not in .symtab")


def test_patched_in_place_vmlinux_is_reparsed(tmp_path, monkeypatch):
    if not GUEST.exists() or shutil.which("objcopy") is None:
        pytest.skip("needs the test guest (make guests) and objcopy")
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    elf = tmp_path / "vmlinux"
    with_build_id(GUEST, elf)
    assert ElfImage(elf).build_id() == bytes(range(20)).hex()
    k = Kernel.load(vmlinux=elf)
    old = k.symbol("boot_main")
    assert any((tmp_path / "cache").rglob("*.pickle"))  # it was cached
    patch_symbol(elf, "boot_main", old + 0x40)
    k2 = Kernel.load(vmlinux=elf)
    assert k2.build_id == k.build_id and len(k2.symbols) == len(k.symbols)
    assert k2.symbol("boot_main") == old + 0x40
    # and the unchanged file hits the cache again (the same answer)
    assert Kernel.load(vmlinux=elf).symbol("boot_main") == old + 0x40
