"""The mission batch's frozen window: how long the guest stays frozen for one cold batch.

    python benchmarks/bench_batch.py [--repeats 7] [--guest kernels/guests/out/guest.elf]

For each case one test guest boots (`mode=loop cpus=2 possible=P`; CPUs 2..P-1 are
possible but never run, their per-CPU `runqueues` live in the guest's direct map, like
Linux's embedded first chunk) and `Machine.apply(Op.WriteKernelCold(batch))` runs
`--repeats` times. Cases:

  mission, 2 CPUs       per CPU: U64 scx.clock then OrU32 SCX_RQ_CLK_VALID into scx.flags
  2x1024, 2 CPUs        scx.clock + scx.flags 1024 times on each of 2 CPUs (4 distinct targets)
  mission, 1024 CPUs    the mission batch on 1024 possible CPUs: 2 x 1024 distinct targets

Printed per case (min and median over the repeats, microseconds):
  frozen    freeze request -> thaw (C clock: stamped just before the coordinator's
            freeze() is called, FreezeCoordinator's vmm_thaw stamps vm.native.thaw_ns)
  park      of which the rendezvous itself: request -> every vCPU parked
  inside    OpResult.apply_seconds: resolve/validate/apply inside the rendezvous
  total     Machine.apply end to end (pre-freeze resolution included)
It measures through Machine.apply only, so the same script measures an older tree
(copy it there) for before/after figures on the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vmm import KernelTarget as T, KernelValue as V, Machine, Op  # noqa: E402
from vmm.kvm.native import native  # noqa: E402

GUEST = os.path.join(ROOT, "kernels/guests/out/guest.elf")
CLOCK = 0x1234_5678_9ABC


def mission_batch(cpus, mask, clock=CLOCK):
    batch = []
    for cpu in cpus:
        batch.append((T.per_cpu("runqueues", cpu, "scx.clock"), V.u64(clock + cpu)))
        batch.append((T.per_cpu("runqueues", cpu, "scx.flags"), V.or_u32(mask)))
    return batch


def repeated_batch(mask, per_cpu=1024):
    batch = []
    for i in range(per_cpu):
        for cpu in (0, 1):
            batch.append((T.per_cpu("runqueues", cpu, "scx.clock"), V.u64(CLOCK + i)))
            batch.append((T.per_cpu("runqueues", cpu, "scx.flags"), V.or_u32(mask)))
    return batch[:2 * per_cpu]


class FrozenWindow:
    """Stamps the C clock just before each freeze request of machine ``m``."""

    def __init__(self, m):
        self.m = m
        self.requested_ns = 0
        coord = m.coordinator
        original = coord.freeze
        _, self.lib = native()

        def stamped(timeout=30.0):
            if coord.depth == 0:
                self.requested_ns = self.lib.vmm_now_ns()
            return original(timeout)

        coord.freeze = stamped

    def last_us(self) -> float:
        return (self.m.vm.native.thaw_ns - self.requested_ns) / 1e3


def run_case(guest, name, possible, make_batch, repeats, profile=False):
    m = Machine(kernel=guest, cpus=2, cmdline=f"mode=loop cpus=2 possible={possible}",
                console=None)
    m.start()
    try:
        m.wait_for_console(r"2 cpus up", timeout=300)
        mask = m.kernel_image.enum("SCX_RQ_CLK_VALID")
        cpus = m.possible_cpus()  # also the freeze whose registers later batches reuse
        if len(cpus) != possible:
            raise SystemExit(f"guest reports {len(cpus)} possible CPUs, expected {possible}: "
                             "rebuild the guest (make guests)")
        batch = make_batch(cpus, mask)
        window = FrozenWindow(m)
        frozen, park, inside, total = [], [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = m.apply(Op.WriteKernelCold(batch))
            total.append((time.perf_counter() - t0) * 1e6)
            frozen.append(window.last_us())
            park.append(m.coordinator.snapshot.latency_ns / 1e3)
            inside.append(result.apply_seconds * 1e6)
        if profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            m.apply(Op.WriteKernelCold(batch))
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
        last = cpus[-1]
        got = (m.read("runqueues", "scx.clock", cpu=last), m.read("runqueues", "scx.flags", cpu=last))
        if not got[1] & mask:
            raise SystemExit(f"{name}: CPU {last} flags {got[1]:#x} lack the flag: batch not applied")
    finally:
        m.stop()

    def fmt(v):
        return f"{min(v):7.0f} {statistics.median(v):7.0f}"

    print(f"{name:19} {len(batch):5d} | {fmt(frozen)} | {fmt(park)} | {fmt(inside)} | "
          f"{fmt(total)}", flush=True)
    return {"frozen": frozen, "park": park, "inside": inside, "total": total,
            "entries": len(batch)}


CASES = {
    "mission-2": ("mission, 2 CPUs", 2, lambda cpus, mask: mission_batch(cpus, mask)),
    "repeat-2": ("2x1024, 2 CPUs", 2, lambda cpus, mask: repeated_batch(mask)),
    "mission-1024": ("mission, 1024 CPUs", 1024, lambda cpus, mask: mission_batch(cpus, mask)),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--guest", default=GUEST)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--profile", action="store_true", help="cProfile one more apply per case")
    ap.add_argument("--python-apply", action="store_true",
                    help="apply the staged plan entry by entry in Python, not in one C call")
    args = ap.parse_args(argv)
    if not os.path.exists(args.guest):
        sys.exit("build the test guest first: make guests")
    if args.python_apply:
        from vmm.ops import plan
        plan.USE_NATIVE = False
    print(f"cold batch (Machine.apply(Op.WriteKernelCold)), {args.repeats} repeats, guest "
          f"{os.path.relpath(args.guest)}; microseconds, min and median")
    print(f"{'case':19} {'entries':>5} | {'frozen':>15} | {'park':>15} | {'inside':>15} | "
          f"{'total':>15}")
    out = {}
    for key in args.cases.split(","):
        name, possible, make = CASES[key]
        out[key] = run_case(args.guest, name, possible, make, args.repeats, args.profile)
    return out


if __name__ == "__main__":
    main()
