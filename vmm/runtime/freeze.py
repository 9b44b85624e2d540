"""The freeze coordinator: stops every vCPU at once, and lets them go again.

The rendezvous itself is in C (ffi/vcpu.c): a request bumps `freeze_gen`, sets every
vCPU's `immediate_exit` and kicks each vCPU thread with a signal; each vCPU drains its
pending exit, captures its own registers and parks on a futex. This class adds what
needs Python: nesting (only the outermost freeze does the rendezvous), the guest clock
(saved at freeze, restored at thaw, so the guest does not see the frozen time as a
stall; plus KVM_KVMCLOCK_CTRL per vCPU), the snapshot objects, and a diagnosable
timeout (which vCPUs did not park and which syscall each thread was in).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from vmm.errors import FreezeTimeout, KvmIoctlError, VmClosed, VmmError
from vmm.kvm.native import native

SYS_FUTEX = 202  # x86-64


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()


@dataclass
class VcpuSnapshot:
    """One vCPU's state, captured on its own thread while parking."""

    index: int
    regs: object  # cffi struct kvm_regs * (a copy)
    sregs: object  # cffi struct kvm_sregs * (a copy)
    msrs: dict[int, int]  # {MSR_LSTAR, MSR_GS_BASE, MSR_KERNEL_GS_BASE: value}
    error: str | None = None  # a GET ioctl that failed while capturing

    @property
    def rip(self) -> int:
        """The vCPU's RIP when it parked."""
        return self.regs.rip

    @property
    def cr3(self) -> int:
        """The vCPU's CR3 when it parked."""
        return self.sregs.cr3


@dataclass
class FreezeSnapshot:
    """What a freeze captured; a context manager that thaws on exit."""

    generation: int
    vcpus: list  # [VcpuSnapshot | None] by position in the coordinator's vCPU list
    clock: int | None  # KVM_GET_CLOCK at freeze (ns), None when unavailable
    latency_ns: int  # request -> all parked
    _coordinator: "FreezeCoordinator" = field(repr=False, default=None)

    @property
    def frozen(self) -> bool:
        """True while this freeze holds the vCPUs."""
        c = self._coordinator
        return c is not None and c.depth > 0 and c.generation == self.generation

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._coordinator.thaw()


def thread_syscall(tid: int) -> str:
    """What /proc/self/task/<tid>/syscall says the thread is doing, decoded."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            text = f.read().split()
    except OSError as e:
        return f"unknown ({e.strerror})"
    if not text:
        return "unknown"
    if text[0] == "running":
        return "running (user space)"
    try:
        nr = int(text[0])
    except ValueError:
        return text[0]
    if nr < 0:
        return "not in a syscall"
    try:
        from ptrace.syscall import SYSCALL_NAMES

        name = SYSCALL_NAMES.get(nr, f"syscall {nr}")
    except ImportError:
        name = f"syscall {nr}"
    return f"{name} ({nr})"


def thread_syscall_number(tid: int) -> int | None:
    """The system call thread `tid` of this process is in (/proc), or None."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class FreezeCoordinator:
    """Freezes/thaws the vCPUs of one VM. `vm` is a vmm.kvm.Vm, `vcpus` its Vcpus.

    `freeze()` returns a FreezeSnapshot (also a context manager); nested freezes are
    counted and only the outermost thaw releases the vCPUs. `with coordinator:` works too.
    """

    def __init__(self, vm, vcpus, save_clock: bool = True):
        self.vm = vm
        self.vm_native = vm.native
        self.vcpus = list(vcpus)
        self.save_clock = save_clock
        self.depth = 0
        self.generation = 0
        self.snapshot: FreezeSnapshot | None = None
        self._lock = threading.RLock()

    # -- freeze -----------------------------------------------------------------
    def _vm_lock(self):
        # Vm.close() takes the same lock: while we hold it the fds stay open.
        lock = getattr(self.vm, "lock", None)
        return lock if lock is not None else _NO_LOCK

    def _check_open(self, what: str) -> None:
        if getattr(self.vm, "closed", False) or self.vm_native.stop:
            raise VmClosed(f"{what}: the VM was stopped")

    def freeze(self, timeout: float = 30.0) -> FreezeSnapshot:
        """Park every vCPU and return a FreezeSnapshot (a context manager that thaws);
        FreezeTimeout names the vCPUs that did not park."""
        with self._lock, self._vm_lock():
            return self._freeze(timeout)

    def _freeze(self, timeout: float) -> FreezeSnapshot:
        ffi, lib = native()
        self._check_open("freeze()")
        if self.depth > 0:
            self.depth += 1
            return self.snapshot
        me = threading.get_native_id()
        for v in self.vcpus:
            if v.native.thread_registered and v.native.tid == me:
                raise VmmError(f"freeze() called from vCPU {v.index}'s own thread: "
                               "it cannot park while it waits for itself")
        t0 = lib.vmm_now_ns()
        gen = lib.vmm_freeze_request(self.vm_native)
        lib.vmm_freeze_wait(self.vm_native, len(self.vcpus), int(timeout * 1e9))
        latency = lib.vmm_now_ns() - t0
        missing = [v for v in self.vcpus
                   if v.native.parked_gen != gen and v.native.thread_registered]
        if missing:
            self._timeout(gen, missing, timeout)
        if self.vm_native.stop:  # stop() raced the rendezvous: its threads ended
            lib.vmm_thaw(self.vm_native)
            raise VmClosed("freeze(): the VM was stopped while the vCPUs were parking")
        self.depth = 1
        self.generation = gen
        clock = None
        if self.save_clock:
            clock = self._save_clock()
        self.snapshot = FreezeSnapshot(gen, [self._capture(v, gen) for v in self.vcpus],
                                       clock, latency, self)
        return self.snapshot

    def _capture(self, v, gen: int) -> VcpuSnapshot | None:
        ffi, _ = native()
        n = v.native
        if n.snap_gen != gen:
            return None  # its thread was not running: nothing captured
        msrs = {n.msr_index[i]: n.msr_value[i] for i in range(max(n.nmsrs_captured, 0))}
        error = None
        if n.snap_error:
            import os

            error = f"capturing vCPU {v.index} state: {os.strerror(-n.snap_error)}"
        return VcpuSnapshot(v.index, ffi.new("struct kvm_regs *", n.regs),
                            ffi.new("struct kvm_sregs *", n.sregs), msrs, error)

    def _save_clock(self) -> int | None:
        try:
            clock, _ = self.vm.get_clock()
        except KvmIoctlError:
            return None
        for v in self.vcpus:
            try:
                v.kvmclock_ctrl()
            except KvmIoctlError:
                pass  # best effort: only silences the guest's soft-lockup detector
        return clock

    def _timeout(self, gen: int, missing, timeout: float):
        """Releases the vCPUs that did park, then raises FreezeTimeout naming the rest."""
        _, lib = native()
        lib.vmm_thaw(self.vm_native)  # late arrivals see thaw_gen == gen and do not park
        activity = {lib.VMM_ACT_IDLE: "outside the C loop (in a Python exit handler)",
                    lib.VMM_ACT_RUNNING: "in the C run loop",
                    lib.VMM_ACT_PARKED: "parked"}
        parts = []
        for v in missing:
            tid = v.native.tid
            what = activity.get(v.native.activity, f"activity {v.native.activity}")
            parts.append(f"vCPU {v.index} (tid {tid}) {what}, syscall {thread_syscall(tid)}")
        raise FreezeTimeout(
            f"freeze timed out after {timeout:g} s: {len(missing)} of {len(self.vcpus)} vCPUs "
            f"did not park: " + "; ".join(parts) + ". The others were released."
        )

    # -- thaw -------------------------------------------------------------------
    def thaw(self) -> None:
        """Releases the vCPUs (outermost thaw only). After stop() there is nothing to
        release: the count drops and nothing else happens."""
        _, lib = native()
        with self._lock, self._vm_lock():
            if self.depth == 0:
                raise VmmError("thaw() without a matching freeze()")
            self.depth -= 1
            if self.depth:
                return
            if getattr(self.vm, "closed", False):
                return  # the control block lives on (ffi.gc) but nothing is parked in it
            snap = self.snapshot
            if snap is not None and snap.clock is not None:
                try:
                    self.vm.set_clock(snap.clock)
                except KvmIoctlError:
                    pass  # the guest then sees the frozen time; never keep vCPUs parked for it
            lib.vmm_thaw(self.vm_native)

    @property
    def frozen(self) -> bool:
        """True while any freeze holds the vCPUs."""
        return self.depth > 0

    def parked_tids(self) -> list[int]:
        """Thread ids of the vCPUs parked for the current freeze."""
        return [v.native.tid for v in self.vcpus
                if self.depth and v.native is not None
                and v.native.parked_gen == self.generation]

    def __enter__(self) -> FreezeSnapshot:
        return self.freeze()

    def __exit__(self, *exc):
        self.thaw()
