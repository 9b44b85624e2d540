"""What m.monitor() costs the host: CPU seconds per sample of the sampling thread.

    python benchmarks/bench_monitor.py [--cpus 2 16 64] [--seconds 3] [--interval 0.01]

For each count N one test guest boots with min(N, 8) vCPUs and N possible CPUs
(`mode=loop cpus=min(N,8) possible=N`: our guest runs at most 8; every vCPU spins in its
work loop, the other CPUs' run queues exist in its memory as Linux's possible-but-offline
ones do) and a monitor samples every CPU's run queue (nr_running,
scx.nr_running, clock, scx.flags: one aligned load each) plus every vCPU thread's host
CPU time (/proc/self/task/TID/schedstat) every --interval seconds for --seconds.
Printed per N: samples taken, host CPU per sample of the sampling thread (its own
thread CPU clock, so host contention does not inflate it), and the loads per sample.
On a host with fewer cores than vCPUs the spinning vCPUs keep the sampler waiting:
fewer samples are taken than asked, each costs the same.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vmm import Machine  # noqa: E402

GUEST = os.path.join(ROOT, "kernels/guests/out/guest.elf")


def measure(cpus: int, seconds: float, interval: float) -> dict:
    running = min(cpus, 8)
    with Machine(kernel=GUEST, cpus=running, cmdline=f"mode=loop cpus={running} possible={cpus}",
                 timeout=600, console=None) as m:
        m.wait_for_console(f"{running} cpus up", timeout=300)
        with m.monitor(interval) as mon:
            time.sleep(seconds)
        n = len(mon.samples)
        return {"vcpus": running, "cpus": len(mon.cpus), "samples": n, "asked": int(seconds / interval),
                "cpu_us_per_sample": (mon.overhead() or 0) * 1e6,
                "loads_per_sample": len(mon.cpus) * len(mon.fields),
                "proc_reads_per_sample": len(mon.threads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, nargs="+", default=[2, 16, 64])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--interval", type=float, default=0.01)
    args = ap.parse_args()
    print(f"{'CPUs':>5} {'vCPUs':>5} {'samples':>8} {'asked':>6} {'host CPU/sample':>16} {'loads':>6} {'/proc reads':>11}")
    for n in args.cpus:
        r = measure(n, args.seconds, args.interval)
        print(f"{r['cpus']:>5} {r['vcpus']:>5} {r['samples']:>8} {r['asked']:>6} {r['cpu_us_per_sample']:>13.1f} us "
              f"{r['loads_per_sample']:>6} {r['proc_reads_per_sample']:>11}", flush=True)


if __name__ == "__main__":
    main()
