"""A drgn.Program over the guest's physical memory (drgn is an optional dependency).

drgn (the kernel debugger from the field, https://drgn.readthedocs.io) supports
introspecting a VM from its monitor: a Program with the x86-64 platform,
``set_linux_kernel_custom(vmcoreinfo, is_live=True)`` and physical memory segments
whose reads come back to us. We give it the VMCOREINFO built from our introspection
(vmm.debug.vmcoreinfo) and the kernel's vmlinux for DWARF; drgn does its own page
walks from ``SYMBOL(swapper_pg_dir)``. drgn reads guest RAM through GuestMemory when
it needs bytes, so a Program used inside ``with machine.freeze():`` sees one
consistent state.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from vmm.errors import KernelFeatureMissing, VmmError


def import_drgn() -> Any:
    try:
        import drgn
    except ImportError as exc:
        raise KernelFeatureMissing(
            "drgn is not installed: `pip install drgn` (or the project's `debug` extra) "
            "to get a drgn.Program over the guest") from exc
    return drgn


def program(memory: Any, vmcoreinfo: bytes, vmlinux: Optional[str],
            regions: Optional[Iterable[tuple]] = None, is_live: bool = True) -> Any:
    """drgn.Program reading guest-physical memory through ``memory`` (read(gpa, n)).

    ``regions``: (gpa, size, ...) tuples of guest RAM (default memory.regions).
    ``vmlinux``: the kernel ELF with DWARF; None loads no debug info (drgn then knows
    only what VMCOREINFO says)."""
    drgn = import_drgn()
    platform = drgn.Platform(drgn.Architecture.X86_64,
                             drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN)
    prog = drgn.Program(platform)

    def read(address: int, count: int, offset: int, physical: bool) -> bytes:
        try:
            return memory.read(address, count)
        except VmmError as exc:  # drgn turns this into its own FaultError
            raise drgn.FaultError(str(exc), address) from None

    for region in (memory.regions if regions is None else regions):
        prog.add_memory_segment(region[0], region[1], read, physical=True)
    prog.set_linux_kernel_custom(vmcoreinfo, is_live)
    if vmlinux is not None:
        try:
            prog.load_debug_info([str(vmlinux)], main=True)
        except drgn.MissingDebugInfoError as exc:
            raise KernelFeatureMissing(
                f"drgn found no usable debug info in {vmlinux}: {exc} (the vmlinux needs "
                f"DWARF, CONFIG_DEBUG_INFO, and must be the kernel the guest runs)") from exc
    return prog
