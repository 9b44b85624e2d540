"""QEMU as the peer in side-by-side benchmarks, on the same guest ELF as ours.

- ``exit_cost_us``: per port-write exit cost, from two runs of the guest's ``outloop``
  mode with different write counts (the difference cancels boot and teardown).
- ``qmp_stop_cont``: QMP ``stop`` and ``stop``+``cont`` round trips on a running guest.

Both need ``qemu-system-x86_64`` (Debian package qemu-system-x86); they return None
when it is missing so the caller can say so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Callable, Optional

QEMU = "qemu-system-x86_64"


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def _base_cmd(kernel: str, cmdline: str, cpus: int = 1, memory_mb: int = 256) -> list[str]:
    # microvm: QEMU's leanest machine (no firmware, no PCI), the fairest peer for a
    # micro-VMM; -cpu host aborts on PVM hosts (MSR 0x10a cannot be set).
    return [QEMU, "-accel", "kvm", "-M", "microvm", "-m", str(memory_mb),
            "-smp", str(cpus), "-nographic", "-no-reboot", "-display", "none",
            "-serial", "null", "-monitor", "none", "-nodefaults",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", kernel, "-append", cmdline]


def linux_boot_cmd(kernel: str, cmdline: str, cpus: int, memory_mb: int, initrd: str,
                   cpu_model: Optional[str] = None) -> list[str]:
    """_base_cmd for a Linux boot whose serial console is QEMU's stdout, with an initrd
    (and ``-cpu cpu_model`` when given: "host" needs VMX/SVM)."""
    cmd = _base_cmd(kernel, cmdline, cpus, memory_mb)
    cmd[cmd.index("-serial") + 1] = "stdio"
    cmd += ["-initrd", initrd] + (["-cpu", cpu_model] if cpu_model else [])
    return cmd


def boot_until(cmd: list[str], pattern: str, timeout: float, silence: Optional[float] = None,
               on_hang: Optional[Callable[[], None]] = None) -> tuple[str, float, bytes]:
    """Runs QEMU and reads its console (stdout) until the regex ``pattern``; then kills
    it. ("ok", seconds from exec, output), ("ended", exit status, output) when QEMU
    exits first (a triple fault under -no-reboot, a reboot) or ("hung", seconds, output)
    at ``timeout``, or after ``silence`` seconds without console output once the guest
    has printed something (vmm's own boots are given up the same way). ``on_hang`` runs
    while the hung QEMU still lives (to read its registers over QMP)."""
    import re
    import select

    until = re.compile(pattern.encode())
    t0 = last = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    out = b""
    try:
        while (now := time.monotonic()) - t0 < timeout:
            if silence is not None and out and now - last > silence:
                break
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return "ended", proc.wait(), out
            out += chunk
            last = time.monotonic()
            if until.search(out):
                return "ok", last - t0, out
        if on_hang is not None:
            on_hang()
        return "hung", time.monotonic() - t0, out
    finally:
        proc.kill()
        proc.wait()


def vcpu_registers(qmp_path: str, timeout: float = 10.0) -> list[dict[str, int]]:
    """Every vCPU's RIP, RSP, CR3 and CPL from a running QEMU's monitor (``info
    registers -a`` over QMP at ``qmp_path``): [{"cpu", "rip", "rsp", "cr3", "cpl"}]."""
    import re

    qmp = Qmp(qmp_path, timeout=timeout)
    try:
        text = qmp.command("human-monitor-command",
                           {"command-line": "info registers -a"}).get("return", "")
    finally:
        qmp.close()
    found = []
    for block in re.split(r"(?m)^CPU#", text)[1:]:
        fields = dict(re.findall(r"\b(RIP|RSP|CR3|CPL)=([0-9a-fA-F]+)", block))
        if "RIP" in fields:
            found.append({"cpu": int(block.split(None, 1)[0]),
                          **{k.lower(): int(v, 16 if k != "CPL" else 10) for k, v in fields.items()}})
    return found


def run_qemu(kernel: str, cmdline: str, cpus: int = 1, timeout: float = 300,
             exit_code: int = 0) -> float:
    """Wall seconds from exec to exit for one guest run that ends with ``exit_code``
    through isa-debug-exit (QEMU's status is then (code << 1) | 1)."""
    started = time.perf_counter()
    proc = subprocess.run(_base_cmd(kernel, cmdline, cpus), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=timeout, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != ((exit_code << 1) | 1) & 0xFF:
        raise RuntimeError(f"QEMU run failed (status {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-300:]}")
    return elapsed


def exit_cost_us(kernel: str, cmdline_fmt: str, n_small: int, n_large: int,
                 repeats: int = 3) -> Optional[float]:
    """Microseconds per exit: (t(n_large) - t(n_small)) / (n_large - n_small), best of
    ``repeats`` for each length. ``cmdline_fmt`` has ``{n}`` for the write count."""
    if not qemu_available():
        return None
    small = min(run_qemu(kernel, cmdline_fmt.format(n=n_small)) for _ in range(repeats))
    large = min(run_qemu(kernel, cmdline_fmt.format(n=n_large)) for _ in range(repeats))
    return (large - small) / (n_large - n_small) * 1e6


class Qmp:
    """A minimal QMP client over a unix socket (greeting, capabilities, commands)."""

    def __init__(self, path: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb", buffering=0)
        self._read_reply()  # greeting
        self.command("qmp_capabilities")

    def _read_reply(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP socket closed")
            msg = json.loads(line)
            if "event" not in msg:  # skip STOP/RESUME events
                return msg

    def command(self, name: str, arguments: Optional[dict] = None) -> dict:
        msg = {"execute": name, **({"arguments": arguments} if arguments else {})}
        self.file.write(json.dumps(msg).encode() + b"\n")
        reply = self._read_reply()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply

    def close(self) -> None:
        self.sock.close()


def qmp_stop_cont(kernel: str, cmdline: str, cpus: int, rounds: int = 200,
                  settle: float = 2.0) -> Optional[dict]:
    """Latencies (seconds) of QMP stop and of stop+cont, on a guest left running."""
    if not qemu_available():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        cmd = _base_cmd(kernel, cmdline, cpus) + ["-qmp", f"unix:{sock},server=on,wait=off"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            qmp = Qmp(sock)
            time.sleep(settle)  # let the guest boot into its loop
            stops, rounds_t = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                qmp.command("stop")
                t1 = time.perf_counter()
                qmp.command("cont")
                t2 = time.perf_counter()
                stops.append(t1 - t0)
                rounds_t.append(t2 - t0)
            qmp.close()
            return {"stop": stops, "stop_cont": rounds_t}
        finally:
            proc.kill()
            proc.wait()
