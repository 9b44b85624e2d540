"""vCPU threads (exit dispatch), the console pump and the freeze coordinator."""

from vmm.runtime.console import ConsolePump  # noqa: F401
from vmm.runtime.freeze import FreezeCoordinator, FreezeSnapshot, VcpuSnapshot  # noqa: F401
from vmm.runtime.vcpu_thread import VcpuThread, request_stop  # noqa: F401
