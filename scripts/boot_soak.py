#!/usr/bin/env python3
"""Boot one kernel many times and tally how each boot ended: for hunting a boot failure
that shows once in dozens of boots (a hang, an early triple fault).

    scripts/boot_soak.py --kernel build:7.3 --boots 20 --cpus 2
    scripts/boot_soak.py --kernel build:7.3 --elf --boots 10      # the vmlinux, no decompressor
    scripts/svm_lane.py run -- python3 scripts/boot_soak.py --boots 20   # the plain path
    scripts/svm_lane.py run -- python3 scripts/boot_soak.py --peer qemu --boots 20

--peer qemu boots the same bzImage, command line, vCPUs and memory under QEMU
(-M microvm -accel kvm -cpu host, the lane's QEMU) instead: the control for telling a
failure of vmm from one of the host's virtualization; --peer both alternates the two,
boot by boot, under the same conditions.

Each boot waits for "Run /init" (or --until); a boot that does not get there prints
the console tail and, when the guest still runs, where each vCPU is (RIP and its kernel
symbol under the KASLR slide, run state) from a short freeze. Exits 1 when any boot
failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from vmm import Machine  # noqa: E402
from vmm.errors import VmmError  # noqa: E402
from vmm.runtime.hostsyms import host_symbol  # noqa: E402
from vmm.session import INIT_MARKER  # noqa: E402

import qemu_peer  # noqa: E402  (QEMU as the control: its command line and console read)

SMP_UP = re.compile(r"smp: Brought up \d+ nodes?, (\d+) CPUs?")
SILENCE_S = 15.0  # QEMU's boots are given up after this long without console output, as vmm's
LANE_FAULT_HOST = "__svm_vcpu_run"  # a vCPU register that points here holds L1's own state
# vmm's phrases for the same (vmm.runtime's GuestBootError; the Makefile's SVM_RERUN)
LANE_FAULT = re.compile(r"the host's own \S+ \[kvm|holds the host's state|"
                        r"CR3 0x[0-9a-f]+ is outside the guest's RAM")
# The fault's other face: an early triple fault (the Makefile's SVM_RERUN reruns both)
TRIPLE_FAULT = re.compile(r"vCPU [0-9]+: triple fault")


def _host(addr: int) -> str:
    found = host_symbol(addr)
    return f"host's {found[0]}+{found[2]:#x} [{found[1] or 'vmlinux'}]" if found else ""


def _look(m: Machine) -> str:
    """Every vCPU's registers under one short freeze, RIP and RSP also tried against the
    host's own kernel symbols (a nested host that leaks its state shows here)."""
    if not m.running:
        return "  (the VM is not running)"
    lines = []
    try:
        with m.freeze(timeout=5.0) as snap:
            for v, s in zip(m.vcpus, snap.vcpus):
                if s is None:
                    continue
                r, sr = s.regs, s.sregs
                extra = [x for x in (_host(r.rip), _host(r.rsp)) if x]
                lines.append(
                    f"  vCPU {v.index}: RIP {r.rip:#x} RSP {r.rsp:#x} RFLAGS {r.rflags:#x} "
                    f"CS {sr.cs.selector:#x} CR0 {sr.cr0:#x} CR2 {sr.cr2:#x} CR3 {sr.cr3:#x} "
                    f"CR4 {sr.cr4:#x} EFER {sr.efer:#x}" + (f" [{'; '.join(extra)}]" if extra else ""))
    except VmmError as e:
        lines.append(f"  {e}")
    return "\n".join(lines)


def _qemu_argv(args, kernel: str) -> list[str]:
    """QEMU's command line for the same boot (the bzImage, command line, vCPUs, memory
    and spin initramfs that vmm boots; -cpu host, as vmm passes the host's CPU on)."""
    from vmm import kernelstore
    from vmm.machine.builder import DEFAULT_LINUX_CMDLINE
    from vmm.machine.initramfs import build_initramfs
    from vmm.machine.layout import parse_size

    qemu_peer.QEMU = os.environ.get("VMM_QEMU") or os.environ.get("VMM_SVM_QEMU") or qemu_peer.QEMU
    if not Path(kernel).exists() or args.elf:
        kernel = str(kernelstore.resolve_kernel(args.kernel).boot_image)
    return qemu_peer.linux_boot_cmd(kernel, args.cmdline or DEFAULT_LINUX_CMDLINE, args.cpus,
                                    parse_size(args.memory) >> 20,
                                    str(build_initramfs("spin")), cpu_model="host")


def _cpus_up(console: str) -> str:
    """", 2 CPUs up" from the guest's "smp: Brought up 1 node, 2 CPUs" line: a fault-rate
    comparison is fair only between boots that ran the same number of CPUs."""
    found = SMP_UP.search(console)
    return f", {found.group(1)} CPU{'s' if found.group(1) != '1' else ''} up" if found else ""


def _qemu_boot(args, argv: list[str], i: int) -> str:
    """One boot under QEMU: "ok N s", "FAILED: ended (status S)" (QEMU exits on a triple
    fault with -no-reboot, and on panic=-1's reboot) or "FAILED: hung" (no match in time,
    or 15 s of console silence, as vmm's boots). A hung boot's vCPUs are read over QMP
    before QEMU is killed: a RIP in the host's own KVM is the lane's fault."""
    qmp_path = f"/tmp/boot-soak-{os.getpid()}-{i}.qmp"
    looks: list[str] = []

    def look() -> None:
        try:
            for r in qemu_peer.vcpu_registers(qmp_path):
                host = [x for x in (_host(r["rip"]), _host(r.get("rsp", 0))) if x]
                looks.append(f"  vCPU {r['cpu']}: RIP {r['rip']:#x} RSP {r.get('rsp', 0):#x} "
                             f"CR3 {r.get('cr3', 0):#x} CPL {r.get('cpl', '?')}"
                             + (f" [{'; '.join(host)}]" if host else ""))
        except (OSError, RuntimeError, ValueError) as e:
            looks.append(f"  (no registers over QMP: {e})")

    argv = argv + ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    try:
        outcome, value, out = qemu_peer.boot_until(argv, args.until, args.timeout,
                                                   silence=SILENCE_S, on_hang=look)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(qmp_path)
    console = out.decode(errors="replace")
    if outcome == "ok":
        return f"ok {value:.1f} s{_cpus_up(console)}"
    outcome = (f"FAILED: hung {value:.0f} s" if outcome == "hung"
               else f"FAILED: ended (status {value})")
    if any(LANE_FAULT_HOST in line for line in looks):
        outcome += " (lane fault: a vCPU holds the host's state)"
    elif outcome.startswith("FAILED: ended") and "Kernel panic" not in console:
        # -no-reboot: QEMU exits on a triple fault (a panic would have printed its line)
        outcome += " (lane fault: triple fault before init)"
    tail = "\n".join(console.splitlines()[-15:])
    print(f"--- boot {i + 1} (QEMU): {outcome}{_cpus_up(console)}; console tail:\n{tail}"
          + ("\n--- its vCPUs:\n" + "\n".join(looks) if looks else ""), flush=True)
    return outcome + _cpus_up(console)


def _vmm_boot(args, kernel: str, i: int) -> str:
    m = Machine(kernel=kernel, cpus=args.cpus, memory=args.memory, cmdline=args.cmdline,
                console=None)
    t0 = time.monotonic()
    try:
        m.start()
        m.wait_for_console(args.until, timeout=args.timeout)
        return f"ok {time.monotonic() - t0:.1f} s{_cpus_up(m.console_text())}"
    except VmmError as e:  # GuestBootError says where the vCPUs are when still running
        print(f"--- boot {i + 1}: {e}\n{m.describe_state()}", flush=True)
        for look in range(args.looks):  # does the guest move? whose address is it?
            time.sleep(1.0)
            print(f"--- boot {i + 1}, look {look + 1} (+{look + 1} s):\n{_look(m)}",
                  flush=True)
        fault = (" (lane fault: a vCPU holds the host's state)" if LANE_FAULT.search(str(e))
                 else " (lane fault: triple fault before init)" if TRIPLE_FAULT.search(str(e))
                 else "")
        return f"FAILED{fault}{_cpus_up(m.console_text())}"
    finally:
        m.stop()


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
    ap.add_argument("--peer", choices=("vmm", "qemu", "both"), default="vmm",
                    help="which VMM boots the kernel (qemu: the control; both: alternate, "
                    "vmm then QEMU, every boot)")
    ap.add_argument("--looks", type=int, default=3,
                    help="after a stalled boot, look at the vCPUs this many more times, 1 s apart")
    args = ap.parse_args()

    kernel = args.kernel
    if args.elf:
        from vmm import kernelstore

        kernel = str(kernelstore.resolve_kernel(args.kernel).vmlinux)
    peers = ["vmm", "qemu"] if args.peer == "both" else [args.peer]
    qemu_argv = _qemu_argv(args, kernel) if "qemu" in peers else []
    if qemu_argv:
        print("QEMU: " + " ".join(qemu_argv), flush=True)
    outcomes: dict[str, list[str]] = {p: [] for p in peers}
    for i in range(args.boots):
        for peer in peers:
            outcome = (_vmm_boot(args, kernel, i) if peer == "vmm"
                       else _qemu_boot(args, qemu_argv, i))
            outcomes[peer].append(outcome)
            print(f"boot {i + 1}/{args.boots} ({peer}): {outcome}", flush=True)
    failed_any = False
    for peer, got in outcomes.items():
        failed = sum(not o.startswith("ok") for o in got)
        faults = sum("lane fault" in o for o in got)
        triple = sum("triple fault" in o for o in got)
        failed_any |= bool(failed)
        times = [float(o.split()[1]) for o in got if o.startswith("ok")]
        span = f"; to {args.until!r} in {min(times):.1f}-{max(times):.1f} s" if times else ""
        up = {}
        for o in got:
            found = re.search(r"(\d+) CPUs? up", o)
            key = found.group(1) if found else "?"
            up[key] = up.get(key, 0) + 1
        cpus = ", ".join(f"{n} with {k} up" for k, n in sorted(up.items()))
        print(f"{peer}: {args.boots - failed} of {args.boots} boots ok, {failed} failed "
              f"({faults} the lane fault: {faults - triple} a vCPU with the host's state, {triple} "
              f"an early triple fault) ({kernel}, {args.cpus} vCPUs; CPUs: {cpus}){span}")
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
