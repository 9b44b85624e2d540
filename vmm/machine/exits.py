"""ExitDispatcher: what a vCPU exit does (the handler protocol of
vmm/runtime/vcpu_thread.py). It owns the port and MMIO buses; internal errors and vCPU
stops go to the callables the machine gives. The machine is the handler the threads
hold and forwards to its dispatcher (so a caller may wrap one of its methods).

`debugger`: None, or what a debugger attached (vmm/debug/guest_debug.py): an object with
`debug_exit(vcpu, info) -> bool` (a KVM_EXIT_DEBUG; True: handled, re-enter) and
`internal_error(vcpu) -> bool` (asked first on an internal error: on PVM an int3 at CPL 0
cannot be emulated and arrives as one; True: it was the debugger's breakpoint)."""

from __future__ import annotations

from typing import Callable

from vmm.machine.devices import MmioBus, PortBus


class ExitDispatcher:
    """Owns the port and MMIO buses and forwards a vCPU thread's exits to them."""

    def __init__(self, on_internal_error: Callable[[object], bool],
                 on_stop: Callable[[int, str, str], None]):
        self.port_bus = PortBus()
        self.mmio_bus = MmioBus()
        self._on_internal_error = on_internal_error
        self._on_stop = on_stop
        self.debugger = None

    def io_in(self, vcpu_index: int, port: int, size: int) -> int:
        return self.port_bus.io_in(port, size, vcpu_index)

    def io_out(self, vcpu_index: int, port: int, size: int, value: int) -> None:
        self.port_bus.io_out(port, size, value, vcpu_index)

    def mmio_read(self, vcpu_index: int, addr: int, size: int) -> int:
        return self.mmio_bus.read(addr, size, vcpu_index)

    def mmio_write(self, vcpu_index: int, addr: int, size: int, value: int) -> None:
        self.mmio_bus.write(addr, size, value, vcpu_index)

    def on_internal_error(self, vcpu) -> bool:
        """True when the machine handled it (the vCPU runs on), else the vCPU stops."""
        return self._on_internal_error(vcpu)

    def on_debug(self, vcpu, info) -> bool:
        """A debug exit: the attached debugger's, else False (the vCPU stops)."""
        debugger = self.debugger
        return debugger is not None and debugger.debug_exit(vcpu, info)

    def debugger_internal_error(self, vcpu) -> bool:
        debugger = self.debugger
        return debugger is not None and debugger.internal_error(vcpu)

    def on_stop(self, vcpu_index: int, reason: str, detail: str) -> None:
        """A vCPU thread stopped: passed on to the machine."""
        self._on_stop(vcpu_index, reason, detail)
