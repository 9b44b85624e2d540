"""One Python thread per vCPU: runs the C loop and dispatches the exits that need Python.

`lib.vmm_vcpu_run` (GIL released) stays in C for EINTR/EAGAIN retries, COM1 output and
freeze parking, and returns only when Python must act. Exits go to a handler object:

    io_in(vcpu_index, port, size) -> int
    io_out(vcpu_index, port, size, value)
    mmio_read(vcpu_index, addr, size) -> int
    mmio_write(vcpu_index, addr, size, value)
    on_internal_error(vcpu) -> bool     # True: assisted, re-enter the guest
    on_stop(vcpu_index, reason, detail) # the thread ends right after
    on_hlt(vcpu_index) -> bool          # optional; only without in-kernel irqchip.
                                        # True: re-enter; absent/False: stop ("hlt")
    on_debug(vcpu, DebugExit) -> bool   # optional; KVM_EXIT_DEBUG (guest debugging on,
                                        # KVM_SET_GUEST_DEBUG). True: re-enter; else "error"

Stop reasons (vmm.machine.vmexit.StopReason, equal to these strings): "shutdown",
"internal-error", "fail-entry", "system-event", "stopped", "hlt", "error" (KVM_RUN
failed, unexpected exit, or the handler raised).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from vmm.kvm.native import native
from vmm.machine.vmexit import StopReason

# Readable names for exit reasons in stop details.
_EXIT_NAMES = {
    "KVM_EXIT_UNKNOWN", "KVM_EXIT_EXCEPTION", "KVM_EXIT_IO", "KVM_EXIT_HYPERCALL",
    "KVM_EXIT_DEBUG", "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_IRQ_WINDOW_OPEN",
    "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_SYSTEM_EVENT",
}


def exit_reason_name(reason: int) -> str:
    """KVM_EXIT_* name of an exit reason number."""
    _, lib = native()
    for name in _EXIT_NAMES:
        if getattr(lib, name) == reason:
            return name
    return f"exit reason {reason}"


@dataclass(frozen=True)
class DebugExit:
    """run->debug.arch of a KVM_EXIT_DEBUG: the exception (1 = #DB: single step or a
    debug register; 3 = #BP: int3), the guest's linear pc, DR6 and DR7."""

    exception: int
    pc: int
    dr6: int
    dr7: int


class VcpuThread(threading.Thread):
    """Runs `vcpu` until the guest stops it or `vm.request_stop()`-style stop arrives.

    `vm` is the vmm.kvm.Vm (or its `native` control block); `vcpu` a vmm.kvm.Vcpu.
    """

    def __init__(self, vm, vcpu, handler, name: str | None = None):
        super().__init__(name=name or f"vcpu{vcpu.index}", daemon=True)
        self.vm_native = getattr(vm, "native", vm)
        self.vcpu = vcpu
        self.handler = handler
        self.stop_reason: StopReason | None = None
        self.stop_detail: str = ""
        self.python_exits = 0  # exits that reached Python (diagnostics, benchmarks)
        self._entered = threading.Event()

    # -- public ---------------------------------------------------------------------
    @property
    def tid(self) -> int | None:
        """Kernel thread id of the running vCPU thread (for /proc/self/task/<tid>)."""
        return self.native_id

    def wait_started(self, timeout: float | None = None) -> bool:
        """True once the thread has registered with the C loop (kicks reach it)."""
        return self._entered.wait(timeout)

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        """The thread: run the vCPU in C, dispatch exits that need Python, until it stops."""
        ffi, lib = native()
        nat = self.vcpu.native
        lib.vmm_vcpu_thread_enter(nat)
        self._entered.set()
        try:
            self._loop(ffi, lib, nat)
        except BaseException as e:  # a handler bug must end this vCPU visibly, not hang
            self._finish("error", f"vCPU {self.vcpu.index}: exit handler raised {e!r}")
        finally:
            lib.vmm_vcpu_thread_exit(nat)

    def _finish(self, reason: str, detail: str) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = StopReason(reason), detail
            self.handler.on_stop(self.vcpu.index, self.stop_reason, detail)

    def _loop(self, ffi, lib, nat) -> None:
        run = self.vcpu.run
        index = self.vcpu.index
        handler = self.handler
        while True:
            r = lib.vmm_vcpu_run(nat)
            if r == lib.VMM_RUN_STOPPED:
                self._finish("stopped", f"vCPU {index}: stop requested")
                return
            if r < 0:
                self._finish("error", f"vCPU {index}: KVM_RUN failed: {os.strerror(-r)} (errno {-r})")
                return
            self.python_exits += 1
            reason = run.exit_reason
            if reason == lib.KVM_EXIT_IO:
                self._port_io(ffi, lib, run, index)
            elif reason == lib.KVM_EXIT_MMIO:
                self._mmio(run, index)
            elif reason == lib.KVM_EXIT_INTERNAL_ERROR:
                if handler.on_internal_error(self.vcpu):
                    continue
                data = ", ".join(f"{run.internal.data[i]:#x}"
                                 for i in range(min(run.internal.ndata, 16)))
                self._finish("internal-error",
                           f"vCPU {index}: KVM internal error, suberror {run.internal.suberror}"
                           + (f", data [{data}]" if data else ""))
                return
            elif reason == lib.KVM_EXIT_SHUTDOWN:
                self._finish("shutdown", f"vCPU {index}: triple fault / shutdown")
                return
            elif reason == lib.KVM_EXIT_FAIL_ENTRY:
                self._finish("fail-entry",
                           f"vCPU {index}: VM entry failed, hardware reason "
                           f"{run.fail_entry.hardware_entry_failure_reason:#x}")
                return
            elif reason == lib.KVM_EXIT_SYSTEM_EVENT:
                kinds = {lib.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", lib.KVM_SYSTEM_EVENT_RESET: "reset",
                         lib.KVM_SYSTEM_EVENT_CRASH: "crash"}
                kind = kinds.get(run.system_event.type, f"type {run.system_event.type}")
                self._finish("system-event", f"vCPU {index}: system event {kind}")
                return
            elif reason == lib.KVM_EXIT_DEBUG:
                a = run.debug.arch
                info = DebugExit(a.exception, a.pc, a.dr6, a.dr7)
                on_debug = getattr(handler, "on_debug", None)
                if on_debug is not None and on_debug(self.vcpu, info):
                    continue
                self._finish("error", f"vCPU {index}: debug exit (exception {info.exception}, "
                                      f"pc {info.pc:#x}) with no debugger to take it")
                return
            elif reason == lib.KVM_EXIT_HLT:
                on_hlt = getattr(handler, "on_hlt", None)
                if on_hlt is not None and on_hlt(index):
                    continue
                self._finish("hlt", f"vCPU {index}: halted (no in-kernel irqchip)")
                return
            else:
                self._finish("error", f"vCPU {index}: unexpected {exit_reason_name(reason)}")
                return

    _SCALAR = {1: "uint8_t *", 2: "uint16_t *", 4: "uint32_t *"}

    def _port_io(self, ffi, lib, run, index: int) -> None:
        io = run.io
        size, count, port = io.size, io.count, io.port
        if count == 1:  # the common case, kept short: it is on every port exit's path
            ptr = ffi.cast(self._SCALAR[size], ffi.cast("uint8_t *", run) + io.data_offset)
            if io.direction == lib.KVM_EXIT_IO_OUT:
                self.handler.io_out(index, port, size, ptr[0])
            else:
                ptr[0] = self.handler.io_in(index, port, size) & ((1 << (8 * size)) - 1)
            return
        # rep ins/outs: `count` items of `size` bytes at data_offset in the run page.
        data = ffi.buffer(ffi.cast("uint8_t *", run) + io.data_offset, size * count)
        if io.direction == lib.KVM_EXIT_IO_OUT:
            for i in range(count):
                value = int.from_bytes(data[i * size:(i + 1) * size], "little")
                self.handler.io_out(index, port, size, value)
        else:
            mask = (1 << (8 * size)) - 1
            for i in range(count):
                value = self.handler.io_in(index, port, size) & mask
                data[i * size:(i + 1) * size] = value.to_bytes(size, "little")

    def _mmio(self, run, index: int) -> None:
        m = run.mmio
        size = m.len
        if m.is_write:
            value = int.from_bytes(bytes(m.data[0:size]), "little")
            self.handler.mmio_write(index, m.phys_addr, size, value)
        else:
            value = self.handler.mmio_read(index, m.phys_addr, size) & ((1 << (8 * size)) - 1)
            for i, b in enumerate(value.to_bytes(size, "little")):
                m.data[i] = b


def request_stop(vm) -> None:
    """Makes every vCPU loop of `vm` (Vm or its native block) return promptly."""
    native()[1].vmm_request_stop(getattr(vm, "native", vm))


def hold(vcpu, on: bool) -> None:
    """Holds (True) or releases a vCPU: while held its loop does not enter the guest when
    the machine is thawed; it still parks for a freeze and ends on a stop."""
    native()[1].vmm_vcpu_set_hold(vcpu.native, 1 if on else 0)


def freeze_requested(vcpu) -> bool:
    """True once a freeze (or a stop) was requested that this vCPU has not parked for
    yet: a vCPU thread waiting in an exit handler returns then, and parks at once
    without running guest code."""
    nat = vcpu.native
    vm = nat.vm
    return vm.freeze_gen != nat.seen_freeze_gen or bool(vm.stop)
