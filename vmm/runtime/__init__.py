"""The running machine: vCPU threads (exit dispatch), the console pump, the freeze
coordinator, and Machine, which runs an assembly of vmm.machine.

Names load on first use (vmm/lazy.py)."""

from typing import TYPE_CHECKING

from vmm.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "ConsolePump": "console",
    **dict.fromkeys(("FreezeCoordinator", "FreezeSnapshot", "VcpuSnapshot"), "freeze"),
    **dict.fromkeys(("VcpuThread", "request_stop"), "vcpu_thread"),
    "Machine": "machine",
})

if TYPE_CHECKING:
    from vmm.runtime.console import ConsolePump
    from vmm.runtime.freeze import FreezeCoordinator, FreezeSnapshot, VcpuSnapshot
    from vmm.runtime.machine import Machine
    from vmm.runtime.vcpu_thread import VcpuThread, request_stop
