"""vmm.debug without KVM: the VMCOREINFO text, the ELF vmcore layout, drgn targets.

Guest memory is faked from our test guest's ELF (its PT_LOADs at their physical
addresses), so the introspection underneath is the real one."""

import struct
from pathlib import Path

import pytest

from guest_abi import require_guests
from vmm.debug import vmcore, vmcoreinfo
from vmm.debug.vmcore import PrStatus, Segment, VmcoreError
from vmm.errors import GuestMemoryError, TargetError
from vmm.kernel import Kernel

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "kernels" / "guests" / "out" / "guest.elf"
CR3 = 0x9000


class ElfMemory:
    """read(gpa, n) over the ELF's loadable segments placed at their paddr; zeros elsewhere
    below `size`, GuestMemoryError beyond."""

    def __init__(self, path, size=64 << 20):
        self.size = size
        self.mem = bytearray(size)
        data = Path(path).read_bytes()
        phoff, = struct.unpack_from("<Q", data, 32)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
        for i in range(phnum):
            p_type, _, off, _, paddr, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data,
                                                                       phoff + i * phentsize)
            if p_type == 1:
                self.mem[paddr:paddr + filesz] = data[off:off + filesz]
        self.regions = [(0, size, 0)]

    def read(self, gpa, n):
        if gpa < 0 or gpa + n > self.size:
            raise GuestMemoryError(f"[{gpa:#x}, +{n:#x}) is outside guest RAM")
        return bytes(self.mem[gpa:gpa + n])


@pytest.fixture(scope="module")
def live():
    require_guests(GUEST)
    k = Kernel.load(vmlinux=GUEST)
    return k.attach(ElfMemory(GUEST), cr3=CR3)


def test_vmcoreinfo_text_in_the_kernels_formats(live):
    info = vmcoreinfo.build(live, crashtime=1234)
    text = info.text()
    assert text.endswith("\n") and all("=" in line for line in text.splitlines())
    parsed = vmcoreinfo.parse(text)
    assert parsed["OSRELEASE"] == "0.0.0-vmm-guest"
    assert parsed["PAGESIZE"] == "4096"
    assert parsed["KERNELOFFSET"] == "0"
    assert parsed["NUMBER(phys_base)"] == "0"
    assert parsed["NUMBER(pgtable_l5_enabled)"] == "0"
    assert parsed["CRASHTIME"] == "1234"
    # SYMBOL() is bare hex, as the kernel prints %lx.
    assert int(parsed["SYMBOL(init_uts_ns)"], 16) == live.symbol_address("init_uts_ns")
    # No init_top_pgt in the test guest: CR3's table named through the image map.
    assert int(parsed["SYMBOL(swapper_pg_dir)"], 16) == 0xFFFFFFFF80000000 + CR3
    assert parsed["OFFSET(uts_namespace.name)"] == "0"
    # What the test guest lacks is listed with a reason, not dropped silently.
    skipped = dict(info.skipped)
    assert "SYMBOL(_stext)" in skipped and "SIZE(page)" in skipped
    assert "SYMBOL(_stext)" not in parsed


def test_vmcoreinfo_with_a_slide_and_5_level_paging(live):
    k = live.kernel
    slid = k.attach(ElfMemory(GUEST), cr3=CR3, kaslr_slide=0)
    info = vmcoreinfo.build(slid, la57=True, osrelease="7.3.4")
    assert info.get("OSRELEASE") == "7.3.4"
    assert info.get("NUMBER(pgtable_l5_enabled)") == "1"
    assert info.get("NUMBER(MAX_PHYSMEM_BITS)") == "52"


def test_vmcoreinfo_parse_first_key_wins():
    assert vmcoreinfo.parse(b"A=1\nB=x=y\nA=2\nnoequals\n") == {"A": "1", "B": "x=y"}


class FakeRam:
    def __init__(self, regions):
        self.regions = regions  # [(gpa, bytes)]

    def read(self, gpa, n):
        for base, data in self.regions:
            if base <= gpa and gpa + n <= base + len(data):
                return data[gpa - base:gpa - base + n]
        raise GuestMemoryError(f"{gpa:#x}+{n:#x} outside")


def _regs(seed):
    return {name: seed * 0x100 + i for i, name in enumerate(vmcore.GREGS)}


def test_vmcore_layout_notes_first_and_every_byte(tmp_path):
    low = bytes(range(256)) * 64 + bytes(3 * 4096) + b"\xab" * 4096  # 32 KiB, a zero run
    high = b"\x5a" * 8192
    ram = FakeRam([(0, low), (0x100000000, high)])
    segs = vmcore.ram_segments([(0, len(low)), (0x100000000, len(high))], 0xFFFF888000000000)
    cpus = [PrStatus(0, _regs(1), pid=0), PrStatus(1, _regs(2), pid=42)]
    info = b"OSRELEASE=7.3.4\nPAGESIZE=4096\n"
    path = tmp_path / "vmcore"
    rep = vmcore.write(str(path), ram, segs, cpus, info, chunk=4096)
    assert rep.ram_bytes == len(low) + len(high) and rep.cpus == 2
    assert rep.hole_bytes == 3 * 4096  # the zero pages, still covered by the segment
    assert not (tmp_path / "vmcore.partial").exists()
    with open(path, "rb") as f:
        phdrs, notes = vmcore.read_headers(f)
        assert phdrs[0][0] == vmcore.PT_NOTE  # crash reads the notes from the first
        loads = phdrs[1:]
        assert [p[0] for p in loads] == [vmcore.PT_LOAD] * 2
        for p, (base, data) in zip(loads, ram.regions):
            _, _, off, vaddr, paddr, filesz, memsz, align = p
            assert off % 4096 == 0 and paddr == base and filesz == memsz == len(data)
            assert align == 0  # what makes crash treat it as a kdump vmcore (KASLR aware)
            assert vaddr == 0xFFFF888000000000 + base
            f.seek(off)
            assert f.read(filesz) == data
    assert [(n, t) for n, t, _ in notes] == [(b"CORE", 1), (b"CORE", 1), (b"VMCOREINFO", 0)]
    assert notes[2][2] == info
    back = PrStatus.unpack(1, notes[1][2])
    assert back.pid == 42 and back.regs == _regs(2)
    assert len(notes[0][2]) == vmcore.PRSTATUS_SIZE == 336
    assert path.stat().st_size == rep.size


def test_vmcore_read_failure_names_the_segment_and_leaves_no_file(tmp_path):
    ram = FakeRam([(0, bytes(4096))])
    segs = [Segment(0, 0, 8192, "RAM [0x0, 0x2000)")]
    with pytest.raises(VmcoreError, match=r"RAM \[0x0, 0x2000\).*0x1000"):
        vmcore.write(str(tmp_path / "core"), ram, segs, [], b"OSRELEASE=x\n", chunk=4096)
    assert list(tmp_path.iterdir()) == []


def test_prstatus_register_order():
    regs = {"rip": 0xFFFFFFFF81000000, "rsp": 0x1234, "gs_base": 0xFFFF888000001000}
    raw = PrStatus(0, regs, pid=7).pack()
    greg = struct.unpack_from("<27Q", raw, 112)
    assert greg[16] == regs["rip"] and greg[19] == regs["rsp"] and greg[22] == regs["gs_base"]
    assert struct.unpack_from("<i", raw, 32)[0] == 7


class BtfResolver:
    def __init__(self, btf):
        self.btf = btf

    def locate_kva(self, kva, size):
        from vmm.ops.targets import Location
        return Location(kva - 0xFFFFFFFF80000000, size, f"kva {kva:#x}", kva=kva)


def test_target_from_drgn_checked_against_btf(live):
    drgn = pytest.importorskip("drgn", reason="drgn (pip install drgn) builds the objects")
    from vmm.ops import KernelTarget as T

    prog = drgn.Program(drgn.Platform(drgn.Architecture.X86_64,
                                      drgn.PlatformFlags.IS_64_BIT
                                      | drgn.PlatformFlags.IS_LITTLE_ENDIAN))
    kva = 0xFFFFFFFF81002000
    u32 = prog.int_type("unsigned int", 4, False)
    loc = T.from_drgn(drgn.Object(prog, u32, address=kva)).resolve(BtfResolver(live.kernel.btf))
    assert (loc.gpa, loc.size, loc.type_name) == (kva - 0xFFFFFFFF80000000, 4, "unsigned int")
    # Same name, different size: refused naming both.
    wrong = prog.int_type("unsigned int", 8, False)
    with pytest.raises(TargetError, match="8 bytes to the debugger but 4 bytes"):
        T.from_drgn(drgn.Object(prog, wrong, address=kva)).resolve(BtfResolver(live.kernel.btf))
    with pytest.raises(TargetError, match="not in the kernel's BTF"):
        bogus = prog.int_type("no_such_type_t", 4, False)
        T.from_drgn(drgn.Object(prog, bogus, address=kva)).resolve(BtfResolver(live.kernel.btf))
    with pytest.raises(TargetError, match="a value, not an object in kernel memory"):
        T.from_drgn(drgn.Object(prog, u32, value=5))
    with pytest.raises(TargetError, match="not a drgn.Object"):
        T.from_drgn(5)


def test_cli_has_dump():
    from vmm.cli import build_parser

    args = build_parser().parse_args(["dump", "out.core", "--kernel", "k", "--on-panic"])
    assert args.command == "dump" and args.output == "out.core" and args.on_panic
