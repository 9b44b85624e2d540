"""Debian's gdb on real Linux through our stub (slow; VMX/SVM: `make test-svm` runs it in
the SVM lane): boot our 7.3 sched_ext build (2 vCPUs, KASLR on: the plain path's
default), load the vmlinux at the slide the stub names, hbreak on the scheduler tick,
continue, hit it, name the pc, read per-CPU variables, step one instruction, hit it
again, watch jiffies_64 change, detach: the guest's job goes on printing to the console.

    make kernel-build && python -m pytest tests/test_gdb_linux.py -m slow -s
"""

import errno
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from guest_abi import built_kernel_spec, gdb_batch
from vmm.kvm.pvm import is_pvm_host
from vmm.session import INIT_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.kvm,
              pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="needs /dev/kvm"),
              pytest.mark.skipif(is_pvm_host(), reason=(
                  "needs VMX/SVM: the guest job that shows the guest running on after "
                  "detach makes system calls (on our machines: the SVM lane, make test-svm)")),
              pytest.mark.skipif(shutil.which("gdb") is None,
                                 reason="gdb is not installed (scripts/install-deps.sh)")]

BOOT_TIMEOUT = 900
# `break` (Z0: int3 in the text, KVM_GUESTDBG_USE_SW_BP) is the usual command on hardware.
# In the SVM lane QEMU's TCG emulation of SVM does not turn an int3 into the #BP intercept
# KVM asks for: the stub saw no debug exit and the guest's own int3 handler oopsed. So
# the lane uses `hbreak` (Z1, DR0: a #DB, which it does intercept); VMM_GDB_BREAK=break
# runs `break` on real VMX/SVM hosts. Z0 itself is tested fast on PVM (test_gdb_guest).
HBREAK = os.environ.get("VMM_GDB_BREAK", "hbreak")
# A busy job (the tick keeps running on its CPU: NO_HZ_IDLE stops it on idle ones) that
# says it is alive on the console now and then.
JOB = ("n=0; while true; do echo alive-$n; n=$((n+1)); i=0; "
       "while [ $i -lt 3000 ]; do i=$((i+1)); done; done")


def _loopback(port: int) -> None:
    """gdb reaches the stub over 127.0.0.1. A machine whose loopback interface is down
    (the SVM lane's L1 brings up no network at all) gets it brought up, as root."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        return
    except OSError as exc:
        if exc.errno != errno.ENETUNREACH:
            raise
    ip = shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if os.geteuid() != 0 or ip is None:
        pytest.skip("the loopback interface is down (ENETUNREACH on 127.0.0.1) and this "
                    "test cannot bring it up (needs root and `ip`)")
    subprocess.run([ip, "link", "set", "dev", "lo", "up"], check=True)
    socket.create_connection(("127.0.0.1", port), timeout=10).close()


def test_gdb_breaks_in_the_kernel_reads_per_cpu_and_detaches():
    from vmm import Machine, kernelstore

    spec = built_kernel_spec()
    vmlinux = str(kernelstore.resolve_kernel(spec).vmlinux)
    m = Machine(spec, cpus=2, exec=JOB, console=None, timeout=BOOT_TIMEOUT + 600)
    t0 = time.monotonic()
    m.start()
    try:
        m.wait_for_console(INIT_MARKER, timeout=BOOT_TIMEOUT)
        m.wait_for_console(r"alive-\d+", timeout=300)
        print(f"\nthe guest job runs {time.monotonic() - t0:.1f} s after the start", flush=True)
        stub = m.gdb_server()
        try:
            _loopback(stub.port)  # (a bare connection: the stub serves it and lets go)
            load = stub.symbol_file_command(vmlinux)
            slide = int(load.split()[2], 16)
            print(f"\n{load}")
            if "nokaslr" not in m.cmdline.split():
                assert m.live().kaslr.source == "lstar"  # slide from LSTAR, cross-checked
            cmds = ["set pagination off", "set confirm off", load,
                    f"target remote 127.0.0.1:{stub.port}",
                    HBREAK + " sched_tick", "continue",
                    "info symbol $pc", "p/x $pc",
                    "p/x __per_cpu_offset[1]",
                    "p/x *(unsigned long *)((unsigned long)&this_cpu_off + __per_cpu_offset[1])",
                    "p *(int *)((unsigned long)&cpu_number + __per_cpu_offset[1])",
                    "stepi", "info symbol $pc",
                    "continue", "info symbol $pc", "info threads",
                    "delete", "watch jiffies_64", "continue", "delete",
                    "detach"]
            text = gdb_batch(cmds, timeout=600)
            print(text)
            print(f"gdb took {time.monotonic() - t0:.1f} s since the start", flush=True)
        finally:
            stub.close()
        # The breakpoint was hit in the kernel, at the symbol gdb knows through the slide.
        assert re.search(r"Breakpoint 1, (0x[0-9a-f]+ in )?sched_tick \(\)", text), text
        assert text.count("sched_tick in section .text") == 2, text
        assert re.search(r"sched_tick \+ \d+ in section \.text", text), text  # stepped
        pc = int(re.search(r"\$1 = (0x[0-9a-f]+)", text).group(1), 16)
        sym = m.kernel_image.symbols.lookup("sched_tick").address
        assert pc == (sym + slide) & (2**64 - 1)
        # Per-CPU: CPU 1's this_cpu_off holds CPU 1's offset; its cpu_number is 1.
        off = re.search(r"\$2 = (0x[0-9a-f]+)", text).group(1)
        assert re.search(rf"\$3 = {off}\b", text), text
        assert re.search(r"\$4 = 1\b", text), text
        assert "vCPU 0" in text and "vCPU 1" in text
        # A hardware watchpoint (DR0 as a write watch) on the tick's jiffies_64.
        assert re.search(r"Hardware watchpoint 2: jiffies_64\s+Old value = \d+\s+"
                         r"New value = \d+", text), text
        assert "Detaching from program" in text or "detached" in text, text
        assert stub.breakpoints == {} and m.exits.debugger is None
        # The guest runs on: the job prints again.
        m.wait_for_console(r"alive-\d+", timeout=120, start=m.console_position())
        assert m.exit is None
    finally:
        m.stop()
