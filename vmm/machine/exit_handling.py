"""The machine's side of its devices and exits: what the guest can reach and how the VM ends.

MachineBuilder (vmm/machine/builder.py) is the assembly; this mixin holds the other idea:
the devices wired on the port bus (setup_devices, the build step whose callbacks end the
VM), the exit handler protocol the vCPU threads call (vmm/runtime/vcpu_thread.py), the
console sink that ends the VM on a panic line, and the one place why the VM ended is
recorded (_finish: the first reason wins, as a VmExit with the console's tail), with RIPs
named by the kernel's symbols (`symbol_table`) in internal-error reports. The running
machine (vmm.runtime.Machine) overrides the hooks marked as its part.

It reads the builder's state (vm, memory, port_bus, mmio_bus, exits, console_log,
report_port, notes, acpi, pvm_assists, _elf, _bzimage, _kernel_bytes, _symbol_table and
the _exit* fields), which MachineBuilder.__init__ sets.
"""

from __future__ import annotations

from vmm.errors import VmmError
from vmm.machine import layout as L
from vmm.machine import pvm
from vmm.machine.devices import ExitPort, I8042, Serial16550
from vmm.machine.devices.acpi_pm import PM1_CNT_LEN, PM1_EVT_LEN, SLP_TYP_S5, AcpiPm
from vmm.machine.diagnose import describe_vcpu
from vmm.machine.vmexit import EXIT_CODE_CRASH, ExitReason, StopReason, VmExit

CONSOLE_TAIL_BYTES = 4096  # the console's tail a VmExit carries
# A report names an address "symbol+offset" only this close to the symbol (kernel
# functions are far smaller); an address past the kernel's image names nothing.
MAX_SYMBOL_OFFSET = 0x100000


class ExitHandling:
    """Devices, exits and the VM's end: a mixin of MachineBuilder."""

    # === devices ===================================================================================
    @property
    def unhandled_io(self) -> dict[int, int]:
        """{port: accesses} to ports no device claims (read as all-ones, writes dropped).

        Most are completed in C without a Python call (see setup_devices); the rest
        (exits that reached Python before the filter knew the port) are counted here."""
        counts = dict(self.port_bus.unhandled)
        if not self._torn_down and self.vm is not None and self.vm.native is not None:
            for port, n in self.vm.port_misses().items():
                counts[port] = counts.get(port, 0) + n
        return counts

    @property
    def unhandled_mmio(self) -> dict[int, int]:
        """{address: count} of MMIO accesses no device claimed."""
        return dict(self.mmio_bus.unhandled)

    def setup_devices(self) -> None:
        """Build step: COM1, COM2 (requests), the i8042, the exit and report ports and ACPI PM
        on the port bus."""
        vm = self.vm
        self.serial = Serial16550(
            L.COM1_PORT,
            out=self._serial_out,
            irq=lambda level: vm.irq_line(L.COM1_IRQ, level),
            fast_path_changed=vm.set_serial_fast,
        )
        vm.set_serial_fast(self.serial.fast_path)
        self.port_bus.register(L.COM1_PORT, L.COM1_PORT_COUNT, self.serial)
        # COM2 carries requests from the guest (vmm/runtime/requests.py), always there: a
        # UART costs nothing until used, and Linux's 8250 driver probes it as ttyS1 at boot.
        # Only Python sees it (the C fast path is COM1's), so COM1 is unchanged.
        self.request_serial = Serial16550(
            L.COM2_PORT,
            out=self._request_bytes,
            irq=lambda level: vm.irq_line(L.COM2_IRQ, level),
        )
        self.port_bus.register(L.COM2_PORT, L.COM2_PORT_COUNT, self.request_serial)
        i8042 = I8042(reset=lambda: self._finish(ExitReason.RESET, 0, "the guest asked for a reset (i8042 0xFE)"))
        self.port_bus.register(L.I8042_DATA_PORT, 1, i8042)
        self.port_bus.register(L.I8042_COMMAND_PORT, 1, i8042)
        self.port_bus.register(L.EXIT_PORT, 1, ExitPort(
            on_exit=lambda code: self._finish(ExitReason.EXIT_CODE, code, f"the guest wrote {code} to the exit port")))
        self.port_bus.register(L.REPORT_PORT, 4, self.report_port)
        if self.acpi:
            pm = AcpiPm(L.ACPI_PM1_EVT_PORT, L.ACPI_PM1_CNT_PORT, sleep=self._acpi_sleep)
            self.port_bus.register(L.ACPI_PM1_EVT_PORT, PM1_EVT_LEN, pm)
            self.port_bus.register(L.ACPI_PM1_CNT_PORT, PM1_CNT_LEN, pm)
        # Every other port is an empty ISA bus: let the C loop complete those exits
        # (all-ones reads, dropped writes, counted) instead of a Python call each.
        for start, length in self.port_bus.ranges():
            vm.claim_ports(start, length)
        vm.set_port_filter(True)

    def _acpi_sleep(self, sleep_type: int) -> None:
        if sleep_type == SLP_TYP_S5:
            self._finish(ExitReason.STOPPED, 0, "the guest powered off (ACPI S5)")
        else:  # once per type (SLP_TYP is 3 bits): a guest asking in a loop adds no more
            note = f"the guest asked for ACPI sleep type {sleep_type}; ignored"
            if note not in self.notes:
                self.notes.append(note)

    # === exit handler protocol (vmm/runtime/vcpu_thread.py) ===========================================
    # The vCPU threads call the machine; port and MMIO exits go on to self.exits (which owns
    # the buses). They stay methods of the machine so that a caller can wrap one (tests do).
    def io_in(self, vcpu_index: int, port: int, size: int) -> int:
        """A vCPU's port read, forwarded to the port bus."""
        return self.exits.io_in(vcpu_index, port, size)

    def io_out(self, vcpu_index: int, port: int, size: int, value: int) -> None:
        """A vCPU's port write, forwarded to the port bus."""
        self.exits.io_out(vcpu_index, port, size, value)

    def mmio_read(self, vcpu_index: int, addr: int, size: int) -> int:
        """A vCPU's MMIO read, forwarded to the MMIO bus."""
        return self.exits.mmio_read(vcpu_index, addr, size)

    def mmio_write(self, vcpu_index: int, addr: int, size: int, value: int) -> None:
        """A vCPU's MMIO write, forwarded to the MMIO bus."""
        self.exits.mmio_write(vcpu_index, addr, size, value)

    def on_internal_error(self, vcpu) -> bool:
        """A KVM internal error: True when a PVM assist handled it (re-enter); else its
        description is kept for the VM's exit."""
        from vmm.kvm.pvm import is_pvm_host  # loads the C core: only when it comes to this

        on_pvm = is_pvm_host()
        if on_pvm and self.pvm_assists and pvm.assist_internal_error(vcpu, self.memory):
            return True
        detail = describe_vcpu(vcpu, self.memory, self._symbolize)
        if on_pvm:
            try:  # names the instruction and the command-line option that avoids it
                detail = pvm.describe_failure(vcpu, self.memory, self._symbolize)
            except VmmError:
                pass
        self._internal_error_detail[vcpu.index] = detail
        return False

    def on_stop(self, vcpu_index: int, reason: StopReason, detail: str) -> None:
        """A vCPU thread stopped: ends the VM with the matching ExitReason (a host stop is
        already recorded)."""
        if reason == StopReason.STOPPED:
            return  # we asked for it: _finish has recorded why
        if reason == StopReason.SHUTDOWN:
            self._finish(ExitReason.SHUTDOWN, EXIT_CODE_CRASH, f"{detail} (the guest triple-faulted or shut down)")
        elif reason == StopReason.SYSTEM_EVENT and "reset" in detail:
            self._finish(ExitReason.RESET, 0, detail)
        elif reason == StopReason.SYSTEM_EVENT and "shutdown" in detail:
            self._finish(ExitReason.SHUTDOWN, EXIT_CODE_CRASH, detail)
        else:  # internal-error, fail-entry, error, a crash event
            extra = self._internal_error_detail.get(vcpu_index)
            self._finish(ExitReason.INTERNAL_ERROR, EXIT_CODE_CRASH, detail + (f"; {extra}" if extra else ""))

    # === the VM's end =================================================================================
    def _serial_out(self, data: bytes) -> None:
        # The running machine sends these through its console pump instead.
        self._console_sink(data)

    def _request_bytes(self, data: bytes) -> None:
        """Bytes the guest sent on COM2; the running machine serves them as requests
        (an assembly alone drops them)."""

    def _console_sink(self, data: bytes) -> None:
        if self.console_log.append(data):
            self._finish(ExitReason.PANIC, EXIT_CODE_CRASH, self.console_log.panic_line())

    def _finish(self, reason: ExitReason, exit_code: int, detail: str) -> None:
        """Records why the VM ended (the first reason wins) and stops every vCPU."""
        with self._exit_lock:
            if self._exit is None:
                tail = self.console_log.tail(CONSOLE_TAIL_BYTES)
                self._exit = VmExit(reason, exit_code, detail, tail)
        self._request_stop()
        self._done.set()
        self.console_log.notify()

    def _request_stop(self) -> None:
        """Asks every running vCPU to leave KVM_RUN: the running machine's part
        (vmm.runtime.Machine); an assembly alone has no vCPU threads."""

    def _symbolize(self, addr: int) -> str | None:
        """"name+0xoff" for a kernel address when the kernel ELF has a symbol table."""
        if self._symbolizer is None:
            self._symbolizer = False
            if self._elf is not None and self._bzimage is None:
                try:
                    if self._symbol_table is not None:
                        self._symbolizer = self._symbol_table(self._kernel_bytes)
                except (VmmError, ImportError, AttributeError):
                    pass
        if not self._symbolizer:
            return None
        candidates = [addr]
        if addr < L.MMIO_GAP_END:  # a physical RIP (identity map): try the kernel map too
            candidates.append(addr + 0xFFFFFFFF80000000)
        for a in candidates:
            try:
                name, offset = self._symbolizer.nearest(a)
                if offset <= MAX_SYMBOL_OFFSET:  # farther: past the image, no symbol's own
                    return f"{name}+{offset:#x}"
            except VmmError:
                continue
        return None
