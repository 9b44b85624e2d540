"""vmcore dump throughput and host memory, on our test guest (`python benchmarks/bench_vmcore.py`).

    python benchmarks/bench_vmcore.py [--memory 5G] [--dirty-mib 256]

Boots the test guest with the given RAM, dirties part of it (written from the host
while frozen, random bytes: they cannot become holes), dumps a vmcore into a temporary
directory, and prints the dump time, bytes written vs holes, the file's disk use and
how much the process's peak RSS grew while dumping (the dump streams: it should not
approach the guest's RAM).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vmm import Machine  # noqa: E402
from vmm.cli import parse_size  # noqa: E402

GUEST = os.path.join(ROOT, "kernels/guests/out/guest.elf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", default="5G")
    ap.add_argument("--dirty-mib", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, \
            Machine(GUEST, cpus=2, memory=args.memory, cmdline="mode=loop cpus=2",
                    timeout=300, console=None) as m:
        m.wait_for_console("2 cpus up", timeout=60)
        chunk = os.urandom(1 << 20)
        with m.freeze():
            for i in range(args.dirty_mib):  # above the guest's own 64 MiB
                m.memory.write((64 << 20) + (i << 20), chunk)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        rep = m.dump_core(os.path.join(tmp, "vmcore"))
        dt = time.perf_counter() - t0
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        disk = os.stat(rep.path).st_blocks * 512
        print(f"guest RAM {parse_size(args.memory) >> 20} MiB, {args.dirty_mib} MiB dirtied: "
              f"dump {dt:.2f} s ({rep.ram_bytes / dt / 2**30:.1f} GiB/s scanned), "
              f"{(rep.ram_bytes - rep.hole_bytes) >> 20} MiB written, "
              f"{rep.hole_bytes >> 20} MiB holes, {disk >> 20} MiB on disk, "
              f"peak RSS +{grown >> 10} MiB")
        m.stop()


if __name__ == "__main__":
    main()
