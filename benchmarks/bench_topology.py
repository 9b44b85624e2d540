"""Boot time and freeze latency by topology: for presets of 2, 8, 16 and 64 vCPUs, the
seconds from start to the boot marker ("Run /init as init process" for Linux, "N cpus
up" for our test guest) and the freeze rendezvous' p50/p99 (m.freeze(): request -> every
vCPU parked), then how the p50 grows per vCPU.

With more vCPUs than host cores the freeze is oversubscribed (a vCPU thread must be
scheduled to park): the figures say so rather than hide it.

    python benchmarks/bench_topology.py [--kernel build:7.3] [--cycles 200]
                                        [--presets smt-pair,numa2-smt,numa2-llc4-smt,numa4-llc16-smt]
    python benchmarks/bench_topology.py --kernel guest     # our test guest (no Linux boot)

Linux needs VMX/SVM (or the SVM lane) to boot many vCPUs in reasonable time: on a PVM
host every vCPU's ring 0 is emulated, and an 8-vCPU boot took over 13 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vmm import Machine, topology  # noqa: E402

GUEST = os.path.join(ROOT, "kernels/guests/out/guest.elf")
DEFAULT_PRESETS = "smt-pair,numa2-smt,numa2-llc4-smt,numa4-llc16-smt"  # 2, 8, 16, 64 vCPUs


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def measure(kernel: str, preset: str, cycles: int, timeout: float):
    t = topology.parse(preset)
    if kernel == "guest":
        running = t.cpus  # the test guest starts up to 64 CPUs, APIC ID = CPU index
        m = Machine(kernel=GUEST, topology=t, cmdline=f"mode=loop cpus={running}")
        marker = f"{running} cpus up"
    else:
        m = Machine(kernel=kernel, topology=t, memory="1G")
        marker = "Run /init as init process"
    t0 = time.monotonic()
    with m:
        m.wait_for_console(marker, timeout=timeout)
        boot_s = time.monotonic() - t0
        freeze_us = []
        for _ in range(cycles):
            with m.freeze() as snap:
                freeze_us.append(snap.latency_ns / 1e3)
            time.sleep(0.002)  # let the guest run between cycles
    return t.cpus, boot_s, freeze_us


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="build:7.3", help="a kernel spec or path, or 'guest'")
    ap.add_argument("--presets", default=DEFAULT_PRESETS)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    host_cores = os.cpu_count()
    print(f"kernel {args.kernel}; host cores {host_cores}; {args.cycles} freezes each")
    print(f"{'preset':18} {'spec':10} {'vCPUs':>5} {'boot s':>8} {'freeze p50 us':>14} {'p99 us':>9}")
    rows = []
    for preset in args.presets.split(","):
        cpus, boot_s, freeze_us = measure(args.kernel, preset, args.cycles, args.timeout)
        p50, p99 = percentile(freeze_us, 50), percentile(freeze_us, 99)
        rows.append((cpus, p50))
        over = " (oversubscribed)" if cpus > host_cores else ""
        print(f"{preset:18} {topology.parse(preset).spec:10} {cpus:>5} {boot_s:>8.2f} "
              f"{p50:>14.1f} {p99:>9.1f}{over}", flush=True)
    if len(rows) > 1:
        (c0, f0), (c1, f1) = rows[0], rows[-1]
        print(f"freeze p50 grows {(f1 - f0) / (c1 - c0):.1f} us per added vCPU "
              f"({c0} -> {c1} vCPUs: {f0:.1f} -> {f1:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
