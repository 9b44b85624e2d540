"""Hardware watchpoints as a test tool, and the DR0-DR3 slots every debugger shares.

x86 has four debug address registers (DR0-DR3) and one control register (DR7). A
machine has one ``DebugRegisters`` (``debug_registers(machine)``): the allocator of those
four slots for both users, ``m.watch`` (vmm.Machine.watch) and the gdb stub
(vmm/debug/guest_debug.py), so neither overwrites the other's; a fifth slot is refused
naming who holds the four ("all 4 debug registers are in use: 3 by watch (jiffies, ...),
1 by the gdb stub"). The DR values reach KVM with KVM_SET_GUEST_DEBUG
(KVM_GUESTDBG_USE_HW_BP) on every vCPU, always while frozen. With the gdb stub attached
its GuestDebug sets guest debugging (it adds its int3s and its step) from these slots;
without it this object does, and it is then the machine's ``exits.debugger``.

A watch hit is a KVM_EXIT_DEBUG (#DB) on the vCPU's own thread. That thread cannot
freeze the machine (a freeze waits for it to park), so it queues the hit and waits until
a freeze is requested, then parks before running any guest code; one worker thread per
machine freezes every vCPU, calls each hit's ``on_hit(ctx)`` inside that one freeze and
thaws. A data watchpoint (access "w" or "rw") is a trap: it is reported after the write,
with the RIP of the next instruction, so the vCPU simply goes on. An execute one ("x", an
extension: it works where data watchpoints cannot, see below) is a fault, reported
before the instruction runs: after the thaw that vCPU alone single-steps over it with
that slot off (RFLAGS.RF, bare metal's way, does not survive PVM's entry), then the slot
is back on. DR6: KVM reports it per exit in kvm_run and resets the
hardware DR6 before each entry (the guest's own DR6 is never written while guest
debugging is on), so each hit is classified on its own exit's DR6 and no bit is left
over for the next one. A slot is freed only while frozen (remove() frees it inside its
freeze): a vCPU that hit it before the freeze still finds it and the hit is the watch's;
a #DB naming a free slot while our DR0-DR3 are loaded is taken as a stale hit
(``stale_hits``), never given to the guest (which on SVM/VMX would get a #DB it never
asked for).

An exception in ``on_hit`` is kept in ``watch.errors`` and never reaches the vCPU loop
or the worker; the guest is thawed all the same.

PVM hosts: guest ring 0 is emulated by KVM's instruction emulator, which checks
execute breakpoints but not data breakpoints, so "w"/"rw" watchpoints are armed but never
hit in guest kernel code there (VMX and SVM hosts, and the SVM lane, hit them); guest
ring 3 runs natively and its #DB goes to the guest. "x" watchpoints hit in ring 0.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from vmm.errors import KvmIoctlError, VmmError
from vmm.kvm.native import native
from vmm.runtime.vcpu_thread import freeze_requested

NUM_SLOTS = 4
DB_VECTOR = 1
DR6_BS = 1 << 14  # DR6: single step
EFER_LMA = 1 << 10
# DR7 R/W bits per access and LEN bits per length (x86 has no read-only watch).
ACCESS_RW = {"x": 0b00, "w": 0b01, "rw": 0b11}
LEN_BITS = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}


class WatchError(VmmError):
    """A watch refused before anything was armed (a bad target, no free slot)."""


def check_watch_range(kva: Optional[int], size: Optional[int], access: str,
                      long_mode: bool = True, what: str = "target") -> int:
    """The DR7 length for watching ``size`` bytes at ``kva`` with ``access``, or
    WatchError saying which of x86's rules it breaks: a kernel virtual address; 1, 2, 4
    or 8 bytes (8 only in 64-bit mode), naturally aligned; "x" watches one instruction
    byte (its length is 1 whatever the target's size)."""
    if access not in ACCESS_RW:
        raise WatchError(f"watch access {access!r}: use 'w' (writes), 'rw' (reads and "
                         "writes; x86 has no read-only watchpoint) or 'x' (execution)")
    if kva is None:
        raise WatchError(f"watch {what}: a debug register holds a virtual address and this "
                         "target has none (a guest-physical target?): name a symbol or a kva")
    if access == "x":
        return 1
    if size is None:
        raise WatchError(f"watch {what}: no width known: give the target a size "
                         "(KernelTarget.kva(addr, 8))")
    if size not in LEN_BITS:
        raise WatchError(f"watch {what}: {size} bytes at {kva:#x}: a debug register watches "
                         "1, 2, 4 or 8 bytes (narrow the target to one field)")
    if size == 8 and not long_mode:
        raise WatchError(f"watch {what}: 8-byte watchpoints need 64-bit mode")
    if kva % size:
        raise WatchError(f"watch {what}: {kva:#x} is not {size}-byte aligned (a {size}-byte "
                         "watchpoint must be naturally aligned)")
    return size


@dataclass
class DrSlot:
    """One armed DR slot: its owner ("watch" or "gdb"), DR7 R/W and LEN bits' meaning,
    and for a watch its handle."""

    owner: str
    rw: int
    kva: int
    length: int
    label: str
    watch: Optional["Watch"] = None


@dataclass
class WatchHit:
    """One hit as on_hit sees it (also ``ctx.hit``): which vCPU, the RIP the exit reported
    (after the writing instruction for "w"/"rw", the instruction itself for "x"), DR6,
    and for data watches the value before (the one read at the previous hit, or when
    armed: a write by the host in between is not seen) and after the write."""

    watch: "Watch"
    vcpu: int
    rip: int
    dr6: int
    old: Optional[int] = None
    new: Optional[int] = None
    t: float = field(default_factory=time.monotonic)


class Watch:
    """An armed watchpoint (vmm.Machine.watch): ``.hits``, ``.errors`` (on_hit's
    exceptions), ``.history`` (the last WatchHits, at most 64), ``.remove()``; a context
    manager that removes it on exit."""

    def __init__(self, regs: "DebugRegisters", label: str, kva: int, gpa: Optional[int],
                 length: int, access: str, on_hit: Optional[Callable[[Any], Any]],
                 context: Callable[[Any, WatchHit], Any]):
        self.regs = regs
        self.label = label
        self.kva = kva
        self.gpa = gpa
        self.length = length
        self.access = access
        self.on_hit = on_hit
        self.context = context
        self.hits = 0
        self.errors: list[BaseException] = []
        self.history: list[WatchHit] = []
        self.slot: Optional[int] = None
        self.last: Optional[int] = None
        self.note: Optional[str] = None  # why it may not hit on this host (PVM), if known

    @property
    def armed(self) -> bool:
        return self.slot is not None

    def value(self) -> Optional[int]:
        """The watched bytes now (data watches), read from guest memory."""
        if self.access == "x" or self.gpa is None:
            return None
        memory = self.regs.machine.memory
        return int.from_bytes(memory.read(self.gpa, self.length), "little")

    def remove(self) -> None:
        """Disarm (a freeze to reset the debug registers); idempotent."""
        self.regs.disarm(self)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _fire(self, snapshot: Any, vcpu: int, rip: int, dr6: int) -> None:
        old = self.last
        try:
            new = self.value()
        except VmmError:
            new = None
        self.last = new
        hit = WatchHit(self, vcpu, rip, dr6, old, new)
        self.hits += 1
        self.history = (self.history + [hit])[-64:]
        if self.on_hit is None:
            return
        try:
            self.on_hit(self.context(snapshot, hit))
        except Exception as exc:  # recorded, never raised into the worker or a vCPU
            self.errors.append(exc)

    def __repr__(self) -> str:
        state = f"DR{self.slot}" if self.armed else "removed"
        return f"<Watch {self.label} {self.access} {self.length}B @{self.kva:#x} {state} hits={self.hits}>"


def debug_registers(machine: Any) -> "DebugRegisters":
    """The machine's one DR slot allocator (made on first use)."""
    with _MAKE_LOCK:
        regs = machine.__dict__.get("_debug_registers")
        if regs is None:
            regs = machine.__dict__["_debug_registers"] = DebugRegisters(machine)
        return regs


_MAKE_LOCK = threading.Lock()


class DebugRegisters:
    """DR0-DR3 of one machine, shared by m.watch and the gdb stub (see the module doc)."""

    def __init__(self, machine: Any):
        self.machine = machine
        self.slots: list[Optional[DrSlot]] = [None] * NUM_SLOTS
        self.controls: dict[int, int] = {}  # KVM_GUESTDBG_* last set per vCPU index
        self._lock = threading.RLock()
        self._hits: "queue.Queue[tuple[int, int, int, list[Watch]]]" = queue.Queue()
        self._worker: Optional[threading.Thread] = None
        self._stepping: set[int] = set()  # vCPUs stepping over an execute watch's instruction
        self.worker_error: Optional[BaseException] = None
        self.stale_hits = 0  # hits of a slot freed meanwhile, taken (not the guest's)

    # --- slots ------------------------------------------------------------------------
    def any(self) -> bool:
        return any(s is not None for s in self.slots)

    def watches(self) -> list[Watch]:
        return [s.watch for s in self.slots if s is not None and s.watch is not None]

    def in_use(self) -> str:
        """Who holds the slots, in words."""
        mine = [s.label for s in self.slots if s is not None and s.owner == "watch"]
        gdb = sum(1 for s in self.slots if s is not None and s.owner == "gdb")
        return (f"{len(mine)} by watch" + (f" ({', '.join(mine)})" if mine else "")
                + f", {gdb} by the gdb stub")

    def claim(self, owner: str, rw: int, kva: int, length: int, label: str,
              watch: Optional[Watch] = None) -> int:
        """A free slot for ``owner``; WatchError when all four are taken, naming their
        holders."""
        with self._lock:
            free = [i for i, s in enumerate(self.slots) if s is None]
            if not free:
                raise WatchError(f"all {NUM_SLOTS} debug registers are in use: {self.in_use()}")
            self.slots[free[0]] = DrSlot(owner, rw, kva, length, label, watch)
            return free[0]

    def release(self, index: int) -> None:
        with self._lock:
            self.slots[index] = None

    def debugregs(self) -> list[int]:
        """DR0-DR3 and DR7 (index 7) for KVM_SET_GUEST_DEBUG."""
        regs = [0] * 8
        dr7 = 0
        for i, slot in enumerate(self.slots):
            if slot is None:
                continue
            regs[i] = slot.kva
            dr7 |= (0b10 << (2 * i)) | ((slot.rw | LEN_BITS[slot.length] << 2) << (16 + 4 * i))
        regs[7] = dr7
        return regs

    # --- guest debugging on every vCPU (while frozen) -----------------------------------
    def _gdb(self) -> Any:
        debugger = getattr(getattr(self.machine, "exits", None), "debugger", None)
        return debugger if debugger is not None and debugger is not self else None

    def apply(self) -> None:
        """KVM_SET_GUEST_DEBUG on every vCPU from the slots; called while frozen. An
        attached gdb stub's GuestDebug does it (it adds its own breakpoints and step);
        else USE_HW_BP while any slot is armed, off otherwise, and this object becomes
        (or stops being) the machine's exits.debugger."""
        self.reset_steps()
        gdb = self._gdb()
        if gdb is not None:
            gdb.apply()
            return
        _, lib = native()
        control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP if self.any() else 0
        regs = self.debugregs()
        exits = self.machine.exits
        if control:
            exits.debugger = self
        for v in self.machine.vcpus:
            if not control and not self.controls.get(v.index, 0):
                continue
            try:
                v.set_guest_debug(control, regs)
            except KvmIoctlError as exc:
                raise WatchError(f"this host's KVM refused guest debugging (KVM_SET_GUEST_DEBUG "
                                 f"on vCPU {v.index}: {exc}): no watchpoints here") from exc
            self.controls[v.index] = control
        if not control and exits.debugger is self:
            exits.debugger = None

    def reset_steps(self) -> None:
        """Guest debugging is being set anew on every vCPU (while frozen): a step over an
        "x" hit not taken yet is dropped (that vCPU hits the watch again, counted again),
        so that no later single-step exit (the gdb stub's) is taken for one of ours."""
        self._stepping.clear()

    def when_detached(self) -> Any:
        """What the machine's exits.debugger becomes when the gdb stub detaches: this
        object while watches are armed (their hits still need taking), else None."""
        return self if self.watches() else None

    # --- arming ---------------------------------------------------------------------------
    def arm(self, watch: Watch) -> Watch:
        """Claim a slot for ``watch`` and set it on every vCPU; call while frozen."""
        with self._lock:
            index = self.claim("watch", ACCESS_RW[watch.access], watch.kva, watch.length,
                               watch.label, watch)
            watch.slot = index
            try:
                watch.last = watch.value()
            except VmmError:
                watch.last = None
            try:
                self.apply()
            except BaseException:
                self.release(index)
                watch.slot = None
                raise
            self._start_worker()
        return watch

    def disarm(self, watch: Watch) -> None:
        # The slot is released inside the freeze, never before it: while it is still set
        # in KVM a vCPU may hit it, and a hit whose DR6 bit names a free slot would not be
        # known as ours (given to the guest as a #DB: our test guest dies on vector 1).
        # Lock order: the freeze first, then the allocator's lock, as arm() (called
        # frozen) and the hit worker take them: never freeze while holding the lock.
        def take() -> Optional[int]:
            with self._lock:
                index, watch.slot = watch.slot, None
                if index is not None:
                    self.release(index)
                return index

        if watch.slot is None:
            return
        if not getattr(self.machine, "running", True):
            take()
            return  # the VM ended: nothing to reset
        try:
            with self.machine.freeze():
                if take() is not None:
                    with self._lock:
                        self.apply()
        except VmmError:
            take()
            if getattr(self.machine, "running", True):
                raise

    # --- debug exits (vCPU threads) ---------------------------------------------------
    def debug_exit(self, vcpu: Any, info: Any) -> bool:
        """exits.debugger's protocol while no gdb stub is attached: our watch hits; any
        other #DB/#BP goes back to the guest."""
        if self.watch_exit(vcpu, info) or self.stale_hit(vcpu, info):
            return True
        _, lib = native()
        inject = lib.KVM_GUESTDBG_INJECT_BP if info.exception == 3 else lib.KVM_GUESTDBG_INJECT_DB
        try:
            vcpu.set_guest_debug(self.controls.get(vcpu.index, 0) | inject, self.debugregs())
        except KvmIoctlError:
            return False
        return True

    def internal_error(self, vcpu: Any) -> bool:
        return False

    def watch_exit(self, vcpu: Any, info: Any) -> bool:
        """A #DB whose DR6 names watch slots: queue the hit for the worker, arm the step
        over an execute watch's instruction, wait until the worker's freeze reaches this vCPU. False: not a
        watch's (the gdb stub's, or the guest's own)."""
        if info.exception != DB_VECTOR:
            return False
        if vcpu.index in self._stepping and info.dr6 & DR6_BS:
            # The step over an execute watch's instruction is done: its slots back on.
            self._stepping.discard(vcpu.index)
            self._set_vcpu(vcpu, self.controls.get(vcpu.index, 0), self.debugregs())
            return True
        hit = [s.watch for i, s in enumerate(self.slots)
               if s is not None and s.watch is not None and info.dr6 & (1 << i)]
        if not hit:
            return False
        executes = [i for i, s in enumerate(self.slots)
                    if s is not None and s.rw == ACCESS_RW["x"] and info.dr6 & (1 << i)]
        if executes:
            # A fault, before the instruction: step this vCPU over it with those slots
            # off (RFLAGS.RF would do on bare metal; PVM drops it), then back on.
            _, lib = native()
            regs = self.debugregs()
            for i in executes:
                regs[7] &= ~(0b11 << (2 * i))
            control = self.controls.get(vcpu.index, 0) | lib.KVM_GUESTDBG_ENABLE | \
                lib.KVM_GUESTDBG_SINGLESTEP
            if self._set_vcpu(vcpu, control, regs):
                self._stepping.add(vcpu.index)
        self._hits.put((vcpu.index, info.pc, info.dr6, hit))
        worker = self._worker
        while (not freeze_requested(vcpu) and worker is not None and worker.is_alive()
               and self.watches()):
            time.sleep(0.0002)
        return True

    def stale_hit(self, vcpu: Any, info: Any) -> bool:
        """A #DB whose DR6 names a debug register (B0-B3) that no slot holds now: a hit of
        a slot freed after the vCPU hit it (a removed watch, gdb's z2). While this vCPU
        runs with USE_HW_BP the hardware DR0-DR3 are ours, not the guest's, so that bit
        is ours too: taken (the vCPU goes on), never given to the guest as its #DB."""
        if info.exception != DB_VECTOR or not info.dr6 & 0xF:
            return False
        _, lib = native()
        if not self.controls.get(vcpu.index, 0) & lib.KVM_GUESTDBG_USE_HW_BP:
            return False
        self.stale_hits += 1
        return True

    @staticmethod
    def _set_vcpu(vcpu: Any, control: int, regs: list[int]) -> bool:
        try:
            vcpu.set_guest_debug(control, regs)
        except KvmIoctlError:
            return False
        return True

    # --- the worker: one freeze per batch of hits -------------------------------------
    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name="vmm-watch", daemon=True)
            self._worker.start()

    def _run(self) -> None:
        while True:
            try:
                first = self._hits.get(timeout=0.1)
            except queue.Empty:
                with self._lock:
                    if not self.watches() or not getattr(self.machine, "running", True):
                        self._worker = None
                        return
                continue
            try:
                with self.machine.freeze() as snap:
                    batch = [first]
                    while True:
                        try:
                            batch.append(self._hits.get_nowait())
                        except queue.Empty:
                            break
                    for index, rip, dr6, watches in batch:
                        for w in watches:
                            if w.armed:
                                w._fire(snap, index, rip, dr6)
            except VmmError as exc:  # the VM ended (or could not freeze): no more hits
                self.worker_error = exc
                if not getattr(self.machine, "running", True):
                    self._worker = None
                    return
