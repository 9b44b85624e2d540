"""The mission on real Linux: boot a sched_ext kernel, freeze, inject, read back, thaw.

One boot (2 vCPUs, the built Linux 7.3 from kernels/config/sched_ext.fragment, our
spinning init) serves every check in this module, in order. Slow: the boot takes
minutes on a PVM host (guest ring 0 is emulated), well under a second with VMX/SVM.

    make kernel-build && python -m pytest tests/test_e2e_linux.py -m slow -s
"""

import os
import re
import time

import pytest

from vmm import KernelTarget as T, KernelValue as V, Machine, Op
from vmm.errors import BatchError
from vmm.kvm.pvm import is_pvm_host
from vmm.machine.builder import DEFAULT_LINUX_CMDLINE
from vmm.session import INIT_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

CPUS = 2
BOOT_TIMEOUT = 1500 if is_pvm_host() else 300  # PVM: minutes; VMX/SVM: seconds


def hardware_virtualization() -> bool:
    """VMX/SVM under /dev/kvm (not PVM, where guest ring 0 is emulated)."""
    with open("/proc/cpuinfo") as f:
        return not is_pvm_host() and re.search(r"\b(vmx|svm)\b", f.read()) is not None


def _debian_artifacts():
    from vmm import kernelstore as ks

    if not (hardware_virtualization() or os.environ.get("VMM_TEST_DEBIAN") == "1"):
        pytest.skip("Debian's prebuilt kernel: runs where VMX/SVM is present; on a PVM host it "
                    "needs far longer than our minimal build to boot (opt in: VMM_TEST_DEBIAN=1)")
    # The cached one when there is one (the SVM lane has no network); else fetch it, with
    # the -dbg package: symbols need its vmlinux/System.map.
    cached = [a for a in ks.list_kernels() if a.name.startswith("debian-")
              and a.system_map is not None and a.bzimage is not None]
    return cached[0] if cached else ks.fetch_debian(with_debug=True)


def _artifacts(kind="build"):
    from vmm import kernelstore as ks

    if kind == "debian":
        return _debian_artifacts()
    wanted = f"build-{ks.DEFAULT_BUILD_VERSION}-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}"
    for art in ks.list_kernels():
        if art.name == wanted:
            return art
    pytest.skip(f"kernel {wanted} is not built: run `make kernel-build` (CI does)")


@pytest.fixture(scope="module", params=["build", "debian"])
def linux(request):
    art = _artifacts(request.param)
    m = Machine(kernel=str(art.boot_image), vmlinux=art.vmlinux, system_map=art.system_map,
                cpus=CPUS, memory="512M")
    t0 = time.monotonic()
    m.start()
    try:
        m.wait_for_console(INIT_MARKER, timeout=BOOT_TIMEOUT)
    except Exception:
        m.stop()
        raise
    print(f"\nLinux {art.version}: 'Run /init' after {time.monotonic() - t0:.1f} s wall, "
          f"{CPUS} vCPUs, cmdline: {m.cmdline}")
    yield m
    m.stop()


def test_booted_with_every_cpu(linux):
    assert f"smp: Brought up 1 node, {CPUS} CPUs" in linux.console_text()
    assert linux.read("nr_cpu_ids") == CPUS
    with linux.freeze() as snap:
        assert linux.live(snap).possible_cpus() == list(range(CPUS))


def test_scx_clock_and_flag_injected_on_every_cpu(linux):
    cpus = range(CPUS)
    nr_immed = [linux.read("runqueues", "scx.nr_immed", cpu=c) for c in cpus]
    result = linux.inject_scx_clock(clock=0x7E57_C10C_0000_0001)
    print("\n" + result.describe())
    assert result.ok
    assert result.mask == linux.kernel_image.enum("SCX_RQ_CLK_VALID") == 1 << 5
    for row in result.rows:
        assert row.clock_after == result.clock
        # Only the flag bit was added: every other bit is what it was.
        assert row.flags_after == row.flags_before | result.mask
    assert [linux.read("runqueues", "scx.nr_immed", cpu=c) for c in cpus] == nr_immed
    assert result.freeze_latency_us < 1_000_000


def test_guest_runs_on_after_thaw(linux):
    j0 = linux.read("jiffies", hot=True)
    deadline = time.monotonic() + 60
    while linux.read("jiffies", hot=True) == j0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert linux.read("jiffies", hot=True) > j0, "jiffies did not advance after the thaw"
    assert linux.running


def test_bytes_write_to_nodename(linux):
    target = T.field("init_uts_ns", "name.nodename")
    before = linux.read(target)
    assert before.startswith(b"(none)\0") or before[:1] != b"\0"
    linux.apply(Op.WriteKernelCold([(target, V.bytes(b"vmm-frozen\0"))]))
    assert linux.read(target)[:11] == b"vmm-frozen\0"


def test_u64_write_to_a_sysctl_variable(linux):
    # vm.dirty_bytes (unsigned long vm_dirty_bytes): a sysctl-backed u64, 0 by default.
    old = linux.read("vm_dirty_bytes")
    linux.write("vm_dirty_bytes", V.u64(64 << 20))
    assert linux.read("vm_dirty_bytes") == 64 << 20
    linux.write("vm_dirty_bytes", V.u64(old))
    assert linux.read("vm_dirty_bytes") == old


def test_bad_batch_leaves_the_kernel_untouched(linux):
    with linux.freeze():  # one hold: nothing in the guest may change the values between reads
        clock = linux.read("runqueues", "scx.clock", cpu=0)
        with pytest.raises(BatchError) as ei:
            linux.apply(Op.WriteKernelCold([
                (T.per_cpu("runqueues", 0, "scx.clock"), V.u64(1)),
                (T.per_cpu("runqueues", 1, "scx.flags"), V.u64(1)),  # u64 into a u32 field
            ]))
        assert ei.value.index == 1 and "4 bytes" in str(ei.value)
        with pytest.raises(BatchError, match="runqueues"):  # did you mean
            linux.apply(Op.ReadKernelCold([T.per_cpu("runqueue", 0, "scx.clock")]))
        assert linux.read("runqueues", "scx.clock", cpu=0) == clock


def test_scx_verdicts_without_a_scheduler(linux):
    """m.scx and m.monitor on the real kernel, read from memory: no scheduler attached."""
    for s in (linux.scx.state(), linux.scx.state(freeze=True)):
        assert (s.state, s.ops, s.exit_kind, s.exit_reason, s.exit_msg) == \
            ("disabled", None, None, None, None), s
        assert s.consistent
    assert linux.scx.watchdog_timeout is None  # 7.x: the timeout belongs to a scheduler
    with linux.monitor(0.05) as mon:
        time.sleep(1)
    assert mon.samples and "clock" in mon.fields and "scx.local_dsq.nr" in mon.fields
    for cpu in mon.cpus:  # ticks move every CPU's rq clock: nothing is stalled
        clock = mon.column("clock", cpu)
        assert clock[-1] > clock[0], (cpu, clock)
    assert mon.stalls(window_s=0.5) == [], [st.describe() for st in mon.stalls(0.5)]


def test_stops_cleanly(linux):
    exit_ = linux.stop()
    assert exit_.reason == "stopped", exit_


# The kernel's own asynchronous console lines (the clocksource watchdog's, in the lane)
# share the tty with init and may land anywhere, even inside one of init's lines (one
# lane run: "== /proc/sys/vm/dir" + three clocksource/tsc lines + "ty_bytes"). A printk
# line is written whole, so cutting those lines out gives init's own text back.
KERNEL_ASYNC_LINE = re.compile(r"(?:clocksource|tsc|hrtimer|rcu|random|workqueue): [^\n]*\n")


def printed_after(text: str, header: str, value: str, within: int = 6) -> bool:
    """Whether init printed `value` as a line within `within` lines after `header`: the
    kernel's own console messages (the clocksource watchdog's, say) share the tty and
    may land between the two, or inside either (KERNEL_ASYNC_LINE)."""
    text = KERNEL_ASYNC_LINE.sub("", text)
    return re.search(rf"{re.escape(header)}\n(?:.*\n){{0,{within}}}?{re.escape(value)}$", text,
                     re.MULTILINE) is not None


def test_init_reads_injected_values_through_proc():
    """Hosts with VMX/SVM: the guest's own init (check-init, real system calls) waits for
    the hostname the host writes while frozen, then prints /proc values back."""
    if not hardware_virtualization():
        pytest.skip("needs VMX/SVM: on a PVM host guest user space cannot make system calls")
    from vmm.machine.initramfs import build_initramfs

    art = _artifacts("build")
    cmdline = (f"{DEFAULT_LINUX_CMDLINE} -- wait-hostname sys/kernel/hostname "
               "sys/vm/dirty_bytes")
    m = Machine(kernel=str(art.boot_image), vmlinux=art.vmlinux, cpus=CPUS,
                initrd=str(build_initramfs("check")), cmdline=cmdline)
    m.start()
    try:
        m.wait_for_console("waiting for the host to set the hostname", timeout=120)
        m.apply(Op.WriteKernelCold([
            (T.symbol("vm_dirty_bytes"), V.u64(64 << 20)),
            (T.field("init_uts_ns", "name.nodename"), V.bytes(b"vmm-frozen\0")),
        ]))
        # Not "status=0": a kernel built without KASLR passes the "nokaslr" it does not
        # know on to init, which then reports /proc/nokaslr missing.
        m.wait_for_console(r"done status=\d+", timeout=120)
        text = m.console_text().replace("\r\n", "\n")  # the tty turns \n into \r\n
        assert printed_after(text, "== /proc/sys/kernel/hostname", "vmm-frozen"), text[-2000:]
        assert printed_after(text, "== /proc/sys/vm/dirty_bytes", str(64 << 20)), text[-2000:]
    finally:
        m.stop()
