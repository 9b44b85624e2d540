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
import time
from typing import Any, Optional

from vmm.errors import KvmIoctlError, VmmError
from vmm.kvm.native import native
from vmm.kvm.pvm import is_pvm_host
from vmm.runtime.vcpu_thread import DebugExit, freeze_requested, hold

# The i386:x86-64 'g' packet without a target description: 16 GPRs and rip (8 bytes),
# eflags, cs, ss, ds, es, fs, gs (4 bytes), then x87 (8 x 10), its control words
# (8 x 4), xmm0-15 (16 x 16) and mxcsr (4), which we report as unavailable ('x').
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
UNAVAILABLE_BYTES = 8 * 10 + 8 * 4 + 16 * 16 + 4
SIGTRAP, SIGINT = 5, 2
INT3 = 0xCC
BP_VECTOR, DB_VECTOR = 3, 1
DR6_BS = 1 << 14  # DR6: single step
# DR7 R/W bits per Z type (1 execute, 2 write, 4 access; x86 has no read-only watch)
# and LEN bits per length.
DR7_RW = {1: 0b00, 2: 0b01, 4: 0b11}
DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
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

    def __init__(self, machine: Any, host: str = "127.0.0.1", port: int = 0):
        self.machine = machine
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.snapshot: Any = None
        self.thread_g = 1  # gdb thread id selected for registers/memory
        self.thread_c = 0  # gdb thread id for s/c (Hc); 0 or -1: any (then thread_g)
        self.closed = False
        self.error: Optional[BaseException] = None
        self.last_refusal = ""  # why the last Z/s was refused (also in the E reply's log)
        # Software breakpoints: kva -> (gpa, original byte). Hardware slots DR0-DR3:
        # (Z type, kva, length) or None. stepping: the vCPU index being single-stepped.
        self.breakpoints: dict[int, tuple[int, int]] = {}
        self.hw_slots: list[Optional[tuple[int, int, int]]] = [None] * 4
        self.stepping: Optional[int] = None
        self.attached = False
        self._controls: dict[int, int] = {}  # KVM_GUESTDBG_* last set per vCPU index
        self._events: list[tuple[int, str]] = []  # (vCPU index, stop reply suffix)
        self._events_lock = threading.Lock()
        # Debug exits seen, and those given back to the guest (not ours): diagnostics.
        self.counts = {"debug_exits": 0, "given_back": 0, "pvm_int3": 0}
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
            if self.attached and self.machine.exit is None:
                try:
                    self._freeze()
                except VmmError:
                    pass  # the VM ended meanwhile: nothing left to clean
            if self.snapshot is not None:
                for kva in list(self.breakpoints):
                    self._remove_sw(kva)
                self.hw_slots = [None] * 4
                self.stepping = None
                self._apply_debug()
                for v in self.machine.vcpus:
                    hold(v, False)
        finally:
            self.breakpoints.clear()
            self.attached = False
            if getattr(self.machine, "exits", None) is not None \
                    and self.machine.exits.debugger is self:
                self.machine.exits.debugger = None
            with self._events_lock:
                self._events.clear()
            self._thaw()

    def _session(self, conn: socket.socket) -> None:
        self._freeze()
        self.attached = True
        self.machine.exits.debugger = self
        buf = b""
        running = False
        conn.settimeout(0.05)
        while not self.closed:
            if running and self.machine.exit is not None:
                conn.sendall(frame(b"W%02x" % (self.machine.exit.exit_code & 0xFF)))
                return
            if running and self._events:
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
    def _take_event(self) -> Optional[tuple[int, str]]:
        """The event to report after a freeze; the step's first, then the oldest. Other
        vCPUs' breakpoint hits are dropped: they sit on the int3 (or the DR0-3 address)
        and hit it again when they run; their watchpoint hits are kept for later."""
        with self._events_lock:
            events, self._events = self._events, []
        if not events:
            return None
        events.sort(key=lambda e: e[0] != self.stepping)
        first = events[0]
        with self._events_lock:
            self._events = [e for e in events[1:] if "watch:" in e[1]] + self._events
        return first

    def _after_stop(self) -> None:
        # Frozen: a held vCPU may be let go now (the next thaw runs it as the others).
        if self.stepping is not None:
            for v in self.machine.vcpus:
                hold(v, False)
            self.stepping = None

    def _stop_after_event(self) -> bytes:
        self._freeze()
        event = self._take_event()
        self._after_stop()
        if event is None:
            return self._stop_reply(SIGTRAP)
        index, suffix = event
        self.thread_g = index + 1
        return self._stop_reply(SIGTRAP) + suffix.encode()

    def _stop_after_interrupt(self) -> bytes:
        self._freeze()
        if self._events:  # a debug exit raced the interrupt: report it instead
            event = self._take_event()
            if event is not None:
                self._after_stop()
                self.thread_g = event[0] + 1
                return self._stop_reply(SIGTRAP) + event[1].encode()
        self._after_stop()
        return self._stop_reply(SIGINT)

    # --- debug exits (vCPU threads) ---------------------------------------------------
    def debug_exit(self, vcpu: Any, info: DebugExit) -> bool:
        """A KVM_EXIT_DEBUG on ``vcpu``'s own thread (vmm.machine.exits: debugger).
        Ours: post the stop and wait until the freeze it causes reaches this vCPU (it
        then parks before running any guest code). Not ours: give it to the guest."""
        _, lib = native()
        self.counts["debug_exits"] += 1
        suffix = self._classify(vcpu.index, info)
        if suffix is None:
            self.counts["given_back"] += 1
            self.last_given_back = info
            inject = (lib.KVM_GUESTDBG_INJECT_BP if info.exception == BP_VECTOR
                      else lib.KVM_GUESTDBG_INJECT_DB)
            control = self._controls.get(vcpu.index, 0)
            try:
                vcpu.set_guest_debug(control | inject, self._debugregs())
            except KvmIoctlError:
                return False
            return True
        with self._events_lock:
            self._events.append((vcpu.index, suffix))
        while self.attached and not freeze_requested(vcpu):
            time.sleep(0.0005)
        return True

    def internal_error(self, vcpu: Any) -> bool:
        """PVM: an int3 at CPL 0 is an emulation failure, not a #BP. Ours if the vCPU
        stands on one of our breakpoints."""
        if not self.attached or not self.breakpoints:
            return False
        try:
            rip = vcpu.get_regs().rip
        except KvmIoctlError:
            return False
        if rip not in self.breakpoints:
            return False
        self.counts["pvm_int3"] += 1
        return self.debug_exit(vcpu, DebugExit(BP_VECTOR, rip, 0, 0))

    def _classify(self, index: int, info: DebugExit) -> Optional[str]:
        """The stop reply suffix for a debug exit that is ours, else None."""
        if info.exception == BP_VECTOR:
            return "swbreak:;" if info.pc in self.breakpoints else None
        if self.stepping == index and info.dr6 & DR6_BS:
            return ""
        for i, slot in enumerate(self.hw_slots):
            if slot is not None and info.dr6 & (1 << i):
                kind, kva, _ = slot
                if kind == 1:
                    return "hwbreak:;"
                return ("watch:%x;" if kind == 2 else "awatch:%x;") % kva
        if self.stepping == index:  # a step that KVM reported without DR6.BS
            return ""
        return None

    # --- guest debug state (while frozen) ---------------------------------------------
    def _debugregs(self) -> list[int]:
        regs = [0] * 8
        dr7 = 0
        for i, slot in enumerate(self.hw_slots):
            if slot is None:
                continue
            kind, kva, length = slot
            regs[i] = kva
            dr7 |= (0b10 << (2 * i)) | ((DR7_RW[kind] | DR7_LEN[length] << 2) << (16 + 4 * i))
        regs[7] = dr7
        return regs

    def _apply_debug(self) -> None:
        """KVM_SET_GUEST_DEBUG on every vCPU from the breakpoints and the step; called
        while frozen (no vCPU is inside KVM_RUN)."""
        _, lib = native()
        base = 0
        if self.breakpoints and not is_pvm_host():
            base |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP
        if any(self.hw_slots):
            base |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP
        regs = self._debugregs()
        for v in self.machine.vcpus:
            control = base
            if self.stepping == v.index:
                control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP
            if control == self._controls.get(v.index, 0) and not (control & lib.KVM_GUESTDBG_USE_HW_BP):
                continue
            try:
                v.set_guest_debug(control, regs)
            except KvmIoctlError as exc:
                raise VmmError(f"gdb stub: this host's KVM refused guest debugging "
                               f"(KVM_SET_GUEST_DEBUG on vCPU {v.index}: {exc}); "
                               "breakpoints and single-step are not available here") from exc
            self._controls[v.index] = control

    def _resume(self, step: Optional[int] = None) -> tuple[Optional[bytes], bool]:
        """Continue (step None) or single-step vCPU ``step`` with the others held."""
        with self._events_lock:
            pending = bool(self._events)
        if pending:  # a watchpoint another vCPU hit at the last stop: report it now
            event = self._take_event()
            if event is not None:
                self.thread_g = event[0] + 1
                return self._stop_reply(SIGTRAP) + event[1].encode(), False
        if step is not None and is_pvm_host() and self._vcpu(step + 1).sregs.cs.selector & 3:
            self.last_refusal = (f"vCPU {step} is in guest user mode (CPL 3), which PVM runs "
                                 "natively: it cannot single-step there (the guest would get "
                                 "the #DB); step kernel code, or use a host with VMX/SVM")
            return b"E01", False
        self.stepping = step
        try:
            self._apply_debug()
        except VmmError as exc:
            self.stepping = None
            self.last_refusal = str(exc)
            return b"E01", False
        if step is not None:
            for v in self.machine.vcpus:
                hold(v, v.index != step)
        self._thaw()
        return None, True

    # --- breakpoints ------------------------------------------------------------------
    def _insert_sw(self, kva: int) -> None:
        if kva in self.breakpoints:
            return
        gpa = self._live_for_vcpu().kva_to_gpa(kva)
        memory = self.machine.memory
        original = memory.read(gpa, 1)[0]
        memory.write(gpa, bytes([INT3]))
        self.breakpoints[kva] = (gpa, original)

    def _remove_sw(self, kva: int) -> None:
        entry = self.breakpoints.pop(kva, None)
        if entry is None:
            return
        gpa, original = entry
        memory = self.machine.memory
        if memory.read(gpa, 1)[0] == INT3:  # the guest did not rewrite it meanwhile
            memory.write(gpa, bytes([original]))

    def _breakpoint(self, insert: bool, p: bytes) -> bytes:
        kind, addr, size = p[1:].split(b",")[:3]
        z, kva, length = int(kind), int(addr, 16), int(size.split(b";")[0], 16)
        if z == 0:
            if insert:
                self._insert_sw(kva)
            else:
                self._remove_sw(kva)
            return b"OK"
        if z == 3 or z not in (1, 2, 4):
            return b""  # x86 cannot watch reads alone: gdb says it is not supported
        length = 1 if z == 1 else length
        if length not in DR7_LEN or kva % length:
            return b"E16"
        if insert:
            if (z, kva, length) in self.hw_slots:
                return b"OK"
            if None not in self.hw_slots:
                self.last_refusal = "all four debug registers (DR0-DR3) are in use"
                return b"E1c"  # ENOSPC
            self.hw_slots[self.hw_slots.index(None)] = (z, kva, length)
        elif (z, kva, length) in self.hw_slots:
            self.hw_slots[self.hw_slots.index((z, kva, length))] = None
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
        data = self._live_for_vcpu().read_kva(addr, n)
        if self.breakpoints:  # show the kernel's bytes, not our int3s
            out = bytearray(data)
            for kva, (_, original) in self.breakpoints.items():
                if addr <= kva < addr + len(out):
                    out[kva - addr] = original
            data = bytes(out)
        return data

    def _write(self, addr: int, data: bytes) -> None:
        from vmm.ops import KernelTarget as T, KernelValue as V, Op

        # A 4- or 8-byte write is one store of that width (as gdb's `set var` means it).
        value = (V.u32(int.from_bytes(data, "little")) if len(data) == 4 else
                 V.u64(int.from_bytes(data, "little")) if len(data) == 8 else V.bytes(data))
        self.machine.apply(Op.WriteKernelCold([(T.kva(addr, len(data)), value)]))
