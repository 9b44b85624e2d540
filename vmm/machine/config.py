"""MachineConfig: a machine's options, checked once, then frozen.

Every bad option is a ConfigError at construction, before any KVM object exists; the
build steps read the config and never check an option again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vmm.errors import ConfigError
from vmm.machine import layout as L
from vmm.machine.topology import Topology, node_sizes


@dataclass(frozen=True)
class MachineConfig:
    """A machine's options, checked once (ConfigError) and frozen."""

    kernel: Any  # a path or the image's bytes (vmlinux ELF or bzImage)
    cpus: int
    memory_size: int  # bytes
    topology: Topology  # with every node's memory (Topology.node_memory)
    cmdline: str | None  # None: the default for the kernel (see builder.compose_cmdline)
    initrd: Any  # None, a path or bytes
    timeout: float | None
    boot_via_decompressor: bool | None  # None: automatic
    pvm_assists: bool
    acpi: bool

    @classmethod
    def create(cls, kernel: Any, cpus: int | None = None, memory: Any = "512M", cmdline: str | None = None,
               initrd: Any = None, timeout: float | None = None,
               boot_via_decompressor: bool | None = None, topology: Any = None,
               pvm_assists: bool = True, acpi: bool = True) -> "MachineConfig":
        """Check every option once and return the frozen config; ConfigError names a bad one.

        `topology`: a spec ("2n4l2c2t", the old "2s4c2t"), a preset's name or a Topology
        (vmm.machine.topology); it implies `cpus`, which may be left out (a `cpus` that
        differs is refused). `memory`: the total ("512M"), split equally over the nodes,
        or {node: size} (then the total is their sum; nodes past the CPU nodes hold
        memory only)."""
        if topology is not None and cpus is None:
            topo = Topology.parse(topology)
            cpus = topo.cpus
        elif cpus is None:
            cpus = 1
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
        topo = Topology.parse(topology, cpus)
        per_node = None
        if isinstance(memory, dict):
            per_node = dict(enumerate(node_sizes(memory, topo.nodes)))  # checked first
            memory = sum(per_node.values())
        memory_size = L.parse_memory_size(memory)
        _check_host_memory(memory_size)
        topo = topo.with_memory(memory_size, per_node)
        return cls(kernel=kernel, cpus=cpus, memory_size=memory_size,
                   topology=topo, cmdline=cmdline, initrd=initrd,
                   timeout=timeout, boot_via_decompressor=boot_via_decompressor,
                   pvm_assists=pvm_assists, acpi=acpi)


def _check_host_memory(size: int) -> None:
    """Refuse guest RAM larger than the host's RAM and swap together: the guest's RAM is
    reserved lazily (MAP_NORESERVE), so such a guest would be killed once it used it."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.count(" ") >= 1}
    except (OSError, ValueError, IndexError):
        return
    limit = info.get("MemTotal", 0) + info.get("SwapTotal", 0)
    if limit and size > limit:
        raise ConfigError(f"memory {size >> 20} MiB is more than this host has ({limit >> 20} MiB "
                          f"of RAM and swap); ask for less")
