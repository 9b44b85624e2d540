"""vmm: a KVM micro-VMM for testing Linux kernels and sched_ext schedulers.

    from vmm import Machine, KernelTarget, KernelValue, Op
    with Machine(kernel="build:7.3", cpus=2) as m:
        m.wait_for_console("Run /init as init process", timeout=900)
        print(m.inject_scx_clock().describe())

The layers, bottom up: ffi (C core) -> vmm.kvm -> vmm.machine -> vmm.runtime ->
vmm.kernel -> vmm.ops -> the tools (vmm.kernelstore, vmm.scxbuild, vmm.debug) -> vmm.session
-> this package -> the entry points (vmm.cli, vmm.pytest_plugin). Nothing below imports it.

Names load on first use (vmm/lazy.py): `from vmm import Machine` imports what a boot
needs and not the introspection behind it until it is used.
"""

from typing import TYPE_CHECKING

from .errors import VmmError
from .lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("Bytes", "KernelTarget", "KernelValue", "Op", "OpResult", "OrU32", "U32", "U64"),
                    "ops"),
    "Request": "runtime.requests",
    "Machine": "session",
    "ScxInjection": "ops.scx",
    "KernelRequestContext": "session_requests",
})
__all__ = ["Bytes", "KernelRequestContext", "KernelTarget", "KernelValue", "Machine", "Op",
           "OpResult", "OrU32", "Request", "ScxInjection", "U32", "U64", "VmmError"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .ops import Bytes, KernelTarget, KernelValue, Op, OpResult, OrU32, U32, U64
    from .runtime.requests import Request
    from .ops.scx import ScxInjection
    from .session import Machine
    from .session_requests import KernelRequestContext
