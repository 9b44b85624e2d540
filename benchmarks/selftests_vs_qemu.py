"""The kernel's sched_ext selftests under vmm and under QEMU 10, side by side.

Meant for the SVM lane (scripts/svm_lane.py), where both use L1's /dev/kvm: the same
kernel, the same guest-job initramfs (the runner, its libraries, the stamped command of
vmm.scxselftests.guest_command), the same vCPUs and memory and command line; QEMU is
``-M microvm -accel kvm -cpu host`` (benchmarks/qemu_peer.py), its serial console read
until the job's ``vmm-job: exit N`` line.

    scripts/svm_lane.py run -- python3 benchmarks/selftests_vs_qemu.py \\
        [--kernel build:7.3+scx] [--filter PATTERN] [--cpus 2]

Prints both tables, then every test whose verdict differs, with the reason where one is
known (DIFFERENCES below: a device QEMU's guest has and ours does not, and why the
test needs it); an unexplained difference makes the exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qemu_peer  # noqa: E402  (QEMU command line and console reading)

# test name -> why its verdict differs between vmm and QEMU (empty: none known).
DIFFERENCES: dict[str, str] = {}


def qemu_results(kernel: str, pattern, cpus: int, memory_mb: int, timeout: float):
    from vmm import kernelstore as ks
    from vmm.machine.builder import DEFAULT_LINUX_CMDLINE
    from vmm.machine.guestjob import build_job_initramfs
    from vmm.scxselftests import build_runner, guest_command, parse_output, select

    runner = build_runner(kernel, progress=None)
    initrd = build_job_initramfs(guest_command(pattern=pattern), runner.includes())
    art = ks.resolve_kernel(kernel)
    cmd = qemu_peer.linux_boot_cmd(str(art.boot_image), DEFAULT_LINUX_CMDLINE, cpus, memory_mb,
                                   str(initrd), cpu_model="host")
    t0 = time.monotonic()
    outcome, _, out = qemu_peer.boot_until(cmd, r"vmm-job: exit \d+", timeout=timeout,
                                           silence=300)
    text = out.decode(errors="replace")
    results, finished = parse_output(text, select(runner.tests, pattern))
    if not finished:
        print(f"QEMU: {outcome} before the runner's end; its last lines:\n"
              + "\n".join(text.splitlines()[-20:]))
    return results, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default="build:7.3+scx")
    ap.add_argument("--filter", default=None)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory-mb", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=1500)
    args = ap.parse_args()
    # The lane's QEMU 10 (the lane exports its path), else VMM_QEMU, else the system's.
    qemu_peer.QEMU = os.environ.get("VMM_QEMU") or os.environ.get("VMM_SVM_QEMU") or qemu_peer.QEMU
    if not qemu_peer.qemu_available():
        sys.exit(f"{qemu_peer.QEMU} not found: apt-get install qemu-system-x86 (make deps)")
    from vmm.cli_scx import run_selftests
    from vmm.scxselftests import format_table

    ours = run_selftests(args.kernel, pattern=args.filter, cpus=args.cpus,
                         memory=f"{args.memory_mb}M")
    theirs, qemu_s = qemu_results(args.kernel, args.filter, args.cpus, args.memory_mb, args.timeout)
    print(f"vmm ({ours.kernel}, {args.cpus} vCPUs, {args.memory_mb} MiB; {ours.boots} boot(s), "
          f"{ours.seconds:.0f} s):\n{format_table(ours.results)}\n")
    print(f"QEMU 10 -M microvm -accel kvm -cpu host (same kernel, initramfs, vCPUs; "
          f"{qemu_s:.0f} s):\n{format_table(theirs)}\n")
    theirs_by = {r.name: r for r in theirs}
    unexplained = 0
    print("differences:")
    for r in ours.results:
        q = theirs_by.get(r.name)
        if q is None or q.status == r.status:
            continue
        why = DIFFERENCES.get(r.name)
        unexplained += why is None
        print(f"  {r.name}: vmm {r.status}, QEMU {q.status}: {why or 'UNEXPLAINED'}")
        if why is None:
            for side, res in (("vmm", r), ("QEMU", q)):
                print("\n".join(f"    {side} | {line}" for line in res.output[-8:]))
    if not unexplained and all(theirs_by.get(r.name) and theirs_by[r.name].status == r.status
                               for r in ours.results):
        print("  none: every test has the same verdict")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
