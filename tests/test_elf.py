"""vmm.kernel.elf on gcc-built fixtures, checked against nm and readelf."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
import kfixture  # noqa: E402

from vmm.errors import ImageError  # noqa: E402
from vmm.kernel.elf import ElfImage  # noqa: E402

pytestmark = pytest.mark.skipif(kfixture.missing_tools() is not None,
                                reason=f"fixture build: {kfixture.missing_tools()}")


def nm(path):
    out = {}
    for line in subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[2]] = (int(parts[0], 16), parts[1])
    return out


@pytest.mark.parametrize("style", ["absolute", "relative"])
def test_symbols_match_nm(style):
    path = kfixture.linked(style)
    ours = {s.name: s for s in ElfImage(path).symbols()}
    theirs = nm(path)
    assert theirs
    for name, (addr, letter) in theirs.items():
        assert ours[name].address == addr, name
        assert ours[name].type == letter, name


def test_percpu_section_and_sizes():
    img = ElfImage(kfixture.linked("absolute"))
    syms = {s.name: s for s in img.symbols()}
    rq = syms["runqueues_fx"]
    assert rq.percpu and rq.section == ".data..percpu" and rq.size == 40
    assert not syms["global_outer"].percpu
    assert img.percpu_section().addr == rq.address


def test_build_id_matches_readelf():
    path = kfixture.linked()
    text = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True).stdout
    expected = text.split("Build ID:")[1].split()[0]
    assert ElfImage(path).build_id() == expected


def test_btf_section_and_read_va():
    img = ElfImage(kfixture.linked())
    assert img.btf()[:2] == b"\x9f\xeb"
    banner = {s.name: s for s in img.symbols()}["linux_banner"]
    assert img.read_va(banner.address, 13) == b"Linux version"
    assert img.read_va(0x1234, 4) is None


def test_object_without_symtab_sections(tmp_path):
    path = tmp_path / "stripped"
    subprocess.run(["strip", "-o", str(path), str(kfixture.linked())], check=True)
    img = ElfImage(path)
    assert img.symbols() == []


def test_bad_files(tmp_path):
    with pytest.raises(ImageError, match="not an ELF"):
        ElfImage(b"MZ not an elf at all")
    with pytest.raises(ImageError, match="cannot open"):
        ElfImage(tmp_path / "missing")
    data = kfixture.linked().read_bytes()
    with pytest.raises(ImageError):
        ElfImage(data[:200])
    with pytest.raises(ImageError, match="ELF64"):
        ElfImage(data[:4] + b"\x01" + data[5:])  # ELFCLASS32
