"""What m.monitor() costs the host: CPU and wall seconds per sample of the sampling thread.

    python benchmarks/monitor_overhead.py [--cpus 2 16 64] [--seconds 3] [--interval 0.01]
                                          [--events 16]

For each count N one test guest boots with N vCPUs (`mode=loop cpus=N possible=N`, up
to 64, the guest's MAX_CPUS; every vCPU spins in its work loop) and a monitor samples every CPU's run queue (nr_running, scx.nr_running, clock,
scx.flags: one aligned load each) plus every vCPU thread's host CPU time
(/proc/self/task/TID/schedstat) every --interval seconds for --seconds.

The test guest has no sched_ext event counters; ``--events K`` (default 21, as many as
Linux 7.3's struct scx_event_stats has) adds K more 8-byte columns per CPU through the
same guarded-column path m.monitor uses for them (vmm.runtime.monitor.GuardedColumns,
here at fixed addresses: words of each CPU's own rq), so the figure includes what a
sched_ext kernel's counters cost. ``--events 0`` measures the run-queue fields alone.

Printed per N: samples taken (and asked), host CPU per sample of the sampling thread (its
own thread CPU clock, so host contention does not inflate it), wall per sample (which
does include waiting for a host core), the loads and /proc reads per sample. On a host
with fewer cores than vCPUs the spinning vCPUs keep the sampler waiting: fewer samples
are taken than asked, each costs the same CPU but more wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vmm import Machine  # noqa: E402
from vmm.kernel.rq_sample import RQ_FIELDS, plan_rq_sampling  # noqa: E402
from vmm.runtime.monitor import GuardedColumns, Monitor  # noqa: E402

GUEST = os.path.join(ROOT, "kernels/guests/out/guest.elf")


def event_stand_ins(live, cpus, k: int) -> GuardedColumns:
    """K 8-byte columns per CPU at fixed, aligned addresses (words of that CPU's rq, which
    is at least 8*K bytes: struct rq of the guest is 64-byte aligned and larger)."""
    size = live.kernel.btf.sizeof("struct rq")
    if 8 * k > size:
        raise SystemExit(f"--events {k}: the guest's struct rq has only {size // 8} words")
    slots = []
    for row, cpu in enumerate(cpus):
        base = live.kva_to_gpa(live.per_cpu_address("runqueues", cpu))
        slots += [(row, base + 8 * i, 8) for i in range(k)]
    return GuardedColumns(tuple(f"SCX_EV_STAND_IN_{i}" for i in range(k)), None,
                          lambda _value: slots)


def measure(cpus: int, seconds: float, interval: float, events: int) -> dict:
    running = min(cpus, 64)
    with Machine(kernel=GUEST, cpus=running, cmdline=f"mode=loop cpus={running} possible={cpus}",
                 timeout=600, console=None) as m:
        m.wait_for_console(f"{running} cpus up", timeout=300)
        live = m._sampling_live()
        plan = plan_rq_sampling(live, RQ_FIELDS)
        guarded = event_stand_ins(live, plan.cpus, events) if events else None
        mon = Monitor(m.__dict__.get("_guest_memory"), plan.cpus, plan.fields, plan.raw(), threads=m.threads,
                      interval=interval, running=lambda: m.running, skipped=plan.skipped,
                      guarded=guarded)
        with mon:
            time.sleep(seconds)
        return {"vcpus": running, "cpus": len(mon.cpus), "samples": mon.taken,
                "asked": int(seconds / interval),
                "cpu_us_per_sample": (mon.overhead() or 0) * 1e6,
                "wall_us_per_sample": (mon.wall_per_sample() or 0) * 1e6,
                "loads_per_sample": len(mon.cpus) * len(mon.fields) + (1 if events else 0),
                "proc_reads_per_sample": len(mon.threads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, nargs="+", default=[2, 16, 64])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--events", type=int, default=21,
                    help="8-byte event-counter columns per CPU to add (0: none)")
    args = ap.parse_args()
    print(f"{'CPUs':>5} {'vCPUs':>5} {'samples':>8} {'asked':>6} {'host CPU/sample':>16} "
          f"{'wall/sample':>12} {'loads':>6} {'/proc reads':>11}   (+{args.events} event columns/CPU)")
    for n in args.cpus:
        r = measure(n, args.seconds, args.interval, args.events)
        print(f"{r['cpus']:>5} {r['vcpus']:>5} {r['samples']:>8} {r['asked']:>6} "
              f"{r['cpu_us_per_sample']:>13.1f} us {r['wall_us_per_sample']:>9.1f} us "
              f"{r['loads_per_sample']:>6} {r['proc_reads_per_sample']:>11}", flush=True)


if __name__ == "__main__":
    main()
