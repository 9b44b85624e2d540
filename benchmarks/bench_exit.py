"""Cost of one port-OUT VM exit round trip (guest -> KVM -> this VMM -> guest).

measure_exit_roundtrip(target, n) -> microseconds per exit, reusable by other scripts:
  - target = bytes: tiny real-mode guest code placed at 0x1000, which must loop on
    `out %al,(%dx)` (DX = port); each exit is dispatched to a Python handler, and the
    figure is the time between the handler's first and (n+1)-th call divided by n.
  - target = path to a test-guest ELF (kernels/guests, mode=outloop): booted twice
    through vmm.runtime.Machine with n and 2n port writes; the figure is the time
    difference divided by n, so boot cost cancels out.
measure_fast_path(n): the same for the COM1 fast path, handled in C without Python.

    python benchmarks/bench_exit.py [--n 20000] [--kernel kernels/guests/out/guest.elf]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny guests live with the tests

from test_kvm_guests import OUT_LOOP, RecordingHandler, TinyVm  # noqa: E402

BENCH_PORT = 0x80


class _CountingHandler(RecordingHandler):
    def __init__(self, n):
        super().__init__()
        self.n = n
        self.count = 0
        self.t_first = self.t_last = None
        self.done = threading.Event()

    def io_out(self, i, port, size, value):
        self.count += 1
        if self.count == 1:
            self.t_first = time.perf_counter()
        elif self.count == self.n + 1:
            self.t_last = time.perf_counter()
            self.done.set()


def _measure_code(code: bytes, n: int) -> float:
    with TinyVm(code, port=BENCH_PORT) as g:
        h = _CountingHandler(n)
        g.start(h)
        if not h.done.wait(max(60.0, n * 1e-3)):
            raise RuntimeError(f"guest made only {h.count} of {n + 1} exits")
    return (h.t_last - h.t_first) / n * 1e6


def _machine_seconds(kernel: str, n: int, ring: int) -> float:
    from vmm.runtime import Machine

    cmdline = f"mode=outloop n={n} port={BENCH_PORT} ring={ring}"
    t0 = time.perf_counter()
    with Machine(kernel=kernel, cpus=1, memory="64M", cmdline=cmdline, console=None) as m:
        ex = m.wait(timeout=600)
    if ex.reason != "exit-code":
        raise RuntimeError(f"guest did not exit cleanly: {ex}")
    return time.perf_counter() - t0


def measure_exit_roundtrip(target, n: int = 10_000, ring: int = 3) -> float:
    """Microseconds per port-OUT exit round trip (see the module docstring)."""
    if isinstance(target, (bytes, bytearray)):
        return _measure_code(bytes(target), n)
    kernel = os.fspath(target)
    return (_machine_seconds(kernel, 2 * n, ring) - _machine_seconds(kernel, n, ring)) / n * 1e6


def measure_fast_path(seconds: float = 1.0) -> float:
    """Microseconds per COM1 OUT exit handled in C (the console fast path)."""
    with TinyVm(OUT_LOOP, port=0x3F8) as g:
        g.vm.set_serial_fast(True)
        from vmm.runtime import ConsolePump

        pump = ConsolePump(g.vm, lambda b: None)
        pump.start()
        g.start(RecordingHandler())
        time.sleep(0.1)
        v = g.vcpus[0].native
        e0, t0 = v.fast_exits, time.perf_counter()
        time.sleep(seconds)
        e1, t1 = v.fast_exits, time.perf_counter()
        pump.stop()
    return (t1 - t0) / max(e1 - e0, 1) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--kernel", help="test-guest ELF (mode=outloop) to measure through Machine")
    args = ap.parse_args(argv)
    from vmm.kvm import is_pvm_host

    print(f"host: {'PVM (ring 0 emulated)' if is_pvm_host() else 'hardware virtualization'}")
    us = measure_exit_roundtrip(OUT_LOOP, args.n)
    print(f"port-OUT exit, dispatched to Python, real-mode guest: {us:.2f} us/exit (n={args.n})")
    us = measure_fast_path()
    print(f"COM1 OUT exit, handled in C (fast path), real-mode guest: {us:.2f} us/exit")
    if args.kernel:
        for ring in (0, 3):
            us = measure_exit_roundtrip(args.kernel, args.n, ring)
            print(f"port-OUT exit through Machine, {args.kernel} ring {ring}: {us:.2f} us/exit")


if __name__ == "__main__":
    main()
