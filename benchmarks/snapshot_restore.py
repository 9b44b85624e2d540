"""Boot once, fork many: restore-to-running vs a cold boot, host memory per clone, and
snapshot time and size, side by side in one run.

    python benchmarks/snapshot_restore.py [--kernel PATH|SPEC] [--memory 512M,2G]
                                          [--clones 1,4,16] [--cpus 2]

Default kernel: our test guest (kernels/guests/out/guest.elf, work loops in ring 0), its
marker "2 cpus up". A Linux kernel (e.g. build:7.3) uses "Run /init" as the marker.

- cold boot: Machine(...).start() to the marker on the console.
- restore: Machine.from_snapshot(snapshot) until it returns running (vCPU threads in
  KVM_RUN), then until the guest shows progress (the test guest: every CPU's counter
  moved; Linux: jiffies moved).
- restore, VM made ahead: the same through Machine.clone_pool, whose thread made the
  VM, irqchip, PIT and vCPUs before the clone was asked for (left out of the figure).
- RSS per clone: this process's RSS (anonymous and file-backed, /proc/self/status)
  added by N running clones of one snapshot, after each ran 1 s, divided by N.
- snapshot: m.snapshot(dir) time, memory.raw's apparent size and the disk it uses.
- matrix (--matrix N): N runs of the mission (inject_scx_clock on every CPU, its
  read-back checked) end to end, each on a fresh boot vs each on a clone of one
  snapshot (its boot counted). --scheduler NAME (a Linux kernel with sched_ext) attaches
  that scheduler of the kernel's tree in the guest before the marker, so every run
  injects under an attached scheduler.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vmm import Machine  # noqa: E402
from vmm.errors import GuestBootError  # noqa: E402

GUEST = os.path.join(ROOT, "kernels/guests/out/guest.elf")


def rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


SCHED_MARKER = "vmm-bench: scheduler attached"


def make(kernel: str, cpus: int, memory: str, scheduler: str | None = None) -> tuple[Machine, str]:
    if kernel == GUEST:
        return Machine(kernel=kernel, cpus=cpus, memory=memory,
                       cmdline=f"mode=loop cpus={cpus} ring=0"), f"{cpus} cpus up"
    if scheduler:
        from vmm.scxbuild import build_scheduler

        built = build_scheduler(scheduler, kernel, progress=None)
        name = f"scx_{scheduler.removeprefix('scx_')}"
        job = (f"{name} > /tmp/sched.log 2>&1 & "
               f"until [ \"$(cat /sys/kernel/sched_ext/state)\" = enabled ]; "
               f"do sleep 0.1; done; echo '{SCHED_MARKER}'; while :; do sleep 1; done")
        return Machine(kernel=kernel, cpus=cpus, memory=memory, console=None, exec=job,
                       include=[f"{built.binary}:/bin/{name}"]), SCHED_MARKER
    return Machine(kernel=kernel, cpus=cpus, memory=memory), "Run /init"


def mission(m: Machine) -> None:
    result = m.inject_scx_clock()
    if not result.ok:
        raise SystemExit(f"the injection did not hold:\n{result.describe()}")


def matrix(kernel: str, cpus: int, memory: str, runs: int, scheduler: str | None) -> None:
    what = f"{runs} runs of inject_scx_clock" + (f" under scx_{scheduler}" if scheduler else "")
    t0 = time.monotonic()
    for _ in range(runs):
        m, marker = make(kernel, cpus, memory, scheduler)
        m.start()
        m.wait_for_console(marker, timeout=1200)
        mission(m)
        m.stop()
    boots = time.monotonic() - t0
    t0 = time.monotonic()
    m, marker = make(kernel, cpus, memory, scheduler)
    m.start()
    m.wait_for_console(marker, timeout=1200)
    snap = m.snapshot()
    m.stop()
    first = time.monotonic() - t0
    for _ in range(runs):
        c = Machine.from_snapshot(snap)
        mission(c)
        c.stop()
    clones = time.monotonic() - t0
    snap.close()
    print(f"\n== matrix: {what}, {kernel}, {cpus} vCPU(s), {memory} ==")
    print(f"a fresh boot per run:           {boots:10.2f} s ({boots / runs * 1e3:.0f} ms a run)")
    print(f"a clone per run (boot+snapshot {first:.2f} s included): {clones:10.2f} s "
          f"({(clones - first) / runs * 1e3:.0f} ms a run, {boots / clones:.1f}x faster end to end)")


def progress(m: Machine, kernel: str, cpus: int):
    if kernel == GUEST:
        return tuple(m.read("runqueues", "counter", cpu=c, hot=True) for c in range(cpus))
    return m.read("jiffies_64")  # a cold read: its freeze gives the KASLR slide (LSTAR)


def moved(a, b) -> bool:
    return all(y > x for x, y in zip(a, b)) if isinstance(a, tuple) else b > a


def wait_progress(m: Machine, kernel: str, cpus: int, timeout: float = 60.0) -> None:
    start = progress(m, kernel, cpus)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if moved(start, progress(m, kernel, cpus)):
            return
        time.sleep(0.0005)
    raise SystemExit("the clone shows no progress")


def cold_boot(kernel: str, cpus: int, memory: str, tries: int = 3):
    """(machine at its marker, seconds): a boot the SVM lane's emulator fault stopped
    (vmm names it: a vCPU holding the host's state) is tried again, up to `tries`."""
    for attempt in range(tries):
        m, marker = make(kernel, cpus, memory)
        t0 = time.monotonic()
        m.start()
        try:
            m.wait_for_console(marker, timeout=1200)
            return m, marker, time.monotonic() - t0
        except GuestBootError as e:
            m.stop()
            if "holds the host's state" not in str(e) or attempt == tries - 1:
                raise
            print(f"cold boot {attempt + 1}: the lane's emulator fault; booting again")


def one_size(kernel: str, cpus: int, memory: str, clones: list[int]) -> None:
    m, marker, cold = cold_boot(kernel, cpus, memory)
    wait_progress(m, kernel, cpus)
    with tempfile.TemporaryDirectory(prefix="vmm-snap-") as d:
        path = os.path.join(d, "snap")
        t0 = time.monotonic()
        snap = m.snapshot(path)
        snap_s = time.monotonic() - t0
        st = os.stat(os.path.join(path, "memory.raw"))
        print(f"\n== {kernel}, {cpus} vCPU(s), {memory} ==")
        print(f"cold boot to {marker!r}:        {cold * 1e3:10.1f} ms")
        print(f"snapshot to a directory:        {snap_s * 1e3:10.1f} ms, memory.raw "
              f"{st.st_size >> 20} MiB apparent, {st.st_blocks * 512 / 2**20:.1f} MiB on disk")
        m.stop()
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            c = Machine.from_snapshot(snap)
            t1 = time.monotonic()
            wait_progress(c, kernel, cpus)
            t2 = time.monotonic()
            c.stop()
            times.append((t1 - t0, t2 - t0))
        times.sort()
        run_s, prog_s = times[len(times) // 2]
        print(f"restore to running (median/5):  {run_s * 1e3:10.1f} ms "
              f"({cold / run_s:.0f}x faster than the cold boot)")
        print(f"restore to guest progress:      {prog_s * 1e3:10.1f} ms")
        # The same with the VM, irqchip and vCPUs made ahead on the pool's thread (as a
        # test matrix has them: made while the previous clone ran); the making is left out.
        pooled = []
        with Machine.clone_pool(snap) as pool:
            for _ in range(5):
                pool.wait_ready(60)
                t0 = time.monotonic()
                c = pool.clone()
                pooled.append(time.monotonic() - t0)
                c.stop()
        pooled.sort()
        pool_s = pooled[len(pooled) // 2]
        print(f"restore, VM made ahead (pool):  {pool_s * 1e3:10.1f} ms "
              f"({cold / pool_s:.0f}x faster than the cold boot; clone_pool, median/5)")
        t0 = time.monotonic()
        type(snap).load(path).close()
        print(f"open+verify the directory:      {(time.monotonic() - t0) * 1e3:10.1f} ms")
        for n in clones:
            before = rss_kib()
            running = [Machine.from_snapshot(snap) for _ in range(n)]
            time.sleep(1.0)
            for c in running:
                wait_progress(c, kernel, cpus)
            after = rss_kib()
            for c in running:
                c.stop()
            per = {k: (after[k] - before[k]) / n for k in after}
            print(f"{n:2d} clone(s) running 1 s: RSS per clone {per['VmRSS'] / 1024:7.1f} MiB "
                  f"(anon {per['RssAnon'] / 1024:.1f}, file {per['RssFile'] / 1024:.1f}) of "
                  f"{memory} guest RAM")
        snap.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default=GUEST)
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--clones", default="1,4,16")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--matrix", type=int, default=0, metavar="N",
                    help="also N runs of the mission: fresh boots vs clones")
    ap.add_argument("--scheduler", help="attach this scheduler of the kernel's tree (Linux)")
    ap.add_argument("--skip-sizes", action="store_true", help="only the matrix")
    args = ap.parse_args()
    clones = [int(x) for x in args.clones.split(",") if x]
    if not args.skip_sizes:
        for memory in args.memory.split(","):
            one_size(args.kernel, args.cpus, memory, clones)
    if args.matrix:
        matrix(args.kernel, args.cpus, args.memory.split(",")[0], args.matrix, args.scheduler)


if __name__ == "__main__":
    main()
