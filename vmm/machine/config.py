"""MachineConfig: a machine's options, checked once, then frozen.

Every bad option is a ConfigError at construction, before any KVM object exists; the
build steps read the config and never check an option again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmm.errors import ConfigError
from vmm.machine import layout as L
from vmm.machine import tables


@dataclass(frozen=True)
class MachineConfig:
    """A machine's options, checked once (ConfigError) and frozen."""

    kernel: Any  # a path or the image's bytes (vmlinux ELF or bzImage)
    cpus: int
    memory_size: int  # bytes
    topology: tables.Topology
    cmdline: str | None  # None: the default for the kernel (see builder.compose_cmdline)
    initrd: Any  # None, a path or bytes
    timeout: float | None
    boot_via_decompressor: bool | None  # None: automatic
    pvm_assists: bool
    acpi: bool

    @classmethod
    def create(cls, kernel: Any, cpus: int = 1, memory: int | str = "512M", cmdline: str | None = None,
               initrd: Any = None, timeout: float | None = None,
               boot_via_decompressor: bool | None = None, topology: Any = None,
               pvm_assists: bool = True, acpi: bool = True) -> "MachineConfig":
        """Check every option once and return the frozen config; ConfigError names a bad one."""
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
        return cls(kernel=kernel, cpus=cpus, memory_size=L.parse_memory_size(memory),
                   topology=tables.Topology.parse(topology, cpus), cmdline=cmdline, initrd=initrd,
                   timeout=timeout, boot_via_decompressor=boot_via_decompressor,
                   pvm_assists=pvm_assists, acpi=acpi)
