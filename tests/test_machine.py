"""The Machine on real KVM with our test guests (kernels/guests)."""

import os
import re
import struct
import threading
from pathlib import Path

import pytest

from vmm.errors import ConfigError, ImageError
from guest_abi import kvm_problem, records, require_guests
from vmm.machine import layout as L
from vmm.runtime import Machine

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "kernels" / "guests" / "out" / "guest.elf"
REC_BOOT, REC_READY = 1, 2


@pytest.fixture(scope="module")
def guest():
    require_guests(GUEST)
    return GUEST


def run(kernel, cmdline, **kw):
    kw.setdefault("timeout", 30)
    with Machine(kernel, cmdline=cmdline, **kw) as m:
        result = m.wait()
    return m, result


def test_hello_console_and_exit_code(guest):
    m, r = run(guest, "mode=hello exit=3")
    assert (r.reason, r.exit_code) == ("exit-code", 3)
    assert m.console_text() == ("vmm-guest: hello\nvmm-guest: boot protocol linux\n"
                                "vmm-guest: cmdline: mode=hello exit=3\n")
    assert r.console_tail.endswith("cmdline: mode=hello exit=3\n")
    (boot,) = [p for _, t, p in records(m.reports) if t == REC_BOOT]
    assert boot == [0, 1, 3, 0]  # linux boot protocol, 1 cpu, ring 3, mode hello


@pytest.mark.parametrize("cpus", [2, 4])
def test_every_vcpu_comes_up(guest, cpus):
    m, r = run(guest, f"mode=loop cpus={cpus} loop=2", cpus=cpus)
    assert (r.reason, r.exit_code) == ("exit-code", 0), m.console_text()
    ready = sorted({vcpu for vcpu, t, _ in records(m.reports) if t == REC_READY})
    assert ready == list(range(cpus))
    assert f"{cpus} cpus up" in m.console_text()


def test_reset(guest):
    _, r = run(guest, "mode=reset")
    assert (r.reason, r.exit_code) == ("reset", 0)


def test_triple_fault_is_shutdown(guest):
    _, r = run(guest, "mode=triple")
    assert (r.reason, r.exit_code) == ("shutdown", 255)


def test_bad_instruction(guest):
    from vmm.kvm import is_pvm_host

    from vmm.kernel import image_symbols

    _, r = run(guest, "mode=badinsn", symbol_table=image_symbols)  # names the RIP
    if is_pvm_host():
        assert (r.reason, r.exit_code) == ("internal-error", 255)
        assert "RIP 0xffffffff81" in r.detail and "bytes 0f ae" in r.detail  # xsave
        assert "boot_main+" in r.detail  # nearest symbol from the guest's .symtab
    else:  # hardware: xsave with CR4.OSXSAVE clear is #UD, which the guest reports
        assert (r.reason, r.exit_code) == ("exit-code", 0x7F)


def test_timeout(guest):
    _, r = run(guest, "mode=loop", timeout=0.5)
    assert (r.reason, r.exit_code) == ("timeout", 255)


def test_unknown_port_is_counted_not_fatal(guest):
    m, r = run(guest, "mode=outloop n=5 port=0x80 exit=9")
    assert (r.reason, r.exit_code) == ("exit-code", 9)
    assert m.unhandled_io.get(0x80) == 5


def test_boot_structures_in_guest_memory(guest):
    m = Machine(guest, cpus=2, memory="256M", cmdline="mode=hello", initrd=b"x" * 10000)
    try:
        m.build()
        from vmm.image.bootparams import BootParams

        zp = BootParams(m.memory.read(L.ZERO_PAGE_START, 4096))
        assert zp["cmd_line_ptr"] == L.CMDLINE_START
        assert m.memory.read(L.CMDLINE_START, 11) == b"mode=hello\0"
        assert (zp["ramdisk_image"], zp["ramdisk_size"]) == m.initrd_range
        assert m.memory.read(zp["ramdisk_image"], 4) == b"xxxx"
        assert zp.e820() == L.e820_map(256 << 20)
        assert zp["acpi_rsdp_addr"] == L.RSDP_START and m.memory.read(L.RSDP_START, 8) == b"RSD PTR "
        assert m.memory.read(L.MPTABLE_START, 4) == b"_MP_"
        assert m.vcpus[0].get_regs().rip == m.entry and m.vcpus[0].get_regs().rsi == L.ZERO_PAGE_START
    finally:
        m.stop()


def test_freeze_captures_every_vcpu(guest):
    with Machine(guest, cpus=2, cmdline="mode=loop cpus=2", timeout=60) as m:
        m.wait_for_console("2 cpus up", timeout=30)
        with m.freeze(timeout=10) as snap:
            assert len(snap.vcpus) == 2 and all(v is not None and v.cr3 for v in snap.vcpus)
            assert m.running
        r = m.stop()
    assert r.reason == "stopped" and r.exit_code == 0


def test_wait_for_console_raises_when_the_vm_ends(guest):
    from vmm.errors import GuestBootError

    with Machine(guest, cmdline="mode=hello") as m:
        with pytest.raises(GuestBootError, match="never matched"):
            m.wait_for_console("no such text", timeout=10)


def test_wait_for_console_timeout_says_where_each_vcpu_is(guest):
    """A guest that runs on without printing the awaited text: the error names every
    vCPU's RIP (symbolized from the guest ELF) and run state, taken under a freeze."""
    from vmm.errors import GuestBootError
    from vmm.kernel import image_symbols

    with Machine(guest, cpus=2, cmdline="mode=loop cpus=2", timeout=120,
                 symbol_table=image_symbols) as m:
        m.wait_for_console("2 cpus up", timeout=60)
        with pytest.raises(GuestBootError) as err:
            m.wait_for_console("no such text", timeout=1)
        assert m.running  # the short freeze was thawed
    text = str(err.value)
    assert "1 s passed" in text and "Where the vCPUs are:" in text
    assert "UART 0x3f8: IER" in text  # what the guest's serial driver sees (a stalled tty)
    for cpu in (0, 1):
        line = next(l for l in text.splitlines() if l.strip().startswith(f"vCPU {cpu}:"))
        assert re.search(r"RIP 0x[0-9a-f]+ \(\w+\+0x[0-9a-f]+\)", line), line
        assert "IF " in line and "CR3 0x" in line


def test_a_silent_vcpu_holding_host_state_fails_the_wait_at_once(guest, monkeypatch):
    """After STALL_CHECK_S without console output the wait looks where the vCPUs are; a
    vCPU whose RIP is in the host's KVM (the fault the SVM lane's emulator has: faked
    here by the lookup, on a real guest) ends the wait at once, not at its timeout."""
    import time

    from vmm.errors import GuestBootError
    from vmm.runtime import machine as runtime_machine

    monkeypatch.setattr(runtime_machine, "STALL_CHECK_S", 0.5)
    with Machine(guest, cpus=2, cmdline="mode=loop cpus=2", timeout=120) as m:
        m.wait_for_console("2 cpus up", timeout=60)
        time.sleep(0.2)  # the last line is out: from here the guest prints nothing
        # A healthy silent guest: looked at every 0.5 s, waited out to its timeout.
        with pytest.raises(GuestBootError, match="3 s passed"):
            m.wait_for_console("no such text", timeout=3)
        assert m.running
        monkeypatch.setattr(runtime_machine, "leaked_host_state",
                            lambda rip: f"{rip:#x} is the host's own __svm_vcpu_run+0x9c [kvm_amd]")
        t0 = time.monotonic()
        with pytest.raises(GuestBootError) as err:
            m.wait_for_console("no such text", timeout=60)
        assert time.monotonic() - t0 < 10
        assert m.running  # thawed: the caller decides what to do with it
    text = str(err.value)
    assert "holds the host's state" in text and "not waiting out the timeout" in text
    assert text.count("is the host's own __svm_vcpu_run") == 2 and "Console tail:" in text


def test_bzimage_wrapping_our_guest_boots(guest):
    from fuzz import synthetic_images

    bz = synthetic_images.make_bzimage(synthetic_images.compress("gzip", guest.read_bytes()))
    # Its "decompressor" is a stub: decompress on the host (the automatic choice on PVM).
    m, r = run(bz, "mode=hello exit=5", boot_via_decompressor=False)
    assert (r.reason, r.exit_code) == ("exit-code", 5) and "vmm-guest: hello" in m.console_text()


@pytest.mark.parametrize("pvm", [False, True])
def test_plain_path_defaults_kaslr_and_decompressor_pvm_keeps_nokaslr(monkeypatch, pvm):
    """Hardware virtualization: the default Linux command line keeps KASLR and a bzImage
    boots through its own decompressor. PVM hosts: nokaslr, host-side decompression."""
    from vmm.machine import builder

    monkeypatch.setattr(builder, "_is_pvm_host", lambda: pvm)
    assert "nokaslr" not in builder.DEFAULT_LINUX_CMDLINE.split()
    m = Machine(kernel=b"unused")
    m.is_linux = True
    words = m.compose_cmdline().split()
    assert words[:3] == ["console=ttyS0", "reboot=k", "panic=-1"]
    assert ("nokaslr" in words) is pvm and ("noxsave" in words) is pvm
    assert m.decompress_in_guest is (not pvm)
    for explicit in (True, False):  # an explicit choice wins on either kind of host
        assert Machine(kernel=b"unused", boot_via_decompressor=explicit).decompress_in_guest is explicit
    user = Machine(kernel=b"unused", cmdline="console=ttyS0 nokaslr")  # still the user's to give
    user.is_linux = True
    assert user.compose_cmdline().split().count("nokaslr") == 1
    m.is_linux = False
    assert m.compose_cmdline() == ""  # our test guests get nothing added


def test_boot_via_decompressor_must_be_none_or_bool():
    with pytest.raises(ConfigError, match="boot_via_decompressor"):
        Machine(kernel=b"unused", boot_via_decompressor="yes")


def test_boot_via_decompressor_enters_at_load_plus_0x200(guest):
    """A stub bzImage whose '64-bit entry' checks RSI points at a zero page holding the
    image's setup header, then writes 42 to the exit port."""
    from fuzz import synthetic_images

    stub = bytes.fromhex("8b860202000" "0" "3d48647253" "7505" "b02a" "e6f4" "f4" "b001" "e6f4" "f4")
    base = bytearray(synthetic_images.make_bzimage(b"\x1f\x8b" + b"\0" * 64))
    pm_offset = (base[0x1F1] + 1) * 512
    image = bytes(base[:pm_offset]) + b"\x90" * 0x200 + stub + b"\0" * 64
    image = bytearray(image)
    struct.pack_into("<I", image, 0x1F4, (len(image) - pm_offset + 15) // 16)
    struct.pack_into("<I", image, 0x248, 0x200)
    struct.pack_into("<I", image, 0x24C, len(stub))
    _, r = run(bytes(image), "", boot_via_decompressor=True)
    assert (r.reason, r.exit_code) == ("exit-code", 42)


def test_build_errors_name_the_step(tmp_path):
    bad = tmp_path / "kernel"
    bad.write_bytes(b"\x7fELF" + b"\0" * 100)
    why = kvm_problem()
    if why:
        pytest.skip(f"KVM not usable: {why}")
    m = Machine(bad)
    with pytest.raises(ImageError, match="step load_kernel") as info:
        m.start()
    assert info.value.build_step == "load_kernel"
    assert not m.running


@pytest.mark.parametrize("kw", [dict(cpus=0), dict(cpus=255), dict(cpus="2"), dict(memory="lots"),
                                dict(memory="16M"), dict(timeout=-1), dict(topology="2s2c1t", cpus=2),
                                dict(cmdline=5), dict(console=42)])
def test_bad_options_are_config_errors(kw):
    with pytest.raises(ConfigError):
        Machine("kernel", **kw)


def test_too_long_cmdline(guest):
    m = Machine(guest, cmdline="x" * 70000)
    with pytest.raises(ConfigError, match="step write_boot_params"):
        m.start()


def test_panic_line_ends_the_vm_as_panic():
    m = Machine("unused-kernel")
    m._console_sink(b"[    1.0] Kernel panic - not sync")
    m._console_sink(b"ing: VFS: Unable to mount root fs\n[ 1.1] ---[ end")
    assert m.exit.reason == "panic" and m.exit.exit_code == 255
    from vmm.machine.vmexit import EXIT_CODE_CRASH, ExitReason, StopReason, VmExit
    assert m.exit.reason is ExitReason.PANIC and f"{m.exit.reason}" == "panic"
    assert str(m.exit).startswith("VM ended: panic (exit code 255)") and EXIT_CODE_CRASH == 255
    assert VmExit("timeout", 255, "", "").reason is ExitReason.TIMEOUT
    assert StopReason("system-event") == "system-event"
    assert m.exit.detail == "Kernel panic - not syncing: VFS: Unable to mount root fs"


def test_console_sink_receives_output(guest):
    chunks = []
    run(guest, "mode=hello", console=chunks.append)
    assert b"".join(chunks).startswith(b"vmm-guest: hello\n")


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_fifty_machines_leak_nothing(guest):
    run(guest, "mode=hello")  # warm up lazily created things (cffi, symbol tables)
    fds, threads = _open_fds(), threading.active_count()
    for i in range(50):
        _, r = run(guest, f"mode=hello exit={i}", cpus=1 + i % 2)
        assert r.exit_code == i
    assert _open_fds() == fds and threading.active_count() == threads


def test_ram_above_the_gap(guest):
    m = Machine(guest, memory="5G", cmdline="mode=hello")
    try:
        m.build()
        from vmm.image.bootparams import BootParams

        assert [(g, s) for g, s, _ in m.memory.regions] == L.ram_regions(5 << 30)
        zp = BootParams(m.memory.read(L.ZERO_PAGE_START, 4096))
        assert zp.e820()[-1] == (4 << 30, 2 << 30, L.E820_RAM)
        m.memory.write_u64((5 << 30) + (1 << 30) - 8, 7)  # last byte of RAM, above 4 GiB
    finally:
        m.stop()
    r = Machine(guest, memory="5G", cmdline="mode=hello exit=4", timeout=30).run()
    assert (r.reason, r.exit_code) == ("exit-code", 4)


def test_a_report_names_no_symbol_for_an_address_far_past_it():
    """describe_vcpus' "name+0xoff": an address megabytes past the last symbol (the
    host's module space seen from the guest's table) is not any symbol's."""
    from vmm.machine.builder import MAX_SYMBOL_OFFSET

    class Table:
        def nearest(self, addr):
            return "__init_scratch_end", addr - 0xFFFFFFFF84000000

    m = Machine(kernel=b"unused")
    m._symbolizer = Table()
    assert m._symbolize(0xFFFFFFFF84000010) == "__init_scratch_end+0x10"
    assert m._symbolize(0xFFFFFFFF84000000 + MAX_SYMBOL_OFFSET + 1) is None
    assert m._symbolize(0xFFFFFFFFC050813C) is None
