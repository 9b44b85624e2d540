"""m.monitor(): unfrozen run-queue sampling (vmm/runtime/monitor.py, vmm/kernel/rq_sample.py)
and the stall verdict.

find_stalls on synthetic series (a stall, an idle CPU, a vCPU the host did not run, a
clock that moves, ...); the Monitor over a fake memory (aligned loads, a misaligned slot
read twice, columns, JSON); then for real on KVM with our test guest, whose per-CPU
``runqueues`` mimic the kernel's: its rq clock never moves, so a CPU given
``nr_running`` is a stall while its vCPU runs, and is not once the vCPU is held.
"""

import json
import struct
import threading
import time

import pytest

from vmm.errors import KernelFeatureMissing, VmmError
from vmm.runtime.monitor import (Monitor, Sample, Stall, ThreadClock, find_stalls,
                                 thread_cpu_seconds)


def series(rows_per_cpu, cpu_times, dt=0.1):
    """Samples every dt s: rows_per_cpu[cpu][i] = (nr_running, scx_nr_running, clock),
    cpu_times[vcpu][i] = that vCPU thread's CPU seconds so far."""
    n = len(rows_per_cpu[0])
    out = []
    for i in range(n):
        rows = tuple({"nr_running": r[i][0], "scx.nr_running": r[i][1], "clock": r[i][2],
                      "scx.flags": 9} for r in rows_per_cpu)
        out.append(Sample(i * dt, tuple(t[i] for t in cpu_times), rows))
    return out


def running(n, per_sample=0.1):
    return [i * per_sample for i in range(n)]


def test_a_stall_an_idle_cpu_and_a_moving_clock():
    n = 21  # 2 s at 0.1 s
    stalled = [(2, 0, 500)] * n                      # runnable, clock stuck, vCPU ran
    idle = [(0, 0, 700)] * n                         # nothing runnable: not a stall
    moving = [(3, 1, 1000 + i) for i in range(n)]    # runnable, clock advances
    samples = series([stalled, idle, moving], [running(n)] * 3)
    found = find_stalls(samples, [0, 1, 2], window_s=1.0)
    assert found == [Stall(0, 0.0, 2.0, 2, 0, 500, pytest.approx(2.0), 21)]
    assert "cpu 0 stalled 0.000-2.000 s" in found[0].describe()
    assert "rq clock stuck at 500" in found[0].describe()


def test_a_vcpu_the_host_did_not_run_is_not_stalled():
    n = 21
    stuck = [(1, 1, 42)] * n
    descheduled = [0.5] * n                          # no host CPU time at all
    barely = [0.5 + i * 0.001 for i in range(n)]     # 1% of the run: below 10%
    samples = series([stuck, stuck, stuck], [descheduled, barely, running(n)])
    assert [s.cpu for s in find_stalls(samples, [0, 1, 2], window_s=1.0)] == [2]
    # the threshold is a fraction of the run: 0.5% of it is enough at 0.005
    assert [s.cpu for s in find_stalls(samples, [0, 1, 2], window_s=1.0,
                                       min_cpu_fraction=0.005)] == [1, 2]


def test_a_vcpu_the_guest_halted_with_work_queued_is_an_idle_stall():
    """Runnable tasks on a CPU whose vCPU neither ran nor waited for a host core, asleep
    in KVM_RUN (the guest halted it): a scheduler that stopped dispatching. Waiting for a
    host core, or parked by vmm (not in KVM_RUN), or unknown: excused as before."""
    n = 21
    stuck = [(0, 3, 42)] * n
    asleep = [0.5] * n

    def with_(wait, halted):
        return [Sample(s.t, s.vcpu_cpu_time, s.rows, (wait(i),), (halted(i),))
                for i, s in enumerate(series([stuck], [asleep]))]
    (st,) = find_stalls(with_(lambda i: 1.0, lambda i: i % 7 != 3), [0], window_s=1.0)
    assert st.kind == "idle" and st.scx_nr_running == 3
    # a timer's wakeup moves the rq clock now and then without running the queued work
    ticking = [(0, 3, 42 + i // 5) for i in range(n)]
    (st,) = find_stalls([Sample(s.t, s.vcpu_cpu_time, s.rows, (1.0,), (True,))
                         for s in series([ticking], [asleep])], [0], window_s=1.0)
    assert st.kind == "idle" and st.duration == pytest.approx(2.0)
    assert "idle with work queued" in st.describe() and "halted its vCPU" in st.describe()
    assert find_stalls(with_(lambda i: 1.0 + 0.1 * i, lambda i: True), [0], 1.0) == []  # waited
    assert find_stalls(with_(lambda i: 1.0, lambda i: False), [0], 1.0) == []  # parked by vmm
    assert find_stalls(with_(lambda i: None, lambda i: True), [0], 1.0) == []  # unknown wait
    assert find_stalls(series([stuck], [asleep]), [0], 1.0) == []  # no wait or halt at all


def test_thread_clock_tells_a_parked_thread_from_one_in_kvm_run():
    box, ready = {}, threading.Event()
    box["ev"] = threading.Event()

    def parked():
        box["tid"] = threading.get_native_id()
        ready.set()
        box["ev"].wait(5)
    th = threading.Thread(target=parked)
    th.start()
    ready.wait()
    time.sleep(0.1)
    clock = ThreadClock(box["tid"])
    assert clock.halted_in_kvm() is False  # a futex wait, as vmm parks a vCPU: not KVM_RUN
    run, wait = clock.read_both()
    assert run is not None and wait is not None and wait >= 0
    box["ev"].set()
    th.join()
    clock.close()
    assert ThreadClock(None).halted_in_kvm() is None


def test_unknown_vcpu_time_does_not_excuse_a_stall():
    n = 15
    samples = series([[(1, 0, 9)] * n], [[None] * n])
    (st,) = find_stalls(samples, [0], window_s=1.0)
    assert st.vcpu_cpu_s is None and "ran ? s" in st.describe()


def test_windows_runs_and_scx_only_runnable():
    n = 30
    rows = ([(0, 0, 5)] * 5              # idle
            + [(0, 4, 5)] * 12           # scx tasks queued, clock stuck 1.1 s
            + [(0, 4, 6)]                # the clock moves: the run ends
            + [(1, 0, 6)] * 7            # queued again, stuck only 0.7 s
            + [(1, 0, 7 + i) for i in range(5)])
    samples = series([rows], [running(n)])
    (st,) = find_stalls(samples, [0], window_s=1.0)
    assert (st.start, st.end, st.scx_nr_running, st.nr_running, st.clock, st.samples) == \
        (pytest.approx(0.5), pytest.approx(1.6), 4, 0, 5, 12)
    assert find_stalls(samples, [0], window_s=0.6) == [st, find_stalls(samples, [0], 0.6)[1]]
    assert find_stalls(samples, [0], window_s=0.6)[1].clock == 6
    with pytest.raises(VmmError, match="positive"):
        find_stalls(samples, [0], window_s=0)


def test_cpu_to_vcpu_mapping():
    n = 21
    samples = series([[(1, 0, 3)] * n], [[0.0] * n, running(n)])
    assert find_stalls(samples, [0], 1.0) == []                  # cpu 0 = vCPU 0: never ran
    assert len(find_stalls(samples, [0], 1.0, cpu_vcpu=[1])) == 1  # cpu 0 on vCPU 1


class Words:
    """A GuestMemory stand-in: read_u8/16/32/64 over a bytearray, counting reads;
    ``changes`` makes a slot read differently the first times."""

    def __init__(self, size=0x100):
        self.data = bytearray(size)
        self.reads = 0
        self.changes = {}

    def _get(self, gpa, n):
        self.reads += 1
        left = self.changes.get(gpa, 0)
        if left:
            self.changes[gpa] = left - 1
            return left
        return int.from_bytes(self.data[gpa:gpa + n], "little")

    def read_u8(self, gpa):
        return self._get(gpa, 1)

    def read_u16(self, gpa):
        return self._get(gpa, 2)

    def read_u32(self, gpa):
        return self._get(gpa, 4)

    def read_u64(self, gpa):
        return self._get(gpa, 8)


def test_monitor_over_fake_memory():
    mem = Words()
    struct.pack_into("<IQ", mem.data, 0x10, 3, 0)
    struct.pack_into("<Q", mem.data, 0x18, 1234)
    struct.pack_into("<I", mem.data, 0x30, 0)
    struct.pack_into("<Q", mem.data, 0x38, 99)
    slots = [(0, 0x10, 4), (0, 0x18, 8), (1, 0x30, 4), (1, 0x38, 8)]
    me = threading.current_thread()
    me.tid = threading.get_native_id()  # a "vCPU thread": this one
    mon = Monitor(mem, [0, 1], ["nr_running", "clock"], slots, threads=[me], interval=0.01,
                  skipped={"scx.local_dsq.nr": "not in this kernel"})
    s = mon.sample()
    assert s.rows == ({"nr_running": 3, "clock": 1234}, {"nr_running": 0, "clock": 99})
    assert mem.reads == 4  # one aligned load per slot
    assert s.vcpu_cpu_time[0] is not None and s.vcpu_cpu_time[0] > 0
    assert mon.cpu_vcpu == (0, None)  # cpu 1 has no vCPU thread here
    with mon:
        deadline = time.monotonic() + 5
        while len(mon.samples) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not mon.active and len(mon.samples) >= 5
    assert mon.column("clock", 0) == [1234] * len(mon.samples)
    assert mon.times() == sorted(mon.times())
    with pytest.raises(VmmError, match="skipped, not in this kernel"):
        mon.column("scx.local_dsq.nr", 0)
    with pytest.raises(VmmError, match="cpu 7 is not sampled"):
        mon.column("clock", 7)
    data = json.loads(mon.to_json())
    assert data["fields"] == ["nr_running", "clock"] and data["cpus"] == [0, 1]
    assert data["samples"][0]["cpus"][0] == {"nr_running": 3, "clock": 1234}
    assert data["skipped"] == {"scx.local_dsq.nr": "not in this kernel"}
    assert mon.overhead() is not None and mon.overhead() < 0.05
    del me.tid


def test_a_long_run_keeps_the_last_max_samples():
    """However long it runs, the monitor keeps at most max_samples (the oldest drop off,
    counted); the default bound scales with the CPUs sampled (MAX_ROWS rows)."""
    from vmm.runtime.monitor import MAX_ROWS

    mem = Words()
    struct.pack_into("<Q", mem.data, 0x18, 5)
    mon = Monitor(mem, [0], ["clock"], [(0, 0x18, 8)], interval=0.001, max_samples=4)
    with mon:
        deadline = time.monotonic() + 5
        while mon.taken < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert mon.taken >= 20 and len(mon.samples) == 4 and mon.dropped == mon.taken - 4
    assert mon.times() == sorted(mon.times()) and mon.times()[0] > 0  # the newest kept
    data = json.loads(mon.to_json())
    assert len(data["samples"]) == 4 and data["dropped"] == mon.dropped
    assert mon.overhead() is not None  # per sample taken, not per sample kept
    wide = Monitor(mem, list(range(64)), ["clock"], [(r, 0x18, 8) for r in range(64)])
    assert wide.samples.maxlen == max(1000, MAX_ROWS // 64)
    with pytest.raises(VmmError, match="max_samples"):
        Monitor(mem, [0], ["clock"], [(0, 0x18, 8)], max_samples=0)


def test_misaligned_slot_is_read_until_two_reads_agree():
    mem = Words()
    struct.pack_into("<I", mem.data, 0x21, 77)
    mem.changes[0x21] = 2  # reads 2, then 1, then 77, 77
    mon = Monitor(mem, [0], ["x"], [(0, 0x21, 4)])
    assert mon.sample().rows[0]["x"] == 77
    assert mon.reread == 2


def test_monitor_refuses_bad_plans_and_a_stopped_vm():
    mem = Words()
    with pytest.raises(VmmError, match="positive"):
        Monitor(mem, [0], ["x"], [(0, 0, 4)], interval=0)
    with pytest.raises(VmmError, match="width 3"):
        Monitor(mem, [0], ["x"], [(0, 0, 3)])
    with pytest.raises(VmmError, match="1 slots for 2 fields"):
        Monitor(mem, [0], ["x", "y"], [(0, 0, 4)])
    with pytest.raises(VmmError, match="not running"):
        Monitor(mem, [0], ["x"], [(0, 0, 4)], running=lambda: False).start()
    mon = Monitor(mem, [0], ["x"], [(0, 0, 4)])
    with pytest.raises(VmmError, match="needs the rq clock"):
        mon.stalls()


def test_thread_cpu_seconds():
    mine = thread_cpu_seconds(threading.get_native_id())
    assert mine is not None and mine > 0
    assert thread_cpu_seconds(None) is None
    assert thread_cpu_seconds(2 ** 31 - 7) is None


def test_thread_clock_kept_open_and_a_thread_that_ends():
    ready, done = threading.Event(), threading.Event()
    box = {}

    def spin():
        box["tid"] = threading.get_native_id()
        ready.set()
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        done.wait()
    th = threading.Thread(target=spin)
    th.start()
    ready.wait()
    clock = ThreadClock(box["tid"])
    first = clock.read()
    time.sleep(0.1)
    assert first is not None and clock.read() >= first
    done.set()
    th.join()
    deadline = time.monotonic() + 5
    while clock.read() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert clock.read() is None  # gone: unknown, not zero
    clock.close()
    assert ThreadClock(None).read() is None


# --- for real: our test guest on KVM ---------------------------------------------------
@pytest.mark.kvm
def test_monitor_and_stalls_on_the_test_guest(tmp_path, monkeypatch):
    from guest_abi import REPO, require_guests
    from vmm import KernelValue as V, Machine
    from vmm.runtime.vcpu_thread import hold

    elf = REPO / "kernels/guests/out/guest.elf"
    require_guests(elf)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    m = Machine(kernel=str(elf), cpus=2, cmdline="mode=loop cpus=2", timeout=120)
    with pytest.raises(VmmError, match="not running"):
        m.monitor()  # before the start: at once
    with m:
        m.wait_for_console("2 cpus up", timeout=60)
        with pytest.raises(KernelFeatureMissing, match="no sched_ext"):
            m.scx.state()  # the guest mimics rq, not sched_ext's scx_root
        with m.monitor(0.02) as mon:
            time.sleep(0.4)
            m.write("runqueues", V.u32(2), path="nr_running", cpu=1)
            time.sleep(1.2)
        assert mon.fields == ("nr_running", "scx.nr_running", "clock", "scx.flags")
        assert "scx.local_dsq.nr" in mon.skipped  # a bare list_head in the guest
        # no sched_ext event counters there: no columns, and the monitor says why
        assert "no sched_ext event counters" in mon.skipped["SCX_EV_*"]
        assert mon.guarded_fields == () and "no SCX_EV_*" in mon.describe()
        assert mon.cpus == (0, 1) and mon.cpu_vcpu == (0, 1) and mon.ended is None
        assert len(mon.samples) >= 10
        initial = m.kernel_image.enum("SCX_RQ_ONLINE") | m.kernel_image.enum("SCX_RQ_BAL_KEEP")
        assert all(f & initial == initial for f in mon.column("scx.flags", 0))
        assert mon.column("nr_running", 0) == [0] * len(mon.samples)
        assert mon.column("nr_running", 1)[-1] == 2
        ran = mon.vcpu_column(1)
        assert ran[-1] > ran[0]  # the spinning vCPU got host CPU time
        # rq->clock of the guest never moves: cpu 1 is stalled, cpu 0 is idle
        stalls = mon.stalls(window_s=0.8, min_cpu_fraction=0.01)
        assert [s.cpu for s in stalls] == [1], [s.describe() for s in stalls]
        assert stalls[0].nr_running == 2 and stalls[0].vcpu_cpu_s > 0
        assert stalls[0].duration >= 0.8
        # the same with vCPU 1 held (the host does not run it): not a stall
        with m.freeze():
            hold(m.vcpus[1], True)
        try:
            with m.monitor(0.02) as held:
                time.sleep(1.2)
        finally:
            hold(m.vcpus[1], False)
        assert held.column("nr_running", 1)[-1] == 2
        assert held.stalls(window_s=0.8) == []
        busy = held.vcpu_column(0)
        idle = held.vcpu_column(1)
        assert idle[-1] - idle[0] < busy[-1] - busy[0]
        json.loads(held.to_json())
        # the cold write m.scx.watchdog_timeout's setter goes through (a Kva target, u64)
        kva = m.live().per_cpu_address("runqueues", 0, "scx.clock")
        m._write_kva_u64(kva, 0x1234567890)
        assert m.read("runqueues", "scx.clock", cpu=0) == 0x1234567890
    # the VM ended: a new monitor is refused at once, an old one has stopped
    with pytest.raises(VmmError, match="not running"):
        m.monitor()


@pytest.mark.kvm
def test_a_cpu_its_guest_left_halted_with_work_queued_is_an_idle_stall(tmp_path, monkeypatch):
    """vCPU 1 of a 2-vCPU test guest started with cpus=1 waits for its SIPI inside
    KVM_RUN, as a CPU the guest halted does; given nr_running it is "idle with work
    queued" (its thread neither runs nor waits for a host core), and vCPU 0, spinning
    with nothing queued, is nothing."""
    from guest_abi import REPO, require_guests
    from vmm import KernelValue as V, Machine

    elf = REPO / "kernels/guests/out/guest.elf"
    require_guests(elf)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path))
    with Machine(kernel=str(elf), cpus=2, cmdline="mode=loop cpus=1 possible=2", timeout=120) as m:
        m.wait_for_console("1 cpus up", timeout=60)
        m.write("runqueues", V.u32(2), path="nr_running", cpu=1)
        with m.monitor(0.05) as mon:
            time.sleep(1.5)
    stalls = mon.stalls(window_s=1.0)
    assert [(s.cpu, s.kind) for s in stalls] == [(1, "idle")], [s.describe() for s in stalls]
    assert stalls[0].nr_running == 2 and "halted its vCPU" in stalls[0].describe()
    assert all(s.vcpu_halted[1] for s in list(mon.samples)[1:])
