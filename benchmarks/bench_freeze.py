"""Freeze/thaw latency of the rendezvous, printed as p50/p99 per vCPU count and guest kind.

freeze latency: FreezeCoordinator.freeze() request -> every vCPU parked (C clock, the
rendezvous itself; clock save and snapshot copy come after and are not counted).
thaw latency: vmm_thaw -> the last vCPU has left its futex wait (each vCPU stamps
CLOCK_MONOTONIC as it resumes).

Guests: "ring0" is a real-mode `incl (%bx); jmp` loop (on a PVM host ring 0 / real mode
is emulated instruction by instruction), "ring3" a 64-bit CPL3 `incq (%rbx); jmp` loop
(native speed even on PVM).

    python benchmarks/bench_freeze.py [--cycles 300] [--cpus 1,2,4,8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny guests live with the tests

from test_kvm_guests import COUNT, USER_COUNT, RecordingHandler, TinyVm  # noqa: E402

from vmm.runtime import FreezeCoordinator  # noqa: E402


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def measure(code: bytes, user: bool, ncpus: int, cycles: int, hold_s: float = 0.0):
    freeze_us, thaw_us = [], []
    with TinyVm(code, ncpus=ncpus, user=user) as g:
        h = RecordingHandler()
        g.start(h)
        time.sleep(0.05)  # let every vCPU enter the guest
        coord = FreezeCoordinator(g.vm, g.vcpus)
        for _ in range(cycles):
            snap = coord.freeze(timeout=10)
            freeze_us.append(snap.latency_ns / 1e3)
            if hold_s:
                time.sleep(hold_s)
            coord.thaw()
            thaw_ns = g.vm.native.thaw_ns
            # Sleep (do not spin: the host may have fewer cores than vCPUs) until every
            # vCPU has stamped its resume time, which it does itself, in C.
            deadline = time.monotonic() + 1.0
            while True:
                time.sleep(0.001)  # also lets the guest run between cycles
                resumed = [v.native.resumed_ns for v in g.vcpus]
                if all(r >= thaw_ns for r in resumed) or time.monotonic() > deadline:
                    break
            thaw_us.append((max(resumed) - thaw_ns) / 1e3)
        if h.stops:
            raise SystemExit(f"guest stopped during the benchmark: {h.stops}")
    return freeze_us, thaw_us


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--cpus", default="1,2,4,8")
    args = ap.parse_args(argv)
    from vmm.kvm import is_pvm_host

    print(f"host: {'PVM (ring 0 emulated)' if is_pvm_host() else 'hardware virtualization'}, "
          f"{os.cpu_count()} host CPUs, {args.cycles} cycles each")
    print(f"{'guest':6} {'vCPUs':>5} {'freeze p50':>11} {'p99':>9} {'max':>9} "
          f"{'thaw p50':>10} {'p99':>9}   (microseconds)")
    for kind, code, user in (("ring0", COUNT, False), ("ring3", USER_COUNT, True)):
        for n in (int(x) for x in args.cpus.split(",")):
            f, t = measure(code, user, n, args.cycles)
            print(f"{kind:6} {n:5d} {statistics.median(f):11.1f} {percentile(f, 99):9.1f} "
                  f"{max(f):9.1f} {statistics.median(t):10.1f} {percentile(t, 99):9.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
