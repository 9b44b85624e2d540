"""A GDB remote-protocol stub over the frozen guest: gdb's `target remote` on vmm.

    stub = machine.gdb_server(port=1234)     # listens on 127.0.0.1:1234, a thread
    $ gdb -ex 'symbol-file -o 0xSLIDE vmlinux' -ex 'target remote :1234'
    (gdb) p jiffies ; p init_uts_ns.name.release ; info threads ; thread 2 ; bt
    (gdb) set var some_global = 5            # a checked cold write (vmm.ops), while frozen
    (gdb) break sched_tick ; continue        # thaw ... a vCPU hits it: freeze again
    (gdb) stepi ; hbreak f ; watch jiffies   # one vCPU steps; DR0-3 break/watchpoints
    (gdb) monitor slide                      # the symbol-file line for this boot's KASLR

When gdb connects every vCPU is frozen (one vmm freeze); each vCPU is a gdb thread
(id = vCPU index + 1) with the registers of the freeze snapshot. Memory reads go
through our kernel-virtual translation (image map, direct map, else a page walk from
the selected vCPU's CR3); memory writes are cold Op batches (vmm.ops), so they are
resolved and checked like every other write. `continue` thaws; an interrupt (Ctrl-C)
freezes again.

Breakpoints and single-step use KVM_SET_GUEST_DEBUG (vmm.kvm.Vcpu.set_guest_debug):
- Z0 (software): 0xCC written to the instruction's guest-physical byte (our kernel-virtual
  translation), the original byte kept and put back on z0, detach, kill, close and a
  dropped connection; memory reads show the original bytes. With KVM_GUESTDBG_USE_SW_BP
  an int3 exits to us; an int3 that is not ours (the kernel's own text patching) is given
  back to the guest (KVM_GUESTDBG_INJECT_BP).
- PVM hosts (vmm.kvm.pvm): an int3 at CPL 0 cannot be emulated and arrives as an
  internal error, which the machine asks us about first: breakpoints in the kernel work
  without USE_SW_BP, which we leave off there (PVM turns a CPL 3 #BP it intercepts into a
  triple fault). Guest user code (CPL 3, native under PVM) gets no breakpoints and no
  single-step from PVM (its #DB goes to the guest): a step there is refused
  (`monitor why` says so); kernel code gets all three.
- Z1 (hardware, execute), Z2 (write) and Z4 (access) watchpoints: DR0-DR3 and DR7 through
  KVM_GUESTDBG_USE_HW_BP, on every vCPU; Z3 (read only) does not exist on x86: refused.
- s / vCont;s:N: KVM_GUESTDBG_SINGLESTEP on that vCPU alone; every other vCPU is held in
  the C run loop (it does not enter the guest) until the step's debug exit, then the
  whole machine is frozen again. A `;c` for the other threads is ignored (they stay put).
  A step may land in an interrupt handler (the guest's timer), as on real hardware.
- A debug exit parks the whole machine (our freeze) and gdb gets `T05thread:N;` with
  `swbreak:`, `hwbreak:` or `watch:`/`awatch:ADDR` (advertised in qSupported), so gdb
  does not adjust the pc: it is the breakpoint's address. gdb steps over a breakpoint
  itself (it removes it, steps that thread, inserts it again).
- Guest debugging is switched off on every vCPU on detach (D), kill (k), a dropped
  connection and close(), with every breakpoint byte restored: the guest runs on.

KASLR: gdb cannot learn the slide from the remote protocol for a vmlinux (qOffsets moves
only .text/.data/.bss), so load the symbols with `symbol-file -o SLIDE vmlinux` (or
`add-symbol-file -o`); `monitor slide` and `vmm gdb` print that line for this boot, and
`GdbStub.symbol_file_command()` returns it. With `nokaslr` the slide is 0.

Register writes (G/P) are refused.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any, Optional

from vmm.debug.guest_debug import DR7_LEN, GuestDebug
from vmm.errors import VmmError
from vmm.hostio import LOOPBACK, listen_tcp
from vmm.kvm.pvm import is_pvm_host

# The i386:x86-64 'g' packet without a target description: 16 GPRs and rip (8 bytes),
# eflags, cs, ss, ds, es, fs, gs (4 bytes), then x87 (8 x 10), its control words
# (8 x 4), xmm0-15 (16 x 16) and mxcsr (4), which we report as unavailable ('x').
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
UNAVAILABLE_BYTES = 8 * 10 + 8 * 4 + 16 * 16 + 4
SIGTRAP, SIGINT = 5, 2
# The target description: only the architecture, so that gdb needs no `set architecture`
# (nor an exec file) and uses its default x86-64 register layout, which 'g' follows.
TARGET_XML = (b'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
              b"<target><architecture>i386:x86-64</architecture></target>")


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

    def __init__(self, machine: Any, host: str = LOOPBACK, port: int = 0):
        self.machine = machine
        self.sock = listen_tcp(port, host)  # loopback unless the caller names an address
        self.port = self.sock.getsockname()[1]
        self.snapshot: Any = None
        self.thread_g = 1  # gdb thread id selected for registers/memory
        self.thread_c = 0  # gdb thread id for s/c (Hc); 0 or -1: any (then thread_g)
        self.closed = False
        self.error: Optional[BaseException] = None
        self.last_refusal = ""  # why the last Z/s was refused (also in the E reply's log)
        # Breakpoints, DR0-DR3 slots, the step, and the debug exits they cause.
        self.debug = GuestDebug(machine)
        self._thread = threading.Thread(target=self._serve, name=f"vmm-gdbstub:{self.port}",
                                        daemon=True)
        self._thread.start()

    # --- connection -----------------------------------------------------------------
    @property
    def breakpoints(self) -> dict[int, tuple[int, int]]:
        """Software breakpoints: kernel virtual address -> (gpa, original byte)."""
        return self.debug.breakpoints

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
                self._detach()
                conn.close()

    def _freeze(self) -> None:
        if self.snapshot is None:
            self.snapshot = self.machine.freeze()

    def _thaw(self) -> None:
        if self.snapshot is not None:
            snap, self.snapshot = self.snapshot, None
            snap.__exit__(None, None, None)

    def _detach(self) -> None:
        """Leaves the guest as gdb found it: breakpoint bytes restored, guest debugging
        off on every vCPU, nothing held; then thaws. Runs on D, k, a dropped connection
        and close()."""
        try:
            if self.debug.attached and self.machine.exit is None:
                try:
                    self._freeze()
                except VmmError:
                    pass  # the VM ended meanwhile: nothing left to clean
            self.debug.clear(frozen=self.snapshot is not None)
        finally:
            if getattr(self.machine, "exits", None) is not None \
                    and self.machine.exits.debugger is self.debug:
                # m.watch's watchpoints stay armed: their hits go to the shared DR allocator
                self.machine.exits.debugger = self.debug.dr.when_detached()
            self._thaw()

    def _session(self, conn: socket.socket) -> None:
        self._freeze()
        self.debug.attached = True
        self.machine.exits.debugger = self.debug
        buf = b""
        running = False
        conn.settimeout(0.05)
        while not self.closed:
            if running and self.machine.exit is not None:
                conn.sendall(frame(b"W%02x" % (self.machine.exit.exit_code & 0xFF)))
                return
            if running and self.debug.pending():
                conn.sendall(frame(self._stop_after_event()))
                running = False
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
                        conn.sendall(frame(self._stop_after_interrupt()))
                        running = False
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
                    continue  # the stop reply comes on a debug exit, interrupt or VM end
                if reply is None:  # detach / kill
                    self._detach()
                    conn.sendall(frame(b"OK"))
                    return
                conn.sendall(frame(reply))

    # --- stops ------------------------------------------------------------------------
    def _stop_after_event(self) -> bytes:
        self._freeze()
        event = self.debug.take_event()
        self.debug.step_done()
        if event is None:
            return self._stop_reply(SIGTRAP)
        index, suffix = event
        self.thread_g = index + 1
        return self._stop_reply(SIGTRAP) + suffix.encode()

    def _stop_after_interrupt(self) -> bytes:
        self._freeze()
        if self.debug.pending():  # a debug exit raced the interrupt: report it instead
            event = self.debug.take_event()
            if event is not None:
                self.debug.step_done()
                self.thread_g = event[0] + 1
                return self._stop_reply(SIGTRAP) + event[1].encode()
        self.debug.step_done()
        return self._stop_reply(SIGINT)

    # --- resuming ---------------------------------------------------------------------
    def _resume(self, step: Optional[int] = None) -> tuple[Optional[bytes], bool]:
        """Continue (step None) or single-step vCPU ``step`` with the others held."""
        if self.debug.pending():  # a watchpoint another vCPU hit at the last stop: report it now
            event = self.debug.take_event()
            if event is not None:
                self.thread_g = event[0] + 1
                return self._stop_reply(SIGTRAP) + event[1].encode(), False
        if step is not None and is_pvm_host() and self._vcpu(step + 1).sregs.cs.selector & 3:
            self.last_refusal = (f"vCPU {step} is in guest user mode (CPL 3), which PVM runs "
                                 "natively: it cannot single-step there (the guest would get "
                                 "the #DB); step kernel code, or use a host with VMX/SVM")
            return b"E01", False
        try:
            self.debug.prepare_resume(step)
        except VmmError as exc:
            self.last_refusal = str(exc)
            return b"E01", False
        self._thaw()
        return None, True

    # --- breakpoints ------------------------------------------------------------------
    def _breakpoint(self, insert: bool, p: bytes) -> bytes:
        kind, addr, size = p[1:].split(b",")[:3]
        z, kva, length = int(kind), int(addr, 16), int(size.split(b";")[0], 16)
        if z == 0:
            if insert:
                self.debug.insert_sw(kva, self._live_for_vcpu().kva_to_gpa)
            else:
                self.debug.remove_sw(kva)
            return b"OK"
        if z == 3 or z not in (1, 2, 4):
            return b""  # x86 cannot watch reads alone: gdb says it is not supported
        length = 1 if z == 1 else length
        if length not in DR7_LEN or kva % length:
            return b"E16"
        refusal = self.debug.set_hw(insert, z, kva, length)
        if refusal:
            self.last_refusal = refusal
            return b"E1c"  # ENOSPC
        return b"OK"

    def symbol_file_command(self, vmlinux: str = "vmlinux") -> str:
        """The gdb command that loads ``vmlinux`` at this boot's KASLR slide."""
        slide = self._live().slide if self.snapshot is not None else self._slide_frozen()
        return f"symbol-file -o {slide:#x} {vmlinux}"

    def _slide_frozen(self) -> int:
        with self.machine.freeze() as snap:
            return self.machine.live(snap).slide

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
        except VmmError as exc:
            self.last_refusal = str(exc)
            return b"E0e", False  # EFAULT-like: gdb prints "Cannot access memory"
        except (ValueError, IndexError, KeyError):
            return b"E16", False  # EINVAL: a malformed packet

    def _step_thread(self, tid: Optional[int]) -> int:
        tid = tid if tid not in (None, 0, -1) else (
            self.thread_c if self.thread_c not in (0, -1) else self.thread_g)
        self._vcpu(tid)
        return tid - 1

    def _vcont(self, p: bytes) -> tuple[Optional[bytes], bool]:
        step = None
        for action in p[len(b"vCont;"):].split(b";"):
            what, _, tid = action.partition(b":")
            if what[:1] in (b"s", b"S"):
                step = self._step_thread(int(tid, 16) if tid else None)
                break  # first match wins; the others stay held while it steps
            if what[:1] in (b"c", b"C"):
                break
            return b"", False  # r (range step), t: not supported
        if step is not None:
            self.thread_g = step + 1
        return self._resume(step)

    def _dispatch(self, p: bytes) -> tuple[Optional[bytes], bool]:
        c = p[:1]
        if p.startswith(b"qSupported"):
            return b"PacketSize=4000;swbreak+;hwbreak+;qXfer:features:read+", False
        if p.startswith(b"qXfer:features:read:target.xml:"):
            offset, length = (int(x, 16) for x in p.split(b":")[4].split(b","))
            chunk = TARGET_XML[offset:offset + length]
            return (b"m" if offset + length < len(TARGET_XML) else b"l") + chunk, False
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
        if p.startswith(b"qRcmd,"):
            return self._monitor(bytes.fromhex(p[6:].decode()).decode().strip()), False
        if c == b"H":
            tid = int(p[2:], 16) if p[2:] not in (b"", b"-1", b"0") else None
            if p[1:2] == b"g" and tid:
                self._vcpu(tid)
                self.thread_g = tid
            if p[1:2] == b"c":
                if tid:
                    self._vcpu(tid)
                self.thread_c = tid or 0
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
        if p == b"vCont?":
            return b"vCont;c;C;s;S", False
        if p.startswith(b"vCont;"):
            return self._vcont(p)
        if c in (b"c", b"C"):  # c [addr] / C sig[;addr]: resuming elsewhere is refused
            if (c == b"c" and len(p) > 1) or b";" in p:
                return b"E01", False
            return self._resume(None)
        if c in (b"s", b"S"):
            if (c == b"s" and len(p) > 1) or b";" in p:
                return b"E01", False
            self.thread_g = self._step_thread(None) + 1
            return self._resume(self.thread_g - 1)
        if c in (b"Z", b"z"):
            return self._breakpoint(c == b"Z", p), False
        if c in (b"D", b"k"):
            return None, False
        if c in (b"G", b"P"):
            return b"E01", False  # register writes: see the module docstring
        return b"", False  # unsupported: gdb falls back or says so

    def _monitor(self, command: str) -> bytes:
        if command in ("slide", "kaslr"):
            live = self._live()
            text = (f"KASLR slide {live.slide:#x}: load the symbols with\n"
                    f"  {self.symbol_file_command()}\n")
        elif command in ("why", "error"):
            text = (self.last_refusal or "no refusal so far") + "\n"
        else:
            text = "monitor commands: slide (the symbol-file line for KASLR), why\n"
        return text.encode().hex().encode()

    # --- memory -----------------------------------------------------------------------
    def _live(self) -> Any:
        return self.machine.live(self.snapshot)

    def _live_for_vcpu(self) -> Any:
        live = self._live()
        vcpu = self._vcpu()
        if vcpu.sregs.cr3 and live.cr3 != vcpu.sregs.cr3:
            live.cr3 = vcpu.sregs.cr3  # page walks in the selected vCPU's address space
        return live

    def _read(self, addr: int, n: int) -> bytes:
        # The kernel's bytes, not our int3s.
        return self.debug.original_bytes(addr, self._live_for_vcpu().read_kva(addr, n))

    def _write(self, addr: int, data: bytes) -> None:
        from vmm.ops import KernelTarget as T, KernelValue as V, Op

        # A 4- or 8-byte write is one store of that width (as gdb's `set var` means it).
        value = (V.u32(int.from_bytes(data, "little")) if len(data) == 4 else
                 V.u64(int.from_bytes(data, "little")) if len(data) == 8 else V.bytes(data))
        self.machine.apply(Op.WriteKernelCold([(T.kva(addr, len(data)), value)]))
