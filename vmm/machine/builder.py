"""MachineBuilder: the assembly of a VM (vmm.runtime.Machine runs it).

This floor only assembles: it validates the options, writes the kernel, initrd, boot
parameters and tables into guest memory, creates the vCPUs and devices, dispatches
exits to the buses and records why the VM ended. The running machine (vCPU threads,
the console pump, the freeze coordinator) is vmm.runtime.machine.Machine, a subclass;
symbolizing RIPs with the kernel's symbols is passed down as `symbol_table`.

The build is a sequence of named steps, as in Firecracker's builder: create_vm,
setup_memory, setup_irqchip, load_kernel, load_initrd, write_boot_params, write_tables,
create_vcpus, setup_devices, start. A failing step's error keeps its class and gets the
step's name in front of its message (and in `error.build_step`).

Why a VM ended is always known: `wait()` returns a VmExit whose reason is one of
"exit-code", "reset", "shutdown", "timeout", "internal-error", "panic", "stopped".
"stopped" (exit code 0) is the host's stop() or the guest's ACPI power-off (S5).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vmm.errors import ConfigError, ImageError, VmmError
from vmm.machine import bootparams as bp
from vmm.machine import cpu as cpu_setup
from vmm.machine import images
from vmm.machine import layout as L
from vmm.machine import pvm, tables
from vmm.machine.devices import ExitPort, I8042, MmioBus, PortBus, ReportPort, Serial16550
from vmm.machine.devices.acpi_pm import PM1_CNT_LEN, PM1_EVT_LEN, SLP_TYP_S5, AcpiPm
from vmm.machine.diagnose import describe_vcpu

# The default command line for real Linux kernels:
#   console=ttyS0  the console on our COM1 16550
#   reboot=k       reboot through the i8042 (0xFE to port 0x64), which ends the VM as "reset"
#   panic=-1       reboot at once on panic instead of hanging (we also watch the console)
# KASLR stays on, as under QEMU: the introspection finds the slide and the randomized
# bases (vmm.kernel.live). PVM hosts add nokaslr (vmm.machine.pvm.pvm_cmdline).
DEFAULT_LINUX_CMDLINE = "console=ttyS0 reboot=k panic=-1"
PANIC_MARKER = b"Kernel panic - not syncing"
CONSOLE_TAIL_BYTES = 4096
EXIT_CODE_CRASH = 255  # panic, shutdown, internal error, timeout (as the CLI reports them)
REASONS = ("exit-code", "reset", "shutdown", "timeout", "internal-error", "panic", "stopped")
PIT_SPEAKER_DUMMY = 1  # KVM_PIT_SPEAKER_DUMMY: port 0x61 handled in the kernel
KVM_MP_STATE_UNINITIALIZED = 1

BUILD_STEPS = ("create_vm", "setup_memory", "setup_irqchip", "load_kernel", "load_initrd",
               "write_boot_params", "write_tables", "create_vcpus", "setup_devices", "start")


@dataclass(frozen=True)
class VmExit:
    reason: str
    exit_code: int
    detail: str
    console_tail: str

    def __str__(self) -> str:
        return f"VM ended: {self.reason} (exit code {self.exit_code}): {self.detail}"


class MachineBuilder:
    """A KVM virtual machine's assembly and exit dispatch; see docs/CONTRACTS.md.

    `symbol_table`: a callable taking the kernel ELF's bytes and returning an object with
    nearest(addr) -> (name, offset), used to name RIPs in internal-error reports (the
    session passes vmm.kernel's; without one RIPs stay numbers)."""

    def __init__(self, kernel, cpus: int = 1, memory: int | str = "512M", cmdline: str | None = None,
                 initrd=None, console=None, timeout: float | None = None,
                 boot_via_decompressor: bool | None = None, topology=None, pvm_assists: bool = True,
                 acpi: bool = True, symbol_table: Callable[[bytes], object] | None = None):
        if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= L.MAX_CPUS:
            raise ConfigError(f"cpus must be an integer from 1 to {L.MAX_CPUS}, not {cpus!r}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if cmdline is not None and not isinstance(cmdline, str):
            raise ConfigError(f"cmdline must be a string, not {type(cmdline).__name__}")
        if kernel is None:
            raise ConfigError("a kernel image is needed (vmlinux ELF or bzImage)")
        if boot_via_decompressor not in (None, True, False):
            raise ConfigError(f"boot_via_decompressor must be None (automatic), True or False, "
                              f"not {boot_via_decompressor!r}")
        self.kernel = kernel
        self.cpus = cpus
        self.memory_size = L.parse_memory_size(memory)
        self.topology = tables.Topology.parse(topology, cpus)
        self.requested_cmdline = cmdline
        self.initrd = initrd
        self.timeout = timeout
        self.boot_via_decompressor = boot_via_decompressor
        self.pvm_assists = pvm_assists
        self.acpi = acpi
        self._console_out = _console_writer(console)

        self.kvm = None
        self.vm = None
        self.memory = None
        self.vcpus: list = []
        self.threads: list = []
        self.pump = None
        self.coordinator = None
        self.port_bus = PortBus()
        self.mmio_bus = MmioBus()
        self.serial: Serial16550 | None = None
        self.report_port = ReportPort()
        self.cmdline = ""
        self.entry = 0
        self.kernel_end = 0
        self.initrd_range: tuple[int, int] | None = None
        self.is_linux = False
        self.notes: list[str] = []  # things worth knowing about this build (refused MSRs...)
        self.dirty = False  # for the pytest plugin's machine pool
        self.build_seconds: float | None = None
        self.started_at: float | None = None

        self._elf: images.ElfKernel | None = None
        self._bzimage: images.BzImage | None = None
        self._kernel_bytes: bytes | None = None
        self._console = bytearray()
        self._console_lock = threading.Lock()
        self._console_changed = threading.Condition(self._console_lock)
        self._exit: VmExit | None = None
        self._exit_lock = threading.Lock()
        self._done = threading.Event()
        self._stopped_threads = 0
        self._internal_error_detail: dict[int, str] = {}
        self._timer: threading.Timer | None = None
        self._torn_down = False
        self._teardown_lock = threading.Lock()
        self._pvm = None
        self._symbolizer = None
        self._symbol_table = symbol_table

    # === public ===================================================================================
    @property
    def reports(self) -> list[tuple[int, int]]:
        """(vcpu_index, value) for each 32-bit out to the report port, in arrival order."""
        return self.report_port.reports

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
        return dict(self.mmio_bus.unhandled)

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self._done.is_set()

    @property
    def exit(self) -> VmExit | None:
        """How the VM ended (None while it runs)."""
        return self._exit

    def build(self) -> "MachineBuilder":
        """Every build step but `start`, in order."""
        if self.vm is not None or self._torn_down:
            raise VmmError("this Machine was already built; build a new one")
        t0 = time.monotonic()
        try:
            for step in BUILD_STEPS[:-1]:
                self._run_step(step)
        except BaseException:
            self._teardown()  # a half-built machine holds fds and RAM: free them now
            raise
        self.build_seconds = time.monotonic() - t0
        return self

    def stop(self) -> VmExit | None:
        """Stops the VM (reason "stopped" unless it had already ended) and frees it."""
        if self.started_at is not None:
            self._finish("stopped", 0, "stopped by the host")
        self._teardown()
        return self._exit

    close = stop

    def __enter__(self) -> "MachineBuilder":
        if self.started_at is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def console_text(self) -> str:
        with self._console_lock:
            return self._console.decode("utf-8", "replace")

    def console_bytes(self) -> bytes:
        with self._console_lock:
            return bytes(self._console)

    def console_tail(self, lines: int = 50) -> str:
        text = self.console_text()
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_console(self, pattern: str | re.Pattern, timeout: float | None = None,
                         start: int = 0) -> re.Match:
        """The first match of `pattern` in the console text (from offset `start`).
        GuestBootError with the console tail when the VM ends or `timeout` passes first."""
        from vmm.errors import GuestBootError

        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = None if timeout is None else time.monotonic() + timeout
        flushed = False
        while True:
            with self._console_changed:
                match = regex.search(self._console.decode("utf-8", "replace"), start)
                if match:
                    return match
                if flushed:
                    why = f"the VM ended ({self._exit})" if self._exit else "the VM is not running"
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    why = f"{timeout:g} s passed"
                    break
                if not self._done.is_set():
                    self._console_changed.wait(0.25 if left is None else min(left, 0.25))
                    continue
            # The VM ended: stop the pump after its final drain, then look once more.
            self._teardown()
            flushed = True
        tail = "\n".join(self._console.decode("utf-8", "replace").splitlines()[-30:])
        raise GuestBootError(f"console never matched {regex.pattern!r}: {why}. Console tail:\n{tail}")

    def feed_console(self, data: bytes) -> None:
        """Bytes typed into COM1 (the guest reads them from RBR)."""
        if self.serial is None or self._torn_down:
            raise VmmError("the machine's serial port is gone (not built, or the VM ended)")
        self.serial.feed(data)

    def describe_state(self) -> str:
        lines = [f"kernel {self.kernel}, {self.cpus} vCPU(s), {self.memory_size >> 20} MiB, "
                 f"cmdline {self.cmdline!r}"]
        lines.append(f"running: {self.running}; exit: {self._exit}")
        for t in self.threads:
            lines.append(f"  {t.name}: alive={t.is_alive()} stop={t.stop_reason} "
                         f"python_exits={t.python_exits} {t.stop_detail}")
        if self.unhandled_io:
            lines.append("unhandled ports: " + ", ".join(f"{p:#x}x{n}" for p, n in sorted(self.unhandled_io.items())))
        lines.extend(self.notes)
        return "\n".join(lines)

    # === build steps ==================================================================================
    def _run_step(self, step: str) -> None:
        try:
            getattr(self, "_start" if step == "start" else step)()
        except VmmError as e:
            if getattr(e, "build_step", None) is None:
                e.build_step = step
                if e.args and isinstance(e.args[0], str):
                    e.args = (f"building the machine, step {step}: {e.args[0]}",) + e.args[1:]
            raise
        except (OSError, ValueError, TypeError, OverflowError) as e:
            error = VmmError(f"building the machine, step {step}: {type(e).__name__}: {e}")
            error.build_step = step
            raise error from e

    def create_vm(self) -> None:
        from vmm.kvm import Kvm

        self.kvm = Kvm()
        for cap in ("IRQCHIP", "PIT2", "USER_MEMORY", "SET_TSS_ADDR", "IMMEDIATE_EXIT", "MP_STATE"):
            self.kvm.require(cap)
        self.vm = self.kvm.create_vm()
        # VMX needs these for real-mode emulation; they lie in the MMIO gap, outside RAM.
        self.vm.set_tss_addr(L.KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(L.KVM_IDENTITY_MAP_ADDR)

    def setup_memory(self) -> None:
        from vmm.kvm import GuestMemory

        self.memory = GuestMemory(self.memory_size)
        self.memory.register(self.vm)

    def setup_irqchip(self) -> None:
        # In-kernel LAPICs, IOAPIC and 8259s: interrupts and INIT/SIPI never reach Python.
        self.vm.create_irqchip()
        self.vm.create_pit2(PIT_SPEAKER_DUMMY)

    def load_kernel(self) -> None:
        data = self._kernel_bytes = images.read_image(self.kernel)
        kind = images.detect_kernel_format(data)
        if kind == "bzimage":
            self._bzimage = images.parse_bzimage(data)
            self.is_linux = True
            if self.decompress_in_guest:
                self._load_bzimage_protected_mode()
                return
            # On PVM hosts (the automatic choice there) decompress on the host and boot the
            # vmlinux inside: the guest's own decompressor would run in emulated ring 0
            # (~5000x slower) and its zstd decoder uses BMI2, which the emulator cannot
            # execute. The vmlinux then runs where it was linked: no KASLR.
            data = images.extract_vmlinux(data)
        self._elf = images.parse_elf_kernel(data)
        self.is_linux = self.is_linux or self._elf.is_linux
        for seg in self._elf.segments:
            if seg.paddr < L.HIMEM_START:
                raise ImageError(f"kernel segment at {seg.paddr:#x} would overwrite the boot "
                                 f"structures below 1 MiB")
            if not self.memory.contains(seg.paddr, seg.memsz):
                raise ImageError(f"kernel segment [{seg.paddr:#x}, {seg.paddr + seg.memsz:#x}) "
                                 f"does not fit in {self.memory_size >> 20} MiB of RAM")
            # Guest RAM is a fresh anonymous mapping: the bss part is already zero.
            self.memory.write(seg.paddr, seg.data)
        self.entry = self._elf.entry
        self.kernel_end = self._elf.end

    def _load_bzimage_protected_mode(self) -> None:
        """Boot through the bzImage's own decompressor via its 64-bit entry (startup_64 at
        load address + 0x200), as boot.rst's 64-bit boot protocol describes."""
        bz = self._bzimage
        if not bz.xloadflags & bp.XLF_KERNEL_64:
            raise ImageError("this bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")
        load = L.BZIMAGE_LOAD_START if bz.relocatable else (bz.pref_address or L.BZIMAGE_LOAD_START)
        code = bz.protected_mode_code
        # The decompressor works in [pref_address, pref_address + init_size).
        end = max(load + len(code), (bz.pref_address or load) + bz.init_size)
        if not self.memory.contains(load, end - load):
            raise ImageError(f"bzImage needs [{load:#x}, {end:#x}) but the guest has "
                             f"{self.memory_size >> 20} MiB of RAM")
        self.memory.write(load, code)
        self.entry = load + 0x200
        self.kernel_end = end

    @property
    def decompress_in_guest(self) -> bool:
        """Whether a bzImage boots through its own decompressor: `boot_via_decompressor`
        when given, else automatic: yes with hardware virtualization (the kernel relocates
        and randomizes itself, as under QEMU), no on PVM hosts."""
        if self.boot_via_decompressor is not None:
            return self.boot_via_decompressor
        return not _is_pvm_host()

    def load_initrd(self) -> None:
        if self.initrd is None:
            return
        data = self.initrd
        if not isinstance(data, (bytes, bytearray, memoryview)):
            try:
                data = Path(data).read_bytes()
            except OSError as e:
                raise ImageError(f"cannot read initrd {self.initrd}: {e.strerror}") from None
        if not data:
            raise ImageError("the initrd is empty")
        limit = self._bzimage.initrd_addr_max if self._bzimage else L.DEFAULT_INITRD_ADDR_MAX
        addr = L.initrd_address(self.memory_size, len(data), self.kernel_end, limit)
        self.memory.write(addr, bytes(data))
        self.initrd_range = (addr, len(data))

    def compose_cmdline(self) -> str:
        if self.requested_cmdline is not None:
            cmdline = self.requested_cmdline
        else:
            cmdline = DEFAULT_LINUX_CMDLINE if self.is_linux else ""
        if self.is_linux and self.pvm_assists and _is_pvm_host():
            cmdline = pvm.pvm_cmdline(cmdline)
        return cmdline

    def write_boot_params(self) -> None:
        zp = bp.BootParams()
        if self._bzimage is not None and self.decompress_in_guest:
            zp.copy_setup_header(self._bzimage.data)
            max_cmdline = self._bzimage.cmdline_size
        else:
            zp["boot_flag"] = bp.BOOT_FLAG_MAGIC
            zp["header"] = bp.HDRS_MAGIC
            zp["version"] = bp.PROTOCOL_VERSION
            zp["kernel_alignment"] = 0x200000
            max_cmdline = L.CMDLINE_MAX_SIZE - 1
        zp["type_of_loader"] = bp.TYPE_OF_LOADER_UNDEFINED
        zp["loadflags"] = zp["loadflags"] | bp.LOADED_HIGH

        self.cmdline = self.compose_cmdline()
        raw = self.cmdline.encode()
        if b"\0" in raw:
            raise ConfigError("the kernel command line contains a NUL byte")
        if len(raw) > max_cmdline:
            raise ConfigError(f"the kernel command line is {len(raw)} bytes; this kernel takes at "
                              f"most {max_cmdline}")
        self.memory.write(L.CMDLINE_START, raw + b"\0")
        zp["cmd_line_ptr"] = L.CMDLINE_START
        zp["cmdline_size"] = len(raw) + 1

        if self.initrd_range is not None:
            addr, size = self.initrd_range
            zp["ramdisk_image"] = addr & 0xFFFFFFFF
            zp["ramdisk_size"] = size & 0xFFFFFFFF
            zp["ext_ramdisk_image"] = addr >> 32
            zp["ext_ramdisk_size"] = size >> 32
        zp.set_e820(L.e820_map(self.memory_size))
        if self.acpi:
            zp["acpi_rsdp_addr"] = L.RSDP_START
        self.memory.write(L.ZERO_PAGE_START, zp.to_bytes())

    def write_tables(self) -> None:
        """Page tables and GDT for the boot vCPU, the MP table and ACPI tables."""
        for gpa, page in L.identity_page_tables():
            self.memory.write(gpa, page)
        self.memory.write(L.GDT_START, cpu_setup.gdt_bytes())
        self.memory.write(L.IDT_START, bytes(8))
        apic_ids = self.topology.apic_ids()
        if len(apic_ids) <= tables.MP_MAX_CPUS:
            self.memory.write(L.MPTABLE_START, tables.mp_table(apic_ids))
        else:
            self.notes.append(f"no MP table: {len(apic_ids)} CPUs exceed its {tables.MP_MAX_CPUS}; ACPI only")
        if self.acpi:
            blob, _ = tables.acpi_tables(apic_ids)
            self.memory.write(L.ACPI_START, blob)

    def create_vcpus(self) -> None:
        from vmm.machine.cpu import cpuid_to_list

        supported = cpuid_to_list(self.kvm.supported_cpuid())
        for index in range(self.cpus):
            vcpu = self.vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            if index == 0:
                # Paravirtual leaves and the TSC frequency, as QEMU gives a KVM guest.
                from vmm.kvm.kvm import KVM_CAP_TSC_DEADLINE_TIMER

                supported = cpu_setup.paravirt_cpuid(
                    supported, tsc_khz=vcpu.get_tsc_khz(),
                    tsc_deadline=self.kvm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER) > 0)
                self.notes.append(cpu_setup.describe_paravirt(supported))
            cpu_setup.setup_vcpu_cpuid(vcpu, supported, self.topology)
            refused = cpu_setup.set_boot_msrs(vcpu)
            if refused and index == 0:
                self.notes.append("host refused boot MSRs " + ", ".join(f"{m:#x}" for m in refused))
            cpu_setup.setup_fpu(vcpu)
            if index == 0:
                cpu_setup.setup_boot_vcpu(vcpu, self.entry)
            # Application processors keep KVM's reset state: with the in-kernel irqchip
            # that is INIT-wait (MP_STATE_UNINITIALIZED) until the guest sends INIT/SIPI.

    def setup_devices(self) -> None:
        vm = self.vm
        self.serial = Serial16550(
            L.COM1_PORT,
            out=self._serial_out,
            irq=lambda level: vm.irq_line(L.COM1_IRQ, level),
            fast_path_changed=vm.set_serial_fast,
        )
        vm.set_serial_fast(self.serial.fast_path)
        self.port_bus.register(L.COM1_PORT, L.COM1_PORT_COUNT, self.serial)
        i8042 = I8042(reset=lambda: self._finish("reset", 0, "the guest asked for a reset (i8042 0xFE)"))
        self.port_bus.register(L.I8042_DATA_PORT, 1, i8042)
        self.port_bus.register(L.I8042_COMMAND_PORT, 1, i8042)
        self.port_bus.register(L.EXIT_PORT, 1, ExitPort(
            on_exit=lambda code: self._finish("exit-code", code, f"the guest wrote {code} to the exit port")))
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
            self._finish("stopped", 0, "the guest powered off (ACPI S5)")
        else:
            self.notes.append(f"the guest asked for ACPI sleep type {sleep_type}; ignored")

    # === exit handler protocol (vmm/runtime/vcpu_thread.py) ===========================================
    def io_in(self, vcpu_index: int, port: int, size: int) -> int:
        return self.port_bus.io_in(port, size, vcpu_index)

    def io_out(self, vcpu_index: int, port: int, size: int, value: int) -> None:
        self.port_bus.io_out(port, size, value, vcpu_index)

    def mmio_read(self, vcpu_index: int, addr: int, size: int) -> int:
        return self.mmio_bus.read(addr, size, vcpu_index)

    def mmio_write(self, vcpu_index: int, addr: int, size: int, value: int) -> None:
        self.mmio_bus.write(addr, size, value, vcpu_index)

    def on_internal_error(self, vcpu) -> bool:
        on_pvm = _is_pvm_host()
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

    def on_stop(self, vcpu_index: int, reason: str, detail: str) -> None:
        if reason == "stopped":
            return  # we asked for it: _finish has recorded why
        if reason == "shutdown":
            self._finish("shutdown", EXIT_CODE_CRASH, f"{detail} (the guest triple-faulted or shut down)")
        elif reason == "system-event" and "reset" in detail:
            self._finish("reset", 0, detail)
        elif reason == "system-event" and "shutdown" in detail:
            self._finish("shutdown", EXIT_CODE_CRASH, detail)
        else:  # internal-error, fail-entry, error, a crash event
            extra = self._internal_error_detail.get(vcpu_index)
            self._finish("internal-error", EXIT_CODE_CRASH, detail + (f"; {extra}" if extra else ""))

    # === internals =======================================================================================
    def _serial_out(self, data: bytes) -> None:
        # Through the C ring, so slow-path bytes keep their order with fast-path ones.
        if self.pump is not None:
            self.pump.push(data)
        else:
            self._console_sink(data)

    def _console_sink(self, data: bytes) -> None:
        with self._console_changed:
            scan_from = max(0, len(self._console) - len(PANIC_MARKER))
            self._console += data
            panicked = PANIC_MARKER in self._console[scan_from:]
            self._console_changed.notify_all()
        if self._console_out is not None:
            try:
                self._console_out(data)
            except Exception:  # a broken console sink must not kill the pump
                self._console_out = None
        if panicked:
            line = self._panic_line()
            self._finish("panic", EXIT_CODE_CRASH, line)

    def _panic_line(self) -> str:
        text = self.console_text()
        i = text.rfind(PANIC_MARKER.decode())
        return text[i:].splitlines()[0] if i >= 0 else "kernel panic"

    def _finish(self, reason: str, exit_code: int, detail: str) -> None:
        """Records why the VM ended (the first reason wins) and stops every vCPU."""
        with self._exit_lock:
            if self._exit is None:
                with self._console_lock:
                    tail = bytes(self._console[-CONSOLE_TAIL_BYTES:]).decode("utf-8", "replace")
                self._exit = VmExit(reason, exit_code, detail, tail)
        self._request_stop()
        self._done.set()
        with self._console_changed:
            self._console_changed.notify_all()

    def _request_stop(self) -> None:
        """Asks every running vCPU to leave KVM_RUN: the running machine's part
        (vmm.runtime.Machine); an assembly alone has no vCPU threads."""

    def start(self) -> "MachineBuilder":
        raise VmmError("a MachineBuilder only assembles a VM; run it as vmm.runtime.Machine "
                       "(or vmm.Machine)")

    def _teardown(self) -> None:
        with self._teardown_lock:
            if self._torn_down:
                return
            self._torn_down = True
        if self._timer is not None:
            self._timer.cancel()
        self._request_stop()
        me = threading.current_thread()
        for t in self.threads:
            if t is not me:
                t.join(10.0)
        if self.pump is not None:
            self.pump.stop()
        if self._exit is not None:
            # Output drained after the end (the pump's final drain) belongs in the tail.
            tail = bytes(self._console[-CONSOLE_TAIL_BYTES:]).decode("utf-8", "replace")
            self._exit = VmExit(self._exit.reason, self._exit.exit_code, self._exit.detail, tail)
        if self.vm is not None:
            if self.vm.native is not None:  # keep C's unclaimed-port counts past close
                self.port_bus.unhandled.update(self.vm.port_misses())
            self.vm.close()
        self.vcpus = []
        if self.memory is not None and not any(t.is_alive() for t in self.threads):
            self.memory.close()
        if self.kvm is not None:
            self.kvm.close()
        self._done.set()

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
                return f"{name}+{offset:#x}"
            except VmmError:
                continue
        return None


def _console_writer(console) -> Callable[[bytes], None] | None:
    if console is None:
        return None
    if callable(console) and not hasattr(console, "write"):
        return console
    if hasattr(console, "write"):
        def write(data: bytes, stream=console) -> None:
            stream.write(data)
            flush = getattr(stream, "flush", None)
            if flush is not None:
                flush()
        return write
    raise ConfigError(f"console must be a binary stream, a callable or None, not {console!r}")


def _is_pvm_host() -> bool:
    from vmm.kvm.pvm import is_pvm_host

    return is_pvm_host()
