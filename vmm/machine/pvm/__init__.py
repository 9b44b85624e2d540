"""Help a Linux guest through a PVM host's instruction emulator.

On a PVM host (``vmm.kvm.pvm.is_pvm_host()``: /dev/kvm without VMX/SVM) guest ring 0
is emulated instruction by instruction, and the emulator gives up on a few
instructions Linux executes (``KVM_EXIT_INTERNAL_ERROR``, suberror 1).  Remedies, all
only for PVM hosts (hosts with hardware virtualization never see any of this):

* ``cmdline.pvm_cmdline(base)``: kernel options that keep Linux away from what cannot
  be emulated, and from timing checks an emulated kernel fails.
* ``assists.assist_internal_error(vcpu, memory)``: performs, from user space, the few
  instructions Linux cannot avoid (``int3``, ``ldmxcsr``/``stmxcsr``).
* ``diagnose.describe_failure(vcpu, memory, symbols)``: names an instruction that
  could not be assisted, with the kernel symbol and a hint.

The decoder and the page walk they use live in vmm.arch.x86 (decode, paging).
README.md ("Hosts") says what a PVM host is.
"""

from typing import TYPE_CHECKING

from vmm.lazy import lazy_exports

# Names load on first use (vmm/lazy.py): a host with hardware virtualization never does.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("AssistVcpu", "GuestMemoryAccess", "assist_counts", "assist_internal_error"),
                    "assists"),
    **dict.fromkeys(("CLEARCPUID_FEATURES", "CLEARCPUID_MAX", "PVM_CMDLINE_OPTIONS",
                     "clearcpuid_value", "pvm_cmdline"), "cmdline"),
    **dict.fromkeys(("describe_failure", "identify"), "diagnose"),
})

if TYPE_CHECKING:
    from vmm.machine.pvm.assists import AssistVcpu, GuestMemoryAccess, assist_counts, assist_internal_error
    from vmm.machine.pvm.cmdline import (CLEARCPUID_FEATURES, CLEARCPUID_MAX, PVM_CMDLINE_OPTIONS,
                                         clearcpuid_value, pvm_cmdline)
    from vmm.machine.pvm.diagnose import describe_failure, identify
