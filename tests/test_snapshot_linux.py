"""Snapshot and clone a real Linux (our build:7.3, KASLR on, plain path) after
"Run /init": the clone's guest job goes on printing on its console, host reads of kernel
variables work on it (the slide found again from the clone's memory), its jiffies and
the original's advance independently, and restoring is much faster than the boot.

Guest user space runs a shell loop (system calls), so this needs VMX/SVM: on our PVM
machines it runs in the SVM lane (about 20-40 s there: one boot, one snapshot, two
clones):

    flock /tmp/lane.lock python3 scripts/svm_lane.py run -- \\
        python3 -m pytest -q -m "slow or svm" -p no:cacheprovider tests/test_snapshot_linux.py
"""

import re
import time

import pytest

from guest_abi import built_kernel_spec, guest_syscall_marks

pytestmark = [pytest.mark.slow, pytest.mark.svm, *guest_syscall_marks()]

BOOT_TIMEOUT = 600
JOB = 'i=0; while true; do i=$((i+1)); echo "vmm-tick $i"; sleep 0.2; done'
TICK = re.compile(r"vmm-tick (\d+)")


def last_tick(m) -> int:
    ticks = TICK.findall(m.console_text())
    return int(ticks[-1]) if ticks else 0


def wait_tick_above(m, n, timeout=60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if last_tick(m) > n:
            return last_tick(m)
        time.sleep(0.05)
    pytest.fail(f"no vmm-tick above {n} in {timeout:g} s; console tail:\n{m.console_tail(20)}")


def test_clone_of_a_booted_linux_goes_on(started):
    from vmm import Machine
    from vmm.session import INIT_MARKER

    m = Machine(kernel=built_kernel_spec(), cpus=2, memory="512M", console=None, exec=JOB)
    t0 = time.monotonic()
    started(m)
    m.wait_for_console(INIT_MARKER, timeout=BOOT_TIMEOUT)
    boot_s = time.monotonic() - t0
    wait_tick_above(m, 2)
    release = m.read("init_uts_ns", "name.release")
    snap = m.snapshot()
    at_snapshot = last_tick(m)
    t0 = time.monotonic()
    clone = started(Machine.from_snapshot(snap, start=False, console=None))
    restore_s = time.monotonic() - t0
    clone2 = started(Machine.from_snapshot(snap, start=False, console=None))
    snap.close()
    # The clone's console starts empty and goes on from the job's next line.
    first = wait_tick_above(clone, 0)
    assert first >= at_snapshot - 1, (first, at_snapshot)
    wait_tick_above(clone, first + 3)
    wait_tick_above(clone2, 3)
    assert clone.read("init_uts_ns", "name.release") == release
    j0 = clone.read("jiffies_64")
    wait_tick_above(clone, last_tick(clone) + 2)
    assert clone.read("jiffies_64") > j0
    wait_tick_above(m, at_snapshot + 3)  # the original goes on too
    print(f"\nboot to Run /init {boot_s * 1e3:.0f} ms; from_snapshot (start=False + start) "
          f"{restore_s * 1e3:.1f} ms: {boot_s / restore_s:.0f}x")
