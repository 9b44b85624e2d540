"""Machine assembly: layout, boot protocol, images, CPU setup, MP/ACPI tables, devices,
and the MachineBuilder (the assembly; vmm.runtime.Machine runs it)."""

from vmm.machine.builder import DEFAULT_LINUX_CMDLINE, MachineBuilder, VmExit  # noqa: F401
from vmm.image.formats import extract_vmlinux  # noqa: F401
