"""MachineBuilder: the assembly of a VM (vmm.runtime.Machine runs it).

This floor only assembles: it validates the options, writes the kernel, initrd, boot
parameters and tables into guest memory, creates the vCPUs and devices, dispatches
exits to the buses and records why the VM ended. The last three (the devices wiring,
the exit handler protocol, the VM's end) are exit_handling.ExitHandling, a mixin this
class inherits; this file is the assembly itself. The running machine (vCPU threads,
the console pump, the freeze coordinator) is vmm.runtime.machine.Machine, a subclass;
symbolizing RIPs with the kernel's symbols is passed down as `symbol_table`.

The build is a sequence of named steps, as in Firecracker's builder: create_vm,
setup_memory, setup_irqchip, load_kernel, load_initrd, write_boot_params, write_tables,
create_vcpus, setup_devices, start. A failing step's error keeps its class and gets the
step's name in front of its message (and in `error.build_step`).

Why a VM ended is always known: `wait()` returns a VmExit (vmm.machine.vmexit).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from vmm.errors import ConfigError, VmmError
from vmm.image import bootparams as bp
from vmm.image import formats as images
from vmm.machine import cpu as cpu_setup
from vmm.machine import loader
from vmm.machine import layout as L
from vmm.machine import pvm, tables
from vmm.machine.config import MachineConfig
from vmm.machine.console_log import DEFAULT_WINDOW, PANIC_MARKER, ConsoleLog, console_writer  # noqa: F401 (re-exported)
from vmm.machine.devices import ReportPort, Serial16550
from vmm.machine.exit_handling import CONSOLE_TAIL_BYTES, MAX_SYMBOL_OFFSET, ExitHandling  # noqa: F401
from vmm.machine.exits import ExitDispatcher
from vmm.machine.vmexit import REASONS, ExitReason, VmExit  # noqa: F401 (REASONS re-exported)

# The default command line for real Linux kernels:
#   console=ttyS0  the console on our COM1 16550
#   reboot=k       reboot through the i8042 (0xFE to port 0x64), which ends the VM as "reset"
#   panic=-1       reboot at once on panic instead of hanging (we also watch the console)
# KASLR stays on, as under QEMU: the introspection finds the slide and the randomized
# bases (vmm.kernel.live). PVM hosts add nokaslr (vmm.machine.pvm.pvm_cmdline).
DEFAULT_LINUX_CMDLINE = "console=ttyS0 reboot=k panic=-1"
PIT_SPEAKER_DUMMY = 1  # KVM_PIT_SPEAKER_DUMMY: port 0x61 handled in the kernel

BUILD_STEPS = ("create_vm", "setup_memory", "setup_irqchip", "load_kernel", "load_initrd",
               "write_boot_params", "write_tables", "create_vcpus", "setup_devices", "start")


class MachineBuilder(ExitHandling):
    """A KVM virtual machine's assembly and exit dispatch; see docs/CONTRACTS.md.

    `symbol_table`: a callable taking the kernel ELF (its bytes or its path) and returning an object with
    nearest(addr) -> (name, offset), used to name RIPs in internal-error reports (the
    session passes vmm.kernel's; without one RIPs stay numbers)."""

    def __init__(self, kernel, cpus: int | None = None, memory="512M", cmdline: str | None = None,
                 initrd=None, console=None, timeout: float | None = None,
                 boot_via_decompressor: bool | None = None, topology=None, pvm_assists: bool = True,
                 acpi: bool = True, symbol_table: Callable[[bytes | str], object] | None = None,
                 default_initrd: Callable[[], Any] | None = None,
                 after_build: Callable[[], None] | None = None,
                 console_window: int | str = DEFAULT_WINDOW, console_log=None):
        """`default_initrd`: for a Linux kernel given no initrd, called at load_initrd for
        one (the session's spinning init). `after_build`: called once every step but start
        has run, before any vCPU does; it may refuse (the session's kernel config check),
        and the half-built machine is freed then."""
        self.config = config = MachineConfig.create(
            kernel, cpus=cpus, memory=memory, cmdline=cmdline, initrd=initrd, timeout=timeout,
            boot_via_decompressor=boot_via_decompressor, topology=topology,
            pvm_assists=pvm_assists, acpi=acpi)
        self.kernel = config.kernel
        self.cpus = config.cpus
        self.memory_size = config.memory_size
        self.topology = config.topology
        self.requested_cmdline = config.cmdline
        self.initrd = config.initrd
        self.timeout = config.timeout
        self.boot_via_decompressor = config.boot_via_decompressor
        self.pvm_assists = config.pvm_assists
        self.acpi = config.acpi
        # The console kept in memory is its last `console_window` bytes; `console_log`
        # (a path) gets every byte, owner-only (vmm/machine/console_log.py).
        self.console_log = ConsoleLog(console_writer(console), console_window, console_log)
        self._symbol_table = symbol_table
        self._default_initrd = default_initrd
        self._after_build = after_build

        self.kvm = None
        self.vm = None
        self.memory = None
        self.vcpus: list = []
        self.exits = ExitDispatcher(self.on_internal_error, self.on_stop)
        self.port_bus = self.exits.port_bus
        self.mmio_bus = self.exits.mmio_bus
        self.serial: Serial16550 | None = None
        self.request_serial: Serial16550 | None = None  # COM2: requests from the guest
        self.report_port = ReportPort()
        self.cmdline = ""
        self.entry = 0
        self.kernel_end = 0
        self.initrd_range: tuple[int, int] | None = None
        self.is_linux = False
        self.loaded: loader.LoadedKernel | None = None
        self.notes: list[str] = []  # things worth knowing about this build (refused MSRs...)
        self.dirty = False  # for the pytest plugin's machine pool
        self.build_seconds: float | None = None
        self.started_at: float | None = None

        self._elf: images.ElfKernel | None = None
        self._bzimage: images.BzImage | None = None
        self._kernel_bytes: bytes | None = None
        self._exit: VmExit | None = None
        self._exit_lock = threading.Lock()
        self._done = threading.Event()
        self._stopped_threads = 0
        self._internal_error_detail: dict[int, str] = {}
        self._torn_down = False
        self._teardown_lock = threading.Lock()
        self._pvm = None
        self._symbolizer = None

    # === public ===================================================================================
    @property
    def reports(self) -> list[tuple[int, int]]:
        """(vcpu_index, value) for each 32-bit out to the report port, in arrival order."""
        return self.report_port.reports

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
            self.build_seconds = time.monotonic() - t0
            if self._after_build is not None:
                self._after_build()
        except BaseException:
            self._teardown()  # a half-built machine holds fds and RAM: free them now
            raise
        return self

    def stop(self) -> VmExit | None:
        """Stops the VM (reason "stopped" unless it had already ended) and frees it."""
        if self.started_at is not None:
            self._finish(ExitReason.STOPPED, 0, "stopped by the host")
        self._teardown()
        return self._exit

    close = stop

    def console_text(self) -> str:
        """What the guest printed, decoded (invalid UTF-8 replaced): all of it, or its last
        `console_window` bytes once it printed more (the `console_log` file has all)."""
        return self.console_log.text()

    def console_bytes(self) -> bytes:
        """console_text()'s bytes: the console window (console_log.dropped bytes before it)."""
        return self.console_log.as_bytes()

    def console_tail(self, lines: int = 50) -> str:
        """The console's last `lines` lines."""
        text = self.console_text()
        return "\n".join(text.splitlines()[-lines:])

    def feed_console(self, data: bytes) -> None:
        """Bytes typed into COM1 (the guest reads them from RBR)."""
        if self.serial is None or self._torn_down:
            raise VmmError("the machine's serial port is gone (not built, or the VM ended)")
        self.serial.feed(data)

    # === build steps ==================================================================================
    def _run_step(self, step: str, **options) -> None:
        try:
            getattr(self, "_start" if step == "start" else step)(**options)
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
        """Build step: open /dev/kvm and create the VM."""
        from vmm.kvm import Kvm

        self.kvm = Kvm()
        for cap in ("IRQCHIP", "PIT2", "USER_MEMORY", "SET_TSS_ADDR", "IMMEDIATE_EXIT", "MP_STATE"):
            self.kvm.require(cap)
        self.vm = self.kvm.create_vm()
        # VMX needs these for real-mode emulation; they lie in the MMIO gap, outside RAM.
        self.vm.set_tss_addr(L.KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(L.KVM_IDENTITY_MAP_ADDR)

    def setup_memory(self) -> None:
        """Build step: allocate guest RAM and register it with the VM."""
        from vmm.kvm import GuestMemory

        # One slot per NUMA node's RAM range (cut where the nodes meet, as e820 and SRAT are).
        self.memory = GuestMemory(self.memory_size,
                                  split_at=self.topology.memory_boundaries(self.memory_size))
        self.memory.register(self.vm)

    def setup_irqchip(self) -> None:
        """Build step: the in-kernel interrupt controllers and PIT."""
        # In-kernel LAPICs, IOAPIC and 8259s: interrupts and INIT/SIPI never reach Python.
        self.vm.create_irqchip()
        self.vm.create_pit2(PIT_SPEAKER_DUMMY)

    def load_kernel(self) -> None:
        """Build step: write the kernel image into guest memory (vmm.machine.loader)."""
        self.loaded = loaded = loader.load_kernel(self.memory, self.memory_size, self.kernel,
                                                  self.decompress_in_guest)
        self._kernel_bytes, self._elf, self._bzimage = loaded.image, loaded.elf, loaded.bzimage
        self.entry, self.kernel_end = loaded.entry, loaded.kernel_end
        self.is_linux = loaded.is_linux

    @property
    def decompress_in_guest(self) -> bool:
        """Whether a bzImage boots through its own decompressor: `boot_via_decompressor`
        when given, else automatic: yes with hardware virtualization (the kernel relocates
        and randomizes itself, as under QEMU), no on PVM hosts."""
        if self.boot_via_decompressor is not None:
            return self.boot_via_decompressor
        return not _is_pvm_host()

    def load_initrd(self) -> None:
        """Build step: place the initrd (or the default one a Linux kernel gets) high in RAM."""
        if self.initrd is None and self.is_linux and self._default_initrd is not None:
            self.initrd = self._default_initrd()
        if self.initrd is None:
            return
        self.initrd_range = loader.load_initrd(self.memory, self.memory_size, self.initrd,
                                               self.kernel_end, self._bzimage)

    def compose_cmdline(self) -> str:
        """The command line the guest gets: the one given, or the default for the kernel; PVM
        hosts add what Linux needs there."""
        if self.requested_cmdline is not None:
            cmdline = self.requested_cmdline
        else:
            cmdline = DEFAULT_LINUX_CMDLINE if self.is_linux else ""
        if self.is_linux and self.pvm_assists and _is_pvm_host():
            cmdline = pvm.pvm_cmdline(cmdline)
        return cmdline

    def write_boot_params(self) -> None:
        """Build step: the zero page (boot_params), e820 map and command line."""
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
        zp.set_e820(L.e820_map(self.memory_size, self.topology.memory_boundaries(self.memory_size)))
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
            blob, _ = tables.acpi_tables(apic_ids, topology=self.topology, memory_size=self.memory_size)
            self.memory.write(L.ACPI_START, blob)

    def create_vcpus(self, boot_state: bool = True) -> None:
        """Build step: the vCPUs with CPUID, boot MSRs and FPU set; the boot vCPU's registers
        at the entry (the others wait for INIT/SIPI). `boot_state=False` (a snapshot's
        restore, which sets every register, MSR and FPU state next) sets CPUID only."""
        from vmm.machine.cpu import cpuid_to_list

        supported = cpuid_to_list(self.kvm.supported_cpuid())
        for index in range(self.cpus):
            # KVM gives each vCPU its vcpu_id as APIC ID: the one the MADT, the MP table
            # and CPUID name for this CPU (ids have gaps when a count is not a power of 2)
            vcpu = self.vm.create_vcpu(index, self.topology.apic_id(index))
            self.vcpus.append(vcpu)
            if index == 0:
                # Paravirtual leaves and the TSC frequency, as QEMU gives a KVM guest.
                from vmm.kvm.kvm import KVM_CAP_TSC_DEADLINE_TIMER

                supported = cpu_setup.paravirt_cpuid(
                    supported, tsc_khz=vcpu.get_tsc_khz(),
                    tsc_deadline=self.kvm.check_extension(KVM_CAP_TSC_DEADLINE_TIMER) > 0)
                self.notes.append(cpu_setup.describe_paravirt(supported))
            cpu_setup.setup_vcpu_cpuid(vcpu, supported, self.topology)
            if not boot_state:
                continue
            refused = cpu_setup.set_boot_msrs(vcpu)
            if refused and index == 0:
                self.notes.append("host refused boot MSRs " + ", ".join(f"{m:#x}" for m in refused))
            cpu_setup.setup_fpu(vcpu)
            if index == 0:
                cpu_setup.setup_boot_vcpu(vcpu, self.entry)
            # Application processors keep KVM's reset state: with the in-kernel irqchip
            # that is INIT-wait (MP_STATE_UNINITIALIZED) until the guest sends INIT/SIPI.

    # === lifecycle =====================================================================================
    def start(self) -> "MachineBuilder":
        """Refused: an assembly does not run (use vmm.runtime.Machine or vmm.Machine)."""
        raise VmmError("a MachineBuilder only assembles a VM; run it as vmm.runtime.Machine "
                       "(or vmm.Machine)")

    def _teardown(self) -> None:
        """Frees what the build made (VM, vCPU and KVM fds, guest RAM), once. The running
        machine first stops what runs (_stop_running)."""
        with self._teardown_lock:
            if self._torn_down:
                return
            self._torn_down = True
        self._stop_running()
        if self._exit is not None:
            # Output drained after the end (the pump's final drain) belongs in the tail.
            tail = self.console_log.tail(CONSOLE_TAIL_BYTES)
            self._exit = VmExit(self._exit.reason, self._exit.exit_code, self._exit.detail, tail)
        if self.vm is not None:
            if self.vm.native is not None:  # keep C's unclaimed-port counts past close
                self.port_bus.unhandled.update(self.vm.port_misses())
            self.vm.close()
        self.vcpus = []
        if self.memory is not None and self._memory_unused():
            self.memory.close()
        if self.kvm is not None:
            self.kvm.close()
        self._done.set()

    def _stop_running(self) -> None:
        """The running machine's part of teardown (timer, vCPU threads, console pump)."""

    def _memory_unused(self) -> bool:
        """Whether guest RAM may be unmapped (no vCPU thread still runs in it)."""
        return True

def _is_pvm_host() -> bool:
    from vmm.kvm.pvm import is_pvm_host

    return is_pvm_host()
