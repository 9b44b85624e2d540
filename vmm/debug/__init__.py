"""Hand the guest to kernel debuggers: drgn on the live guest, ELF vmcores for drgn/crash.

Top floor, below the session: imports vmm.kernel, vmm.runtime, vmm.ops (never the session);
the session (vmm/session.py) imports it, and `vmm dump`/`vmm gdb` (vmm/cli_debug.py) reach
it through the session.

    prog = machine.drgn()                 # drgn.Program over guest-physical memory
    machine.dump_core("vmcore")           # ELF vmcore: VMCOREINFO, PRSTATUS per vCPU, RAM

Modules: vmcoreinfo (the note's text from our introspection), vmcore (the ELF
writer), drgn_program (drgn.Program set-up), machine (what session.Machine calls).
"""

from vmm.debug.vmcore import PrStatus, VmcoreError, VmcoreReport  # noqa: F401
from vmm.debug.vmcoreinfo import VmcoreInfo  # noqa: F401

__all__ = ["PrStatus", "VmcoreError", "VmcoreInfo", "VmcoreReport"]
