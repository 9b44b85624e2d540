"""Figures on hardware virtualization, side by side with QEMU, in one run (`make bench-svm`).

Meant to run inside the SVM lane (scripts/svm_lane.py: emulated AMD SVM under QEMU 10
TCG), where vmm and QEMU 10 `-M microvm -accel kvm` (the lane's own QEMU, visible in
L1 through the shared host root) use the same /dev/kvm.  It runs on any VMX/SVM host
too (with the system's qemu-system-x86_64 unless VMM_QEMU names another).

    python benchmarks/lane_bench.py [--rounds 3] [--cycles 200] [--qmp-rounds 100]
                                    [--skip-boot] [--skip-freeze]

Prints:
  1. boot of the same kernel + initramfs to "Run /init": vmm (split into Python import,
     image load + VM build, guest boot; vmm byte-compiled as an install leaves it) vs
     QEMU -M microvm -accel kvm -cpu host, each from exec, with the CPUs each guest
     brought up;
  2. freeze (request -> every vCPU parked) and freeze+thaw round trip, vmm, vs QMP
     stop and stop+cont, QEMU, on our test guest spinning in ring 3 at 1, 2, 4 vCPUs.
Absolute figures under emulated SVM are far above those of real hardware (every L2
exit goes through L1's KVM, itself emulated by TCG); the ratios are what carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qemu_peer  # noqa: E402  (QEMU command line and the QMP client)
from bench_freeze import percentile  # noqa: E402

GUEST = os.path.join(ROOT, "kernels/guests/out/guest.elf")
RUN_INIT = "Run /init as init process"
CPUS = 2
MEMORY_MB = 512

# The vmm side of a boot, in a fresh process so that Python start-up and imports count:
# prints monotonic timestamps (one clock for both processes) as JSON.
VMM_BOOT = r"""
import json, sys, time
t_exec = time.monotonic()
from vmm import Machine
t_import = time.monotonic()
kernel, initrd, cpus, memory = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
m = Machine(kernel=kernel, initrd=initrd, cpus=cpus, memory=memory, timeout=1200)
m.start()
t_started = time.monotonic()
m.wait_for_console(r"Run /init as init process", timeout=1200)
t_init = time.monotonic()
cmdline, console = m.cmdline, m.console_text()
m.stop()
print(json.dumps(dict(exec=t_exec, imported=t_import, started=t_started, init=t_init,
                      cmdline=cmdline, console=console)))
"""

# "smpboot: Total of N processors activated": how many CPUs the guest brought up.
CPUS_UP = re.compile(r"Total of (\d+) processors activated")


def cpus_up(console: str) -> str:
    m = CPUS_UP.search(console)
    return m.group(1) if m else "?"


def installed_python_env() -> dict:
    """The environment of vmm's boot process: vmm byte-compiled once beforehand, as `pip
    install` leaves it, into a private cache (PYTHONPYCACHEPREFIX: the checkout gets no
    __pycache__), even where PYTHONDONTWRITEBYTECODE is set. Without it every round would
    compile ~100 modules from source, which is not what a user's start-up costs."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"vmm-bench-pycache-{os.getuid()}"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "vmm")],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return env


def _kernel():
    from vmm import kernelstore as ks

    wanted = f"build-{ks.DEFAULT_BUILD_VERSION}-{ks.fragment_hash(ks.DEFAULT_FRAGMENT)}"
    for art in ks.list_kernels():
        if art.name == wanted:
            return art
    sys.exit(f"kernel {wanted} is not built: run `make kernel-build`")


def vmm_boot(kernel: str, initrd: str, env: dict) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", VMM_BOOT, kernel, initrd, str(CPUS), f"{MEMORY_MB}M"],
                         capture_output=True, text=True, cwd=ROOT, timeout=1500, env=env)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"vmm boot failed: {out.stderr[-2000:]}")
    t = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "import": t["imported"] - t0,  # exec + interpreter start + `from vmm import Machine`
        "load": t["started"] - t["imported"],  # Machine(): image load, VM build, vCPUs started
        "guest": t["init"] - t["started"],  # the guest's own boot to "Run /init"
        "total": t["init"] - t0,
        "cmdline": t["cmdline"],
        "cpus_up": cpus_up(t["console"]),
    }


def qemu_boot(kernel: str, initrd: str, cmdline: str) -> tuple[float, str]:
    """Seconds from exec to "Run /init" on QEMU's serial console (same kernel, initrd,
    command line, vCPUs and memory as vmm's boot; `-cpu host`, the CPU vmm's guest gets),
    and how many CPUs its guest brought up."""
    cmd = qemu_peer.linux_boot_cmd(kernel, cmdline, CPUS, MEMORY_MB, initrd, cpu_model="host")
    outcome, value, out = qemu_peer.boot_until(cmd, re.escape(RUN_INIT), timeout=1500)
    text = out.decode(errors="replace")
    if outcome != "ok":
        tail = "".join(text.splitlines(keepends=True)[-20:])
        raise RuntimeError(f"QEMU {outcome} before {RUN_INIT!r}: {tail}")
    return value, cpus_up(text)


def _round(spec: str, kernel: str, initrd: str, env: dict, r: int) -> tuple[dict, tuple | None]:
    """One round: vmm's boot, then QEMU's. A boot that fails (the lane's emulator fault
    now and then ends a guest, QEMU's as well as ours) is tried once more, and said."""
    for attempt in (1, 2):
        try:
            v = vmm_boot(spec, initrd, env)
            q = qemu_boot(kernel, initrd, v["cmdline"]) if qemu_peer.qemu_available() else None
            return v, q
        except RuntimeError as e:
            if attempt == 2:
                raise
            print(f"   round {r}: {str(e).splitlines()[0][:160]}; the round runs again", flush=True)
    raise AssertionError("unreachable")


def boot_figures(rounds: int) -> None:
    from vmm.machine.initramfs import build_initramfs

    art = _kernel()
    kernel, initrd = str(art.boot_image), str(build_initramfs("spin"))
    print(f"\n1. boot to {RUN_INIT!r}: {art.name} ({os.path.basename(kernel)}, our "
          f"sched_ext build), spin initramfs, {CPUS} vCPUs, {MEMORY_MB} MiB; {rounds} rounds")
    print(f"   {'round':5} {'vmm total':>10} {'= import':>9} {'+ load':>8} {'+ guest':>8}"
          f"   {'QEMU microvm':>12}   vmm/QEMU   (seconds; CPUs each guest brought up)")
    # vmm loads it as `vmm run --kernel build:7.3` does (the store's entry: the image and
    # its vmlinux are known, nothing is searched); QEMU gets the same bzImage file.
    from vmm import kernelstore as ks
    spec = f"build:{ks.DEFAULT_BUILD_VERSION}"
    print(f"   vmm: Machine(kernel={spec!r}); QEMU: -kernel {kernel}")
    env = installed_python_env()
    bare = []
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        bare.append(time.monotonic() - t0)
    print(f"   vmm's import column includes the interpreter's own start-up: `python -c pass` "
          f"takes {min(bare):.2f} s here (this environment's site hooks included)")
    ours, theirs = [], []
    for r in range(1, rounds + 1):
        v, q = _round(spec, kernel, initrd, env, r)
        ours.append(v)
        theirs.append(q)
        qs = f"{q[0]:12.2f} ({q[1]})" if q is not None else f"{'-':>12}"
        ratio = f"   {v['total'] / q[0]:.2f}" if q is not None else ""
        print(f"   {r:5d} {v['total']:10.2f} {v['import']:9.2f} {v['load']:8.2f} {v['guest']:8.2f}"
              f" ({v['cpus_up']})   {qs}{ratio}", flush=True)
    print(f"   vmm command line: {ours[0]['cmdline']}")
    if all(q is not None for q in theirs):
        tv, tg, tq = ([v["total"] for v in ours], [v["guest"] for v in ours],
                      [q[0] for q in theirs])  # fmt: skip
        print(f"   median (best): vmm {statistics.median(tv):.2f} ({min(tv):.2f}) s from exec, "
              f"guest boot alone {statistics.median(tg):.2f} ({min(tg):.2f}) s; "
              f"QEMU {statistics.median(tq):.2f} ({min(tq):.2f}) s from exec")
        # The lane's speed drifts from minute to minute (L1 under TCG): each round's two
        # boots run back to back, so their ratio is the fairer figure.
        print(f"   vmm/QEMU per round (last column): geometric mean "
              f"{statistics.geometric_mean([a / b for a, b in zip(tv, tq)]):.2f}")
        if any(q[1] != str(CPUS) for q in theirs):
            print(f"   QEMU's guest did not bring up all {CPUS} CPUs: SeaBIOS (microvm's firmware) "
                  f"listed fewer in its MP table; its figure is for a smaller SMP bring-up")


def _freeze_loop(cpus: int, cycles: int) -> tuple[list[float], list[float]]:
    from vmm import Machine

    m = Machine(kernel=GUEST, cpus=cpus, cmdline=f"mode=loop cpus={cpus} ring=3")
    m.start()
    try:
        m.wait_for_console(rf"{cpus} cpus up", timeout=600)
        time.sleep(0.5)
        lat, rt = [], []
        for _ in range(cycles):
            t0 = time.perf_counter()
            with m.freeze() as snap:
                pass
            rt.append(time.perf_counter() - t0)
            lat.append(snap.latency_ns / 1e9)
            time.sleep(0.001)  # let the guest run between cycles
    finally:
        m.stop()
    return lat, rt


def freeze_figures(cycles: int, qmp_rounds: int, cpu_counts=(1, 2, 4)) -> None:
    print(f"\n2. freeze vs QMP stop, test guest spinning in ring 3 (mode=loop ring=3); vmm "
          f"{cycles} cycles, QEMU {qmp_rounds} rounds; microseconds, p50 / p99")
    print(f"   {'vCPUs':5} {'vmm freeze':>15} {'freeze+thaw':>15}   {'QMP stop':>15} "
          f"{'stop+cont':>15}   {'round trip: vmm faster by':>25}")
    for cpus in cpu_counts:
        lat, rt = _freeze_loop(cpus, cycles)
        res = qemu_peer.qmp_stop_cont(GUEST, f"mode=loop cpus={cpus} ring=3", cpus,
                                      rounds=qmp_rounds, settle=10.0)  # fmt: skip

        def pp(v):
            return f"{percentile(v, 50) * 1e6:7.0f}/{percentile(v, 99) * 1e6:<7.0f}"

        line = f"   {cpus:5d} {pp(lat):>15} {pp(rt):>15}   "
        if res is None:
            line += "QEMU not available"
        else:
            ratio = statistics.median(res["stop_cont"]) / statistics.median(rt)
            line += f"{pp(res['stop']):>15} {pp(res['stop_cont']):>15}   {ratio:24.1f}x"
        print(line, flush=True)


def describe_host() -> str:
    from vmm.kvm import is_pvm_host

    lane = os.environ.get("VMM_SVM_LANE")
    if lane:
        return f"SVM lane: {lane}"
    return "PVM (guest ring 0 emulated)" if is_pvm_host() else "hardware virtualization"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="boot rounds (each side)")
    ap.add_argument("--cycles", type=int, default=200, help="freeze cycles per vCPU count")
    ap.add_argument("--qmp-rounds", type=int, default=100)
    ap.add_argument("--skip-boot", action="store_true")
    ap.add_argument("--skip-freeze", action="store_true")
    args = ap.parse_args(argv)
    # The QEMU to compare with: the lane's QEMU 10 (the lane exports its path), else VMM_QEMU,
    # else the system's.
    qemu_peer.QEMU = os.environ.get("VMM_QEMU") or os.environ.get("VMM_SVM_QEMU") or qemu_peer.QEMU
    qemu_version = "not available"
    if qemu_peer.qemu_available():
        out = subprocess.run([qemu_peer.QEMU, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"version (\S+)", out)
        qemu_version = m.group(1) if m else "?"
    print(f"host: {describe_host()}; {os.cpu_count()} CPUs")
    print(f"peer: QEMU {qemu_version} ({qemu_peer.QEMU}), -M microvm -accel kvm")
    t0 = time.monotonic()
    if not args.skip_boot:
        boot_figures(args.rounds)
    if not args.skip_freeze:
        freeze_figures(args.cycles, args.qmp_rounds)
    print(f"\n(lane_bench: {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
