"""What vmm.session.Machine's drgn(), dump_core() and dump-on-panic call.

Everything here takes a running session Machine (vmm.session.Machine): its memory,
its freeze, its live introspection view and its kernel files.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from vmm.errors import KernelFeatureMissing, VmmError
from vmm.debug import vmcore, vmcoreinfo
from vmm.debug.vmcore import VmcoreReport


def _vmlinux_path(machine: Any) -> Optional[str]:
    path = machine._vmlinux_path
    if path is None and isinstance(machine.kernel, (str, os.PathLike)):
        with open(machine.kernel, "rb") as f:
            if f.read(4) == b"\x7fELF":
                path = machine.kernel
    return None if path is None else str(path)


def build_vmcoreinfo(machine: Any, snapshot: Any) -> vmcoreinfo.VmcoreInfo:
    """VMCOREINFO of the guest as ``snapshot`` (a freeze) sees it."""
    return vmcoreinfo.build(machine.live(snapshot))


def drgn_program(machine: Any, vmlinux: Optional[str] = None) -> Any:
    """A drgn.Program over the guest (see vmm.debug.drgn_program)."""
    from vmm.debug.drgn_program import program

    vmlinux = vmlinux or _vmlinux_path(machine)
    if vmlinux is None:
        raise KernelFeatureMissing(
            "drgn needs the kernel's vmlinux (DWARF): boot an ELF vmlinux or pass "
            "Machine(..., vmlinux=path)")
    with machine.freeze() as snap:
        info = build_vmcoreinfo(machine, snap)
    return program(machine.memory, info.data(), vmlinux)


def _current_pids(live: Any, cpus: list[int]) -> dict[int, int]:
    """pid of the task each CPU runs (what the kernel puts in its PRSTATUS notes)."""
    pids = {}
    for cpu in cpus:
        try:
            pids[cpu] = int(live.read("current_task", "->pid", cpu=cpu))
        except (VmmError, TypeError, ValueError):
            pids[cpu] = 0
    return pids


def dump_core(machine: Any, path: str) -> VmcoreReport:
    """Freeze (or join a freeze already held), write an ELF vmcore, thaw."""
    with machine.freeze() as snap:
        live = machine.live(snap)
        info = vmcoreinfo.build(live)
        vcpus = [v for v in snap.vcpus if v is not None and not v.error]
        pids = _current_pids(live, [v.index for v in vcpus])
        notes = [vmcore.prstatus_from_snapshot(v, pids.get(v.index, 0)) for v in vcpus]
        segments = []
        image = vmcore.image_segment(live)
        if image is not None:
            segments.append(image)
        segments += vmcore.ram_segments(machine.memory.regions, live.page_offset_base)
        report = vmcore.write(str(path), machine.memory, segments, notes, info.data())
    return report


def dump_on_panic(machine: Any, path: str) -> str:
    """Called as the VM ends with a panic: write the vmcore before the vCPUs stop.
    Returns text for the VM end report (the file, or why there is none)."""
    try:
        report = dump_core(machine, path)
    except VmmError as exc:
        return f"; no vmcore written to {path}: {exc}"
    machine.core_path = report.path
    return f"; vmcore written to {report.path} ({report.size} bytes)"
