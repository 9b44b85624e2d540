"""Every headline figure, side by side with QEMU on the same guest ELF (`make bench`).

    python benchmarks/run_all.py [--quick] [--skip-qemu]

Prints:
  1. boot to exit (mode=hello), ours vs QEMU (-M pc, -kernel via PVH);
  2. port-OUT exit round trip (mode=outloop, ring 0), ours vs QEMU, and the ratio;
  3. freeze latency (request -> every vCPU parked) p50/p99 and freeze+thaw round trip
     for 1, 2, 4, 8 vCPUs, ring 3 and ring 0 guests;
  4. the frozen window of cold batches: the mission batch on 2 and 1024 possible CPUs,
     2x1024 entries on 2 CPUs (bench_batch.py);
  5. QEMU's QMP stop and stop+cont round trip on the same guest, and the ratio.
Figures depend on the host: on a PVM host guest ring 0 is emulated (see README).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qemu_peer  # noqa: E402
from vmm import Machine  # noqa: E402
from vmm.kvm import is_pvm_host  # noqa: E402

GUEST = os.path.join(ROOT, "kernels/guests/out/guest.elf")
OUT_PORT = 0x601  # claimed by no device: an empty-bus port on both VMMs


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p / 100))]


def our_run_seconds(cmdline: str, cpus: int = 1) -> float:
    t0 = time.perf_counter()
    with Machine(kernel=GUEST, cpus=cpus, memory="256M", cmdline=cmdline) as m:
        ex = m.wait(timeout=600)
    if ex.reason != "exit-code":
        raise RuntimeError(f"guest did not exit cleanly: {ex}")
    return time.perf_counter() - t0


def boot_figures(repeats: int) -> None:
    ours = min(our_run_seconds("mode=hello exit=0") for _ in range(repeats))
    line = f"boot to exit (mode=hello): ours {ours * 1e3:.1f} ms"
    if qemu_peer.qemu_available():
        theirs = min(qemu_peer.run_qemu(GUEST, "mode=hello exit=0") for _ in range(repeats))
        line += f", QEMU {theirs * 1e3:.1f} ms (ratio {theirs / ours:.1f}x)"
    print(line)


def exit_figures(n: int, repeats: int) -> None:
    fmt = f"mode=outloop ring=0 port={OUT_PORT:#x} n={{n}}"
    small = min(our_run_seconds(fmt.format(n=n)) for _ in range(repeats))
    large = min(our_run_seconds(fmt.format(n=2 * n)) for _ in range(repeats))
    ours = (large - small) / n * 1e6
    line = f"port-OUT exit round trip (ring 0, n={n}): ours {ours:.2f} us/exit"
    theirs = qemu_peer.exit_cost_us(GUEST, fmt, n, 2 * n, repeats)
    if theirs is not None:
        line += f", QEMU {theirs:.2f} us/exit, ours/QEMU = {ours / theirs:.2f}"
    print(line)


def boot_loop(cpus: int, ring: int) -> Machine:
    m = Machine(kernel=GUEST, cpus=cpus, cmdline=f"mode=loop cpus={cpus} ring={ring}")
    m.start()
    m.wait_for_console(rf"{cpus} cpus up", timeout=300)
    return m


def freeze_figures(cycles: int, cpu_counts, rings) -> dict:
    results = {}
    for ring in rings:
        for cpus in cpu_counts:
            m = boot_loop(cpus, ring)
            try:
                lat, rt = [], []
                for _ in range(cycles):
                    t0 = time.perf_counter()
                    with m.freeze() as snap:
                        pass
                    rt.append(time.perf_counter() - t0)
                    lat.append(snap.latency_ns / 1e9)
            finally:
                m.stop()
            results[(ring, cpus)] = rt
            print(f"freeze ring {ring}, {cpus} vCPU(s), {cycles} cycles: "
                  f"p50 {pct(lat, 50) * 1e6:.0f} us, p99 {pct(lat, 99) * 1e6:.0f} us; "
                  f"freeze+thaw round trip p50 {pct(rt, 50) * 1e6:.0f} us, "
                  f"p99 {pct(rt, 99) * 1e6:.0f} us")
    return results


def batch_figures(repeats: int) -> None:
    """Cold batches: the frozen window at 2 and 1024 possible CPUs (bench_batch.py)."""
    import bench_batch

    bench_batch.main(["--repeats", str(repeats)])


def qmp_figures(rounds: int, cpu_counts, rings, ours: dict) -> None:
    for ring in rings:
        for cpus in cpu_counts:
            res = qemu_peer.qmp_stop_cont(GUEST, f"mode=loop cpus={cpus} ring={ring}", cpus,
                                          rounds=rounds, settle=3.0 + (20 if ring == 0 else 0))
            if res is None:
                print("QEMU not installed: no QMP figures (apt-get install qemu-system-x86)")
                return
            stop50, sc50 = pct(res["stop"], 50), pct(res["stop_cont"], 50)
            line = (f"QEMU QMP ring {ring}, {cpus} vCPU(s): stop p50 {stop50 * 1e6:.0f} us, "
                    f"stop+cont p50 {sc50 * 1e6:.0f} us, p99 {pct(res['stop_cont'], 99) * 1e6:.0f} us")
            if (ring, cpus) in ours:
                line += f"; our freeze+thaw is {sc50 / pct(ours[(ring, cpus)], 50):.0f}x faster"
            print(line)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cycles and repeats")
    ap.add_argument("--skip-qemu", action="store_true")
    args = ap.parse_args(argv)
    if args.skip_qemu:
        qemu_peer.qemu_available = lambda: False  # type: ignore[assignment]
    if not os.path.exists(GUEST):
        sys.exit("build the test guest first: make guests")
    print(f"host: {'PVM (guest ring 0 emulated)' if is_pvm_host() else 'hardware virtualization'}, "
          f"{os.cpu_count()} CPUs; QEMU: {'yes' if qemu_peer.qemu_available() else 'no'}")
    repeats = 2 if args.quick else 3
    boot_figures(repeats)
    exit_figures(5_000 if args.quick else 20_000, repeats)
    cycles = 200 if args.quick else 1000
    cpu_counts = (1, 2, 4, 8)
    ours = freeze_figures(cycles, cpu_counts, (3, 0))
    batch_figures(3 if args.quick else 7)
    qmp_figures(50 if args.quick else 200, (1, 2), (3,), ours)


if __name__ == "__main__":
    main()
