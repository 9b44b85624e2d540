"""The freeze rendezvous on real KVM: every vCPU parks in futex, nothing runs, all resume."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tinyvm import (
    CLI_HLT, COUNT, GUEST_CODE, OUT_LOOP, USER_COUNT, RecordingHandler, TinyVm, wait_until,
)
from vmm.errors import FreezeTimeout, VmmError
from vmm.kvm import MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR
from vmm.runtime import FreezeCoordinator
from vmm.runtime.freeze import SYS_FUTEX, thread_syscall_number

pytestmark = pytest.mark.kvm

FREEZE_CYCLES = int(os.environ.get("VMM_FREEZE_CYCLES", "2000"))


def counters(g):
    return [g.counter(i) for i in range(len(g.vcpus))]


def all_moving(g, timeout=10.0):
    before = counters(g)
    return wait_until(lambda: all(a != b for a, b in zip(counters(g), before)), timeout)


def fd_count():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("ncpus", [1, 2, 8])
def test_frozen_vcpus_do_not_run_and_resume_after_thaw(ncpus):
    with TinyVm(COUNT, ncpus=ncpus) as g:
        g.start(RecordingHandler())
        coord = FreezeCoordinator(g.vm, g.vcpus)
        assert all_moving(g)
        snap = coord.freeze(timeout=10)
        try:
            assert snap.frozen and coord.frozen
            frozen_at = counters(g)
            tids = coord.parked_tids()
            assert sorted(tids) == sorted(t.native_id for t in g.threads)
            # every vCPU thread sleeps in futex(FUTEX_WAIT) while frozen (a thread that
            # has just published "parked" may still be on its way into the syscall)
            assert wait_until(lambda: all(thread_syscall_number(t) == SYS_FUTEX for t in tids), 2)
            time.sleep(0.5)
            assert counters(g) == frozen_at
            for i, vs in enumerate(snap.vcpus):
                assert vs is not None and vs.index == i and vs.error is None
                assert GUEST_CODE <= vs.rip < GUEST_CODE + len(COUNT)
                assert vs.regs.rbx == 0x2000 + 64 * i  # each vCPU captured its own state
                assert set(vs.msrs) == {MSR_LSTAR, MSR_GS_BASE, MSR_KERNEL_GS_BASE}
        finally:
            coord.thaw()
        assert not snap.frozen
        assert all_moving(g)


def test_ring3_guest_freezes():
    with TinyVm(USER_COUNT, ncpus=2, user=True) as g:
        h = RecordingHandler()
        g.start(h)
        coord = FreezeCoordinator(g.vm, g.vcpus)
        assert all_moving(g), h.stops
        with coord.freeze(timeout=10) as snap:
            frozen_at = counters(g)
            time.sleep(0.2)
            assert counters(g) == frozen_at
            assert all(vs.sregs.cs.dpl == 3 for vs in snap.vcpus)
        assert all_moving(g)


def _cycles(ncpus, n):
    threads_before = threading.active_count()
    fds_before = fd_count()
    with TinyVm(COUNT, ncpus=ncpus) as g:
        g.start(RecordingHandler())
        coord = FreezeCoordinator(g.vm, g.vcpus)
        for _ in range(n):
            snap = coord.freeze(timeout=10)
            assert len([v for v in snap.vcpus if v is not None]) == ncpus
            coord.thaw()
        assert all_moving(g)
    assert threading.active_count() == threads_before
    assert fd_count() == fds_before


@pytest.mark.parametrize("ncpus", [2, 8])
def test_many_freeze_thaw_cycles(ncpus):
    _cycles(ncpus, FREEZE_CYCLES)


@pytest.mark.slow
@pytest.mark.parametrize("ncpus", [2, 8])
def test_ten_thousand_freeze_thaw_cycles(ncpus):
    _cycles(ncpus, 10_000)


def test_halted_vcpu_with_interrupts_off_parks():
    # With the in-kernel irqchip `cli; hlt` blocks inside KVM_RUN; the kick gets it out.
    with TinyVm(CLI_HLT, ncpus=2) as g:
        g.start(RecordingHandler())
        time.sleep(0.1)
        coord = FreezeCoordinator(g.vm, g.vcpus)
        with coord.freeze(timeout=5) as snap:
            assert all(v is not None for v in snap.vcpus)
            tids = coord.parked_tids()
            assert wait_until(lambda: all(thread_syscall_number(t) == SYS_FUTEX for t in tids), 2)
        with coord.freeze(timeout=5):
            pass


def test_vcpu_inside_python_handler_parks_when_handler_returns():
    release = threading.Event()
    entered = threading.Event()

    def hook(i, port, size, value):
        if i == 0 and not release.is_set():
            entered.set()
            release.wait(10)

    with TinyVm(OUT_LOOP, ncpus=2) as g:
        h = RecordingHandler()
        h.out_hook = hook
        g.start(h)
        assert entered.wait(5)
        coord = FreezeCoordinator(g.vm, g.vcpus)
        result = {}

        def do_freeze():
            result["snap"] = coord.freeze(timeout=10)

        t = threading.Thread(target=do_freeze)
        t.start()
        time.sleep(0.2)
        assert "snap" not in result  # vCPU 0 is still in Python
        release.set()
        t.join(10)
        snap = result["snap"]
        try:
            assert all(v is not None for v in snap.vcpus)
            n = len(h.outs)
            time.sleep(0.1)
            assert len(h.outs) == n  # nothing runs while frozen
        finally:
            coord.thaw()
        assert wait_until(lambda: len(h.outs) > n)


def test_nested_freeze_only_outermost_thaw_releases():
    with TinyVm(COUNT, ncpus=2) as g:
        g.start(RecordingHandler())
        coord = FreezeCoordinator(g.vm, g.vcpus)
        with coord.freeze() as outer:
            frozen_at = counters(g)
            with coord.freeze() as inner:
                assert inner is outer
            assert coord.frozen and outer.frozen
            time.sleep(0.1)
            assert counters(g) == frozen_at
        assert not coord.frozen
        assert all_moving(g)
        with pytest.raises(VmmError, match="without a matching freeze"):
            coord.thaw()


def test_timeout_names_stuck_vcpu_and_releases_the_others():
    release = threading.Event()

    def hook(i, port, size, value):
        if i == 0:
            release.wait(10)  # a handler blocked in Python longer than the timeout

    with TinyVm(OUT_LOOP, ncpus=2) as g:
        h = RecordingHandler()
        h.out_hook = hook
        g.start(h)
        assert wait_until(lambda: any(i == 0 for i, *_ in h.outs))
        coord = FreezeCoordinator(g.vm, g.vcpus)
        with pytest.raises(FreezeTimeout) as e:
            coord.freeze(timeout=0.3)
        msg = str(e.value)
        assert "vCPU 0" in msg and "vCPU 1" not in msg
        assert "futex" in msg  # what the stuck thread was doing (Event.wait)
        assert not coord.frozen
        n1 = sum(1 for i, *_ in h.outs if i == 1)
        assert wait_until(lambda: sum(1 for i, *_ in h.outs if i == 1) > n1)  # vCPU 1 released
        release.set()
        # vCPU 0 arrives late, sees the freeze already thawed and keeps running
        n0 = sum(1 for i, *_ in h.outs if i == 0)
        assert wait_until(lambda: sum(1 for i, *_ in h.outs if i == 0) > n0 + 2)
        with coord.freeze(timeout=5):
            pass


def test_stop_while_frozen_ends_parked_threads():
    from vmm.runtime import request_stop

    with TinyVm(COUNT, ncpus=2) as g:
        h = RecordingHandler()
        g.start(h)
        coord = FreezeCoordinator(g.vm, g.vcpus)
        coord.freeze()
        request_stop(g.vm)
        assert h.stopped.wait(5)
        assert {r for r, _ in h.stops.values()} == {"stopped"}


def test_freeze_before_threads_start_and_from_vcpu_thread():
    with TinyVm(COUNT, ncpus=1) as g:
        coord = FreezeCoordinator(g.vm, g.vcpus)
        with coord.freeze(timeout=1) as snap:
            assert snap.vcpus == [None]  # no thread: nothing to park, nothing captured
        errors = []

        class FreezesFromVcpu(RecordingHandler):
            def on_internal_error(self, vcpu):
                return False

        h = FreezesFromVcpu()
        g.start(h)
        assert wait_until(lambda: g.counter(0) > 10)

    # a freeze from a vCPU's own thread is refused instead of deadlocking
    with TinyVm(OUT_LOOP, ncpus=1) as g:
        h = RecordingHandler()
        coord = FreezeCoordinator(g.vm, g.vcpus)

        def hook(i, port, size, value):
            if not errors:
                try:
                    coord.freeze(timeout=1)
                except VmmError as e:
                    errors.append(e)

        h.out_hook = hook
        g.start(h)
        assert wait_until(lambda: errors)
        assert "own thread" in str(errors[0])


def test_guest_clock_is_restored_at_thaw():
    with TinyVm(COUNT, ncpus=1) as g:
        g.start(RecordingHandler())
        coord = FreezeCoordinator(g.vm, g.vcpus)
        snap = coord.freeze()
        assert snap.clock is not None
        time.sleep(0.3)
        coord.thaw()
        clock, _ = g.vm.get_clock()
        assert clock - snap.clock < 250_000_000  # the 300 ms frozen did not pass for the guest


def test_drain_completes_a_pending_port_in_before_capture():
    # `in %dx,%al; 1: jmp 1b`: the vCPU is in the Python handler for the IN when the
    # freeze comes; the drain KVM_RUN must deliver the value to AL and step RIP past the
    # IN before the registers are captured.
    code = bytes.fromhex("ecebfe")
    release = threading.Event()
    entered = threading.Event()

    class SlowIn(RecordingHandler):
        def io_in(self, i, port, size):
            entered.set()
            release.wait(10)
            return 0x5A

    with TinyVm(code, ncpus=1) as g:
        g.start(SlowIn())
        assert entered.wait(5)
        coord = FreezeCoordinator(g.vm, g.vcpus)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("snap", coord.freeze(timeout=10)))
        t.start()
        time.sleep(0.1)
        release.set()
        t.join(10)
        with result["snap"] as snap:
            assert snap.vcpus[0].regs.rax & 0xFF == 0x5A
            assert snap.vcpus[0].rip == GUEST_CODE + 1
