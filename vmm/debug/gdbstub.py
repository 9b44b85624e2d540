"""A GDB remote-protocol stub over the frozen guest: gdb's `target remote` on vmm.

    stub = machine.gdb_server(port=1234)     # listens on 127.0.0.1:1234, a thread
    $ gdb vmlinux -ex 'target remote :1234'
    (gdb) p jiffies ; p init_uts_ns.name.release ; info threads ; thread 2 ; bt
    (gdb) set var some_global = 5            # a checked cold write (vmm.ops), while frozen
    (gdb) continue   ... Ctrl-C              # thaw ... freeze again (one rendezvous each)

When gdb connects every vCPU is frozen (one vmm freeze); each vCPU is a gdb thread
(id = vCPU index + 1) with the registers of the freeze snapshot. Memory reads go
through our kernel-virtual translation (image map, direct map, else a page walk from
the selected vCPU's CR3); memory writes are cold Op batches (vmm.ops), so they are
resolved and checked like every other write. `continue` thaws; an interrupt (Ctrl-C)
freezes again. Not supported, and refused so gdb says so: breakpoints and watchpoints
(a software breakpoint would write int3 into kernel text behind the kernel's back),
single-step, and register writes.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any, Optional

from vmm.errors import VmmError

# The i386:x86-64 'g' packet without a target description: 16 GPRs and rip (8 bytes),
# eflags, cs, ss, ds, es, fs, gs (4 bytes), then x87 (8 x 10), its control words
# (8 x 4), xmm0-15 (16 x 16) and mxcsr (4), which we report as unavailable ('x').
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
UNAVAILABLE_BYTES = 8 * 10 + 8 * 4 + 16 * 16 + 4
SIGTRAP, SIGINT = 5, 2


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(payload: bytes) -> bytes:
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def registers_hex(vcpu: Any) -> bytes:
    """The 'g' reply for one frozen vCPU (a vmm.runtime VcpuSnapshot)."""
    r, s = vcpu.regs, vcpu.sregs
    out = b"".join(struct.pack("<Q", getattr(r, n) & (2**64 - 1)) for n in GPRS)
    out += struct.pack("<I", r.rflags & 0xFFFFFFFF)
    out += b"".join(struct.pack("<I", getattr(s, n).selector) for n in SEGS)
    return out.hex().encode() + b"xx" * UNAVAILABLE_BYTES


class GdbStub:
    """Serves one gdb at a time on ``host:port`` (port 0: any free port, see .port)."""

    def __init__(self, machine: Any, host: str = "127.0.0.1", port: int = 0):
        self.machine = machine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.snapshot: Any = None
        self.thread_g = 1  # gdb thread id selected for registers/memory
        self.closed = False
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._serve, name=f"vmm-gdbstub:{self.port}",
                                        daemon=True)
        self._thread.start()

    # --- connection -----------------------------------------------------------------
    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        self._thread.join(5.0)

    def _serve(self) -> None:
        self.sock.settimeout(0.5)
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                self._session(conn)
            except (OSError, VmmError) as exc:
                self.error = exc
            finally:
                self._thaw()
                conn.close()

    def _freeze(self) -> None:
        if self.snapshot is None:
            self.snapshot = self.machine.freeze()

    def _thaw(self) -> None:
        if self.snapshot is not None:
            snap, self.snapshot = self.snapshot, None
            snap.__exit__(None, None, None)

    def _session(self, conn: socket.socket) -> None:
        self._freeze()
        buf = b""
        running = False
        conn.settimeout(0.2)
        while not self.closed:
            if running and self.machine.exit is not None:
                conn.sendall(frame(b"W%02x" % (self.machine.exit.exit_code & 0xFF)))
                return
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            buf += data
            while buf:
                if buf[:1] in (b"+", b"-"):
                    buf = buf[1:]
                    continue
                if buf[:1] == b"\x03":  # interrupt: freeze every vCPU
                    buf = buf[1:]
                    if running:
                        self._freeze()
                        running = False
                        conn.sendall(frame(self._stop_reply(SIGINT)))
                    continue
                start = buf.find(b"$")
                end = buf.find(b"#", start)
                if start < 0:
                    buf = b""
                    break
                if end < 0 or len(buf) < end + 3:
                    break  # wait for the rest
                payload = buf[start + 1:end]
                buf = buf[end + 3:]
                conn.sendall(b"+")
                reply, running_now = self._handle(payload)
                if running_now:
                    running = True
                    continue  # the stop reply comes on interrupt or VM end
                if reply is None:  # detach / kill
                    conn.sendall(frame(b"OK"))
                    return
                conn.sendall(frame(reply))

    # --- packets ----------------------------------------------------------------------
    def _vcpu(self, tid: Optional[int] = None) -> Any:
        snap = self.snapshot
        index = (tid or self.thread_g) - 1
        if snap is None or not 0 <= index < len(snap.vcpus) or snap.vcpus[index] is None:
            raise VmmError(f"no frozen vCPU for gdb thread {tid or self.thread_g}")
        return snap.vcpus[index]

    def _stop_reply(self, signal: int) -> bytes:
        return b"T%02xthread:%x;" % (signal, self.thread_g)

    def _threads(self) -> list[int]:
        return [i + 1 for i, v in enumerate(self.snapshot.vcpus) if v is not None]

    def _handle(self, p: bytes) -> tuple[Optional[bytes], bool]:
        try:
            return self._dispatch(p)
        except VmmError:
            return b"E0e", False  # EFAULT-like: gdb prints "Cannot access memory"
        except (ValueError, IndexError):
            return b"E16", False  # EINVAL: a malformed packet

    def _dispatch(self, p: bytes) -> tuple[Optional[bytes], bool]:
        c = p[:1]
        if p.startswith(b"qSupported"):
            return b"PacketSize=4000", False
        if p == b"?":
            return self._stop_reply(SIGTRAP), False
        if p in (b"qAttached",):
            return b"1", False
        if p == b"qC":
            return b"QC%x" % self.thread_g, False
        if p == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % t for t in self._threads()), False
        if p == b"qsThreadInfo":
            return b"l", False
        if p.startswith(b"qThreadExtraInfo,"):
            tid = int(p.split(b",")[1], 16)
            return f"vCPU {tid - 1}".encode().hex().encode(), False
        if p.startswith(b"qSymbol"):
            return b"OK", False
        if c == b"H":
            tid = int(p[2:], 16) if p[2:] not in (b"", b"-1", b"0") else None
            if p[1:2] == b"g" and tid:
                self._vcpu(tid)
                self.thread_g = tid
            return b"OK", False
        if c == b"T":
            self._vcpu(int(p[1:], 16))
            return b"OK", False
        if c == b"g":
            return registers_hex(self._vcpu()), False
        if c == b"p":
            n = int(p[1:], 16)
            regs = registers_hex(self._vcpu())
            if n < len(GPRS):
                return regs[16 * n:16 * n + 16], False
            if n < len(GPRS) + 1 + len(SEGS):
                at = 16 * len(GPRS) + 8 * (n - len(GPRS))
                return regs[at:at + 8], False
            return b"x" * 8, False
        if c == b"m":
            addr, length = (int(x, 16) for x in p[1:].split(b","))
            return self._read(addr, min(length, 0x1000)).hex().encode(), False
        if c == b"M":
            where, data = p[1:].split(b":", 1)
            addr, length = (int(x, 16) for x in where.split(b","))
            raw = bytes.fromhex(data.decode())
            if len(raw) != length:
                raise ValueError("length mismatch")
            self._write(addr, raw)
            return b"OK", False
        if c == b"c" or p.startswith(b"vCont;c"):
            self._thaw()
            return None, True
        if p == b"vCont?":
            return b"vCont;c", False
        if c in (b"D", b"k"):
            return None, False
        if c in (b"Z", b"z", b"s", b"G", b"P") or p.startswith(b"vCont;s"):
            return b"E01", False  # see the module docstring
        return b"", False  # unsupported: gdb falls back or says so

    # --- memory -----------------------------------------------------------------------
    def _live(self) -> Any:
        return self.machine.live(self.snapshot)

    def _read(self, addr: int, n: int) -> bytes:
        live = self._live()
        vcpu = self._vcpu()
        if vcpu.sregs.cr3 and live.cr3 != vcpu.sregs.cr3:
            live.cr3 = vcpu.sregs.cr3  # page walks in the selected vCPU's address space
        return live.read_kva(addr, n)

    def _write(self, addr: int, data: bytes) -> None:
        from vmm.ops import KernelTarget as T, KernelValue as V, Op

        # A 4- or 8-byte write is one store of that width (as gdb's `set var` means it).
        value = (V.u32(int.from_bytes(data, "little")) if len(data) == 4 else
                 V.u64(int.from_bytes(data, "little")) if len(data) == 8 else V.bytes(data))
        self.machine.apply(Op.WriteKernelCold([(T.kva(addr, len(data)), value)]))
