"""m.watch (hardware watchpoints, vmm/runtime/watch.py) and m.watch_for_stall
(vmm/kernel/stall_dump.py).

Without KVM: x86's DR7 rules (1/2/4/8 bytes, aligned, 8 only in 64-bit mode), the DR
slot allocator shared with the gdb stub (its refusal names who holds the four slots) and
DR7's encoding. Then for real on KVM with our test guest in ring 0 (the only guest code
PVM hosts stop in): an execute watch on the guest's ``report`` function, which every CPU
calls when the host writes a command, fires on both vCPUs, on_hit runs frozen with the
request context, an exception in on_hit is recorded, the guest goes on, remove() disarms;
refusals before arming; watches and the gdb stub share the four slots; a data watch on
``jiffies`` (the BSP writes it every tick) where the host hits data watchpoints (not
PVM: its ring-0 emulation checks execute breakpoints only); and a stall caught by
watch_for_stall on the CPU whose rq mimic was given nr_running.
"""

import time
from types import SimpleNamespace

import pytest

from vmm.errors import VmmError
from vmm.runtime.watch import WatchError, check_watch_range, debug_registers

# Also in the SVM lane (make test-svm selects `svm`): data watchpoints hit only under real
# VMX/SVM (PVM's ring-0 emulator checks execute breakpoints only), and that is where a
# removed watch once reached the guest as a #DB.
pytestmark = pytest.mark.svm


# --- x86's rules and the allocator, without KVM ------------------------------------------
def test_dr7_rules_refuse_before_arming():
    assert check_watch_range(0x1000, 8, "w") == 8
    assert check_watch_range(0x1002, 2, "rw") == 2
    assert check_watch_range(0x1003, 64, "x") == 1  # an instruction: one byte, any address
    with pytest.raises(WatchError, match="3 bytes .* 1, 2, 4 or 8 bytes"):
        check_watch_range(0x1000, 3, "w")
    with pytest.raises(WatchError, match="not 4-byte aligned"):
        check_watch_range(0x1002, 4, "w")
    with pytest.raises(WatchError, match="64-bit mode"):
        check_watch_range(0x1000, 8, "w", long_mode=False)
    with pytest.raises(WatchError, match="no read-only"):
        check_watch_range(0x1000, 4, "r")
    with pytest.raises(WatchError, match="no width"):
        check_watch_range(0x1000, None, "w")
    with pytest.raises(WatchError, match="virtual address"):
        check_watch_range(None, 4, "w")


def fake_machine():
    return SimpleNamespace(exits=SimpleNamespace(debugger=None), vcpus=[], running=True,
                           memory=None)


def test_slots_shared_with_the_gdb_stub_and_dr7():
    from vmm.debug.guest_debug import GuestDebug

    m = fake_machine()
    regs = debug_registers(m)
    assert debug_registers(m) is regs  # one per machine
    gdb = GuestDebug(m)
    assert gdb.dr is regs
    assert gdb.set_hw(True, 2, 0x2000, 8) is None      # gdb's watch: DR0
    assert regs.claim("watch", 0b01, 0x3000, 4, "jiffies") == 1
    assert regs.claim("watch", 0b11, 0x4000, 2, "rq.flags") == 2
    assert gdb.set_hw(True, 1, 0x5000, 1) is None      # gdb's hbreak: DR3
    assert gdb.hw_slots == [(2, 0x2000, 8), None, None, (1, 0x5000, 1)]
    with pytest.raises(WatchError) as e:
        regs.claim("watch", 0b01, 0x6000, 4, "x")
    assert str(e.value) == ("all 4 debug registers are in use: 2 by watch (jiffies, "
                            "rq.flags), 2 by the gdb stub")
    assert gdb.set_hw(True, 4, 0x6000, 4) == str(e.value)
    dr = gdb.debugregs()
    assert dr[:4] == [0x2000, 0x3000, 0x4000, 0x5000]
    # G0..G3 enabled; DR0 write 8 bytes (01, 10), DR1 write 4 (01, 11), DR2 rw 2 (11, 01),
    # DR3 execute 1 (00, 00).
    assert dr[7] == (0b10101010 | (0b1001 << 16) | (0b1101 << 20) | (0b0111 << 24))
    gdb._release_hw()                                   # detach: gdb's slots only
    assert [s is not None for s in regs.slots] == [False, True, True, False]
    assert regs.in_use() == "2 by watch (jiffies, rq.flags), 0 by the gdb stub"


def test_watch_needs_a_running_vm(tmp_path):
    from guest_abi import REPO
    from vmm import Machine

    m = Machine(kernel=str(REPO / "kernels/guests/out/guest.elf"), cpus=1)
    with pytest.raises(VmmError, match="not running"):
        m.watch("jiffies", None)


# --- for real: the test guest in ring 0 on KVM ---------------------------------------------
CMD_SUMMARY = 2  # every CPU calls report() twice (its CMD record, its SUMMARY record)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    from guest_abi import REPO, require_guests
    from vmm import Machine

    elf = REPO / "kernels/guests/out/guest.elf"
    require_guests(elf)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    m = Machine(kernel=str(elf), cpus=2, cmdline="mode=loop cpus=2 ring=0", timeout=300,
                console=None)
    m.start()
    m.wait_for_console("2 cpus up", timeout=60)
    yield m
    if m.exit is not None:  # say why the guest ended (its console names the vector)
        print(f"guest exit: {m.exit}\nconsole tail:\n{m.console_text()[-2000:]}")
    m.stop()


def command(m, value, timeout=30.0):
    """Write guest_command and wait until the BSP acknowledged it (both CPUs acted: the
    BSP acks after its own handling; the AP's may lag a tick)."""
    from vmm import KernelValue as V

    m.write("guest_command", V.u32(value))
    deadline = time.monotonic() + timeout
    while m.read("guest_command_ack", hot=True) != value:
        assert time.monotonic() < deadline, "the guest did not act on the command"
        time.sleep(0.02)


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.kvm
def test_execute_watch_fires_frozen_and_the_guest_goes_on(machine):
    from vmm import KernelTarget as T

    m = machine
    report = m.live().symbols["report"].address
    seen = []

    def on_hit(ctx):
        seen.append((ctx.vcpu, ctx.rip, ctx.snapshot is not None, m.coordinator.frozen,
                     ctx.read("guest_command"), ctx.watch))
        if len(seen) == 1:
            raise RuntimeError("a bug in on_hit")

    with m.watch(T.symbol("report"), on_hit, access="x") as w:
        assert w.armed and w.length == 1 and w.kva == report
        assert m.exits.debugger is debug_registers(m)
        command(m, CMD_SUMMARY)
        wait_for(lambda: {h[0] for h in seen} == {0, 1} and w.hits >= 4)
        assert all(h[1] == report and h[2] and h[3] and h[4] == CMD_SUMMARY and h[5] is w
                   for h in seen), seen
        assert [type(e) for e in w.errors] == [RuntimeError]  # recorded, nothing stopped
        assert m.exit is None
        # the guest goes on (it stepped over the instruction: no hit loop)
        before = [m.read("runqueues", "counter", cpu=c) for c in (0, 1)]
        time.sleep(0.3)
        after = [m.read("runqueues", "counter", cpu=c) for c in (0, 1)]
        assert all(a > b for a, b in zip(after, before)), (before, after)
    assert not w.armed and m.exits.debugger is None
    hits = w.hits
    command(m, CMD_SUMMARY | 1 << 16)  # report() runs again: no hit once removed
    time.sleep(0.2)
    assert w.hits == hits and m.exit is None


@pytest.mark.kvm
@pytest.mark.filterwarnings("ignore:m.watch.*PVM host:RuntimeWarning")
def test_refusals_and_the_gdb_stub_sharing_the_slots(machine):
    from vmm import KernelTarget as T
    from vmm.kvm.pvm import is_pvm_host
    from test_gdb_guest import Client

    m = machine
    regs = debug_registers(m)
    counter = m.live().per_cpu_address("runqueues", 0, "counter")
    with pytest.raises(WatchError, match="not 4-byte aligned"):
        m.watch(T.kva(counter + 2, 4), None)
    with pytest.raises(WatchError, match="3 bytes"):
        m.watch(T.kva(counter, 3), None)
    with pytest.raises(WatchError, match="65 bytes"):
        m.watch(T.field("init_uts_ns", "name.nodename"), None)
    assert not regs.any() and m.exits.debugger is None  # nothing was armed

    targets = [T.symbol("jiffies")] + [T.per_cpu("runqueues", c, "nr_switches") for c in (0, 1)]
    ws = [m.watch(t, None) for t in targets] + [m.watch("runqueues", None, path="scx.flags", cpu=1)]
    assert [w.slot for w in ws] == [0, 1, 2, 3]
    assert all((w.note is not None) == is_pvm_host() for w in ws)  # a data watch on PVM: said
    with pytest.raises(WatchError, match=r"all 4 debug registers are in use: 4 by watch "
                       r"\(jiffies, per_cpu\(runqueues, 0\).nr_switches, .*\), 0 by the gdb stub"):
        m.watch("guest_command", None)
    ws[0].remove()
    ws[3].remove()

    stub = m.gdb_server()
    try:
        c = Client(stub.port)
        c.ask(b"qSupported:swbreak+;hwbreak+")
        jiffies = m.live().symbols["jiffies"].address
        assert c.ask(b"Z2,%x,8" % jiffies) == b"OK"          # gdb takes a free slot
        assert c.ask(b"Z1,%x,1" % jiffies) == b"OK"          # and the last one
        assert c.ask(b"Z4,%x,4" % counter) == b"E1c"         # a fifth: refused, and why
        why = bytes.fromhex(c.ask(b"qRcmd," + b"why".hex().encode()).decode()).decode()
        assert "all 4 debug registers are in use: 2 by watch" in why and "2 by the gdb stub" in why
        with pytest.raises(WatchError, match="2 by watch .*, 2 by the gdb stub"):
            m.watch("guest_command", None)
        assert c.ask(b"z1,%x,1" % jiffies) == b"OK"
        w = m.watch("guest_command", None)                    # the slot gdb gave back
        assert regs.in_use().startswith("3 by watch")
        assert c.ask(b"D") == b"OK"
        c.s.close()
    finally:
        stub.close()
    # gdb detached: its slots are free, the watches stay armed and their hits go on
    assert regs.in_use().endswith("0 by the gdb stub")
    assert m.exits.debugger is regs
    for x in ws + [w]:
        x.remove()
    assert not regs.any() and m.exits.debugger is None
    before = m.read("runqueues", "counter", cpu=1)
    time.sleep(0.2)
    assert m.read("runqueues", "counter", cpu=1) > before and m.exit is None


@pytest.mark.kvm
def test_data_watch_on_a_guest_written_variable(machine):
    from vmm.kvm.pvm import is_pvm_host

    if is_pvm_host():
        pytest.skip("PVM emulates guest ring 0 and its emulator checks execute breakpoints "
                    "only: data watchpoints are armed but never hit (VMX/SVM and the SVM "
                    "lane run this)")
    m = machine
    seen = []
    with m.watch("jiffies", lambda ctx: seen.append((ctx.vcpu, ctx.old, ctx.new))) as w:
        wait_for(lambda: w.hits >= 3)
    assert seen[0][0] == 0  # only the BSP advances jiffies
    assert all(new == old + 1 for _, old, new in seen[1:]), seen
    before = m.read("jiffies")
    time.sleep(0.2)
    assert m.read("jiffies") > before and m.exit is None
    # Removed while the BSP keeps writing it: a hit between the vCPU's write and the
    # removal's freeze is still the watch's (the slot is freed inside the freeze), never a
    # #DB given to the guest (it has no handler: exit code 127).
    regs = debug_registers(m)
    for _ in range(40):
        w = m.watch("jiffies", None)
        time.sleep(0.01)
        w.remove()
        assert m.exit is None, m.console_text()[-500:]
    assert not regs.any() and m.exits.debugger is None


@pytest.mark.kvm
def test_watch_for_stall_names_the_cpu(tmp_path, monkeypatch):
    from guest_abi import REPO, require_guests
    from vmm import KernelValue as V, Machine

    elf = REPO / "kernels/guests/out/guest.elf"
    require_guests(elf)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    got = []
    with Machine(kernel=str(elf), cpus=2, cmdline="mode=loop cpus=2", timeout=120) as m:
        m.wait_for_console("2 cpus up", timeout=60)
        with m.watch_for_stall(0.6, on_stall=got.append, interval=0.05,
                               min_cpu_fraction=0.01) as sw:
            time.sleep(0.3)
            assert sw.report is None  # nothing queued anywhere: no stall
            # CPU 1's rq mimic gets runnable work; its rq clock never moves
            m.write("runqueues", V.u32(2), path="nr_running", cpu=1)
            report = sw.wait(timeout=20)
        assert report is not None and got == [report]
        assert report.cpus == [1]
        assert [r["cpu"] for r in report.rows] == [0, 1]
        assert report.rows[1]["nr_running"] == 2 and report.rows[0]["nr_running"] == 0
        assert "curr->pid" in report.missing  # the guest's rq has no curr
        assert "sched_ext" in report.scx_error and report.scx is None
        assert report.freeze_latency_us is not None
        text = report.describe()
        assert "cpu(s) 1" in text and " *cpu 1: nr_running=2" in text
        assert "cpu 1 stalled" in text and "sysrq D" in text
        assert not sw.monitor.active and sw.errors == []
        assert m.exit is None


@pytest.mark.kvm
def test_watch_hits_while_gdb_is_attached_are_not_gdbs(machine):
    from vmm import KernelTarget as T
    from vmm.debug.gdbstub import frame
    from test_gdb_guest import Client

    m = machine
    stub = m.gdb_server()
    try:
        c = Client(stub.port)
        c.ask(b"qSupported:swbreak+;hwbreak+")               # gdb holds the machine frozen
        w = m.watch(T.symbol("report"), None, access="x")    # armed inside gdb's freeze
        assert m.exits.debugger is stub.debug
        c.s.sendall(frame(b"vCont;c"))                       # gdb lets it run
        command(m, CMD_SUMMARY)
        wait_for(lambda: w.hits >= 4)                        # taken by the watch...
        c.s.sendall(b"\x03")
        assert c.reply().startswith(b"T02")                  # ...gdb saw no stop of its own
        assert c.ask(b"D") == b"OK"
        c.s.close()
    finally:
        stub.close()
    assert m.exits.debugger is debug_registers(m) and w.armed
    w.remove()
    assert m.exits.debugger is None
    before = m.read("runqueues", "counter", cpu=0)
    time.sleep(0.2)
    assert m.read("runqueues", "counter", cpu=0) > before and m.exit is None
