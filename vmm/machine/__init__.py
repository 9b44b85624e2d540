"""Machine assembly: layout, boot protocol, images, CPU setup, MP/ACPI tables, devices,
and the Machine builder (the one way in)."""

from vmm.machine.builder import DEFAULT_LINUX_CMDLINE, Machine, VmExit  # noqa: F401
from vmm.machine.images import extract_vmlinux  # noqa: F401
