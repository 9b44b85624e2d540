#!/usr/bin/env python3
"""Boot one kernel many times and tally how each boot ended: for hunting a boot failure
that shows once in dozens of boots (a hang, an early triple fault).

    scripts/boot_soak.py --kernel build:7.3 --boots 20 --cpus 2
    scripts/boot_soak.py --kernel build:7.3 --elf --boots 10      # the vmlinux, no decompressor
    scripts/svm_lane.py run -- python3 scripts/boot_soak.py --boots 20   # the plain path

Each boot waits for "Run /init" (or --until); a boot that does not get there prints
the console tail and, when the guest still runs, where each vCPU is (RIP and its kernel
symbol under the KASLR slide, run state) from a short freeze. Exits 1 when any boot
failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmm import Machine  # noqa: E402
from vmm.errors import VmmError  # noqa: E402
from vmm.session import INIT_MARKER  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default="build:7.3", help="a store spec or an image path")
    ap.add_argument("--elf", action="store_true",
                    help="boot the store entry's vmlinux ELF instead of its bzImage")
    ap.add_argument("--boots", type=int, default=10)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--cmdline", default=None, help="replace the default command line")
    ap.add_argument("--until", default=INIT_MARKER, help="console regex that means booted")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per boot")
    args = ap.parse_args()

    kernel = args.kernel
    if args.elf:
        from vmm import kernelstore

        kernel = str(kernelstore.resolve_kernel(args.kernel).vmlinux)
    outcomes = []
    for i in range(args.boots):
        m = Machine(kernel=kernel, cpus=args.cpus, memory=args.memory, cmdline=args.cmdline,
                    console=None)
        t0 = time.monotonic()
        try:
            m.start()
            m.wait_for_console(args.until, timeout=args.timeout)
            outcome = f"ok {time.monotonic() - t0:.1f} s"
        except VmmError as e:  # GuestBootError says where the vCPUs are when still running
            outcome = "FAILED"
            print(f"--- boot {i + 1}: {e}\n{m.describe_state()}", flush=True)
        finally:
            m.stop()
        outcomes.append(outcome)
        print(f"boot {i + 1}/{args.boots}: {outcome}", flush=True)
    failed = sum(o == "FAILED" for o in outcomes)
    times = [float(o.split()[1]) for o in outcomes if o != "FAILED"]
    span = f"; to {args.until!r} in {min(times):.1f}-{max(times):.1f} s" if times else ""
    print(f"{args.boots - failed} of {args.boots} boots ok, {failed} failed ({kernel}, "
          f"{args.cpus} vCPUs){span}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
