"""Machine assembly: layout, boot protocol, images, CPU setup, MP/ACPI tables, devices,
and the MachineBuilder (the assembly; vmm.runtime.Machine runs it).

Names load on first use (vmm/lazy.py)."""

from typing import TYPE_CHECKING

from vmm.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("DEFAULT_LINUX_CMDLINE", "MachineBuilder", "VmExit"), "builder"),
})

if TYPE_CHECKING:
    from vmm.machine.builder import DEFAULT_LINUX_CMDLINE, MachineBuilder, VmExit
