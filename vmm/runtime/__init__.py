"""The running machine: vCPU threads (exit dispatch), the console pump, the freeze
coordinator, and Machine, which runs an assembly of vmm.machine."""

from vmm.runtime.console import ConsolePump  # noqa: F401
from vmm.runtime.freeze import FreezeCoordinator, FreezeSnapshot, VcpuSnapshot  # noqa: F401
from vmm.runtime.vcpu_thread import VcpuThread, request_stop  # noqa: F401
from vmm.runtime.machine import Machine  # noqa: F401
