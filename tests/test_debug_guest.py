"""vmm.debug on real KVM with our test guest (fast): a vmcore dumped while frozen holds
the guest's RAM and registers, drgn opens it and reads what vmm reads, the live drgn
Program reads guest memory, and a panic writes the vmcore the VM end report names."""

from pathlib import Path

import pytest

from guest_abi import gdb_batch, require_guests
from vmm.debug import vmcore, vmcoreinfo

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "kernels" / "guests" / "out" / "guest.elf"

pytestmark = [pytest.mark.kvm]  # tests/conftest.py: skips without a usable /dev/kvm


@pytest.fixture
def machine(tmp_path, monkeypatch):
    from vmm import Machine

    require_guests(GUEST)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    m = Machine(str(GUEST), cpus=2, cmdline="mode=loop cpus=2", timeout=120, console=None)
    m.start()
    m.wait_for_console("2 cpus up", timeout=60)
    yield m
    m.stop()


def test_dump_core_holds_ram_registers_and_vmcoreinfo(machine, tmp_path):
    path = tmp_path / "vmcore"
    with machine.freeze() as snap:
        rep = machine.dump_core(path)  # joins the freeze held here: same state
        live = machine.live(snap)
        uts_kva = live.address_of("init_uts_ns")
        uts = live.read_kva(uts_kva, 390)
        rq_gpa = live.kva_to_gpa(live.per_cpu_address("runqueues", 1, "scx.flags"))
        rq_flags = machine.memory.read(rq_gpa, 4)
        rips = [v.regs.rip for v in snap.vcpus]
    assert rep.cpus == 2 and rep.ram_bytes >= machine.memory.size
    with open(path, "rb") as f:
        phdrs, notes = vmcore.read_headers(f)
        assert phdrs[0][0] == vmcore.PT_NOTE
        loads = [p for p in phdrs if p[0] == vmcore.PT_LOAD]
        # Every RAM region is there, at its physical address, whole.
        ram = sorted((p[4], p[5]) for p in loads[1:])
        assert ram == sorted((g, s) for g, s, _ in machine.memory.regions)

        def read_phys(gpa, n):
            for p in loads[1:]:
                if p[4] <= gpa < p[4] + p[5]:
                    f.seek(p[2] + gpa - p[4])
                    return f.read(n)
        assert read_phys(live.kva_to_gpa(uts_kva), 390) == uts
        assert read_phys(rq_gpa, 4) == rq_flags
    prs = [vmcore.PrStatus.unpack(i, d) for i, (n, t, d) in
           enumerate(x for x in notes if x[1] == vmcore.NT_PRSTATUS)]
    assert [p.regs["rip"] for p in prs] == rips
    info = vmcoreinfo.parse(notes[-1][2])
    assert notes[-1][0] == b"VMCOREINFO" and info["OSRELEASE"] == "0.0.0-vmm-guest"


def test_drgn_opens_the_vmcore_and_the_live_guest(machine, tmp_path):
    drgn = pytest.importorskip("drgn", reason="drgn not installed (pip install drgn)")
    from vmm.debug.drgn_program import program

    path = tmp_path / "vmcore"
    with machine.freeze() as snap:
        machine.dump_core(path)
        live = machine.live(snap)
        uts_kva = live.address_of("init_uts_ns")
        rq_kva = live.per_cpu_address("runqueues", 1, "scx.flags")
        expected = (live.read_kva(uts_kva, 65), live.read_kva(rq_kva, 4))
        info = vmcoreinfo.build(live)
        # The live Program (no DWARF in the test guest: raw reads, drgn's own page walk).
        prog = program(machine.memory, info.data(), None)
        assert (prog.read(uts_kva, 65), prog.read(rq_kva, 4)) == expected
        assert prog.read(live.kva_to_gpa(rq_kva), 4, True) == expected[1]
    core = drgn.Program()
    core.set_core_dump(str(path))
    assert core.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert (core.read(uts_kva, 65), core.read(rq_kva, 4)) == expected


def test_panic_writes_the_vmcore_the_end_report_names(machine, tmp_path):
    path = tmp_path / "panic.core"
    machine.dump_on_panic = str(path)
    # What the console pump does when the guest prints the kernel's panic line.
    machine._console_sink(b"Kernel panic - not syncing: test\n")
    end = machine.wait(timeout=30)
    assert end.reason == "panic"
    assert f"vmcore written to {path}" in end.detail
    assert machine.core_path == str(path) and path.exists()
    with open(path, "rb") as f:
        assert vmcore.read_headers(f)[1][-1][0] == b"VMCOREINFO"


def test_large_guest_dump_streams_every_region(tmp_path, monkeypatch):
    """5 GiB of guest RAM, split by the 32-bit MMIO gap: both regions are in the vmcore,
    whole, and writing it does not hold a copy of guest RAM in host memory."""
    import resource

    from vmm import Machine

    require_guests(GUEST)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    with Machine(str(GUEST), cpus=1, memory="5G", cmdline="mode=loop cpus=1", timeout=120,
                 console=None) as m:
        m.wait_for_console("1 cpus up", timeout=60)
        regions = sorted((g, s) for g, s, _ in m.memory.regions)
        assert len(regions) == 2
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rep = m.dump_core(tmp_path / "vmcore")
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        m.stop()
    ram = sorted((s.paddr, s.size) for s in rep.segments if s.what.startswith("RAM"))
    assert ram == regions and ram[-1][0] >= 4 << 30 and sum(s for _, s in ram) == 5 << 30
    assert rep.ram_bytes == sum(s.size for s in rep.segments)  # RAM + the kernel image alias
    assert grown_kib < 256 << 10, f"peak RSS grew by {grown_kib} KiB while dumping 5 GiB"
    assert (tmp_path / "vmcore").stat().st_blocks * 512 < 1 << 30  # zero pages are holes


def test_cli_dump(tmp_path, monkeypatch, capsys):
    from vmm.cli import main

    require_guests(GUEST)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "core"
    rc = main(["dump", str(out), "--kernel", str(GUEST), "--cpus", "2", "--cmdline",
               "mode=loop cpus=2", "--wait-for", "2 cpus up", "--timeout", "120", "--json"])
    assert rc == 0
    import json
    result = json.loads(capsys.readouterr().out)
    assert result["vmcore"] == str(out) and result["cpus"] == 2
    with open(out, "rb") as f:
        names = [n for n, _, _ in vmcore.read_headers(f)[1]]
    assert names == [b"CORE", b"CORE", b"VMCOREINFO"]


def test_gdb_reads_threads_registers_and_writes_through_the_stub(machine):
    import shutil

    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed")
    stub = machine.gdb_server()
    try:
        # Held here, the stub's freeze joins this one: gdb sees these registers.
        with machine.freeze() as snap:
            live = machine.live(snap)
            release = live.address_of("init_uts_ns", "name.release", type="struct uts_namespace")
            clock = live.per_cpu_address("runqueues", 1, "scx.clock")
            rips = [v.regs.rip for v in snap.vcpus]
            cmds = ["set architecture i386:x86-64", f"target remote 127.0.0.1:{stub.port}",
                    "info threads", f"x/s {release:#x}", "p/x $rip", "thread 2", "p/x $rip",
                    f"set {{unsigned long}}{clock:#x} = 0x1122334455667788",
                    f"x/gx {clock:#x}", f"x/gx 0x{0xdead << 48:x}", "detach"]
            text = gdb_batch(cmds, timeout=120)
        print(text)
        assert "vCPU 0" in text and "vCPU 1" in text
        assert '"0.0.0-vmm-guest"' in text
        assert f"$1 = {rips[0]:#x}" in text and f"$2 = {rips[1]:#x}" in text
        assert "0x1122334455667788" in text
        assert "Cannot access memory" in text  # a non-canonical address: an error, not a crash
        assert machine.read("runqueues", "scx.clock", cpu=1) == 0x1122334455667788
        assert stub.snapshot is None  # detach thawed the guest
    finally:
        stub.close()


def test_gdb_continue_thaws_and_interrupt_freezes(machine):
    import socket
    import time

    from vmm.debug.gdbstub import frame

    stub = machine.gdb_server()
    try:
        s = socket.create_connection(("127.0.0.1", stub.port), timeout=30)

        def ask(payload):
            s.sendall(frame(payload))
            data = b""
            while not (b"#" in data and len(data) >= data.index(b"#") + 3):
                data += s.recv(4096)
            return data[data.index(b"$") + 1:data.index(b"#")]

        assert ask(b"?").startswith(b"T05")
        assert ask(b"Z3,ffffffff81000000,4") == b""  # x86 has no read-only watchpoint
        s.sendall(frame(b"c"))
        deadline = time.monotonic() + 10
        while stub.snapshot is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stub.snapshot is None  # running
        s.sendall(b"\x03")
        data = b""
        while b"#" not in data:
            data += s.recv(4096)
        assert b"$T02thread:1;" in data and stub.snapshot is not None  # frozen again
        assert ask(b"D") == b"OK"
        s.close()
    finally:
        stub.close()
