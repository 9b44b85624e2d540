"""The freeze guarantees, proved on our multi-vCPU test guest (kernels/guests).

Each CPU of the guest runs a work loop (ring 3: native speed here; ring 0: emulated on
PVM hosts) that counts, watches its rq->scx.flags for SCX_RQ_CLK_VALID and then
checks the clock, reads a misaligned u64 probe for torn values and sets its own bits
of a shared word with `lock or`. The host resolves every address through the guest
ELF's symbols and BTF, exactly as for a real kernel.
"""

import os
import threading
import time
from pathlib import Path

import pytest

from vmm import KernelTarget as T, KernelValue as V, Machine, Op
from vmm.runtime.freeze import SYS_FUTEX

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "kernels/guests/out/guest.elf"
CLK_VALID = 1 << 5
CMD_STOP = 3

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not GUEST.exists(), reason="test guest not built: make guests"),
]


def boot(start, cpus: int, ring: int, extra: str = "") -> Machine:
    """Our guest on `cpus` vCPUs, its work loops in `ring`, every CPU up; `start` is
    conftest's `started` (stops it when the test ends) or Machine.start."""
    m = start(Machine(kernel=str(GUEST), cpus=cpus, cmdline=f"mode=loop cpus={cpus} ring={ring} {extra}"))
    m.wait_for_console(rf"{cpus} cpus up", timeout=120)
    return m


def counters(m: Machine, cpus: int) -> list[int]:
    return [m.read("runqueues", "counter", cpu=c, hot=True) for c in range(cpus)]


def wait_all_advance(m: Machine, cpus: int, timeout: float = 30) -> None:
    start = counters(m, cpus)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = counters(m, cpus)
        if all(b > a for a, b in zip(start, now)):
            return
        time.sleep(0.01)
    pytest.fail(f"not every vCPU advanced after thaw: {start} -> {now}")


def stop_guest(m: Machine, code: int = 0x42):
    m.write("guest_command", V.u32(CMD_STOP | code << 8), hot=True)
    exit_ = m.wait(timeout=120)
    assert exit_.reason == "exit-code" and exit_.exit_code == code, (exit_, m.console_tail(10))


@pytest.fixture(params=[3, 0], ids=["ring3", "ring0"])
def ring(request):
    return request.param


def test_frozen_guest_does_not_advance_and_resumes(ring, started):
    cpus = 2
    m = boot(started, cpus, ring)
    wait_all_advance(m, cpus)
    with m.freeze() as snap:
        before = [m.read("runqueues", "counter", cpu=c) for c in range(cpus)]
        jiffies = m.read("jiffies")
        time.sleep(1.2)
        after = [m.read("runqueues", "counter", cpu=c) for c in range(cpus)]
        assert after == before, "a guest counter moved while every vCPU was parked"
        assert m.read("jiffies") == jiffies
        assert len(snap.vcpus) == cpus and all(v.cr3 for v in snap.vcpus)
    wait_all_advance(m, cpus)  # after thaw every vCPU runs again
    stop_guest(m)


def test_every_vcpu_thread_is_in_futex_while_frozen(ring, started):
    cpus = 2
    m = boot(started, cpus, ring)
    with m.freeze():
        tids = m.coordinator.parked_tids()
        assert len(tids) == cpus
        for tid in tids:
            # A vCPU counts itself parked just before it calls futex(): allow it
            # that instant, then it must be blocked in futex for as long as we look.
            deadline = time.monotonic() + 1.0
            while (state := syscall_of(tid)) != str(SYS_FUTEX) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert state == str(SYS_FUTEX), f"vCPU thread {tid} is in {state!r}"
        time.sleep(0.2)
        assert [syscall_of(t) for t in tids] == [str(SYS_FUTEX)] * cpus
    stop_guest(m)


def test_cold_clock_and_flag_seen_as_a_consistent_pair(ring, started):
    cpus = 2
    m = boot(started, cpus, ring)
    clock = 0x0123_4567_89AB_CDEF
    result = m.inject_scx_clock(clock=clock)
    assert result.ok, result.describe()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = [m.read("runqueues", "obs_events", cpu=c, hot=True) for c in range(cpus)]
        if all(events):
            break
        time.sleep(0.01)
    for c in range(cpus):
        assert m.read("runqueues", "obs_events", cpu=c) == 1
        assert m.read("runqueues", "obs_clock", cpu=c) == clock
        assert m.read("runqueues", "obs_flags", cpu=c) == 0x9 | CLK_VALID
        assert m.read("runqueues", "obs_inconsistent", cpu=c) == 0
        assert m.read("runqueues", "scx.flags", cpu=c) == 0x9 | CLK_VALID  # other 31 bits kept
        assert m.read("runqueues", "scx.nr_immed", cpu=c) == 0xA5A5A5A5  # neighbour untouched
    for c in range(cpus):
        m.wait_for_console(rf"cpu {c} saw SCX_RQ_CLK_VALID flags 0x29 clock {clock:#x}", timeout=30)
    stop_guest(m)


def test_misaligned_u64_cold_write_lands_whole(ring, started):
    cpus = 2
    m = boot(started, cpus, ring)
    target = T.field("misaligned_probe", "value")
    loc = m.apply(Op.ReadKernelCold([target])).entries[0].location
    assert loc.gpa % 8 != 0, "the probe is meant to be misaligned"
    for i in range(1, 40):
        pattern = int.from_bytes(bytes([i * 0x11 & 0xFF]) * 8, "little")
        m.write(target, V.u64(pattern))
        time.sleep(0.005)
    time.sleep(0.2)
    assert all(m.read("runqueues", "torn_reads", cpu=c) == 0 for c in range(cpus))
    assert m.read(target) == int.from_bytes(bytes([39 * 0x11 & 0xFF]) * 8, "little")
    stop_guest(m)


def test_hot_or_u32_loses_no_bit_against_guest_atomics(ring, started):
    cpus = 2
    m = boot(started, cpus, ring, "hot_every=1")
    for bit in range(16, 32):
        m.write("hot_word", V.or_u32(1 << bit), hot=True)
        time.sleep(0.004)
    deadline = time.monotonic() + 120
    while m.read("hot_word", hot=True) != 0xFFFFFFFF and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m.read("hot_word") == 0xFFFFFFFF, hex(m.read("hot_word"))
    stop_guest(m)


def test_misaligned_hot_or_is_refused_and_guest_untouched(started):
    m = boot(started, 1, 3)
    probe = m.apply(Op.ReadKernelCold([T.field("misaligned_probe", "value")])).entries[0].location
    before = m.memory.read(probe.gpa, 8)
    with pytest.raises(Exception, match="misaligned hot-path OrU32"):
        m.apply(Op.WriteKernelHot([(T.gpa(probe.gpa), V.or_u32(1))]))
    assert m.memory.read(probe.gpa, 8) == before


def syscall_of(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/syscall").read_text().split()[0]


def _threads_and_fds():
    """The process's tasks and open fds, as sets (a count would also move with a task
    an earlier test left exiting, e.g. KVM's per-VM worker of a VM already closed)."""
    return set(os.listdir("/proc/self/task")), set(os.listdir("/proc/self/fd"))


def _made_since(base) -> tuple[set, set]:
    """Tasks and fds that exist now and did not when `base` was taken."""
    tasks, fds = _threads_and_fds()
    return tasks - base[0], fds - base[1]


def freeze_thaw_cycles(cpus: int, cycles: int) -> None:
    base = _threads_and_fds()
    m = boot(Machine.start, cpus, 3)
    try:
        latencies = []
        for _ in range(cycles):
            with m.freeze(timeout=10) as snap:
                latencies.append(snap.latency_ns)
        wait_all_advance(m, cpus)
        stop_guest(m)
    finally:
        m.stop()
    del m
    latencies.sort()
    print(f"{cpus} vCPUs, {cycles} cycles: freeze p50 {latencies[len(latencies) // 2] / 1e3:.0f} us, "
          f"p99 {latencies[int(len(latencies) * 0.99)] / 1e3:.0f} us")
    # An ended thread (or KVM's per-VM kernel thread) may take a moment to leave
    # /proc/self/task after join() returned, longer under the sanitizers: poll briefly.
    deadline = time.monotonic() + 5
    while _made_since(base) != (set(), set()) and time.monotonic() < deadline:
        time.sleep(0.05)
    tasks, fds = _made_since(base)
    assert not tasks, f"threads leaked: {sorted(tasks)} " + str(
        [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in tasks
         if Path(f"/proc/self/task/{t}/comm").exists()])
    assert not fds, "fds leaked: " + str({f: os.readlink(f"/proc/self/fd/{f}") for f in fds
                                          if os.path.lexists(f"/proc/self/fd/{f}")})


@pytest.mark.parametrize("cpus", [2, 8])
def test_freeze_thaw_cycles(cpus):
    freeze_thaw_cycles(cpus, 1_000)


@pytest.mark.slow
@pytest.mark.parametrize("cpus", [2, 8])
def test_ten_thousand_freeze_thaw_cycles(cpus):
    """Issue 4's soak: 10,000 rendezvous, no deadlock, no lost kick, no leak."""
    freeze_thaw_cycles(cpus, 10_000)


def test_freeze_while_a_vcpu_waits_in_a_python_exit_handler(started):
    """A vCPU busy in Python (here: the report-port handler held up) still parks once
    it returns to C, and the others park at once."""
    m = boot(started, 2, 3)
    gate = threading.Event()
    original = m.io_out

    def slow_io_out(vcpu_index, port, size, value):
        if port == 0x600 and not gate.is_set():
            gate.wait(0.3)
        return original(vcpu_index, port, size, value)

    m.io_out = slow_io_out
    m.write("guest_command", V.u32(2), hot=True)  # CMD_SUMMARY: every CPU reports
    time.sleep(0.05)
    with m.freeze(timeout=10):
        pass
    gate.set()
    wait_all_advance(m, 2)
