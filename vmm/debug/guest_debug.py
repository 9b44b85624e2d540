"""What a debugger asked of the guest's CPUs, and the debug exits it causes.

The gdb stub (vmm/debug/gdbstub.py) speaks gdb's protocol; this object holds the state
behind its breakpoints and steps, and takes the debug exits on the vCPU threads (it is
what the stub puts in ``machine.exits.debugger``):

- software breakpoints: kernel virtual address -> (guest-physical address, original
  byte); the int3 byte is written into guest memory while frozen and put back on removal;
- hardware slots DR0-DR3: (gdb Z type, address, length) or None, and the DR7 they make;
- the one vCPU being single-stepped (the others are held in the C run loop);
- the stop events the debug exits posted, which the stub reports to gdb.

KVM_SET_GUEST_DEBUG is applied to every vCPU while frozen (`apply`). A debug exit that is
not ours (the kernel's own int3 text patching, a #DB of the guest's own) is given back
to the guest with KVM_GUESTDBG_INJECT_BP / _DB. See gdbstub.py's docstring for PVM.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

from vmm.errors import KvmIoctlError, VmmError
from vmm.kvm.native import native
from vmm.kvm.pvm import is_pvm_host
from vmm.runtime.vcpu_thread import DebugExit, freeze_requested, hold
from vmm.runtime.watch import WatchError, debug_registers

INT3 = 0xCC
BP_VECTOR, DB_VECTOR = 3, 1
DR6_BS = 1 << 14  # DR6: single step
# DR7 R/W bits per Z type (1 execute, 2 write, 4 access; x86 has no read-only watch)
# and LEN bits per length.
DR7_RW = {1: 0b00, 2: 0b01, 4: 0b11}
DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}


class GuestDebug:
    """Breakpoints, watchpoints and the step of one attached debugger on ``machine``."""

    def __init__(self, machine: Any):
        self.machine = machine
        self.breakpoints: dict[int, tuple[int, int]] = {}
        # DR0-DR3 are shared with m.watch (vmm.runtime.watch): the machine's one allocator
        # hands out the slots; hw_slots holds ours (a slot a watch holds is None here).
        self.dr = debug_registers(machine)
        self.hw_slots: list[Optional[tuple[int, int, int]]] = [None] * 4
        self.stepping: Optional[int] = None
        self.attached = False
        self._controls: dict[int, int] = self.dr.controls  # KVM_GUESTDBG_* last set per vCPU
        self._events: list[tuple[int, str]] = []  # (vCPU index, stop reply suffix)
        self._events_lock = threading.Lock()
        # Debug exits seen, and those given back to the guest (not ours): diagnostics.
        self.counts = {"debug_exits": 0, "given_back": 0, "pvm_int3": 0}
        self.last_given_back: Optional[DebugExit] = None

    # --- debug exits (vCPU threads) ---------------------------------------------------
    def debug_exit(self, vcpu: Any, info: DebugExit) -> bool:
        """A KVM_EXIT_DEBUG on ``vcpu``'s own thread (vmm.machine.exits: debugger).
        Ours: post the stop and wait until the freeze it causes reaches this vCPU (it
        then parks before running any guest code). Not ours: give it to the guest."""
        _, lib = native()
        if self.dr.watch_exit(vcpu, info):  # a hit of m.watch's slots, not gdb's
            return True
        self.counts["debug_exits"] += 1
        suffix = self.classify(vcpu.index, info)
        if suffix is None and self.dr.stale_hit(vcpu, info):
            return True  # a hit of a slot freed meanwhile: ours, not the guest's
        if suffix is None:
            self.counts["given_back"] += 1
            self.last_given_back = info
            inject = (lib.KVM_GUESTDBG_INJECT_BP if info.exception == BP_VECTOR
                      else lib.KVM_GUESTDBG_INJECT_DB)
            control = self._controls.get(vcpu.index, 0)
            try:
                vcpu.set_guest_debug(control | inject, self.debugregs())
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

    def classify(self, index: int, info: DebugExit) -> Optional[str]:
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

    # --- stop events ------------------------------------------------------------------
    def pending(self) -> bool:
        with self._events_lock:
            return bool(self._events)

    def take_event(self) -> Optional[tuple[int, str]]:
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

    def step_done(self) -> None:
        """Frozen after a stop: a held vCPU may be let go now (the next thaw runs it as
        the others)."""
        if self.stepping is not None:
            for v in self.machine.vcpus:
                hold(v, False)
            self.stepping = None

    # --- state, changed while frozen --------------------------------------------------
    def insert_sw(self, kva: int, translate: Callable[[int], int]) -> None:
        """An int3 at ``kva`` (``translate`` gives its guest-physical address)."""
        if kva in self.breakpoints:
            return
        gpa = translate(kva)
        memory = self.machine.memory
        original = memory.read(gpa, 1)[0]
        memory.write(gpa, bytes([INT3]))
        self.breakpoints[kva] = (gpa, original)

    def remove_sw(self, kva: int) -> None:
        entry = self.breakpoints.pop(kva, None)
        if entry is None:
            return
        gpa, original = entry
        memory = self.machine.memory
        if memory.read(gpa, 1)[0] == INT3:  # the guest did not rewrite it meanwhile
            memory.write(gpa, bytes([original]))

    def set_hw(self, insert: bool, z: int, kva: int, length: int) -> Optional[str]:
        """Insert or remove a DR0-DR3 slot; the refusal (gdb's error code) or None."""
        if insert:
            if (z, kva, length) in self.hw_slots:
                return None
            try:
                index = self.dr.claim("gdb", DR7_RW[z], kva, length, f"gdb Z{z} {kva:#x}")
            except WatchError as exc:
                return str(exc)
            self.hw_slots[index] = (z, kva, length)
        elif (z, kva, length) in self.hw_slots:
            index = self.hw_slots.index((z, kva, length))
            self.hw_slots[index] = None
            self.dr.release(index)
        return None

    def _release_hw(self) -> None:
        """Our DR slots back to the shared allocator (m.watch's stay armed)."""
        for index, slot in enumerate(self.hw_slots):
            if slot is not None:
                self.hw_slots[index] = None
                self.dr.release(index)

    def original_bytes(self, addr: int, data: bytes) -> bytes:
        """``data`` read at ``addr`` with the kernel's bytes in place of our int3s."""
        if not self.breakpoints:
            return data
        out = bytearray(data)
        for kva, (_, original) in self.breakpoints.items():
            if addr <= kva < addr + len(out):
                out[kva - addr] = original
        return bytes(out)

    def debugregs(self) -> list[int]:
        """DR0-DR3 and DR7: ours and m.watch's (the shared allocator's)."""
        return self.dr.debugregs()

    def apply(self) -> None:
        """KVM_SET_GUEST_DEBUG on every vCPU from the breakpoints and the step; called
        while frozen (no vCPU is inside KVM_RUN)."""
        _, lib = native()
        base = 0
        if self.breakpoints and not is_pvm_host():
            base |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_SW_BP
        if self.dr.any():  # ours or m.watch's
            base |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP
        regs = self.debugregs()
        self.dr.reset_steps()  # m.watch's pending step over an "x" hit: ours now
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

    def prepare_resume(self, step: Optional[int]) -> None:
        """Before a thaw: guest debugging set on every vCPU; with ``step``, that vCPU
        single-steps and every other one is held in the C run loop."""
        self.stepping = step
        try:
            self.apply()
        except VmmError:
            self.stepping = None
            raise
        if step is not None:
            for v in self.machine.vcpus:
                hold(v, v.index != step)

    def clear(self, frozen: bool) -> None:
        """Everything off: breakpoint bytes restored and guest debugging off on every
        vCPU (when ``frozen``), nothing held, no events."""
        try:
            if frozen:
                for kva in list(self.breakpoints):
                    self.remove_sw(kva)
                self._release_hw()
                self.stepping = None
                self.apply()
                for v in self.machine.vcpus:
                    hold(v, False)
        finally:
            self._release_hw()
            self.breakpoints.clear()
            self.attached = False
            with self._events_lock:
                self._events.clear()
