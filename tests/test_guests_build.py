"""The freestanding test guests (kernels/guests): build, ELF/BTF ABI, and boots under QEMU.

The ABI checked here is the one kernels/guests/README.md documents and the VMM and
freeze tests rely on. QEMU boots go through the PVH entry (QEMU -kernel); the Linux
64-bit entry is exercised by tests/test_machine.py on our own VMM.
"""

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

elftools = pytest.importorskip("elftools", reason="pyelftools not installed")
from elftools.elf.elffile import ELFFile  # noqa: E402
from guest_abi import records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GUESTS = REPO / "kernels" / "guests"
OUT = GUESTS / "out"
VARIANTS = {"guest.elf": "absolute", "guest-percpu0.elf": "va0"}

START_KERNEL_MAP = 0xFFFFFFFF80000000
KERNEL_VA_BASE = 0xFFFFFFFF81000000
PHYS_LOAD = 0x1000000
NR_CPUS = 1024
XEN_ELFNOTE_PHYS32_ENTRY = 18

SCX_RQ_FLAGS = {"SCX_RQ_ONLINE": 1, "SCX_RQ_CAN_STOP_TICK": 2, "SCX_RQ_BAL_PENDING": 4,
                "SCX_RQ_BAL_KEEP": 8, "SCX_RQ_BYPASSING": 16, "SCX_RQ_CLK_VALID": 32}


# ----------------------------------------------------------------------------- build
@pytest.fixture(scope="module")
def built():
    missing = [tool for tool in ("make", "gcc", "ld", "pahole") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"cannot build the test guests: {', '.join(missing)} not installed "
                    f"(pahole is in the 'dwarves' package)")
    proc = subprocess.run(["make", "-C", str(GUESTS)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"make -C kernels/guests failed:\n{proc.stdout}\n{proc.stderr}"
    return OUT


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def elf(request, built):
    path = built / request.param
    with open(path, "rb") as f:
        yield Guest(path, ELFFile(f), VARIANTS[request.param])


class Guest:
    """An opened guest ELF with symbol and file-content helpers."""

    def __init__(self, path, elf, percpu_style):
        self.path, self.elf, self.percpu_style = path, elf, percpu_style
        self.symbols = {s.name: s for s in elf.get_section_by_name(".symtab").iter_symbols() if s.name}

    def sym(self, name):
        assert name in self.symbols, f"{name} missing from {self.path.name}'s .symtab"
        return self.symbols[name]

    def section_of(self, name):
        return self.elf.get_section(self.sym(name)["st_shndx"]).name

    def read(self, vaddr, size):
        """Bytes at a link-time address, from the file (initial values)."""
        for seg in self.elf.iter_segments(type="PT_LOAD"):
            if seg["p_vaddr"] <= vaddr and vaddr + size <= seg["p_vaddr"] + seg["p_filesz"]:
                return seg.data()[vaddr - seg["p_vaddr"]:vaddr - seg["p_vaddr"] + size]
        raise AssertionError(f"{vaddr:#x} is not file-backed in {self.path.name}")


def test_make_is_incremental(built):
    proc = subprocess.run(["make", "-q", "-C", str(GUESTS)], capture_output=True, timeout=60)
    assert proc.returncode == 0, "a second make would rebuild something"


def test_link_and_load_addresses(elf):
    h = elf.elf.header
    assert h["e_machine"] == "EM_X86_64" and h["e_type"] == "ET_EXEC"
    # Like vmlinux: e_entry is the PHYSICAL address of the 64-bit entry point.
    assert h["e_entry"] == elf.sym("startup_64")["st_value"] - START_KERNEL_MAP == PHYS_LOAD
    loads = list(elf.elf.iter_segments(type="PT_LOAD"))
    assert loads[0]["p_vaddr"] == KERNEL_VA_BASE and loads[0]["p_paddr"] == PHYS_LOAD
    for seg in loads:
        assert seg["p_paddr"] >= PHYS_LOAD and seg["p_filesz"] <= seg["p_memsz"]
        if seg["p_vaddr"] >= START_KERNEL_MAP:  # image mapping: VA - PA is the kernel map
            assert seg["p_vaddr"] - seg["p_paddr"] == START_KERNEL_MAP


def test_debug_sections(elf):
    names = {s.name for s in elf.elf.iter_sections()}
    assert {".symtab", ".debug_info", ".BTF", ".data..percpu"} <= names
    assert elf.elf.get_section_by_name(".BTF").data()[:2] == b"\x9f\xeb"  # BTF magic 0xeb9f


def test_pvh_note_points_at_the_32bit_entry(elf):
    notes = [n for seg in elf.elf.iter_segments(type="PT_NOTE") for n in seg.iter_notes()]
    (xen,) = [n for n in notes if n["n_name"] == "Xen" and n["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY]
    (entry,) = struct.unpack("<I", xen["n_descdata"])
    assert entry == elf.sym("pvh_start32")["st_value"] - START_KERNEL_MAP


def test_kernel_like_symbols(elf):
    rq = elf.sym("runqueues")
    assert elf.section_of("runqueues") == ".data..percpu"
    percpu = elf.elf.get_section_by_name(".data..percpu")
    if elf.percpu_style == "absolute":  # Linux 7.x: absolute template address
        assert rq["st_value"] >= KERNEL_VA_BASE and percpu["sh_addr"] >= KERNEL_VA_BASE
    else:  # Linux 6.12: section-relative, the section at VA 0
        assert percpu["sh_addr"] == 0 and rq["st_value"] < percpu["sh_size"]
    assert elf.sym("__per_cpu_offset")["st_size"] == 8 * NR_CPUS
    assert elf.sym("nr_cpu_ids")["st_size"] == 4
    assert elf.sym("jiffies")["st_size"] == 8
    assert elf.sym("hot_word")["st_size"] == 4 and elf.sym("hot_word")["st_value"] % 4 == 0
    assert elf.sym("init_uts_ns")["st_size"] >= 6 * 65
    probe = elf.sym("misaligned_probe")
    assert probe["st_size"] == 9 and (probe["st_value"] + 1) % 2 == 1  # value at an odd address
    for name in ("guest_ready", "guest_done", "guest_command", "guest_command_ack",
                 "boot_command_line", "_text", "_end"):
        elf.sym(name)


def pahole(path, name):
    proc = subprocess.run(["pahole", "-F", "btf", "-C", name, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout, f"{name} not in {path.name}'s BTF: {proc.stderr}"
    return proc.stdout


def member_offsets(text):
    """{member: (offset, size)} from pahole's '/* offset size */' comments."""
    return {m[1]: (int(m[2]), int(m[3]))
            for m in re.finditer(r"^\s+[\w ]+?[ *](\w+)(?:\[\d+\])*;\s+/\*\s+(\d+)\s+(\d+)\s+\*/",
                                 text, re.M)}


def test_btf_layouts(elf):
    scx = member_offsets(pahole(elf.path, "scx_rq"))
    flags_off, flags_size = scx["flags"]
    assert flags_size == 4 and flags_off % 8 == 0
    assert scx["nr_immed"] == (flags_off + 4, 4)  # shares flags' 8-byte word
    assert scx["clock"][1] == 8
    rq = member_offsets(pahole(elf.path, "rq"))
    for field in ("cpu", "nr_switches", "counter", "scx", "obs_flags", "obs_clock", "obs_count",
                  "obs_inconsistent", "torn_reads"):
        assert field in rq, field
    enum = pahole(elf.path, "scx_rq_flags")
    for name, value in SCX_RQ_FLAGS.items():
        assert re.search(rf"\b{name}\s+= {value},", enum), name
    assert "nodename" in pahole(elf.path, "new_utsname")


def test_initial_values(elf):
    scx = member_offsets(pahole(elf.path, "scx_rq"))
    rq = member_offsets(pahole(elf.path, "rq"))
    base = elf.sym("runqueues")["st_value"] + rq["scx"][0]
    flags, nr_immed, clock = (struct.unpack("<I", elf.read(base + scx["flags"][0], 4))[0],
                              struct.unpack("<I", elf.read(base + scx["nr_immed"][0], 4))[0],
                              struct.unpack("<Q", elf.read(base + scx["clock"][0], 8))[0])
    assert (flags, nr_immed, clock) == (SCX_RQ_FLAGS["SCX_RQ_ONLINE"] | SCX_RQ_FLAGS["SCX_RQ_BAL_KEEP"],
                                        0xA5A5A5A5, 0)
    uts = elf.sym("init_uts_ns")["st_value"]
    assert elf.read(uts + 65, 65).rstrip(b"\0") == b"vmm-guest"  # name.nodename


# ----------------------------------------------------------------------------- QEMU
QEMU = shutil.which("qemu-system-x86_64")
kvm = pytest.mark.kvm


def qemu(kernel, cmdline, cpus=1, machine="microvm", timeout=60):
    """Boot under QEMU's PVH loader; returns (exit status, serial output)."""
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed")
    if not Path("/dev/kvm").exists():
        pytest.skip("/dev/kvm missing: QEMU boots use -accel kvm")
    cmd = [QEMU, "-M", machine, "-accel", "kvm", "-m", "256", "-smp", str(cpus), "-nodefaults",
           "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(kernel),
           "-append", cmdline]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    return proc.returncode, proc.stdout.decode(errors="replace")


def qemu_status(code):
    """QEMU's isa-debug-exit makes the process exit with (code << 1) | 1."""
    return ((code << 1) | 1) & 0xFF


@kvm
def test_qemu_hello(built):
    rc, out = qemu(built / "guest.elf", "mode=hello exit=3")
    assert rc == qemu_status(3), out
    assert out.endswith("vmm-guest: hello\nvmm-guest: boot protocol pvh\n"
                        "vmm-guest: cmdline: mode=hello exit=3\n")


@kvm
def test_qemu_exception_is_reported(built):
    rc, out = qemu(built / "guest.elf", "mode=fault")
    assert rc == qemu_status(0x7F), out
    assert "exception 14 #PF" in out and "cr2 0x8000000000" in out


@kvm
def test_qemu_bad_cmdline(built):
    rc, out = qemu(built / "guest.elf", "mode=hello exit=zz")
    assert rc == qemu_status(0x7E) and "bad number in exit=zz" in out


@kvm
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("ring", [3, 0])
def test_qemu_smp_loop(built, variant, ring):
    loops = 30_000_000 if ring == 3 else 3_000  # ring 0 is emulated on PVM hosts
    rc, out = qemu(built / variant, f"mode=loop cpus=2 ring={ring} loop={loops} exit=4", cpus=2)
    assert rc == qemu_status(4), out
    assert f"2 cpus up (ring {ring})" in out and "done, 2 cpus stopped" in out


@kvm
def test_qemu_outloop_and_triple_fault(built):
    rc, out = qemu(built / "guest.elf", "mode=outloop n=2000 ring=0 exit=6")
    assert rc == qemu_status(6), out
    rc, out = qemu(built / "guest.elf", "mode=triple")  # -no-reboot: shutdown ends QEMU with 0
    assert rc == 0 and out.endswith("vmm-guest: triple fault\n"), out


@kvm
@pytest.mark.slow
def test_qemu_pc_machine(built):
    """The full PC machine (SeaBIOS, then PVH; ~4 s a boot): 8 CPUs, and the i8042 reset
    that microvm lacks."""
    rc, out = qemu(built / "guest.elf", "mode=loop cpus=8 loop=100000000 exit=2", cpus=8,
                   machine="pc", timeout=120)
    assert rc == qemu_status(2), out
    assert "8 cpus up (ring 3)" in out and "hot_word 0xffff," in out
    rc, out = qemu(built / "guest.elf", "mode=reset", machine="pc")  # -no-reboot: exits 0
    assert rc == 0 and out.endswith("vmm-guest: reset\n"), out


# ----------------------------------------------------------------------------- our VMM
# The guest's run-time protocol (README: work loop, guest_command, records) on our own
# VMM, through the Linux 64-bit entry. Addresses come from the ELF and BTF only, so these
# tests do not depend on vmm.kernel.
REC_OBS, REC_SUMMARY, REC_HOT, REC_UTS = 3, 4, 5, 7
CMD_UTS, CMD_STOP = 1, 3


class GuestAddresses:
    """Guest-physical addresses of the guest's variables, from its ELF symbols and BTF."""

    def __init__(self, guest, memory):
        self.guest, self.memory = guest, memory
        self.rq = member_offsets(pahole(guest.path, "rq"))
        self.scx = member_offsets(pahole(guest.path, "scx_rq"))

    @staticmethod
    def gpa(va):
        return va - START_KERNEL_MAP  # image mapping; phys_base is 0

    def global_(self, name):
        return self.gpa(self.guest.sym(name)["st_value"])

    def rq_field(self, cpu, field):
        """&runqueues + __per_cpu_offset[cpu] + offset of field ('scx.flags' style)."""
        offset = self.memory.read_u64(self.global_("__per_cpu_offset") + 8 * cpu)
        va = (self.guest.sym("runqueues")["st_value"] + offset) & (2**64 - 1)
        if field.startswith("scx."):
            return self.gpa(va + self.rq["scx"][0] + self.scx[field[4:]][0])
        return self.gpa(va + self.rq[field][0])


def wait_until(predicate, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def vmm_machine():
    from guest_abi import kvm_problem
    from vmm.runtime import Machine

    why = kvm_problem()
    if why:
        pytest.skip(f"our VMM cannot run here: {why}")
    return Machine


@kvm
@pytest.mark.parametrize("ring", [3, 0])
def test_vmm_clock_observation_across_a_freeze(built, vmm_machine, ring):
    """The freeze-test pattern: clock + OR CLK_VALID (+ probe) in one frozen batch."""
    with open(built / "guest.elf", "rb") as f:
        guest = Guest(built / "guest.elf", ELFFile(f), "absolute")
        with vmm_machine(guest.path, cpus=2, cmdline=f"mode=loop cpus=2 ring={ring}", timeout=120) as m:
            m.wait_for_console("2 cpus up", timeout=60)
            at = GuestAddresses(guest, m.memory)
            with m.freeze(timeout=10):
                for cpu in range(2):
                    m.memory.write_u64(at.rq_field(cpu, "scx.clock"), 0x5EED0000 + cpu)
                    m.memory.fetch_or_u32(at.rq_field(cpu, "scx.flags"), 0x20)
                m.memory.write(at.global_("misaligned_probe") + 1, b"\x22" * 8)
            wait_until(lambda: all(m.memory.read_u32(at.rq_field(c, "obs_events")) for c in range(2)))
            wait_until(lambda: all(m.memory.read_u64(at.rq_field(c, "probe_last")) == 0x22 * 0x0101010101010101
                                   for c in range(2)))
            for cpu in range(2):  # guest memory is gone once the VM ends: read it now
                assert m.memory.read_u64(at.rq_field(cpu, "obs_clock")) == 0x5EED0000 + cpu
                assert m.memory.read_u32(at.rq_field(cpu, "obs_flags")) == 0x29
                assert m.memory.read_u32(at.rq_field(cpu, "scx.nr_immed")) == 0xA5A5A5A5
                assert m.memory.read_u64(at.rq_field(cpu, "obs_inconsistent")) == 0
                assert m.memory.read_u64(at.rq_field(cpu, "torn_reads")) == 0
            m.memory.write_u32(at.global_("guest_command"), CMD_STOP | 5 << 8)
            result = m.wait(60)
    assert (result.reason, result.exit_code) == ("exit-code", 5), m.console_text()
    recs = records(m.reports)
    obs = {v: p for v, t, p in recs if t == REC_OBS}
    assert {v: (p[0], p[1], p[2] | p[3] << 32) for v, p in obs.items()} == {
        0: (0, 0x29, 0x5EED0000), 1: (1, 0x29, 0x5EED0001)}
    summaries = [p for _, t, p in recs if t == REC_SUMMARY]
    assert len(summaries) == 2 and all(p[4] == 0 and p[5] == 0 for p in summaries)


@kvm
def test_vmm_hot_word_and_commands(built, vmm_machine):
    with open(built / "guest.elf", "rb") as f:
        guest = Guest(built / "guest.elf", ELFFile(f), "absolute")
        with vmm_machine(guest.path, cpus=2, cmdline="mode=loop cpus=2 hot_every=1", timeout=60) as m:
            m.wait_for_console("2 cpus up", timeout=30)
            at = GuestAddresses(guest, m.memory)
            hot = at.global_("hot_word")
            for bit in range(16, 32):  # the host's bits, while the guest sets its own
                m.memory.fetch_or_u32(hot, 1 << bit)
            wait_until(lambda: m.memory.read_u32(hot) & 0xFFFF == 0xFFFF)
            m.memory.write_u32(at.global_("guest_command"), CMD_UTS)
            m.wait_for_console("vmm-guest: nodename vmm-guest", timeout=30)
            wait_until(lambda: m.memory.read_u32(at.global_("guest_command_ack")) == CMD_UTS)
            m.memory.write_u32(at.global_("guest_command"), CMD_STOP | 7 << 8)
            result = m.wait(30)
    assert (result.reason, result.exit_code) == ("exit-code", 7)
    assert "done, 2 cpus stopped, hot_word 0xffffffff, exit 7" in m.console_text()
    recs = records(m.reports)
    (uts,) = [p for _, t, p in recs if t == REC_UTS]
    assert uts[0] == 9 and struct.pack("<17I", *uts[1:])[:9] == b"vmm-guest"
    assert sorted(v for v, t, _ in recs if t == REC_HOT) == [0, 1]
    assert [p[6] for _, t, p in recs if t == REC_SUMMARY] == [0xFFFFFFFF] * 2
